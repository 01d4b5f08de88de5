# shellcheck shell=sh
# Helpers for the /test scripts of nested L1 guests that serve QEMU's edu
# with `airlock --vfio` to an L2 QEMU (busybox sh; the host puts this file
# in L1's initramfs as /l1-vfio.sh). Source it after defining say and fail
# (which may call show_log).

up() { read -r u _ </proc/uptime; echo "$u"; }
show_log() { [ -f /tmp/airlock.log ] && sed 's/^/airlock| /' /tmp/airlock.log; }

# bind_edu: bind QEMU's edu (1234:11e8) to vfio-pci. Sets edu (its BDF) and
# g (its IOMMU group; on arm64 the link appears only after binding).
bind_edu() {
    edu=""
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1234:0x11e8" ] && edu=${d##*/}
    done
    [ -n "$edu" ] || fail "l1-setup: no edu (1234:11e8) in /sys/bus/pci/devices"
    d=/sys/bus/pci/devices/$edu
    [ -e "$d/driver" ] && echo "$edu" >"$d/driver/unbind"
    echo vfio-pci >"$d/driver_override"
    echo "$edu" >/sys/bus/pci/drivers_probe
    [ "$(basename "$(readlink "$d/driver")")" = vfio-pci ] || fail "l1-setup: edu $edu did not bind to vfio-pci"
    g=$(basename "$(readlink "$d/iommu_group")")
    [ -c "/dev/vfio/$g" ] || fail "l1-setup: /dev/vfio/$g missing for $edu"
    say "edu $edu: vfio-pci, iommu group $g"
}

# wait_socket PATH PID: wait up to 30 s for PID to listen on the unix socket
# PATH; false if it did not (or died first).
wait_socket() {
    i=0
    while [ ! -S "$1" ] && kill -0 "$2" 2>/dev/null && [ $i -lt 300 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -S "$1" ]
}

# start_airlock [ARG...]: `airlock --vfio $edu --socket-path /tmp/edu.sock ARG...`
# in the background (sandbox on, its defaults), log in /tmp/airlock.log; sets
# apid (the supervisor) once the socket listens, fails after 30 s.
start_airlock() {
    AIRLOCK_LOG=info NO_COLOR=1 /bin/airlock --vfio "$edu" --socket-path /tmp/edu.sock "$@" \
        </dev/null >/tmp/airlock.log 2>&1 &
    apid=$!
    wait_socket /tmp/edu.sock $apid || { kill $apid 2>/dev/null; fail "l1-setup: airlock --vfio $edu did not listen within 30 s"; }
}

# end_l1 RC DMESG_RE N: stop airlock (SIGTERM) and say how it exited, show
# the last N kernel lines matching DMESG_RE and airlock's log, then exit
# with RC (1 when RC is empty: L2 never reported).
end_l1() {
    kill $apid 2>/dev/null
    wait $apid
    say "airlock exited with $? after SIGTERM"
    dmesg | grep -iE "$2" | tail -n "$3" | while read -r l; do say "dmesg: $l"; done
    show_log
    exit "${1:-1}"
}
