#!/bin/sh
# /test inside the L1 guest of tests/e2e/nested-devices-x86_64.sh (busybox sh).
# L1 has an igb (82576, SR-IOV) on a root port, an e1000e on the same QEMU
# hub (the far end of the wire) and an ivshmem-plain. This script:
#   - makes 3 VFs, prints each one's BDF and IOMMU group (distinct, through
#     Linux's ACS quirk for the 82576), binds VF0, VF1, VF2 and the ivshmem
#     to vfio-pci, and starts the reflector (airlock-wire reflect) on the e1000e
#   - starts three airlocks (defaults, sandbox on): VF0 on /tmp/vf0.sock, VF2
#     on /tmp/vf2.sock, the ivshmem on /tmp/bar.sock
#   - runs the L2 QEMU in the background, every line prefixed "l2| " on the
#     console and kept in /tmp/l2.log: VF0, the ivshmem and VF2 as
#     vfio-user-pci, VF1 as in-process vfio-pci, each on its own root port
#   - REQ: when L2 says "req-ready", unbinds VF2 from vfio-pci (timed) and
#     checks that airlock for VF2 exits 69 with a "device request" line
#   - ERR: when L2 says "err-ready", prints "INFO l1: inject-aer"; the host
#     injects an uncorrectable AER error into the igb PF; this waits for the
#     L2 QEMU's "Unrecoverable error detected" lines (per device) and
#     prints each hop's lines, then kills the L2 QEMU
#   - bad input: `echo 0 > sriov_numvfs` with airlock still holding VF0
#     (timed; airlock must exit 69), then SIGTERM to the ivshmem airlock and
#     its session line: no region reads or writes for BAR2 (the mmap path)
# Kernel parameters: l2.mem=SIZE (default 256M), airlock.extra=a,b (extra
# airlock arguments), l2.append=a,b (words for L2's kernel command line),
# l2.phase=SECONDS (the longest wait for each L2 milestone, default 900).
# Output: "INFO l1: ..." lines, PASS/FAIL lines, "l2| " lines, "REFLECT ..."
# lines (the reflector's counts per source MAC), airlock logs prefixed
# "airlock-vf0| ", "airlock-vf2| ", "airlock-bar| ". Exit 1 if any L1 check failed.

. /l2-boot-args.sh
up() { read -r u _ </proc/uptime; echo "$u"; }
secs() { read -r u _ </proc/uptime; echo "${u%.*}"; }
dt() { awk -v a="$1" -v b="${2:-$(up)}" 'BEGIN { printf "%.2f", b - a }'; }
say() { echo "INFO l1: $*"; }
failed=0 stuck=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
# stop: a setup failure; end here.
stop() { fail "$@"; show_logs; exit 1; }
show_logs() {
    for n in vf0 vf2 bar; do
        [ -f "/tmp/$n.log" ] && sed "s/^/airlock-$n| /" "/tmp/$n.log"
    done
    [ -f /tmp/reflect.stats ] && cat /tmp/reflect.stats
}

say "start at uptime $(up) s; kernel $(uname -r); $(grep -c ^processor /proc/cpuinfo) cpu(s), $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB"
dmesg | grep -iE 'DMAR: IOMMU enabled|DMAR-IR: Enabled|_OSC: OS now controls|AER: enabled' | while read -r l; do say "dmesg: $l"; done

l2mem=256M extra= l2append= phase=900
for w in $(cat /proc/cmdline); do
    case "$w" in
        l2.mem=*) l2mem=${w#l2.mem=} ;;
        airlock.extra=*) extra=$(echo "${w#airlock.extra=}" | tr , ' ') ;;
        l2.append=*) l2append=$(echo "${w#l2.append=}" | tr , ' ') ;;
        l2.phase=*) phase=${w#l2.phase=} ;;
    esac
done

# pci_find VENDOR:DEVICE: the first PCI function with these ids.
pci_find() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor"):$(cat "$d/device")" = "$1" ] && { echo "${d##*/}"; return; }
    done
}
group() { basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")"; }
driver() { basename "$(readlink "/sys/bus/pci/devices/$1/driver" 2>/dev/null)" 2>/dev/null; }
pf=$(pci_find 0x8086:0x10c9) partner=$(pci_find 0x8086:0x10d3) shm=$(pci_find 0x1af4:0x1110)
[ -n "$pf" ] && [ -n "$partner" ] && [ -n "$shm" ] ||
    stop "l1-setup: want igb 8086:10c9, e1000e 8086:10d3 and ivshmem 1af4:1110; found '$pf' '$partner' '$shm'"
pf_if=$(ls "/sys/bus/pci/devices/$pf/net" 2>/dev/null) wire_if=$(ls "/sys/bus/pci/devices/$partner/net" 2>/dev/null)
[ -n "$pf_if" ] && [ -n "$wire_if" ] || stop "l1-setup: no netdev for the igb ($pf: '$pf_if') or the e1000e ($partner: '$wire_if')"
peer=$(cat "/sys/class/net/$wire_if/address")
echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null
ip link set "$pf_if" up
ip link set "$wire_if" up

# --- VFs, groups, vfio-pci ---------------------------------------------------------
echo 0 >"/sys/bus/pci/devices/$pf/sriov_drivers_autoprobe"
echo 3 >"/sys/bus/pci/devices/$pf/sriov_numvfs" || stop "l1-setup: echo 3 > $pf/sriov_numvfs failed"
vfs=""
for k in 0 1 2; do vfs="$vfs $(basename "$(readlink "/sys/bus/pci/devices/$pf/virtfn$k")")"; done
set -- $vfs
vf0=$1 vf1=$2 vf2=$3
groups="" line=""
for v in $pf $vf0 $vf1 $vf2; do
    groups="$groups $(group "$v")"
    line="$line $v: group $(group "$v") ($(cat "/sys/bus/pci/devices/$v/vendor"):$(cat "/sys/bus/pci/devices/$v/device"));"
done
say "igb PF $pf ($pf_if, $(cat "/sys/class/net/$pf_if/address")) and its VFs:$line"
say "wire: $wire_if ($partner, e1000e) $peer is the reflector"
distinct=$(echo $groups | tr ' ' '\n' | sort -u | wc -l)
if [ "$distinct" = 4 ]; then
    pass "l1-vf-groups: the PF and VF0..2 are in IOMMU groups$groups, one each (the 82576 ACS quirk)"
else
    fail "l1-vf-groups: PF and VF groups$groups are not distinct: VF0 and VF1 cannot go to different users"
    for g in $groups; do say "group $g: $(ls "/sys/kernel/iommu_groups/$g/devices" | tr '\n' ' ')"; done
fi
bind() {
    d=/sys/bus/pci/devices/$1
    [ -e "$d/driver" ] && echo "$1" >"$d/driver/unbind"
    echo vfio-pci >"$d/driver_override"
    echo "$1" >/sys/bus/pci/drivers_probe
    [ "$(driver "$1")" = vfio-pci ] || stop "l1-setup: $1 did not bind to vfio-pci"
}
for v in $vf0 $vf1 $vf2 $shm; do bind "$v"; done
set -- $(sed -n 3p "/sys/bus/pci/devices/$shm/resource")
size=$(printf '%d' $(($2 - $1 + 1)))
echo "BAR l1 $shm $1 $size $([ $(($1 >> 32)) -gt 0 ] && echo above || echo below)"
if [ $(($1 >> 32)) -gt 0 ]; then
    pass "l1-bar-above-4g: ivshmem $shm BAR2 at $1, $((size >> 20)) MiB, 64-bit prefetchable, above 4 GiB"
else
    fail "l1-bar-above-4g: ivshmem $shm BAR2 at $1 ($((size >> 20)) MiB) is below 4 GiB"
fi
say "vfio-pci: VF0 $vf0, VF1 $vf1, VF2 $vf2, ivshmem $shm (group $(group "$shm"))"

/bin/airlock-wire reflect "$wire_if" /tmp/reflect.stats </dev/null >/tmp/reflect.log 2>&1 &
rpid=$!

# --- three airlocks ------------------------------------------------------------------
start_airlock() { # start_airlock NAME BDF: /tmp/NAME.sock, /tmp/NAME.log; pid in NAME_pid
    # shellcheck disable=SC2086 # $extra is split on purpose
    AIRLOCK_LOG=info NO_COLOR=1 /bin/airlock --vfio "$2" --socket-path "/tmp/$1.sock" $extra \
        </dev/null >"/tmp/$1.log" 2>&1 &
    eval "$1_pid=$!"
}
t=$(up)
start_airlock vf0 "$vf0"
start_airlock vf2 "$vf2"
start_airlock bar "$shm"
i=0
while [ $i -lt 300 ]; do
    [ -S /tmp/vf0.sock ] && [ -S /tmp/vf2.sock ] && [ -S /tmp/bar.sock ] && break
    sleep 0.1
    i=$((i + 1))
done
[ -S /tmp/vf0.sock ] && [ -S /tmp/vf2.sock ] && [ -S /tmp/bar.sock ] ||
    stop "l1-setup: the airlocks did not all listen within 30 s"
# shellcheck disable=SC2154 # set by start_airlock's eval
say "airlocks listening $(dt "$t") s after start: vf0 (pid $vf0_pid) $vf0, vf2 (pid $vf2_pid) $vf2, bar (pid $bar_pid) $shm${extra:+ (extra: $extra)}"

# --- L2 ------------------------------------------------------------------------------
cr=$(printf '\r')
export QEMU_MODULE_DIR=/opt/qemu/modules
mkdir -p "$QEMU_MODULE_DIR"
user() { printf '{"driver":"vfio-user-pci","id":"%s","bus":"%s","socket":{"type":"unix","path":"%s"}}' "$1" "$2" "$3"; }
say "starting L2 QEMU at uptime $(up) s: TCG, q35, $l2mem memfd share=on; root ports 00:10-13: vfio-user-pci vf0.sock, vfio-pci $vf1, vfio-user-pci bar.sock, vfio-user-pci vf2.sock"
t_l2=$(up)
: >/tmp/l2.log
{
    # shellcheck disable=SC2086 # $l2append is split on purpose
    /opt/qemu/lib/ld-linux-x86-64.so.2 --library-path /opt/qemu/lib --argv0 qemu-system-x86_64 \
        /opt/qemu/bin/qemu-system-x86_64 -L /opt/qemu/share \
        -accel tcg -M q35 -m "$l2mem" \
        -object "memory-backend-memfd,id=mem,size=$l2mem,share=on" -machine memory-backend=mem \
        -nographic -nodefaults -serial stdio -no-reboot -pidfile /tmp/l2.pid \
        -device pcie-root-port,id=rp1,chassis=1,slot=1,addr=10.0 \
        -device pcie-root-port,id=rp2,chassis=2,slot=2,addr=11.0 \
        -device pcie-root-port,id=rp3,chassis=3,slot=3,addr=12.0 \
        -device pcie-root-port,id=rp4,chassis=4,slot=4,addr=13.0 \
        -device "$(user vf0 rp1 /tmp/vf0.sock)" \
        -device "vfio-pci,id=vf1,bus=rp2,host=$vf1" \
        -device "$(user bar rp3 /tmp/bar.sock)" \
        -device "$(user vf2 rp4 /tmp/vf2.sock)" \
        -kernel /l2/vmlinux -initrd /l2/initrd.cpio \
        -append "console=ttyS0 quiet panic=-1 $L2_BOOT_ARGS devs.slots=10,11,12,13 wire.peer=$peer $l2append" </dev/null 2>&1
    echo "AIRLOCK-L2-QEMU-RC $?"
} | while IFS= read -r l; do
    l=${l%"$cr"}
    echo "$l" >>/tmp/l2.log
    # QEMU's vfio-user client DMA_MAPs each other device's BAR mmap (no fd:
    # airlock refuses it, EINVAL, then the UNMAP, ENOENT) every time the
    # guest moves a BAR: hundreds of lines; shown once, counted at the end.
    case "$l" in
        *"error reply on async"* | *"request command "[0-9]*" error "* | *"request: command "[0-9]*" error "*)
            [ -n "$async_seen" ] && continue
            async_seen=1
            echo "l2| $l (further lines like it are counted, not shown)"
            ;;
        *) echo "l2| $l" ;;
    esac
done &

l2_gone() { grep -q '^AIRLOCK-L2-QEMU-RC' /tmp/l2.log; }
# wait_l2 REGEX SECONDS: until a line of the L2 QEMU matches (0), or it
# exits or time runs out (1).
wait_l2() {
    end=$(($(secs) + $2))
    while :; do
        grep -qE "$1" /tmp/l2.log && return 0
        l2_gone && return 1
        [ "$(secs)" -lt $end ] || return 1
        sleep 0.2
    done
}
# reap PID: xrc = its exit status once it has ended, "running" if it has
# not (call it in this shell, not in $(...): only the parent can wait).
reap() {
    if kill -0 "$1" 2>/dev/null; then
        xrc=running
    else
        wait "$1"
        xrc=$?
    fi
}
# timed_write VALUE FILE NAME: write in the background; /tmp/NAME.done gets
# "STATUS UPTIME" when the write returns.
timed_write() {
    rm -f "/tmp/$3.done"
    (
        echo "$1" >"$2"
        echo "$? $(up)" >"/tmp/$3.done"
    ) &
}
# wait_done NAME SECONDS: 0 once /tmp/NAME.done exists.
wait_done() {
    end=$(($(secs) + $2))
    while :; do
        [ -f "/tmp/$1.done" ] && return 0
        [ "$(secs)" -lt $end ] || return 1
        sleep 0.05
    done
}
stop_l2() { # stop_l2: SIGTERM to the L2 QEMU, SIGKILL after 30 s
    l2_gone && return
    kill "$(cat /tmp/l2.pid)" 2>/dev/null
    wait_l2 '^AIRLOCK-L2-QEMU-RC' 30 || kill -9 "$(cat /tmp/l2.pid)" 2>/dev/null
    wait_l2 '^AIRLOCK-L2-QEMU-RC' 10
}
# released NAME AIRLOCK_PID WRITE_T0 WHAT: the verdicts after a write that
# made VFIO ask airlock NAME for its device: the write returns within 5 s
# (airlock lets go within 4.5 s: a 3 s grace for its client, then stop, then
# kill; the patched L2 QEMU closes its copy of the device fd, the BAR mmaps
# and region fds, as soon as the request reaches it: qemu-patches/ patch 17),
# airlock's exit status (69) and its "device request" line. If the write
# still blocks after 25 s, airlock gets SIGTERM; if it blocks 10 s more, the
# L2 QEMU (which holds the device's VFIO fd airlock gave it for the BAR
# mmaps) is stopped too, so that the run goes on (stuck=1).
released() {
    name=$1 apid=$2 t0=$3 what=$4 gone_at=""
    # watch_write SECONDS: wait for the write, noting when airlock ends.
    watch_write() {
        end=$(($(secs) + $1))
        while [ ! -f "/tmp/$name-write.done" ] && [ "$(secs)" -lt $end ]; do
            [ -z "$gone_at" ] && ! kill -0 "$apid" 2>/dev/null && gone_at=$(up)
            sleep 0.05
        done
        [ -z "$gone_at" ] && ! kill -0 "$apid" 2>/dev/null && gone_at=$(up)
        [ -f "/tmp/$name-write.done" ]
    }
    airlock_when() { [ -n "$gone_at" ] && echo "airlock for $name ended $(dt "$t0" "$gone_at") s after the write began" || echo "airlock for $name still runs"; }
    if watch_write 5; then
        read -r st at <"/tmp/$name-write.done"
        pass "l1-$name-released: $what returned (status $st) after $(dt "$t0" "$at") s; $(airlock_when)"
    elif watch_write 20; then
        read -r st at <"/tmp/$name-write.done"
        fail "l1-$name-released: $what took $(dt "$t0" "$at") s (status $st; want <= 5 s); $(airlock_when)"
    else
        fail "l1-$name-released: $what still blocked after 25 s; $(airlock_when)"
        kill "$apid" 2>/dev/null
        if ! watch_write 10 && ! l2_gone; then
            say "$name: $what still blocked 10 s after airlock's SIGTERM: stopping the L2 QEMU (it holds the VFIO device fd too)"
            stuck=1
            stop_l2
        fi
        watch_write 30 && read -r st at <"/tmp/$name-write.done" &&
            say "$name: $what returned $(dt "$t0" "$at") s after it began"
    fi
    i=0
    while kill -0 "$apid" 2>/dev/null && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    reap "$apid"
    if [ "$xrc" = 69 ]; then
        pass "l1-$name-exit-69: airlock for $name exited 69 after VFIO's device request"
    else
        fail "l1-$name-exit-69: airlock for $name: exit status $xrc (want 69)"
    fi
    req=$(grep -i -m 1 'device request' "/tmp/$name.log")
    if [ -n "$req" ]; then
        pass "l1-$name-logged: airlock for $name: $req"
    else
        fail "l1-$name-logged: airlock for $name logged no line naming the device request"
    fi
}

# --- REQ ---------------------------------------------------------------------
if wait_l2 'INFO l2: req-ready' "$phase"; then
    say "REQ: unbinding VF2 $vf2 from vfio-pci at uptime $(up) s (airlock for vf2 holds it; L2 drives it)"
    dmesg -c >/dev/null
    t=$(up)
    timed_write "$vf2" /sys/bus/pci/drivers/vfio-pci/unbind vf2-write
    released vf2 "$vf2_pid" "$t" "echo $vf2 > vfio-pci/unbind"
    dmesg | grep -iE 'vfio|request|remov' | tail -n 8 | while read -r l; do say "dmesg: $l"; done
    wait_l2 'l2-req-unplug' 60
else
    fail "l1-req: L2 never said req-ready (L2 QEMU $(l2_gone && echo exited || echo running) after $(dt "$t_l2") s)"
fi

# --- ERR -------------------------------------------------------------------------
# cfg BDF OFFSET BYTES: a config-space value (little-endian) as 0x...
cfg() {
    h=$(xxd -p -s "$2" -l "$3" "/sys/bus/pci/devices/$1/config") r=""
    while [ -n "$h" ]; do
        r=${h%"${h#??}"}$r
        h=${h#??}
    done
    echo "0x$r"
}
# excap BDF ID: offset of the PCIe extended capability ID (AER is 1).
excap() {
    o=256
    while [ "$o" -ne 0 ]; do
        x=$(($(cfg "$1" "$o" 4)))
        [ $((x & 0xffff)) = "$2" ] && { echo "$o"; return; }
        o=$((x >> 20))
    done
}
# pcicap BDF ID: offset of the capability ID (PCI Express is 0x10).
pcicap() {
    o=$(($(cfg "$1" 0x34 1)))
    while [ "$o" -ne 0 ]; do
        [ $(($(cfg "$1" "$o" 1))) = $(($2)) ] && { echo "$o"; return; }
        o=$(($(cfg "$1" $((o + 1)) 1)))
    done
}
# aer_state BDF: what the function's own registers say about errors.
aer_state() {
    e=$(pcicap "$1" 0x10) a=$(excap "$1" 1)
    echo "DEVCTL $(cfg "$1" $((e + 8)) 2) DEVSTA $(cfg "$1" $((e + 10)) 2) AER uncorrectable status $(cfg "$1" $((a + 4)) 4) mask $(cfg "$1" $((a + 8)) 4)"
}
aer_seen() { dmesg | grep -q 'AER: '; }
rp=$(basename "$(dirname "$(readlink -f "/sys/bus/pci/devices/$pf")")")
if [ "$stuck" = 1 ]; then
    fail "l1-err: not run: the L2 QEMU was stopped to release VF2 (see l1-vf2-released)"
elif wait_l2 'INFO l2: err-ready' 300; then
    dmesg -c >/dev/null
    t=$(up)
    # First into the PF itself (the host runs pcie_aer_inject_error pf0 ...).
    say "inject-aer"
    end=$(($(secs) + 15))
    while ! aer_seen && [ "$(secs)" -lt $end ]; do sleep 0.5; done
    if aer_seen; then
        say "ERR hop 1: the error injected into the PF reached L1's AER driver after $(dt "$t") s"
    else
        say "ERR hop 1: no AER report in L1 $(dt "$t") s after the injection into the PF $pf; its registers: $(aer_state "$pf") (the error is logged, but QEMU's igb keeps DEVCTL's error reporting enables read-only 0, so it never sends ERR_NONFATAL upstream)"
        # Then into its root port: the same recovery walks the port's bus (the PF and its VFs).
        t=$(up)
        say "inject-aer-port"
        end=$(($(secs) + 15))
        while ! aer_seen && [ "$(secs)" -lt $end ]; do sleep 0.5; done
        aer_seen && say "ERR hop 1: the error injected into root port $rp reached L1's AER driver after $(dt "$t") s"
    fi
    # One line per device whose ERR eventfd fired (vfio-user:<socket> or the BDF).
    end=$(($(secs) + 45))
    while [ "$(grep -c 'Unrecoverable error detected' /tmp/l2.log)" -lt 2 ] && ! l2_gone && [ "$(secs)" -lt $end ]; do
        sleep 0.2
    done
    sleep 1
    dmesg | grep -iE 'aer|pcieport|igb|vfio|error|recover|reset' | head -n 30 | while read -r l; do say "ERR hop 2 (L1 kernel): $l"; done
    grep -E 'Unrecoverable|vfio_err' /tmp/l2.log | head -n 6 | while read -r l; do say "ERR hop 3 (L2 QEMU): $l"; done
    say "ERR: $(dt "$t") s after the injection the L2 QEMU process has $(l2_gone && echo exited || echo "not exited (vm_stop pauses the guest; it is stopped next)")"
    if grep -q 'vfio-user:/tmp/vf0.sock) Unrecoverable error detected' /tmp/l2.log; then
        pass "l1-err-airlock: VF0's ERR eventfd (QEMU's, handed to VFIO through airlock's SET_IRQS index 3) reached the L2 QEMU: $(grep -m 1 'vf0.sock) Unrecoverable' /tmp/l2.log)"
    else
        fail "l1-err-airlock: no 'Unrecoverable error detected' from the L2 QEMU for vfio-user:/tmp/vf0.sock within $(dt "$t") s"
    fi
    if grep -q "($vf1) Unrecoverable error detected" /tmp/l2.log; then
        pass "l1-err-inproc: VF1's ERR eventfd (in-process vfio-pci) reached the L2 QEMU: $(grep -m 1 "($vf1) Unrecoverable" /tmp/l2.log)"
    else
        fail "l1-err-inproc: no 'Unrecoverable error detected' from the L2 QEMU for $vf1 within $(dt "$t") s"
    fi
else
    fail "l1-err: L2 never said err-ready (L2 QEMU $(l2_gone && echo exited || echo running))"
fi
stop_l2
say "L2 QEMU printed $(grep -c 'error reply on async' /tmp/l2.log) 'error reply on async request' lines (DMA_MAP of other devices' BARs, refused)"
say "L2 QEMU ended: $(grep -m 1 '^AIRLOCK-L2-QEMU-RC' /tmp/l2.log), $(dt "$t_l2") s after its start"

# --- bad input: sriov_numvfs=0 under airlock's VF0 -------------------------------
sleep 1
say "numvfs: echo 0 > $pf/sriov_numvfs at uptime $(up) s (airlock for vf0 holds VF0, no client)"
dmesg -c >/dev/null
t=$(up)
timed_write 0 "/sys/bus/pci/devices/$pf/sriov_numvfs" vf0-write
released vf0 "$vf0_pid" "$t" "echo 0 > sriov_numvfs"
dmesg | grep -iE 'vfio|request|igb' | tail -n 8 | while read -r l; do say "dmesg: $l"; done
say "VFs left: $(ls -d /sys/bus/pci/devices/"$pf"/virtfn* 2>/dev/null | wc -l)"

# --- the ivshmem airlock's session: BAR2 never went through the socket -------------
kill "$bar_pid" 2>/dev/null
i=0
while kill -0 "$bar_pid" 2>/dev/null && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
reap "$bar_pid"
say "airlock for bar: exit status $xrc after SIGTERM"
sess=$(grep -m 1 'session ended' /tmp/bar.log)
reads=$(echo "$sess" | sed -n 's/.*region reads per index \[\([^]]*\)\].*/\1/p')
writes=$(echo "$sess" | sed -n 's/.*region writes per index \[\([^]]*\)\].*/\1/p')
r2=$(echo "$reads" | cut -d, -f3 | tr -d ' ') w2=$(echo "$writes" | cut -d, -f3 | tr -d ' ')
if [ -z "$sess" ]; then
    fail "l1-bar-mmap-path: airlock for the ivshmem logged no session line"
elif [ "$r2" = 0 ] && [ "$w2" = 0 ]; then
    pass "l1-bar-mmap-path: BAR2 (region 2) saw 0 reads and 0 writes through the socket (session ended${sess#*session ended})"
else
    fail "l1-bar-mmap-path: region 2 reads '$r2', writes '$w2' (want 0 and 0): $sess"
fi

kill "$rpid" 2>/dev/null
show_logs
[ "$failed" = 0 ]
