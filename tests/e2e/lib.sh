# shellcheck shell=bash
# Shared helpers for the end-to-end scripts (tests/e2e/*.sh) and scripts/demo.
# Source it after setting E2E_NAME (names the default log directory); do not run it.
#
#   E2E_ARCH          guest architecture: x86_64 (default) or aarch64 (set it
#                     before sourcing; the host airlock is always x86_64)
#   AIRLOCK_LOG_DIR   where logs go (default: <repo>/logs/$E2E_NAME)
#   AIRLOCK_CACHE     downloads (QEMU root, guest kernels), see scripts/lib.sh
#
# Exit code 77 from an e2e script means "could not run" (SKIP).

E2E_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
. "$E2E_REPO/scripts/lib.sh"

E2E_NAME=${E2E_NAME:-e2e}
LOG_DIR=${AIRLOCK_LOG_DIR:-$E2E_REPO/logs/$E2E_NAME}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
# Sockets live in a short private directory (unix socket paths max 107 bytes).
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/airlock-e2e.XXXXXX")
AIRLOCK_BIN="$E2E_REPO/target/release/airlock"
E2E_ARCH=${E2E_ARCH:-x86_64}
GUEST_TARGET=$E2E_ARCH-unknown-linux-gnu
GUEST_BIN="$E2E_REPO/target/$GUEST_TARGET/release/airlock-guest-test"
IMG_DIR="$E2E_REPO/target/airlock-e2e"
mkdir -p "$IMG_DIR" # scripts write their guest /test into it before any initramfs
export NO_COLOR=1 # plain airlock logs

if [[ -t 1 ]]; then
    C_G=$'\e[32m' C_R=$'\e[31m' C_Y=$'\e[33m' C_B=$'\e[1m' C_0=$'\e[0m'
else
    C_G="" C_R="" C_Y="" C_B="" C_0=""
fi

section() { printf '\n%s== %s ==%s\n' "$C_B" "$*" "$C_0"; }
note() { printf '   %s\n' "$*"; }
skip_exit() { printf '%sSKIP %s: %s%s\n' "$C_Y" "$E2E_NAME" "$*" "$C_0"; exit 77; }

# now: seconds since the epoch, microsecond resolution.
now() { printf '%s\n' "${EPOCHREALTIME/,/.}"; }
# elapsed T0 [T1]: seconds between two `now`s, 2 decimals.
elapsed() { awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN { printf "%.2f", b - a }'; }

# --- verdicts ----------------------------------------------------------------
# Each scenario ends in one verdict; the script ends with e2e_summary, whose
# last line is "N passed, M failed" and whose status is 0 iff none failed.
t_start=$(now)
passed=0 failed=0
verdicts=()
verdict() { # verdict NAME OK|FAIL DETAIL
    if [[ $2 == OK ]]; then
        passed=$((passed + 1))
        verdicts+=("${C_G}PASS${C_0} $1: $3")
    else
        failed=$((failed + 1))
        verdicts+=("${C_R}FAIL${C_0} $1: $3")
    fi
    printf '%s %s: %s\n' "$([[ $2 == OK ]] && echo "${C_G}=> PASS${C_0}" || echo "${C_R}=> FAIL${C_0}")" "$1" "$3"
}
e2e_summary() {
    section "summary ($(elapsed "$t_start") s)"
    local v
    for v in "${verdicts[@]}"; do printf '   %s\n' "$v"; done
    note "logs: $LOG_DIR"
    printf '%d passed, %d failed\n' "$passed" "$failed"
    ((failed == 0))
}

# --- processes ---------------------------------------------------------------
# Every background process runs in its own process group (setsid) so cleanup
# can end it with all its children (boot-guest -> timeout -> QEMU).
E2E_PIDS=()
spawn() { # spawn VAR CMD...: start CMD in the background, its pid into VAR
    local -n _pid=$1
    shift
    setsid "$@" &
    _pid=$!
    E2E_PIDS+=("$_pid")
}
stop_pid() { # stop_pid PID: TERM its group, then KILL after 3 s
    local p=$1 i
    if ! kill -0 "$p" 2>/dev/null; then
        # Its group may outlive it: a live upgrade's successor runs on.
        kill -TERM -- "-$p" 2>/dev/null || true
        { wait "$p"; } 2>/dev/null || true
        return 0
    fi
    kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true
    { wait "$p"; } 2>/dev/null || true
    return 0
}
e2e_cleanup() {
    local p
    for p in "${E2E_PIDS[@]}"; do stop_pid "$p"; done
    E2E_PIDS=()
    rm -rf "$RUN_DIR"
}
trap 'e2e_cleanup' EXIT
# A command failing outside the checks ends a script (set -e): say where,
# as a failing verdict, instead of stopping without one.
e2e_stopped() { # e2e_stopped LINE COMMAND STATUS
    printf '=> FAIL script: %s stopped at line %s: `%s` exited %s (a bug in the test script, not a verdict on airlock)\n' \
        "${0##*/}" "$1" "$2" "$3"
}
trap 'e2e_stopped "$LINENO" "$BASH_COMMAND" "$?"' ERR
trap 'echo; echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

# --- building ----------------------------------------------------------------
# e2e_prereqs: make sure the host can build and boot guests; SKIP (exit 77)
# with the reason otherwise. First run downloads QEMU and guest kernels.
e2e_prereqs() {
    command -v cargo >/dev/null || skip_exit "cargo not found (install a Rust toolchain)"
    command -v setsid >/dev/null || skip_exit "setsid not found (util-linux)"
    if [[ ! -f "$AIRLOCK_CACHE/qemu-root.stamp" || ! -f "$AIRLOCK_CACHE/guest/.stamp" ]]; then
        [[ $(id -u) == 0 ]] || skip_exit "QEMU/guest kernels not in $AIRLOCK_CACHE and not root (run scripts/setup-qemu.sh and scripts/setup-guest.sh as root)"
        note "first run: fetching QEMU 11.1 and Debian guest kernels into $AIRLOCK_CACHE (~0.9 GB, ~1 min)"
    fi
    "$E2E_REPO/scripts/setup-qemu.sh" >>"$LOG_DIR/setup.log" 2>&1 ||
        skip_exit "QEMU setup failed (see $LOG_DIR/setup.log)"
    "$E2E_REPO/scripts/setup-guest.sh" >>"$LOG_DIR/setup.log" 2>&1 ||
        skip_exit "guest kernel setup failed (see $LOG_DIR/setup.log)"
    command -v python3 >/dev/null || need_host_pkgs python3:python3-minimal >>"$LOG_DIR/setup.log" 2>&1 ||
        skip_exit "python3 missing (for QMP)"
    if [[ $E2E_ARCH != x86_64 ]]; then
        "$E2E_REPO/scripts/setup-cross.sh" "$E2E_ARCH" >>"$LOG_DIR/setup.log" 2>&1 ||
            skip_exit "no $E2E_ARCH cross build (scripts/setup-cross.sh failed; see $LOG_DIR/setup.log)"
    fi
}

# e2e_build: airlock (release) and the static guest test program.
e2e_build() {
    local t0
    t0=$(now)
    : >"$LOG_DIR/build.log"
    (cd "$E2E_REPO" && cargo build --release -p airlock -p airlock-probe) >>"$LOG_DIR/build.log" 2>&1 ||
        { tail -n 30 "$LOG_DIR/build.log"; die "building airlock failed (see $LOG_DIR/build.log)"; }
    # Cross targets link with Debian's cross gcc (scripts/setup-cross.sh).
    (cd "$E2E_REPO" && RUSTFLAGS="-C target-feature=+crt-static" \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-$E2E_REPO/scripts/aarch64-linux-gnu-gcc} \
        cargo build --release -p airlock-guest-test --target "$GUEST_TARGET") >>"$LOG_DIR/build.log" 2>&1 ||
        { tail -n 30 "$LOG_DIR/build.log"; die "building the guest program failed (see $LOG_DIR/build.log)"; }
    note "built airlock and airlock-guest-test in $(elapsed "$t0") s"
}

# initramfs NAME SRC:DST...: build $IMG_DIR/NAME.cpio ($E2E_ARCH) unless it is
# newer than every source; prints its path. mkinitramfs reads env knobs
# (AIRLOCK_UNSAFE_INTERRUPTS...) that the freshness check cannot see: give
# each variant its own NAME.
initramfs() {
    local name=$1 out="$IMG_DIR/$1.cpio" spec fresh=1
    shift
    mkdir -p "$IMG_DIR"
    [[ -f $out && $out -nt "$E2E_REPO/scripts/mkinitramfs" ]] || fresh=0
    for spec in "$@"; do [[ $fresh == 1 && $out -nt ${spec%%:*} ]] || fresh=0; done
    if [[ $fresh == 0 ]]; then
        "$E2E_REPO/scripts/mkinitramfs" "$E2E_ARCH" "$out" "$@" >>"$LOG_DIR/build.log" 2>&1 ||
            die "mkinitramfs $name failed (see $LOG_DIR/build.log)"
    fi
    printf '%s\n' "$out"
}

# --- airlock -------------------------------------------------------------------
# start_airlock VAR SOCKET LOG: start `airlock --emulate edu` on SOCKET, pid into
# VAR; waits until the socket exists.
start_airlock() {
    local -n _apid=$1
    local sock=$2 log=$3 i
    spawn _apid "$AIRLOCK_BIN" --socket-path "$sock" --emulate edu 2>"$log" </dev/null
    disown "$_apid" # no "Killed" notice from bash when a test kills it on purpose
    for ((i = 0; i < 100; i++)); do
        [[ -S $sock ]] && return 0
        kill -0 "$_apid" 2>/dev/null || break
        sleep 0.05
    done
    cat "$log" >&2
    die "airlock did not start listening on $sock (log: $log)"
}

vfio_user_dev() { # vfio_user_dev SOCKET: the -device argument for QEMU
    printf '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"%s"}}' "$1"
}

# --- guests --------------------------------------------------------------------
# Result lines as the guest program prints them (CRs and console noise stripped).
result_lines() { # result_lines [FILE]
    sed -nE 's/\r$//; s/.*((PASS|FAIL|SKIP|INFO) .*)$/\1/p; /^[0-9]+ passed, [0-9]+ failed(, [0-9]+ skipped)?$/p' ${1:+"$1"}
}
color_line() {
    case "$1" in
        PASS*) printf '   %s%s%s\n' "$C_G" "$1" "$C_0" ;;
        FAIL*) printf '   %s%s%s\n' "$C_R" "$1" "$C_0" ;;
        SKIP*) printf '   %s%s%s\n' "$C_Y" "$1" "$C_0" ;;
        [0-9]*) printf '   %s%s%s\n' "$C_B" "$1" "$C_0" ;;
        *) printf '   %s\n' "$1" ;;
    esac
}

# start_guest VAR NAME CPIO [qemu args...]: boot the guest in the background
# (scripts/boot-guest $E2E_ARCH: q35 or virt, TCG, shared memfd RAM,
# virtio-iommu); console and QEMU's stderr go to $LOG_DIR/NAME.console.log.
# Sets GUEST_T0.
start_guest() {
    local -n _gpid=$1
    local name=$2 cpio=$3
    shift 3
    GUEST_LOG="$LOG_DIR/$name.console.log"
    : >"$GUEST_LOG"
    GUEST_T0=$(now)
    spawn _gpid env GUEST_TIMEOUT="${GUEST_TIMEOUT:-120}" \
        "$E2E_REPO/scripts/boot-guest" "$E2E_ARCH" "$cpio" "$@" </dev/null >"$GUEST_LOG" 2>&1
}

# run_guest NAME CPIO [qemu args...]: boot, echo result lines as they arrive,
# wait for the end. Sets GUEST_RC, GUEST_BOOT_S (QEMU start to the first
# result line, "-" if none), GUEST_TOTAL_S, GUEST_LOG, GUEST_RESULTS (file).
run_guest() {
    local name=$1 pid n shown=0 first="" line lines=() i
    start_guest pid "$@"
    GUEST_RESULTS="$LOG_DIR/$name.results"
    while :; do
        local running=0
        kill -0 "$pid" 2>/dev/null && running=1
        n=$(wc -l <"$GUEST_LOG")
        mapfile -t lines < <(head -n "$n" "$GUEST_LOG" | result_lines)
        if ((${#lines[@]} > 0)) && [[ -z $first ]]; then first=$(now); fi
        for ((i = shown; i < ${#lines[@]}; i++)); do color_line "${lines[i]}"; done
        shown=${#lines[@]}
        ((running)) || break
        sleep 0.05
    done
    GUEST_RC=0
    wait "$pid" || GUEST_RC=$?
    GUEST_TOTAL_S=$(elapsed "$GUEST_T0")
    result_lines "$GUEST_LOG" >"$GUEST_RESULTS"
    mapfile -t lines <"$GUEST_RESULTS"
    for ((i = shown; i < ${#lines[@]}; i++)); do color_line "${lines[i]}"; done
    if [[ -n $first ]]; then GUEST_BOOT_S=$(elapsed "$GUEST_T0" "$first"); else GUEST_BOOT_S="-"; fi
}

# summary_line RESULTS: the guest's final "N passed, M failed[, K skipped]".
summary_line() { grep -E '^[0-9]+ passed, [0-9]+ failed' "$1" | tail -n1; }
# count WHAT LINE: the number before "passed"/"failed"/"skipped" in LINE (0 if absent).
count() { local re="([0-9]+) $1"; [[ $2 =~ $re ]] && echo "${BASH_REMATCH[1]}" || echo 0; }
# mmio_ns RESULTS: guest-measured ns per BAR0 read.
mmio_ns() { sed -nE 's/^INFO mmio-read-ns ([0-9]+).*/\1/p' "$1" | tail -n1; }

# wait_for FILE REGEX SECONDS: wait until a complete line of FILE matches
# REGEX. Only lines that end in a newline count: a guest's console line
# reaches the file a byte at a time, and a match on its first part lets a
# caller read it half written (a "HOTPLUG-PASS 7 16 passed, 0 fai" counts
# as a failed cycle: the likely cause of one in CI).
wait_for() {
    local i n
    for ((i = 0; i < $3 * 20; i++)); do
        n=$(wc -l 2>/dev/null <"$1") || n=0
        # Not a pipe: under pipefail, grep -q ending early fails head.
        grep -qaE "$2" < <(head -n "$n" "$1" 2>/dev/null) && return 0
        sleep 0.05
    done
    return 1
}

# qmp SOCKET COMMAND [ARGS-JSON]: run one QMP command, print its JSON reply.
qmp() {
    python3 - "$@" <<'EOF'
import json, socket, sys
path, cmd = sys.argv[1], sys.argv[2]
args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(path)
f = s.makefile("rw")
def send(c, a=None):
    m = {"execute": c}
    if a is not None:
        m["arguments"] = a
    f.write(json.dumps(m) + "\n"); f.flush()
    while True:
        line = f.readline()
        if not line:
            return {"error": "connection closed"}
        r = json.loads(line)
        if "return" in r or "error" in r:
            return r
json.loads(f.readline())  # greeting
send("qmp_capabilities")
print(json.dumps(send(cmd, args)))
EOF
}
