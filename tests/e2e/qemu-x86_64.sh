#!/usr/bin/env bash
# tests/e2e/qemu-x86_64.sh: airlock end to end with stock QEMU (x86_64 q35, TCG).
#   a. the guest program (tests/guest) drives airlock's emulated edu through the
#      guest's own VFIO, over -device vfio-user-pci
#   b. the same program against QEMU's in-process -device edu (the baseline)
#   c. a side-by-side table: checks, guest-measured MMIO read cost, boot time
#   d. QEMU pointed at a socket nobody serves must refuse to start, clearly
#   e. airlock's sandboxed server SIGKILLed while the guest idles: QEMU and the
#      guest keep running, the supervisor starts a fresh server on the same
#      socket, and a new client (airlock-probe) is served by it
# Logs: $AIRLOCK_LOG_DIR (default logs/e2e-x86_64/). Last line: "N passed, M failed"
# over the scenarios a, b, d, e. Exit 0 iff all passed; 77 if it could not run.
set -euo pipefail
E2E_NAME=e2e-x86_64
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"


section "setup"
e2e_prereqs
e2e_build
test_cpio=$(initramfs guest-test "$GUEST_BIN:/test")
cat >"$IMG_DIR/idle.sh" <<'EOF'
#!/bin/sh
# No device access: QEMU must have nothing pending on the socket when airlock dies.
echo "AIRLOCK-READY uptime $(cut -d' ' -f1 /proc/uptime)"
i=0
while [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); echo "AIRLOCK-TICK $i"; done
EOF
chmod +x "$IMG_DIR/idle.sh"
idle_cpio=$(initramfs idle "$IMG_DIR/idle.sh:/test")
note "initramfs: $test_cpio, $idle_cpio"
note "logs: $LOG_DIR"
rm -f "$LOG_DIR"/*.console.log "$LOG_DIR"/*.results "$LOG_DIR"/airlock*.log

# ---------------------------------------------------------------------------
section "a. guest VFIO -> vfio-user-pci -> airlock --emulate edu"
sock="$RUN_DIR/edu.sock"
start_airlock apid "$sock" "$LOG_DIR/airlock-a.log"
# QEMU's side comes from airlock itself (--print-qemu-args): the memfd
# share=on RAM backend and the vfio-user-pci device for this socket.
mapfile -t qemu_args < <("$AIRLOCK_BIN" --print-qemu-args --socket-path "$sock" --emulate edu --guest-ram 512M | grep -v '^#')
note "QEMU arguments from airlock --print-qemu-args: ${qemu_args[*]}"
export GUEST_RAM_FROM_ARGS=1
run_guest a-airlock "$test_cpio" "${qemu_args[@]}"
unset GUEST_RAM_FROM_ARGS
a_sum=$(summary_line "$GUEST_RESULTS" || true)
a_boot=$GUEST_BOOT_S a_total=$GUEST_TOTAL_S a_ns=$(mmio_ns "$GUEST_RESULTS")
stop_pid "$apid"
if [[ -z $a_sum ]]; then
    verdict a-airlock FAIL "no 'N passed, M failed' line from the guest (rc $GUEST_RC; see $GUEST_LOG)"
elif [[ $(count failed "$a_sum") != 0 || $(count passed "$a_sum") == 0 || $GUEST_RC != 0 ]]; then
    verdict a-airlock FAIL "guest: $a_sum (rc $GUEST_RC)"
else
    verdict a-airlock OK "guest: $a_sum"
fi

# ---------------------------------------------------------------------------
section "b. baseline: the same guest program against QEMU's in-process -device edu"
run_guest b-qemu-edu "$test_cpio" -device edu
b_sum=$(summary_line "$GUEST_RESULTS" || true)
b_boot=$GUEST_BOOT_S b_total=$GUEST_TOTAL_S b_ns=$(mmio_ns "$GUEST_RESULTS")
if grep -q '^SKIP msix' "$GUEST_RESULTS"; then
    note "(SKIP msix is expected here: QEMU's edu has no MSI-X; airlock's edu adds 4 vectors)"
fi
if [[ -z $b_sum ]]; then
    verdict b-qemu-edu FAIL "no 'N passed, M failed' line from the guest (rc $GUEST_RC; see $GUEST_LOG)"
elif [[ $(count failed "$b_sum") != 0 || $(count passed "$b_sum") == 0 || $GUEST_RC != 0 ]]; then
    verdict b-qemu-edu FAIL "guest: $b_sum (rc $GUEST_RC)"
else
    verdict b-qemu-edu OK "guest: $b_sum"
fi

# ---------------------------------------------------------------------------
section "c. comparison (same guest, kernel, QEMU; TCG, 1 vCPU)"
checks() { # checks SUMMARY
    [[ -n $1 ]] || { echo "-"; return; }
    local p f s
    p=$(count passed "$1") f=$(count failed "$1") s=$(count skipped "$1")
    printf '%s/%s%s' "$p" "$((p + f))" "$( ((s)) && printf ' (%s skip)' "$s")"
}
ratio=$(awk -v a="${a_ns:-0}" -v b="${b_ns:-0}" 'BEGIN { if (a > 0 && b > 0) printf "%.0fx", a / b; else print "-" }')
{
    printf '   %-30s %-22s %-22s %s\n' "" "airlock (vfio-user)" "QEMU in-process edu" "airlock/edu"
    printf '   %-30s %-22s %-22s %s\n' "checks passed" "$(checks "$a_sum")" "$(checks "$b_sum")" ""
    printf '   %-30s %-22s %-22s %s\n' "mmio-read-ns (guest, BAR0)" "${a_ns:--}" "${b_ns:--}" "$ratio"
    printf '   %-30s %-22s %-22s %s\n' "boot: QEMU start->1st result" "${a_boot} s" "${b_boot} s" ""
    printf '   %-30s %-22s %-22s %s\n' "QEMU start->guest exit" "${a_total} s" "${b_total} s" ""
} | tee "$LOG_DIR/comparison.txt"
note "airlock's BAR0 read is a vfio-user REGION_READ round trip over the socket (guest exit ->"
note "QEMU -> airlock -> QEMU -> guest); the in-process edu read is a function call in QEMU."
# Whose share is what: airlock times each REGION_READ from its arrival to the
# reply's send; the rest of the guest-measured time is QEMU's (TCG exit, its
# client's proxy-thread handoff) and the two socket hops between them.
a_srv=$(sed -nE 's/.*REGION_READ ([0-9]+) ns, DMA_MAP.*/\1/p' "$LOG_DIR/airlock-a.log" | tail -n1)
if [[ -n ${a_ns:-} && -n $a_srv ]]; then
    split=$(awk -v g="$a_ns" -v s="$a_srv" 'BEGIN { printf "guest-measured %d ns per BAR0 read (median) = airlock %d ns (%.1f%%, median) + QEMU and the socket %d ns (%.1f%%)", g, s, 100 * s / g, g - s, 100 * (g - s) / g }')
    note "MMIO split: $split" | tee -a "$LOG_DIR/comparison.txt"
fi

# ---------------------------------------------------------------------------
section "d. negative: vfio-user-pci socket with no server"
d_ok=1 d_detail=""
missing="$RUN_DIR/nobody-listens.sock"
stale="$RUN_DIR/stale.sock"
python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.close()' "$stale"
for case in "missing:$missing:No such file or directory" "stale:$stale:Connection refused"; do
    IFS=: read -r kind path want <<<"$case"
    GUEST_TIMEOUT=30 run_guest "d-$kind-socket" "$test_cpio" -device "$(vfio_user_dev "$path")" >/dev/null
    msg=$(tr -d '\r' <"$GUEST_LOG" | grep -aE 'Failed to connect|vfio-user' | head -n2 | tr '\n' ' ')
    note "$kind socket ($path): QEMU exited with rc $GUEST_RC after ${GUEST_TOTAL_S} s"
    note "  QEMU said: ${msg:-<nothing>}"
    if [[ $GUEST_RC == 0 || $GUEST_RC == 124 ]]; then
        d_ok=0 d_detail+="$kind: QEMU did not fail fast (rc $GUEST_RC); "
    elif [[ $msg != *"Failed to connect to '$path'"*"$want"* ]]; then
        d_ok=0 d_detail+="$kind: no clear 'Failed to connect to '$path': $want' message; "
    elif grep -qaE '^(PASS|FAIL) ' "$GUEST_RESULTS"; then
        d_ok=0 d_detail+="$kind: the guest ran; "
    fi
done
if ((d_ok)); then
    verdict d-no-server OK "QEMU refuses to start (missing socket: ENOENT; stale socket: ECONNREFUSED)"
else
    verdict d-no-server FAIL "$d_detail"
fi

# ---------------------------------------------------------------------------
section "e. airlock's server SIGKILLed while the guest idles: QEMU survives, the server comes back"
e_ok=1 e_detail=""
sock="$RUN_DIR/edu-e.sock" qmp_sock="$RUN_DIR/qmp.sock" qpidf="$RUN_DIR/qemu.pid"
start_airlock apid "$sock" "$LOG_DIR/airlock-e.log"
start_guest gpid e-airlock-killed "$idle_cpio" -device "$(vfio_user_dev "$sock")" \
    -qmp "unix:$qmp_sock,server=on,wait=off" -pidfile "$qpidf"
if ! wait_for "$GUEST_LOG" 'AIRLOCK-READY' 60; then
    verdict e-airlock-killed FAIL "guest never printed AIRLOCK-READY (see $GUEST_LOG)"
    stop_pid "$gpid"
else
    qpid=$(cat "$qpidf")
    spid=$(cut -d' ' -f1 "/proc/$apid/task/$apid/children" 2>/dev/null || true)
    note "guest idle (ready after $(elapsed "$GUEST_T0") s); QEMU pid $qpid, airlock supervisor $apid, server ${spid:-?}"
    lines_before=$(wc -l <"$GUEST_LOG")
    if [[ -n $spid ]]; then
        kill -KILL "$spid"
        note "sent SIGKILL to the sandboxed server (pid $spid)"
    else
        e_ok=0 e_detail+="no server process under the supervisor; "
    fi
    sleep 2
    tick_at_check=$(tr -d '\r' <"$GUEST_LOG" | sed -nE 's/^AIRLOCK-TICK ([0-9]+)$/\1/p' | tail -n1)
    if kill -0 "$qpid" 2>/dev/null; then
        note "QEMU pid $qpid is alive"
    else
        e_ok=0 e_detail+="QEMU died; "
    fi
    status=$(qmp "$qmp_sock" query-status 2>&1 || true)
    note "QMP query-status: $status"
    [[ $status == *'"status": "running"'* ]] || { e_ok=0 e_detail+="query-status not running; "; }
    # The guest itself still runs: its 1 s ticks keep coming.
    if wait_for "$GUEST_LOG" "^AIRLOCK-TICK $((${tick_at_check:-0} + 1))"$'\r?$' 5; then
        note "guest still ticking (AIRLOCK-TICK $((${tick_at_check:-0} + 1)) after the kill)"
    else
        e_ok=0 e_detail+="guest stopped ticking; "
    fi
    lost=$(tail -n "+$((lines_before + 1))" "$GUEST_LOG" | tr -d '\r' | grep -v '^AIRLOCK-TICK' | head -n5 || true)
    note "QEMU logged about the lost server:"
    if [[ -n $lost ]]; then
        while IFS= read -r l; do note "  | $l"; done <<<"$lost"
    else
        note "  | <nothing>"
    fi
    # The supervisor replaced the server on the same socket: a new client
    # is served (stock QEMU does not reconnect; the guest keeps a dead device).
    restart=$(grep -m1 'starting a fresh sandboxed server' "$LOG_DIR/airlock-e.log" || true)
    note "airlock: ${restart:-<no restart line>}"
    [[ -n $restart && $restart == *'killed by signal 9'* ]] || { e_ok=0 e_detail+="no restart logged; "; }
    [[ -S $sock ]] || { e_ok=0 e_detail+="the socket path is gone; "; }
    if probe=$(timeout 60 "$E2E_REPO/target/release/airlock-probe" --socket "$sock" --iterations 10 2>&1); then
        note "a new client on the same socket: $(printf '%s\n' "$probe" | tail -n1)"
    else
        e_ok=0 e_detail+="the restarted server did not serve airlock-probe; "
        printf '%s\n' "$probe" | tail -n5 | while IFS= read -r l; do note "  | $l"; done
    fi
    quit=$(qmp "$qmp_sock" quit 2>&1 || true)
    note "QMP quit: $quit"
    for ((i = 0; i < 100; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$qpid" 2>/dev/null; then
        e_ok=0 e_detail+="QEMU did not quit; "
    fi
    stop_pid "$gpid"
    if grep -qaE 'Assertion|Aborted|core dumped' "$GUEST_LOG"; then
        e_ok=0 e_detail+="QEMU aborted; "
    fi
    if ((e_ok)); then
        verdict e-airlock-killed OK "QEMU and guest kept running after the server died; the supervisor restarted it and it served a new client; QMP quit ended QEMU"
    else
        verdict e-airlock-killed FAIL "$e_detail(see $GUEST_LOG)"
    fi
fi
stop_pid "$apid"

# ---------------------------------------------------------------------------
e2e_summary
