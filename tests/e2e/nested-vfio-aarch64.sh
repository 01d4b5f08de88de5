#!/usr/bin/env bash
# tests/e2e/nested-vfio-aarch64.sh: `airlock --vfio` on real VFIO, nested, arm64.
# The host has no VFIO, so this boots an aarch64 L1 guest under TCG
# (virt, GICv3 with an ITS, SMMUv3) with QEMU's edu. Inside L1
# (tests/e2e/nested-vfio-guest.sh as /test) the edu is bound to vfio-pci (its
# iommu_group appears only then on arm64), its group's reserved IOVA regions
# are printed (the SMMU's software MSI window 0x08000000-0x080fffff), `airlock
# --vfio <edu>` (sandbox on, the default) serves it and airlock-probe
# (tests/probe) checks it over vfio-user: registers, the BAR0 mmap fast path,
# DMA through the SMMU, MSI eventfds handed to VFIO (with the /proc/interrupts
# lines while MSI is on: ITS-MSI), unmapped DMA blocked, DMA_MAP into the MSI
# window refused (--msi-window), quiesce on disconnect.
#
# Usage: tests/e2e/nested-vfio-aarch64.sh [PROBE ARG...]   (e.g. --skip msi)
# Env:   AIRLOCK_LOG_DIR  logs (default logs/e2e-nested-aarch64/): console.log,
#                         airlock.log (from L1), build.log, setup.log
#        GUEST_TIMEOUT    seconds before QEMU is killed (default 600)
#        GUEST_SMP        L1 vCPUs (default 2: airlock and the probe run side by side)
#        NESTED_AIRLOCK   a static aarch64 airlock binary to test instead of this tree's build
#        NESTED_AIRLOCK_ARGS  extra airlock arguments, space-separated (e.g. --mediate-bars)
#        MSI_WINDOW       the probe's --msi-window (default 0x8000000:0x100000; "" = no check)
# Output: setup notes, the probe's PASS/FAIL/SKIP/INFO lines, timings, and last
# the probe's "N passed, M failed[, K skipped]". Exit 0 iff the probe passed;
# 124 on timeout; 77 if it could not run (no cargo, no aarch64 cross toolchain).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
. "$repo/scripts/lib.sh"

t_start=$EPOCHREALTIME
elapsed() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }
LOG_DIR=${AIRLOCK_LOG_DIR:-$repo/logs/e2e-nested-aarch64}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
timeout_s=${GUEST_TIMEOUT:-600}
smp=${GUEST_SMP:-2}
target=aarch64-unknown-linux-gnu
linker=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-$repo/scripts/aarch64-linux-gnu-gcc}
msi_window=${MSI_WINDOW-0x8000000:0x100000}
work=$(mktemp -d "${TMPDIR:-/tmp}/airlock-nested-a64.XXXXXX")
qpid=""

stop_qemu() {
    [[ -n $qpid ]] || return 0
    local i
    kill -TERM -- "-$qpid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$qpid" 2>/dev/null || true
    { wait "$qpid"; } 2>/dev/null || true
    qpid=""
}
trap 'stop_qemu; rm -rf "$work"' EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM
note() { printf '   %s\n' "$*"; }

# --- setup and build ----------------------------------------------------------
command -v cargo >/dev/null || { echo "SKIP nested-vfio-aarch64: cargo not found"; exit 77; }
: >"$LOG_DIR/setup.log"
# The cross toolchain: scripts/setup-cross.sh (rustup target + the build
# root's cross gcc, run by scripts/aarch64-linux-gnu-gcc).
if ! "$repo/scripts/setup-cross.sh" aarch64 >>"$LOG_DIR/setup.log" 2>&1 ||
    [[ ! -d "$(rustc --print sysroot)/lib/rustlib/$target" ]]; then
    tail -n 5 "$LOG_DIR/setup.log"
    echo "SKIP nested-vfio-aarch64: no $target cross toolchain ($linker + rust-std; see $LOG_DIR/setup.log)"
    exit 77
fi
[[ -f $AIRLOCK_CACHE/qemu-root.stamp ]] || "$repo/scripts/setup-qemu.sh" >>"$LOG_DIR/setup.log" 2>&1 ||
    die "QEMU setup failed (see $LOG_DIR/setup.log)"
[[ -f $AIRLOCK_CACHE/guest/.stamp ]] || "$repo/scripts/setup-guest.sh" >>"$LOG_DIR/setup.log" 2>&1 ||
    die "guest kernel setup failed (see $LOG_DIR/setup.log)"
t0=$EPOCHREALTIME
(cd "$repo" && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=$linker \
    RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release -p airlock -p airlock-probe -p airlock-blackbox-fuzz --target "$target") >"$LOG_DIR/build.log" 2>&1 ||
    { tail -n 30 "$LOG_DIR/build.log"; die "static aarch64 build failed (see $LOG_DIR/build.log)"; }
bin="$repo/target/$target/release"
note "built static aarch64 airlock and airlock-probe in $(elapsed "$t0") s"

cpio="$work/nested-vfio.cpio"
# The ITS isolates MSIs: no allow_unsafe_interrupts (mkinitramfs' arm64 default).
AIRLOCK_UNSAFE_INTERRUPTS=0 "$repo/scripts/mkinitramfs" aarch64 "$cpio" \
    "${NESTED_AIRLOCK:-$bin/airlock}:/bin/airlock" "$bin/airlock-probe:/bin/airlock-probe" "$bin/airlock-blackbox-fuzz:/bin/airlock-blackbox-fuzz" \
    "$repo/tests/e2e/nested-vfio-guest.sh:/test" >>"$LOG_DIR/build.log" 2>&1 ||
    die "mkinitramfs failed (see $LOG_DIR/build.log)"

# Probe arguments travel on the kernel command line (airlock.args=a,b).
pargs=()
[[ -n $msi_window ]] && pargs+=("--msi-window=$msi_window")
pargs+=("$@")
args=$(IFS=,; echo "${pargs[*]}")
[[ $args != *[[:space:]]* ]] || die "probe arguments may not contain spaces"
extra=$(echo ${NESTED_AIRLOCK_ARGS:-} | tr ' ' ,)

# --- boot L1 ------------------------------------------------------------------
console="$LOG_DIR/console.log"
: >"$console"
t_boot=$EPOCHREALTIME
setsid "$repo/scripts/qemu" aarch64 -accel tcg \
    -M virt,gic-version=3,its=on,iommu=smmuv3 -cpu max,pauth-impdef=on -smp "$smp" -m 1G \
    -nographic -nodefaults -serial stdio -no-reboot \
    -device edu \
    -kernel "$AIRLOCK_CACHE/guest/arm64/Image" -initrd "$cpio" \
    -append "console=ttyAMA0 quiet panic=-1 cryptomgr.notests${args:+ airlock.args=$args}${extra:+ airlock.extra=$extra}" \
    </dev/null >"$console" 2>&1 &
qpid=$!
note "L1: virt + GICv3 ITS + SMMUv3 + edu, TCG (-cpu max,pauth-impdef=on), $smp vCPUs, 1 GiB; console: $console"

# Stream result lines as they arrive; stop at the exit marker, QEMU's exit or the timeout.
shown=0 t_test="" marker="" timed_out=0
lines() { console_lines "$console" | grep -aE '^((PASS|FAIL|SKIP|INFO) |[0-9]+ passed, [0-9]+ failed)' || true; }
while :; do
    mapfile -t got < <(lines)
    for ((i = shown; i < ${#got[@]}; i++)); do
        [[ -z $t_test && ${got[i]} == "INFO nested:"* ]] && t_test=$EPOCHREALTIME
        printf '   %s\n' "${got[i]}"
    done
    shown=${#got[@]}
    marker=$(tr -d '\r' <"$console" | grep -aE '^AIRLOCK-GUEST-EXIT [0-9]+$' | tail -n1 || true)
    [[ -n $marker ]] && break
    kill -0 "$qpid" 2>/dev/null || break
    if ((${EPOCHREALTIME%[.,]*} - ${t_boot%[.,]*} >= timeout_s)); then
        timed_out=1
        break
    fi
    sleep 0.2
done
t_end=$EPOCHREALTIME
# After the marker the guest powers off by itself; give it a moment.
for ((i = 0; i < 50 && ${#marker} > 0; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
stop_qemu
mapfile -t got < <(lines)
for ((i = shown; i < ${#got[@]}; i++)); do printf '   %s\n' "${got[i]}"; done
tr -d '\r' <"$console" | sed -n 's/^airlock| //p' >"$LOG_DIR/airlock.log"
# What airlock said about reserved IOVA windows and refused maps (who refused:
# airlock itself, or the kernel's VFIO_IOMMU_MAP_DMA passed through).
grep -aiE 'reserved|window|DMA_MAP refused' "$LOG_DIR/airlock.log" | head -n 6 |
    sed -E 's/^[0-9T:.-]+Z +//; s/^/   INFO airlock log: /' || true

summary=$(printf '%s\n' "${got[@]}" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -n1 || true)
rc=1
if [[ -n $marker ]]; then
    rc=${marker##* }
elif ((timed_out)); then
    rc=124
    echo "FAIL nested: timeout after $timeout_s s (console: $console)"
else
    echo "FAIL nested: QEMU stopped without an AIRLOCK-GUEST-EXIT line (console: $console)"
    tail -n 5 "$console" | sed 's/^/   | /'
fi
if [[ $rc != 0 && -s $LOG_DIR/airlock.log ]]; then
    echo "airlock's log in L1 ($LOG_DIR/airlock.log):"
    sed 's/^/   | /' "$LOG_DIR/airlock.log" | tail -n 40
fi
echo "INFO timings: L1 boot to /test $([[ -n $t_test ]] && elapsed "$t_boot" "$t_test" || echo -) s;" \
    "QEMU start to guest end $(elapsed "$t_boot" "$t_end") s; whole script $(elapsed "$t_start") s"
if [[ -z $summary || -z $marker ]]; then
    # No probe summary (setup failure, timeout): count what was seen, plus this failure.
    p=$(printf '%s\n' "${got[@]}" | grep -c '^PASS ' || true)
    f=$(printf '%s\n' "${got[@]}" | grep -c '^FAIL ' || true)
    summary="$p passed, $((f + 1)) failed"
    [[ $rc != 0 ]] || rc=1
fi
echo "$summary"
exit "$rc"
