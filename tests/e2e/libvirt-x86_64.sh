#!/usr/bin/env bash
# tests/e2e/libvirt-x86_64.sh: a libvirt domain whose QEMU drives airlock.
# A real libvirtd (and virtlogd) from Debian's trixie-backports
# (scripts/setup-libvirt-root.sh) runs chrooted in a private mount and pid
# namespace; airlock runs outside it, built from this tree (sandbox on), with
# its socket in a directory bind-mounted into the chroot at /run/airlock. The
# domain is the shipped backend/libvirt/airlock-edu.xml, as is: libvirt has no
# vfio-user device type, so the device comes through <qemu:commandline>, and
# the guest RAM is a shared memfd (<memoryBacking>). QEMU runs as libvirt's
# unprivileged user, libvirt-qemu.
#   a. airlock without --socket-group: its socket is 0600 root's, and
#      `virsh start` fails with QEMU's EACCES ("Permission denied")
#   b. airlock with --socket-group <libvirt-qemu's gid>: `virsh start`; QEMU
#      runs as libvirt-qemu; the guest program (tests/guest) passes every check
#   c. `virsh destroy`: airlock sees the client leave and quiesces the device
#   d. a second `virsh start` of the same domain is served by the same airlock
#      and passes again; `virsh destroy`
#   e. the README's "With libvirt" section shows exactly the tested XML (and
#      the patched QEMU's <qemu:commandline> of f)
#   f. unless AIRLOCK_LIBVIRT_PATCHED=0 (it builds the patched QEMU on first
#      use, ~6 min; the suite runs it after qemu-patched-x86_64.sh, which has
#      built it already): the same domain with
#      airlock's patched QEMU (qemu-patches/) as its <emulator> and the
#      -chardev + vfio-user-pci chardev= form; the guest passes
# Logs: $AIRLOCK_LOG_DIR (default logs/e2e-libvirt-x86_64/). Last line:
# "N passed, M failed". Exit 0 iff all passed; 77 if it could not run.
set -euo pipefail
E2E_NAME=e2e-libvirt-x86_64
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

domain_xml="$E2E_REPO/backend/libvirt/airlock-edu.xml"
dom=airlock-edu
# The paths the domain XML names inside the chroot: the test puts its files
# there (binds and copies), so the XML runs unchanged.
in_sock=/run/airlock/edu.sock
in_images=/var/lib/libvirt/images
in_console=/var/log/libvirt/qemu/$dom.console
# The patched QEMU's device arguments (README "With libvirt" quotes them).
# -device in JSON: QEMU creates every key=value -device before the JSON ones
# libvirt gives, so a key=value vfio-user-pci would take the PCI slot libvirt
# chose for one of its own devices ("slot 1 function 0 not available for
# virtio-iommu-pci, in use by vfio-user-pci").
patched_cmdline=$(cat <<'EOF'
  <qemu:commandline>
    <qemu:arg value='-chardev'/>
    <qemu:arg value='socket,id=airlock-edu,path=/run/airlock/edu.sock,reconnect-ms=100'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='{"driver":"vfio-user-pci","chardev":"airlock-edu"}'/>
  </qemu:commandline>
EOF
)
# Where the patched build is seen in the chroot, and its launcher there: the
# build ships no firmware, so the launcher names the root's.
in_patched=/opt/airlock-qemu in_patched_qemu=/usr/local/bin/qemu-system-x86_64-airlock

section "setup"
command -v cargo >/dev/null || skip_exit "cargo not found (install a Rust toolchain)"
for tool in unshare nsenter setsid; do
    command -v "$tool" >/dev/null || skip_exit "$tool not found (util-linux)"
done
[[ $(id -u) == 0 ]] || skip_exit "needs root (a chroot and mounts for libvirtd; the Debian root)"
command -v python3 >/dev/null || need_host_pkgs python3:python3-minimal >>"$LOG_DIR/setup.log" 2>&1 ||
    skip_exit "python3 missing (the XML checks)"
t0=$(now)
"$E2E_REPO/scripts/setup-guest.sh" >>"$LOG_DIR/setup.log" 2>&1 ||
    skip_exit "guest kernel setup failed (see $LOG_DIR/setup.log)"
root=$("$E2E_REPO/scripts/setup-libvirt-root.sh" 2>>"$LOG_DIR/setup.log") ||
    skip_exit "the libvirt root could not be made (see $LOG_DIR/setup.log)"
note "libvirt root: $root ($(sed -n 1p "$root.stamp"); ready in $(elapsed "$t0") s)"
patched_dir=""
if [[ ${AIRLOCK_LIBVIRT_PATCHED:-1} == 1 ]]; then
    t0=$(now)
    patched_dir=$("$E2E_REPO/scripts/setup-qemu-patched.sh" 2>>"$LOG_DIR/setup.log") ||
        skip_exit "building the patched QEMU failed (see $LOG_DIR/setup.log)"
    note "patched QEMU: $patched_dir ($(elapsed "$t0") s)"
fi
e2e_build
# The guest program, then an idle guest: the domain must still run for
# `virsh destroy` (the stock /init powers off when /test ends).
idle_test="$IMG_DIR/libvirt-test.sh"
want=$(cat <<'EOF'
#!/bin/sh
/airlock-guest-test "$@"
echo "AIRLOCK-GUEST-DONE $?"
exec sleep 3600
EOF
)
[[ -f $idle_test && $(cat "$idle_test") == "$want" ]] || printf '%s\n' "$want" >"$idle_test"
chmod +x "$idle_test"
cpio=$(initramfs libvirt-guest-test "$GUEST_BIN:/airlock-guest-test" "$idle_test:/test")
# libvirt-qemu's group as the root knows it: airlock resolves names with the
# host's /etc/group, so it gets the number.
qemu_gid=$(awk -F: '$1 == "libvirt-qemu" { print $3 }' "$root/etc/group")
[[ -n $qemu_gid ]] || die "no libvirt-qemu group in $root/etc/group"
note "libvirt-qemu's gid in the root: $qemu_gid"
note "logs: $LOG_DIR"
rm -f "$LOG_DIR"/*.console.log "$LOG_DIR"/*.results "$LOG_DIR"/airlock*.log "$LOG_DIR"/virsh-*.txt

# What the chroot sees of the host: the socket directory and the guest's
# files, each searchable/readable by libvirt-qemu. Copies, not binds of the
# cache's files: libvirt chowns a domain's kernel and initrd to its QEMU user.
share="$RUN_DIR/airlock" images="$RUN_DIR/images"
mkdir -p "$share" "$images" "$RUN_DIR/upper" "$RUN_DIR/work" "$RUN_DIR/merged"
chmod 0755 "$share" "$images"
cp "$AIRLOCK_CACHE/guest/amd64/vmlinux" "$images/airlock-vmlinux"
cp "$cpio" "$images/airlock-test.cpio"
cp "$domain_xml" "$images/$dom.xml"
# f's domain: the shipped one with the patched QEMU and its device arguments.
python3 - "$domain_xml" "$images/$dom-patched.xml" "$patched_cmdline" "$in_patched_qemu" <<'EOF'
import re, sys
src, dst, cmdline, emulator = sys.argv[1:5]
x = open(src).read()
x = x.replace("<name>airlock-edu</name>", "<name>airlock-edu-patched</name>")
x = re.sub(r"<emulator>[^<]*</emulator>", "<emulator>%s</emulator>" % emulator, x)
x = re.sub(r"  <qemu:commandline>.*</qemu:commandline>", lambda m: cmdline, x, flags=re.S)
open(dst, "w").write(x)
EOF
chmod 0644 "$images"/*
upper="$RUN_DIR/upper" # the chroot's writes (logs, the console, libvirt's state)

# --- libvirtd in a private mount + pid namespace, chrooted -------------------
# An overlay keeps the cached root as it was built (the domain definition,
# logs and libvirt's state go to $upper and leave with $RUN_DIR). libvirt's
# config for a chroot on a host it does not manage:
#   security_driver "none"   no AppArmor/SELinux policy in here (the DAC
#                            driver still runs QEMU as user libvirt-qemu)
#   cgroup_controllers []    the cgroups are the host's: leave them alone
#   namespaces []            QEMU keeps this /dev (no private /dev of its own)
# The namespace's init stays PID 1 until TERM (then the kernel ends libvirtd,
# virtlogd and QEMU with it).
# shellcheck disable=SC2016 # expanded by the inner shell
ns_script='
root=$1 d=$2 m=$2/merged
mount -t overlay overlay -o "lowerdir=$root,upperdir=$d/upper,workdir=$d/work" "$m"
mount -t proc proc "$m/proc"
mount --rbind /dev "$m/dev"
mount --rbind /sys "$m/sys"
mount -t tmpfs -o mode=0755 tmpfs "$m/run"
mount -t tmpfs tmpfs "$m/tmp"
mkdir -p "$m/run/airlock"
mount --bind "$d/airlock" "$m/run/airlock"
mount --bind "$d/images" "$m/var/lib/libvirt/images"
if [ -n "$3" ]; then
    mkdir -p "$m$4"
    mount --bind -o ro "$3" "$m$4"
    printf "#!/bin/sh\nexec %s -L /usr/share/qemu -L /usr/share/seabios \"\$@\"\n" "$4/qemu-system-x86_64" >"$m$5"
    chmod 0755 "$m$5"
fi
printf "%s\n" "security_driver = \"none\"" "cgroup_controllers = [ ]" "namespaces = [ ]" >>"$m/etc/libvirt/qemu.conf"
printf "%s\n" "log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"" >>"$m/etc/libvirt/libvirtd.conf"
exec chroot "$m" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 /bin/sh -c "
    trap \"exit 0\" TERM
    virtlogd -d
    libvirtd -d
    while :; do sleep 1000 & wait \$!; done"'
t0=$(now)
spawn ns_pid unshare --mount --pid --fork --propagation private /bin/sh -euc "$ns_script" \
    libvirt-ns "$root" "$RUN_DIR" "$patched_dir" "$in_patched" "$in_patched_qemu" </dev/null >"$LOG_DIR/namespace.log" 2>&1
# The namespace's init, once it is chrooted (nsenter -r takes its root).
ns_init=""
for ((i = 0; i < 200; i++)); do
    ns_init=$(cut -d' ' -f1 "/proc/$ns_pid/task/$ns_pid/children" 2>/dev/null || true)
    [[ -n $ns_init && $(readlink "/proc/$ns_init/root" 2>/dev/null) == "$RUN_DIR/merged" ]] && break
    ns_init=""
    sleep 0.05
done
[[ -n $ns_init ]] || { cat "$LOG_DIR/namespace.log"; die "the libvirt namespace did not start"; }
# in_ns CMD...: run CMD inside the namespace and chroot (a clean environment).
in_ns() { nsenter -t "$ns_init" -m -p -r -w /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }
virsh() { in_ns virsh -c qemu:///system "$@"; }
for ((i = 0; i < 300; i++)); do
    virsh version >"$LOG_DIR/virsh-version.txt" 2>&1 && break
    kill -0 "$ns_pid" 2>/dev/null || break
    sleep 0.1
done
virsh version >"$LOG_DIR/virsh-version.txt" 2>&1 || {
    cat "$LOG_DIR/virsh-version.txt" "$LOG_DIR/namespace.log" "$upper/var/log/libvirt/libvirtd.log" 2>/dev/null | tail -n 20
    die "libvirtd did not answer virsh in 30 s (see above)"
}
note "libvirtd up in $(elapsed "$t0") s (namespace init: host pid $ns_init); \$ virsh version"
sed 's/^/     | /' "$LOG_DIR/virsh-version.txt" | sed '/^     | $/d'
note "\$ libvirtd --version: $(in_ns libvirtd --version)"
note "\$ qemu-system-x86_64 --version: $(in_ns qemu-system-x86_64 --version | head -n1)"
out=$(virsh define "$in_images/$dom.xml" 2>&1) || { printf '%s\n' "$out"; die "virsh define failed"; }
note "\$ virsh define $in_images/$dom.xml: $out"

# --- helpers ----------------------------------------------------------------
# serve VAR LOG [airlock options...]: airlock --emulate edu on the shared
# socket (host path), pid into VAR, waits until it listens.
serve() {
    local -n _spid=$1
    local log=$2 i
    shift 2
    rm -f "$share/edu.sock"
    spawn _spid "$AIRLOCK_BIN" --socket-path "$share/edu.sock" --emulate edu "$@" 2>"$log" </dev/null
    disown "$_spid"
    for ((i = 0; i < 100; i++)); do
        grep -q 'listening on' "$log" 2>/dev/null && return 0
        kill -0 "$_spid" 2>/dev/null || break
        sleep 0.05
    done
    cat "$log" >&2
    die "airlock did not start listening on $share/edu.sock (log: $log)"
}
# run_domain NAME DOMAIN: `virsh start DOMAIN`, wait for the guest's summary line on the
# console (only lines written after the start count), `virsh destroy`. Sets
# RUN_OK, RUN_SUM, RUN_USER (QEMU's user), RUN_DETAIL, and the times.
run_domain() {
    local name=$1 dom=$2 start_out t_start first="" rc="" results="$LOG_DIR/$1.results" i out state line
    RUN_OK=1 RUN_SUM="" RUN_USER="" RUN_DETAIL=""
    # Each start's console on its own: libvirt truncates the file at a start
    # (no append='on' in the XML), and a leftover must not count as a result.
    in_ns rm -f "$in_console"
    t_start=$(now)
    if ! start_out=$(virsh start "$dom" 2>&1); then
        note "\$ virsh start $dom: $start_out"
        RUN_OK=0 RUN_DETAIL="virsh start failed: $start_out"
        return
    fi
    RUN_START_S=$(elapsed "$t_start")
    note "\$ virsh start $dom ($RUN_START_S s): $start_out"
    # QEMU's pid from libvirt (the patched one runs as its bundled loader).
    local qpid
    qpid=$(in_ns cat "/run/libvirt/qemu/$dom.pid" 2>/dev/null || true)
    RUN_USER=$(in_ns ps -o user:20= -p "${qpid:-0}" | tr -d ' ' || true)
    note "\$ ps -o user -p \$(cat /run/libvirt/qemu/$dom.pid): ${RUN_USER:-<no QEMU process>} (pid $qpid)"
    local deadline=$((SECONDS + 120)) console=$upper$in_console
    while ((SECONDS < deadline)); do
        [[ -z $first ]] && result_lines "$console" 2>/dev/null | grep -q . && first=$(now)
        grep -qa 'AIRLOCK-GUEST-DONE' "$console" 2>/dev/null && break
        [[ $(virsh domstate "$dom" 2>/dev/null) == running ]] || break
        sleep 0.1
    done
    tr -d '\r' <"$console" >"$LOG_DIR/$name.console.log" 2>/dev/null || true
    result_lines "$LOG_DIR/$name.console.log" >"$results"
    while IFS= read -r line; do color_line "$line"; done <"$results"
    RUN_SUM=$(summary_line "$results" || true)
    RUN_GUEST_S=$(elapsed "$t_start")
    RUN_FIRST_S=$([[ -n $first ]] && elapsed "$t_start" "$first" || echo -)
    note "guest: first result ${RUN_FIRST_S} s after virsh start, done after ${RUN_GUEST_S} s"
    state=$(virsh domstate "$dom" 2>&1 || true)
    note "\$ virsh domstate $dom: $state"
    t_start=$(now)
    out=$(virsh destroy "$dom" 2>&1) || rc=$?
    note "\$ virsh destroy $dom ($(elapsed "$t_start") s): $out"
    [[ $state == running && -z $rc ]] || { RUN_OK=0 RUN_DETAIL+="the domain was not running until virsh destroy ($state); "; }
    note "\$ virsh domstate --reason $dom: $(virsh domstate --reason "$dom" 2>&1 || true)"
    if [[ -z $RUN_SUM ]]; then
        RUN_OK=0 RUN_DETAIL+="no 'N passed, M failed' line on the console (see $LOG_DIR/$name.console.log, $upper/var/log/libvirt/qemu/$dom.log); "
    elif [[ $(count failed "$RUN_SUM") != 0 || $(count passed "$RUN_SUM") == 0 ]]; then
        RUN_OK=0 RUN_DETAIL+="guest: $RUN_SUM; "
    fi
    [[ $RUN_USER == libvirt-qemu ]] || { RUN_OK=0 RUN_DETAIL+="QEMU ran as '${RUN_USER:-?}', not libvirt-qemu; "; }
}

# ---------------------------------------------------------------------------
section "a. airlock without --socket-group: libvirt's QEMU (user libvirt-qemu) gets EACCES"
serve apid "$LOG_DIR/airlock-a.log"
note "airlock: $(grep -m1 -E 'mode 0[0-7]+' "$LOG_DIR/airlock-a.log" | sed 's/^.*INFO [^ ]* //' || true)"
note "\$ ls -l $in_sock (in the chroot): $(in_ns ls -l "$in_sock")"
t0=$(now)
if out=$(virsh start "$dom" 2>&1); then
    note "\$ virsh start $dom: $out"
    virsh destroy "$dom" >/dev/null 2>&1 || true
    verdict a-no-socket-group FAIL "virsh start succeeded against a 0600 root socket"
else
    a_s=$(elapsed "$t0")
    printf '%s\n' "$out" >"$LOG_DIR/virsh-start-eacces.txt"
    note "\$ virsh start $dom (failed after $a_s s):"
    sed 's/^/     | /' "$LOG_DIR/virsh-start-eacces.txt"
    if [[ $out == *"Failed to connect to '$in_sock': Permission denied"* ]]; then
        verdict a-no-socket-group OK "virsh start refused: QEMU's \"Failed to connect to '$in_sock': Permission denied\" (after $a_s s)"
    else
        verdict a-no-socket-group FAIL "virsh start failed without QEMU's EACCES message: $out"
    fi
fi
stop_pid "$apid"

# ---------------------------------------------------------------------------
section "b. airlock --socket-group $qemu_gid: virsh start, the guest drives airlock's edu"
serve apid "$LOG_DIR/airlock.log" --socket-group "$qemu_gid"
note "airlock: $(grep -m1 -E 'mode 0[0-7]+' "$LOG_DIR/airlock.log" | sed 's/^.*INFO [^ ]* //' || true)"
note "\$ ls -l $in_sock (in the chroot): $(in_ns ls -l "$in_sock")"
run_domain b-first "$dom"
b_ok=$RUN_OK b_sum=$RUN_SUM b_user=$RUN_USER
device_arg=$(grep -aF -- '-device '\''{"driver":"vfio-user-pci"' "$upper/var/log/libvirt/qemu/$dom.log" | tail -n1 || true)
note "libvirt's QEMU command line (/var/log/libvirt/qemu/$dom.log) has: ${device_arg:-<no vfio-user-pci -device>}"
[[ -n $device_arg ]] || { b_ok=0 RUN_DETAIL+="the -device argument is not on libvirt's QEMU command line; "; }
if ((b_ok)); then
    verdict b-first-start OK "guest: $b_sum; QEMU ran as $b_user; start to first result ${RUN_FIRST_S} s"
else
    verdict b-first-start FAIL "$RUN_DETAIL"
fi

# ---------------------------------------------------------------------------
section "c. after virsh destroy: airlock saw the client leave and quiesced the device"
if wait_for "$LOG_DIR/airlock.log" 'client left; device quiesced' 10 && kill -0 "$apid" 2>/dev/null; then
    note "airlock: $(grep -m1 'session ended' "$LOG_DIR/airlock.log" | sed 's/^.*INFO [^ ]* //' | cut -c1-160)..."
    verdict c-destroy OK "airlock logged 'client left; device quiesced' and still serves (pid $apid)"
else
    verdict c-destroy FAIL "no 'client left; device quiesced' in $LOG_DIR/airlock.log, or airlock exited"
fi

# ---------------------------------------------------------------------------
section "d. a second virsh start of the same domain, served by the same airlock"
run_domain d-second "$dom"
d_ok=$RUN_OK
sessions=0
for ((i = 0; i < 100; i++)); do
    sessions=$(grep -c 'client left; device quiesced' "$LOG_DIR/airlock.log" || true)
    ((sessions >= 2)) && break
    sleep 0.1
done
note "airlock (pid $apid, one process throughout): $sessions sessions ended"
((sessions == 2)) && kill -0 "$apid" 2>/dev/null || { d_ok=0 RUN_DETAIL+="airlock logged $sessions ended sessions, not 2; "; }
if ((d_ok)); then
    verdict d-second-start OK "guest: $RUN_SUM; QEMU ran as $RUN_USER; the same airlock served both starts"
else
    verdict d-second-start FAIL "$RUN_DETAIL"
fi
stop_pid "$apid"
virsh undefine "$dom" >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------
section "e. the README shows the tested domain XML"
if python3 - "$domain_xml" "$E2E_REPO/README.md" "$patched_cmdline" <<'EOF'; then
import sys
xml, readme = (open(p).read() for p in sys.argv[1:3])
# Indented code blocks: each line, four spaces in.
blocks = ["".join("    " + l if l.strip() else l for l in t.splitlines(True))
          for t in (xml, sys.argv[3] + "\n")]
section = readme.split("## With libvirt", 1)[-1].split("\n## ", 1)[0]
sys.exit(0 if "## With libvirt" in readme and all(b in section for b in blocks) else 1)
EOF
    verdict e-readme-xml OK "README.md's \"With libvirt\" quotes ${domain_xml#"$E2E_REPO"/} and the patched <qemu:commandline> verbatim"
else
    verdict e-readme-xml FAIL "README.md's \"With libvirt\" section does not quote ${domain_xml#"$E2E_REPO"/} and the patched <qemu:commandline> verbatim"
fi

# ---------------------------------------------------------------------------
if [[ -n $patched_dir ]]; then
    section "f. the patched QEMU as the domain's emulator: -chardev + vfio-user-pci chardev="
    out=$(virsh define "$in_images/$dom-patched.xml" 2>&1) || true
    note "\$ virsh define $in_images/$dom-patched.xml: $out"
    note "emulator $in_patched_qemu: $(in_ns "$in_patched_qemu" -version | head -n1)"
    serve apid "$LOG_DIR/airlock-f.log" --socket-group "$qemu_gid"
    run_domain f-patched "$dom-patched"
    if grep -qaF '"chardev":"airlock-edu"' "$upper/var/log/libvirt/qemu/$dom-patched.log" 2>/dev/null; then
        note "libvirt's QEMU command line has: $(grep -aF -e '-chardev socket,id=airlock-edu' "$upper/var/log/libvirt/qemu/$dom-patched.log" | tail -n1)"
    else
        RUN_OK=0 RUN_DETAIL+="no chardev vfio-user-pci on libvirt's QEMU command line; "
    fi
    if ((RUN_OK)); then
        verdict f-patched OK "guest: $RUN_SUM; the patched QEMU ran as $RUN_USER"
    else
        verdict f-patched FAIL "$RUN_DETAIL"
    fi
    stop_pid "$apid"
    virsh undefine "$dom-patched" >/dev/null 2>&1 || true
else
    note "(f. the patched QEMU under libvirt: not run: AIRLOCK_LIBVIRT_PATCHED=0)"
fi

# ---------------------------------------------------------------------------
e2e_summary
