#!/usr/bin/env bash
# tests/e2e/qemu-patched-bad-server.sh: the patched QEMU (qemu-patches/)
# against misbehaving vfio-user servers (tests/e2e/fake-vfio-user-server.py).
# No guest: QEMU (x86_64 q35, TCG, paused) hot-adds a vfio-user-pci through
# QMP (chardev-add + device_add with chardev=) and each bad server must make
# device_add fail with an error, quickly, while QEMU keeps running (QMP
# answers) and quits cleanly (exit 0, no assertion/abort):
#   close-unread     the server closes with QEMU's VERSION request unread
#                    (ECONNRESET: stock QEMU aborts here)
#   close-mid-reply  the server closes in the middle of a reply
#   wrong-id         a well-formed reply with another msg_id: QEMU drops it
#                    (reading it whole, so the stream stays in step) and
#                    fails device_add after x-msg-timeout (1000 ms here)
#   garbage          64 bytes of noise instead of a reply
#   no-caps          a VERSION reply without its capabilities string (the
#                    unpatched check indexes the reply at size - 17, which
#                    wraps around)
#   silent           no reply at all: device_add fails after x-msg-timeout
#                    (set to 1000 ms here), not before
# Each mode also runs against stock QEMU 11.1 (INFO lines only: what the
# patches change). Then, for the reconnecting client (qemu-patches/0008):
#   other-device     the device realized against airlock (chardev with
#                    reconnect-ms=100), airlock stopped, another device's
#                    server on the same socket: QEMU reconnects, compares
#                    the device info with airlock's and refuses to resume
#                    ("not resuming the device"), within 5 s, and keeps
#                    running Last line: "N passed, M failed". Exit 0 iff all passed;
# 77 if it could not run.
set -euo pipefail
E2E_NAME=e2e-patched-bad-server
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/patched-lib.sh"


section "setup"
patched_prereqs
note "logs: $LOG_DIR"
rm -f "$LOG_DIR"/*.log.txt

# run_mode MODE KIND: KIND=patched (chardev=) or stock (socket=). Sets
# R_ADD (device_add reply), R_ADD_S (its seconds), R_STATUS (query-status
# reply), R_RC (QEMU's exit code), R_LOG (QEMU + server output).
run_mode() {
    local mode=$1 kind=$2 sock qmp_sock spid qpid add lines i
    sock="$RUN_DIR/$mode-$kind.sock" qmp_sock="$RUN_DIR/qmp-$mode-$kind.sock"
    R_LOG="$LOG_DIR/$mode-$kind.log.txt"
    : >"$R_LOG"
    spawn spid python3 "$FAKE_SERVER" "$mode" "$sock" >>"$R_LOG" 2>&1
    for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.05; done
    local env=(env)
    [[ $kind == stock ]] && env=(env -u AIRLOCK_QEMU_BIN_DIR)
    spawn qpid "${env[@]}" "$E2E_REPO/scripts/qemu" x86_64 -M q35 -accel tcg -S \
        -object memory-backend-memfd,id=mem,size=128M,share=on -machine memory-backend=mem -m 128M \
        -nodefaults -display none -device pcie-root-port,id=rp0,chassis=1 \
        -qmp "unix:$qmp_sock,server=on,wait=off" >>"$R_LOG" 2>&1 </dev/null
    for ((i = 0; i < 200; i++)); do [[ -S $qmp_sock ]] && break; sleep 0.05; done
    if [[ $kind == patched ]]; then
        add=$(printf '{"execute":"device_add","arguments":{"driver":"vfio-user-pci","id":"bad0","bus":"rp0","chardev":"c0","x-msg-timeout":1000}}')
        lines=$(qmp_steps "$qmp_sock" \
            "{\"execute\":\"chardev-add\",\"arguments\":{\"id\":\"c0\",\"backend\":{\"type\":\"socket\",\"data\":{\"addr\":{\"type\":\"unix\",\"data\":{\"path\":\"$sock\"}},\"server\":false}}}}" \
            "$add" '{"execute":"query-status"}' '{"execute":"quit"}' 2>&1 || true)
    else
        add=$(printf '{"execute":"device_add","arguments":{"driver":"vfio-user-pci","id":"bad0","bus":"rp0","x-msg-timeout":1000,"socket":{"type":"unix","path":"%s"}}}' "$sock")
        lines=$(qmp_steps "$qmp_sock" "$add" '{"execute":"query-status"}' '{"execute":"quit"}' 2>&1 || true)
    fi
    printf '%s\n' "$lines" >>"$R_LOG"
    R_ADD=$(qmp_reply "$lines" device_add) R_ADD_S=$(qmp_time "$lines" device_add)
    R_STATUS=$(qmp_reply "$lines" query-status)
    R_RC=0
    for ((i = 0; i < 100; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
    wait "$qpid" 2>/dev/null || R_RC=$?
    stop_pid "$qpid"
    stop_pid "$spid"
}

for mode in close-unread close-mid-reply wrong-id garbage no-caps silent; do
    section "$mode"
    run_mode "$mode" patched
    note "patched QEMU: device_add -> ${R_ADD:-<none>} (${R_ADD_S:--} s)"
    note "patched QEMU: query-status -> ${R_STATUS:-<none>}; exit code $R_RC"
    ok=1 detail=""
    [[ $R_ADD == *'"error"'* ]] || { ok=0 detail+="device_add did not fail; "; }
    [[ $R_STATUS == *'"status"'* ]] || { ok=0 detail+="QMP did not answer after device_add; "; }
    ((R_RC == 0)) || { ok=0 detail+="QEMU exit code $R_RC; "; }
    if aborted "$R_LOG"; then ok=0 detail+="QEMU aborted; "; fi
    limit=1.0
    [[ $mode == silent || $mode == wrong-id ]] && limit=2.5
    if [[ -z $R_ADD_S ]] || awk -v t="$R_ADD_S" -v l="$limit" 'BEGIN { exit !(t > l) }'; then
        ok=0 detail+="device_add took ${R_ADD_S:-?} s (limit $limit s); "
    fi
    if [[ $mode == wrong-id ]] && ! grep -q 'dropping a reply to no request' "$R_LOG"; then
        ok=0 detail+="no 'dropping a reply to no request' warning; "
    fi
    if [[ $mode == silent || $mode == wrong-id ]] && [[ -n $R_ADD_S ]] && awk -v t="$R_ADD_S" 'BEGIN { exit !(t < 0.9) }'; then
        ok=0 detail+="device_add gave up before x-msg-timeout (${R_ADD_S} s); "
    fi
    err=$(sed -nE 's/.*"desc": "([^"]*)".*/\1/p' <<<"$R_ADD")
    if ((ok)); then
        verdict "$mode" OK "device_add failed in ${R_ADD_S} s ($err); QEMU kept running, quit with 0"
    else
        verdict "$mode" FAIL "$detail(see $R_LOG)"
    fi
    if [[ -f "$AIRLOCK_CACHE/qemu-root.stamp" ]]; then
        run_mode "$mode" stock
        st="device_add ${R_ADD_S:--} s: $(sed -nE 's/.*"desc": "([^"]*)".*/\1/p' <<<"$R_ADD")"
        [[ -n $R_ADD ]] || st="no device_add reply"
        if aborted "$R_LOG" || ((R_RC >= 128)); then st+="; QEMU ABORTED (exit $R_RC)"; else st+="; exit $R_RC"; fi
        note "INFO stock QEMU 11.1 (socket=): $st"
    fi
done

section "other-device: a different device behind the socket after a reconnect"
sock="$RUN_DIR/other.sock" qmp_sock="$RUN_DIR/qmp-other.sock" R_LOG="$LOG_DIR/other-device.log.txt"
: >"$R_LOG"
spawn apid "$AIRLOCK_BIN" --socket-path "$sock" --emulate edu >>"$R_LOG" 2>&1 </dev/null
for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.05; done
spawn qpid "$E2E_REPO/scripts/qemu" x86_64 -M q35 -accel tcg -S \
    -object memory-backend-memfd,id=mem,size=128M,share=on -machine memory-backend=mem -m 128M \
    -nodefaults -display none -chardev "socket,id=c0,path=$sock,reconnect-ms=100" \
    -device vfio-user-pci,chardev=c0,id=dev0 -qmp "unix:$qmp_sock,server=on,wait=off" >>"$R_LOG" 2>&1 </dev/null
for ((i = 0; i < 200; i++)); do [[ -S $qmp_sock ]] && break; sleep 0.05; done
before=$(qmp_steps "$qmp_sock" '{"execute":"query-pci"}' 2>&1 || true)
stop_pid "$apid"
spawn spid python3 "$FAKE_SERVER" other-device "$sock" >>"$R_LOG" 2>&1
t0=$(now) refused=""
for ((i = 0; i < 100; i++)); do
    refused=$(grep -a 'not resuming the device' "$R_LOG" | head -n1 || true)
    [[ -n $refused ]] && break
    sleep 0.05
done
refused_s=$(elapsed "$t0")
lines=$(qmp_steps "$qmp_sock" '{"execute":"query-status"}' '{"execute":"quit"}' 2>&1 || true)
printf '%s\n' "$before" "$lines" >>"$R_LOG"
R_RC=0
for ((i = 0; i < 100; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
wait "$qpid" 2>/dev/null || R_RC=$?
stop_pid "$qpid"
stop_pid "$spid"
note "QEMU: ${refused#*: }"
ok=1 detail=""
[[ $before == *'"vendor": 4660'* ]] || { ok=0 detail+="the device was not realized against airlock; "; }
[[ $refused == *"device differs"* ]] || { ok=0 detail+="no refusal naming the device info within 5 s; "; }
[[ $(qmp_reply "$lines" query-status) == *'"status"'* ]] || { ok=0 detail+="QMP did not answer; "; }
((R_RC == 0)) || { ok=0 detail+="QEMU exit code $R_RC; "; }
if aborted "$R_LOG"; then ok=0 detail+="QEMU aborted; "; fi
if ((ok)); then
    verdict other-device OK "refused ${refused_s} s after the switch: ${refused#*: }; QEMU kept running, quit with 0"
else
    verdict other-device FAIL "$detail(see $R_LOG)"
fi

e2e_summary
