# shellcheck shell=bash
# Helpers for the end-to-end scripts that need airlock's patched QEMU
# (qemu-patches/, built by scripts/setup-qemu-patched.sh). Source it after
# tests/e2e/lib.sh; do not run it.

E2E_DIR="$E2E_REPO/tests/e2e"
QMP_STEPS="$E2E_DIR/qmp-steps.py"
FAKE_SERVER="$E2E_DIR/fake-vfio-user-server.py"

# patched_prereqs: e2e_prereqs, then the patched QEMU (built on first use,
# ~6 min on 2 cores; cached by the series' hash). Exports
# AIRLOCK_QEMU_BIN_DIR so scripts/qemu and scripts/boot-guest run it.
patched_prereqs() {
    local t0 dir
    e2e_prereqs
    t0=$(now)
    note "patched QEMU: scripts/setup-qemu-patched.sh (first run builds it, ~6 min)"
    dir=$("$E2E_REPO/scripts/setup-qemu-patched.sh" 2>>"$LOG_DIR/setup.log") ||
        skip_exit "building the patched QEMU failed (see $LOG_DIR/setup.log)"
    [[ -x $dir/qemu-system-x86_64 ]] ||
        skip_exit "scripts/setup-qemu-patched.sh printed '$dir', which has no QEMU binaries"
    export AIRLOCK_QEMU_BIN_DIR=${E2E_QEMU_BIN_DIR_OVERRIDE:-$dir}
    note "patched QEMU in $dir ($(elapsed "$t0") s): $("$dir/qemu-system-x86_64" -version | head -n1)"
}

# qmp_steps SOCKET STEP...: see tests/e2e/qmp-steps.py.
qmp_steps() { python3 "$QMP_STEPS" "$@"; }

# qmp_time LINES COMMAND: the elapsed seconds of COMMAND's line in LINES.
qmp_time() { sed -nE "s/^qmp $2 ([0-9.]+) .*/\\1/p" <<<"$1" | head -n1; }
# qmp_reply LINES COMMAND: the reply JSON of COMMAND's line in LINES.
qmp_reply() { sed -nE "s/^qmp $2 [0-9.]+ (.*)/\\1/p" <<<"$1" | head -n1; }

# aborted FILE: true if QEMU's output in FILE shows an assertion or abort.
aborted() { grep -qaE 'Assertion|Aborted|core dumped|hw_error|qemu: hardware error' "$1"; }

# resv_covered START END: walk the IOVA window START-END in address order
# over the reserved regions in the array resv ("0xS 0xE type" lines of an
# IOMMU group's reserved_regions); prints "covered N" (N regions of type
# reserved on the way) or "gap-at-0xX N".
resv_covered() {
    local at=$1 hi=$2 nres=0 moved=1 l s e t
    while ((moved && at <= hi)); do
        moved=0
        for l in "${resv[@]}"; do
            read -r s e t <<<"$l"
            if ((s <= at && e >= at)); then
                [[ $t == reserved ]] && nres=$((nres + 1))
                at=$((e + 1)) moved=1
            fi
        done
    done
    if ((at > hi)); then echo "covered $nres"; else printf 'gap-at-0x%x %d\n' "$at" "$nres"; fi
}
