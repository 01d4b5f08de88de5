#!/usr/bin/env bash
# scripts/setup-libvirt-root.sh: a Debian trixie root in
# $AIRLOCK_CACHE/libvirt-root with libvirt's daemon, its QEMU driver and virsh,
# and QEMU, all from trixie-backports, and print its path (the only line on
# stdout). tests/e2e/libvirt-x86_64.sh runs a real libvirtd from it (chrooted,
# in a private mount and pid namespace) whose QEMU drives airlock.
#
# trixie-backports, not trixie: trixie's QEMU 10.0 has no -device
# vfio-user-pci (it came in 10.1; backports has 11.1), and backports' libvirt
# (12.9) is the one released beside that QEMU. Every package that backports
# has is taken from there (a pin of 500, level with trixie: the higher version
# wins), as `apt-get -t trixie-backports` would.
#
#   libvirt-daemon              libvirtd (the monolithic daemon)
#   libvirt-daemon-driver-qemu  its QEMU driver; creates the libvirt-qemu
#                               user and group (sysusers, gid 64055) that
#                               QEMU runs as; pulls virtlogd (libvirt-daemon-log)
#   libvirt-clients             virsh
#   qemu-system-x86             QEMU 11.1 (vfio-user-pci)
#   procps                      ps, to show which user QEMU runs as
# No libvirt-daemon-system: its network, storage, nwfilter... drivers, polkit
# and the default network are not needed to run one domain.
#
# The stamp records the suite and package list: a changed list makes the root
# anew. Idempotent; needs root (mmdebstrap's root mode) only when it builds.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"

suite=trixie
pkgs=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 procps)
# The mirror is the host's own (lib.sh), also for the backports suite.
src="deb [signed-by=$(debian_keyring)] $(debian_mirror) $suite-backports main"
# The hooks: setup hooks run before apt reads its indexes (so the backports
# source and pin take effect for every package installed); customize hooks
# in the finished root check that it is what the test needs.
# shellcheck disable=SC2016 # $1 is expanded by mmdebstrap's hook shell
debian_root libvirt-root "$suite" "${pkgs[*]}" -- \
    --setup-hook="echo '$src' >\"\$1\"/etc/apt/sources.list.d/backports.list" \
    --setup-hook="printf 'Package: *\nPin: release n=$suite-backports\nPin-Priority: 500\n' >\"\$1\"/etc/apt/preferences.d/backports" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
    --customize-hook='chroot "$1" qemu-system-x86_64 -device vfio-user-pci,help | grep -q socket' \
    --customize-hook='chroot "$1" getent passwd libvirt-qemu >/dev/null' \
    --customize-hook='test -x "$1"/usr/sbin/libvirtd -a -x "$1"/usr/sbin/virtlogd -a -x "$1"/usr/bin/virsh'
