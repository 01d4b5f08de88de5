#!/usr/bin/env bash
# tests/e2e/qemu-patched-x86_64.sh: airlock with the patched QEMU
# (qemu-patches/, scripts/setup-qemu-patched.sh), x86_64 q35 guest under TCG.
#   a. the vhost-user-style launch: -chardev socket,id=..,path=S
#      -device vfio-user-pci,chardev=..: the guest program (tests/guest)
#      passes every check, as over the stock socket= form
#   b. the chardev forms a management layer uses, without a guest (QEMU
#      paused, the device realized against airlock, seen in query-pci):
#      a connected fd passed to QEMU (-chardev socket,fd=N), and reconnect-ms
#   c. airlock (supervisor and server: its whole process group) SIGKILLed
#      while the guest reads the device's BAR in a loop: QEMU keeps running
#      (QMP answers), nothing aborts, the guest's reads turn to all-ones at
#      once (in flight and later: each within 1 s, not x-msg-timeout's 5 s),
#      and QMP device_del removes the device (DEVICE_DELETED)
# Logs: $AIRLOCK_LOG_DIR (default logs/e2e-patched-x86_64/). Last line:
# "N passed, M failed". Exit 0 iff all passed; 77 if it could not run.
set -euo pipefail
E2E_NAME=e2e-patched-x86_64
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/patched-lib.sh"


section "setup"
patched_prereqs
e2e_build
test_cpio=$(initramfs guest-test "$GUEST_BIN:/test")
cat >"$IMG_DIR/bar-loop.sh" <<'EOF'
#!/bin/sh
# Read the edu's BAR0 ident register (through QEMU and the vfio-user socket)
# in a loop; after 20 all-ones reads stop touching the device and idle, so
# the host can hot-unplug it.
d=""
for f in /sys/bus/pci/devices/*; do
    [ "$(cat $f/vendor)" = 0x1234 ] && [ "$(cat $f/device)" = 0x11e8 ] && d=$f
done
[ -n "$d" ] || { echo "AIRLOCK-NODEV"; exit 1; }
echo 1 >"$d/enable"
bar=$(printf '0x%x' "$(head -n1 "$d/resource" | cut -d' ' -f1)")
echo "AIRLOCK-DEV ${d##*/} bar0 $bar ident $(devmem "$bar" 32)"
echo "AIRLOCK-READY"
i=0 dead=0
while [ $dead -lt 20 ] && [ $i -lt 100000 ]; do
    v=$(devmem "$bar" 32)
    echo "AIRLOCK-READ $i $(cut -d' ' -f1 /proc/uptime) $v"
    [ "$v" = 0xFFFFFFFF ] && dead=$((dead + 1))
    i=$((i + 1))
done
echo "AIRLOCK-LOOP-DONE"
i=0
while [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); echo "AIRLOCK-TICK $i"; done
EOF
chmod +x "$IMG_DIR/bar-loop.sh"
loop_cpio=$(initramfs patched-bar-loop "$IMG_DIR/bar-loop.sh:/test")
note "initramfs: $test_cpio, $loop_cpio"
note "logs: $LOG_DIR"
rm -f "$LOG_DIR"/*.console.log "$LOG_DIR"/*.results "$LOG_DIR"/airlock*.log "$LOG_DIR"/*.txt

# ---------------------------------------------------------------------------
section "a. -chardev socket,id=c0,path=S -device vfio-user-pci,chardev=c0"
sock="$RUN_DIR/edu-a.sock"
start_airlock apid "$sock" "$LOG_DIR/airlock-a.log"
args=(-chardev "socket,id=airlock0,path=$sock" -device vfio-user-pci,chardev=airlock0)
note "QEMU arguments: ${args[*]}"
run_guest a-chardev "$test_cpio" "${args[@]}"
stop_pid "$apid"
a_sum=$(summary_line "$GUEST_RESULTS" || true)
if [[ -z $a_sum ]]; then
    verdict a-chardev FAIL "no 'N passed, M failed' line from the guest (rc $GUEST_RC; see $GUEST_LOG)"
elif [[ $(count failed "$a_sum") != 0 || $(count passed "$a_sum") == 0 || $GUEST_RC != 0 ]]; then
    verdict a-chardev FAIL "guest: $a_sum (rc $GUEST_RC)"
elif aborted "$GUEST_LOG"; then
    verdict a-chardev FAIL "QEMU aborted (see $GUEST_LOG)"
else
    verdict a-chardev OK "guest: $a_sum (boot $GUEST_BOOT_S s, total $GUEST_TOTAL_S s)"
fi
# Patch 22: the memory transactions' maps and unmaps reach airlock as
# DMA_MAP_MULTI / DMA_UNMAP_MULTI ("N of them in M DMA_MAP_MULTI/...").
a_batch=$(grep -aoE 'DMA unmaps \([0-9]+ of them in [0-9]+ DMA_MAP_MULTI' "$LOG_DIR/airlock-a.log" | head -n1 || true)
a_in=$(sed -nE 's/.*\(([0-9]+) of them in ([0-9]+) .*/\1 \2/p' <<<"$a_batch")
if [[ -z $a_in || ${a_in% *} -le ${a_in#* } || ${a_in#* } == 0 ]]; then
    verdict a-dma-multi FAIL "the patched QEMU sent no DMA_MAP_MULTI/DMA_UNMAP_MULTI carrying several maps (airlock's session line: '${a_batch:-none}'; see $LOG_DIR/airlock-a.log)"
else
    verdict a-dma-multi OK "${a_in% *} DMA maps and unmaps came in ${a_in#* } DMA_MAP_MULTI/DMA_UNMAP_MULTI"
fi

# ---------------------------------------------------------------------------
section "b. chardev forms of a management layer: a passed fd, reconnect-ms"
# paused_qemu NAME [qemu args...]: start the patched QEMU paused with the
# device, ask QMP for the PCI devices, quit. Prints the query-pci result's
# vendor:device pairs and QEMU's exit code.
paused_qemu() {
    local name=$1 qmp_sock="$RUN_DIR/qmp-b-$1.sock" log="$LOG_DIR/b-$1.log.txt" pid lines i
    shift
    : >"$log"
    spawn pid "$@" -qmp "unix:$qmp_sock,server=on,wait=off" >>"$log" 2>&1 </dev/null
    for ((i = 0; i < 200; i++)); do [[ -S $qmp_sock ]] && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    lines=$(qmp_steps "$qmp_sock" '{"execute":"query-pci"}' '{"execute":"quit"}' 2>&1 || true)
    printf '%s\n' "$lines" >>"$log"
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    stop_pid "$pid"
    B_PCI=$(qmp_reply "$lines" query-pci | python3 -c '
import json, sys
try:
    r = json.load(sys.stdin)["return"]
except Exception:
    sys.exit(0)
def walk(devs):
    for d in devs:
        i = d["id"]
        print("%04x:%04x" % (i["vendor"], i["device"]))
        if "pci_bridge" in d and "devices" in d["pci_bridge"]:
            walk(d["pci_bridge"]["devices"])
for bus in r:
    walk(bus["devices"])
' | tr '\n' ' ')
    B_RC=$rc B_LOG=$log
}
qemu_base=("$E2E_REPO/scripts/qemu" x86_64 -M q35 -accel tcg -S -nodefaults -display none
    -object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem -m 256M)
sock="$RUN_DIR/edu-b.sock"
start_airlock apid "$sock" "$LOG_DIR/airlock-b.log"
# A management layer connects and hands QEMU the connected socket as fd 3.
paused_qemu fd python3 -c '
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.execvp(sys.argv[2], sys.argv[2:])
' "$sock" "${qemu_base[@]}" -chardev socket,id=airlock0,fd=3 -device vfio-user-pci,chardev=airlock0
note "fd=3 (connected by the caller): query-pci: ${B_PCI:-<none>}; exit $B_RC"
b_ok=1 b_detail=""
if [[ $B_PCI != *1234:11e8* ]] || ((B_RC != 0)) || aborted "$B_LOG"; then
    b_ok=0 b_detail+="fd=3: device ${B_PCI:-missing}, exit $B_RC (see $B_LOG); "
fi
paused_qemu reconnect "${qemu_base[@]}" -chardev "socket,id=airlock0,path=$sock,reconnect-ms=1000" \
    -device vfio-user-pci,chardev=airlock0
note "path=..,reconnect-ms=1000: query-pci: ${B_PCI:-<none>}; exit $B_RC"
if [[ $B_PCI != *1234:11e8* ]] || ((B_RC != 0)) || aborted "$B_LOG"; then
    b_ok=0 b_detail+="reconnect-ms: device ${B_PCI:-missing}, exit $B_RC (see $B_LOG); "
fi
# Both are rejected with a sentence: a chardev that is not a socket, both
# socket and chardev.
paused_qemu not-socket "${qemu_base[@]}" -chardev null,id=n0 -device vfio-user-pci,chardev=n0
msg=$(grep -a 'vfio-user-pci\|chardev' "$B_LOG" | grep -v '^qmp' | head -n1 || true)
note "-chardev null: exit $B_RC: $msg"
if ((B_RC == 0)) || [[ $msg != *"not a socket chardev"* ]] || aborted "$B_LOG"; then
    b_ok=0 b_detail+="chardev null: exit $B_RC, '$msg'; "
fi
stop_pid "$apid"
if ((b_ok)); then
    verdict b-chardev-forms OK "a passed connected fd and reconnect-ms both realize the device; a non-socket chardev is refused"
else
    verdict b-chardev-forms FAIL "$b_detail"
fi

# ---------------------------------------------------------------------------
section "c. airlock SIGKILLed while the guest reads the device"
c_ok=1 c_detail=""
sock="$RUN_DIR/edu-c.sock" qmp_sock="$RUN_DIR/qmp-c.sock" qpidf="$RUN_DIR/qemu-c.pid"
start_airlock apid "$sock" "$LOG_DIR/airlock-c.log"
start_guest gpid c-airlock-killed "$loop_cpio" \
    -device pcie-root-port,id=rp0,chassis=1 \
    -chardev "socket,id=airlock0,path=$sock" -device vfio-user-pci,chardev=airlock0,bus=rp0,id=dev0 \
    -qmp "unix:$qmp_sock,server=on,wait=off" -pidfile "$qpidf"
if ! wait_for "$GUEST_LOG" 'AIRLOCK-READY' 90; then
    verdict c-airlock-killed FAIL "guest never printed AIRLOCK-READY (see $GUEST_LOG)"
    stop_pid "$gpid"
else
    qpid=$(cat "$qpidf")
    dev=$(tr -d '\r' <"$GUEST_LOG" | grep -ao 'AIRLOCK-DEV .*' | head -n1 || true)
    note "guest: $dev"
    # Let the loop run a moment, then kill airlock's whole process group
    # (supervisor and server: nothing restarts the server).
    wait_for "$GUEST_LOG" '^AIRLOCK-READ 20 ' 60 || true
    reads_before=$(tr -d '\r' <"$GUEST_LOG" | grep -ac '^AIRLOCK-READ .* 0x010000ED$' || true)
    procs=$(pgrep -g "$apid" | tr '\n' ' ' || true)
    t_kill=$(now)
    kill -KILL -- "-$apid" 2>/dev/null || kill -KILL "$apid"
    # Time the guest's first all-ones read before anything else.
    if wait_for "$GUEST_LOG" '^AIRLOCK-READ .* 0xFFFFFFFF'$'\r?$' 10; then
        first_dead_s=$(elapsed "$t_kill")
    else
        first_dead_s=""
    fi
    stop_pid "$apid"
    note "sent SIGKILL to airlock's process group $apid (pids: $procs) after $reads_before good reads"
    # (a killed process may linger a moment as a zombie until it is reaped)
    for ((i = 0; i < 40; i++)); do
        left=$(pgrep -g "$apid" | tr '\n' ' ' || true)
        [[ -z $left ]] && break
        sleep 0.05
    done
    [[ -z $left ]] || { c_ok=0 c_detail+="airlock processes left: $left; "; }
    if [[ -n $first_dead_s ]]; then
        note "first all-ones read seen $first_dead_s s after the kill (host clock, log polled every 50 ms)"
    else
        c_ok=0 c_detail+="no all-ones read within 10 s of the kill; "
    fi
    if wait_for "$GUEST_LOG" '^AIRLOCK-LOOP-DONE' 30; then
        # Guest-measured gaps between consecutive reads from the last good
        # one on: the read in flight at the kill and every later one. QEMU's
        # stderr shares the log, so a line QEMU wrote into is skipped (its
        # time and value are not the last two fields as numbers): that can
        # only make a gap look longer, never shorter.
        gaps=$(tr -d '\r' <"$GUEST_LOG" | awk '
            $1 == "AIRLOCK-READ" && NF == 4 && $3 ~ /^[0-9]+\.[0-9]+$/ && $4 ~ /^0x[0-9A-Fa-f]+$/ { t[n] = $3; v[n] = $4; n++ }
            END {
                last = -1
                for (i = 0; i < n; i++) if (v[i] != "0xFFFFFFFF") last = i
                max = 0
                for (i = (last < 0 ? 1 : last + 1); i < n; i++) { g = t[i] - t[i-1]; if (g > max) max = g }
                printf "%d %.2f", n - last - 1, max
            }')
        ndead=${gaps% *} maxgap=${gaps#* }
        note "guest: $ndead all-ones reads after the kill; longest gap between reads from the last good one: $maxgap s"
        if awk -v g="$maxgap" 'BEGIN { exit !(g >= 1.0) }'; then
            c_ok=0 c_detail+="a read took $maxgap s (limit 1 s); "
        fi
    else
        c_ok=0 c_detail+="the guest loop did not finish (see $GUEST_LOG); "
    fi
    if [[ -n $first_dead_s ]] && awk -v g="$first_dead_s" 'BEGIN { exit !(g >= 1.0) }'; then
        c_ok=0 c_detail+="first all-ones read $first_dead_s s after the kill (limit 1 s); "
    fi
    kill -0 "$qpid" 2>/dev/null || { c_ok=0 c_detail+="QEMU died; "; }
    lines=$(qmp_steps "$qmp_sock" '{"execute":"query-status"}' \
        '{"execute":"device_del","arguments":{"id":"dev0"}}' 'wait:DEVICE_DELETED:40' \
        '{"execute":"query-pci"}' 2>&1 || true)
    printf '%s\n' "$lines" >"$LOG_DIR/c-qmp.txt"
    status=$(qmp_reply "$lines" query-status)
    note "QMP query-status: $status"
    [[ $status == *'"status": "running"'* ]] || { c_ok=0 c_detail+="query-status: ${status:-no answer}; "; }
    del=$(qmp_reply "$lines" device_del)
    deleted=$(sed -nE 's/^qmp wait:DEVICE_DELETED ([0-9.]+) (.*)/\1 s: \2/p' <<<"$lines")
    note "QMP device_del: $del; DEVICE_DELETED after ${deleted:-<never>}"
    [[ $del == *'"return": {}'* && $deleted == *'"device": "dev0"'* ]] ||
        { c_ok=0 c_detail+="device_del did not complete (${del:-no reply}, event: ${deleted:-none}); "; }
    pci=$(qmp_reply "$lines" query-pci)
    if [[ $pci == *'"vendor": 4660, "device": 4584'* || $pci == *'4584'* && $pci == *'4660'* ]]; then
        c_ok=0 c_detail+="the device is still in query-pci; "
    fi
    lost=$(tr -d '\r' <"$GUEST_LOG" | grep -av '^AIRLOCK-' | grep -a 'vfio' | sort | uniq -c | sort -rn | head -n4 || true)
    note "QEMU's messages about the lost server (count, text):"
    while IFS= read -r l; do [[ -n $l ]] && note "  | $l"; done <<<"${lost:-<none>}"
    quit=$(qmp_steps "$qmp_sock" '{"execute":"quit"}' 2>&1 || true)
    for ((i = 0; i < 100; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$qpid" 2>/dev/null && { c_ok=0 c_detail+="QEMU did not quit; "; }
    stop_pid "$gpid"
    if aborted "$GUEST_LOG"; then c_ok=0 c_detail+="QEMU aborted; "; fi
    if ((c_ok)); then
        verdict c-airlock-killed OK "reads all-ones ${first_dead_s} s after the kill, longest read $maxgap s; QMP answered; device_del done in ${deleted%% s:*} s; QEMU quit cleanly"
    else
        verdict c-airlock-killed FAIL "$c_detail(see $GUEST_LOG)"
    fi
fi

# ---------------------------------------------------------------------------
e2e_summary
