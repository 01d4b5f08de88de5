#!/usr/bin/env bash
# scripts/setup-qemu-patched.sh: build QEMU with airlock's patch series
# (qemu-patches/) -- qemu-system-x86_64 and qemu-system-aarch64 only -- and
# print the directory holding the two binaries (the only line on stdout).
#
# Cache ($AIRLOCK_CACHE/qemu-patched/, see scripts/lib.sh):
#   <base12>/src     QEMU at the base commit, a git tree (tag airlock-base);
#                    the current series is applied on top with git am
#   <base12>/build   its meson build directory, kept between series
#   <base12>-<hash>/ the installed binaries for one series (hash of the
#                    series file and its patches): an unchanged series is
#                    not rebuilt, its directory is printed at once
# A changed series resets the tree to the base (git only rewrites the files
# that differ) and applies the new one, so ninja rebuilds only what the
# patches touch.
#
# QEMU source, first match wins:
#   $AIRLOCK_QEMU_SRC      a QEMU tree or tarball at the base commit
#   <repo>/../shared/qemu/qemu-*.tar.xz   a vendored tarball (with subprojects)
#   otherwise              git clone of upstream QEMU at the base commit
#                          (meson then downloads its subprojects)
# Build dependencies come from the host's own apt (needs root when missing).
# The binaries are built without firmware: run them with -L pointing at the
# stock QEMU root's firmware (scripts/qemu does, with AIRLOCK_QEMU_BIN_DIR).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"
repo=$(cd "$here/.." && pwd)
. "$here/qemu-series.sh"
patches="$repo/qemu-patches"
series="$patches/series"
series_load "$patches"

top="$AIRLOCK_CACHE/qemu-patched"
work="$top/${base:0:12}"
src="$work/src" build="$work/build"
out="$top/${base:0:12}-$hash"
targets=(qemu-system-x86_64 qemu-system-aarch64)

installed() { [[ -f $out/.stamp && -x $out/qemu-system-x86_64 && -x $out/qemu-system-aarch64 ]]; }
if installed; then
    printf '%s\n' "$out"
    exit 0
fi

mkdir -p "$top"
# One builder at a time (parallel CI jobs); re-check after waiting.
exec 9>"$top/.lock"
flock 9
if installed; then
    printf '%s\n' "$out"
    exit 0
fi
start=$SECONDS

# --- build dependencies ------------------------------------------------------
need_host_pkgs ninja:ninja-build flex:flex bison:bison pkg-config:pkg-config \
    python3:python3 cc:gcc git:git xz:xz-utils >&2
libs=()
for pkg in libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev python3-venv; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || libs+=("$pkg")
done
if ((${#libs[@]})); then
    [[ $(id -u) == 0 ]] || die "need root to install: ${libs[*]}"
    log "installing host packages: ${libs[*]}"
    apt-get update -qq >&2
    rel=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    apt-get install -y -qq -o DPkg::Lock::Timeout=120 --no-install-recommends \
        ${rel:+-t "$rel"} "${libs[@]}" >/dev/null
fi

# --- the source tree at the base commit, the series applied -----------------------
qemu_source "$src" "$build" "$work/download" "$repo"
series_apply "$src" "$patches"
log "applied ${#files[@]} patches (series $hash) to QEMU ${base:0:12}"

# --- configure and build ---------------------------------------------------------
if [[ ! -f $build/build.ninja ]]; then
    rm -rf "$build"
    mkdir -p "$build"
    log "configuring QEMU in $build"
    (cd "$build" && nice -n 10 "$src/configure" \
        --target-list=x86_64-softmmu,aarch64-softmmu --disable-docs \
        --disable-tools --disable-user --disable-gtk --disable-sdl --disable-vnc \
        --disable-opengl --disable-spice --disable-curses --disable-slirp \
        --disable-werror "$download" --disable-install-blobs --disable-rust) >&2 ||
        { rm -f "$build/build.ninja"; die "QEMU configure failed"; }
fi
log "building ${targets[*]} (nice -n 10; a first build takes ~25 min on 2 cores)"
# Build the two targets by name: a plain ninja also builds tests/fp, which
# the vendored tarball's testfloat revision does not build.
nice -n 10 ninja -C "$build" "${targets[@]}" >&2 || die "QEMU build failed"

# --- install -------------------------------------------------------------------
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
for t in "${targets[@]}"; do
    cp "$build/$t" "$out.tmp/$t"
    strip "$out.tmp/$t" 2>/dev/null || true
done
cp "$series" "$out.tmp/series"
"$out.tmp/qemu-system-x86_64" -device vfio-user-pci,help 2>&1 | grep -q 'chardev' ||
    die "the built qemu-system-x86_64 has no vfio-user-pci chardev property"
printf 'base %s\nseries %s\nbuilt %s\n' "$base" "$hash" "$(date -u +%FT%TZ)" >"$out.tmp/.stamp"
rm -rf "$out"
mv "$out.tmp" "$out"
log "patched QEMU ready in $out ($((SECONDS - start)) s)"
printf '%s\n' "$out"
