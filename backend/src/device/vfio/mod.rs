//! Passthrough of a real PCI function through VFIO (legacy container +
//! type1v2, opened with airlock's own ioctls: VfioFds owns the container,
//! group and device fds, so a live upgrade can hand them across execve).
//!
//! - BARs: REGION_READ/WRITE go to the device with pread/pwrite; by
//!   default GET_REGION_INFO also hands the client the VFIO device fd with
//!   sparse-mmap areas covering every mmap-able page but the MSI-X table
//!   and PBA, so guest MMIO bypasses airlock. `--mediate-bars` withholds
//!   the fd so every access goes through airlock.
//! - DMA: each fd-backed DMA_MAP is mapped into airlock (DmaSpace) and then
//!   into the IOMMU at its IOVA; unmapping goes IOMMU first.
//! - Interrupts: the client's eventfds (QEMU's KVM irqfds) go straight into
//!   VFIO_DEVICE_SET_IRQS, so airlock is never woken per interrupt.
//! - Restarts: with the sandbox the supervisor opens the device and every
//!   server inherits it, so a killed server leaves its IOMMU mappings and
//!   interrupts in the kernel (no reset). Each server records them in a
//!   table shared with the next (handover.rs); the next one adopts them:
//!   a replayed DMA_MAP of the same memory takes over its mapping as it
//!   is, a different one replaces it, and what nobody re-mapped by the
//!   end of the adoption window is unmapped (adopt.rs).
//! - Live upgrade: the supervisor execs the new airlock binary with the
//!   VFIO fds and the handover table (a memfd) left open; the successor
//!   rebuilds a VfioPci from them (`resume`: the same queries as `open`,
//!   no attach) and its first server adopts as after a crash.

pub mod adopt;
mod bar_shadow;
pub mod handover;
pub mod ioctl;
pub mod isolation;
pub mod preflight;
pub mod sparse;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use airlock_protocol::device::{
    RegionCap, RegionInfo, SparseArea, DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET,
    PCI_CONFIG_REGION_INDEX, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use airlock_protocol::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use airlock_protocol::irqs::{
    IrqAction, IrqData, IrqSet, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
use thiserror::Error;
use tracing::{debug, warn};

use self::adopt::{MapDecision, MapRecord, Tally};
use self::bar_shadow::{BarInfo, BarShadow};
use self::handover::{Handover, SlotState};
use self::isolation::MsiIsolation;
use self::sparse::{mmap_areas, Hole};
use super::{Device, DeviceError, RegionDesc};
use crate::dma::FileId;
use crate::iova::{self, DoorbellWindow, IovaRange};
use crate::irq::IrqError;

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
    #[error("{bdf}: VFIO query failed: {what}: {source}")]
    Query {
        bdf: String,
        what: String,
        source: std::io::Error,
    },
}

/// The device's VFIO fds. Fields drop in order: the device first (the
/// group leaves the container only once no device fd is open), then the
/// group, then the container (its IOMMU mappings go with it).
pub struct VfioFds {
    pub device: OwnedFd,
    pub group: OwnedFd,
    pub container: OwnedFd,
}

/// Raw numbers of what a live upgrade hands over, valid while the VfioPci
/// they came from lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandedVfio {
    pub container: RawFd,
    pub group: RawFd,
    pub device: RawFd,
    /// The handover table's memfd.
    pub table: RawFd,
}

/// A kernel region and what airlock offers the client for it.
struct Region {
    info: RegionInfo,
    /// Pages the client may mmap (empty: none).
    areas: Vec<SparseArea>,
}

pub struct VfioPci {
    name: String,
    fds: VfioFds,
    flags: u32,
    regions: Vec<Region>,
    irqs: Vec<(u32, u32)>,
    bars: BarShadow,
    /// Trigger eventfds the client assigned, per (index, vector): held so
    /// airlock's table matches what the kernel signals.
    triggers: HashMap<(u32, u32), File>,
    /// IOVA windows DMA must avoid (host reserved regions and holes).
    windows: Vec<DoorbellWindow>,
    /// The host IOMMU's usable IOVA ranges, if VFIO reports them.
    usable: Option<Vec<IovaRange>>,
    isolation: MsiIsolation,
    /// DMA maps of this server's clients that are in the IOMMU: (iova,
    /// size) -> their slot in the handover table.
    iommu_maps: HashMap<(u64, u64), usize>,
    /// What the kernel holds, shared with the servers before and after.
    handover: Handover,
    /// Mappings a killed server left that no client has re-mapped yet:
    /// (slot, record).
    adopted: Vec<(usize, MapRecord)>,
    tally: Tally,
    /// Interrupt indexes a killed server left enabled that this server's
    /// client has not set since.
    adopted_irqs: Vec<u32>,
    /// Mask/unmask notifier eventfds (INTx resample), per (index, vector, action).
    notifiers: HashMap<(u32, u32, u32), File>,
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        self.quiesce();
    }
}

impl VfioPci {
    /// Opens the device; `max_maps` sizes the table of IOMMU mappings
    /// shared with the servers (at least the max_dma_maps they offer).
    pub fn open(
        bdf: &str,
        mediate_bars: bool,
        allow_unsafe_interrupts: bool,
        max_maps: usize,
    ) -> Result<VfioPci, VfioError> {
        let (_, group) = preflight::check(&preflight::Roots::default(), bdf)?;
        let handover = Handover::new(max_maps).map_err(|source| VfioError::Handover {
            bdf: bdf.into(),
            capacity: max_maps,
            source,
        })?;
        let (fds, isolation) = isolation::attach_checked(bdf, &group, allow_unsafe_interrupts)?;
        handover.set_isolation(isolation.to_u32());
        Self::from_fds(bdf, &group, fds, handover, mediate_bars, true)
    }

    /// Takes over the device a previous airlock handed across execve (a
    /// live upgrade): its fds, attached and in use, and its table. Nothing
    /// is reset or re-attached; the first server adopts as after a crash.
    pub fn resume(
        bdf: &str,
        mediate_bars: bool,
        fds: VfioFds,
        table: OwnedFd,
    ) -> Result<VfioPci, VfioError> {
        let (_, group) = preflight::check(&preflight::Roots::default(), bdf)?;
        let handover = Handover::from_memfd(table).map_err(|source| VfioError::HandedTable {
            bdf: bdf.into(),
            source,
        })?;
        Self::from_fds(bdf, &group, fds, handover, mediate_bars, false)
    }

    /// The fds a live upgrade hands to the successor.
    pub fn handed(&self) -> HandedVfio {
        HandedVfio {
            container: self.fds.container.as_raw_fd(),
            group: self.fds.group.as_raw_fd(),
            device: self.fds.device.as_raw_fd(),
            table: self.handover.raw_fd(),
        }
    }

    /// The queries both `open` and `resume` make on an attached device.
    /// `announce`: log the IOVA windows at info (once per airlock start).
    fn from_fds(
        bdf: &str,
        group: &str,
        fds: VfioFds,
        handover: Handover,
        mediate_bars: bool,
        announce: bool,
    ) -> Result<VfioPci, VfioError> {
        let isolation = MsiIsolation::from_u32(handover.isolation());
        let q = |what: &str| {
            let what = what.to_string();
            let bdf = bdf.to_string();
            move |source| VfioError::Query { bdf, what, source }
        };
        let fd = fds.device.as_fd();
        let (flags, num_regions, num_irqs) = ioctl::device_info(fd).map_err(q("device info"))?;
        let mut regions = Vec::new();
        for i in 0..num_regions.min(100) {
            // Absent regions (no VGA, no ROM) answer EINVAL: they are empty.
            let info = ioctl::region_info(fd, i).unwrap_or(RegionInfo {
                index: i,
                ..Default::default()
            });
            regions.push(Region {
                info,
                areas: Vec::new(),
            });
        }
        let mut irqs = Vec::new();
        for i in 0..num_irqs.min(50) {
            irqs.push(ioctl::irq_info(fd, i).unwrap_or((0, 0)));
        }
        let mut dev = VfioPci {
            name: format!("vfio {bdf}"),
            fds,
            flags,
            regions,
            irqs,
            bars: BarShadow::new(
                [BarInfo {
                    register: 0,
                    size: 0,
                }; 6],
                0,
            ),
            triggers: HashMap::new(),
            notifiers: HashMap::new(),
            windows: Vec::new(),
            usable: None,
            isolation,
            iommu_maps: HashMap::new(),
            handover,
            adopted: Vec::new(),
            tally: Tally::default(),
            adopted_irqs: Vec::new(),
        };
        dev.usable = ioctl::iommu_iova_ranges(dev.fds.container.as_fd()).unwrap_or(None);
        dev.windows = iova::read_reserved_regions(group);
        if let Some(u) = &dev.usable {
            for h in iova::holes(u) {
                if !dev.windows.iter().any(|w| w.range == h.range) {
                    dev.windows.push(h);
                }
            }
        }
        let list: Vec<String> = dev.windows.iter().map(|w| w.to_string()).collect();
        let list = if list.is_empty() {
            "none".into()
        } else {
            list.join(", ")
        };
        if announce {
            tracing::info!(device = %dev.name, "IOVA windows DMA must avoid: {list}; MSI isolation: {:?}", dev.isolation);
        } else {
            debug!(device = %dev.name, "IOVA windows DMA must avoid: {list}; MSI isolation: {:?}", dev.isolation);
        }
        let mut bars = [BarInfo {
            register: 0,
            size: 0,
        }; 6];
        for (i, bar) in bars.iter_mut().enumerate() {
            let mut b = [0u8; 4];
            dev.config_read_raw(0x10 + 4 * i, &mut b)
                .map_err(q("config read"))?;
            *bar = BarInfo {
                register: u32::from_le_bytes(b),
                size: dev.regions.get(i).map_or(0, |r| r.info.size),
            };
        }
        let rom = dev.regions.get(6).map_or(0, |r| r.info.size);
        dev.bars = BarShadow::new(bars, rom);
        if !mediate_bars {
            let holes = dev.msix_holes().map_err(q("config read"))?;
            for i in 0..6.min(dev.regions.len()) {
                let r = &dev.regions[i].info;
                if r.flags & REGION_INFO_FLAG_MMAP == 0 || r.size == 0 {
                    continue;
                }
                let kernel: Vec<SparseArea> = r
                    .caps
                    .iter()
                    .find_map(|c| match c {
                        RegionCap::SparseMmap(a) => Some(a.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| {
                        vec![SparseArea {
                            offset: 0,
                            size: r.size,
                        }]
                    });
                let mine: Vec<Hole> = holes
                    .iter()
                    .filter(|(bar, _)| *bar == i)
                    .map(|(_, h)| *h)
                    .collect();
                dev.regions[i].areas = mmap_areas(&kernel, &mine);
            }
        }
        Ok(dev)
    }

    /// In a server: takes over what a killed predecessor left in the
    /// kernel (the device is neither reset nor quiesced). Mappings whose
    /// map or unmap was cut short are unmapped; the others wait for the
    /// client to re-map them (see `adoption_ended`).
    pub fn adopt(&mut self) {
        let mut settled = 0;
        for (slot, state, r) in self.handover.scan() {
            if state == SlotState::Mapped {
                self.adopted.push((slot, r));
                continue;
            }
            // Unmapping an exact range nobody mapped is a no-op.
            if let Err(e) = ioctl::iommu_unmap(self.fds.container.as_fd(), r.iova, r.size) {
                warn!(device = %self.name, "VFIO_IOMMU_UNMAP_DMA [{:#x}, +{:#x}) of a map the previous server left half done failed: {e}", r.iova, r.size);
            }
            self.handover.free(slot);
            settled += 1;
        }
        let irqs = self.handover.irqs();
        self.adopted_irqs = irqs.iter().map(|r| r.index).collect();
        self.tally = Tally {
            adopted: self.adopted.len(),
            ..Tally::default()
        };
        if self.adopted.is_empty() && irqs.is_empty() && settled == 0 {
            return;
        }
        let bytes: u64 = self.adopted.iter().map(|(_, r)| r.size).sum();
        let irqs: Vec<String> = irqs
            .iter()
            .map(|r| {
                format!(
                    "{} (vectors {:?}{})",
                    irq_index_name(r.index),
                    r.vectors,
                    if r.resample { ", resample" } else { "" }
                )
            })
            .collect();
        tracing::info!(
            device = %self.name,
            "adopted {} DMA mappings ({bytes:#x} bytes) and IRQ indexes [{}] from the previous server; the device was not reset{}",
            self.adopted.len(),
            irqs.join(", "),
            if settled > 0 {
                format!(" ({settled} map/unmap cut short by its death undone)")
            } else {
                String::new()
            }
        );
    }

    /// Unmaps a recorded mapping from the IOMMU and frees its slot.
    fn unmap_slot(&mut self, slot: usize, iova: u64, size: u64) {
        self.handover.mark(slot, SlotState::Unmapping);
        match ioctl::iommu_unmap(self.fds.container.as_fd(), iova, size) {
            Ok(n) if n != size => {
                // Before Linux 6.0, type1 let only the mapping process unmap.
                warn!(device = %self.name, "VFIO_IOMMU_UNMAP_DMA [{iova:#x}, +{size:#x}) unmapped {n:#x} bytes: a mapping made by a previous server may stay in the IOMMU (Linux before 6.0 lets only the process that mapped it unmap it; restart airlock to clear it)");
            }
            Ok(_) => {}
            Err(e) => {
                warn!(device = %self.name, "VFIO_IOMMU_UNMAP_DMA [{iova:#x}, +{size:#x}) failed: {e}");
            }
        }
        self.handover.free(slot);
    }

    /// Tears down an interrupt index in the kernel and in the table.
    fn disable_irq_index(&mut self, index: u32) {
        if let Err(e) = ioctl::set_irqs(
            self.fd(),
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
            index,
            0,
            0,
            &[],
        ) {
            debug!(device = %self.name, "disabling IRQ index {index} failed: {e}");
        }
        self.handover.irq_disabled(index);
        self.triggers.retain(|(i, _), _| *i != index);
        self.notifiers.retain(|(i, _, _), _| *i != index);
    }

    /// Drops the adopted interrupt indexes this client has not set: it is
    /// not replaying them (it resets the device, or enables another one).
    fn drop_adopted_irqs(&mut self, which: &[u32], why: &str) {
        for &index in which {
            tracing::info!(device = %self.name, "{why}: disabling IRQ index {} the previous server's client had enabled", irq_index_name(index));
            self.disable_irq_index(index);
        }
        self.adopted_irqs.retain(|i| !which.contains(i));
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fds.device.as_fd()
    }

    fn file(&self) -> std::mem::ManuallyDrop<File> {
        // The device fd viewed as a File for positional I/O; ManuallyDrop
        // keeps this view from closing the fd `fds` owns.
        // SAFETY: the fd stays open while self lives; the File is never dropped.
        std::mem::ManuallyDrop::new(unsafe {
            <File as std::os::fd::FromRawFd>::from_raw_fd(self.fds.device.as_raw_fd())
        })
    }

    fn config_read_raw(&self, offset: usize, out: &mut [u8]) -> std::io::Result<()> {
        let base = self
            .regions
            .get(PCI_CONFIG_REGION_INDEX as usize)
            .map_or(0, |r| r.info.offset);
        self.file().read_exact_at(out, base + offset as u64)
    }

    fn config_write_raw(&self, offset: usize, data: &[u8]) -> std::io::Result<()> {
        let base = self
            .regions
            .get(PCI_CONFIG_REGION_INDEX as usize)
            .map_or(0, |r| r.info.offset);
        self.file().write_all_at(data, base + offset as u64)
    }

    /// The MSI-X table and PBA as (BAR, byte range), from the capability.
    fn msix_holes(&self) -> std::io::Result<Vec<(usize, Hole)>> {
        let mut b = [0u8; 1];
        self.config_read_raw(0x34, &mut b)?;
        let mut at = b[0] as usize & !3;
        for _ in 0..48 {
            if at < 0x40 {
                break;
            }
            let mut h = [0u8; 12];
            self.config_read_raw(at, &mut h)?;
            if h[0] == crate::pci::CAP_ID_MSIX {
                let n = (u16::from_le_bytes([h[2], h[3]]) & 0x7ff) as u64 + 1;
                let table = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
                let pba = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
                let t = (table & !7) as u64;
                let p = (pba & !7) as u64;
                return Ok(vec![
                    (
                        (table & 7) as usize,
                        Hole {
                            start: t,
                            end: t + n * 16,
                        },
                    ),
                    (
                        (pba & 7) as usize,
                        Hole {
                            start: p,
                            end: p + n.div_ceil(64) * 8,
                        },
                    ),
                ]);
            }
            at = h[1] as usize & !3;
        }
        Ok(Vec::new())
    }

    fn os(&self, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeviceError + '_ {
        let what = what.into();
        move |source| DeviceError::Os {
            device: self.name.clone(),
            what,
            source,
        }
    }

    fn irq_err(&self, e: IrqError) -> DeviceError {
        DeviceError::Irq(e, self.name.clone())
    }

    fn region_base(&self, region: u32) -> u64 {
        self.regions
            .get(region as usize)
            .map_or(0, |r| r.info.offset)
    }
}

impl Device for VfioPci {
    fn name(&self) -> &str {
        &self.name
    }

    fn flags(&self) -> u32 {
        DEVICE_FLAGS_PCI | (self.flags & DEVICE_FLAGS_RESET)
    }

    fn num_regions(&self) -> u32 {
        self.regions.len() as u32
    }

    fn region(&self, index: u32) -> Option<RegionDesc<'_>> {
        let r = self.regions.get(index as usize)?;
        let rw = r.info.flags & (REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE);
        if r.areas.is_empty() {
            return Some(RegionDesc::by_message(rw, r.info.size));
        }
        Some(RegionDesc {
            flags: rw | REGION_INFO_FLAG_MMAP,
            size: r.info.size,
            // The client mmaps the VFIO device fd, so it needs the kernel's offset.
            offset: r.info.offset,
            caps: vec![RegionCap::SparseMmap(r.areas.clone())],
            fd: Some(self.fd()),
        })
    }

    fn region_limits(&self, index: u32) -> Option<(u32, u64)> {
        let r = self.regions.get(index as usize)?;
        let mmap = if r.areas.is_empty() {
            0
        } else {
            REGION_INFO_FLAG_MMAP
        };
        Some((
            r.info.flags & (REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE) | mmap,
            r.info.size,
        ))
    }

    fn num_irqs(&self) -> u32 {
        self.irqs.len() as u32
    }

    fn irq_info(&self, index: u32) -> Option<(u32, u32)> {
        self.irqs.get(index as usize).copied()
    }

    fn set_irqs(&mut self, set: IrqSet) -> Result<(), DeviceError> {
        let (_, have) = self.irq_info(set.index).ok_or_else(|| {
            self.irq_err(IrqError::NoSuchIndex {
                index: set.index,
                count: self.irqs.len(),
            })
        })?;
        let disable_all = crate::irq::check_range(&set, have).map_err(|e| self.irq_err(e))?;
        let displaced = adopt::displaced_irqs(&self.adopted_irqs, set.index);
        self.drop_adopted_irqs(&displaced, "the client sets another interrupt index");
        // From here the client owns this index (a replay continues it).
        self.adopted_irqs.retain(|&i| i != set.index);
        let action = match set.action {
            IrqAction::Mask => IRQ_SET_ACTION_MASK,
            IrqAction::Unmask => IRQ_SET_ACTION_UNMASK,
            IrqAction::Trigger => IRQ_SET_ACTION_TRIGGER,
        };
        let (dflag, data, files): (u32, Vec<u8>, Vec<Option<File>>) = match set.data {
            IrqData::None => (IRQ_SET_DATA_NONE, vec![], vec![]),
            IrqData::Bool(v) => (
                IRQ_SET_DATA_BOOL,
                v.iter().map(|b| *b as u8).collect(),
                vec![],
            ),
            IrqData::Eventfds(fds) if fds.is_empty() => (
                IRQ_SET_DATA_EVENTFD,
                (0..set.count).flat_map(|_| (-1i32).to_ne_bytes()).collect(),
                (0..set.count).map(|_| None).collect(),
            ),
            IrqData::Eventfds(fds) => (
                IRQ_SET_DATA_EVENTFD,
                fds.iter()
                    .flat_map(|f| f.as_raw_fd().to_ne_bytes())
                    .collect(),
                fds.into_iter()
                    .map(|f: OwnedFd| Some(File::from(f)))
                    .collect(),
            ),
        };
        ioctl::set_irqs(
            self.fd(),
            dflag | action,
            set.index,
            set.start,
            set.count,
            &data,
        )
        .map_err(self.os(format!(
            "VFIO_DEVICE_SET_IRQS index {} [{}, +{})",
            set.index, set.start, set.count
        )))?;
        // The kernel holds its own references now; airlock's table mirrors them.
        if disable_all {
            self.triggers.retain(|(i, _), _| *i != set.index);
            self.notifiers.retain(|(i, _, _), _| *i != set.index);
            self.handover.irq_disabled(set.index);
        } else if dflag == IRQ_SET_DATA_EVENTFD {
            if action == IRQ_SET_ACTION_TRIGGER {
                self.handover.irq_enabled(set.index);
            }
            for (k, f) in files.into_iter().enumerate() {
                let v = set.start + k as u32;
                match action {
                    IRQ_SET_ACTION_TRIGGER => self.handover.irq_vector(set.index, v, f.is_some()),
                    IRQ_SET_ACTION_UNMASK => self.handover.irq_resample(set.index, f.is_some()),
                    _ => {}
                }
                match (action, f) {
                    (IRQ_SET_ACTION_TRIGGER, Some(f)) => {
                        self.triggers.insert((set.index, v), f);
                    }
                    (IRQ_SET_ACTION_TRIGGER, None) => {
                        self.triggers.remove(&(set.index, v));
                    }
                    (a, Some(f)) => {
                        self.notifiers.insert((set.index, v, a), f);
                    }
                    (a, None) => {
                        self.notifiers.remove(&(set.index, v, a));
                    }
                }
            }
        }
        debug!(device = %self.name, index = set.index, start = set.start, count = set.count, "SET_IRQS passed to VFIO");
        Ok(())
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if region == PCI_CONFIG_REGION_INDEX {
            self.config_read_raw(offset as usize, data)
                .map_err(self.os("config read"))?;
            self.bars.overlay(offset as usize, data);
            return Ok(());
        }
        let at = self.region_base(region) + offset;
        self.file()
            .read_exact_at(data, at)
            .map_err(self.os(format!("read region {region} at {offset:#x}")))
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if region == PCI_CONFIG_REGION_INDEX {
            let runs: Vec<(usize, Vec<u8>)> = self
                .bars
                .absorb(offset as usize, data)
                .into_iter()
                .map(|(o, d)| (o, d.to_vec()))
                .collect();
            for (o, d) in runs {
                self.config_write_raw(o, &d)
                    .map_err(self.os("config write"))?;
            }
            return Ok(());
        }
        let at = self.region_base(region) + offset;
        self.file()
            .write_all_at(data, at)
            .map_err(self.os(format!("write region {region} at {offset:#x}")))
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        if self.flags & DEVICE_FLAGS_RESET == 0 {
            return Err(DeviceError::NoReset(self.name.clone()));
        }
        // A replaying client never resets: interrupts a killed server's
        // client left are not this client's.
        let stale = std::mem::take(&mut self.adopted_irqs);
        self.drop_adopted_irqs(&stale, "DEVICE_RESET");
        ioctl::reset(self.fd()).map_err(self.os("VFIO_DEVICE_RESET"))
    }

    /// Bus mastering and decoding off, every interrupt torn down, then a
    /// reset if the device has one. The session unmaps DMA right after.
    /// Turning memory decoding off makes VFIO zap the client's BAR mmaps,
    /// so a departed client's mapping faults instead of reaching the device
    /// (until a next client enables decoding again: see README, fast path).
    fn quiesce(&mut self) {
        let mut cmd = [0u8; 2];
        if self.config_read_raw(crate::pci::COMMAND, &mut cmd).is_ok() {
            let off =
                crate::pci::COMMAND_MASTER | crate::pci::COMMAND_MEMORY | crate::pci::COMMAND_IO;
            let v = u16::from_le_bytes(cmd) & !off;
            if let Err(e) = self.config_write_raw(crate::pci::COMMAND, &v.to_le_bytes()) {
                warn!(device = %self.name, "cannot clear bus mastering: {e}");
            }
        }
        for (index, &(_, count)) in self.irqs.iter().enumerate() {
            if count > 0 {
                let _ = ioctl::set_irqs(
                    self.fd(),
                    IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
                    index as u32,
                    0,
                    0,
                    &[],
                );
            }
            self.handover.irq_disabled(index as u32);
        }
        self.adopted_irqs.clear();
        self.triggers.clear();
        self.notifiers.clear();
        if self.flags & DEVICE_FLAGS_RESET != 0 {
            if let Err(e) = ioctl::reset(self.fd()) {
                debug!(device = %self.name, "reset after disconnect failed: {e}");
            }
        }
    }

    fn iova_windows(&self) -> Vec<DoorbellWindow> {
        self.windows.clone()
    }

    fn usable_iova(&self) -> Option<Vec<IovaRange>> {
        self.usable.clone()
    }

    fn connect_warning(&self) -> Option<String> {
        (self.isolation == MsiIsolation::Unsafe).then(|| {
            format!(
                "{}: the host cannot isolate this device's MSIs; serving only because of --allow-unsafe-interrupts (the device can forge other devices' interrupts)",
                self.name
            )
        })
    }

    fn needs_host_addresses(&self) -> bool {
        true
    }

    fn dma_mapped(
        &mut self,
        iova: u64,
        size: u64,
        host: Option<u64>,
        flags: u32,
        file: Option<FileId>,
    ) -> Result<(), DeviceError> {
        if !self.adopted.is_empty() {
            let records: Vec<MapRecord> = self.adopted.iter().map(|(_, r)| *r).collect();
            let mut replace = match adopt::decide(&records, iova, size, flags, file) {
                MapDecision::Claim(i) if host.is_some() => {
                    // The same memory: the mapping stays as it is, so a DMA
                    // the device has in flight keeps landing in the same page.
                    let (slot, _) = self.adopted.swap_remove(i);
                    self.iommu_maps.insert((iova, size), slot);
                    self.tally.claimed += 1;
                    debug!(device = %self.name, "DMA_MAP [{iova:#x}, +{size:#x}) takes over the previous server's IOMMU mapping");
                    return Ok(());
                }
                MapDecision::Claim(i) => vec![i],
                MapDecision::Fresh { replace } => replace,
            };
            replace.sort_unstable_by(|a, b| b.cmp(a));
            for i in replace {
                let (slot, r) = self.adopted.remove(i);
                debug!(device = %self.name, "DMA_MAP [{iova:#x}, +{size:#x}) is other memory than the adopted mapping [{:#x}, +{:#x}): unmapping that first", r.iova, r.size);
                self.unmap_slot(slot, r.iova, r.size);
                self.tally.replaced += 1;
            }
        }
        let Some(host) = host else {
            // QEMU maps its firmware ROMs (read-only, no fd) too; the device
            // never DMAs there, so they are recorded but kept out of the
            // IOMMU. Writable memory without an fd is guest RAM that is not
            // shared: the device could not reach it, so that is refused.
            if flags & DMA_MAP_FLAG_WRITE == 0 {
                debug!(device = %self.name, "read-only DMA_MAP [{iova:#x}, +{size:#x}) without fd (firmware ROM): not mapped for the device");
                return Ok(());
            }
            return Err(DeviceError::NeedsSharedMemory {
                device: self.name.clone(),
                iova,
                size,
            });
        };
        let mut vflags = 0;
        if flags & DMA_MAP_FLAG_READ != 0 {
            vflags |= ioctl::VFIO_DMA_MAP_FLAG_READ;
        }
        if flags & DMA_MAP_FLAG_WRITE != 0 {
            vflags |= ioctl::VFIO_DMA_MAP_FLAG_WRITE;
        }
        let record = MapRecord {
            iova,
            size,
            flags,
            file: file.unwrap_or_default(),
        };
        let slot = match self.handover.begin_map(&record) {
            Some(s) => s,
            None => {
                // Full only while unclaimed adopted mappings hold slots.
                self.adoption_ended();
                self.handover.begin_map(&record).ok_or_else(|| {
                    self.os(format!(
                        "recording DMA_MAP [{iova:#x}, +{size:#x}) for a restarted server"
                    ))(std::io::Error::from_raw_os_error(libc::ENOSPC))
                })?
            }
        };
        // SAFETY: `host` is airlock's mapping of the client's memory for
        // exactly this DMA_MAP (DmaSpace); the session takes a range out of
        // the device (dma_unmapped: the IOMMU unmap) before it unmaps it
        // from airlock, and the kernel keeps the pages pinned while the
        // IOMMU maps them, so they are never reused under the device.
        let mapped =
            unsafe { ioctl::iommu_map(self.fds.container.as_fd(), host, iova, size, vflags) };
        if let Err(e) = mapped {
            self.handover.free(slot);
            if e.raw_os_error() == Some(libc::ENOMEM) {
                // VFIO pins every mapped page against RLIMIT_MEMLOCK.
                let pinned: u64 = self.iommu_maps.keys().map(|(_, s)| s).sum();
                return Err(DeviceError::MemlockTooLow {
                    device: self.name.clone(),
                    iova,
                    size,
                    pinned,
                });
            }
            return Err(self
                .os(format!("VFIO_IOMMU_MAP_DMA [{iova:#x}, +{size:#x})"))(
                e
            ));
        }
        self.handover.mark(slot, SlotState::Mapped);
        self.iommu_maps.insert((iova, size), slot);
        Ok(())
    }

    fn dma_unmapped(&mut self, iova: u64, size: u64) {
        if let Some(slot) = self.iommu_maps.remove(&(iova, size)) {
            self.unmap_slot(slot, iova, size);
        }
    }

    fn adoption_ended(&mut self) {
        let left = std::mem::take(&mut self.adopted);
        for (slot, r) in &left {
            self.unmap_slot(*slot, r.iova, r.size);
        }
        let t = Tally {
            dropped: self.tally.dropped + left.len(),
            ..self.tally
        };
        if t.adopted > 0 {
            tracing::info!(
                device = %self.name,
                "adoption window closed: of {} DMA mappings adopted from the previous server, {} were re-mapped by the client with the same memory (kept), {} replaced by different memory, {} dropped (not re-mapped: unmapped from the IOMMU)",
                t.adopted,
                t.claimed,
                t.replaced,
                t.dropped
            );
        }
        self.tally = Tally::default();
    }
}

/// vfio-pci's interrupt indexes by name, for logs.
fn irq_index_name(index: u32) -> String {
    match index {
        0 => "INTx".into(),
        1 => "MSI".into(),
        2 => "MSI-X".into(),
        3 => "ERR".into(),
        4 => "REQ".into(),
        i => format!("index {i}"),
    }
}
