#!/usr/bin/env bash
# tests/e2e/hotplug-x86_64.sh: an airlock device plugged into and out of a
# running QEMU through QMP, 20 times: device_add of vfio-user-pci onto a
# pcie-root-port, the guest sees the device arrive and the guest program
# passes against it, device_del, the guest sees it go. airlock's server keeps
# serving (the same process throughout) and its fd count and RSS stay flat.
# Runs airlock's patched QEMU: stock QEMU 11.1 aborts at the first device_del.
# Logs: $AIRLOCK_LOG_DIR (default logs/e2e-hotplug/). Last line:
# "N passed, M failed". Exit 0 iff all passed; 77 if it could not run.
set -euo pipefail
E2E_NAME=e2e-hotplug
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/patched-lib.sh"

CYCLES=${HOTPLUG_CYCLES:-20}
ok() { verdict "$E2E_NAME" OK "$*"; }
bad() { verdict "$E2E_NAME" FAIL "$*"; }

section "setup"
# Stock QEMU 11.1 aborts at device_del of a vfio-user-pci device
# (memory_region_del_subregion assertion: the MSI-X PBA overlay); the
# patched QEMU (qemu-patches/) removes it cleanly.
patched_prereqs
e2e_build
cat >"$IMG_DIR/hotplug.sh" <<'EOF'
#!/bin/sh
# /test: for each plug cycle, wait for the edu (1234:11e8) to arrive, run the
# guest program against it, then wait for it to go.
cycles=$1
find_edu() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor" 2>/dev/null):$(cat "$d/device" 2>/dev/null)" = "0x1234:0x11e8" ] && { echo "${d##*/}"; return 0; }
    done
    return 1
}
echo "HOTPLUG-READY"
i=1
while [ $i -le "$cycles" ]; do
    t=0
    until bdf=$(find_edu); do
        sleep 0.2
        t=$((t + 1))
        [ $t -gt 600 ] && { echo "HOTPLUG-FAIL $i: no device arrived"; exit 1; }
    done
    echo "HOTPLUG-ADDED $i $bdf"
    if /bin/guest-test --bdf "$bdf" >/tmp/out 2>&1; then
        echo "HOTPLUG-PASS $i $(grep -E '^[0-9]+ passed' /tmp/out)"
    else
        sed "s/^/HOTPLUG-OUT $i /" /tmp/out
        echo "HOTPLUG-FAIL $i $(grep -E '^(FAIL|[0-9]+ passed)' /tmp/out | tr '\n' ' ')"
    fi
    t=0
    while find_edu >/dev/null; do
        sleep 0.2
        t=$((t + 1))
        [ $t -gt 600 ] && { echo "HOTPLUG-FAIL $i: the device never went"; exit 1; }
    done
    echo "HOTPLUG-GONE $i"
    i=$((i + 1))
done
EOF
chmod +x "$IMG_DIR/hotplug.sh"
cpio=$(initramfs hotplug "$IMG_DIR/hotplug.sh:/test" "$GUEST_BIN:/bin/guest-test")
note "initramfs: $cpio; logs: $LOG_DIR"
rm -f "$LOG_DIR"/*.console.log "$LOG_DIR"/airlock*.log

section "$CYCLES x device_add / guest program / device_del"
sock="$RUN_DIR/edu.sock" qmp_sock="$RUN_DIR/qmp.sock"
start_airlock apid "$sock" "$LOG_DIR/airlock.log"
srv=$(cut -d' ' -f1 "/proc/$apid/task/$apid/children")
GUEST_TIMEOUT=$((60 + CYCLES * 60)) GUEST_APPEND="airlock.args=$CYCLES" \
    start_guest gpid hotplug "$cpio" -device pcie-root-port,id=rp0,chassis=1,slot=1 \
    -qmp "unix:$qmp_sock,server=on,wait=off"
wait_for "$GUEST_LOG" 'HOTPLUG-READY' 60 || { cat "$GUEST_LOG" | tail -5; die "the guest never got ready"; }
note "guest ready after $(elapsed "$GUEST_T0") s; airlock supervisor $apid, server $srv"
fds=() rss=() cycle_ok=0
for ((i = 1; i <= CYCLES; i++)); do
    t0=$(now)
    dev=$(printf '{"driver":"vfio-user-pci","id":"hp%d","bus":"rp0","socket":{"type":"unix","path":"%s"}}' "$i" "$sock")
    r=$(qmp "$qmp_sock" device_add "$dev" 2>&1 || true)
    [[ $r == *'"return"'* ]] || { bad "cycle $i: device_add: $r"; break; }
    if ! wait_for "$GUEST_LOG" "^HOTPLUG-(PASS|FAIL) $i " 120; then
        bad "cycle $i: the guest never ran its program (see $GUEST_LOG)"
        break
    fi
    line=$(tr -d '\r' <"$GUEST_LOG" | grep -aE "^HOTPLUG-(PASS|FAIL) $i " | tail -n1)
    t_pass=$(elapsed "$t0")
    r=$(qmp "$qmp_sock" device_del "{\"id\":\"hp$i\"}" 2>&1 || true)
    [[ $r == *'"return"'* ]] || { bad "cycle $i: device_del: $r"; break; }
    if ! wait_for "$GUEST_LOG" "^HOTPLUG-GONE $i"$'\r?$' 60; then
        bad "cycle $i: the device never left the guest"
        break
    fi
    # The server has quiesced the device for the departed client by now.
    sleep 0.2
    fds+=("$(ls "/proc/$srv/fd" 2>/dev/null | wc -l)")
    rss+=("$(awk '/^VmRSS/ {print $2}' "/proc/$srv/status" 2>/dev/null || echo 0)")
    note "cycle $i: ${line#HOTPLUG-} (device usable after $t_pass s, gone after $(elapsed "$t0") s); server fds ${fds[-1]}, RSS ${rss[-1]} KiB"
    if [[ $line == "HOTPLUG-PASS $i "*" 0 failed"* ]]; then
        cycle_ok=$((cycle_ok + 1))
    else
        # What the guest program printed in the failed cycle.
        tr -d '\r' <"$GUEST_LOG" | sed -n "s/^HOTPLUG-OUT $i /      | /p" | tail -n 60
    fi
done
if ((cycle_ok == CYCLES)); then
    ok "$CYCLES plug cycles: the guest program passed after every device_add"
else
    bad "$cycle_ok of $CYCLES plug cycles passed"
fi
now_srv=$(cut -d' ' -f1 "/proc/$apid/task/$apid/children" 2>/dev/null || true)
if [[ $now_srv == "$srv" ]]; then
    ok "airlock's server served every cycle (pid $srv throughout, no restart)"
else
    bad "airlock's server changed: $srv -> ${now_srv:-none} (see $LOG_DIR/airlock.log)"
fi
if ((${#fds[@]} >= 2)); then
    f1=${fds[0]} fN=${fds[-1]} r1=${rss[0]} rN=${rss[-1]}
    if ((fN <= f1 && rN <= r1 + 1024)); then
        ok "resources flat: server fds $f1 -> $fN, RSS $r1 -> $rN KiB (after cycle 1 -> after cycle ${#fds[@]})"
    else
        bad "resources grew: server fds $f1 -> $fN, RSS $r1 -> $rN KiB"
    fi
fi
qmp "$qmp_sock" quit >/dev/null 2>&1 || true
stop_pid "$gpid"
if aborted "$GUEST_LOG"; then bad "QEMU aborted (see $GUEST_LOG)"; fi
stop_pid "$apid"

e2e_summary
