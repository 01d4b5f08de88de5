#!/bin/sh
# /test inside the L1 guest of tests/e2e/nested-restart-x86_64.sh (busybox sh).
# Binds QEMU's edu (1234:11e8) to vfio-pci behind the emulated intel-iommu,
# starts `airlock --vfio <edu> --socket-path /tmp/edu.sock` (sandbox on, the
# defaults), then runs the PATCHED L2 QEMU from /opt/qemu (through its own
# loader) with
#   -chardev socket,id=c0,path=/tmp/edu.sock,reconnect-ms=N
#   -device vfio-user-pci,chardev=c0
# and a virtio-iommu; L2's /test soaks the device (airlock-guest-test --soak
# S --sentinel AT:HOLD). When L2 prints "SENTINEL wrote" (the sentinel is in
# edu's liveness register) and one more round has ended, this kills
# airlock's sandboxed server (the supervisor's child) with SIGKILL, once;
# the supervisor starts a fresh server, which adopts the device (the
# supervisor holds the VFIO fds) and the patched QEMU reconnects and
# replays. Then it waits for L2 to finish.
# Kernel parameters: l2.mem=SIZE (default 256M), restart.reconnect=MS
# (default 100), airlock.extra=a,b (extra airlock arguments), l2.append=a,b
# (extra words for L2's kernel command line).
# Output: "INFO l1: ..." lines; every line of the L2 QEMU (L2's console and
# QEMU's own messages) as "l2 <L1 uptime>| <line>"; the kill as
# "INFO l1: KILL <uptime> server <pid> supervisor <pid>"; airlock's log
# prefixed "airlock| ". Exit: L2's AIRLOCK-GUEST-EXIT status (1 on a setup
# failure or if L2 printed none).

say() { echo "INFO l1: $*"; }
fail() { echo "FAIL $*"; show_log; exit 1; }
. /l1-vfio.sh

say "start at uptime $(up) s; kernel $(uname -r); $(grep -c ^processor /proc/cpuinfo) cpu(s), $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB"
dmesg | grep -iE 'DMAR: IOMMU enabled|DMAR-IR: Enabled' | while read -r l; do say "dmesg: $l"; done

l2mem=256M reconnect=100 extra= l2append=
for w in $(cat /proc/cmdline); do
    case "$w" in
        l2.mem=*) l2mem=${w#l2.mem=} ;;
        restart.reconnect=*) reconnect=${w#restart.reconnect=} ;;
        airlock.extra=*) extra=$(echo "${w#airlock.extra=}" | tr , ' ') ;;
        l2.append=*) l2append=$(echo "${w#l2.append=}" | tr , ' ') ;;
    esac
done

bind_edu

# shellcheck disable=SC2086 # $extra is split on purpose
start_airlock $extra
say "airlock (supervisor pid $apid) listening at uptime $(up) s${extra:+ (extra: $extra)}"

# The L2 QEMU; each of its lines goes to L1's console at once with L1's
# uptime, and into /tmp/l2.log (for the waits below).
cr=$(printf '\r')
: >/tmp/l2.log
say "starting the patched L2 QEMU at uptime $(up) s: TCG, q35, $l2mem memfd share=on, virtio-iommu," \
    "-chardev socket,id=c0,path=/tmp/edu.sock,reconnect-ms=$reconnect -device vfio-user-pci,chardev=c0"
{
    sh -c 'echo $$ >/tmp/l2.pid; exec "$@"' l2 \
        /opt/qemu/lib/ld-linux-x86-64.so.2 --library-path /opt/qemu/lib --argv0 qemu-system-x86_64 \
        /opt/qemu/bin/qemu-system-x86_64 -L /opt/qemu/share \
        -accel tcg -M q35 -m "$l2mem" \
        -object "memory-backend-memfd,id=mem,size=$l2mem,share=on" -machine memory-backend=mem \
        -nographic -nodefaults -serial stdio -no-reboot \
        -device virtio-iommu-pci \
        -chardev "socket,id=c0,path=/tmp/edu.sock,reconnect-ms=$reconnect" \
        -device vfio-user-pci,chardev=c0 \
        -kernel /l2/vmlinux -initrd /l2/initrd.cpio \
        -append "console=ttyS0 quiet panic=-1${l2append:+ $l2append}" </dev/null 2>&1
    echo "AIRLOCK-L2-QEMU-RC $?"
} | while IFS= read -r l; do
    l=${l%"$cr"}
    read -r u _ </proc/uptime
    echo "l2 $u| $l"
    echo "$u $l" >>/tmp/l2.log
done &
lpid=$!
t2=$(up)

l2_running() { ! grep -q 'AIRLOCK-L2-QEMU-RC' /tmp/l2.log; }
# wait_l2 REGEX SECONDS: until a line of /tmp/l2.log matches (1 if the L2
# QEMU ended or time ran out).
wait_l2() {
    n=0
    while [ $n -lt $(($2 * 10)) ]; do
        grep -qE "$1" /tmp/l2.log && return 0
        l2_running || return 1
        sleep 0.1
        n=$((n + 1))
    done
    return 1
}
rounds() { grep -c ' ROUND ' /tmp/l2.log; }

if wait_l2 ' SENTINEL wrote ' 900; then
    # One more round, so that the kill falls inside a round (DMA in flight).
    r0=$(rounds)
    n=0
    while [ "$(rounds)" -le "$r0" ] && [ $n -lt 300 ] && l2_running; do
        sleep 0.05
        n=$((n + 1))
    done
    srv=$(cut -d' ' -f1 /proc/$apid/task/$apid/children 2>/dev/null)
    [ -n "$srv" ] || srv=$(pgrep -P "$apid" | head -n 1)
    if [ -n "$srv" ]; then
        tk=$(up)
        kill -KILL "$srv"
        say "KILL $tk server $srv supervisor $apid"
        say "SIGKILL sent to airlock's sandboxed server (pid $srv, child of the supervisor $apid); last L2 line: $(tail -n 1 /tmp/l2.log)"
    else
        say "no sandboxed server under airlock's supervisor $apid: nothing killed"
    fi
    if wait_l2 'the server is back' 120; then
        say "L2 QEMU reports the resume: $(grep -m1 'the server is back' /tmp/l2.log)"
    else
        say "no resume line from the L2 QEMU within 120 s of the kill"
    fi
else
    say "L2 never wrote the sentinel (see its lines above); no kill"
fi

# The soak runs to its end; then L2 powers off.
n=0
while l2_running && [ $n -lt 9000 ]; do
    sleep 0.1
    n=$((n + 1))
done
if l2_running; then
    say "the L2 QEMU is still running after the soak's end: stopping it"
    kill "$(cat /tmp/l2.pid)" 2>/dev/null
    sleep 2
fi
wait $lpid
say "L2 QEMU ended: $(grep -m1 'AIRLOCK-L2-QEMU-RC' /tmp/l2.log | cut -d' ' -f2-) at uptime $(up) s, $(awk -v a="$t2" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }') s after its start"

grep -E 'starting a fresh sandboxed server|adopted [0-9]+ DMA mappings|adoption window closed' /tmp/airlock.log |
    sed -E 's/^[^ ]+ +[A-Z]+ [a-z_:]+: /INFO airlock: /' | cut -c1-500
rc=$(sed -n 's/^[0-9.]* AIRLOCK-GUEST-EXIT \([0-9]*\).*/\1/p' /tmp/l2.log | tail -n 1)
end_l1 "$rc" 'DMAR.*(fault|fail)|vfio' 6
