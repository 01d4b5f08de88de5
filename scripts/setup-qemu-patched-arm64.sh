#!/usr/bin/env bash
# scripts/setup-qemu-patched-arm64.sh: cross-build QEMU with airlock's patch
# series (qemu-patches/) as an arm64 (aarch64 Linux) program --
# qemu-system-aarch64 only -- and print the directory holding it (the only
# line on stdout). The nested aarch64 test runs it inside an arm64 L1 guest
# (tests/e2e/nested-patched-aarch64.sh), so the directory is a bundle:
#   <dir>/qemu-system-aarch64      the patched emulator (stripped)
#   <dir>/lib/<soname>             every shared library it needs, by soname,
#                                  with ld-linux-aarch64.so.1 (run it as
#                                  lib/ld-linux-aarch64.so.1 --library-path lib ...)
#
# Cache ($AIRLOCK_CACHE/qemu-patched/, see scripts/lib.sh), beside the
# host build of scripts/setup-qemu-patched.sh but sharing nothing with it
# (that script resets its own tree; two builders must not fight over one):
#   <base12>-arm64/src      QEMU at the base commit, a git tree (tag
#                           airlock-base) with the current series applied
#   <base12>-arm64/build    its meson build directory (cross), kept
#   <base12>-arm64/sysroot  arm64 Debian -dev packages, unpacked (never installed)
#   <base12>-arm64/apt      a private apt configuration for arm64
#   <base12>-<hash>-arm64/  the bundle for one series (hash of the series file
#                           and its patches, as setup-qemu-patched.sh computes
#                           it): an unchanged series is not rebuilt; a changed
#                           one resets only the files the old series touched,
#                           so ninja recompiles only those
#
# QEMU source, first match wins (as setup-qemu-patched.sh):
#   $AIRLOCK_QEMU_SRC      a QEMU tree or tarball at the base commit
#   <repo>/../shared/qemu/qemu-*.tar.xz   a vendored tarball (with subprojects)
#   otherwise              git clone of upstream QEMU at the base commit
# Build tools come from the host's own apt (gcc-aarch64-linux-gnu, ninja...,
# needs root when missing). The arm64 libraries (glib, pixman, libfdt, zlib
# and what they depend on) are downloaded as arm64 .debs with a private
# APT_CONFIG (the host's dpkg architectures stay as they are) from the
# mirror of the host's apt sources, and unpacked into the sysroot.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"
repo=$(cd "$here/.." && pwd)
. "$here/qemu-series.sh"
patches="$repo/qemu-patches"
series="$patches/series"
triplet=aarch64-linux-gnu
series_load "$patches"

top="$AIRLOCK_CACHE/qemu-patched"
work="$top/${base:0:12}-arm64"
src="$work/src" build="$work/build" sysroot="$work/sysroot"
out="$top/${base:0:12}-$hash-arm64"

installed() { [[ -f $out/.stamp && -x $out/qemu-system-aarch64 && -f $out/lib/ld-linux-aarch64.so.1 ]]; }
if installed; then
    printf '%s\n' "$out"
    exit 0
fi

mkdir -p "$top"
# One arm64 builder at a time (its own lock: the host build may run beside it).
exec 9>"$top/.lock-arm64"
flock 9
if installed; then
    printf '%s\n' "$out"
    exit 0
fi
start=$SECONDS

# --- host build tools ----------------------------------------------------------
need_host_pkgs ninja:ninja-build flex:flex bison:bison pkg-config:pkg-config \
    python3:python3 git:git xz:xz-utils dpkg-deb:dpkg apt-get:apt \
    "$triplet-gcc:gcc-$triplet" "$triplet-readelf:binutils-$triplet" >&2
if ! dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'ok installed'; then
    need_host_pkgs __no_such_cmd__:python3-venv >&2
fi

# --- the arm64 sysroot ---------------------------------------------------------
# Debian's multiarch layout (usr/include/<triplet>, usr/lib/<triplet>) is what
# the cross gcc expects under --sysroot, so the .debs are just unpacked.
if [[ ! -f $sysroot/.stamp ]]; then
    mirror=$(debian_mirror)
    keyring=$(debian_keyring)
    rel=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-bookworm}")
    a="$work/apt"
    rm -rf "$a" "$sysroot"
    mkdir -p "$a/debs" "$sysroot"
    APT_CONFIG=$(private_apt "$a" arm64 "$mirror" "$keyring" "$rel")
    export APT_CONFIG
    log "arm64 sysroot: apt-get update (private config, $mirror $rel)"
    apt-get update -qq >&2
    # The closure of the -dev packages QEMU links against, libraries only
    # (interpreters and tools they pull in are never run here).
    mapfile -t pkgs < <(apt-cache depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances \
        libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev libc6-dev |
        grep -E '^[a-z0-9]' | sort -u |
        grep -E '^(lib|linux-libc-dev$|zlib1g|uuid-dev$)' | grep -vE '^lib(perl|python|glib2\.0-(bin|dev-bin|data))')
    log "arm64 sysroot: downloading ${#pkgs[@]} packages"
    (cd "$a/debs" && apt-get download -qq "${pkgs[@]}" >&2)
    unset APT_CONFIG
    for deb in "$a/debs"/*.deb; do dpkg-deb -x "$deb" "$sysroot"; done
    rm -rf "$a/debs"
    # Absolute symlinks (e.g. lib*.so -> /lib/...) must point into the sysroot.
    find "$sysroot" -type l -lname '/*' | while IFS= read -r l; do
        ln -sfn "$sysroot$(readlink "$l")" "$l"
    done
    date -u +%FT%TZ >"$sysroot/.stamp"
fi

# pkg-config for the target: only the sysroot's .pc files, paths prefixed.
pc="$work/pkg-config"
cat >"$pc" <<EOF
#!/bin/sh
PKG_CONFIG_SYSROOT_DIR='$sysroot' \\
PKG_CONFIG_LIBDIR='$sysroot/usr/lib/$triplet/pkgconfig:$sysroot/usr/share/pkgconfig' \\
PKG_CONFIG_PATH= exec pkg-config "\$@"
EOF
chmod +x "$pc"

# --- the source tree at the base commit (our own copy), the series applied ---------
qemu_source "$src" "$build" "$work/download" "$repo"
series_apply "$src" "$patches"
log "applied ${#files[@]} patches (series $hash) to QEMU ${base:0:12} (arm64 tree)"

# --- configure and build (cross) ------------------------------------------------
# configure's --cross-prefix writes meson's cross file; --sysroot makes the
# cross gcc take headers, crt files and libraries (libc too) from the sysroot;
# -rpath-link lets ld follow the libraries' own DT_NEEDED there.
if [[ ! -f $build/build.ninja ]]; then
    rm -rf "$build"
    mkdir -p "$build"
    log "configuring QEMU (cross, $triplet) in $build"
    (cd "$build" && PKG_CONFIG="$pc" nice -n 10 "$src/configure" \
        --cross-prefix="$triplet-" \
        --extra-cflags="--sysroot=$sysroot" \
        --extra-ldflags="--sysroot=$sysroot -Wl,-rpath-link=$sysroot/lib/$triplet:$sysroot/usr/lib/$triplet" \
        --target-list=aarch64-softmmu --disable-docs \
        --disable-tools --disable-user --disable-gtk --disable-sdl --disable-vnc \
        --disable-opengl --disable-spice --disable-curses --disable-slirp \
        --disable-werror "$download" --disable-install-blobs --disable-rust) >&2 ||
        { rm -f "$build/build.ninja"; die "QEMU configure (cross) failed"; }
fi
log "building qemu-system-aarch64 for arm64 (nice -n 10)"
nice -n 10 ninja -C "$build" qemu-system-aarch64 >&2 || die "QEMU build (cross) failed"

# --- bundle: the binary, its libraries by soname, the loader ------------------------
bin="$build/qemu-system-aarch64"
[[ $("$triplet-readelf" -h "$bin" | sed -nE 's/^ *Machine: *//p') == AArch64 ]] ||
    die "$bin is not an AArch64 program"
# It cannot run here (no arm64 user emulation); look for the type patch 6
# adds, the reason this build exists (the nested test checks what it does).
grep -qaF host-iommu-device-vfio-user "$bin" || die "$bin has no host-iommu-device-vfio-user (patch 6)"
rm -rf "$out.tmp"
mkdir -p "$out.tmp/lib"
"$triplet-strip" -o "$out.tmp/qemu-system-aarch64" "$bin"
# needed FILE: its DT_NEEDED sonames.
needed() { "$triplet-readelf" -d "$1" | sed -nE 's/.*\(NEEDED\).*\[(.*)\]/\1/p'; }
queue=("$bin")
declare -A have=()
while ((${#queue[@]})); do
    f=${queue[0]}
    queue=("${queue[@]:1}")
    for so in $(needed "$f"); do
        [[ -z ${have[$so]:-} ]] || continue
        lib=""
        for d in "$sysroot/lib/$triplet" "$sysroot/usr/lib/$triplet"; do
            [[ -e $d/$so ]] && lib=$(readlink -f "$d/$so") && break
        done
        [[ -n $lib ]] || die "no $so for $f in the sysroot"
        have[$so]=1
        cp "$lib" "$out.tmp/lib/$so"
        queue+=("$lib")
    done
done
interp=$("$triplet-readelf" -l "$bin" | sed -nE 's/.*Requesting program interpreter: (.*)\]/\1/p')
[[ ${interp##*/} == ld-linux-aarch64.so.1 ]] || die "unexpected interpreter '$interp'"
cp "$(readlink -f "$sysroot$interp")" "$out.tmp/lib/ld-linux-aarch64.so.1"
cp "$series" "$out.tmp/series"
printf 'base %s\nseries %s\narch arm64\nbuilt %s\n' "$base" "$hash" "$(date -u +%FT%TZ)" >"$out.tmp/.stamp"
rm -rf "$out"
mv "$out.tmp" "$out"
log "patched arm64 QEMU ready in $out ($(du -sh "$out" | cut -f1), ${#have[@]} libraries; $((SECONDS - start)) s)"
printf '%s\n' "$out"
