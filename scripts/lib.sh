# shellcheck shell=bash
# Shared helpers for airlock's setup and test scripts. Source it; do not run it.
#
# AIRLOCK_CACHE       where downloaded/built artefacts live (outside the clone)
# AIRLOCK_DEBIAN_MIRROR  override the Debian mirror (default: the host's apt config)

AIRLOCK_CACHE="${AIRLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/airlock}"
export AIRLOCK_CACHE
export DEBIAN_FRONTEND=noninteractive

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# console_lines FILE: what a guest has written to its console FILE so far,
# whole lines only, without CRs. A line it is still writing waits for the
# next look: a test that streams the console would otherwise print it cut
# and never print the rest.
console_lines() {
    local n
    n=$(stat -c %s "$1" 2>/dev/null) || return 0
    head -c "$n" "$1" | head -n "$(head -c "$n" "$1" | wc -l)" | tr -d '\r'
}

# debian_mirror: print the URI of the host's main Debian archive (not the
# security archive), read from the host's apt sources at run time.
debian_mirror() {
    if [[ -n "${AIRLOCK_DEBIAN_MIRROR:-}" ]]; then
        printf '%s\n' "${AIRLOCK_DEBIAN_MIRROR%/}"
        return
    fi
    local f uri=""
    local files=()
    for f in /etc/apt/sources.list.d/*.sources; do [[ -f $f ]] && files+=("$f"); done
    if ((${#files[@]})); then
        # deb822: one stanza per blank-line-separated block.
        uri=$(awk '
            function flush() {
                if (!done && types ~ /(^| )deb( |$)/ && enabled != "no" && uris != "") {
                    n = split(suites, s, " ")
                    for (i = 1; i <= n; i++)
                        if (s[i] !~ /-security$/ && s[i] !~ /\/updates$/) {
                            split(uris, u, " "); print u[1]; done = 1; exit
                        }
                }
                types = uris = suites = ""; enabled = "yes"
            }
            BEGIN { enabled = "yes" }
            /^[ \t]*$/ { flush(); next }
            /^#/ { next }
            tolower($1) == "types:"   { $1 = ""; types = $0 }
            tolower($1) == "uris:"    { $1 = ""; uris = $0; sub(/^ +/, "", uris) }
            tolower($1) == "suites:"  { $1 = ""; suites = $0 }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            END { flush() }' "${files[@]}")
    fi
    if [[ -z "$uri" ]]; then
        files=()
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -f $f ]] && files+=("$f")
        done
        if ((${#files[@]})); then
            uri=$(awk '
                $1 == "deb" {
                    i = 2
                    if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                    if ($(i+1) !~ /-security$/ && $(i+1) !~ /\/updates$/) { print $i; exit }
                }' "${files[@]}")
        fi
    fi
    [[ -n "$uri" ]] || die "no Debian mirror found in the host's apt sources (set AIRLOCK_DEBIAN_MIRROR)"
    printf '%s\n' "${uri%/}"
}

# debian_keyring: the keyring used to verify Debian archives.
debian_keyring() {
    local k=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -f $k ]] || die "missing $k (apt-get install debian-archive-keyring)"
    printf '%s\n' "$k"
}

# need_host_pkgs CMD:PKG ...: install host packages for commands that are
# missing. Only tools that must run on the host go through here (mmdebstrap,
# cpio, kmod, systemd's tools...): libraries and -dev packages live in Debian
# roots (scripts/setup-build-root.sh), never on the host. No target release is
# pinned: apt picks the candidates of the host's own sources (a pin to the main
# suite would rank it above -security and break on security-updated libraries).
# On failure: names the packages and quotes apt's own error; returns 1.
_apt_updated=""
need_host_pkgs() {
    local item cmd pkg missing=() err
    for item in "$@"; do
        cmd=${item%%:*} pkg=${item#*:}
        command -v "$cmd" >/dev/null 2>&1 || [[ " ${missing[*]} " == *" $pkg "* ]] ||
            missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) != 0 ]]; then
        log "error: need root to install host packages: ${missing[*]} (or install them yourself)"
        return 1
    fi
    log "installing host packages: ${missing[*]}"
    err=$(mktemp)
    if [[ -z "$_apt_updated" ]]; then
        apt-get update -qq >/dev/null 2>"$err" || log "warning: apt-get update: $(tr '\n' ' ' <"$err")"
        _apt_updated=1
    fi
    if ! apt-get install -y -qq -o DPkg::Lock::Timeout=120 --no-install-recommends \
        "${missing[@]}" >/dev/null 2>"$err"; then
        log "error: could not install host packages ${missing[*]}: apt-get said:"
        sed 's/^/    /' "$err" >&2
        rm -f "$err"
        return 1
    fi
    rm -f "$err"
}

# need_mmdebstrap: the one tool that makes the Debian roots (QEMU, build).
need_mmdebstrap() {
    need_host_pkgs mmdebstrap:mmdebstrap ||
        die "mmdebstrap is needed to make the Debian roots in $AIRLOCK_CACHE (see above)"
}

# debian_root NAME SUITE "PKG..." [-- MMDEBSTRAP_OPTION...]: makes the Debian
# root $AIRLOCK_CACHE/NAME with mmdebstrap (mmdebstrap_root, from the host's
# own mirror) and prints its path (the only line on stdout), then ends the
# calling script. A stamp records the suite and packages: the root is made
# once, and anew when the list changes. One builder at a time (parallel CI
# jobs); needs root only when it builds.
debian_root() {
    local name=$1 suite=$2 pkgs=$3 root="$AIRLOCK_CACHE/$1" want mirror keyring tmp start
    shift 3
    [[ ${1:-} == -- ]] && shift
    want="$suite $pkgs"
    _root_ready() { [[ -f $root.stamp && -d $root && $(sed -n 2p "$root.stamp") == "$want" ]]; }
    if ! _root_ready; then
        mkdir -p "$AIRLOCK_CACHE"
        exec 9>"$AIRLOCK_CACHE/.$name.lock"
        flock 9
    fi
    if ! _root_ready; then
        [[ $(id -u) == 0 ]] || die "must run as root to make $root (mmdebstrap root mode)"
        need_mmdebstrap
        mirror=$(debian_mirror)
        keyring=$(debian_keyring)
        start=$SECONDS
        log "making $name ($suite, $(wc -w <<<"$pkgs") packages and their dependencies) from $mirror"
        tmp="$root.tmp"
        rm -rf "$tmp" "$root.stamp"
        mmdebstrap_root "$tmp" "$suite" "deb [signed-by=$keyring] $mirror $suite main" -- \
            --include="${pkgs// /,}" "$@" ||
            die "mmdebstrap could not make $name (its error above)"
        rm -rf "$root"
        mv "$tmp" "$root"
        printf 'built %s\n%s\n' "$(date -u +%FT%TZ)" "$want" >"$root.stamp"
        log "$name ready in $((SECONDS - start)) s ($(du -sh "$root" | cut -f1))"
    fi
    printf '%s\n' "$root"
    exit 0
}

# mmdebstrap_root TARGET SUITE SOURCE... [-- MMDEBSTRAP_OPTION...]: a Debian
# root of SUITE in TARGET from the SOURCE lines (deb822 one-liners), as small
# as apt makes it: no recommends, no man pages, docs or locales, no apt cache.
# Packages and hooks come as options (--include=..., --customize-hook=...).
mmdebstrap_root() {
    local target=$1 suite=$2 sources=() opts=()
    shift 2
    while (($#)) && [[ $1 != -- ]]; do sources+=("$1"); shift; done
    [[ ${1:-} == -- ]] && shift
    opts=("$@")
    mmdebstrap \
        --quiet \
        --variant=apt \
        --mode=root \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "${opts[@]}" \
        --customize-hook='chroot "$1" apt-get clean' \
        "$suite" "$target" "${sources[@]}" >&2
}

# in_root ROOT DIR... -- CMD...: run CMD chrooted in the Debian root ROOT,
# inside a private mount namespace (nothing leaks to the host, everything is
# unmounted when CMD ends) with /proc, /dev and /sys from the host and each DIR
# bind-mounted at its own path, so paths read the same inside and out (meson
# and ninja record absolute paths). HOME is / inside.
in_root() {
    local root=$1 d binds=()
    shift
    while (($#)) && [[ $1 != -- ]]; do binds+=("$1"); shift; done
    [[ ${1:-} == -- ]] || die "in_root: missing --"
    shift
    [[ -x $root/bin/sh ]] || die "in_root: $root is not a Debian root"
    for d in "${binds[@]}"; do mkdir -p "$d" "$root$d"; done
    # shellcheck disable=SC2016 # expanded by the inner shell
    unshare --mount --propagation private -- /bin/sh -euc '
        root=$1; n=$2; shift 2
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        mount --rbind /sys "$root/sys"
        while [ "$n" -gt 0 ]; do mount --bind "$1" "$root$1"; shift; n=$((n - 1)); done
        exec chroot "$root" /usr/bin/env -i HOME=/ LC_ALL=C.UTF-8 \
            PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin "$@"' \
        in_root "$root" "${#binds[@]}" "${binds[@]}" "$@"
}

# guest_arch ARCH: map qemu arch names to Debian arch names.
deb_arch() {
    case "$1" in
        x86_64 | amd64) echo amd64 ;;
        aarch64 | arm64) echo arm64 ;;
        *) die "unknown arch '$1' (want x86_64 or aarch64)" ;;
    esac
}

# private_apt DIR ARCH MIRROR KEYRING SUITE...: a private apt configuration in
# DIR for packages of ARCH (the host's dpkg architectures stay as they are),
# from MIRROR's SUITEs (main); prints its path, for APT_CONFIG.
private_apt() {
    local d=$1 arch=$2 mirror=$3 keyring=$4 suite
    shift 4
    mkdir -p "$d/sources.list.d" "$d/preferences.d" "$d/state/lists/partial" \
        "$d/cache/archives/partial"
    : >"$d/state/status"
    : >"$d/sources.list"
    for suite in "$@"; do
        printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$suite" >>"$d/sources.list"
    done
    cat >"$d/apt.conf" <<EOF
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
Dir::Etc::SourceList "$d/sources.list";
Dir::Etc::SourceParts "$d/sources.list.d";
Dir::Etc::Preferences "$d/preferences";
Dir::Etc::PreferencesParts "$d/preferences.d";
Dir::State "$d/state";
Dir::State::status "$d/state/status";
Dir::Cache "$d/cache";
Acquire::Languages "none";
APT::Sandbox::User "root";
EOF
    printf '%s\n' "$d/apt.conf"
}

# qemu_bundle_x86 QEMU LOADER [LIBRARY_PATH]: sets the array bundle (SRC:DST
# for scripts/mkinitramfs) to what an L1 guest needs to run QEMU from
# /opt/qemu: the binary, its libraries by soname (as LOADER resolves them),
# the loader, and the stock root's firmware for q35 + a PVH vmlinux (SeaBIOS
# runs pvh.bin; kvmvapic.bin is asked for even under TCG); bundle_bytes to
# their total size.
qemu_bundle_x86() {
    local qemu=$1 loader=$2 libs=${3:-} soname path fw s
    bundle=("$qemu:/opt/qemu/bin/qemu-system-x86_64" "$loader:/opt/qemu/lib/ld-linux-x86-64.so.2")
    while read -r soname _ path _; do
        [[ $path == /* && $soname != */* ]] || continue
        bundle+=("$(readlink -f "$path"):/opt/qemu/lib/$soname")
    done < <("$loader" ${libs:+--library-path "$libs"} --list "$qemu")
    for fw in "$AIRLOCK_CACHE"/qemu-root/usr/share/{seabios/bios-256k.bin,qemu/pvh.bin,qemu/kvmvapic.bin}; do
        bundle+=("$(readlink -f "$fw"):/opt/qemu/share/${fw##*/}")
    done
    bundle_bytes=0
    for s in "${bundle[@]}"; do bundle_bytes=$((bundle_bytes + $(stat -L -c %s "${s%%:*}"))); done
}
