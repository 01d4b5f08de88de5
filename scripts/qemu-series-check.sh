#!/usr/bin/env bash
# scripts/qemu-series-check.sh SOURCE | --debian VERSION
# Whether qemu-patches/ applies to another QEMU: a tree, a tarball
# (.tar.xz/.tar.gz/.tar.bz2), or (--debian VERSION) Debian's source package
# of that version, fetched with apt through the host's own mirror in a
# private apt state (nothing on the host changes). Nothing is built: this is
# the cheap first step of moving the series to a new base.
#
# Each patch is tried on the tree with the patches before it applied (those
# that applied), and reported as one of
#   applies       git apply, exactly
#   fuzz          patch(1) applies it, with offsets or fuzz (listed)
#   FAILS         patch(1) rejects hunks (files and hunks listed)
# Last line: "N of M patches apply as they are, K with fuzz, F fail".
# Exit 0 iff none fails. With --debian, Debian's own patches (debian/patches,
# quilt) are applied first, as a Debian package build would.
# Env: AIRLOCK_CACHE   where --debian keeps the downloaded source
#      AIRLOCK_QEMU_PATCHES  another series directory to try (default qemu-patches/)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
. "$here/lib.sh"
. "$here/qemu-series.sh"

usage() {
    echo "usage: ${0##*/} QEMU-TREE|QEMU-TARBALL | --debian VERSION (e.g. 10.2.2)" >&2
    exit 2
}
(($# >= 1)) || usage

# No background gc in the scratch tree (it races the cleanup).
export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=gc.auto GIT_CONFIG_VALUE_0=0
work=$(mktemp -d "${TMPDIR:-/tmp}/airlock-series-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
tree="$work/qemu"
mkdir -p "$tree"

# debian_source VERSION: unpacks Debian's qemu VERSION source package (with
# its debian/ directory and quilt patches applied) into $tree.
debian_source() {
    local version=$1 mirror keyring dir="$AIRLOCK_CACHE/debian-qemu-src/$1" apt suite
    need_host_pkgs dpkg-source:dpkg-dev
    mirror=$(debian_mirror)
    keyring=$(debian_keyring)
    if ! compgen -G "$dir/qemu_*.dsc" >/dev/null; then
        apt="$work/apt"
        mkdir -p "$apt/lists/partial" "$apt/sources.list.d" "$dir"
        : >"$apt/sources.list"
        for suite in trixie trixie-backports forky sid; do
            echo "deb-src [signed-by=$keyring] $mirror $suite main" >>"$apt/sources.list"
        done
        local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/sources.list.d"
            -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Get::List-Cleanup=false)
        log "fetching Debian's qemu $version source (the indexes of trixie, trixie-backports, forky, sid at $mirror)"
        apt-get "${opts[@]}" -qq update >&2 || die "apt-get update of the deb-src indexes failed"
        local full
        full=$(apt-cache "${opts[@]}" showsrc qemu | sed -nE "s/^Version: ([0-9]+:)?(${version//./\\.}[^ ]*)$/\1\2/p" | head -n1)
        [[ -n $full ]] || die "no qemu source of version $version in those indexes (apt-cache showsrc qemu lists: $(apt-cache "${opts[@]}" showsrc qemu | sed -n 's/^Version: //p' | tr '\n' ' '))"
        (cd "$dir" && apt-get "${opts[@]}" -qq source --download-only "qemu=$full" >&2) ||
            die "downloading qemu $full failed (the mirror may not serve that version's files)"
    fi
    local dsc
    dsc=$(compgen -G "$dir/qemu_*.dsc" | head -n1)
    rm -rf "$tree"
    dpkg-source --skip-debianization -q -x "$dsc" "$tree" >&2 2>/dev/null ||
        dpkg-source -q -x "$dsc" "$tree" >&2 || die "dpkg-source -x $dsc failed"
    label="Debian's qemu $(basename "$dsc" .dsc | sed 's/^qemu_//') (debian/patches applied)"
}

label=$1
case "$1" in
    --debian)
        (($# == 2)) || usage
        debian_source "$2"
        ;;
    *)
        if [[ -d $1 ]]; then
            tar -C "$1" --exclude=./build --exclude=./.git -cf - . | tar -C "$tree" -xf -
        elif [[ -f $1 ]]; then
            tar -C "$tree" --strip-components=1 -xf "$1"
        else
            die "$1 is neither a QEMU tree nor a tarball"
        fi
        ;;
esac
[[ -f $tree/VERSION && -d $tree/hw/vfio-user ]] || die "$label is not a QEMU source with hw/vfio-user (VERSION, hw/vfio-user/ missing)"
label="$label, VERSION $(cat "$tree/VERSION")"
git init -q "$tree"
qemu_git "$tree" add -A -f .
qemu_git "$tree" commit -q -m base

patches=${AIRLOCK_QEMU_PATCHES:-$repo/qemu-patches}
series_load "$patches"
log "${patches#"$repo"/} (base $base) on $label:"
clean=0 fuzzy=0 failed=0
for f in "${files[@]}"; do
    p="$patches/$f"
    if qemu_git "$tree" apply --check "$p" 2>/dev/null; then
        qemu_git "$tree" apply "$p"
        echo "applies  $f"
        clean=$((clean + 1))
    elif out=$(cd "$tree" && patch -p1 -N --dry-run <"$p" 2>&1); then
        (cd "$tree" && patch -p1 -N -s <"$p" >/dev/null)
        echo "fuzz     $f"
        awk '/^(checking|patching) file / { f = $3 }
             /with fuzz|offset/ { sub(/\.$/, ""); print "           " f ": " $0 }' <<<"$out"
        fuzzy=$((fuzzy + 1))
    else
        echo "FAILS    $f"
        # each failed hunk with the file it is in
        awk '/^(checking|patching) file / { f = $3 }
             /FAILED at/ { sub(/\.$/, ""); print "           " f ": " $0 }
             /can.t find file|No file to patch|Reversed/ { print "           " $0 }' <<<"$out"
        failed=$((failed + 1))
    fi
    qemu_git "$tree" add -A -f . && qemu_git "$tree" commit -q -m "$f" --allow-empty
done
echo "$clean of ${#files[@]} patches apply as they are, $fuzzy with fuzz, $failed fail ($label)"
((failed == 0))
