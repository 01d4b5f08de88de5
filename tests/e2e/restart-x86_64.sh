#!/usr/bin/env bash
# tests/e2e/restart-x86_64.sh: airlock's server goes away and comes back
# under a running guest, which goes on without a reboot (patched QEMU:
# qemu-patches/0008, -chardev socket,...,reconnect-ms=N).
# The guest program soaks the device (tests/guest --soak: rounds of
# liveness, factorial, DMA to the device and back, an MSI through an
# eventfd assigned once) while the host
#   a. SIGKILLs airlock's sandboxed server: the supervisor starts a fresh
#      one on the same socket, QEMU reconnects and replays (VERSION, DMA
#      maps, layout check, config, SET_IRQS with the same eventfds);
#   b. stops airlock entirely (SIGTERM) and starts a new airlock on the same
#      socket path, as an upgrade would;
#   c. stops airlock for longer than QEMU holds a request (x-msg-timeout,
#      5 s): the guest's accesses fail (all-ones) from then on, and the
#      device comes back when airlock does;
#   d. live upgrade: SIGUSR2 to the running airlock (started from a copy of
#      its binary), which starts that binary beside itself, hands it the
#      listening socket, stops its own server once the new airlock holds
#      everything, and exits once that one serves: the path never
#      disappears, QEMU reconnects and replays;
#   e. a live upgrade to a broken binary (one that exits at once): the
#      running airlock never stops its server, and the guest notices nothing.
# a, b and d pass when QEMU logs the resume, at most one round failed at the
# restart (the documented effect: the emulated edu's registers live in the
# server, so an operation the old server had in progress when it died is
# lost; the DMA and interrupt wiring is restored) and every later round
# passes. c passes when QEMU reports the expired hold and the resume, and
# the rounds pass again after it. The guest must never reboot. Printed per
# restart: QEMU's outage (server lost -> state replayed, ms) and the
# guest's (its longest round then, minus the median round; guest clock).
# Logs: $AIRLOCK_LOG_DIR (default logs/e2e-restart-x86_64/). Last line:
# "N passed, M failed". Exit 0 iff all passed; 77 if it could not run.
set -euo pipefail
E2E_NAME=e2e-restart-x86_64
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/patched-lib.sh"

SOAK_S=${SOAK_S:-60}
RECONNECT_MS=${RECONNECT_MS:-100}

section "setup"
patched_prereqs
e2e_build
cat >"$IMG_DIR/soak.sh" <<EOF
#!/bin/sh
exec /airlock-guest-test --soak $SOAK_S
EOF
chmod +x "$IMG_DIR/soak.sh"
cpio=$(initramfs restart-soak "$GUEST_BIN:/airlock-guest-test" "$IMG_DIR/soak.sh:/test")
note "initramfs: $cpio (soak $SOAK_S s); logs: $LOG_DIR"
rm -f "$LOG_DIR"/*.console.log "$LOG_DIR"/airlock*.log "$LOG_DIR"/*.txt

sock="$RUN_DIR/edu-restart.sock"
start_airlock apid "$sock" "$LOG_DIR/airlock-1.log"
GUEST_TIMEOUT=$((SOAK_S + 120)) start_guest gpid restart "$cpio" \
    -chardev "socket,id=airlock0,path=$sock,reconnect-ms=$RECONNECT_MS" \
    -device vfio-user-pci,chardev=airlock0
# console lines without CRs
console() { tr -d '\r' <"$GUEST_LOG"; }
last_round() { console | sed -nE 's/^ROUND ([0-9]+) .*/\1/p' | tail -n1; }
resumes() { console | grep -ac 'the server is back' || true; }

# wait_rounds N SECONDS: wait until the guest has finished N more rounds
# (it prints every 500th).
wait_rounds() {
    local from want i
    from=$(last_round)
    want=$((${from:--1} + $1))
    for ((i = 0; i < $2 * 20; i++)); do
        local r
        r=$(last_round)
        [[ -n $r ]] && ((r >= want)) && return 0
        kill -0 "$gpid" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# wait_resume COUNT SECONDS: wait until QEMU has logged COUNT resumes.
wait_resume() {
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        (($(resumes) >= $1)) && return 0
        sleep 0.05
    done
    return 1
}

ok=1
if ! wait_rounds 1000 $((SOAK_S + 60)); then
    verdict restart-setup FAIL "the guest did not start its rounds (see $GUEST_LOG)"
    ok=0
else
    verdict restart-setup OK "the guest soaks the device: $(console | grep -a '^ROUND' | tail -n1)"
fi
declare -A AT    # event -> the last round the guest had printed when it began

# event NAME RESUMES: after the restart, wait for QEMU's RESUMES-th resume
# and for 1000 more rounds.
event_done() {
    if wait_resume "$2" 30; then
        wait_rounds 1000 60 || true
    else
        note "QEMU did not log resume #$2 within 30 s"
    fi
}

if ((ok)); then
    section "a. airlock's server SIGKILLed mid-run (the supervisor restarts it)"
    server=$(pgrep -P "$apid" | head -n1 || true)
    AT[a]=$(last_round)
    if [[ -n $server ]]; then
        kill -KILL "$server"
        note "SIGKILL to the server (pid $server, under the supervisor $apid) at round ~${AT[a]}"
    else
        note "no server process under airlock's supervisor $apid"
    fi
    event_done a 1

    section "b. airlock stopped (SIGTERM) and a new airlock started on the same socket"
    AT[b]=$(last_round)
    t0=$(now)
    stop_pid "$apid"
    start_airlock apid "$sock" "$LOG_DIR/airlock-2.log"
    note "airlock stopped and started again in $(elapsed "$t0") s (host clock) at round ~${AT[b]}"
    event_done b 2

    section "c. airlock away for 7 s, longer than QEMU holds a request (5 s)"
    AT[c]=$(last_round)
    stop_pid "$apid"
    sleep 7
    # Started from a copy, so that event e can install a broken binary there.
    mkdir -p "$RUN_DIR/bin"
    cp "$AIRLOCK_BIN" "$RUN_DIR/bin/airlock"
    AIRLOCK_BIN="$RUN_DIR/bin/airlock" start_airlock apid "$sock" "$LOG_DIR/airlock-3.log"
    note "airlock stopped at round ~${AT[c]} and started 7 s later"
    event_done c 3

    section "d. live upgrade: SIGUSR2 to airlock (the new binary starts beside it and takes the socket over)"
    AT[d]=$(last_round)
    kill -USR2 "$apid"
    note "SIGUSR2 to airlock (pid $apid) at round ~${AT[d]}"
    event_done d 4
    for ((i = 0; i < 100; i++)); do
        newpid=$(sed -nE 's/.*live upgrade: pid ([0-9]+) .*serves.*/\1/p' "$LOG_DIR/airlock-3.log" | head -n1)
        [[ -n $newpid ]] && break
        sleep 0.1
    done
    [[ -n ${newpid:-} ]] && E2E_PIDS+=("$newpid")

    section "e. live upgrade to a broken binary (it exits at once)"
    AT[e]=$(last_round)
    printf '#!/bin/sh\nexit 1\n' >"$RUN_DIR/bin/airlock.new"
    chmod +x "$RUN_DIR/bin/airlock.new"
    mv "$RUN_DIR/bin/airlock.new" "$RUN_DIR/bin/airlock"
    kill -USR2 "${newpid:-$apid}" 2>/dev/null || true
    note "SIGUSR2 to airlock (pid ${newpid:-?}) with a broken binary installed, at round ~${AT[e]}"
    for ((i = 0; i < 100; i++)); do
        grep -aq 'live upgrade failed' "$LOG_DIR/airlock-3.log" && break
        sleep 0.1
    done
    wait_rounds 1000 60 || true
fi
AT[end]=999999999

# --- the guest's view -------------------------------------------------------------
section "the guest's rounds"
for ((i = 0; i < (SOAK_S + 90) * 10; i++)); do kill -0 "$gpid" 2>/dev/null || break; sleep 0.1; done
stop_pid "$gpid"
# These listings only inform: a grep that finds nothing (a run where
# every round across a restart failed has no slow round that passed) must
# not end the script under set -e before the verdicts.
{ console | grep -aE '^(ROUND [0-9]+ (FAIL|ok [0-9]+ [0-9]+ after)|SOAK|PASS|FAIL|[0-9]+ passed)' || true; } |
    while IFS= read -r l; do note "guest| $l"; done
{ console | grep -aE '^ROUND [0-9]+ ok [0-9]+ [0-9]{2,}$' || true; } | while IFS= read -r l; do note "guest| slow: $l"; done
# (values and addresses folded, so the outage's thousands of failed
# accesses are a few lines)
{ console | grep -a 'vfio' || true; } | sed -E 's/^qemu-system-[a-z0-9_]*: //; s/0x[0-9a-f]+/0x#/g' |
    sort | uniq -c | sort -rn | { head -n 20; cat >/dev/null; } |
    while IFS= read -r l; do note "qemu| $l"; done
soak=$(console | grep -a '^SOAK ' | tail -n1 || true)
median=$(sed -nE 's/.* median-ms ([0-9]+).*/\1/p' <<<"$soak")
mapfile -t qemu_ms < <(console | sed -nE 's/.*the server is back.* resumed after ([0-9]+) ms.*/\1/p')
setups=$(console | grep -ac '^PASS vfio-setup' || true)

# window FROM TO: over the printed rounds FROM <= n < TO: "FAILED LATE
# LONGEST_MS LONGEST_ROUND WHY", FAILED counting every round of a streak,
# LATE the failures after the streak that the restart caused, WHY the
# first failed rounds as the guest printed them.
window() {
    console | awk -v from="$1" -v to="$2" '
        $1 != "ROUND" || $2 < from || $2 >= to { next }
        { d = $5 + 0; if (d > longest) { longest = d; lr = $2 } }
        $3 == "FAIL" {
            if (ended) late++
            if (nwhy++ < 3) why = why (why == "" ? "" : " | ") $0
            next
        }
        $3 == "ok" && $6 == "after-failed" { failed += $7; ended = 1 }
        END { printf "%d %d %d %s %s", failed, late, longest, (lr == "" ? "-" : lr), why }'
}

judge() { # judge NAME EVENT NEXT_EVENT RESUME_INDEX MAX_FAILED
    local name=$1 from=${AT[$2]:-} to=${AT[$3]:-999999999} q=${qemu_ms[$4]:-} max=$5 failed late longest lr why
    if [[ -z $from ]]; then
        verdict "$name" FAIL "not run"
        return
    fi
    read -r failed late longest lr why <<<"$(window "$from" "$to")"
    local detail="QEMU: server lost -> state replayed in ${q:-?} ms; guest: longest round $lr took $((longest - ${median:-0})) ms more than the median (${median:-?} ms); $failed rounds failed"
    # a failing verdict also says what the guest saw
    local seen="${why:+ (rounds $from..$to: $why)}"
    if [[ -z $q ]]; then
        verdict "$name" FAIL "QEMU never resumed the device; $detail$seen"
    elif ((late > 0)); then
        verdict "$name" FAIL "rounds failed again after the restart; $detail$seen"
    elif [[ $max != any ]] && ((failed > max)); then
        verdict "$name" FAIL "more than $max round failed; $detail$seen"
    else
        verdict "$name" OK "$detail"
    fi
}
judge a-server-killed a b 0 1
judge b-airlock-restarted b c 1 1
judge c-long-outage c d 2 any
expired=$(console | grep -a 'the server is still away after' | head -n1 || true)
if [[ -z $expired ]]; then
    verdict c-hold-expired FAIL "QEMU did not report the expired hold"
else
    verdict c-hold-expired OK "QEMU: ${expired#*: }"
fi
judge d-live-upgrade d e 3 1
upgraded=$(grep -a -m1 'took over' "$LOG_DIR/airlock-3.log" 2>/dev/null || true)
if [[ -z ${AT[d]:-} ]]; then
    verdict d-handed-over FAIL "not run"
elif [[ -z ${newpid:-} || -z $upgraded ]] || ! kill -0 "$newpid" 2>/dev/null || kill -0 "$apid" 2>/dev/null; then
    verdict d-handed-over FAIL "the old airlock (pid $apid) did not hand over to a new one (${newpid:-no pid logged}) (see $LOG_DIR/airlock-3.log)"
else
    verdict d-handed-over OK "pid $apid exited, pid $newpid serves; airlock: ${upgraded#*INFO }"
fi
# e: nothing may have happened to the guest: no reconnect, no failed round.
failed_upgrade=$(grep -a -m1 'live upgrade failed' "$LOG_DIR/airlock-3.log" 2>/dev/null || true)
read -r e_failed _ e_longest _ e_why <<<"$(window "${AT[e]:-999999999}" 999999999)"
if [[ -z ${AT[e]:-} ]]; then
    verdict e-broken-upgrade FAIL "not run"
elif [[ -z $failed_upgrade ]] || ! kill -0 "${newpid:-0}" 2>/dev/null; then
    verdict e-broken-upgrade FAIL "airlock did not log the failed upgrade or is gone (see $LOG_DIR/airlock-3.log)"
elif (($(resumes) != 4 || e_failed > 0)); then
    verdict e-broken-upgrade FAIL "the guest noticed: $(resumes) QEMU resumes (want 4), $e_failed rounds failed ${e_why:-}"
else
    verdict e-broken-upgrade OK "pid $newpid serves on; 0 rounds failed, no reconnect; longest round $((e_longest - ${median:-0})) ms over the median; airlock: ${failed_upgrade#*ERROR }"
fi

sum=$(summary_line <(console | result_lines) || true)
if [[ -z $soak || -z $sum ]]; then
    verdict guest-soak FAIL "the guest program did not finish (see $GUEST_LOG)"
elif ((setups != 1)); then
    verdict guest-soak FAIL "the guest program started $setups times (a reboot?)"
elif aborted "$GUEST_LOG"; then
    verdict guest-soak FAIL "QEMU aborted (see $GUEST_LOG)"
elif [[ $(count failed "$sum") != 0 ]]; then
    verdict guest-soak FAIL "guest: $soak; $sum"
else
    verdict guest-soak OK "one boot; $soak; guest program: $sum"
fi
stop_pid "$apid"
[[ -n ${newpid:-} ]] && stop_pid "$newpid"
e2e_summary
