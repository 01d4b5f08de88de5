#!/usr/bin/env bash
# Build a Debian trixie root holding QEMU from trixie-backports (>= 10.1, which
# has -device vfio-user-pci) in $AIRLOCK_CACHE/qemu-root. The host keeps its own
# libc: scripts/qemu runs the binaries through the root's dynamic loader.
# Idempotent: does nothing if $AIRLOCK_CACHE/qemu-root.stamp exists.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"

root="$AIRLOCK_CACHE/qemu-root"
stamp="$root.stamp"
if [[ -f "$stamp" && -d "$root" ]]; then
    exit 0
fi

mkdir -p "$AIRLOCK_CACHE"
# One builder at a time (parallel CI jobs); re-check after waiting.
exec 9>"$AIRLOCK_CACHE/.setup-qemu.lock"
flock 9
[[ -f "$stamp" && -d "$root" ]] && exit 0
[[ $(id -u) == 0 ]] || die "must run as root (mmdebstrap root mode)"
start=$SECONDS
mkdir -p "$AIRLOCK_CACHE"

need_mmdebstrap

mirror=$(debian_mirror)
keyring=$(debian_keyring)
log "building trixie root with QEMU from trixie-backports (mirror $mirror)"

tmp="$root.tmp"
rm -rf "$tmp" "$stamp"
src="deb [signed-by=$keyring] $mirror"
# -t inside the root is the root's own apt choosing trixie-backports' QEMU.
mmdebstrap_root "$tmp" trixie "$src trixie main" "$src trixie-backports main" -- \
    --customize-hook='chroot "$1" apt-get install -y -q --no-install-recommends -t trixie-backports qemu-system-x86 qemu-system-arm >/dev/null' ||
    die "mmdebstrap could not make the QEMU root (its error above)"

rm -rf "$root"
mv "$tmp" "$root"

# Verify through the wrapper (which must not recurse into this script: no
# stamp yet, so point it at the root directly).
log "verifying"
export AIRLOCK_QEMU_NO_SETUP=1
"$here/qemu" x86_64 -device vfio-user-pci,help | grep -q 'socket' ||
    die "qemu-system-x86_64 lacks -device vfio-user-pci"
"$here/qemu" x86_64 -machine none -display none -S -version >&2
"$here/qemu" aarch64 -machine virt -display none -version >/dev/null ||
    die "qemu-system-aarch64 does not run"
"$here/qemu" aarch64 -device vfio-user-pci,help | grep -q 'socket' ||
    die "qemu-system-aarch64 lacks -device vfio-user-pci"

date -u +%FT%TZ >"$stamp"
log "QEMU root ready in $((SECONDS - start)) s ($(du -sh "$root" | cut -f1))"
