#!/usr/bin/env bash
# tests/e2e/two-devices-x86_64.sh: one airlock per device. Two airlock
# processes (two emulated edus on two sockets, each in its own sandbox) serve
# one x86_64 guest (TCG); the guest program passes against each device, and
# the two servers share no namespace. QEMU's arguments are the two airlocks'
# --print-qemu-args outputs, composed.
# Logs: $AIRLOCK_LOG_DIR (default logs/e2e-two-devices/). Last line:
# "N passed, M failed". Exit 0 iff all passed; 77 if it could not run.
set -euo pipefail
E2E_NAME=e2e-two-devices
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ok() { verdict "$E2E_NAME" OK "$*"; }
bad() { verdict "$E2E_NAME" FAIL "$*"; }

section "setup"
e2e_prereqs
e2e_build
cat >"$IMG_DIR/two-devices.sh" <<'EOF'
#!/bin/sh
# /test: the guest program against every edu-compatible device (1234:11e8).
n=0 good=0
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1234:0x11e8" ] || continue
    bdf=${d##*/}
    n=$((n + 1))
    echo "INFO two-devices: device $n at $bdf"
    /bin/guest-test --bdf "$bdf" "$@" >/tmp/out.$n 2>&1
    rc=$?
    sed -e "s/^PASS /PASS dev$n-/" -e "s/^FAIL /FAIL dev$n-/" -e "s/^SKIP /SKIP dev$n-/" \
        -e "s/^INFO /INFO dev$n-/" -e "s/^\([0-9][0-9]* passed\)/INFO dev$n: \1/" /tmp/out.$n
    if [ $rc -eq 0 ]; then
        echo "PASS device-$n ($bdf)"
        good=$((good + 1))
    else
        echo "FAIL device-$n ($bdf): the guest program exited $rc"
    fi
done
[ $n -eq 2 ] || echo "FAIL two-devices: the guest sees $n edu devices, expected 2"
echo "$good passed, $((2 - good)) failed"
[ $good -eq 2 ] && [ $n -eq 2 ]
EOF
chmod +x "$IMG_DIR/two-devices.sh"
cpio=$(initramfs two-devices "$IMG_DIR/two-devices.sh:/test" "$GUEST_BIN:/bin/guest-test")
note "initramfs: $cpio; logs: $LOG_DIR"
rm -f "$LOG_DIR"/*.console.log "$LOG_DIR"/airlock-*.log

section "two airlocks, two sockets, one guest"
start_airlock a1 "$RUN_DIR/edu1.sock" "$LOG_DIR/airlock-1.log"
start_airlock a2 "$RUN_DIR/edu2.sock" "$LOG_DIR/airlock-2.log"
s1=$(cut -d' ' -f1 "/proc/$a1/task/$a1/children") s2=$(cut -d' ' -f1 "/proc/$a2/task/$a2/children")
note "airlock 1: supervisor $a1, server $s1; airlock 2: supervisor $a2, server $s2"
shared=""
for ns in pid mnt net ipc uts; do
    [[ $(readlink "/proc/$s1/ns/$ns") == "$(readlink "/proc/$s2/ns/$ns")" ]] && shared+="$ns "
done
if [[ -z $shared ]]; then
    ok "sandboxes: the two servers share no pid/mnt/net/ipc/uts namespace"
else
    bad "sandboxes: the two servers share namespaces: $shared"
fi
# QEMU's side composed from each airlock's --print-qemu-args: the first
# brings the shared guest RAM, the second only its device (--no-guest-ram).
mapfile -t qemu_args < <(
    "$AIRLOCK_BIN" --print-qemu-args --socket-path "$RUN_DIR/edu1.sock" --emulate edu --guest-ram 512M
    "$AIRLOCK_BIN" --print-qemu-args --socket-path "$RUN_DIR/edu2.sock" --emulate edu --no-guest-ram
)
mapfile -t qemu_args < <(printf '%s\n' "${qemu_args[@]}" | grep -v '^#')
note "QEMU arguments composed from two airlock --print-qemu-args: ${qemu_args[*]}"
GUEST_RAM_FROM_ARGS=1 run_guest two-devices "$cpio" "${qemu_args[@]}"
sum=$(summary_line "$GUEST_RESULTS" || true)
if [[ $sum == "2 passed, 0 failed" && $GUEST_RC == 0 ]]; then
    ok "guest: the guest program passed against both devices ($(grep -E '^INFO dev[12]: ' "$GUEST_RESULTS" | tr '\n' ' '))"
else
    bad "guest: ${sum:-no summary} (rc $GUEST_RC; see $GUEST_LOG)"
fi
for i in 1 2; do
    if grep -q 'client negotiated' "$LOG_DIR/airlock-$i.log"; then
        ok "airlock $i served the guest: $(grep -m1 'session ended' "$LOG_DIR/airlock-$i.log" | sed 's/.*session ended //' | cut -c1-120)"
    else
        bad "airlock $i never served a client (see $LOG_DIR/airlock-$i.log)"
    fi
done
stop_pid "$a1"
stop_pid "$a2"

e2e_summary
