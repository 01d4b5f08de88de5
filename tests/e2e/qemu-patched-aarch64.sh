#!/usr/bin/env bash
# tests/e2e/qemu-patched-aarch64.sh: the guest's vIOMMU learns airlock's IOVA
# windows, with the patched QEMU (qemu-patches/, scripts/setup-qemu-patched.sh).
# aarch64 virt, GICv3 + ITS, -device virtio-iommu-pci (scripts/boot-guest),
# TCG, a 6.12 guest kernel; airlock --emulate edu --reserve-iova
# 0x8000000:0x100000 (the MSI doorbell window a host with SMMUv3 + ITS
# reserves) offers its usable IOVA ranges with the iova_ranges capability:
#   a. the patched QEMU reports the window as reserved regions of the device
#      to virtio-iommu: the guest's /sys/kernel/iommu_groups/N/reserved_regions
#      covers 0x0000000008000000-0x00000000080fffff (type "reserved", except
#      the ITS doorbell page inside it, which QEMU's virt machine marks "msi"),
#      and the guest program (tests/guest) passes every check, its DMA going
#      through the virtio-iommu, MSI/MSI-X on the ITS. A second window that
#      no doorbell overlaps (--reserve-iova 0x7f000000:0x1000000) must show
#      as one "reserved" line of its own.
#      (QEMU's virt machine gives virtio-iommu the ITS doorbell page
#      0x08090000-0x0809ffff as an MSI bypass region, which takes precedence
#      over a host reserved range: the guest sees the window in three lines,
#      reserved / msi / reserved. Were the page reserved, virtio-iommu would
#      fault the guest's own MSIs.)
#   b. QEMU itself refuses to map guest DMA into a window: with no vIOMMU,
#      guest RAM (0x40000000 on virt) is the IOVA space, so a window at
#      0x40000000 makes the device fail to realize with QEMU's own error
#      (paused QEMU, no guest), and QEMU exits cleanly
# Logs: $AIRLOCK_LOG_DIR (default logs/e2e-patched-aarch64/). Last line:
# "N passed, M failed". Exit 0 iff all passed; 77 if it could not run.
set -euo pipefail
E2E_NAME=e2e-patched-aarch64
E2E_ARCH=aarch64
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
. "$(dirname "${BASH_SOURCE[0]}")/patched-lib.sh"


# start_airlock_args VAR SOCKET LOG [airlock args...]: like start_airlock,
# with extra arguments.
start_airlock_args() {
    local -n _apid2=$1
    local sock=$2 log=$3 i
    shift 3
    spawn _apid2 "$AIRLOCK_BIN" --socket-path "$sock" --emulate edu "$@" 2>"$log" </dev/null
    disown "$_apid2"
    for ((i = 0; i < 100; i++)); do
        [[ -S $sock ]] && return 0
        kill -0 "$_apid2" 2>/dev/null || break
        sleep 0.05
    done
    cat "$log" >&2
    die "airlock did not start listening on $sock (log: $log)"
}

section "setup"
patched_prereqs
e2e_build
cat >"$IMG_DIR/resv-test.sh" <<'EOF'
#!/bin/sh
# Run the guest program with our arguments, then print the reserved regions
# of the edu's IOMMU group (its iommu_group link exists once the program
# has bound the device to vfio-pci).
/airlock-guest-test "$@"
rc=$?
for f in /sys/bus/pci/devices/*; do
    if [ "$(cat $f/vendor)" = 0x1234 ] && [ "$(cat $f/device)" = 0x11e8 ]; then
        g=$(readlink "$f/iommu_group")
        echo "AIRLOCK-RESV-GROUP ${f##*/} ${g##*/}"
        while read -r line; do echo "AIRLOCK-RESV $line"; done <"$f/iommu_group/reserved_regions"
    fi
done
exit $rc
EOF
chmod +x "$IMG_DIR/resv-test.sh"
# ITS isolates MSIs: the default (safe) vfio_iommu_type1.
cpio=$(AIRLOCK_UNSAFE_INTERRUPTS=0 initramfs aarch64-patched-resv "$IMG_DIR/resv-test.sh:/test" "$GUEST_BIN:/airlock-guest-test")
note "initramfs: $cpio"
note "logs: $LOG_DIR"
rm -f "$LOG_DIR"/*.console.log "$LOG_DIR"/*.results "$LOG_DIR"/airlock*.log "$LOG_DIR"/*.txt

# ---------------------------------------------------------------------------
section "a. virtio-iommu reserved regions from airlock's iova_ranges (GICv3 ITS)"
sock="$RUN_DIR/edu-a.sock"
start_airlock_args apid "$sock" "$LOG_DIR/airlock-a.log" --reserve-iova 0x8000000:0x100000 \
    --reserve-iova 0x7f000000:0x1000000
args=(-chardev "socket,id=airlock0,path=$sock" -device vfio-user-pci,chardev=airlock0)
note "airlock --emulate edu --reserve-iova 0x8000000:0x100000 --reserve-iova 0x7f000000:0x1000000; QEMU: -M virt,gic-version=3,its=on -device virtio-iommu-pci ${args[*]}"
run_guest a-resv "$cpio" "${args[@]}" -machine its=on
stop_pid "$apid"
a_ok=1 a_detail=""
group=$(tr -d '\r' <"$GUEST_LOG" | grep -ao 'AIRLOCK-RESV-GROUP .*' | head -n1 || true)
mapfile -t resv < <(tr -d '\r' <"$GUEST_LOG" | sed -nE 's/.*AIRLOCK-RESV (0x[0-9a-f]+ 0x[0-9a-f]+ .*)$/\1/p')
note "guest: ${group#AIRLOCK-RESV-GROUP } (device, iommu group): reserved_regions:"
for l in "${resv[@]}"; do note "  | $l"; done
printf '%s\n' "${resv[@]}" >"$LOG_DIR/a-reserved-regions.txt"
# The window must be covered, from its first to its last byte, by
# reserved regions, at least one of them of type "reserved" (from QEMU's
# host IOMMU device of vfio-user-pci, i.e. from airlock).
cover=$(resv_covered 0x8000000 0x80fffff)
window_line=$(printf '%s\n' "${resv[@]}" | grep -E '^0x0000000008000000 0x00000000080fffff ' || true)
note "window 0x0000000008000000-0x00000000080fffff: $cover 'reserved' region(s)${window_line:+; whole-window line: $window_line}"
[[ ${cover% *} == covered && ${cover#* } -ge 1 ]] ||
    { a_ok=0 a_detail+="the window is not covered by reserved regions ($cover); "; }
control=$(printf '%s\n' "${resv[@]}" | grep -E '^0x000000007f000000 0x000000007fffffff reserved$' || true)
note "second window: ${control:-<not listed>}"
[[ -n $control ]] || { a_ok=0 a_detail+="the second window 0x7f000000-0x7fffffff is not listed as reserved; "; }
sum=$(summary_line "$GUEST_RESULTS" || true)
if [[ -z $sum ]]; then
    a_ok=0 a_detail+="no 'N passed, M failed' line from the guest (rc $GUEST_RC; see $GUEST_LOG); "
elif [[ $(count failed "$sum") != 0 || $(count passed "$sum") == 0 || $GUEST_RC != 0 ]]; then
    a_ok=0 a_detail+="guest: $sum (rc $GUEST_RC); "
fi
dma=$(grep -E '^INFO DMA buffers mapped at' "$GUEST_RESULTS" || true)
[[ -n $dma ]] && note "guest: ${dma#INFO }"
msi=$(sed -nE 's/^INFO interrupts msi: (.*vfio-msi.*)$/\1/p' "$GUEST_RESULTS")
[[ $msi == *ITS-PCI-MSI-* ]] || { a_ok=0 a_detail+="MSI not on the ITS (${msi:-none}); "; }
note "guest: $msi"
if aborted "$GUEST_LOG"; then a_ok=0 a_detail+="QEMU aborted; "; fi
if ((a_ok)); then
    verdict a-reserved-regions OK "guest: $sum; both windows reserved in the guest's IOMMU group (0x8000000: $cover 'reserved' region(s) around the ITS doorbell page; 0x7f000000: one line); MSI on the ITS"
else
    verdict a-reserved-regions FAIL "$a_detail"
fi

# ---------------------------------------------------------------------------
section "b. QEMU refuses to map guest DMA into a window (no vIOMMU: RAM is the IOVA space)"
sock="$RUN_DIR/edu-b.sock" qmp_sock="$RUN_DIR/qmp-b.sock" blog="$LOG_DIR/b-refuse.log.txt"
start_airlock_args apid "$sock" "$LOG_DIR/airlock-b.log" --reserve-iova 0x40000000:0x100000
: >"$blog"
rc=0
timeout 60 "$E2E_REPO/scripts/qemu" aarch64 -M virt,gic-version=3,its=on -cpu max -accel tcg -S \
    -nodefaults -display none -m 256M \
    -object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem \
    -chardev "socket,id=airlock0,path=$sock" -device vfio-user-pci,chardev=airlock0 \
    </dev/null >>"$blog" 2>&1 || rc=$?
stop_pid "$apid"
msg=$(grep -a 'outside the IOVA ranges' "$blog" | head -n1 || true)
realize=$(grep -av 'outside the IOVA ranges' "$blog" | grep -a 'vfio-user-pci' | head -n1 || true)
note "airlock --reserve-iova 0x40000000:0x100000, guest RAM at 0x40000000: QEMU exit $rc"
note "  | $msg"
[[ -n $realize ]] && note "  | $realize"
if ((rc == 1)) && [[ -n $msg ]] && ! aborted "$blog"; then
    verdict b-refuse-map OK "QEMU refused the DMA map of guest RAM over the window before it reached airlock; the device failed to realize, QEMU exited 1 (no abort)"
else
    verdict b-refuse-map FAIL "exit $rc, message '${msg:-none}' (see $blog)"
fi

# ---------------------------------------------------------------------------
e2e_summary
