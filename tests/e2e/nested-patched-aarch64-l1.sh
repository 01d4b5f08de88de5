#!/bin/sh
# /test inside the L1 guest of tests/e2e/nested-patched-aarch64.sh (busybox sh).
# L1 is arm64 (virt, GICv3 ITS, SMMUv3) with QEMU's edu. This binds the edu
# to vfio-pci (its IOMMU group reserves the SMMU's software MSI window
# 0x08000000-0x080fffff), starts `airlock --vfio <edu>` with its defaults
# (sandbox on; that window comes from airlock's own reading of the group; it
# is given one more, --reserve-iova 0x7f000000:0x1000000), checks that the
# patched QEMU refuses a window over guest RAM when there is no vIOMMU
# (refuse-map: "refuse| " lines), then runs the patched arm64 QEMU from
# /opt/qemu (through its own loader) for L2: virt, GICv3 ITS, virtio-iommu, TCG, with
# -chardev socket + -device vfio-user-pci,chardev= on airlock's socket,
# kernel /l2/Image, initramfs /l2/initrd.cpio (its /test is
# tests/e2e/nested-patched-aarch64-l2.sh).
# Kernel parameters: l2.mem=SIZE (L2 RAM, default 256M), l2.cpu=MODEL (L2's
# -cpu, default cortex-a72: no pointer authentication, SVE or MTE to emulate, so
# L2 boots in half the time of -cpu max under TCG inside TCG).
# Output: "INFO l1: ..." lines, every L2 console line prefixed "l2| ",
# airlock's log prefixed "airlock| ". Exit: L2's AIRLOCK-GUEST-EXIT status
# (1 on a setup failure or if L2 printed none).

say() { echo "INFO l1: $*"; }
fail() { echo "FAIL $*"; show_log; echo "0 passed, 1 failed"; exit 1; }
. /l1-vfio.sh
. /l2-boot-args.sh

say "start at uptime $(up) s; kernel $(uname -r); $(grep -c ^processor /proc/cpuinfo) cpu(s), $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB"
dmesg | grep -iE 'arm-smmu-v3.*(ias|msi)|ITS.*@' | head -n 3 | while read -r l; do say "dmesg: $l"; done

l2mem=256M l2cpu=cortex-a72
for w in $(cat /proc/cmdline); do
    case "$w" in
        l2.mem=*) l2mem=${w#l2.mem=} ;;
        l2.cpu=*) l2cpu=${w#l2.cpu=} ;;
    esac
done

bind_edu
while read -r l; do say "L1 group $g reserved_regions: $l"; done <"/sys/kernel/iommu_groups/$g/reserved_regions"

# airlock's defaults: it reads the group's reserved regions and VFIO's
# usable IOVA ranges itself and offers them with iova_ranges. The one window
# it is given is a second one, 0x7f000000-0x7fffffff, which no doorbell
# overlaps: L2 must list it as a "reserved" line of its own.
start_airlock --reserve-iova 0x7f000000:0x1000000
# What actually runs (the host checks it has no --reserve-iova).
say "airlock cmdline: $(tr '\0' ' ' </proc/$apid/cmdline)"
say "airlock (pid $apid) listening at uptime $(up) s"

cr=$(printf '\r')
# The bundled QEMU through its own loader, as words (timeout runs programs,
# not shell functions; the paths hold no spaces).
QEMU="/opt/qemu/lib/ld-linux-aarch64.so.1 --library-path /opt/qemu/lib --argv0 qemu-system-aarch64 /opt/qemu/bin/qemu-system-aarch64"
# shellcheck disable=SC2086 # $QEMU is split into words on purpose
qemu() { $QEMU "$@"; }
say "L2 QEMU: $(qemu -version | head -n 1)"

# refuse-map: with no vIOMMU, guest RAM (0x40000000 on virt) is the IOVA
# space, so a window there must make the patched QEMU refuse the DMA map
# before it reaches airlock: the device fails to realize, QEMU exits 1
# (no abort, no guest: -S).
AIRLOCK_LOG=info NO_COLOR=1 /bin/airlock --emulate edu --socket-path /tmp/refuse.sock \
    --reserve-iova 0x40000000:0x100000 </dev/null >/tmp/refuse-airlock.log 2>&1 &
rpid=$!
wait_socket /tmp/refuse.sock $rpid || say "refuse-map: airlock --emulate edu did not listen within 30 s"
# shellcheck disable=SC2086 # $QEMU is split into words on purpose
timeout 120 $QEMU -accel tcg -M virt,gic-version=3,its=on -cpu "$l2cpu" -S -nodefaults -display none -m 128M \
    -object memory-backend-memfd,id=mem,size=128M,share=on -machine memory-backend=mem \
    -chardev socket,id=refuse0,path=/tmp/refuse.sock -device vfio-user-pci,chardev=refuse0 \
    </dev/null >/tmp/refuse.log 2>&1
say "refuse-map: QEMU exit $?"
kill $rpid 2>/dev/null
wait $rpid
sed 's/^/refuse| /' /tmp/refuse.log | head -n 20
t2=$(up)
say "starting L2 QEMU at uptime $t2 s: TCG, virt gic-version=3 its=on, virtio-iommu-pci, -cpu $l2cpu, $l2mem memfd share=on, vfio-user-pci,chardev= on /tmp/edu.sock"
{
    qemu -accel tcg -M virt,gic-version=3,its=on -cpu "$l2cpu" -smp 1 -m "$l2mem" \
        -object "memory-backend-memfd,id=mem,size=$l2mem,share=on" -machine memory-backend=mem \
        -nographic -nodefaults -serial stdio -no-reboot \
        -device virtio-iommu-pci \
        -chardev socket,id=airlock0,path=/tmp/edu.sock -device vfio-user-pci,chardev=airlock0 \
        -kernel /l2/Image -initrd /l2/initrd.cpio \
        -append "console=ttyAMA0 quiet panic=-1 $L2_BOOT_ARGS" </dev/null 2>&1
    echo "AIRLOCK-L2-QEMU-RC $?"
} | while IFS= read -r l; do
    l=${l%"$cr"}
    case "$l" in
        AIRLOCK-L2-QEMU-RC*) echo "$l" >/tmp/l2.rc ;;
        *) echo "l2| $l"; echo "$l" >>/tmp/l2.log ;;
    esac
done
say "L2 QEMU exited with $(cut -d' ' -f2 /tmp/l2.rc 2>/dev/null) at uptime $(up) s, $(awk -v a="$t2" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }') s after its start"

rc=$(sed -n 's/^AIRLOCK-GUEST-EXIT \([0-9]*\).*/\1/p' /tmp/l2.log 2>/dev/null | tail -n 1)
end_l1 "$rc" 'smmu.*(event|fault)|vfio' 4
