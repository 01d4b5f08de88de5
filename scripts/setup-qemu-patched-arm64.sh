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
#   <base12>-arm64/sysroot  arm64 Debian -dev packages and their dependencies
#                           as resolved by apt, unpacked, never installed
#                           (mmdebstrap --variant=extract)
#   <base12>-<hash>-arm64/  the bundle for one series (hash of the series file
#                           and its patches, as setup-qemu-patched.sh computes
#                           it): an unchanged series is not rebuilt; a changed
#                           one resets only the files the old series touched,
#                           so ninja recompiles only those
#
# QEMU source, first match wins (as setup-qemu-patched.sh):
#   $AIRLOCK_QEMU_SRC      a QEMU tree or tarball at the base commit
#   <repo>/../shared/qemu/qemu-*.tar.xz   a vendored tarball (with subprojects);
#                          also looked for beside the local repository <repo>
#                          was cloned from (a CI clone made elsewhere)
#   the other arch's tree  this cache's source tree of the same base for the
#                          other build (x86_64 host or arm64 cross)
#   otherwise              git clone of upstream QEMU at the base commit
# The compiler, ninja and the rest run chrooted in the build root
# (scripts/setup-build-root.sh: bookworm with Debian's aarch64 cross gcc), with
# <base12>-arm64 bind-mounted at its own path. The arm64 libraries (glib,
# pixman, libfdt, zlib and what they depend on) come from the sysroot, made by
# mmdebstrap from bookworm (the build root's release, so its cross gcc and the
# sysroot's glibc agree) at the mirror of the host's apt sources. The host
# installs no library and no -dev package, and its dpkg architectures stay as
# they are.
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
work="$top/$(source_key)-arm64"
src="$work/src" build="$work/build" sysroot="$work/sysroot"
out="$top/$(source_key)-$hash-arm64"

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

# --- the build root and the arm64 sysroot ----------------------------------------
need_host_pkgs git:git xz:xz-utils >&2
broot=$("$here/setup-build-root.sh") || die "the build root could not be made"
suite=bookworm
# inroot CMD...: CMD in the build root, with the arm64 work tree at its own path.
inroot() { in_root "$broot" "$work" -- "$@"; }

# Debian's multiarch layout (usr/include/<triplet>, usr/lib/<triplet>) is what
# the cross gcc expects under --sysroot, so the packages are just unpacked;
# their dependencies are apt's to resolve (libc6-dev brings the crt files).
sysroot_pkgs="libc6-dev,libglib2.0-dev,libpixman-1-dev,libfdt-dev,zlib1g-dev"
if [[ ! -f $sysroot/.stamp || $(cat "$sysroot/.stamp") != "$suite $sysroot_pkgs" ]]; then
    [[ $(id -u) == 0 ]] || die "must run as root to make $sysroot (mmdebstrap root mode)"
    need_mmdebstrap
    mirror=$(debian_mirror)
    keyring=$(debian_keyring)
    log "arm64 sysroot: $sysroot_pkgs and their dependencies ($suite, $mirror)"
    rm -rf "$sysroot" "$sysroot.tmp"
    mkdir -p "$work"
    mmdebstrap --quiet --variant=extract --mode=root --architectures=arm64 \
        --include="$sysroot_pkgs" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$suite" "$sysroot.tmp" "deb [signed-by=$keyring] $mirror $suite main" >&2 ||
        die "mmdebstrap could not make the arm64 sysroot (its error above)"
    mv "$sysroot.tmp" "$sysroot"
    # Absolute symlinks (e.g. lib*.so -> /lib/...) must point into the sysroot.
    find "$sysroot" -type l -lname '/*' | while IFS= read -r l; do
        ln -sfn "$sysroot$(readlink "$l")" "$l"
    done
    printf '%s\n' "$suite $sysroot_pkgs" >"$sysroot/.stamp"
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
log "applied ${#files[@]} patches (series $hash) to QEMU $(source_key) (arm64 tree)"

# --- configure and build (cross) ------------------------------------------------
# configure's --cross-prefix writes meson's cross file; --sysroot makes the
# cross gcc take headers, crt files and libraries (libc too) from the sysroot;
# -rpath-link lets ld follow the libraries' own DT_NEEDED there.
# No debug info: the binary is stripped, and -g costs a cold build minutes.
conf=(--cross-prefix="$triplet-"
    --extra-cflags="--sysroot=$sysroot"
    --extra-ldflags="--sysroot=$sysroot -Wl,-rpath-link=$sysroot/lib/$triplet:$sysroot/usr/lib/$triplet"
    --target-list=aarch64-softmmu --disable-docs --disable-debug-info
    --disable-tools --disable-user --disable-gtk --disable-sdl --disable-vnc
    --disable-opengl --disable-spice --disable-curses --disable-slirp
    --disable-werror "$download" --disable-install-blobs --disable-rust)
qemu_configure "$src" "$build" "$pc" "${conf[@]}"
log "building qemu-system-aarch64 for arm64 (nice -n 10)"
inroot nice -n 10 ninja -C "$build" qemu-system-aarch64 >&2 || die "QEMU build (cross) failed"

# --- bundle: the binary, its libraries by soname, the loader ------------------------
bin="$build/qemu-system-aarch64"
[[ $(inroot "$triplet-readelf" -h "$bin" | sed -nE 's/^ *Machine: *//p') == AArch64 ]] ||
    die "$bin is not an AArch64 program"
# It cannot run here (no arm64 user emulation); look for the type patch 6
# adds, the reason this build exists (the nested test checks what it does).
grep -qaF host-iommu-device-vfio-user "$bin" || die "$bin has no host-iommu-device-vfio-user (patch 6)"
rm -rf "$out.tmp"
mkdir -p "$out.tmp/lib"
inroot "$triplet-strip" -o "$work/qemu-system-aarch64.stripped" "$bin"
mv "$work/qemu-system-aarch64.stripped" "$out.tmp/qemu-system-aarch64"
# needed FILE: its DT_NEEDED sonames.
needed() { inroot "$triplet-readelf" -d "$1" | sed -nE 's/.*\(NEEDED\).*\[(.*)\]/\1/p'; }
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
interp=$(inroot "$triplet-readelf" -l "$bin" | sed -nE 's/.*Requesting program interpreter: (.*)\]/\1/p')
[[ ${interp##*/} == ld-linux-aarch64.so.1 ]] || die "unexpected interpreter '$interp'"
cp "$(readlink -f "$sysroot$interp")" "$out.tmp/lib/ld-linux-aarch64.so.1"
cp "$series" "$out.tmp/series"
printf 'base %s\nseries %s\narch arm64\nbuilt %s\n' "$base" "$hash" "$(date -u +%FT%TZ)" >"$out.tmp/.stamp"
rm -rf "$out"
mv "$out.tmp" "$out"
log "patched arm64 QEMU ready in $out ($(du -sh "$out" | cut -f1), ${#have[@]} libraries; $((SECONDS - start)) s)"
printf '%s\n' "$out"
