#!/usr/bin/env bash
# tests/e2e/nested-l2-nvme-x86_64.sh: a Linux nvme driver doing I/O through
# airlock on real VFIO, two levels deep. A long-running demonstration (minutes),
# not part of scripts/test.
#
#   host ── QEMU 11.1 (TCG) ── L1: Debian 6.12, q35 + intel-iommu(intremap,
#   caching-mode) + QEMU nvme (a 16 MiB raw image filled with pattern A)
#     L1: nvme bound to vfio-pci; `airlock --vfio <nvme> --socket-path /tmp/nvme.sock`
#     L1: L2 QEMU 11.1 (the same trixie build, a minimal bundle: binary, its
#         shared libraries, loader, SeaBIOS + pvh.bin), TCG, q35, 256 MiB shared
#         memfd RAM, -device vfio-user-pci on airlock's socket
#       L2: Debian 6.12 (PVH vmlinux), /init insmods nvme-core + nvme and, with
#           O_DIRECT dd: reads pattern A, writes pattern B, reads B back.
#   After L1 powers off, the host checks the raw image: B where L2 wrote it,
#   A everywhere else.
#
# airlock serves the nvme with the mmap fast path by default (QEMU maps the
# BAR pages outside the MSI-X table and PBA); NESTED_AIRLOCK_ARGS=--mediate-bars
# sends every BAR access through airlock instead. (Before the fix of
# 2026-11-22 QEMU rejected airlock's truncated region-info reply, whose
# cap_offset was 0, so this script used --mediate-bars.)
#
# Usage: tests/e2e/nested-l2-nvme-x86_64.sh
# Env:   AIRLOCK_LOG_DIR   logs (default logs/e2e-nested-l2-nvme/): console.log
#                          (L1 console; L2's console lines prefixed "l2| "),
#                          airlock.log (airlock in L1), build.log, setup.log, nvme.img
#        GUEST_TIMEOUT     seconds before L1's QEMU is killed (default 1500)
#        L1_MEM, L2_MEM    guest RAM (default 2G, 256M)
#        L1_APPEND         more L1 kernel arguments: l1.trace=1 prints L1's
#                          scheduler events during each L2's 4 KiB reads,
#                          summed per thread and waker ("INFO l1: TRACE": who
#                          woke how often, waited how long for a CPU, used how
#                          much CPU); l1.pin=1 runs airlock on L1's CPU 1 and
#                          the L2 QEMU on CPU 0; idle=poll keeps L1's idle
#                          vCPUs spinning instead of halting
#        NESTED_AIRLOCK    a static airlock binary to use instead of this tree's build
#        L2_QEMU=patched   run L2 under the patched QEMU (qemu-patches/, built by
#                          scripts/setup-qemu-patched.sh) instead of the stock 11.1
#        L2_QEMU_DIR       with L2_QEMU=patched: a bundle that
#                          scripts/setup-qemu-patched.sh made for another
#                          series, instead of this tree's (an A/B of a QEMU
#                          change in one sitting)
#        L2_GLOBAL         one -global DRIVER.PROP=VALUE for the L2 QEMU
#        L2_COMPARE=1      then boot the same L2 again with QEMU's in-process
#                          vfio-pci on the device, and print both sides' BENCH
#                          figures (4 KiB / 128 KiB O_DIRECT reads) and ratios
#        NESTED_AIRLOCK_ARGS  airlock arguments, space-separated (default none:
#                          the mmap fast path; --mediate-bars to route every BAR access)
#        L2_VIOMMU=strict|lazy  give L2 a virtio-iommu (both L2 runs) with
#                          iommu.strict=1 (strict) or 0 (lazy): every nvme I/O
#                          then maps and unmaps its buffers through (lazy too:
#                          virtio-iommu has no deferred unmap), i.e.
#                          DMA_MAP/DMA_UNMAP messages to airlock, or
#                          VFIO ioctls in-process. Implies L2_QEMU=patched
#                          (the guest learns airlock's IOVA windows) unless
#                          L2_QEMU is set. With L2_COMPARE the table adds
#                          airlock's maps and unmaps per I/O and its median
#                          time per map and per unmap (its session line).
# Output: progress (L1 INFO lines, every L2 console line), L2's PASS/FAIL lines,
# the host's disk checks, timings, and last "N passed, M failed" (L2's and the
# host's checks together). Exit 0 iff all passed; 124 on timeout; 77 if it
# could not run (no cargo).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
. "$repo/scripts/lib.sh"

t_start=$EPOCHREALTIME
elapsed() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }
LOG_DIR=${AIRLOCK_LOG_DIR:-$repo/logs/e2e-nested-l2-nvme}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
timeout_s=${GUEST_TIMEOUT:-1500}
l1_mem=${L1_MEM:-2G}
l2_mem=${L2_MEM:-256M}
viommu=${L2_VIOMMU:-}
case $viommu in
    "" | strict | lazy) ;;
    *) die "L2_VIOMMU=$viommu: want strict or lazy" ;;
esac
[[ -n $viommu ]] && : "${L2_QEMU:=patched}"
target=x86_64-unknown-linux-gnu
work=$(mktemp -d "${TMPDIR:-/tmp}/airlock-l2nvme.XXXXXX")
qpid=""

stop_qemu() {
    [[ -n $qpid ]] || return 0
    local i
    kill -TERM -- "-$qpid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$qpid" 2>/dev/null || true
    { wait "$qpid"; } 2>/dev/null || true
    qpid=""
}
trap 'stop_qemu; rm -rf "$work"' EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM
note() { printf '   %s\n' "$*"; }

# --- setup and build ----------------------------------------------------------
command -v cargo >/dev/null || { echo "SKIP nested-l2-nvme: cargo not found"; exit 77; }
: >"$LOG_DIR/setup.log"
[[ -f $AIRLOCK_CACHE/qemu-root.stamp ]] || "$repo/scripts/setup-qemu.sh" >>"$LOG_DIR/setup.log" 2>&1 ||
    die "QEMU setup failed (see $LOG_DIR/setup.log)"
[[ -f $AIRLOCK_CACHE/guest/.stamp ]] || "$repo/scripts/setup-guest.sh" >>"$LOG_DIR/setup.log" 2>&1 ||
    die "guest kernel setup failed (see $LOG_DIR/setup.log)"
need_host_pkgs cpio:cpio modprobe:kmod xz:xz-utils zstd:zstd sha256sum:coreutils cmp:diffutils
t0=$EPOCHREALTIME
: >"$LOG_DIR/build.log"
if [[ -z ${NESTED_AIRLOCK:-} ]]; then
    (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release -p airlock --target "$target") >>"$LOG_DIR/build.log" 2>&1 ||
        { tail -n 30 "$LOG_DIR/build.log"; die "static build failed (see $LOG_DIR/build.log)"; }
    airlock_bin="$repo/target/$target/release/airlock"
    note "built static airlock in $(elapsed "$t0") s"
else
    airlock_bin=$NESTED_AIRLOCK
fi

# --- the disk: pattern A (one line per 512-byte sector, numbered) ------------
disk="$LOG_DIR/nvme.img"
disk_mib=16 a_mib=4 b_off_mib=8 b_mib=1
awk -v n=$((disk_mib * 2048)) 'BEGIN {
    pad = sprintf("%480s", ""); gsub(/ /, ".", pad)
    for (i = 0; i < n; i++) printf "airlock pattern A sector %06d %s\n", i, substr(pad, 1, 511 - 32)
}' >"$disk"
(($(stat -c %s "$disk") == disk_mib * 1048576)) || die "pattern A image has the wrong size"
a_sum=$(head -c $((a_mib * 1048576)) "$disk" | sha256sum | cut -d' ' -f1)
# Pattern B, as L2 makes it (yes | head: SIGPIPE is the normal end of yes).
pattern_b() { yes airlock-l2-pattern-B | head -c $((b_mib * 1048576)) || true; }
b_sum=$(pattern_b | sha256sum | cut -d' ' -f1)
# What the disk must hold after L2: A, with B spliced in.
expect_img="$work/expect.img"
cp "$disk" "$expect_img"
pattern_b | dd of="$expect_img" bs=1M seek=$b_off_mib conv=notrunc status=none

# --- L2 initramfs: busybox, nvme modules, /init, /expect ---------------------
g="$AIRLOCK_CACHE/guest/amd64"
kver=$(cat "$g/kver")
mk_l2_cpio() {
    local out=$1 st="$work/l2" a m path f base
    rm -rf "$st"
    mkdir -p "$st"/{bin,dev,proc,sys,tmp,etc,lib/modules}
    install -m 0755 "$g/busybox" "$st/bin/busybox"
    for a in $("$g/busybox" --list); do [[ $a == busybox ]] || ln -sf busybox "$st/bin/$a"; done
    ln -s bin "$st/sbin"
    mknod -m 0600 "$st/dev/console" c 5 1 2>/dev/null || true
    : >"$st/etc/modules.order"
    for m in ${viommu:+virtio_iommu} nvme; do
        while read -r kind path _; do
            [[ $kind == insmod ]] || continue
            f=${path##*/}
            case "$f" in
                *.ko.xz) base=${f%.xz}; xz -dc "$path" >"$st/lib/modules/$base" ;;
                *.ko.zst) base=${f%.zst}; zstd -dcq "$path" >"$st/lib/modules/$base" ;;
                *.ko) base=$f; cp "$path" "$st/lib/modules/$base" ;;
                *) die "unexpected module file $path" ;;
            esac
            grep -qx "$base" "$st/etc/modules.order" || echo "$base" >>"$st/etc/modules.order"
        done < <(modprobe -d "$g/root" -S "$kver" --show-depends "$m")
    done
    install -m 0755 "$repo/tests/e2e/nested-l2-nvme-l2.sh" "$st/init"
    printf 'A_MIB=%s B_OFF_MIB=%s B_MIB=%s A_SUM=%s B_SUM=%s VIOMMU=%s\n' \
        "$a_mib" "$b_off_mib" "$b_mib" "$a_sum" "$b_sum" "$viommu" >"$st/expect"
    (cd "$st" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$out"
}
l2_cpio="$work/l2.cpio"
mk_l2_cpio "$l2_cpio"

# --- the L2 QEMU bundle: binary, its libraries (by soname), loader, firmware -
if [[ ${L2_QEMU:-stock} == patched ]]; then
    if [[ -n ${L2_QEMU_DIR:-} ]]; then
        pq_dir=$L2_QEMU_DIR
        [[ -x $pq_dir/bin/qemu-system-x86_64 ]] || die "L2_QEMU_DIR=$pq_dir has no bin/qemu-system-x86_64"
    else
        pq_dir=$("$repo/scripts/setup-qemu-patched.sh" 2>>"$LOG_DIR/setup.log") ||
            die "building the patched QEMU failed (see $LOG_DIR/setup.log)"
    fi
    qemu_bundle_x86 "$pq_dir/bin/qemu-system-x86_64" "$pq_dir/lib/ld-linux-x86-64.so.2" "$pq_dir/lib"
    which="patched ($pq_dir)"
else
    qr="$AIRLOCK_CACHE/qemu-root"
    ql="$qr/usr/lib/x86_64-linux-gnu"
    qemu_bundle_x86 "$qr/usr/bin/qemu-system-x86_64" "$ql/ld-linux-x86-64.so.2" "$ql"
    which="stock 11.1"
fi
note "L2 QEMU bundle ($which): ${#bundle[@]} files, $((bundle_bytes / 1048576)) MiB; L2 initramfs $(($(stat -c %s "$l2_cpio") / 1024)) KiB"

cpio="$work/l1.cpio"
AIRLOCK_UNSAFE_INTERRUPTS=0 "$repo/scripts/mkinitramfs" x86_64 "$cpio" \
    "$airlock_bin:/bin/airlock" "$repo/tests/e2e/nested-l2-nvme-l1.sh:/test" "$repo/tests/e2e/l2-boot-args.sh:/l2-boot-args.sh" \
    "$g/vmlinux:/l2/vmlinux" "$l2_cpio:/l2/initrd.cpio" "${bundle[@]}" >>"$LOG_DIR/build.log" 2>&1 ||
    die "mkinitramfs failed (see $LOG_DIR/build.log)"
note "L1 initramfs $(($(stat -c %s "$cpio") / 1048576)) MiB (uncompressed; holds L2's vmlinux, initramfs and QEMU)"
# Default: the mmap fast path (see the top).
airlock_args=${NESTED_AIRLOCK_ARGS-}
extra=$(echo $airlock_args | tr ' ' ,)

# --- boot L1 ------------------------------------------------------------------
console="$LOG_DIR/console.log"
: >"$console"
t_boot=$EPOCHREALTIME
setsid "$repo/scripts/qemu" x86_64 -accel tcg \
    -M q35,kernel-irqchip=split -cpu max -smp 2 -m "$l1_mem" \
    -nographic -nodefaults -serial stdio -no-reboot \
    -device intel-iommu,intremap=on,caching-mode=on \
    -device nvme,serial=airlock-l2,drive=nvm \
    -drive "if=none,id=nvm,file=$disk,format=raw" \
    -kernel "$g/vmlinux" -initrd "$cpio" \
    -append "console=ttyS0 quiet panic=-1 cryptomgr.notests intel_iommu=on l2.mem=$l2_mem${extra:+ airlock.extra=$extra}${L2_GLOBAL:+ l2.global=$L2_GLOBAL}${L2_COMPARE:+ l2.compare=1}${viommu:+ l2.viommu=$viommu}${L1_APPEND:+ $L1_APPEND}" \
    </dev/null >"$console" 2>&1 &
qpid=$!
note "L1: q35 + intel-iommu(intremap, caching-mode) + nvme (${disk_mib} MiB), TCG, 2 vCPUs, $l1_mem; console: $console"
note "timeout ${timeout_s} s; L2 runs TCG inside TCG: its boot takes minutes"

# Stream interesting lines as they arrive; note when milestones first appear.
declare -A seen_at=()
milestone() { [[ -n ${seen_at[$1]:-} ]] || seen_at[$1]=$EPOCHREALTIME; }
shown=0 marker="" timed_out=0 last_progress=$EPOCHREALTIME
lines() {
    console_lines "$console" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' |
        grep -aE '^((PASS|FAIL|INFO) |[0-9]+ passed, [0-9]+ failed|l2(-inproc)?\| |AIRLOCK-GUEST-EXIT )' || true
}
while :; do
    mapfile -t got < <(lines)
    for ((i = shown; i < ${#got[@]}; i++)); do
        l=${got[i]}
        case "$l" in
            "INFO l1:"*) milestone l1 ;;&
            "INFO l1: airlock"*listening*) milestone airlock ;;&
            "INFO l1: starting L2"*) milestone l2start ;;&
            "l2| "*SeaBIOS*) milestone l2bios ;;&
            "l2| "*"INFO l2: init"*) milestone l2init ;;&
            "l2| PASS l2-nvme-probe"* | "l2| FAIL l2-nvme-probe"*) milestone l2probe ;;&
            "l2| INFO l2: nvme phase start"*) milestone io_start ;;&
            "l2| INFO l2: nvme phase took"*) milestone io_end ;;&
            "l2| AIRLOCK-L2-EXIT"*) milestone l2exit ;;&
            "INFO l1: L2 QEMU exited"*) milestone l2gone ;;&
            *) ;;
        esac
        printf '   %s\n' "$l"
        last_progress=$EPOCHREALTIME
    done
    shown=${#got[@]}
    marker=$(printf '%s\n' "${got[@]}" | grep -aE '^AIRLOCK-GUEST-EXIT [0-9]+$' | tail -n1 || true)
    [[ -n $marker ]] && break
    kill -0 "$qpid" 2>/dev/null || break
    now=$EPOCHREALTIME
    if ((${now%[.,]*} - ${t_boot%[.,]*} >= timeout_s)); then
        timed_out=1
        break
    fi
    if ((${now%[.,]*} - ${last_progress%[.,]*} >= 60)); then
        note "... still running ($(elapsed "$t_boot") s since L1 start; last console line: $(tail -n1 "$console" | tr -d '\r\033' | cut -c1-100))"
        last_progress=$now
    fi
    sleep 0.2
done
t_end=$EPOCHREALTIME
for ((i = 0; i < 100 && ${#marker} > 0; i++)); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
stop_qemu   # L1's QEMU has exited (or is killed) before the image is read
mapfile -t got < <(lines)
for ((i = shown; i < ${#got[@]}; i++)); do printf '   %s\n' "${got[i]}"; done
tr -d '\r' <"$console" | sed -n 's/^airlock| //p' >"$LOG_DIR/airlock.log"

# --- results ------------------------------------------------------------------
l2_summary=$(printf '%s\n' "${got[@]}" | sed -n 's/^l2| \([0-9]* passed, [0-9]* failed\)$/\1/p' | tail -n1)
p=$(printf '%s\n' "${got[@]}" | grep -cE '^(l2(-inproc)?\| )?PASS ' || true)
f=$(printf '%s\n' "${got[@]}" | grep -cE '^(l2(-inproc)?\| )?FAIL ' || true)
hp=0 hf=0
hpass() { echo "PASS $*"; hp=$((hp + 1)); }
hfail() { echo "FAIL $*"; hf=$((hf + 1)); }
if ((timed_out)); then
    hfail "nested-l2-nvme: timeout after $timeout_s s (console: $console)"
elif [[ -z $marker ]]; then
    hfail "nested-l2-nvme: L1 stopped without an AIRLOCK-GUEST-EXIT line (console: $console)"
    tail -n 5 "$console" | sed 's/^/   | /'
elif [[ -z $l2_summary ]]; then
    hfail "nested-l2-nvme: L2 printed no summary (console: $console)"
fi
if [[ -n ${seen_at[l2exit]:-} ]]; then
    # The host's view of the disk after L1's QEMU exited (flushed on exit).
    bsum=$(dd if="$disk" bs=1M skip=$b_off_mib count=$b_mib status=none | sha256sum | cut -d' ' -f1)
    if [[ $bsum == "$b_sum" ]]; then
        hpass "host-disk-pattern-b: the raw image holds L2's pattern B at $b_off_mib MiB"
    else
        hfail "host-disk-pattern-b: sha256 $bsum at $b_off_mib MiB, want $b_sum"
    fi
    if cmp -s "$disk" "$expect_img"; then
        hpass "host-disk-rest: every other byte of the image is still pattern A"
    else
        hfail "host-disk-rest: image differs from A+B: $(cmp "$disk" "$expect_img" 2>&1 | head -n1)"
    fi
fi
if { ((f + hf)) || [[ -z $l2_summary ]]; } && [[ -s $LOG_DIR/airlock.log ]]; then
    echo "airlock's log in L1 ($LOG_DIR/airlock.log):"
    sed 's/^/   | /' "$LOG_DIR/airlock.log" | tail -n 40
fi

span() { # span NAME FROM TO: "NAME X s" if both milestones were seen
    local a=${seen_at[$2]:-} b=${seen_at[$3]:-}
    [[ $2 == boot ]] && a=$t_boot
    [[ $3 == end ]] && b=$t_end
    if [[ -n $a && -n $b ]]; then printf '%s %s s' "$1" "$(elapsed "$a" "$b")"; else printf '%s -' "$1"; fi
}
echo "INFO timings (host clock): $(span 'L1 boot to /test' boot l1); $(span 'L1 /test to airlock listening' l1 airlock);" \
    "$(span 'L2 QEMU start to SeaBIOS banner' l2start l2bios); $(span 'L2 QEMU start to L2 /init' l2start l2init); $(span 'L2 /init to nvme ready' l2init l2probe);" \
    "$(span 'nvme read/write phase' io_start io_end); $(span 'L2 QEMU start to L2 exit' l2start l2gone);" \
    "$(span 'L1 QEMU start to end' boot end); whole script $(elapsed "$t_start") s"
[[ -n $l2_summary ]] && echo "INFO L2 result: $l2_summary"
# viommu_figures: airlock's DMA_MAP/DMA_UNMAP per nvme I/O over its session
# (the I/Os L2's block layer completed, /sys/block/nvme0n1/stat; the
# driver's admin commands map too) and its median time per map and unmap.
viommu_figures() {
    local sess ios maps unmaps inb nb
    sess=$(grep -a -m1 'session ended' "$LOG_DIR/airlock.log" || true)
    ios=$(printf '%s\n' "${got[@]}" | sed -n 's/^l2| INFO l2: nvme0n1 I\/Os: \([0-9]*\) reads, \([0-9]*\) writes.*/\1 \2/p' | tail -n1)
    maps=$(sed -nE 's/.* ([0-9]+) DMA maps, ([0-9]+) DMA unmaps.*/\1 \2/p' <<<"$sess")
    read -r maps unmaps <<<"$maps"
    read -r r w <<<"$ios"
    if [[ -z $maps || -z $r ]]; then
        echo "   vIOMMU ($viommu): (airlock's session line or L2's I/O count missing)"
        return
    fi
    # With patch 22, a batch's maps come in one DMA_MAP_MULTI (and its
    # unmaps in one DMA_UNMAP_MULTI): the messages are fewer than the maps.
    local batched
    batched=$(sed -nE 's/.* DMA unmaps \(([0-9]+) of them in ([0-9]+) .*/\1 \2/p' <<<"$sess")
    read -r inb nb <<<"${batched:-0 0}"
    awk -v m="$maps" -v u="$unmaps" -v n=$((r + w)) -v v="$viommu" -v inb="$inb" -v nb="$nb" 'BEGIN {
        printf "   vIOMMU (%s): airlock got %d DMA_MAP and %d DMA_UNMAP for %d nvme I/Os: %.2f maps and %.2f unmaps per I/O\n", v, m, u, n, m / n, u / n
        printf "   vIOMMU (%s): %d of them in %d DMA_MAP_MULTI/DMA_UNMAP_MULTI: %.2f map and unmap messages per I/O\n", v, inb, nb, (m + u - inb + nb) / n }'
    sed -nE 's/.*(handled in .*)/   airlock \1/p' <<<"$sess" | sed 's/ device=.*//'
}
if [[ -n ${L2_COMPARE:-} ]]; then
    # BENCH NAME OPS SECONDS IRQS from both L2 runs, as airlock/in-process.
    bench() { printf '%s\n' "${got[@]}" | sed -n "s/^$1 BENCH $2 //p" | tail -n1; }
    printf '   %-10s %-26s %-26s %s\n' "L2 reads" "airlock (vfio-user)" "in-process vfio-pci" "airlock/in-process"
    for b in read-4k read-128k; do
        read -r ao as ai <<<"$(bench 'l2|' $b)"
        read -r io is ii <<<"$(bench 'l2-inproc|' $b)"
        awk -v b="$b" -v ao="${ao:-0}" -v as="${as:-0}" -v ai="${ai:-0}" -v io="${io:-0}" -v is="${is:-0}" -v ii="${ii:-0}" 'BEGIN {
            if (as <= 0 || is <= 0) { printf "   %-10s (missing)\n", b; exit }
            printf "   %-10s %7.1f IOPS %6.1f irq/s   %7.1f IOPS %6.1f irq/s   IOPS %.2f, irq/s %.2f\n", b, ao / as, ai / as, io / is, ii / is, (ao / as) / (io / is), (ii > 0 ? (ai / as) / (ii / is) : 0)
        }'
    done | tee "$LOG_DIR/compare.txt"
    if [[ -n $viommu ]]; then
        viommu_figures | tee -a "$LOG_DIR/compare.txt"
    fi
fi
rc=0
((f + hf == 0)) || rc=1
[[ -n $l2_summary ]] || rc=1
((timed_out)) && rc=124
echo "$((p + hp)) passed, $((f + hf)) failed"
exit "$rc"
