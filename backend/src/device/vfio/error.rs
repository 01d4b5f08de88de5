//! What can go wrong opening or taking over a VFIO device, each with the
//! command or flag that fixes it.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum VfioError {
    #[error("{bdf}: no such PCI device (/sys/bus/pci/devices/{bdf} is missing; `lspci -D` lists addresses)")]
    NoDevice { bdf: String },
    #[error("{bdf}: bound to driver {driver:?}, not vfio-pci; bind it first:\n  echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override\n  echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind   # if bound\n  echo {bdf} > /sys/bus/pci/drivers_probe")]
    NotVfioPci { bdf: String, driver: String },
    #[error("{bdf}: has no IOMMU group; enable the IOMMU (intel_iommu=on, amd_iommu=on, or an SMMU on arm64)")]
    NoIommuGroup { bdf: String },
    #[error("{bdf}: IOMMU group {group} is not viable: VFIO hands out whole groups, and {others} in it is not bound to vfio-pci. Bind every device of the group to vfio-pci (or unbind it): ls /sys/kernel/iommu_groups/{group}/devices")]
    GroupNotViable {
        bdf: String,
        group: String,
        others: String,
    },
    #[error("{bdf}: {} is missing: load VFIO (modprobe vfio-pci) and check the device is bound to vfio-pci", node.display())]
    NoGroupNode { bdf: String, node: PathBuf },
    #[error("{bdf}: no permission to open {} as uid {uid}: run airlock as root, or give its user the group (chown USER {0}, or a udev rule: SUBSYSTEM==\"vfio\", OWNER=\"USER\") and raise its RLIMIT_MEMLOCK", node.display())]
    GroupPermission {
        bdf: String,
        node: PathBuf,
        uid: u32,
    },
    #[error("{bdf}: cannot open the VFIO container /dev/vfio/vfio (load vfio-pci and vfio_iommu_type1): {why}")]
    Container { bdf: String, why: String },
    #[error("{bdf}: cannot attach IOMMU group {group} to the container: {why}. If the host has no interrupt remapping, VFIO refuses the group unless vfio_iommu_type1.allow_unsafe_interrupts=1 (unsafe: devices can forge MSIs)")]
    Attach {
        bdf: String,
        group: String,
        why: String,
    },
    #[error("{bdf}: the host cannot isolate this device's MSIs (no interrupt remapping on x86, or a GICv2m-style MSI frame without ITS DeviceID isolation on ARM): the device could forge interrupts as other devices. Refusing; pass --allow-unsafe-interrupts to run anyway")]
    UnsafeInterrupts { bdf: String },
    #[error("{bdf}: cannot map the table of IOMMU mappings shared with restarted servers ({capacity} entries): {source}")]
    Handover {
        bdf: String,
        capacity: usize,
        source: std::io::Error,
    },
    #[error("{bdf}: the table of IOMMU mappings handed over by the previous airlock cannot be used: {source}")]
    HandedTable { bdf: String, source: std::io::Error },
    #[error("{bdf}: the VFIO group fd handed over (by the previous airlock, or systemd's fd store) is {got}, not {node}: it belongs to another device. Refusing it; clear the store (systemctl clean --what=fdstore airlock@...) or restart airlock")]
    HandedGroup {
        bdf: String,
        node: String,
        got: String,
    },
    #[error("{bdf}: VFIO query failed: {what}: {source}")]
    Query {
        bdf: String,
        what: String,
        source: std::io::Error,
    },
}
