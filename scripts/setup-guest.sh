#!/usr/bin/env bash
# Fetch guest kernels (Debian 6.12 from bookworm-backports) and static busybox
# for amd64 and arm64 into $AIRLOCK_CACHE/guest/{amd64,arm64}/:
#   amd64/vmlinux        ELF kernel for PVH boot (-kernel vmlinux)
#   arm64/Image          raw arm64 Image
#   ARCH/root/lib/modules/KVER   module tree (depmod'ed), ARCH/root/boot/config-KVER
#   ARCH/busybox         static busybox
#   ARCH/kver            kernel version string
# Packages are only downloaded and unpacked (dpkg-deb -x), never installed.
# Apt runs with a private configuration per architecture; the host's dpkg
# architectures and sources are left alone. Idempotent (stamp written last).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"

guest="$AIRLOCK_CACHE/guest"
stamp="$guest/.stamp"
if [[ -f "$stamp" ]]; then
    for a in amd64 arm64; do log "$a kernel $(cat "$guest/$a/kver")"; done
    exit 0
fi
mkdir -p "$AIRLOCK_CACHE"
# One builder at a time (parallel CI jobs); re-check after waiting.
exec 9>"$AIRLOCK_CACHE/.setup-guest.lock"
flock 9
[[ -f "$stamp" ]] && exit 0
start=$SECONDS
need_host_pkgs apt-get:apt dpkg-deb:dpkg depmod:kmod modprobe:kmod \
    zstd:zstd xz:xz-utils gzip:gzip

mirror=$(debian_mirror)
keyring=$(debian_keyring)
log "mirror $mirror"

# apt_for ARCH: a private apt configuration for ARCH, its APT_CONFIG path.
apt_for() {
    private_apt "$AIRLOCK_CACHE/apt/$1" "$1" "$mirror" "$keyring" bookworm bookworm-backports
}

# newest_pkg REGEX: newest package name (by version in the name) matching REGEX.
newest_pkg() {
    apt-cache pkgnames linux-image-6.12 | grep -E "$1" | sort -V | tail -n1
}

# extract_vmlinux BZIMAGE OUT: find the compressed payload in a bzImage,
# decompress it, keep it if it is an ELF file (like the kernel's extract-vmlinux).
extract_vmlinux() {
    local img=$1 out=$2 magic tool off
    local -A tools=(
        ['\x28\xb5\x2f\xfd']='zstd -dcq'
        ['\xfd\x37\x7a\x58\x5a\x00']='xz -dcq'
        ['\x1f\x8b\x08']='gzip -dcq'
        ['\x02\x21\x4c\x18']='lz4 -dcq'
        ['\x42\x5a\x68']='bzip2 -dcq'
        ['\x5d\x00\x00\x00']='xz -dcq --format=lzma'
    )
    for magic in '\x28\xb5\x2f\xfd' '\xfd\x37\x7a\x58\x5a\x00' '\x1f\x8b\x08' \
        '\x02\x21\x4c\x18' '\x42\x5a\x68' '\x5d\x00\x00\x00'; do
        tool=${tools[$magic]}
        command -v "${tool%% *}" >/dev/null 2>&1 || continue
        for off in $(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1); do
            tail -c "+$((off + 1))" "$img" | $tool >"$out.tmp" 2>/dev/null || true
            if [[ $(head -c4 "$out.tmp" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
                mv "$out.tmp" "$out"
                log "vmlinux: ${tool%% *} payload at offset $off"
                return 0
            fi
        done
    done
    rm -f "$out.tmp"
    return 1
}

for arch in amd64 arm64; do
    export APT_CONFIG
    APT_CONFIG=$(apt_for "$arch")
    log "$arch: apt-get update (private config)"
    apt-get update -qq >&2
    kpkg=$(newest_pkg "^linux-image-6\.12\.[0-9]+[^-]*-$arch-unsigned\$")
    [[ -n "$kpkg" ]] || kpkg=$(newest_pkg "^linux-image-6\.12\.[0-9]+[^-]*-$arch\$")
    [[ -n "$kpkg" ]] || die "no linux-image-6.12.*-$arch in bookworm-backports"
    kver=${kpkg#linux-image-}
    kver=${kver%-unsigned}
    log "$arch: downloading $kpkg and busybox-static"
    dl="$AIRLOCK_CACHE/apt/$arch/debs"
    rm -rf "$dl"
    mkdir -p "$dl"
    (cd "$dl" && apt-get download -qq "$kpkg" busybox-static >&2)
    unset APT_CONFIG

    out="$guest/$arch"
    rm -rf "$out"
    mkdir -p "$out/root" "$out/bb"
    log "$arch: unpacking"
    dpkg-deb -x "$dl"/linux-image-*.deb "$out/root"
    dpkg-deb -x "$dl"/busybox-static_*.deb "$out/bb"
    cp "$out/bb/bin/busybox" "$out/busybox"
    rm -rf "$out/bb"
    # depmod (kmod 30) looks in ROOT/lib/modules only.
    if [[ ! -d "$out/root/lib/modules/$kver" && -d "$out/root/usr/lib/modules/$kver" ]]; then
        mkdir -p "$out/root/lib"
        ln -s ../usr/lib/modules "$out/root/lib/modules"
    fi
    [[ -d "$out/root/lib/modules/$kver" ]] || die "$kpkg has no lib/modules/$kver"
    depmod -b "$out/root" "$kver"
    printf '%s\n' "$kver" >"$out/kver"

    vmlinuz="$out/root/boot/vmlinuz-$kver"
    [[ -f "$vmlinuz" ]] || die "$kpkg has no boot/vmlinuz-$kver"
    case "$arch" in
        amd64)
            extract_vmlinux "$vmlinuz" "$out/vmlinux" || die "no ELF payload in $vmlinuz"
            ;;
        arm64)
            if [[ $(head -c2 "$vmlinuz" | od -An -tx1 | tr -d ' \n') == 1f8b ]]; then
                gzip -dc <"$vmlinuz" >"$out/Image.tmp"
            else
                cp "$vmlinuz" "$out/Image.tmp"
            fi
            # arm64 Image header: "ARM\x64" at offset 0x38.
            [[ $(tail -c +57 "$out/Image.tmp" | head -c4 | od -An -tx1 | tr -d ' \n') == 41524d64 ]] ||
                die "$vmlinuz does not hold an arm64 Image"
            mv "$out/Image.tmp" "$out/Image"
            ;;
    esac
    log "$arch: kernel $kver ready"
done

date -u +%FT%TZ >"$stamp"
log "guest kernels ready in $((SECONDS - start)) s"
