#!/usr/bin/env bash
# scripts/setup-build-root.sh: a Debian bookworm root in $AIRLOCK_CACHE/build-root
# holding everything the patched QEMU builds need, and print its path (the only
# line on stdout). The host installs no library and no -dev package: the root's
# own apt resolves the build dependencies, whatever the host's package database
# holds (scripts/setup-qemu-patched.sh and setup-qemu-patched-arm64.sh build in it
# through lib.sh's in_root; scripts/setup-cross.sh links with its cross gcc).
#
#   amd64   gcc, ninja, flex, bison, pkgconf, python3-venv and QEMU's libraries
#           (glib, pixman, libfdt, zlib) as -dev packages
#   arm64   Debian's cross gcc (gcc-aarch64-linux-gnu) with its glibc
#           (libc6-dev-arm64-cross: crt files and the static libc that
#           crt-static Rust programs link). The arm64 libraries QEMU links
#           against are a separate sysroot (setup-qemu-patched-arm64.sh): bookworm's
#           libfdt-dev cannot be installed for two architectures at once.
#
# The stamp records the package list: a changed list makes the root anew.
# Idempotent; needs root (mmdebstrap's root mode) only when it builds.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"

suite=bookworm
pkgs=(
    gcc libc6-dev binutils ninja-build flex bison pkgconf python3 python3-venv
    libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev
    gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu libc6-dev-arm64-cross
)
debian_root build-root "$suite" "${pkgs[*]}"
