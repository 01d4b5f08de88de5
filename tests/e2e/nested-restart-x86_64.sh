#!/usr/bin/env bash
# tests/e2e/nested-restart-x86_64.sh: a guest drives a REAL device through
# `airlock --vfio`, run by the shipped systemd units under systemd as PID 1,
# while airlock's server is killed -9, airlock is upgraded live (with a good
# and with a broken binary), restarted by systemctl, and killed -9 itself;
# the guest goes on without a reboot and without losing the device's state.
#
#   host ── QEMU 11.1 (TCG) ── L1: Debian 6.12 kernel, a Debian trixie root
#   with systemd as init (scripts/mk-systemd-initramfs), q35 +
#   intel-iommu(intremap, caching-mode) + QEMU's edu
#     L1 (tests/e2e/nested-restart-l1.sh, run as a unit): edu bound to
#         vfio-pci; airlock@<edu>.socket + airlock@<edu>.service as shipped
#         (backend/systemd/), /usr/local/bin/airlock (sandbox on, defaults)
#     L1: the PATCHED QEMU (qemu-patches/, scripts/setup-qemu-patched.sh;
#         bundled with its host libraries and loader, firmware from the
#         stock root), TCG, q35, 256 MiB shared memfd RAM, virtio-iommu,
#         -chardev socket,id=c0,path=/run/airlock/<edu>.sock,reconnect-ms=100
#         -device vfio-user-pci,chardev=c0
#       L2: Debian 6.12 (PVH vmlinux), /test = tests/guest
#           `airlock-guest-test --soak S --sentinel AT:HOLD`: rounds of
#           liveness, factorial, an edu DMA to the device and one back
#           (through L1's IOMMU, fresh pattern each round, compared byte
#           by byte) and an MSI; AT s in, a sentinel goes into edu's
#           liveness register and stays untouched for HOLD s.
#   Once the sentinel is in, L1 runs the events, each after QEMU resumed
#   from the one before: kill-server (kill -9 of the sandboxed server),
#   reload (systemctl reload: live upgrade), reload-broken (systemctl reload
#   with a binary that exits at once installed), restart (systemctl
#   restart: the device waits in systemd's fd store), kill-main (kill -9 of
#   airlock's main pid: Restart=on-failure). After the soak, systemctl stop.
#
# Verdicts (from L1's console, which carries every L2 line with L1's uptime):
#   events             the five events ran, once each, in order
#   kill-server, reload, restart, kill-main
#                      QEMU lost the server and logged "the server is back;
#                      device state replayed, resumed after N ms" (the
#                      outage per case); every round overlapping [event,
#                      resume] passed (its DMAs landed in the right pages);
#                      the main pid changed where it must (reload, restart,
#                      kill-main) and the device came back from the fd store
#                      (restart, kill-main)
#   reload-broken      airlock logged the failed upgrade, kept its main pid,
#                      and QEMU never lost the server
#   qemu-resumed       four losses, four resumes, no hold expired
#   no-failed-rounds   not one round failed over the whole soak
#   sentinel-survived  the sentinel written before the first event reads
#                      back after the last resume: no reset, same device
#   stop-released      after systemctl stop: the fd store is empty, no
#                      process holds the VFIO group, bus mastering is off
#   withdraw-under-systemd  then, started again, the host unbinds the edu:
#                      the unbind completes within 5 s, airlock named the
#                      request, the service ended with status 69 and was
#                      not restarted, the fd store is empty
#   guest-soak         one L2 boot, its program's results all passed
#
# A long-running test (minutes: L2 boots under TCG inside TCG), not part of
# scripts/test. Measured here: ~4 min on a quiet 2-core host, ~11 min on a
# loaded one.
#
# Usage: tests/e2e/nested-restart-x86_64.sh
# Env:   AIRLOCK_LOG_DIR  logs (default logs/e2e-nested-restart-x86_64/):
#                         console.log (L1; L2's lines as "l2 <uptime>| "),
#                         airlock.log (airlock in L1), build.log, setup.log
#        SOAK_S           the soak's length (guest seconds, default 75)
#        SENTINEL         AT:HOLD seconds (default 10:55; the events must fit in HOLD)
#        RECONNECT_MS     the chardev's reconnect-ms (default 100)
#        GUEST_TIMEOUT    seconds before L1's QEMU is killed (default 900)
#        L2_MEM           L2's RAM (default 128M)
#        L2_APPEND        extra words for L2's kernel command line (e.g. loglevel=7)
#        NESTED_AIRLOCK   a static airlock binary to use instead of this tree's build
#        NESTED_AIRLOCK_ARGS  extra airlock arguments, space-separated
# Last line "N passed, M failed"; exit 0 iff all passed, 77 if it could not
# run (no cargo, no patched QEMU).
set -euo pipefail
E2E_NAME=e2e-nested-restart-x86_64
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SOAK_S=${SOAK_S:-75}
SENTINEL=${SENTINEL:-10:55}
RECONNECT_MS=${RECONNECT_MS:-100}
timeout_s=${GUEST_TIMEOUT:-900}
l1_mem=2G l2_mem=${L2_MEM:-128M}
l2_append=$(echo ${L2_APPEND:-} | tr ' ' ,)
target=x86_64-unknown-linux-gnu
[[ $SENTINEL =~ ^[0-9]+:[0-9]+$ ]] || die "SENTINEL=$SENTINEL: want AT:HOLD (seconds)"
((${SENTINEL%%:*} + ${SENTINEL##*:} < SOAK_S)) || die "SENTINEL=$SENTINEL ends after the soak (SOAK_S=$SOAK_S)"

# --- setup and build ----------------------------------------------------------
section "setup"
unset AIRLOCK_QEMU_BIN_DIR # L1 runs the stock QEMU; only L2's is patched
: >"$LOG_DIR/setup.log"
e2e_prereqs
t0=$(now)
note "patched QEMU: scripts/setup-qemu-patched.sh (first run builds it, ~6 min)"
pq_dir=$("$E2E_REPO/scripts/setup-qemu-patched.sh" 2>>"$LOG_DIR/setup.log") ||
    skip_exit "building the patched QEMU failed (see $LOG_DIR/setup.log)"
pq_bin="$pq_dir/bin/qemu-system-x86_64"
[[ -x $pq_bin && -f $pq_dir/lib/ld-linux-x86-64.so.2 ]] ||
    skip_exit "scripts/setup-qemu-patched.sh printed '$pq_dir', which has no bin/qemu-system-x86_64 with lib/"
note "patched QEMU in $pq_dir ($(elapsed "$t0") s): $("$pq_dir/qemu-system-x86_64" -version | head -n1)"

t0=$(now)
: >"$LOG_DIR/build.log"
(cd "$E2E_REPO" && RUSTFLAGS="-C target-feature=+crt-static" nice \
    cargo build --release -p airlock -p airlock-guest-test --target "$target") >>"$LOG_DIR/build.log" 2>&1 ||
    { tail -n 30 "$LOG_DIR/build.log"; die "static build failed (see $LOG_DIR/build.log)"; }
bin="$E2E_REPO/target/$target/release"
airlock_bin=${NESTED_AIRLOCK:-$bin/airlock}
note "built static airlock and airlock-guest-test in $(elapsed "$t0") s"

work=$RUN_DIR
g="$AIRLOCK_CACHE/guest/amd64"

# L2: the generic initramfs (vfio modules behind virtio-iommu) with the soak as /test.
# It first says where L2's boot spent its time (dmesg gaps over 5 s).
cat >"$work/soak.sh" <<EOF
#!/bin/sh
read -r u _ </proc/uptime
echo "INFO l2: /test at uptime \$u s"
dmesg | awk '{ t = substr(\$0, 2, index(\$0, "]") - 2) + 0 }
    NR > 1 && t - p > 5 { printf "INFO l2: boot gap %.1f s before: %s\\n", t - p, substr(\$0, 1, 160) }
    { p = t }'
exec /airlock-guest-test --soak $SOAK_S --sentinel $SENTINEL
EOF
chmod +x "$work/soak.sh"
l2_cpio="$work/l2.cpio"
"$E2E_REPO/scripts/mkinitramfs" x86_64 "$l2_cpio" "$bin/airlock-guest-test:/airlock-guest-test" \
    "$work/soak.sh:/test" >>"$LOG_DIR/build.log" 2>&1 || die "mkinitramfs (L2) failed (see $LOG_DIR/build.log)"

# The patched QEMU for L1, with the loader and libraries bundled beside it.
qemu_bundle_x86 "$pq_bin" "$pq_dir/lib/ld-linux-x86-64.so.2" "$pq_dir/lib"
note "L2 QEMU bundle (patched): ${#bundle[@]} files, $((bundle_bytes / 1048576)) MiB; L2 initramfs $(($(stat -c %s "$l2_cpio") / 1024)) KiB"

cpio="$work/l1.cpio"
t0=$(now)
"$E2E_REPO/scripts/mk-systemd-initramfs" "$cpio" \
    "$airlock_bin:/usr/local/bin/airlock" "$airlock_bin:/opt/airlock/airlock" \
    "$E2E_REPO/backend/systemd/airlock@.service:/etc/systemd/system/airlock@.service" \
    "$E2E_REPO/backend/systemd/airlock@.socket:/etc/systemd/system/airlock@.socket" \
    "$E2E_REPO/tests/e2e/nested-restart-l1.sh:/test" "$E2E_REPO/tests/e2e/l1-vfio.sh:/l1-vfio.sh" \
    "$E2E_REPO/tests/e2e/l2-boot-args.sh:/l2-boot-args.sh" \
    "$g/vmlinux:/l2/vmlinux" "$l2_cpio:/l2/initrd.cpio" "${bundle[@]}" >>"$LOG_DIR/build.log" 2>&1 ||
    die "mk-systemd-initramfs (L1) failed (see $LOG_DIR/build.log)"
note "L1 initramfs $(($(stat -c %s "$cpio") / 1048576)) MiB in $(elapsed "$t0") s (uncompressed; a Debian trixie root with systemd, airlock and its units, L2's vmlinux, initramfs and the patched QEMU)"
extra=$(echo ${NESTED_AIRLOCK_ARGS:-} | tr ' ' ,)

# --- boot L1 ------------------------------------------------------------------
section "L1 boots systemd; airlock@<edu>; L2 soaks it; kill -9, reload, broken reload, restart, kill -9 of airlock"
console="$LOG_DIR/console.log"
: >"$console"
t_boot=$(now)
spawn qpid "$E2E_REPO/scripts/qemu" x86_64 -accel tcg \
    -M q35,kernel-irqchip=split -cpu max -smp 2 -m "$l1_mem" \
    -nographic -nodefaults -serial stdio -no-reboot \
    -device intel-iommu,intremap=on,caching-mode=on \
    -device edu \
    -kernel "$g/vmlinux" -initrd "$cpio" \
    -append "console=ttyS0 quiet panic=-1 cryptomgr.notests intel_iommu=on l2.mem=$l2_mem restart.reconnect=$RECONNECT_MS${extra:+ airlock.extra=$extra}${l2_append:+ l2.append=$l2_append}" \
    </dev/null >"$console" 2>&1
note "L1: q35 + intel-iommu(intremap, caching-mode) + edu, TCG, 2 vCPUs, $l1_mem; console: $console"
note "L2: soak $SOAK_S s, sentinel $SENTINEL (at:hold s), reconnect-ms=$RECONNECT_MS; timeout $timeout_s s"

# console lines without CRs and terminal escapes
lines() { console_lines "$console" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g'; }
shown=0 marker="" timed_out=0 last_progress=$(now)
while :; do
    mapfile -t got < <(lines | grep -aE '^((PASS|FAIL|INFO) |[0-9]+ passed, [0-9]+ failed|l2 [0-9.]+\| |AIRLOCK-GUEST-EXIT )' || true)
    for ((i = shown; i < ${#got[@]}; i++)); do
        l=${got[i]}
        # every round is printed (an edu DMA takes 100 ms): show only the unusual ones
        [[ $l =~ ^l2\ [0-9.]+\|\ ROUND\ [0-9]+\ ok\ [0-9]+\ [0-9]+$ ]] && continue
        note "$l"
        last_progress=$(now)
    done
    shown=${#got[@]}
    marker=$(printf '%s\n' "${got[@]}" | grep -aE '^AIRLOCK-GUEST-EXIT [0-9]+$' | tail -n1 || true)
    [[ -n $marker ]] && break
    kill -0 "$qpid" 2>/dev/null || break
    if (($(elapsed "$t_boot" | cut -d. -f1) >= timeout_s)); then
        timed_out=1
        break
    fi
    if (($(elapsed "$last_progress" | cut -d. -f1) >= 60)); then
        note "... still running ($(elapsed "$t_boot") s since L1 start; last line: $(lines | tail -n1 | cut -c1-100))"
        last_progress=$(now)
    fi
    sleep 0.2
done
t_end=$(now)
for ((i = 0; i < 100 && ${#marker} > 0; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
stop_pid "$qpid"
lines | sed -n 's/^airlock| //p' >"$LOG_DIR/airlock.log"

# --- the verdicts --------------------------------------------------------------
section "verdicts"
# l2ts: "UPTIME LINE" for every line of the L2 QEMU; l2: the lines alone.
l2ts() { lines | sed -nE 's/^l2 ([0-9.]+)\| /\1 /p'; }
l2() { lines | sed -nE 's/^l2 [0-9.]+\| //p'; }
if ((timed_out)); then
    verdict l1-run FAIL "timeout after $timeout_s s (console: $console)"
elif [[ -z $marker ]]; then
    verdict l1-run FAIL "L1 stopped without an AIRLOCK-GUEST-EXIT line (console: $console): $(lines | tail -n 3 | tr '\n' ' ' | cut -c1-300)"
fi
if l1fail=$(lines | grep -a -m1 '^FAIL '); then
    verdict l1-setup FAIL "L1: ${l1fail#FAIL }"
fi

# The events, as L1 ran them: "NAME UPTIME".
mapfile -t events < <(lines | sed -nE 's/^INFO l1: EVENT ([a-z-]+) ([0-9.]+) .*/\1 \2/p')
want="kill-server reload reload-broken restart kill-main"
got=$(printf '%s\n' "${events[@]}" | cut -d' ' -f1 | tr '\n' ' ' | sed 's/ $//')
declare -A ev_ts=()
for e in "${events[@]}"; do ev_ts[${e%% *}]=${e##* }; done
if [[ $got != "$want" ]]; then
    verdict events FAIL "L1 ran [${got:-none}], want [$want] ($(lines | grep -a -m1 -E 'INFO l1: (no sandboxed|L2 never)' || echo 'see the console'))"
else
    verdict events OK "L1 uptimes: $(printf '%s s; ' "${events[@]}" | sed 's/; $//')"
fi

# QEMU's view: a loss and a resume per disruptive event (not the broken reload).
gone=$(l2 | grep -ac 'the server went away' || true)
mapfile -t resumed < <(l2ts | sed -nE 's/^([0-9.]+) .*the server is back; device state replayed, resumed after ([0-9]+) ms.*/\1 \2/p')
expired=$(l2 | grep -a -m1 -E 'still away after|refus' || true)
if ((gone != 4 || ${#resumed[@]} != 4)); then
    verdict qemu-resumed FAIL "$gone loss(es) and ${#resumed[@]} resume(s) of the server (want 4 and 4); its vfio lines: $(l2 | grep -a 'vfio' | sort | uniq -c | sort -rn | head -n 4 | tr -s ' ' | tr '\n' ';' | cut -c1-400)"
elif [[ -n $expired ]]; then
    verdict qemu-resumed FAIL "QEMU: ${expired#*: }"
else
    verdict qemu-resumed OK "QEMU (L2) resumed after $(printf '%s\n' "${resumed[@]}" | cut -d' ' -f2 | tr '\n' ' ')ms"
fi

soak=$(l2 | grep -a '^SOAK ' | tail -n1 || true)
median=$(sed -nE 's/.* median-ms ([0-9]+).*/\1/p' <<<"$soak")
# window_rounds FROM TO: the rounds overlapping [FROM, TO] on L1's clock (a
# round ends when its line arrives and began DUR ms before).
window_rounds() {
    l2ts | awk -v k="$1" -v r="$2" '
        # Only whole lines: a line of QEMU stderr can land inside one
        # ("ROUND 52 ok 11qemu-system-x86_64: info: ..."), and awk reads
        # "info:" as infinity.
        $2 != "ROUND" || $5 !~ /^[0-9]+$/ || $6 !~ /^[0-9]/ { next }
        { end = $1; start = end - $6 / 1000 }
        start <= r && end >= k {
            lo = (start > k ? start : k); hi = (end < r ? end : r)
            printf "round %s %s, %s ms (L1 uptime %.2f-%.2f s, %d ms of it in the window)\n", $3, $4, $6, start, end, (hi - lo) * 1000
        }'
}
l1say() { lines | sed -nE "s/^INFO l1: $1: //p" | head -n1; }
airlock_says() { grep -a -m1 -E "$1" "$LOG_DIR/airlock.log" | sed -E 's/^[^ ]+ +[^ ]+ +[A-Z]+ [a-z_:]+: //; s/^[^:]*airlock[^:]*: //' | cut -c1-200; }
# judge_event NAME K FACT: the K-th resume belongs to event NAME.
judge_event() {
    local name=$1 k=$2 fact=$3 ts=${ev_ts[$1]:-} r rts rms w
    r=${resumed[$((k - 1))]:-}
    rts=${r%% *} rms=${r##* }
    if [[ -z $ts ]]; then
        verdict "$name" FAIL "not run"
        return
    fi
    if [[ -z $r ]] || ! awk -v a="$ts" -v b="$rts" 'BEGIN { exit !(a + 0 < b + 0) }'; then
        verdict "$name" FAIL "no QEMU resume after it (event at $ts s; resumes: ${resumed[*]:-none})"
        return
    fi
    w=$(window_rounds "$ts" "$rts")
    if [[ -z $w ]]; then
        verdict "$name" FAIL "no printed round overlaps [$ts, $rts] (L1 uptime)"
    elif grep -q ' FAIL' <<<"$w"; then
        verdict "$name" FAIL "a round in the window failed: $(tr '\n' ';' <<<"$w")"
    elif [[ $fact == FAIL:* ]]; then
        verdict "$name" FAIL "${fact#FAIL:}"
    else
        local longest
        longest=$(awk '{ sub(",", "", $4); if ($4 + 0 > m) m = $4 + 0 } END { print m + 0 }' <<<"$w")
        verdict "$name" OK "QEMU resumed after $rms ms; $(wc -l <<<"$w") round(s) overlapped [event $ts s, resume $rts s], all passed, the longest took $longest ms ($((longest - ${median:-0})) ms over the median); $fact"
    fi
}
pids() { sed -nE 's/.*main pid ([0-9]+) -> ([0-9]+).*/\1 \2/p' <<<"$1"; }
changed() { # changed "LINE": FAIL:... unless the main pid changed
    local a b
    read -r a b <<<"$(pids "$1")"
    if [[ -n $a && -n $b && $a != "$b" && $b != 0 ]]; then echo "main pid $a -> $b"; else echo "FAIL:the main pid did not change ($1)"; fi
}
fresh=$(airlock_says 'starting a fresh sandboxed server')
judge_event kill-server 1 "${fresh:-FAIL:airlock did not restart its server}"
judge_event reload 2 "$(changed "$(l1say reload)")"
restored=$(grep -ac "systemd's fd store gave the device back" "$LOG_DIR/airlock.log" || true)
fact=$(changed "$(l1say restart)")
((restored >= 1)) || fact="FAIL:airlock did not take the device from the fd store ($fact)"
judge_event restart 3 "$fact"
fact=$(changed "$(l1say kill-main)")
((restored >= 2)) || fact="FAIL:the second restart did not take the device from the fd store ($fact)"
judge_event kill-main 4 "$fact"

broken=$(l1say reload-broken)
read -r b_old b_new <<<"$(pids "$broken")"
b_lost=$(l2ts | awk -v a="${ev_ts[reload-broken]:-0}" -v b="${ev_ts[restart]:-999999}" '$1 > a && $1 < b && /the server went away/' | wc -l)
if [[ -z ${ev_ts[reload-broken]:-} ]]; then
    verdict reload-broken FAIL "not run"
elif [[ $broken != *"live upgrade failed"* || -z $b_old || $b_old != "$b_new" || $b_lost != 0 ]]; then
    verdict reload-broken FAIL "$b_lost loss(es) of the server after it; L1: $broken"
else
    verdict reload-broken OK "main pid $b_old kept, QEMU never lost the server; airlock: ${broken#*airlock: }"
fi

fail_lines=$(l2 | grep -acE '^ROUND [0-9]+ FAIL' || true)
soak_failed=$(sed -nE 's/.* failed ([0-9]+) .*/\1/p' <<<"$soak")
if [[ -z $soak ]]; then
    verdict no-failed-rounds FAIL "the soak did not finish (no SOAK line); $fail_lines failed rounds printed"
elif [[ $soak_failed != 0 || $fail_lines != 0 ]]; then
    verdict no-failed-rounds FAIL "$soak_failed rounds failed (the device lost state or the wiring broke): $(l2 | grep -a -m3 -E '^ROUND [0-9]+ FAIL' | tr '\n' ';' | cut -c1-400)"
else
    verdict no-failed-rounds OK "$soak"
fi

# The sentinel: written before the first event, read back after the last resume.
read -r sw_ts sw_line < <(l2ts | grep -a -m1 -E '^[0-9.]+ SENTINEL wrote '; echo) || true
read -r sk_ts sk_line < <(l2ts | grep -a -m1 -E '^[0-9.]+ SENTINEL (kept|LOST) '; echo) || true
last=${resumed[3]:-}
last_ts=${last%% *}
first_ts=${ev_ts[kill-server]:-}
before() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 < b + 0) }'; }
if [[ -z ${sw_ts:-} || -z ${sk_ts:-} ]]; then
    verdict sentinel-survived FAIL "no SENTINEL wrote/kept lines from L2 (${sw_line:-none}; ${sk_line:-none})"
elif [[ $sk_line != "SENTINEL kept "* ]]; then
    verdict sentinel-survived FAIL "$sk_line (written: $sw_line)"
elif [[ -z $first_ts || -z $last_ts ]]; then
    verdict sentinel-survived FAIL "kept, but the events or the last resume are missing: $sk_line"
elif ! before "$sw_ts" "$first_ts" || ! before "$last_ts" "$sk_ts"; then
    verdict sentinel-survived FAIL "not across the events (L1 uptimes: written $sw_ts, first event $first_ts, last resume $last_ts, read $sk_ts; make SENTINEL's HOLD longer): $sk_line"
else
    verdict sentinel-survived OK "$sw_line (L1 uptime $sw_ts s) -> five events from $first_ts s -> last resume at $last_ts s -> $sk_line (L1 uptime $sk_ts s): edu's liveness register kept it through kill -9, reload, restart and kill -9 of airlock: no reset"
fi

stop=$(lines | sed -nE 's/^INFO l1: STOP //p' | head -n1)
if [[ -z $stop ]]; then
    verdict stop-released FAIL "L1 printed no STOP line"
elif [[ $stop =~ store\ ([0-9]+)\ -\>\ ([0-9]+)\ fds.*holders\ of\ [^:]+:\ ([0-9]+).*bus\ master\ ([0-9]) ]] &&
    ((BASH_REMATCH[1] == 4 && BASH_REMATCH[2] == 0 && BASH_REMATCH[3] == 0 && BASH_REMATCH[4] == 0)); then
    verdict stop-released OK "systemctl stop: $stop"
else
    verdict stop-released FAIL "want the store 4 -> 0 fds, no holders, bus master 0: $stop"
fi

w=$(lines | sed -nE 's/^INFO l1: WITHDRAW //p' | head -n1)
if [[ -z $w ]]; then
    verdict withdraw-under-systemd FAIL "L1 printed no WITHDRAW line"
elif [[ $w =~ unbind\ done\ yes\ after\ ([0-9]+)\ ms\;\ driver\ none\;\ state\ [a-z]+/exit-code\;\ status\ 69\;\ restarts\ ([0-9]+)\ -\>\ ([0-9]+)\;\ store\ 0\ fds\;\ request\ lines\ [1-9] ]] &&
    ((BASH_REMATCH[1] <= 5000 && BASH_REMATCH[2] == BASH_REMATCH[3])); then
    verdict withdraw-under-systemd OK "$w"
else
    verdict withdraw-under-systemd FAIL "want the unbind done within 5000 ms, no driver, Result=exit-code, status 69, no restart, an empty store and a request line: $w"
fi

# One boot, the guest program's results.
setups=$(l2 | grep -ac '^PASS vfio-setup' || true)
sum=$(l2 | grep -aE '^[0-9]+ passed, [0-9]+ failed' | tail -n1 || true)
if [[ -z $sum ]]; then
    verdict guest-soak FAIL "the guest program did not finish (see $console)"
elif ((setups != 1)); then
    verdict guest-soak FAIL "the guest program started $setups times (a reboot?)"
elif aborted_l2=$(l2 | grep -a -m1 -E 'Assertion|Aborted|core dumped|hw_error|qemu: hardware error'); then
    verdict guest-soak FAIL "the L2 QEMU aborted: $aborted_l2"
elif [[ $(count failed "$sum") != 0 || ${marker##* } != 0 ]]; then
    verdict guest-soak FAIL "guest: $(l2 | grep -a '^FAIL' | tr '\n' ';' | cut -c1-300) $sum; L1 ${marker:-no exit marker}"
else
    verdict guest-soak OK "one boot; guest program: $(l2 | grep -aE '^(PASS|FAIL)' | cut -d' ' -f2 | tr '\n' ' ')-> $sum"
fi

section "adoption and the main pids"
# (informative: nothing found must not end the script under set -e)
{ lines | grep -aE '^INFO (airlock|l1): ' | grep -aE 'airlock:|main pid|fd store' || true; } | while IFS= read -r l; do note "L1 ${l#INFO }"; done
{ l2 | grep -a 'vfio-user' || true; } | sed 's/^qemu-system-x86_64: //' | while IFS= read -r l; do note "L2 QEMU: $l"; done
note "timings: L1 QEMU start to end $(elapsed "$t_boot" "$t_end") s; L2 QEMU $(lines | sed -nE 's/^INFO l1: L2 QEMU ended: .*, ([0-9.]+ s) after its start/\1/p' | head -n1)"
e2e_summary
