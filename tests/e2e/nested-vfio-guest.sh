#!/bin/sh
# /test inside the L1 guest of tests/e2e/nested-vfio-x86_64.sh and
# tests/e2e/nested-vfio-aarch64.sh (busybox sh).
# Binds QEMU's edu (1234:11e8) to vfio-pci behind the emulated IOMMU
# (intel-iommu on x86_64, SMMUv3 on aarch64), plus an nvme (class 0x010802;
# required on x86_64 only), prints each group's reserved IOVA regions, runs
# `airlock --vfio <edu>` and airlock-probe against it. Arguments (kernel
# airlock.args=a,b) go to the probe.
# Output: "INFO nested: ..." setup lines, the probe's lines, airlock's log
# prefixed "airlock| ". Exit: the probe's status (1 on a setup failure).

say() { echo "INFO nested: $*"; }
fail() { echo "FAIL $*"; echo "0 passed, 1 failed"; exit 1; }

arch=$(uname -m)
say "kernel $(uname -r) ($arch); cmdline: $(cat /proc/cmdline)"
# Whether a clock read is a vDSO call or a system call and a clock device
# access (bench-dma times with the clock; so does every QEMU).
cs=/sys/devices/system/clocksource/clocksource0
say "clocksource $(cat $cs/current_clocksource 2>/dev/null) (available: $(cat $cs/available_clocksource 2>/dev/null)); meltdown: $(cat /sys/devices/system/cpu/vulnerabilities/meltdown 2>/dev/null) (page-table isolation makes every system call switch page tables)"
say "$(grep -c ^processor /proc/cpuinfo) cpu(s), uptime $(cut -d' ' -f1 /proc/uptime) s"
[ -d /sys/class/iommu ] && say "iommus: $(ls /sys/class/iommu | tr '\n' ' ')"
dmesg | grep -iE 'DMAR: (IOMMU enabled|Intel\(R\) Virtualization)|remapping|arm-smmu-v3.*(ias|msi)|ITS.*(Device Table|@)' | head -n 6 |
    while read -r l; do say "dmesg: $l"; done

edu="" nvme=""
for d in /sys/bus/pci/devices/*; do
    id="$(cat "$d/vendor"):$(cat "$d/device")"
    [ "$id" = "0x1234:0x11e8" ] && edu=${d##*/}
    [ "$(cat "$d/class")" = "0x010802" ] && nvme=${d##*/}
done
[ -n "$edu" ] || fail "nested-setup: no edu (1234:11e8) in /sys/bus/pci/devices"
[ -n "$nvme" ] || [ "$arch" != x86_64 ] || fail "nested-setup: no nvme (class 0x010802) in /sys/bus/pci/devices"

driver_of() { [ -e "$1/driver" ] && basename "$(readlink "$1/driver")"; }

# bind BDF: unbind from any other driver, then bind to vfio-pci.
bind() {
    d=/sys/bus/pci/devices/$1
    drv=$(driver_of "$d")
    [ "$drv" = vfio-pci ] && return 0
    if [ -n "$drv" ]; then
        say "$1: unbinding from $drv"
        echo "$1" >"$d/driver/unbind" || return 1
    fi
    echo vfio-pci >"$d/driver_override" || return 1
    echo "$1" >/sys/bus/pci/drivers_probe
    [ "$(driver_of "$d")" = vfio-pci ]
}

# vfio_ready NAME BDF: bound to vfio-pci, in an IOMMU group, /dev/vfio/<group> there.
vfio_ready() {
    d=/sys/bus/pci/devices/$2
    bind "$2" || fail "nested-setup: $1 $2 did not bind to vfio-pci (driver: $(driver_of "$d"))"
    [ -e "$d/iommu_group" ] || fail "nested-setup: $1 $2 has no iommu_group"
    g=$(basename "$(readlink "$d/iommu_group")")
    [ -c "/dev/vfio/$g" ] || fail "nested-setup: /dev/vfio/$g missing for $1 $2"
    say "$1 $2: driver vfio-pci, iommu group $g ($(ls "$d/iommu_group/devices" | tr '\n' ' ')), /dev/vfio/$g present"
    say "$1 $2: /sys/kernel/iommu_groups/$g/reserved_regions: $(tr '\n' ';' <"/sys/kernel/iommu_groups/$g/reserved_regions")"
}
vfio_ready edu "$edu"
[ -n "$nvme" ] && vfio_ready nvme "$nvme"
say "/proc/interrupts: $(head -n 1 /proc/interrupts | tr -s ' ')"
say "airlock --print-capabilities: $(/bin/airlock --print-capabilities 2>&1)"

# Extra airlock arguments: kernel parameter airlock.extra=a,b (e.g. --mediate-bars).
extra=
for w in $(cat /proc/cmdline); do
    case "$w" in airlock.extra=*) extra=$(echo "${w#airlock.extra=}" | tr , ' ') ;; esac
done
[ -n "$extra" ] && say "airlock extra arguments: $extra"
# shellcheck disable=SC2086 # $extra is split on purpose
AIRLOCK_LOG=info NO_COLOR=1 /bin/airlock --vfio "$edu" --socket-path /tmp/edu.sock $extra \
    </dev/null >/tmp/airlock.log 2>&1 &
pid=$!
i=0
while [ ! -S /tmp/edu.sock ] && kill -0 $pid 2>/dev/null && [ $i -lt 300 ]; do
    sleep 0.1
    i=$((i + 1))
done
show_log() { sed 's/^/airlock| /' /tmp/airlock.log; }
if [ ! -S /tmp/edu.sock ]; then
    kill $pid 2>/dev/null
    wait $pid
    rc=$?
    show_log
    if grep -q -- "unexpected argument '--vfio'" /tmp/airlock.log; then
        fail "airlock --vfio not supported by this build"
    fi
    fail "nested-setup: airlock --vfio $edu did not listen within 30 s (exit $rc; log above)"
fi
say "airlock (pid $pid) listening after $(cut -d' ' -f1 /proc/uptime) s of uptime"

# The probe's restart-replay check kills the sandboxed server -9 with a DMA
# in flight and replays its state to the restarted one (as patched QEMU
# does); the supervisor holds the VFIO fds, so the device is not reset.
# upgrade-broken installs a binary that exits at once, then one that hangs,
# at /bin/airlock and sends SIGUSR2: airlock must kill each and serve on,
# the device untouched. upgrade-replay does what restart-replay does through
# a good live upgrade: SIGUSR2 makes airlock start /bin/airlock beside
# itself, hand it the socket, the VFIO fds and the table of IOMMU mappings,
# and exit once the new airlock serves.
/bin/airlock-probe --socket /tmp/edu.sock --airlock-pid $pid --broken-upgrades "$@"
rc=$?
grep -E 'adopted [0-9]+ DMA mappings|adoption window closed|live upgrade' /tmp/airlock.log | sed 's/^.*\(INFO\|WARN\|ERROR\) /INFO airlock: /' | cut -c1-400
# The new airlock logs its pid; it is not this shell's child.
new=$(sed -n 's/.*live upgrade: pid \([0-9]*\) .*serves.*/\1/p' /tmp/airlock.log | tail -n 1)
if [ -n "$new" ] && kill -0 "$new" 2>/dev/null && ! kill -0 $pid 2>/dev/null; then
    echo "PASS upgrade-handed-over: airlock pid $new took over from pid $pid, which exited"
    wait $pid 2>/dev/null
    pid=$new
elif echo " $* " | grep -q upgrade-replay; then
    : # skipped by the probe's arguments
else
    echo "FAIL upgrade-handed-over: no new airlock serving after the upgrade-replay check (old pid $pid; logged: ${new:-none})"
    rc=1
fi

# Crash-only serving with a real device: kill -9 the (idle) sandboxed
# server; the supervisor keeps the device open (VFIO fds inherited by every
# server), starts a fresh server, and a new client (no replay) passes the
# probe's checks on it.
srv=$(cut -d' ' -f1 /proc/$pid/task/$pid/children 2>/dev/null)
if [ -n "$srv" ]; then
    kill -KILL "$srv"
    say "sent SIGKILL to the sandboxed server (pid $srv)"
    i=0
    while ! grep -q 'starting a fresh sandboxed server' /tmp/airlock.log && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    say "supervisor: $(grep -m1 'starting a fresh sandboxed server' /tmp/airlock.log | cut -c1-200)"
    echo "INFO restart: the probe again, against the restarted server"
    /bin/airlock-probe --socket /tmp/edu.sock --airlock-pid $pid --iterations 100 --skip restart-replay,upgrade-replay "$@" >/tmp/probe2.out 2>&1
    rc2=$?
    sed 's/^\([A-Z]* \)/\1restart: /; s/^\([0-9]* passed\)/INFO restart: \1/' /tmp/probe2.out
    if [ $rc2 -ne 0 ] || ! grep -q 'starting a fresh sandboxed server' /tmp/airlock.log; then
        echo "FAIL server-restart: the restarted server did not pass the probe (exit $rc2)"
        rc=1
    else
        echo "PASS server-restart"
    fi
else
    echo "FAIL server-restart: no server process under airlock's supervisor $pid"
    rc=1
fi

kill $pid 2>/dev/null
i=0
while kill -0 $pid 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
wait $pid 2>/dev/null
say "airlock (pid $pid) $(kill -0 $pid 2>/dev/null && echo 'still runs' || echo 'exited') after SIGTERM"

# A common mistake names its fix: RLIMIT_MEMLOCK below what VFIO must pin.
AIRLOCK_LOG=info NO_COLOR=1 /bin/airlock --vfio "$edu" --socket-path /tmp/memlock.sock --memlock 16384 $extra \
    </dev/null >/tmp/airlock-memlock.log 2>&1 &
mpid=$!
i=0
while [ ! -S /tmp/memlock.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
/bin/airlock-probe --socket /tmp/memlock.sock --iterations 10 "$@" >/dev/null 2>&1
kill $mpid 2>/dev/null
wait $mpid
if line=$(grep -m1 'RLIMIT_MEMLOCK is too low' /tmp/airlock-memlock.log); then
    echo "INFO memlock: ${line#*WARN }" | cut -c1-400
    echo "PASS memlock-error-names-the-fix"
else
    echo "FAIL memlock-error-names-the-fix: no RLIMIT_MEMLOCK line in airlock's log"
    sed 's/^/airlock-memlock| /' /tmp/airlock-memlock.log | tail -n 5
    rc=1
fi

# The emulated device's allowlist on this architecture, under the black-box
# fuzzer (the host runs the x86_64 one in scripts/test).
if [ -x /bin/airlock-blackbox-fuzz ]; then
    /bin/airlock-blackbox-fuzz --airlock /bin/airlock --messages 3000 --seconds 60 >/tmp/blackbox.out 2>&1
    rc3=$?
    grep -E '^(blackbox|FAIL)' /tmp/blackbox.out | head -n 8 | sed 's/^/INFO /'
    if [ $rc3 -eq 0 ]; then
        echo "PASS blackbox-fuzz-$arch"
    else
        echo "FAIL blackbox-fuzz-$arch: see the lines above"
        rc=1
    fi
fi

# What a DMA_MAP+UNMAP pair costs through airlock against the same two VFIO
# ioctls issued directly (the floor, on the otherwise unused nvme's group):
# a figure (BENCH line), not a check; x86_64 only (it has the nvme). Run
# with the sandbox on (the default: the line without a label), then off
# (labelled), which prices the seccomp filter on each of airlock's syscalls,
# and with --poll-us (labelled): what polling before each read saves of the
# wake-up a sleeping server pays per message. $3: more airlock arguments.
bench_dma() {
    rm -f /tmp/bench.sock
    # shellcheck disable=SC2086 # $extra and $3 are split on purpose
    AIRLOCK_LOG=info NO_COLOR=1 /bin/airlock --vfio "$edu" --socket-path /tmp/bench.sock --sandbox "$1" $extra ${3:-} </dev/null >/tmp/airlock-bench.log 2>&1 &
    bpid=$!
    i=0
    while [ ! -S /tmp/bench.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    /bin/airlock-probe --socket /tmp/bench.sock --airlock-pid $bpid --bench-dma "$ng" >/tmp/bench.out 2>&1
    grep -E '^(BENCH|INFO|FAIL) ' /tmp/bench.out | sed "s/^BENCH /INFO BENCH $2/"
    if ! grep -q '^PASS bench-dma-map-unmap' /tmp/bench.out; then
        # A probe that died (a panic) prints no FAIL line of its own.
        grep -q '^FAIL ' /tmp/bench.out ||
            echo "FAIL bench-dma-map-unmap $2: the probe ended without a verdict: $(tail -n 3 /tmp/bench.out | tr '\n' ' ' | cut -c1-300)"
        rc=1
    fi
    kill $bpid 2>/dev/null
    wait $bpid
    # airlock's own time per message (arrival to reply sent, ioctl included).
    sed -n 's/.*session ended.*handled in ([^)]*): /INFO bench-dma: airlock handled /p' /tmp/airlock-bench.log | sed 's/ device=.*//'
}
if [ -n "$nvme" ]; then
    ng=$(basename "$(readlink "/sys/bus/pci/devices/$nvme/iommu_group")")
    bench_dma on ""
    bench_dma off "(sandbox off) "
    bench_dma on "(poll 300 us) " "--poll-us 300"
fi

# The host takes the device back (vfio-pci's device request, REQ): an unbind
# from vfio-pci while a client holds the device, then while none does. Each
# time the unbind must complete within 5 s, airlock must name the request
# and exit 69 (EX_UNAVAILABLE); with a client, the probe's REQ eventfd must
# fire (QEMU would unplug the device from its guest). Last: it unbinds edu.
ms_since() { awk -v a="$1" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%d", (b - a) * 1000 }'; }
device_request() { # device_request NAME HOLD(1: a client holds the device)
    name=$1 hold=$2 log=/tmp/airlock-$1.log
    bind "$edu" || { echo "FAIL $name: $edu did not bind to vfio-pci again"; rc=1; return; }
    # shellcheck disable=SC2086 # $extra is split on purpose
    AIRLOCK_LOG=info NO_COLOR=1 /bin/airlock --vfio "$edu" --socket-path /tmp/req.sock $extra </dev/null >"$log" 2>&1 &
    apid=$!
    i=0
    while [ ! -S /tmp/req.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    hpid=""
    if [ "$hold" = 1 ]; then
        /bin/airlock-probe --socket /tmp/req.sock --hold-request 20 >/tmp/hold.out 2>&1 &
        hpid=$!
        i=0
        while ! grep -q 'holding the device' /tmp/hold.out && kill -0 $hpid 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    fi
    t0=$(cut -d' ' -f1 /proc/uptime)
    echo "$edu" >/sys/bus/pci/drivers/vfio-pci/unbind &
    upid=$!
    i=0
    while kill -0 $upid 2>/dev/null && [ $i -lt 150 ]; do sleep 0.05; i=$((i + 1)); done
    took=$(ms_since "$t0")
    unbound=1
    kill -0 $upid 2>/dev/null && unbound=0
    i=0
    while kill -0 $apid 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill -0 $apid 2>/dev/null && { kill -KILL $apid; sleep 0.2; }
    wait $apid
    arc=$?
    [ -n "$hpid" ] && { wait $hpid; grep -E '^(INFO|FAIL) ' /tmp/hold.out; }
    [ "$unbound" = 0 ] && wait $upid
    said=$(grep -m1 'device request' "$log" | sed 's/^.*\(WARN\|ERROR\) //' | cut -c1-240)
    released=$(grep -m1 'released to the host' "$log" | sed 's/^.*ERROR //' | cut -c1-200)
    say "$name: unbind took $took ms; airlock exited $arc; it said: $said / $released"
    why=""
    [ "$unbound" = 1 ] && [ "$took" -le 5000 ] || why="$why the unbind took $took ms (limit 5000);"
    [ "$arc" = 69 ] || why="$why airlock exited $arc, not 69;"
    [ -n "$said" ] || why="$why airlock's log names no device request;"
    [ -z "$hpid" ] || grep -q '^PASS device-request-relayed' /tmp/hold.out || why="$why the client's REQ eventfd never fired;"
    [ -e "/sys/bus/pci/devices/$edu/driver" ] && why="$why $edu is still bound to $(driver_of "/sys/bus/pci/devices/$edu");"
    if [ -z "$why" ]; then
        echo "PASS $name: the unbind completed in $took ms, airlock released the device and exited 69"
    else
        echo "FAIL $name:$why"
        sed 's/^/airlock-req| /' "$log" | tail -n 12
        rc=1
    fi
}
device_request device-request-held 1
device_request device-request-idle 0

say "after the probe: $(grep -E 'vfio|DMAR|smmu' /proc/interrupts | tr -s ' ' | tr '\n' ';')"
dmesg | grep -iE 'DMAR.*(fault|fail)|smmu.*(event|fault)|vfio' | tail -n 6 | while read -r l; do say "dmesg: $l"; done
show_log
exit $rc
