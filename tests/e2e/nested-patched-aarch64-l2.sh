#!/bin/sh
# /test inside the L2 guest of tests/e2e/nested-patched-aarch64.sh (busybox sh):
# the guest program against the edu that `airlock --vfio` serves from L1,
# then what the guest learnt about the device's IOMMU:
#   AIRLOCK-IOMMU <bdf> <iommu device> <its driver>   (virtio-iommu: "virtio...")
#   AIRLOCK-RESV-GROUP <bdf> <group>
#   AIRLOCK-RESV <start> <end> <type>                 (one per reserved_regions line)
# The iommu_group link exists once the program has bound the device to vfio-pci.
# Exit: the guest program's status.
/airlock-guest-test "$@"
rc=$?
for f in /sys/bus/pci/devices/*; do
    if [ "$(cat "$f/vendor")" = 0x1234 ] && [ "$(cat "$f/device")" = 0x11e8 ]; then
        # Which IOMMU translates the device's DMA: the only one in L2 is the
        # virtio-iommu, whose iommu device hangs off a virtio device.
        i=$(readlink -f "$f/iommu")
        drv=$(readlink -f "$i/device/driver" 2>/dev/null)
        echo "AIRLOCK-IOMMU ${f##*/} ${i##*/} ${drv##*/}"
        g=$(readlink "$f/iommu_group")
        echo "AIRLOCK-RESV-GROUP ${f##*/} ${g##*/}"
        while read -r line; do echo "AIRLOCK-RESV $line"; done <"$f/iommu_group/reserved_regions"
    fi
done
exit $rc
