#!/usr/bin/env bash
# tests/e2e/nested-restart-x86_64.sh: airlock's server is killed -9 under a
# guest driving a REAL device through `airlock --vfio`, and the guest goes
# on without a reboot and without losing the device's state.
#
#   host ── QEMU 11.1 (TCG) ── L1: Debian 6.12, q35 + intel-iommu(intremap,
#   caching-mode) + QEMU's edu
#     L1 (tests/e2e/nested-restart-l1.sh): edu bound to vfio-pci;
#         `airlock --vfio <edu>` (sandbox on, defaults: the supervisor holds
#         the VFIO fds, every server inherits the device)
#     L1: the PATCHED QEMU (qemu-patches/, scripts/setup-qemu-patched.sh;
#         bundled with its host libraries and loader, firmware from the
#         stock root), TCG, q35, 256 MiB shared memfd RAM, virtio-iommu,
#         -chardev socket,id=c0,path=S,reconnect-ms=100
#         -device vfio-user-pci,chardev=c0
#       L2: Debian 6.12 (PVH vmlinux), /test = tests/guest
#           `airlock-guest-test --soak S --sentinel AT:HOLD`: rounds of
#           liveness, factorial, an edu DMA to the device and one back
#           (through L1's IOMMU, fresh pattern each round, compared byte
#           by byte) and an MSI; AT s in, a sentinel goes into edu's
#           liveness register and stays untouched for HOLD s.
#   Once the sentinel is in and one more round has ended, L1 kills airlock's
#   sandboxed server (the supervisor's child) with SIGKILL, once. The
#   supervisor starts a fresh server, which adopts the IOMMU mappings and
#   interrupts; the patched QEMU reconnects and replays its state.
#
# Verdicts (from L1's console, which carries every L2 line with L1's uptime):
#   server-killed      the kill happened, once, and the supervisor restarted
#                      the server once
#   qemu-resumed       the L2 QEMU lost the server once and logged "the
#                      server is back; device state replayed, resumed after
#                      N ms" (its outage), without its hold expiring
#   no-failed-rounds   not one round failed over the whole soak (with
#                      --vfio the device keeps its registers: a failed
#                      round means state was lost)
#   sentinel-survived  the sentinel written before the kill reads back
#                      after QEMU's resume: no reset, same device
#   dma-in-window      the rounds that overlap [kill, resume] (L1 clock)
#                      passed: their device DMAs landed in the right guest
#                      pages while the server was away or replaying
#   guest-soak         one L2 boot, its program's results all passed
# Printed: the outage (QEMU's ms; the guest's longest round minus the
# median), the rounds in the window, airlock's adoption lines.
#
# A long-running test (minutes: L2 boots under TCG inside TCG), not part of
# scripts/test. Measured here: ~4 min on a quiet 2-core host, ~11 min on a
# loaded one.
#
# Usage: tests/e2e/nested-restart-x86_64.sh
# Env:   AIRLOCK_LOG_DIR  logs (default logs/e2e-nested-restart-x86_64/):
#                         console.log (L1; L2's lines as "l2 <uptime>| "),
#                         airlock.log (airlock in L1), build.log, setup.log
#        SOAK_S           the soak's length (guest seconds, default 45)
#        SENTINEL         AT:HOLD seconds (default 10:20)
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

SOAK_S=${SOAK_S:-45}
SENTINEL=${SENTINEL:-10:20}
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
AIRLOCK_UNSAFE_INTERRUPTS=0 "$E2E_REPO/scripts/mkinitramfs" x86_64 "$cpio" \
    "$airlock_bin:/bin/airlock" "$E2E_REPO/tests/e2e/nested-restart-l1.sh:/test" "$E2E_REPO/tests/e2e/l1-vfio.sh:/l1-vfio.sh" \
    "$g/vmlinux:/l2/vmlinux" "$l2_cpio:/l2/initrd.cpio" "${bundle[@]}" >>"$LOG_DIR/build.log" 2>&1 ||
    die "mkinitramfs (L1) failed (see $LOG_DIR/build.log)"
note "L1 initramfs $(($(stat -c %s "$cpio") / 1048576)) MiB (uncompressed; holds L2's vmlinux, initramfs and the patched QEMU)"
extra=$(echo ${NESTED_AIRLOCK_ARGS:-} | tr ' ' ,)

# --- boot L1 ------------------------------------------------------------------
section "L1 boots; airlock --vfio <edu>; L2 soaks it; the server is killed -9 once"
console="$LOG_DIR/console.log"
: >"$console"
t_boot=$(now)
spawn qpid "$E2E_REPO/scripts/qemu" x86_64 -accel tcg \
    -M q35,kernel-irqchip=split -cpu max -smp 2 -m "$l1_mem" \
    -nographic -nodefaults -serial stdio -no-reboot \
    -device intel-iommu,intremap=on,caching-mode=on \
    -device edu \
    -kernel "$g/vmlinux" -initrd "$cpio" \
    -append "console=ttyS0 quiet panic=-1 intel_iommu=on l2.mem=$l2_mem restart.reconnect=$RECONNECT_MS${extra:+ airlock.extra=$extra}${l2_append:+ l2.append=$l2_append}" \
    </dev/null >"$console" 2>&1
note "L1: q35 + intel-iommu(intremap, caching-mode) + edu, TCG, 2 vCPUs, $l1_mem; console: $console"
note "L2: soak $SOAK_S s, sentinel $SENTINEL (at:hold s), reconnect-ms=$RECONNECT_MS; timeout $timeout_s s"

# console lines without CRs and terminal escapes
lines() { tr -d '\r' <"$console" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g'; }
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

read -r kill_ts kill_srv < <(lines | sed -nE 's/^INFO l1: KILL ([0-9.]+) server ([0-9]+) .*/\1 \2/p' | head -n1; echo) || true
kills=$(lines | grep -ac '^INFO l1: KILL ' || true)
fresh=$(grep -ac 'starting a fresh sandboxed server' "$LOG_DIR/airlock.log" || true)
if [[ -z ${kill_ts:-} ]]; then
    verdict server-killed FAIL "L1 killed no server ($(lines | grep -a -m1 -E 'INFO l1: (no sandboxed|L2 never)' || echo 'see the console'))"
elif ((kills != 1 || fresh != 1)); then
    verdict server-killed FAIL "$kills kill(s) by L1, $fresh restart(s) by airlock's supervisor (want 1 and 1)"
else
    verdict server-killed OK "SIGKILL to the sandboxed server (pid $kill_srv) at L1 uptime $kill_ts s; the supervisor started a fresh one: $(grep -a -m1 'starting a fresh' "$LOG_DIR/airlock.log" | sed -E 's/^[^ ]+ +[A-Z]+ [a-z_:]+: //' | cut -c1-200)"
fi

# QEMU's view: one loss, one resume.
gone=$(l2 | grep -ac 'the server went away' || true)
read -r resume_ts resume_ms < <(l2ts | sed -nE 's/^([0-9.]+) .*the server is back; device state replayed, resumed after ([0-9]+) ms.*/\1 \2/p' | head -n1; echo) || true
resumes=$(l2 | grep -ac 'the server is back' || true)
expired=$(l2 | grep -a -m1 -E 'still away after|refus' || true)
if [[ -z ${resume_ts:-} ]]; then
    verdict qemu-resumed FAIL "the L2 QEMU never logged the resume ($gone loss(es)); its vfio lines: $(l2 | grep -a 'vfio' | sort | uniq -c | sort -rn | head -n 4 | tr -s ' ' | tr '\n' ';' | cut -c1-400)"
elif ((gone != 1 || resumes != 1)); then
    verdict qemu-resumed FAIL "$gone loss(es) and $resumes resume(s) of the server (want 1 and 1)"
elif [[ -n $expired ]]; then
    verdict qemu-resumed FAIL "QEMU: ${expired#*: }"
else
    verdict qemu-resumed OK "QEMU (L2): $(l2 | grep -a -m1 'the server is back' | sed 's/^qemu-system-x86_64: //')"
fi

# The rounds overlapping [kill, resume] on L1's clock: a round ends when its
# line arrives (UPTIME) and began DUR ms before.
window_rounds=""
if [[ -n ${kill_ts:-} && -n ${resume_ts:-} ]]; then
    window_rounds=$(l2ts | awk -v k="$kill_ts" -v r="$resume_ts" '
        $2 != "ROUND" { next }
        { end = $1; start = end - $6 / 1000 }
        start <= r && end >= k {
            lo = (start > k ? start : k); hi = (end < r ? end : r)
            printf "round %s %s, %s ms (L1 uptime %.2f-%.2f s, %d ms of it in the window)\n", $3, $4, $6, start, end, (hi - lo) * 1000
        }')
fi
# The guest's rounds.
soak=$(l2 | grep -a '^SOAK ' | tail -n1 || true)
median=$(sed -nE 's/.* median-ms ([0-9]+).*/\1/p' <<<"$soak")
longest=$(sed -nE 's/.* longest-ms ([0-9]+).*/\1/p' <<<"$soak")
longest_round=$(sed -nE 's/.* longest-round ([0-9]+).*/\1/p' <<<"$soak")
soak_failed=$(sed -nE 's/.* failed ([0-9]+) .*/\1/p' <<<"$soak")
fail_lines=$(l2 | grep -acE '^ROUND [0-9]+ FAIL' || true)
# the longest round overlapping the window: "N MS"
read -r wr_n wr_ms < <(awk '{ sub(",", "", $4); if ($4 + 0 > m) { m = $4 + 0; n = $2 } } END { if (n != "") print n, m; else print "" }' <<<"$window_rounds") || true
outage="QEMU: server lost -> state replayed in ${resume_ms:-?} ms; guest: the round across the restart (${wr_n:-?}) took ${wr_ms:-?} ms, $((${wr_ms:-0} - ${median:-0})) ms more than the median (${median:-?} ms); the longest round (${longest_round:-?}) took ${longest:-?} ms, $((${longest:-0} - ${median:-0})) ms more than the median"
if [[ -z $soak ]]; then
    verdict no-failed-rounds FAIL "the soak did not finish (no SOAK line); $fail_lines failed rounds printed"
elif [[ $soak_failed != 0 || $fail_lines != 0 ]]; then
    verdict no-failed-rounds FAIL "$soak_failed rounds failed (the device lost state or the wiring broke): $(l2 | grep -a -m3 -E '^ROUND [0-9]+ FAIL' | tr '\n' ';' | cut -c1-400); $outage"
else
    verdict no-failed-rounds OK "$soak; $outage"
fi

# The sentinel: written before the kill, read back after the resume.
read -r sw_ts sw_line < <(l2ts | grep -a -m1 -E '^[0-9.]+ SENTINEL wrote ' ; echo) || true
read -r sk_ts sk_line < <(l2ts | grep -a -m1 -E '^[0-9.]+ SENTINEL (kept|LOST) '; echo) || true
before() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 < b + 0) }'; }
if [[ -z ${sw_ts:-} || -z ${sk_ts:-} ]]; then
    verdict sentinel-survived FAIL "no SENTINEL wrote/kept lines from L2 (${sw_line:-none}; ${sk_line:-none})"
elif [[ $sk_line != "SENTINEL kept "* ]]; then
    verdict sentinel-survived FAIL "$sk_line (written: $sw_line)"
elif [[ -z ${kill_ts:-} || -z ${resume_ts:-} ]]; then
    verdict sentinel-survived FAIL "kept, but no kill or no resume to have survived: $sk_line"
elif ! before "$sw_ts" "$kill_ts" || ! before "$resume_ts" "$sk_ts"; then
    verdict sentinel-survived FAIL "not across the restart (L1 uptimes: written $sw_ts, kill $kill_ts, resume $resume_ts, read $sk_ts): $sk_line"
else
    verdict sentinel-survived OK "$sw_line (L1 uptime $sw_ts s) -> kill at $kill_ts s -> QEMU resumed at $resume_ts s -> $sk_line (L1 uptime $sk_ts s): edu's liveness register kept it, no reset happened"
fi

if [[ -z $window_rounds ]]; then
    verdict dma-in-window FAIL "no printed round overlaps the window [kill ${kill_ts:-?}, resume ${resume_ts:-?}] (L1 uptime)"
elif grep -q ' FAIL' <<<"$window_rounds"; then
    verdict dma-in-window FAIL "a round in the window failed: $(tr '\n' ';' <<<"$window_rounds")"
else
    verdict dma-in-window OK "window [kill $kill_ts s, resume $resume_ts s] (L1 uptime, $(awk -v a="$kill_ts" -v b="$resume_ts" 'BEGIN { printf "%d", (b - a) * 1000 }') ms); every round overlapping it passed, each with an edu DMA to the device and back through L1's IOMMU compared byte by byte: $(tr '\n' ';' <<<"$window_rounds" | sed 's/;$//')"
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

section "outage and adoption"
note "outage: $outage"
[[ -n $window_rounds ]] && while IFS= read -r l; do note "in the window: $l"; done <<<"$window_rounds"
# (informative: nothing found must not end the script under set -e)
{ lines | grep -aE '^INFO airlock: ' || true; } | while IFS= read -r l; do note "L1 ${l#INFO }"; done
{ l2 | grep -a 'vfio-user' || true; } | sed 's/^qemu-system-x86_64: //' | while IFS= read -r l; do note "L2 QEMU: $l"; done
note "timings: L1 QEMU start to end $(elapsed "$t_boot" "$t_end") s; L2 QEMU $(lines | sed -nE 's/^INFO l1: L2 QEMU ended: .*, ([0-9.]+ s) after its start/\1/p' | head -n1)"
e2e_summary
