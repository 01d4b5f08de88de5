#!/usr/bin/env bash
# scripts/setup-cross.sh [aarch64]: make the host able to build static aarch64
# guest programs (tests/guest) with
#     CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=<repo>/scripts/aarch64-linux-gnu-gcc \
#     RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release -p airlock-guest-test --target aarch64-unknown-linux-gnu
# Adds the rustup target if it is missing and makes the build root
# (scripts/setup-build-root.sh), whose Debian cross gcc and arm64 glibc
# scripts/aarch64-linux-gnu-gcc runs: nothing is installed on the host.
# Idempotent; needs root only when the build root must be made.
# The linker is passed by env (no committed .cargo/config).
# Exit: 0 ready; 1 failed (the reason on stderr).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"

arch=${1:-aarch64}
[[ $arch == aarch64 ]] || die "only aarch64 is supported (got '$arch')"
target=aarch64-unknown-linux-gnu
linker="$here/aarch64-linux-gnu-gcc"

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

"$here/setup-build-root.sh" >/dev/null || die "the build root (cross gcc) could not be made"
# Static glibc for the target (crt-static) must be there.
"$linker" -print-file-name=libc.a | grep -q / || die "$linker has no static arm64 libc.a"
log "ready: $target via $linker ($("$linker" -dumpversion), the build root's)"
