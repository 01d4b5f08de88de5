#!/bin/sh
# /test inside the L1 guest of tests/e2e/nested-l2-nvme-x86_64.sh (busybox sh).
# Binds the nvme (class 0x010802) to vfio-pci behind the emulated intel-iommu,
# starts `airlock --vfio <nvme> --socket-path /tmp/nvme.sock`, then runs the
# L2 QEMU from /opt/qemu (through its own loader) with vfio-user-pci on that
# socket, PVH kernel /l2/vmlinux and initramfs /l2/initrd.cpio
# (tests/e2e/nested-l2-nvme-l2.sh is its /init).
# Kernel parameters: l2.mem=SIZE (L2 RAM, default 256M), airlock.extra=a,b,
# l2.global=DRIVER.PROP=VALUE (one -global for the L2 QEMU, e.g. an
# experiment with vfio-user-pci.x-intx-mmap-timeout-ms), l2.compare=1 (then
# the same L2 with QEMU's in-process vfio-pci, lines prefixed "l2-inproc| ")
# (extra airlock arguments).
# Output: "INFO l1: ..." lines, every L2 console line prefixed "l2| ",
# airlock's log prefixed "airlock| ". Exit: L2's AIRLOCK-L2-EXIT status
# (1 on a setup failure or if L2 printed none).

. /l2-boot-args.sh
up() { read -r u _ </proc/uptime; echo "$u"; }
dt() { awk -v a="$1" -v b="${2:-$(up)}" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "INFO l1: $*"; }
fail() { echo "FAIL $*"; echo "0 passed, 1 failed"; exit 1; }

say "start at uptime $(up) s; kernel $(uname -r); $(grep -c ^processor /proc/cpuinfo) cpu(s), $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB"
dmesg | grep -iE 'DMAR: IOMMU enabled|DMAR-IR: Enabled' | while read -r l; do say "dmesg: $l"; done

l2mem=256M extra= l2global= compare= viommu=
for w in $(cat /proc/cmdline); do
    case "$w" in
        l2.mem=*) l2mem=${w#l2.mem=} ;;
        airlock.extra=*) extra=$(echo "${w#airlock.extra=}" | tr , ' ') ;;
        l2.global=*) l2global=${w#l2.global=} ;;
        l2.compare=*) compare=${w#l2.compare=} ;;
        l2.viommu=*) viommu=${w#l2.viommu=} ;;
    esac
done

# l2.viommu=strict|lazy: a virtio-iommu in L2 (iommu.strict=1 or 0), so every
# nvme I/O maps its buffers through it (DMA_MAP/DMA_UNMAP to airlock). It
# comes before the device on the command line: a vfio-pci realized before it
# takes the plain memory address space, so its container never sees the
# guest's mappings (L2 attached the nvme, QEMU switched its address space,
# and the device's DMA still went to the boot-time identity map in L1: a
# DMAR fault on the Identify buffer, the controller never came up).
strict=1
[ "$viommu" = lazy ] && strict=0

nvme=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class")" = "0x010802" ] && nvme=${d##*/}
done
[ -n "$nvme" ] || fail "l1-setup: no nvme (class 0x010802) in /sys/bus/pci/devices"
d=/sys/bus/pci/devices/$nvme
if [ -e "$d/driver" ]; then
    echo "$nvme" >"$d/driver/unbind"
fi
echo vfio-pci >"$d/driver_override"
echo "$nvme" >/sys/bus/pci/drivers_probe
[ "$(basename "$(readlink "$d/driver")")" = vfio-pci ] || fail "l1-setup: nvme $nvme did not bind to vfio-pci"
g=$(basename "$(readlink "$d/iommu_group")")
[ -c "/dev/vfio/$g" ] || fail "l1-setup: /dev/vfio/$g missing for $nvme"
say "nvme $nvme: vfio-pci, iommu group $g"

# shellcheck disable=SC2086 # $extra is split on purpose
AIRLOCK_LOG=info NO_COLOR=1 /bin/airlock --vfio "$nvme" --socket-path /tmp/nvme.sock $extra \
    </dev/null >/tmp/airlock.log 2>&1 &
apid=$!
i=0
while [ ! -S /tmp/nvme.sock ] && kill -0 $apid 2>/dev/null && [ $i -lt 300 ]; do
    sleep 0.1
    i=$((i + 1))
done
show_log() { sed 's/^/airlock| /' /tmp/airlock.log; }
if [ ! -S /tmp/nvme.sock ]; then
    kill $apid 2>/dev/null
    show_log
    fail "l1-setup: airlock --vfio $nvme did not listen within 30 s"
fi
say "airlock (pid $apid) listening at uptime $(up) s${extra:+ (extra: $extra)}"

cr=$(printf '\r')
export QEMU_MODULE_DIR=/opt/qemu/modules
mkdir -p "$QEMU_MODULE_DIR"
# run_l2 PREFIX LOG DEVICE...: the L2 QEMU with these -device arguments;
# every L2 console line goes to L1's console right away, prefixed PREFIX.
run_l2() {
    prefix=$1 log=$2
    shift 2
    t2=$(up)
    {
        /opt/qemu/lib/ld-linux-x86-64.so.2 --library-path /opt/qemu/lib --argv0 qemu-system-x86_64 \
            /opt/qemu/bin/qemu-system-x86_64 -L /opt/qemu/share \
            -accel tcg -M q35 -m "$l2mem" \
            -object "memory-backend-memfd,id=mem,size=$l2mem,share=on" -machine memory-backend=mem \
            -nographic -nodefaults -serial stdio -no-reboot \
            ${viommu:+-device virtio-iommu-pci} \
            "$@" \
            ${l2global:+-global "$l2global"} \
            -kernel /l2/vmlinux -initrd /l2/initrd.cpio \
            -append "console=ttyS0 quiet panic=-1 $L2_BOOT_ARGS${viommu:+ iommu.strict=$strict}" </dev/null 2>&1
        echo "AIRLOCK-L2-QEMU-RC $?"
    } | while IFS= read -r l; do
        l=${l%"$cr"}
        case "$l" in
            AIRLOCK-L2-QEMU-RC*) echo "$l" >/tmp/l2.rc ;;
            *) echo "$prefix $l"; echo "$l" >>"$log" ;;
        esac
    done
    qrc=$(cut -d' ' -f2 /tmp/l2.rc 2>/dev/null)
    say "L2 QEMU ($prefix) exited with ${qrc:-?} at uptime $(up) s, $(dt "$t2") s after its start"
}

say "starting L2 QEMU at uptime $(up) s: TCG, q35, $l2mem memfd share=on, vfio-user-pci on /tmp/nvme.sock"
run_l2 "l2|" /tmp/l2.log -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/tmp/nvme.sock"}}'

rc=$(sed -n 's/^AIRLOCK-L2-EXIT \([0-9]*\).*/\1/p' /tmp/l2.log 2>/dev/null | tail -n 1)
kill $apid 2>/dev/null
wait $apid
say "airlock exited with $? after SIGTERM"

# l2.compare=1: the same L2 again with QEMU's in-process vfio-pci on the same
# device (airlock has let it go), for the side-by-side I/O figures.
if [ "$compare" = 1 ]; then
    say "starting L2 QEMU at uptime $(up) s with in-process -device vfio-pci,host=$nvme"
    run_l2 "l2-inproc|" /tmp/l2-inproc.log -device "vfio-pci,host=$nvme"
    rc2=$(sed -n 's/^AIRLOCK-L2-EXIT \([0-9]*\).*/\1/p' /tmp/l2-inproc.log 2>/dev/null | tail -n 1)
    [ "${rc2:-1}" = 0 ] || rc=1
fi
dmesg | grep -iE 'DMAR.*(fault|fail)|vfio' | tail -n 6 | while read -r l; do say "dmesg: $l"; done
show_log
exit "${rc:-1}"
