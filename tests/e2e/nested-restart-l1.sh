#!/bin/sh
# /test inside the L1 guest of tests/e2e/nested-restart-x86_64.sh. L1's init
# is systemd (a Debian trixie root, scripts/mk-systemd-initramfs), which
# runs this as a unit; airlock runs as the shipped units do in production.
#
# Binds QEMU's edu (1234:11e8) to vfio-pci behind the emulated intel-iommu,
# starts airlock@<edu>.socket (the shipped units, /usr/local/bin/airlock),
# then runs the PATCHED L2 QEMU from /opt/qemu (through its own loader) with
#   -chardev socket,id=c0,path=/run/airlock/<edu>.sock,reconnect-ms=N
#   -device vfio-user-pci,chardev=c0
# and a virtio-iommu; the connection socket-activates airlock@<edu>.service.
# L2's /test soaks the device (airlock-guest-test --soak S --sentinel
# AT:HOLD). Once L2 prints "SENTINEL wrote" (the sentinel is in edu's
# liveness register) and one more round has ended, the events below happen
# one after another, each once QEMU has resumed from the one before:
#   kill-server    kill -9 of airlock's sandboxed server (the supervisor
#                  starts a fresh one)
#   reload         systemctl reload: a live upgrade to the same binary (the
#                  main pid changes)
#   reload-broken  systemctl reload with a binary that exits at once
#                  installed: the running airlock keeps serving (no
#                  disconnect, same main pid); the good binary is put back
#   restart        systemctl restart: the device waits in systemd's fd store
#   kill-main      kill -9 of airlock's main pid: Restart=on-failure, the
#                  device again from the fd store
# Then it waits for L2 to finish, and `systemctl stop`s the socket and the
# service: the fd store must be empty, no process may hold the group, and the
# device must be quiesced (bus mastering off).
# Kernel parameters: l2.mem=SIZE (default 256M), restart.reconnect=MS
# (default 100), airlock.extra=a,b (extra airlock arguments), l2.append=a,b
# (extra words for L2's kernel command line).
# Output: "INFO l1: ..." lines; every line of the L2 QEMU (L2's console and
# QEMU's own messages) as "l2 <L1 uptime>| <line>"; each event as
# "INFO l1: EVENT <name> <uptime> <what>"; the stop as "INFO l1: STOP ...";
# airlock's journal prefixed "airlock| ". Exit: L2's AIRLOCK-GUEST-EXIT
# status (1 on a setup failure or if L2 printed none).

say() { echo "INFO l1: $*"; }
fail() { echo "FAIL $*"; show_journal; exit 1; }
. /l1-vfio.sh
. /l2-boot-args.sh

svc() { echo "airlock@$edu.service"; }
show_journal() {
    [ -n "${edu:-}" ] && journalctl --no-pager -o short-monotonic -u "airlock@$edu.service" -u "airlock@$edu.socket" 2>/dev/null |
        sed 's/^/airlock| /'
}
main_pid() { systemctl show -p MainPID --value "$(svc)"; }
stored() { systemctl show -p NFileDescriptorStore --value "$(svc)"; }
journal() { journalctl --no-pager -o cat -u "$(svc)" 2>/dev/null; }

say "start at uptime $(up) s; kernel $(uname -r); $(systemctl --version | head -n 1); PID 1 is $(readlink /proc/1/exe); $(grep -c ^processor /proc/cpuinfo) cpu(s), $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB"
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

modprobe vfio-pci || fail "l1-setup: modprobe vfio-pci failed"
bind_edu

# The shipped units, as an administrator installs them (the initramfs put
# them in /etc/systemd/system and airlock in /usr/local/bin; a good copy of
# it waits in /opt/airlock for after the broken upgrade).
if [ -n "$extra" ]; then
    mkdir -p /etc/systemd/system/airlock@.service.d
    printf '[Service]\nExecStart=\nExecStart=/usr/local/bin/airlock --device %%I %s\n' "$extra" \
        >/etc/systemd/system/airlock@.service.d/extra.conf
fi
systemctl daemon-reload
systemctl start "airlock@$edu.socket" || fail "l1-setup: systemctl start airlock@$edu.socket failed"
sock=/run/airlock/$edu.sock
[ -S "$sock" ] || fail "l1-setup: airlock@$edu.socket made no $sock"
say "airlock@$edu.socket listens on $sock at uptime $(up) s${extra:+ (extra: $extra)}"

# The L2 QEMU; each of its lines goes to L1's console at once with L1's
# uptime, and into /tmp/l2.log (for the waits below).
cr=$(printf '\r')
: >/tmp/l2.log
say "starting the patched L2 QEMU at uptime $(up) s: TCG, q35, $l2mem memfd share=on, virtio-iommu," \
    "-chardev socket,id=c0,path=$sock,reconnect-ms=$reconnect -device vfio-user-pci,chardev=c0"
{
    sh -c 'echo $$ >/tmp/l2.pid; exec "$@"' l2 \
        /opt/qemu/lib/ld-linux-x86-64.so.2 --library-path /opt/qemu/lib --argv0 qemu-system-x86_64 \
        /opt/qemu/bin/qemu-system-x86_64 -L /opt/qemu/share \
        -accel tcg -M q35 -m "$l2mem" \
        -object "memory-backend-memfd,id=mem,size=$l2mem,share=on" -machine memory-backend=mem \
        -nographic -nodefaults -serial stdio -no-reboot \
        -device virtio-iommu-pci \
        -chardev "socket,id=c0,path=$sock,reconnect-ms=$reconnect" \
        -device vfio-user-pci,chardev=c0 \
        -kernel /l2/vmlinux -initrd /l2/initrd.cpio \
        -append "console=ttyS0 quiet panic=-1 $L2_BOOT_ARGS${l2append:+ $l2append}" </dev/null 2>&1
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
resumes() { grep -c 'the server is back' /tmp/l2.log; }
# next_round: wait until L2 has printed one more round (at most 15 s).
next_round() {
    r0=$(rounds)
    n=0
    while [ "$(rounds)" -le "$r0" ] && [ $n -lt 300 ] && l2_running; do
        sleep 0.05
        n=$((n + 1))
    done
}
# wait_resume N: until QEMU has logged its N-th resume (at most 60 s).
wait_resume() {
    n=0
    while [ "$(resumes)" -lt "$1" ] && [ $n -lt 600 ] && l2_running; do
        sleep 0.1
        n=$((n + 1))
    done
    [ "$(resumes)" -ge "$1" ] && say "L2 QEMU: $(grep 'the server is back' /tmp/l2.log | sed -n "${1}p" | cut -d' ' -f2-)"
}
# wait_pid_change OLD: until the service's main pid is another (15 s).
wait_pid_change() {
    n=0
    while { [ "$(main_pid)" = "$1" ] || [ "$(main_pid)" = 0 ]; } && [ $n -lt 150 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    main_pid
}
# event NAME WHAT: said just before the event happens (its uptime starts the
# window in which QEMU must lose and regain the server).
event() { say "EVENT $1 $(up) $2"; }
install_airlock() { # install_airlock FILE: as a package upgrade does (rename over)
    cp "$1" /usr/local/bin/airlock.new && chmod 0755 /usr/local/bin/airlock.new &&
        mv /usr/local/bin/airlock.new /usr/local/bin/airlock
}

events() {
    wait_resume 0
    pid=$(main_pid)
    say "airlock@$edu.service serves: main pid $pid, $(stored) fds in systemd's fd store"

    srv=$(cut -d' ' -f1 "/proc/$pid/task/$pid/children" 2>/dev/null)
    [ -n "$srv" ] || { say "no sandboxed server under airlock's main pid $pid"; return; }
    event kill-server "server $srv main $pid"
    kill -KILL "$srv"
    wait_resume 1
    next_round

    old=$(main_pid)
    # (systemctl reload returns once airlock says READY=1 again: after the
    # new airlock's probation, or after a failed upgrade)
    event reload "main $old"
    systemctl reload "$(svc)" || say "systemctl reload failed"
    wait_resume 2
    new=$(wait_pid_change "$old")
    say "reload: main pid $old -> $new"
    next_round

    printf '#!/bin/sh\nexit 1\n' >/tmp/broken
    install_airlock /tmp/broken
    old=$(main_pid)
    event reload-broken "main $old"
    systemctl reload "$(svc)" || say "systemctl reload failed"
    n=0
    while ! journal | grep -q 'live upgrade failed' && [ $n -lt 150 ]; do sleep 0.1; n=$((n + 1)); done
    say "reload-broken: main pid $old -> $(main_pid); airlock: $(journal | grep -m1 'live upgrade failed' | cut -c1-300)"
    install_airlock /opt/airlock/airlock
    next_round
    next_round

    old=$(main_pid)
    event restart "main $old"
    systemctl restart "$(svc)" || say "systemctl restart failed"
    wait_resume 3
    say "restart: main pid $old -> $(wait_pid_change "$old"); $(stored) fds in the store"
    next_round

    old=$(main_pid)
    event kill-main "main $old"
    kill -KILL "$old"
    wait_resume 4
    say "kill-main: main pid $old -> $(wait_pid_change "$old"); $(stored) fds in the store"
}

if wait_l2 ' SENTINEL wrote ' 900; then
    # One more round, so that the first event falls inside a round.
    next_round
    events
    say "events done at uptime $(up) s; last L2 line: $(tail -n 1 /tmp/l2.log)"
else
    say "L2 never wrote the sentinel (see its lines above); no events"
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

# systemctl stop: nothing stays open, and the kernel quiesced the device.
before=$(stored)
systemctl stop "airlock@$edu.socket" "$(svc)"
holders=$(ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c "/dev/vfio/$g\$")
cmd=$(od -An -tx2 -j4 -N2 "/sys/bus/pci/devices/$edu/config" | tr -d ' ')
master=$(((0x$cmd >> 2) & 1))
say "STOP store $before -> $(stored) fds; holders of /dev/vfio/$g: $holders; command register 0x$cmd (bus master $master); state $(systemctl show -p ActiveState --value "$(svc)")"

# The host takes the device back under systemd: airlock, started again (the
# device's fds in the store), hears vfio-pci's request when L1 unbinds the
# edu, empties the store, exits 69 and is not restarted (RestartPreventExitStatus=).
systemctl start "airlock@$edu.socket" "$(svc)" || say "systemctl start failed"
n=0
while [ "$(stored)" != 4 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
wpid=$(main_pid)
r0=$(systemctl show -p NRestarts --value "$(svc)")
t0=$(up)
echo "$edu" >/sys/bus/pci/drivers/vfio-pci/unbind &
upid=$!
n=0
while kill -0 $upid 2>/dev/null && [ $n -lt 300 ]; do sleep 0.05; n=$((n + 1)); done
took=$(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%d", (b - a) * 1000 }')
unbound=yes
kill -0 $upid 2>/dev/null && unbound=no
sleep 3 # RestartSec=1s: a restart would have happened by now
show() { systemctl show -p "$1" --value "$(svc)"; }
driver=none
[ -e "/sys/bus/pci/devices/$edu/driver" ] && driver=$(basename "$(readlink "/sys/bus/pci/devices/$edu/driver")")
said=$(journal | grep -c 'device request: the host asks for the device back')
say "WITHDRAW main pid $wpid; unbind done $unbound after $took ms; driver $driver; state $(show ActiveState)/$(show Result); status $(show ExecMainStatus); restarts $r0 -> $(show NRestarts); store $(stored) fds; request lines $said"
journal | grep -E 'device request|released to the host' | sed 's/^/INFO airlock: /' | cut -c1-400

journal | grep -E 'starting a fresh sandboxed server|adopted [0-9]+ DMA mappings|adoption window closed|live upgrade|fd store|took over' |
    sed -E 's/^/INFO airlock: /' | cut -c1-500
rc=$(sed -n 's/^[0-9.]* AIRLOCK-GUEST-EXIT \([0-9]*\).*/\1/p' /tmp/l2.log | tail -n 1)
dmesg | grep -iE 'DMAR.*(fault|fail)|vfio' | tail -n 6 | while read -r l; do say "dmesg: $l"; done
show_journal
exit "${rc:-1}"
