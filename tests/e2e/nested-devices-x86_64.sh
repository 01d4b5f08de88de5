#!/usr/bin/env bash
# tests/e2e/nested-devices-x86_64.sh: real devices through airlock, two
# levels deep: an SR-IOV NIC's VFs side by side with QEMU's in-process
# vfio-pci, a large 64-bit BAR, VFIO's device request (REQ) and error (ERR)
# interrupts, and a device pulled from under an idle airlock.
#
#   host ── QEMU 11.1 (TCG) ── L1: Debian 6.12, q35 + intel-iommu(intremap,
#   caching-mode); an igb (82576, SR-IOV, AER) on a pcie-root-port (id pf0)
#   and an e1000e on one QEMU hub (the wire); an ivshmem-plain whose BAR2 is
#   a sparse file here ($LOG_DIR/ivshmem.bin)
#     L1 (tests/e2e/nested-devices-l1.sh): 3 VFs (one IOMMU group each);
#         VF0, VF1, VF2 and the ivshmem bound to vfio-pci; the reflector
#         (airlock-wire reflect) on the e1000e; airlock --vfio for VF0, VF2
#         and the ivshmem (sandbox on, defaults)
#     L1: the L2 QEMU (patched by default, see L2_QEMU), TCG, q35, shared
#         memfd RAM, four root ports: VF0 vfio-user-pci, VF1 in-process
#         vfio-pci, the ivshmem vfio-user-pci, VF2 vfio-user-pci
#       L2 (tests/e2e/nested-devices-l2.sh): igbvf on the VFs; checksummed
#           raw Ethernet frames through VF0 (airlock) and VF1 (in-process),
#           interleaved in rounds: frame rate and round-trip time, 0 lost,
#           0 corrupted; the ivshmem BAR2 mmapped through sysfs: the host's
#           pattern P0 read, pattern P1 written
#     L1: REQ: unbinds VF2 while L2 drives it: the unbind returns within 5 s
#         (airlock lets go, the patched L2 QEMU gives back its BAR mmaps and
#         region fds when the request reaches it); L2 sees VF2 unplugged;
#         airlock exits 69 naming the device request
#     host: ERR: injects an uncorrectable non-fatal AER error (POISON_TLP)
#         through its monitor when L1 asks: into the igb PF (pf0) first,
#         then, when L1 saw nothing, into its root port (rp0): QEMU's igb
#         logs the error but never sends it upstream (its DEVCTL error
#         reporting enables are read-only 0). L1's AER driver walks the
#         port's bus and calls vfio-pci's error_detected for the VFs, whose
#         ERR eventfds reach the L2 QEMU (VF0's handed to VFIO through
#         airlock, VF1's by QEMU itself), which stops L2
#     L1: bad input: echo 0 > sriov_numvfs under the idle airlock of VF0
#         (<= 5 s, exit 69); the ivshmem airlock's session shows no socket
#         traffic for BAR2 (the mmap fast path)
#   The host checks pattern P1 in the backing file after L1 ends.
#
# Why the patched L2 QEMU by default: REQ makes QEMU unplug VF2, and stock
# QEMU 11.1 aborts when it unplugs a vfio-user device with MSI-X (the PBA
# overlay; qemu-patches/ patch 7), which would end L2 before ERR. Stock QEMU
# also never arms REQ (patch 16) and keeps the BAR mmaps, its copy of the
# device, until the device is gone (patch 17): the unbind then waits.
#
# Usage: tests/e2e/nested-devices-x86_64.sh
# Env:   AIRLOCK_LOG_DIR  logs (default logs/e2e-nested-devices-x86_64/):
#                         console.log (L1's console; L2's lines "l2| "),
#                         airlock-{vf0,vf2,bar}.log, reflect.txt, bench.txt,
#                         build.log, setup.log; ivshmem.bin while it runs
#        GUEST_TIMEOUT    seconds before L1's QEMU is killed (default 1500)
#        L1_MEM, L2_MEM   guest RAM (default 3G, 256M; with RAM above 4 GiB
#                         SeaBIOS puts L1's 64-bit BARs above 4 GiB)
#        SHM_MIB          the ivshmem's size (default 256)
#        WIRE_ROUNDS, WIRE_FRAMES, WIRE_WINDOW, WIRE_RTT
#                         traffic: rounds (8), frames per rate phase (400),
#                         frames in flight (16), one-at-a-time frames (40)
#        WIRE_BUDGET      seconds after which no round starts once two are
#                         done (150; 0: every round): a slower machine
#                         (L2 traffic at ~10 frames/s against ~120) gets
#                         fewer rounds, not a timeout
#        L2_QEMU          patched (default) or stock
#        L2_APPEND        extra words for L2's kernel command line
#        NESTED_AIRLOCK   a static airlock binary to use instead of this tree's build
#        NESTED_AIRLOCK_ARGS  extra airlock arguments, space-separated
# Output: every L1 and L2 line, the verdicts ("=> PASS"/"=> FAIL"), the
# BENCH table (airlock / in-process), timings per phase; last line
# "N passed, M failed". Exit 0 iff all passed, 124 on timeout, 77 if it
# could not run (no cargo, no patched QEMU).
set -euo pipefail
E2E_NAME=e2e-nested-devices-x86_64
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

timeout_s=${GUEST_TIMEOUT:-1500}
# 3G: RAM above 4 GiB makes SeaBIOS put 64-bit BARs there (with 2G it
# places a 256 MiB BAR2 below 4 GiB).
l1_mem=${L1_MEM:-3G} l2_mem=${L2_MEM:-256M}
shm_mib=${SHM_MIB:-256}
rounds=${WIRE_ROUNDS:-8} frames=${WIRE_FRAMES:-400} window=${WIRE_WINDOW:-16} rtt=${WIRE_RTT:-40}
budget=${WIRE_BUDGET:-150}
l2_qemu=${L2_QEMU:-patched}
target=x86_64-unknown-linux-gnu
shm="$LOG_DIR/ivshmem.bin"
trap 'e2e_cleanup; rm -f "$shm"' EXIT

# --- setup and build ----------------------------------------------------------
section "setup"
: >"$LOG_DIR/setup.log"
e2e_prereqs
need_host_pkgs cpio:cpio modprobe:kmod xz:xz-utils zstd:zstd cmp:diffutils >>"$LOG_DIR/setup.log" 2>&1
t0=$(now)
: >"$LOG_DIR/build.log"
pkgs=(-p airlock-wire-test)
[[ -n ${NESTED_AIRLOCK:-} ]] || pkgs+=(-p airlock)
(cd "$E2E_REPO" && RUSTFLAGS="-C target-feature=+crt-static" nice \
    cargo build --release "${pkgs[@]}" --target "$target") >>"$LOG_DIR/build.log" 2>&1 ||
    { tail -n 30 "$LOG_DIR/build.log"; die "static build failed (see $LOG_DIR/build.log)"; }
bin="$E2E_REPO/target/$target/release"
airlock_bin=${NESTED_AIRLOCK:-$bin/airlock}
[[ -x $airlock_bin ]] || die "NESTED_AIRLOCK=$airlock_bin is not an executable"
note "built static ${NESTED_AIRLOCK:+airlock-wire (airlock: $airlock_bin)}${NESTED_AIRLOCK:-airlock and airlock-wire} in $(elapsed "$t0") s"

work=$RUN_DIR
g="$AIRLOCK_CACHE/guest/amd64"
kver=$(cat "$g/kver")

# L2: busybox, igbvf, /init, airlock-wire.
mk_l2_cpio() {
    local out=$1 st="$work/l2" a kind path f base
    rm -rf "$st"
    mkdir -p "$st"/{bin,dev,proc,sys,tmp,etc,lib/modules}
    install -m 0755 "$g/busybox" "$st/bin/busybox"
    for a in $("$g/busybox" --list); do [[ $a == busybox ]] || ln -sf busybox "$st/bin/$a"; done
    ln -s bin "$st/sbin"
    mknod -m 0600 "$st/dev/console" c 5 1 2>/dev/null || true
    : >"$st/etc/modules.order"
    while read -r kind path _; do
        [[ $kind == insmod ]] || continue
        f=${path##*/}
        case "$f" in
            *.ko.xz) base=${f%.xz}; xz -dc "$path" >"$st/lib/modules/$base" ;;
            *.ko.zst) base=${f%.zst}; zstd -dcq "$path" >"$st/lib/modules/$base" ;;
            *.ko) base=$f; cp "$path" "$st/lib/modules/$base" ;;
            *) die "unexpected module file $path" ;;
        esac
        echo "$base" >>"$st/etc/modules.order"
    done < <(modprobe -d "$g/root" -S "$kver" --show-depends igbvf)
    install -m 0755 "$E2E_REPO/tests/e2e/nested-devices-l2.sh" "$st/init"
    # stripped: a smaller initramfs unpacks sooner in L2
    strip -o "$st/airlock-wire" "$bin/airlock-wire" 2>/dev/null || install -m 0755 "$bin/airlock-wire" "$st/airlock-wire"
    (cd "$st" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$out"
}
l2_cpio="$work/l2.cpio"
mk_l2_cpio "$l2_cpio"

case $l2_qemu in
    patched)
        t0=$(now)
        pq_dir=$("$E2E_REPO/scripts/setup-qemu-patched.sh" 2>>"$LOG_DIR/setup.log") ||
            skip_exit "building the patched QEMU failed (see $LOG_DIR/setup.log)"
        qemu_bundle_x86 "$pq_dir/bin/qemu-system-x86_64" "$pq_dir/lib/ld-linux-x86-64.so.2" "$pq_dir/lib"
        which="patched ($pq_dir, $(elapsed "$t0") s)"
        ;;
    stock)
        qr="$AIRLOCK_CACHE/qemu-root"
        ql="$qr/usr/lib/x86_64-linux-gnu"
        qemu_bundle_x86 "$qr/usr/bin/qemu-system-x86_64" "$ql/ld-linux-x86-64.so.2" "$ql"
        which="stock 11.1"
        ;;
    *) die "L2_QEMU=$l2_qemu: want patched or stock" ;;
esac
note "L2 QEMU bundle ($which): ${#bundle[@]} files, $((bundle_bytes / 1048576)) MiB; L2 initramfs $(($(stat -c %s "$l2_cpio") / 1024)) KiB"

cpio="$work/l1.cpio"
t0=$(now)
AIRLOCK_UNSAFE_INTERRUPTS=0 AIRLOCK_MODULES="igb e1000e" "$E2E_REPO/scripts/mkinitramfs" x86_64 "$cpio" \
    "$airlock_bin:/bin/airlock" "$bin/airlock-wire:/bin/airlock-wire" \
    "$E2E_REPO/tests/e2e/nested-devices-l1.sh:/test" "$E2E_REPO/tests/e2e/l2-boot-args.sh:/l2-boot-args.sh" \
    "$g/vmlinux:/l2/vmlinux" "$l2_cpio:/l2/initrd.cpio" "${bundle[@]}" >>"$LOG_DIR/build.log" 2>&1 ||
    die "mkinitramfs failed (see $LOG_DIR/build.log)"
note "L1 initramfs $(($(stat -c %s "$cpio") / 1048576)) MiB in $(elapsed "$t0") s (uncompressed; holds L2's vmlinux, initramfs and QEMU)"

# --- the ivshmem's memory: a sparse file with pattern P0 on three pages ----------
# page TAG OFFSET: the 4 KiB page TAG writes at OFFSET (as airlock-wire bar does).
page() { yes "airlock-$1@0x$(printf %010x "$2")" 2>/dev/null | head -c 4096 || true; }
size=$((shm_mib << 20))
p0=(0 $((size / 2)) $((size - 4096)))
p1=(4096 $((size / 2 + 4096)) $((size - 8192)))
rm -f "$shm"
truncate -s "$size" "$shm"
for off in "${p0[@]}"; do page P0 "$off" | dd of="$shm" bs=4096 seek=$((off / 4096)) conv=notrunc status=none; done
note "ivshmem: $shm_mib MiB sparse file $shm; P0 at $(printf '%#x ' "${p0[@]}")(L2 writes P1 at $(printf '%#x ' "${p1[@]}"))"

# (L2's boot arguments come from tests/e2e/l2-boot-args.sh, in L1.)
l2_append="wire.rounds=$rounds wire.frames=$frames wire.window=$window wire.rtt=$rtt wire.budget=$budget"
l2_append+=" bar.p0=$(IFS=:; echo "${p0[*]}") bar.p1=$(IFS=:; echo "${p1[*]}") ${L2_APPEND:-}"
l2_append=$(echo $l2_append | tr ' ' ,)
extra=$(echo ${NESTED_AIRLOCK_ARGS:-} | tr ' ' ,)

# --- boot L1 ------------------------------------------------------------------
section "L1: VFs, vfio-pci, three airlocks; L2: traffic, BAR, REQ, ERR; then sriov_numvfs=0"
console="$LOG_DIR/console.log"
mon="$work/l0.qmp"
: >"$console"
t_boot=$(now)
spawn qpid "$E2E_REPO/scripts/qemu" x86_64 -accel tcg \
    -M q35,kernel-irqchip=split -cpu max -smp 2 -m "$l1_mem" \
    -nographic -nodefaults -serial stdio -no-reboot \
    -qmp "unix:$mon,server=on,wait=off" \
    -device intel-iommu,intremap=on,caching-mode=on \
    -netdev hubport,id=w0,hubid=0 -netdev hubport,id=w1,hubid=0 \
    -device pcie-root-port,id=rp0,chassis=1,slot=1,hotplug=off \
    -device igb,id=pf0,bus=rp0,netdev=w0,mac=52:54:00:a1:00:01 \
    -device e1000e,id=wire,netdev=w1,mac=52:54:00:a1:00:02 \
    -object "memory-backend-file,id=shm,mem-path=$shm,size=${shm_mib}M,share=on" \
    -device ivshmem-plain,id=shm0,memdev=shm \
    -kernel "$g/vmlinux" -initrd "$cpio" \
    -append "console=ttyS0 quiet panic=-1 intel_iommu=on pcie_ports=native cryptomgr.notests l2.mem=$l2_mem l2.append=$l2_append${extra:+ airlock.extra=$extra}" \
    </dev/null >"$console" 2>&1
note "L1: q35 + intel-iommu + igb (rp0, hotplug=off) + e1000e on hub 0 + ivshmem ${shm_mib} MiB, TCG, 2 vCPUs, $l1_mem; console: $console"
note "traffic: $rounds rounds x ($frames frames, window $window; $rtt one at a time) per VF, none started after ${budget} s once two are done; timeout $timeout_s s"

declare -A seen_at=()
milestone() { [[ -n ${seen_at[$1]:-} ]] || seen_at[$1]=$(now); }
# console lines without CRs and terminal escapes
lines() { console_lines "$console" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g'; }
shown=0 marker="" timed_out=0 last_progress=$(now)
declare -A aer_reply=()
while :; do
    mapfile -t got < <(lines | grep -aE '^((PASS|FAIL|INFO|BAR|REFLECT) |[0-9]+ passed, [0-9]+ failed|l2\| |AIRLOCK-GUEST-EXIT )' || true)
    for ((i = shown; i < ${#got[@]}; i++)); do
        l=${got[i]}
        case "$l" in
            "INFO l1: start"*) milestone l1 ;;&
            "INFO l1: airlocks listening"*) milestone airlock ;;&
            "INFO l1: starting L2"*) milestone l2start ;;&
            "l2| INFO l2: init"*) milestone l2init ;;&
            "l2| INFO l2: traffic phase start"*) milestone traffic ;;&
            "l2| INFO l2: traffic phase took"*) milestone traffic_end ;;&
            "l2| INFO l2: req-ready"*) milestone req ;;&
            "l2| "*"l2-req-unplug"*) milestone req_l2 ;;&
            "l2| INFO l2: err-ready"*) milestone err ;;&
            "INFO l1: L2 QEMU ended"*) milestone l2gone ;;&
            "INFO l1: numvfs"*) milestone numvfs ;;&
            "INFO l1: inject-aer" | "INFO l1: inject-aer-port")
                # pf0: the igb PF; rp0: its root port (the PF's own error
                # never leaves it: see the L1 line before this one).
                dev=pf0 key=pf
                [[ $l == *-port ]] && dev=rp0 key=port
                milestone inject
                note "$l"
                t0=$(now)
                aer_reply[$key]=$(qmp "$mon" human-monitor-command "{\"command-line\":\"pcie_aer_inject_error $dev POISON_TLP\"}" 2>&1 || true)
                note "host: pcie_aer_inject_error $dev POISON_TLP -> ${aer_reply[$key]} ($(elapsed "$t0") s)"
                continue
                ;;
            *) ;;
        esac
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
for n in vf0 vf2 bar; do lines | sed -n "s/^airlock-$n| //p" >"$LOG_DIR/airlock-$n.log"; done
lines | grep -a '^REFLECT ' >"$LOG_DIR/reflect.txt" || true

# --- verdicts -----------------------------------------------------------------
section "verdicts"
if ((timed_out)); then
    verdict l1-run FAIL "timeout after $timeout_s s (console: $console)"
elif [[ -z $marker ]]; then
    verdict l1-run FAIL "L1 stopped without an AIRLOCK-GUEST-EXIT line (console: $console): $(lines | tail -n 3 | tr '\n' ' ' | cut -c1-300)"
fi
# Every PASS/FAIL line of L1 and L2 is a verdict.
while IFS= read -r l; do
    who=l1
    [[ $l == "l2| "* ]] && who=l2 l=${l#l2| }
    name=${l#* } name=${name%%:*}
    [[ $name == l[12]-* ]] || name="$who-$name"
    if [[ $l == PASS* ]]; then verdict "$name" OK "${l#*: }"; else verdict "$name" FAIL "${l#*: }"; fi
done < <(lines | grep -aE '^(l2\| )?(PASS|FAIL) ' || true)

# The AER injections (the host's part of ERR): the monitor's replies.
if [[ -z ${seen_at[inject]:-} ]]; then
    verdict host-aer-inject FAIL "L1 never asked for the AER injection (no 'INFO l1: inject-aer')"
fi
for key in pf port; do
    [[ -n ${aer_reply[$key]:-} ]] || continue
    dev=pf0
    [[ $key == port ]] && dev=rp0
    if [[ ${aer_reply[$key]} == *"\"return\": \"OK id: $dev"* ]]; then
        verdict "host-aer-inject-$key" OK "pcie_aer_inject_error $dev POISON_TLP through QMP human-monitor-command: ${aer_reply[$key]}"
    else
        verdict "host-aer-inject-$key" FAIL "pcie_aer_inject_error $dev: the monitor answered ${aer_reply[$key]}"
    fi
done

# Pattern P1 in the ivshmem's backing file, P0 untouched.
if [[ -n ${seen_at[l2gone]:-} ]]; then
    bad=()
    for off in "${p1[@]}"; do
        cmp -s <(dd if="$shm" bs=4096 skip=$((off / 4096)) count=1 status=none) <(page P1 "$off") || bad+=("P1@$(printf %#x "$off")")
    done
    for off in "${p0[@]}"; do
        cmp -s <(dd if="$shm" bs=4096 skip=$((off / 4096)) count=1 status=none) <(page P0 "$off") || bad+=("P0@$(printf %#x "$off")")
    done
    if ((${#bad[@]} == 0)); then
        verdict host-bar-p1 OK "L2's pattern P1 is in $shm at $(printf '%#x ' "${p1[@]}")and P0 is still at $(printf '%#x ' "${p0[@]}")"
    else
        verdict host-bar-p1 FAIL "pages that do not hold their pattern: ${bad[*]} (first bytes at ${p1[0]}: $(dd if="$shm" bs=1 skip="${p1[0]}" count=32 status=none | tr -c '[:print:]' .))"
    fi
fi

# The reflector's counts against L2's: every frame L2 sent through a VF
# reached the reflector intact.
l2l() { lines | sed -n 's/^l2| //p'; }
mac_of() { l2l | sed -nE "s/^INFO l2: $1: .* ([0-9a-f:]{17}) carrier.*/\1/p" | head -n1; }
for side in vf-airlock vf-inproc; do
    mac=$(mac_of "$side")
    sent=$(l2l | sed -nE "s/^BENCH $side .* sent=([0-9]+) .*/\1/p" | tail -n1)
    refl=$(grep -a "^REFLECT $mac " "$LOG_DIR/reflect.txt" 2>/dev/null | tail -n1 || true)
    rf=$(sed -nE 's/.* frames=([0-9]+) bad=([0-9]+)/\1 \2/p' <<<"$refl")
    if [[ -z $mac || -z $sent || -z $rf ]]; then
        verdict "reflector-$side" FAIL "missing counts (MAC '${mac:-?}', L2 sent '${sent:-?}', reflector '${refl:-none}')"
    elif [[ ${rf% *} == "$sent" && ${rf#* } == 0 ]]; then
        verdict "reflector-$side" OK "the reflector got all $sent frames from $mac, 0 with a bad checksum"
    else
        verdict "reflector-$side" FAIL "the reflector counted frames=${rf% *} bad=${rf#* } from $mac; L2 sent $sent"
    fi
done

section "results"
# BENCH NAME rate=R rtt_us=T ... from L2: airlock / in-process.
bench() { l2l | grep -a "^BENCH $1 " | tail -n1 || true; }
field() { sed -nE "s/.* $1=([0-9.]+).*/\1/p" <<<"$2"; }
ba=$(bench vf-airlock) bi=$(bench vf-inproc)
{
    printf '%-12s %12s %10s %10s %10s %8s %6s %9s\n' side "rate fr/s" "rtt us" "p10 us" "p90 us" sent lost corrupted
    for b in "$ba" "$bi"; do
        [[ -n $b ]] || continue
        printf '%-12s %12s %10s %10s %10s %8s %6s %9s\n' "$(cut -d' ' -f2 <<<"$b")" "$(field rate "$b")" "$(field rtt_us "$b")" \
            "$(field rtt_p10_us "$b")" "$(field rtt_p90_us "$b")" "$(field sent "$b")" "$(field lost "$b")" "$(field corrupted "$b")"
    done
    if [[ -n $ba && -n $bi ]]; then
        awk -v ra="$(field rate "$ba")" -v ri="$(field rate "$bi")" -v ta="$(field rtt_us "$ba")" -v ti="$(field rtt_us "$bi")" 'BEGIN {
            printf "airlock/in-process: frame rate %.2f, round trip %.2f (medians over the rounds, interleaved in one run)\n", (ri > 0 ? ra / ri : 0), (ti > 0 ? ta / ti : 0) }'
    fi
    l2l | grep -a '^ROUND ' || true
} | tee "$LOG_DIR/bench.txt" | while IFS= read -r l; do note "$l"; done
{ lines | grep -aE '^BAR ' || true; } | while read -r _ where bdf addr sz pos; do
    note "BAR2 in $where: $bdf at $addr, $((sz >> 20)) MiB, $pos 4 GiB"
done
{ l2l | grep -aE '^BAR ' || true; } | while read -r _ where bdf addr sz pos; do
    note "BAR2 in $where: $bdf at $addr, $((sz >> 20)) MiB, $pos 4 GiB"
done
while IFS= read -r l; do note "reflector: ${l#REFLECT }"; done <"$LOG_DIR/reflect.txt"
{ l2l | grep -aE 'warning|Unrecoverable' || true; } | head -n 8 | while IFS= read -r l; do note "L2 QEMU: $l"; done
# airlock's logs without its refusals of the other devices' BAR mmaps as
# DMA (QEMU maps every RAM device section; those have no fd): counted.
quiet() { grep -avE 'DMA_MAP refused: .* has no file descriptor' "$1" || true; }
for n in vf0 vf2 bar; do
    note "airlock-$n: $(grep -ac 'DMA_MAP refused: .* has no file descriptor' "$LOG_DIR/airlock-$n.log" || true) DMA_MAPs without an fd refused (other devices' BARs)"
    { quiet "$LOG_DIR/airlock-$n.log" | grep -aiE 'device request|session ended|released|error|warn' || true; } | head -n 8 |
        while IFS= read -r l; do note "airlock-$n: $l"; done
done
if ((failed)); then
    for n in vf0 vf2 bar; do
        echo "airlock for $n in L1 ($LOG_DIR/airlock-$n.log, DMA_MAP refusals left out), last lines:"
        quiet "$LOG_DIR/airlock-$n.log" | tail -n 25 | sed 's/^/   | /'
    done
fi

span() { # span NAME FROM TO: "NAME X s" if both milestones were seen
    local a=${seen_at[$2]:-} b=${seen_at[$3]:-}
    [[ $2 == boot ]] && a=$t_boot
    [[ $3 == end ]] && b=$t_end
    if [[ -n $a && -n $b ]]; then printf '%s %s s' "$1" "$(elapsed "$a" "$b")"; else printf '%s -' "$1"; fi
}
note "timings (host clock): $(span 'L1 boot to /test' boot l1); $(span '/test to airlocks listening' l1 airlock);" \
    "$(span 'L2 QEMU start to L2 /init' l2start l2init); $(span 'L2 /init to traffic' l2init traffic);" \
    "$(span 'traffic' traffic traffic_end); $(span 'traffic end to req-ready (BAR)' traffic_end req);" \
    "$(span 'REQ (req-ready to L2 verdict)' req req_l2); $(span 'req-ready to err-ready' req err);" \
    "$(span 'ERR (inject to L2 QEMU ended)' inject l2gone); $(span 'numvfs=0 to L1 end' numvfs end);" \
    "$(span 'L1 QEMU start to end' boot end); whole script $(elapsed "$t_start") s"
rm -f "$shm"
if ((timed_out)); then
    e2e_summary || true
    exit 124
fi
e2e_summary
