#!/usr/bin/env bash
# scripts/setup-systemd-root.sh: a small Debian trixie root in
# $AIRLOCK_CACHE/systemd-root that boots with systemd as PID 1, and print its
# path (the only line on stdout). scripts/mk-systemd-initramfs turns it into
# an initramfs for the guest kernels of scripts/setup-guest.sh, so airlock's
# systemd units (backend/systemd/) run under a real service manager in an L1
# guest.
#
# trixie, not bookworm: its systemd 257 sets $FDSTORE and knows
# FileDescriptorStorePreserve= (bookworm's 252 has neither).
#
#   systemd, systemd-sysv   PID 1, systemctl, journald (/sbin/init)
#   kmod                    modprobe inside the guest (vfio-pci)
#   util-linux, procps      mount, setsid, ps, pgrep, kill...
#   bash, mawk, grep, sed   what a /test script in bash needs
# No udev: devtmpfs makes the nodes the tests use (/dev/vfio/N, ttyS0) and
# nothing should autoload drivers under TCG. No dbus: systemctl and
# journalctl talk to PID 1 over /run/systemd/private as root. No network
# configuration, and no getty (the console is ttyS0 and the tests run as
# units: nobody logs in).
#
# The stamp records the suite and package list: a changed list makes the
# root anew. Idempotent; needs root (mmdebstrap's root mode) only when it
# builds.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/lib.sh"

suite=trixie
pkgs=(systemd systemd-sysv kmod util-linux procps bash mawk grep sed)
# The customize hooks run in the finished root:
#  - systemd's postinst enables getty@tty1 (getty.target.wants): nobody logs in.
#  - no machine-id: mk-systemd-initramfs writes one per image (an empty or
#    missing one makes systemd think this is a first boot).
#  - apt's lists are not needed in a guest (apt-get clean keeps them).
#  - the root must boot: systemd is where PID 1 is looked for.
# shellcheck disable=SC2016 # $1 is expanded by mmdebstrap's hook shell
debian_root systemd-root "$suite" "${pkgs[*]}" -- \
    --customize-hook='rm -f "$1"/etc/systemd/system/getty.target.wants/getty@*.service' \
    --customize-hook='rm -f "$1"/etc/machine-id "$1"/var/lib/dbus/machine-id' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
    --customize-hook='test -x "$1"/usr/lib/systemd/systemd'
