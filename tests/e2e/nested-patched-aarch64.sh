#!/usr/bin/env bash
# tests/e2e/nested-patched-aarch64.sh: the guest's virtio-iommu learns the MSI
# doorbell window that `airlock --vfio` reads from its host, two levels deep,
# with the patched QEMU (qemu-patches/) built for arm64.
#
#   host ── QEMU 11.1 (TCG) ── L1: arm64 Debian 6.12, virt + GICv3 ITS +
#   SMMUv3 + QEMU's edu (tests/e2e/nested-patched-aarch64-l1.sh is /test)
#     L1: edu bound to vfio-pci; its IOMMU group reserves the SMMU's software
#         MSI window 0x08000000-0x080fffff; `airlock --vfio <edu>` with its
#         defaults (sandbox on, not told that window) reads it itself and
#         offers the usable IOVA ranges with the iova_ranges capability
#     L1: the patched QEMU, cross-built for arm64
#         (scripts/setup-qemu-patched-arm64.sh, bundled with its libraries),
#         TCG, virt + GICv3 ITS + virtio-iommu-pci, -chardev socket +
#         -device vfio-user-pci,chardev= on airlock's socket
#       L2: arm64 Debian 6.12 (tests/e2e/nested-patched-aarch64-l2.sh is
#           /test) runs the guest program (tests/guest) on the edu through
#           its own VFIO behind the virtio-iommu, then prints the device's
#           reserved_regions.
# Checks (one verdict each):
#   l1-host-window      L1's group reserves 0x0000000008000000 0x00000000080fffff msi
#   l1-airlock-defaults airlock was not told the host's window (its one
#                       --reserve-iova is a second window, 0x7f000000:0x1000000)
#                       and logged it as read from the host ("host msi")
#   refuse-map          L1 runs the patched QEMU with no vIOMMU against an
#                       `airlock --emulate edu --reserve-iova 0x40000000:0x100000`:
#                       guest RAM (0x40000000 on virt) is the IOVA space, so
#                       QEMU refuses the map with its own error, the device
#                       fails to realize, QEMU exits 1 (no abort)
#   l2-guest-program    every check passed (MSI-X skipped: QEMU's edu has
#                       none), MSI on L2's ITS, DMA through the virtio-iommu
#   l2-reserved-regions L2's reserved_regions cover the window, at least one
#                       line of type "reserved" (from airlock; virt's ITS
#                       doorbell page inside it is "msi": reserved/msi/reserved),
#                       and list the second window as one "reserved" line
# These are the patched QEMU's checks on arm64: the host's patched build is
# x86_64 only, so they run here, with the arm64 build, in the one L1 boot.
#
# Usage: tests/e2e/nested-patched-aarch64.sh
# Env:   AIRLOCK_LOG_DIR  logs (default logs/e2e-nested-patched-aarch64/):
#                         console.log (L1; L2's lines prefixed "l2| "),
#                         airlock.log (airlock in L1), build.log, setup.log
#        GUEST_TIMEOUT    seconds before L1's QEMU is killed (default 1800: L2
#                         reached its program 1013 s after its start on a slow
#                         2-core host)
#        L1_MEM, L2_MEM   guest RAM (default 2G, 256M)
#        L1_CPU, L2_CPU   their -cpu (default cortex-a72 both: no pointer
#                         authentication, SVE or MTE to emulate; L2 boots in
#                         less than half the time of max,pauth-impdef=on)
# Output: progress, L2's result lines, the reserved regions, verdicts, and
# last "N passed, M failed". Exit 0 iff all passed; 77 if it could not run.
set -euo pipefail
E2E_NAME=e2e-nested-patched-aarch64
E2E_ARCH=aarch64
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/patched-lib.sh"

timeout_s=${GUEST_TIMEOUT:-1800}
l1_mem=${L1_MEM:-2G}
l2_mem=${L2_MEM:-256M}
l1_cpu=${L1_CPU:-cortex-a72}
l2_cpu=${L2_CPU:-cortex-a72}
target=aarch64-unknown-linux-gnu
e2e="$E2E_REPO/tests/e2e"

section "setup"
e2e_prereqs
t0=$(now)
note "patched arm64 QEMU: scripts/setup-qemu-patched-arm64.sh (first run cross-builds it, ~7 min)"
qdir=$("$E2E_REPO/scripts/setup-qemu-patched-arm64.sh" 2>>"$LOG_DIR/setup.log") ||
    skip_exit "cross-building the patched arm64 QEMU failed (see $LOG_DIR/setup.log)"
[[ -x $qdir/qemu-system-aarch64 && -f $qdir/lib/ld-linux-aarch64.so.1 ]] ||
    skip_exit "scripts/setup-qemu-patched-arm64.sh printed '$qdir', which has no arm64 QEMU bundle"
note "patched arm64 QEMU in $qdir ($(elapsed "$t0") s; series $(sed -n 's/^series //p' "$qdir/.stamp"))"

# Static aarch64 programs for L1 (airlock) and L2 (the guest program), built
# as tests/e2e/nested-vfio-aarch64.sh and lib.sh's e2e_build build them.
t0=$(now)
: >"$LOG_DIR/build.log"
for p in airlock airlock-guest-test; do
    (cd "$E2E_REPO" && RUSTFLAGS="-C target-feature=+crt-static" \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-$E2E_REPO/scripts/aarch64-linux-gnu-gcc} \
        cargo build --release -p "$p" --target "$target") >>"$LOG_DIR/build.log" 2>&1 ||
        { tail -n 30 "$LOG_DIR/build.log"; die "building $p for $target failed (see $LOG_DIR/build.log)"; }
done
bin="$E2E_REPO/target/$target/release"
note "built static aarch64 airlock and airlock-guest-test in $(elapsed "$t0") s"

# L2: the guest program and the script that prints the reserved regions.
# ITS isolates MSIs: the default (safe) vfio_iommu_type1 in both levels.
l2_cpio=$(AIRLOCK_UNSAFE_INTERRUPTS=0 initramfs nested-patched-aarch64-l2 \
    "$e2e/nested-patched-aarch64-l2.sh:/test" "$bin/airlock-guest-test:/airlock-guest-test")
# L1: airlock, its /test, L2's kernel and initramfs, the arm64 QEMU bundle.
bundle=("$qdir/qemu-system-aarch64:/opt/qemu/bin/qemu-system-aarch64")
for f in "$qdir"/lib/*; do bundle+=("$f:/opt/qemu/lib/${f##*/}"); done
l1_cpio=$(AIRLOCK_UNSAFE_INTERRUPTS=0 initramfs nested-patched-aarch64-l1 \
    "$bin/airlock:/bin/airlock" "$e2e/nested-patched-aarch64-l1.sh:/test" "$e2e/l1-vfio.sh:/l1-vfio.sh" "$e2e/l2-boot-args.sh:/l2-boot-args.sh" \
    "$AIRLOCK_CACHE/guest/arm64/Image:/l2/Image" "$l2_cpio:/l2/initrd.cpio" "${bundle[@]}")
note "L2 initramfs $(($(stat -c %s "$l2_cpio") / 1024)) KiB; L1 initramfs $(($(stat -c %s "$l1_cpio") / 1048576)) MiB (uncompressed; holds L2's Image, initramfs and the QEMU bundle of ${#bundle[@]} files)"

# ---------------------------------------------------------------------------
section "L1 (arm64, SMMUv3 + ITS, edu) -> airlock --vfio -> patched QEMU -> L2 (virtio-iommu)"
console="$LOG_DIR/console.log"
: >"$console"
t_boot=$(now)
spawn qpid "$E2E_REPO/scripts/qemu" aarch64 -accel tcg \
    -M virt,gic-version=3,its=on,iommu=smmuv3 -cpu "$l1_cpu" -smp 2 -m "$l1_mem" \
    -nographic -nodefaults -serial stdio -no-reboot \
    -device edu \
    -kernel "$AIRLOCK_CACHE/guest/arm64/Image" -initrd "$l1_cpio" \
    -append "console=ttyAMA0 quiet panic=-1 cryptomgr.notests l2.mem=$l2_mem l2.cpu=$l2_cpu" \
    </dev/null >"$console" 2>&1
note "L1: TCG, -cpu $l1_cpu, 2 vCPUs, $l1_mem; L2: TCG inside TCG, -cpu $l2_cpu, $l2_mem; timeout $timeout_s s; console: $console"

# Stream L1's and L2's lines as they arrive; stop at L1's exit marker.
lines() { console_lines "$console" | grep -aE '^((PASS|FAIL|INFO) |[0-9]+ passed, [0-9]+ failed|l2\| |AIRLOCK-GUEST-EXIT )' || true; }
shown=0 marker="" timed_out=0 t_l2="" t_l2init=""
while :; do
    mapfile -t got < <(lines)
    for ((i = shown; i < ${#got[@]}; i++)); do
        [[ -z $t_l2 && ${got[i]} == "INFO l1: starting L2"* ]] && t_l2=$(now)
        [[ -z $t_l2init && ${got[i]} == "l2| INFO device"* ]] && t_l2init=$(now)
        note "${got[i]}"
    done
    shown=${#got[@]}
    marker=$(printf '%s\n' "${got[@]}" | grep -aE '^AIRLOCK-GUEST-EXIT [0-9]+$' | tail -n1 || true)
    [[ -n $marker ]] && break
    kill -0 "$qpid" 2>/dev/null || break
    if (($(awk -v a="$t_boot" -v b="$(now)" 'BEGIN { print int(b - a) }') >= timeout_s)); then
        timed_out=1
        break
    fi
    sleep 0.5
done
t_end=$(now)
for ((i = 0; i < 50 && ${#marker} > 0; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
stop_pid "$qpid"
mapfile -t got < <(lines)
for ((i = shown; i < ${#got[@]}; i++)); do note "${got[i]}"; done
tr -d '\r' <"$console" | sed -n 's/^airlock| //p' >"$LOG_DIR/airlock.log"
# L2's own lines, without the prefix.
l2=$(tr -d '\r' <"$console" | sed -n 's/^l2| //p')
printf '%s\n' "$l2" | result_lines >"$LOG_DIR/l2.results"
note "timings: L1 start to L2 QEMU start $([[ -n $t_l2 ]] && elapsed "$t_boot" "$t_l2" || echo -) s;" \
    "L2 QEMU start to the guest program $([[ -n $t_l2 && -n $t_l2init ]] && elapsed "$t_l2" "$t_l2init" || echo -) s;" \
    "L1 start to end $(elapsed "$t_boot" "$t_end") s"
if ((timed_out)); then
    verdict nested-run FAIL "timeout after $timeout_s s (console: $console)"
elif [[ -z $marker ]]; then
    verdict nested-run FAIL "L1 stopped without an AIRLOCK-GUEST-EXIT line (console: $console): $(tail -n 3 "$console" | tr -d '\r' | tr '\n' ' ')"
elif [[ ${marker##* } != 0 ]]; then
    verdict nested-run FAIL "L1's /test ended with $marker (its FAIL line and airlock's log are above)"
else
    verdict nested-run OK "L1 ran airlock and the L2 QEMU to the end ($marker, $(elapsed "$t_boot" "$t_end") s)"
fi

# ---------------------------------------------------------------------------
section "checks"
# l1-host-window: the window is the host's (L1's SMMU group), type msi.
l1_resv=$(printf '%s\n' "${got[@]}" | sed -nE 's/^INFO l1: L1 group [0-9]+ reserved_regions: //p')
note "L1's group reserved_regions:"
while IFS= read -r l; do [[ -n $l ]] && note "  | $l"; done <<<"$l1_resv"
if grep -qx '0x0000000008000000 0x00000000080fffff msi' <<<"$l1_resv"; then
    verdict l1-host-window OK "L1's IOMMU group of the edu reserves 0x0000000008000000-0x00000000080fffff (msi, the SMMU's software MSI window)"
else
    verdict l1-host-window FAIL "no '0x0000000008000000 0x00000000080fffff msi' in L1's group (got: ${l1_resv:-nothing})"
fi

# l1-airlock-defaults: airlock was not told the host's window (its one
# --reserve-iova is the second window); its log names it as the host's.
# (The log line lists the device's own windows; that the second one was
# offered too, l2-reserved-regions shows.)
cmdline=$(printf '%s\n' "${got[@]}" | sed -nE 's/^INFO l1: airlock cmdline: //p' | head -n1)
windows=$(grep -aE 'IOVA windows DMA must avoid' "$LOG_DIR/airlock.log" | head -n1 | sed -E 's/.*(IOVA windows)/\1/' || true)
note "airlock in L1: $cmdline"
note "airlock's log: ${windows:-<no IOVA windows line>}"
if [[ $cmdline == */bin/airlock*--vfio* && $cmdline != *0x8000000* && $windows == *"0x8000000-0x80fffff (host msi"* ]]; then
    verdict l1-airlock-defaults OK "airlock --vfio, not told the host's window: it read 0x8000000-0x80fffff from L1's group (host msi)"
else
    verdict l1-airlock-defaults FAIL "cmdline '${cmdline:-none}', windows '${windows:-none}'"
fi

# refuse-map: no vIOMMU, a window over guest RAM: QEMU refused the map
# with its own error, exited 1, did not abort.
rc_refuse=$(printf '%s\n' "${got[@]}" | sed -nE 's/^INFO l1: refuse-map: QEMU exit ([0-9]+)$/\1/p' | head -n1)
tr -d '\r' <"$console" | sed -n 's/^refuse| //p' >"$LOG_DIR/refuse-map.log.txt"
msg=$(grep -a 'outside the IOVA ranges' "$LOG_DIR/refuse-map.log.txt" | head -n1 || true)
note "refuse-map: airlock --emulate edu --reserve-iova 0x40000000:0x100000 in L1, the patched QEMU without a vIOMMU: exit ${rc_refuse:-none}"
note "  | ${msg:-<no 'outside the IOVA ranges' line>}"
if [[ $rc_refuse == 1 && -n $msg ]] && ! aborted "$LOG_DIR/refuse-map.log.txt"; then
    verdict refuse-map OK "the patched arm64 QEMU refused to map guest RAM over the window before it reached airlock; the device failed to realize, QEMU exited 1 (no abort)"
else
    verdict refuse-map FAIL "exit ${rc_refuse:-none}, message '${msg:-none}' (see $LOG_DIR/refuse-map.log.txt)"
fi

# l2-guest-program: all checks passed, MSI on the ITS, DMA behind virtio-iommu.
sum=$(summary_line "$LOG_DIR/l2.results" || true)
l2rc=$(printf '%s\n' "$l2" | sed -nE 's/^AIRLOCK-GUEST-EXIT ([0-9]+)$/\1/p' | tail -n1)
iommu=$(printf '%s\n' "$l2" | sed -nE 's/^AIRLOCK-IOMMU (.*)/\1/p' | head -n1)
container=$(sed -nE 's/^INFO (iommu group .*)/\1/p' "$LOG_DIR/l2.results" | head -n1)
dma=$(sed -nE 's/^INFO (DMA buffers mapped at .*)/\1/p' "$LOG_DIR/l2.results" | head -n1)
msi=$(sed -nE 's/^INFO interrupts msi: (.*vfio-msi.*)$/\1/p' "$LOG_DIR/l2.results" | head -n1)
maps=$(grep -aoE 'session ended after .*DMA maps' "$LOG_DIR/airlock.log" | head -n1 | grep -oE '[0-9]+ DMA maps' || true)
note "L2: edu, IOMMU, driver: ${iommu:-?}; ${container:-?}; ${dma:-?}"
note "L2: MSI: ${msi:-none}; airlock in L1 served ${maps:-? DMA maps}"
g_ok=1 g_detail=""
if [[ -z $sum ]]; then
    g_ok=0 g_detail+="no 'N passed, M failed' line from L2; "
elif [[ $(count failed "$sum") != 0 || $(count passed "$sum") == 0 || ${l2rc:-1} != 0 ]]; then
    g_ok=0 g_detail+="L2: $sum (exit ${l2rc:-none}); "
fi
[[ $(awk '{ print $3 }' <<<"$iommu") == virtio_iommu ]] ||
    { g_ok=0 g_detail+="the edu's IOMMU in L2 is not the virtio-iommu (${iommu:-none}); "; }
[[ -n $dma ]] || { g_ok=0 g_detail+="no DMA mapping line; "; }
[[ $msi == *ITS-PCI-MSI-* ]] || { g_ok=0 g_detail+="MSI not on L2's ITS (${msi:-none}); "; }
if ((g_ok)); then
    verdict l2-guest-program OK "L2: $sum; DMA through L2's virtio-iommu ($dma) to L1's SMMUv3 via airlock; MSI on L2's ITS"
else
    verdict l2-guest-program FAIL "$g_detail"
fi

# l2-reserved-regions: the window, from L1's group through airlock and the
# patched QEMU, reserved in L2 (as tests/e2e/qemu-patched-aarch64.sh checks it).
group=$(printf '%s\n' "$l2" | sed -nE 's/^AIRLOCK-RESV-GROUP (.*)/\1/p' | head -n1)
mapfile -t resv < <(printf '%s\n' "$l2" | sed -nE 's/^AIRLOCK-RESV (0x[0-9a-f]+ 0x[0-9a-f]+ .*)$/\1/p')
printf '%s\n' "${resv[@]}" >"$LOG_DIR/l2-reserved-regions.txt"
note "L2: ${group:-?} (device, iommu group): reserved_regions:"
for l in "${resv[@]}"; do note "  | $l"; done
cover=$(resv_covered 0x8000000 0x80fffff)
control=$(printf '%s\n' "${resv[@]}" | grep -E '^0x000000007f000000 0x000000007fffffff reserved$' || true)
note "second window: ${control:-<not listed>}"
if [[ ${cover% *} == covered && ${cover#* } -ge 1 && -n $control ]]; then
    verdict l2-reserved-regions OK "L2's group lists the host's window 0x0000000008000000-0x00000000080fffff as reserved ($cover 'reserved' region(s) around virt's ITS doorbell page) and the second window 0x7f000000-0x7fffffff as one line of its own"
else
    verdict l2-reserved-regions FAIL "host window: $cover; second window: ${control:-not listed} (lines in $LOG_DIR/l2-reserved-regions.txt)"
fi

if ((failed)) && [[ -s $LOG_DIR/airlock.log ]]; then
    echo "airlock's log in L1 ($LOG_DIR/airlock.log):"
    sed 's/^/   | /' "$LOG_DIR/airlock.log" | tail -n 30
fi
e2e_summary
