#!/usr/bin/env bash
# scripts/setup-cross.sh [aarch64]: make the host able to build static aarch64
# guest programs (tests/guest) with
#     CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
#     RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release -p airlock-guest-test --target aarch64-unknown-linux-gnu
# Adds the rustup target if it is missing and installs Debian's cross linker
# (gcc-aarch64-linux-gnu, which brings the arm64 glibc for static linking) from
# the host's own release. Idempotent; needs root only when something is missing.
# The linker is passed by env (no committed .cargo/config).
# Exit: 0 ready; 1 failed (the reason on stderr).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"

arch=${1:-aarch64}
[[ $arch == aarch64 ]] || die "only aarch64 is supported (got '$arch')"
target=aarch64-unknown-linux-gnu
linker=aarch64-linux-gnu-gcc

command -v cargo >/dev/null || die "cargo not found (install a Rust toolchain)"
if command -v rustup >/dev/null; then
    if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
        log "rustup target add $target"
        rustup target add "$target" >&2 || die "rustup target add $target failed"
    fi
else
    # A toolchain without rustup: the target's std must already be there.
    sysroot=$(rustc --print sysroot)
    [[ -d "$sysroot/lib/rustlib/$target" ]] ||
        die "no rustup and no $target std in $sysroot (install the target's rust-std)"
fi

if ! command -v "$linker" >/dev/null; then
    # need_host_pkgs runs apt-get update first, then installs from the host's release.
    need_host_pkgs "$linker:gcc-aarch64-linux-gnu" "aarch64-linux-gnu-ld:binutils-aarch64-linux-gnu"
    command -v "$linker" >/dev/null || die "$linker still missing after installing gcc-aarch64-linux-gnu"
fi
# Static glibc for the target (crt-static): comes with libc6-dev-arm64-cross.
if ! "$linker" -print-file-name=libc.a | grep -q /; then
    need_host_pkgs "__no_such_cmd__:libc6-dev-arm64-cross"
fi
log "ready: $target via $linker ($("$linker" -dumpversion))"
