#!/usr/bin/env bash
# scripts/check-guest-boot.sh [x86_64] [aarch64]
# Self-check of the guest tooling: boots each arch (default: both) under TCG
# with a virtio-iommu and QEMU's edu device (1234:11e8), and inside the guest
# lists PCI devices, checks /dev/vfio/vfio, binds edu to vfio-pci and checks
# that its IOMMU group and /dev/vfio/<group> appear. Prints the wall time from
# QEMU start to the AIRLOCK-GUEST-EXIT marker. Exit 0 if all arches pass.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"

arches=("$@")
((${#arches[@]})) || arches=(x86_64 aarch64)

"$here/setup-qemu.sh"
"$here/setup-guest.sh"

work=$(mktemp -d "${TMPDIR:-/tmp}/airlock-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

cat >"$work/test" <<'EOF'
#!/bin/sh
fail=0
check() { if "$@"; then echo "ok: $*"; else echo "FAIL: $*"; fail=1; fi; }
echo "uptime at /test: $(cut -d' ' -f1 /proc/uptime) s"
edu=
for d in /sys/bus/pci/devices/*; do
    b=${d##*/} v=$(cat $d/vendor) i=$(cat $d/device) drv=-
    [ -e $d/driver ] && drv=$(basename $(readlink $d/driver))
    echo "pci $b $v:$i class=$(cat $d/class) driver=$drv"
    [ "$v:$i" = 0x1234:0x11e8 ] && edu=$b
done
echo "iommu groups before bind: $(ls /sys/kernel/iommu_groups | wc -l)"
check test -c /dev/vfio/vfio
check test -n "$edu"
if [ -n "$edu" ]; then
    echo vfio-pci >/sys/bus/pci/devices/$edu/driver_override
    echo $edu >/sys/bus/pci/drivers_probe
    check test -e /sys/bus/pci/devices/$edu/iommu_group
    check test "$(basename "$(readlink /sys/bus/pci/devices/$edu/driver)")" = vfio-pci
    group=$(basename "$(readlink /sys/bus/pci/devices/$edu/iommu_group)")
    echo "edu $edu -> iommu group $group"
    check test -c /dev/vfio/$group
fi
p=/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts; [ -e $p ] && echo "vfio_iommu_type1 allow_unsafe_interrupts=$(cat $p)"
echo "iommu groups after bind: $(ls /sys/kernel/iommu_groups | wc -l)"
check test "$(ls /sys/kernel/iommu_groups | wc -l)" -gt 0
ls -l /dev/vfio
exit $fail
EOF
chmod +x "$work/test"

status=0
for arch in "${arches[@]}"; do
    "$here/mkinitramfs" "$arch" "$work/$arch.cpio" "$work/test:/test"
    log "$arch: booting"
    t0=$(date +%s%N)
    rc=0
    "$here/boot-guest" "$arch" "$work/$arch.cpio" -device edu || rc=$?
    t1=$(date +%s%N)
    ms=$(((t1 - t0) / 1000000))
    if ((rc == 0)); then
        log "$arch: PASS (qemu start to exit marker: $((ms / 1000)).$(printf %03d $((ms % 1000))) s)"
    else
        log "$arch: FAIL (rc $rc after $((ms / 1000)) s)"
        status=1
    fi
done
exit $status
