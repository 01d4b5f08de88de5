#!/bin/sh
# /init of the L2 guest of tests/e2e/nested-devices-x86_64.sh (busybox sh).
# L2's QEMU (in L1) gives it four devices, each on its own pcie-root-port
# (slots from devs.slots=A,B,C,D, in this order):
#   A  igb VF0 through airlock (vfio-user-pci)        "vf-airlock"
#   B  igb VF1 through QEMU's in-process vfio-pci     "vf-inproc"
#   C  ivshmem (1af4:1110) through airlock            its BAR2
#   D  igb VF2 through airlock, unplugged by L1's unbind (REQ)
# Phases:
#   1. traffic: igbvf on A and B; airlock-wire sends checksummed raw
#      Ethernet frames (EtherType 0x88b5) to L1's reflector (wire.peer=MAC)
#      through both VFs, interleaved in rounds (wire.rounds/frames/window/rtt;
#      no round starts after wire.budget seconds once two are done; 0: none)
#   2. BAR: mmap C's resource2, check the host's pattern P0 at
#      bar.p0=OFF:OFF:..., write P1 at bar.p1=OFF:OFF:...
#   3. REQ: frames trickle through D; "INFO l2: req-ready"; L1 unbinds VF2
#      from vfio-pci; L2 waits for D to vanish (hot-unplug)
#   4. ERR: "N passed, M failed", "INFO l2: err-ready", then idles: L1 has
#      the host inject an AER error into the igb PF, and QEMU stops L2.
# Output: "INFO l2: ..." lines, PASS/FAIL lines, ROUND and BENCH lines.
export PATH=/bin HOME=/
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1

up() { read -r u _ </proc/uptime; echo "$u"; }
# secs: whole seconds of uptime (loops wait by the clock: under TCG inside
# TCG every sleep and fork takes far longer than it says)
secs() { read -r u _ </proc/uptime; echo "${u%.*}"; }
dt() { awk -v a="$1" -v b="${2:-$(up)}" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "INFO l2: $*"; }
passed=0 failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
# counted FILE: add FILE's PASS/FAIL lines (a program's output) to the tally.
counted() {
    passed=$((passed + $(grep -c '^PASS ' "$1")))
    failed=$((failed + $(grep -c '^FAIL ' "$1")))
}
idle() {
    echo "$passed passed, $failed failed"
    say "err-ready at uptime $(up) s"
    while :; do sleep 3600; done
}

echo # end SeaBIOS's "Booting from ROM.." line
slots=10,11,12,13 peer="" rounds=4 frames=500 window=16 rtt=100 budget=0 p0="" p1=""
for w in $(cat /proc/cmdline); do
    case "$w" in
        devs.slots=*) slots=${w#devs.slots=} ;;
        wire.peer=*) peer=${w#wire.peer=} ;;
        wire.rounds=*) rounds=${w#wire.rounds=} ;;
        wire.frames=*) frames=${w#wire.frames=} ;;
        wire.window=*) window=${w#wire.window=} ;;
        wire.rtt=*) rtt=${w#wire.rtt=} ;;
        wire.budget=*) budget=${w#wire.budget=} ;;
        bar.p0=*) p0=$(echo "${w#bar.p0=}" | tr : ,) ;;
        bar.p1=*) p1=$(echo "${w#bar.p1=}" | tr : ,) ;;
    esac
done
say "init at uptime $(up) s; kernel $(uname -r); $(grep -c ^processor /proc/cpuinfo) cpu(s), $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB"
# Where the boot spent its time: gaps over 5 s between kernel messages.
dmesg | awk '{ t = substr($0, 2, index($0, "]") - 2) + 0 }
    NR > 1 && t - p > 5 { printf "INFO l2: boot gap %.1f s before: %s\n", t - p, substr($0, 1, 140) }
    { p = t }'
echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null

t0=$(up)
for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m" || fail "l2-insmod: $m"
done

# below SLOT: the BDF of the device behind root port 00:SLOT.0.
below() {
    for d in /sys/bus/pci/devices/*; do
        case "$(readlink -f "$d")" in
            */0000:00:$1.0/0000:*) echo "${d##*/}"; return ;;
        esac
    done
}
# netdev BDF: its network interface.
netdev() { ls "/sys/bus/pci/devices/$1/net" 2>/dev/null | head -n 1; }
describe() { # describe BDF
    d=/sys/bus/pci/devices/$1
    echo "$1 $(cat "$d/vendor"):$(cat "$d/device") driver $(basename "$(readlink "$d/driver")")"
}

s_air=$(echo "$slots" | cut -d, -f1) s_inp=$(echo "$slots" | cut -d, -f2)
s_bar=$(echo "$slots" | cut -d, -f3) s_req=$(echo "$slots" | cut -d, -f4)
end=$(($(secs) + 300))
while :; do
    vf0=$(below "$s_air") vf1=$(below "$s_inp") vf2=$(below "$s_req")
    if0=$(netdev "$vf0") if1=$(netdev "$vf1") if2=$(netdev "$vf2")
    [ -n "$if0" ] && [ -n "$if1" ] && [ -n "$if2" ] && break
    [ "$(secs)" -lt $end ] || break
    sleep 0.5
done
say "insmod $(tr '\n' ' ' </etc/modules.order)and igbvf probe took $(dt "$t0") s"
dmesg | grep -iE 'igbvf' | tail -n 12 | while read -r l; do say "dmesg: $l"; done
if [ -z "$if0" ] || [ -z "$if1" ] || [ -z "$if2" ]; then
    for d in /sys/bus/pci/devices/*; do say "pci: $(describe "${d##*/}") at $(readlink -f "$d")"; done
    fail "l2-vfs: igbvf interfaces behind slots $s_air/$s_inp/$s_req: '$if0' '$if1' '$if2'"
    idle
fi
for n in "$if0" "$if1" "$if2"; do ip link set "$n" up; done
end=$(($(secs) + 180))
while :; do
    c=0
    for n in "$if0" "$if1" "$if2"; do [ "$(cat "/sys/class/net/$n/carrier" 2>/dev/null)" = 1 ] && c=$((c + 1)); done
    [ $c = 3 ] && break
    [ "$(secs)" -lt $end ] || break
    sleep 0.5
done
for x in "vf-airlock $vf0 $if0" "vf-inproc $vf1 $if1" "vf-req $vf2 $if2"; do
    set -- $x
    say "$1: $(describe "$2"), $3 $(cat "/sys/class/net/$3/address") carrier $(cat "/sys/class/net/$3/carrier" 2>/dev/null)"
done
if [ $c = 3 ]; then
    pass "l2-vfs-up: igbvf drives VF0 (airlock, $vf0 $if0), VF1 (in-process, $vf1 $if1) and VF2 (airlock, $vf2 $if2), all with carrier, $(dt "$t0") s after insmod"
else
    fail "l2-vfs-up: $c of 3 interfaces have carrier after 180 s"
fi

# --- 1. traffic ----------------------------------------------------------------
irqs() { grep -E "$1" /proc/interrupts | awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; else break } END { print s + 0 }'; }
say "traffic phase start at uptime $(up) s: $rounds rounds x ($frames frames, window $window + $rtt one at a time) per VF, peer $peer"
t=$(up)
q0=$(irqs "$if0") q1=$(irqs "$if1")
/airlock-wire traffic --peer "$peer" --rounds "$rounds" --frames "$frames" --window "$window" --rtt "$rtt" --budget-s "$budget" \
    "vf-airlock=$if0" "vf-inproc=$if1" >/tmp/traffic.out 2>&1 &
wp=$!
# Stream its lines as they come (the console is L1's progress view).
shown=0
while :; do
    running=0
    kill -0 $wp 2>/dev/null && running=1
    n=$(wc -l </tmp/traffic.out)
    [ "$n" -gt "$shown" ] && sed -n "$((shown + 1)),${n}p" /tmp/traffic.out
    shown=$n
    [ $running = 1 ] || break
    sleep 1
done
wait $wp
counted /tmp/traffic.out
say "traffic phase took $(dt "$t") s (guest clock); interrupts: $if0 $(($(irqs "$if0") - q0)), $if1 $(($(irqs "$if1") - q1))"

# --- 2. the BAR ----------------------------------------------------------------
bar=$(below "$s_bar")
if [ -z "$bar" ] || [ "$(cat "/sys/bus/pci/devices/$bar/vendor"):$(cat "/sys/bus/pci/devices/$bar/device")" != 0x1af4:0x1110 ]; then
    fail "l2-bar: no ivshmem (1af4:1110) behind slot $s_bar (found '${bar:-nothing}')"
else
    set -- $(sed -n 3p "/sys/bus/pci/devices/$bar/resource")
    size=$(printf '%d' $(($2 - $1 + 1)))
    hi=below
    [ $(($1 >> 32)) -gt 0 ] && hi=above
    say "ivshmem $bar: BAR2 at $1, $((size >> 20)) MiB ($hi 4 GiB), flags $3"
    echo "BAR l2 $bar $1 $size $hi"
    /airlock-wire bar "/sys/bus/pci/devices/$bar/resource2" P0 "$p0" P1 "$p1" >/tmp/bar.out 2>&1
    cat /tmp/bar.out
    counted /tmp/bar.out
fi

# --- 3. REQ: L1 unbinds VF2 from vfio-pci; QEMU should unplug it ------------------
/airlock-wire trickle --peer "$peer" --interval-ms 100 --max-s 300 "$if2" >/tmp/trickle.out 2>&1 &
tp=$!
sleep 2
t=$(up)
say "req-ready at uptime $t s: VF2 $vf2 ($if2) is up with frames trickling; waiting for it to be unplugged"
end=$(($(secs) + 90))
while [ -e "/sys/bus/pci/devices/$vf2" ] && [ "$(secs)" -lt $end ]; do
    sleep 0.2
done
if [ -e "/sys/bus/pci/devices/$vf2" ]; then
    fail "l2-req-unplug: VF2 $vf2 still present $(dt "$t") s after req-ready"
    kill $tp 2>/dev/null
else
    pass "l2-req-unplug: VF2 $vf2 ($if2) unplugged $(dt "$t") s after req-ready"
fi
wait $tp
cat /tmp/trickle.out
dmesg | grep -iE 'igbvf|pcie_hp|pciehp|acpiphp|eject|remov' | tail -n 6 | while read -r l; do say "dmesg: $l"; done

# --- 4. ERR: idle until QEMU stops this guest --------------------------------------
idle
