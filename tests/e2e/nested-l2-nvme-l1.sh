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
# (extra airlock arguments), l1.trace=1 (L1's scheduler events during each
# L2's 4 KiB reads, summed per thread: "INFO l1: TRACE" lines), l1.pin=1
# (airlock on CPU 1, the L2 QEMU on CPU 0).
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

l2mem=256M extra= l2global= compare= viommu= trace= pin=
for w in $(cat /proc/cmdline); do
    case "$w" in
        l2.mem=*) l2mem=${w#l2.mem=} ;;
        airlock.extra=*) extra=$(echo "${w#airlock.extra=}" | tr , ' ') ;;
        l2.global=*) l2global=${w#l2.global=} ;;
        l2.compare=*) compare=${w#l2.compare=} ;;
        l2.viommu=*) viommu=${w#l2.viommu=} ;;
        l1.trace=*) trace=${w#l1.trace=} ;;
        l1.pin=*) pin=${w#l1.pin=} ;;
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

# l1.pin=1: airlock on L1's CPU 1, every L2 QEMU thread on CPU 0. Under TCG a
# switch between processes on one vCPU empties its emulated TLB; pinned, each
# CPU keeps running one process (the idle task keeps the last one's tables).
pin_airlock= pin_qemu=
[ "$pin" = 1 ] && pin_airlock="taskset -c 1" pin_qemu="taskset -c 0"
# shellcheck disable=SC2086 # $pin_airlock and $extra are split on purpose
AIRLOCK_LOG=info NO_COLOR=1 $pin_airlock /bin/airlock --vfio "$nvme" --socket-path /tmp/nvme.sock $extra \
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

# l1.trace=1: L1's scheduler events while L2 reads 4 KiB blocks (from L2's
# "nvme phase took" line to its "BENCH read-4k" line), summed per thread:
# who was woken how often, how long each waited for a CPU (median), how many
# of those wake-ups found their CPU idle (it had to leave a halt), CPU time.
# The summary runs while L2 goes on to its 128 KiB reads, so a traced run's
# 128 KiB figures (and, tracing itself, its 4 KiB ones) are not comparable
# with an untraced run's.
tr=/sys/kernel/tracing
trace_on() {
    [ -e $tr/tracing_on ] || mount -t tracefs nodev $tr || return 0
    echo 0 >$tr/tracing_on
    echo 65536 >$tr/buffer_size_kb
    echo 'sched:sched_switch sched:sched_wakeup' >$tr/set_event
    echo >$tr/trace
    echo 1 >$tr/tracing_on
}
trace_report() {
    [ -e $tr/tracing_on ] || return 0
    echo 0 >$tr/tracing_on
    awk -v wl=/tmp/wl -v rt=/tmp/rt '
        function ts() { match($0, /[0-9]+\.[0-9]+: sched_/); return substr($0, RSTART, RLENGTH - 8) + 0 }
        function f(k, e,   s, i) { s = $0; i = index(s, k "="); s = substr(s, i + length(k) + 1); return substr(s, 1, index(s, " " e "=") - 1) }
        function n(k) { match($0, k "=[0-9]+"); return substr($0, RSTART + length(k) + 1, RLENGTH - length(k) - 1) }
        / sched_wakeup: / { t = ts(); p = n(" pid"); w[p] = t; s = $0; sub(/^ +/, "", s); s = substr(s, 1, index(s, " [") - 1); sub(/ +$/, "", s); sub(/-[0-9]+$/, "", s); by[p] = s; next }
        / sched_switch: / {
            t = ts(); if (!t0) t0 = t; t1 = t
            pp = n("prev_pid"); np = n("next_pid")
            if (pp in on) { run[f("prev_comm", "prev_pid") "/" pp] += t - on[pp]; delete on[pp] }
            if (np == 0) next
            on[np] = t
            if (np in w) { printf "%s/%s woken by %s|%d|%d\n", f("next_comm", "next_pid"), np, by[np], (t - w[np]) * 1e6, pp == 0 >wl; delete w[np] }
        }
        END { for (c in run) printf "%s|%d\n", c, run[c] * 1e6 >rt; printf "%d\n", (t1 - t0) * 1e6 }' $tr/trace >/tmp/span
    echo >$tr/trace
    say "trace $1: $(cat /tmp/span) us of 4 KiB reads; per thread and waker: wake-ups, median wait for a CPU (us), wake-ups onto an idle CPU; per thread: CPU time (us)"
    sort -t'|' -k1,1 -k2,2n /tmp/wl | awk -F'|' '
        { v[$1, ++k[$1]] = $2; idle[$1] += $3 }
        END { for (c in k) if (k[c] >= 20) printf "TRACE %s|wakeups=%d|median_wait_us=%d|onto_idle=%d\n", c, k[c], v[c, int((k[c] + 1) / 2)], idle[c] }' |
        sort -t= -k2,2nr | while read -r l; do say "$l"; done
    sort -t'|' -k2,2nr /tmp/rt | awk -F'|' '$2 >= 10000 { printf "TRACE-CPU %s|cpu_us=%d\n", $1, $2 }' | while read -r l; do say "$l"; done
}

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
        # shellcheck disable=SC2086 # $pin_qemu is split on purpose
        $pin_qemu /opt/qemu/lib/ld-linux-x86-64.so.2 --library-path /opt/qemu/lib --argv0 qemu-system-x86_64 \
            /opt/qemu/bin/qemu-system-x86_64 -L /opt/qemu/share \
            -accel tcg -M q35 -m "$l2mem" \
            -object "memory-backend-memfd,id=mem,size=$l2mem,share=on" -machine memory-backend=mem \
            -nographic -nodefaults -serial stdio -no-reboot -name l2,debug-threads=on \
            ${viommu:+-device virtio-iommu-pci} \
            "$@" \
            ${l2global:+-global "$l2global"} \
            -kernel /l2/vmlinux -initrd /l2/initrd.cpio \
            -append "console=ttyS0 quiet panic=-1 $L2_BOOT_ARGS${viommu:+ iommu.strict=$strict}" </dev/null 2>&1
        echo "AIRLOCK-L2-QEMU-RC $?"
    } | while IFS= read -r l; do
        l=${l%"$cr"}
        case "$l" in
            AIRLOCK-L2-QEMU-RC*)
                echo "$l" >/tmp/l2.rc
                continue
                ;;
            *"nvme phase took"*) [ "$trace" = 1 ] && trace_on ;;
            "BENCH read-4k"*) [ "$trace" = 1 ] && trace_report "$prefix" ;;
        esac
        echo "$prefix $l"
        echo "$l" >>"$log"
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
