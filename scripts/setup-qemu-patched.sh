#!/usr/bin/env bash
# scripts/setup-qemu-patched.sh: build QEMU with airlock's patch series
# (qemu-patches/) -- qemu-system-x86_64 only, unless asked for more -- and
# print the directory holding it (the only line on stdout). The directory is
# a bundle that runs on any x86_64 host, whatever libraries it has:
#   <dir>/qemu-system-ARCH       run these: each execs the binary below through
#                                the bundled loader and libraries
#   <dir>/bin/qemu-system-ARCH   the patched emulators (stripped ELF)
#   <dir>/lib/<soname>           every shared library they need, by soname,
#                                with ld-linux-x86-64.so.2
#
# Cache ($AIRLOCK_CACHE/qemu-patched/, see scripts/lib.sh):
#   <base12>/src     QEMU at the base commit, a git tree (tag airlock-base);
#                    the current series is applied on top with git am
#   <base12>/build   its meson build directory, kept between series
# Both are built in the build root (scripts/setup-build-root.sh: bookworm with
# QEMU's build dependencies), chrooted, with <base12> bind-mounted at its own
# path: the host installs no library and no -dev package.
#   <base12>-<hash>/ the installed binaries for one series (hash of the
#                    series file and its patches): an unchanged series is
#                    not rebuilt, its directory is printed at once
# A changed series resets the tree to the base (git only rewrites the files
# that differ) and applies the new one, so ninja rebuilds only what the
# patches touch.
#
# QEMU source, first match wins:
#   $AIRLOCK_QEMU_SRC      a QEMU tree or tarball: the base commit's, or another QEMU
#                          to move the series to (built in its own cache
#                          directory, src-<hash>; a patch that does not apply
#                          is named)
#   <repo>/../shared/qemu/qemu-*.tar.xz   a vendored tarball (with subprojects);
#                          also looked for beside the local repository <repo>
#                          was cloned from (a CI clone made elsewhere)
#   the other arch's tree  this cache's source tree of the same base for the
#                          other build (x86_64 host or arm64 cross)
#   otherwise              git clone of upstream QEMU at the base commit
#                          (meson then downloads its subprojects)
# Targets: AIRLOCK_QEMU_TARGETS="x86_64 aarch64" builds qemu-system-aarch64
# too (its own bundle, <base12>-<hash>-aarch64, and build directory). The
# suite needs x86_64 only: the patched QEMU's arm64 checks run on the arm64
# cross build (tests/e2e/nested-patched-aarch64.sh), and a second target
# costs a cold build 200 s more of 2 cores.
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
work="$top/$(source_key)"
src="$work/src" build="$work/build"
out="$top/$(source_key)-$hash"
targets=(qemu-system-x86_64) target_list=x86_64-softmmu
for t in ${AIRLOCK_QEMU_TARGETS:-x86_64}; do
    case "$t" in
        x86_64) ;;
        aarch64)
            targets+=(qemu-system-aarch64) target_list+=,aarch64-softmmu
            build+=-aarch64 out+=-aarch64
            ;;
        *) die "AIRLOCK_QEMU_TARGETS: '$t' is not x86_64 or aarch64" ;;
    esac
done

installed() {
    local t
    [[ -f $out/.stamp && -f $out/lib/ld-linux-x86-64.so.2 ]] || return 1
    for t in "${targets[@]}"; do [[ -x $out/$t ]] || return 1; done
}
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

# --- build dependencies: the build root ---------------------------------------------
need_host_pkgs git:git xz:xz-utils >&2
broot=$("$here/setup-build-root.sh") || die "the build root could not be made"
# inroot CMD...: CMD in the build root, with the QEMU work tree at its own path.
inroot() { in_root "$broot" "$work" -- "$@"; }

# --- the source tree at the base commit, the series applied -----------------------
qemu_source "$src" "$build" "$work/download" "$repo"
series_apply "$src" "$patches"
log "applied ${#files[@]} patches (series $hash) to QEMU $(source_key)"

# --- configure and build (in the build root) ----------------------------------------
# No debug info: the binaries are stripped, and -g costs a cold build minutes.
conf=(--target-list="$target_list" --disable-docs --disable-debug-info
    --disable-tools --disable-user --disable-gtk --disable-sdl --disable-vnc
    --disable-opengl --disable-spice --disable-curses --disable-slirp
    --disable-werror "$download" --disable-install-blobs --disable-rust)
qemu_configure "$src" "$build" pkg-config "${conf[@]}"
log "building ${targets[*]} (nice -n 10; a first build takes ~6 min on 2 cores)"
# Build the two targets by name: a plain ninja also builds tests/fp, which
# the vendored tarball's testfloat revision does not build.
inroot nice -n 10 ninja -C "$build" "${targets[@]}" >&2 || die "QEMU build failed"

# --- install: the binaries, their libraries by soname, the loader --------------------
rm -rf "$out.tmp"
mkdir -p "$out.tmp/bin" "$out.tmp/lib"
for t in "${targets[@]}"; do
    inroot strip -o "$work/$t.stripped" "$build/$t"
    mv "$work/$t.stripped" "$out.tmp/bin/$t"
done
# The root's loader lists what the binaries need, as paths inside the root.
# shellcheck disable=SC2016 # expanded by the root's shell
inroot /bin/sh -c 'for b; do /lib64/ld-linux-x86-64.so.2 --list "$b"; done' sh \
    "${targets[@]/#/$build/}" >"$work/ldd.txt" || die "the build root's loader cannot list the QEMU libraries"
n=0
while read -r soname _ path _; do
    [[ $path == /* && $soname != */* && ! -e $out.tmp/lib/$soname ]] || continue
    cp "$broot$(inroot readlink -f "$path")" "$out.tmp/lib/$soname"
    n=$((n + 1))
done <"$work/ldd.txt"
cp "$broot$(inroot readlink -f /lib64/ld-linux-x86-64.so.2)" "$out.tmp/lib/ld-linux-x86-64.so.2"
for t in "${targets[@]}"; do
    cat >"$out.tmp/$t" <<EOF
#!/bin/sh
# $t with airlock's QEMU series, run through the libraries bundled beside it.
d=\$(dirname "\$(readlink -f "\$0")")
exec "\$d/lib/ld-linux-x86-64.so.2" --library-path "\$d/lib" --argv0 "\$0" "\$d/bin/$t" "\$@"
EOF
    chmod +x "$out.tmp/$t"
done
cp "$series" "$out.tmp/series"
"$out.tmp/qemu-system-x86_64" -device vfio-user-pci,help 2>&1 | grep -q 'chardev' ||
    die "the built qemu-system-x86_64 does not run here, or has no vfio-user-pci chardev property"
printf 'base %s\nseries %s\nbuilt %s\n' "$base" "$hash" "$(date -u +%FT%TZ)" >"$out.tmp/.stamp"
rm -rf "$out"
mv "$out.tmp" "$out"
log "patched QEMU ready in $out ($n libraries bundled; $((SECONDS - start)) s)"
printf '%s\n' "$out"
