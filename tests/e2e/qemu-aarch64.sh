#!/usr/bin/env bash
# tests/e2e/qemu-aarch64.sh: airlock end to end with stock QEMU's aarch64 virt
# machine (TCG, -cpu max, shared memfd RAM, virtio-iommu). The host airlock is
# the x86_64 build; the guest and its test program (tests/guest, static) are
# aarch64. Each scenario binds airlock's edu to the guest's vfio-pci over
# -device vfio-user-pci and must pass every check; the guest program prints
# the /proc/interrupts lines of VFIO's MSI and MSI-X vectors while they are
# enabled, which name the guest's MSI controller:
#   a. GICv3 + ITS (gic-version=3,its=on): the vectors must show on the ITS
#      (ITS-PCI-MSI-<bdf> / ITS-PCI-MSIX-<bdf>)
#   b. GICv3 + a GICv2m frame (its=off,msi=gicv2m): on GICv2m
#      (GICv2m-PCI-MSI-<bdf> / ...). QEMU's GICv3 still advertises LPIs without
#      an ITS, and Linux then never probes the v2m frame ("ITS: No ITS
#      available, not enabling LPIs"; no MSI at all): the guest needs
#      irqchip.gicv3_nolpi=1.
#   c. GICv2 + GICv2m (gic-version=2: QEMU adds the v2m frame by default)
#   GICv2m cannot isolate MSIs per device (no DeviceID: any device that can
#   DMA to the frame can raise any SPI), so the guest's vfio_iommu_type1
#   refuses MSIs on it (VFIO_DEVICE_SET_IRQS fails) unless
#   allow_unsafe_interrupts=1: b and c boot an initramfs that sets it; a's
#   does not.
#   d. negative: b's machine with a's (safe) initramfs: the guest's VFIO must
#      refuse the container (VFIO_SET_IOMMU: EPERM), as it does not on the ITS.
# Logs: $AIRLOCK_LOG_DIR (default logs/e2e-aarch64/; summary.txt has the
# timings and the /proc/interrupts lines). Last line: "N passed,
# M failed" over the scenarios. Exit 0 iff all passed; 77 if it could not run.
set -euo pipefail
E2E_NAME=e2e-aarch64
E2E_ARCH=aarch64
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

timings=() irq_report=()

section "setup"
e2e_prereqs
e2e_build
# ITS isolates MSIs: the default (safe) vfio_iommu_type1 is enough.
its_cpio=$(AIRLOCK_UNSAFE_INTERRUPTS=0 initramfs aarch64-guest-test "$GUEST_BIN:/test")
# GICv2m does not: VFIO_SET_IOMMU fails (EPERM) without allow_unsafe_interrupts.
v2m_cpio=$(AIRLOCK_UNSAFE_INTERRUPTS=1 initramfs aarch64-guest-test-unsafe-irqs "$GUEST_BIN:/test")
note "initramfs: $its_cpio, $v2m_cpio"
note "logs: $LOG_DIR"
rm -f "$LOG_DIR"/*.console.log "$LOG_DIR"/*.results "$LOG_DIR"/airlock*.log

# scenario NAME CPIO CHIP [extra qemu args...]: airlock + guest; checks the
# guest's summary and that the MSI vector shows as CHIP-PCI-MSI-<bdf> and the
# 4 MSI-X vectors as CHIP-PCI-MSIX-<bdf> in the guest's /proc/interrupts.
scenario() {
    local name=$1 cpio=$2 chip=$3 sock apid sum msi msix nmsix ok=1 detail="" t0
    shift 3
    sock="$RUN_DIR/$name.sock"
    t0=$(now)
    start_airlock apid "$sock" "$LOG_DIR/airlock-$name.log"
    run_guest "$name" "$cpio" -device "$(vfio_user_dev "$sock")" "$@"
    stop_pid "$apid"
    timings+=("$(printf '%-14s boot (QEMU start->1st result) %6s s, QEMU start->guest exit %6s s' \
        "$name" "$GUEST_BOOT_S" "$GUEST_TOTAL_S")")
    sum=$(summary_line "$GUEST_RESULTS" || true)
    msi=$(sed -nE 's/^INFO interrupts msi: (.*vfio-msi.*)$/\1/p' "$GUEST_RESULTS")
    msix=$(sed -nE 's/^INFO interrupts msix: (.*vfio-msix.*)$/\1/p' "$GUEST_RESULTS")
    note "/proc/interrupts while enabled:"
    while IFS= read -r l; do
        [[ -n $l ]] || continue
        note "  | $l"
        irq_report+=("$name: $l")
    done <<<"$msi"$'\n'"$msix"
    if [[ -z $sum ]]; then
        ok=0 detail+="no 'N passed, M failed' line from the guest (rc $GUEST_RC; see $GUEST_LOG); "
    elif [[ $(count failed "$sum") != 0 || $(count passed "$sum") == 0 || $GUEST_RC != 0 ]]; then
        ok=0 detail+="guest: $sum (rc $GUEST_RC); "
    fi
    if [[ -z $msi ]] || grep -vqF " $chip-PCI-MSI-" <<<"$msi"; then
        ok=0 detail+="MSI vector not on $chip (${msi:-no vfio-msi line}); "
    fi
    # airlock's edu has 4 MSI-X vectors: 4 lines, all on the expected chip.
    nmsix=$(grep -c . <<<"$msix" || true)
    if [[ $nmsix != 4 ]] || grep -vqF " $chip-PCI-MSIX-" <<<"$msix"; then
        ok=0 detail+="MSI-X vectors not all on $chip ($nmsix lines: ${msix:-none}); "
    fi
    if grep -qaE 'Assertion|Aborted|core dumped' "$GUEST_LOG"; then
        ok=0 detail+="QEMU aborted; "
    fi
    if ((ok)); then
        verdict "$name" OK "guest: $sum; MSI and 4 MSI-X vectors on $chip ($(elapsed "$t0") s)"
    else
        verdict "$name" FAIL "$detail"
    fi
}

# ---------------------------------------------------------------------------
section "a. GICv3 ITS: guest VFIO -> vfio-user-pci -> airlock --emulate edu"
# boot-guest's default aarch64 machine: virt,gic-version=3,its=on, -cpu max.
scenario a-its "$its_cpio" ITS -machine its=on

# ---------------------------------------------------------------------------
section "b. GICv3 + GICv2m (no ITS): the same, MSIs through a GICv2m frame"
# msi=gicv2m: a GICv2m frame instead of the ITS (its=off alone leaves no MSI
# controller with gic-version=3); gicv3_nolpi: see the header.
GUEST_APPEND="${GUEST_APPEND:+$GUEST_APPEND }irqchip.gicv3_nolpi=1" \
    scenario b-gicv3-v2m "$v2m_cpio" GICv2m -machine its=off,msi=gicv2m

# ---------------------------------------------------------------------------
section "c. GICv2 + GICv2m: the same on a GICv2 machine"
scenario c-gicv2-v2m "$v2m_cpio" GICv2m -machine gic-version=2,its=off

# ---------------------------------------------------------------------------
section "d. negative: GICv2m without allow_unsafe_interrupts"
sock="$RUN_DIR/d.sock"
start_airlock apid "$sock" "$LOG_DIR/airlock-d-v2m-safe.log"
GUEST_APPEND="${GUEST_APPEND:+$GUEST_APPEND }irqchip.gicv3_nolpi=1" \
    run_guest d-v2m-safe "$its_cpio" -device "$(vfio_user_dev "$sock")" -machine its=off,msi=gicv2m
stop_pid "$apid"
timings+=("$(printf '%-14s boot (QEMU start->1st result) %6s s, QEMU start->guest exit %6s s' \
    d-v2m-safe "$GUEST_BOOT_S" "$GUEST_TOTAL_S")")
d_setup=$(grep -E '^(PASS|FAIL) vfio-setup' "$GUEST_RESULTS" || true)
if [[ $d_setup == "FAIL vfio-setup: VFIO_SET_IOMMU"*"Operation not permitted"* ]]; then
    verdict d-v2m-safe OK "guest VFIO refused the device without isolated MSIs (VFIO_SET_IOMMU: EPERM)"
else
    verdict d-v2m-safe FAIL "want 'FAIL vfio-setup: VFIO_SET_IOMMU ... Operation not permitted', got: ${d_setup:-nothing} (see $GUEST_LOG)"
fi

# ---------------------------------------------------------------------------
section "summary ($(elapsed "$t_start") s)"
for v in "${verdicts[@]}"; do printf '   %s\n' "$v"; done
for t in "${timings[@]}"; do note "$t"; done
printf '%s\n' "${timings[@]}" "${irq_report[@]}" >"$LOG_DIR/summary.txt"
note "logs: $LOG_DIR"
printf '%d passed, %d failed\n' "$passed" "$failed"
((failed == 0))
