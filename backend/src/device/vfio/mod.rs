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
//!   into the IOMMU at its IOVA; unmapping goes IOMMU first, adjacent maps
//!   unmapped together in one call (maps.rs).
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
//!
//! Rooms: kernel.rs (the fds, what VFIO reports, positional I/O), irqs.rs
//! (the interrupt mirror), maps.rs (the IOMMU map record and adoption),
//! bar_shadow.rs, handover.rs (the table shared across servers), adopt.rs
//! (the adoption decisions), isolation.rs and preflight.rs (opening).

pub mod adopt;
mod bar_shadow;
mod error;
pub mod handover;
pub mod ioctl;
mod irqs;
pub mod isolation;
mod kernel;
mod maps;
pub mod preflight;
pub mod request;
pub mod sparse;
#[cfg(test)]
mod tests;
mod windows;

use std::os::fd::{AsRawFd, OwnedFd};

use airlock_protocol::device::{
    RegionCap, DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, PCI_CONFIG_REGION_INDEX,
    REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use airlock_protocol::irqs::IrqSet;
use tracing::{debug, warn};

use self::bar_shadow::BarShadow;
pub use self::error::VfioError;
use self::handover::Handover;
use self::irqs::IrqMirror;
use self::isolation::MsiIsolation;
use self::kernel::KernelDevice;
pub use self::kernel::{HandedVfio, VfioFds};
use self::maps::{DmaMap, IommuMaps};
use self::request::{ClientRequest, RequestWatch, REQ_INDEX};
use self::sparse::{mmap_areas, Hole};
use super::{Device, DeviceError, RegionDesc};
use crate::device::irq_rules::IrqError;
use crate::device::pci::{COMMAND, COMMAND_IO, COMMAND_MASTER, COMMAND_MEMORY};
use crate::dma::FileId;
use crate::iova::{DoorbellWindow, IovaRange};

/// A passed-through PCI function: the kernel device, and what airlock
/// keeps beside it (BAR shadow, interrupt mirror, IOMMU map record, the
/// IOVA windows DMA must avoid).
pub struct VfioPci {
    name: String,
    kernel: KernelDevice,
    bars: BarShadow,
    irqs: IrqMirror,
    maps: IommuMaps,
    /// IOVA windows DMA must avoid (host reserved regions and holes).
    windows: Vec<DoorbellWindow>,
    /// The host IOMMU's usable IOVA ranges, if VFIO reports them.
    usable: Option<Vec<IovaRange>>,
    isolation: MsiIsolation,
    /// The client's REQ eventfd: the kernel's REQ trigger is airlock's own
    /// (request.rs), relayed to this one.
    request: ClientRequest,
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
        // Handed fds of another device must not be served as this one.
        let node = format!("/dev/vfio/{group}");
        let got = std::fs::read_link(format!("/proc/self/fd/{}", fds.group.as_raw_fd()))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| e.to_string());
        if got != node {
            return Err(VfioError::HandedGroup {
                bdf: bdf.into(),
                node,
                got,
            });
        }
        let handover = Handover::from_memfd(table).map_err(|source| VfioError::HandedTable {
            bdf: bdf.into(),
            source,
        })?;
        Self::from_fds(bdf, &group, fds, handover, mediate_bars, false)
    }

    /// The fds a live upgrade hands to the successor.
    pub fn handed(&self) -> HandedVfio {
        let fds = &self.kernel.fds;
        HandedVfio {
            container: fds.container.as_raw_fd(),
            group: fds.group.as_raw_fd(),
            device: fds.device.as_raw_fd(),
            table: self.maps.table().raw_fd(),
        }
    }

    /// A watch on the kernel's device request (REQ), for the process that
    /// holds the device longest to arm; None if VFIO offers no REQ index.
    pub fn request_watch(&self) -> std::io::Result<Option<RequestWatch>> {
        match self.kernel.irqs.get(REQ_INDEX as usize) {
            Some(&(_, 1)) => RequestWatch::new(self.kernel.fd()).map(Some),
            _ => Ok(None),
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
        let q = |what: &str| {
            let what = what.to_string();
            let bdf = bdf.to_string();
            move |source| VfioError::Query { bdf, what, source }
        };
        let name = format!("vfio {bdf}");
        let isolation = MsiIsolation::from_u32(handover.isolation());
        let kernel = KernelDevice::query(fds).map_err(q("device info"))?;
        let (windows, usable) = windows::iova_windows(kernel.container(), group);
        let list: Vec<String> = windows.iter().map(|w| w.to_string()).collect();
        let list = if list.is_empty() {
            "none".into()
        } else {
            list.join(", ")
        };
        if announce {
            tracing::info!(device = %name, "IOVA windows DMA must avoid: {list}; MSI isolation: {isolation:?}");
        } else {
            debug!(device = %name, "IOVA windows DMA must avoid: {list}; MSI isolation: {isolation:?}");
        }
        let mut dev = VfioPci {
            bars: bar_shadow(&kernel).map_err(q("config read"))?,
            maps: IommuMaps::new(name.clone(), handover),
            name,
            kernel,
            irqs: IrqMirror::default(),
            windows,
            usable,
            isolation,
            request: ClientRequest::default(),
        };
        if !mediate_bars {
            dev.offer_mmaps().map_err(q("config read"))?;
        }
        Ok(dev)
    }

    /// Lets the client mmap every mmap-able BAR page but the MSI-X table
    /// and PBA, which airlock mediates.
    fn offer_mmaps(&mut self) -> std::io::Result<()> {
        let holes = self.kernel.msix_holes()?;
        for (i, region) in self.kernel.regions.iter_mut().enumerate().take(6) {
            let r = &region.info;
            if r.flags & REGION_INFO_FLAG_MMAP == 0 || r.size == 0 {
                continue;
            }
            let mine: Vec<Hole> = holes
                .iter()
                .filter(|(bar, _)| *bar == i)
                .map(|(_, h)| *h)
                .collect();
            region.areas = mmap_areas(&region.kernel_areas(), &mine);
        }
        Ok(())
    }

    /// In a server: takes over what a killed predecessor left in the
    /// kernel (the device is neither reset nor quiesced). Mappings whose
    /// map or unmap was cut short are unmapped; the others wait for the
    /// client to re-map them (see `adoption_ended`).
    pub fn adopt(&mut self) {
        let settled = self.maps.adopt(self.kernel.container());
        let irqs = self.maps.table().irqs();
        self.irqs.adopt(irqs.iter().map(|r| r.index).collect());
        let (maps, bytes) = self.maps.adopted_size();
        if maps == 0 && irqs.is_empty() && settled == 0 {
            return;
        }
        let irqs: Vec<String> = irqs
            .iter()
            .map(|r| {
                format!(
                    "{} (vectors {:?}{})",
                    irqs::index_name(r.index),
                    r.vectors,
                    if r.resample { ", resample" } else { "" }
                )
            })
            .collect();
        let settled = if settled > 0 {
            format!(" ({settled} map/unmap cut short by its death undone)")
        } else {
            String::new()
        };
        tracing::info!(
            device = %self.name,
            "adopted {maps} DMA mappings ({bytes:#x} bytes) and IRQ indexes [{}] from the previous server; the device was not reset{settled}",
            irqs.join(", "),
        );
    }

    /// Drops the adopted interrupt indexes in `which`.
    fn drop_adopted_irqs(&mut self, which: &[u32], why: &str) {
        let (fd, table) = (self.kernel.fd(), self.maps.table());
        self.irqs.drop_adopted(fd, table, which, why, &self.name);
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
}

/// The BAR and ROM registers as the device holds them, with the sizes
/// VFIO reports.
fn bar_shadow(kernel: &KernelDevice) -> std::io::Result<BarShadow> {
    let size = |i: usize| kernel.regions.get(i).map_or(0, |r| r.info.size);
    BarShadow::read(|at, out| kernel.config_read(at, out), size)
}

impl Device for VfioPci {
    fn name(&self) -> &str {
        &self.name
    }

    fn flags(&self) -> u32 {
        DEVICE_FLAGS_PCI | (self.kernel.flags & DEVICE_FLAGS_RESET)
    }

    fn num_regions(&self) -> u32 {
        self.kernel.regions.len() as u32
    }

    fn region(&self, index: u32) -> Option<RegionDesc<'_>> {
        let r = self.kernel.regions.get(index as usize)?;
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
            fd: Some(self.kernel.fd()),
        })
    }

    fn region_limits(&self, index: u32) -> Option<(u32, u64)> {
        let r = self.kernel.regions.get(index as usize)?;
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
        self.kernel.irqs.len() as u32
    }

    fn irq_info(&self, index: u32) -> Option<(u32, u32)> {
        self.kernel.irqs.get(index as usize).copied()
    }

    fn set_irqs(&mut self, set: IrqSet) -> Result<(), DeviceError> {
        if set.index == REQ_INDEX && self.irq_info(REQ_INDEX).is_some() {
            self.request.apply(set).map_err(|e| self.irq_err(e))?;
            debug!(device = %self.name, set = self.request.is_set(), "REQ eventfd kept for the relay");
            return Ok(());
        }
        let (_, have) = self.irq_info(set.index).ok_or_else(|| {
            self.irq_err(IrqError::NoSuchIndex {
                index: set.index,
                count: self.kernel.irqs.len(),
            })
        })?;
        let disable_all =
            crate::device::irq_rules::check_range(&set, have).map_err(|e| self.irq_err(e))?;
        let displaced = adopt::displaced_irqs(self.irqs.adopted(), set.index);
        self.drop_adopted_irqs(&displaced, "the client sets another interrupt index");
        let (index, start, count) = (set.index, set.start, set.count);
        let what = format!("VFIO_DEVICE_SET_IRQS index {index} [{start}, +{count})");
        let (fd, table) = (self.kernel.fd(), self.maps.table());
        self.irqs
            .apply(fd, table, set, disable_all)
            .map_err(self.os(what))?;
        debug!(device = %self.name, index, start, count, "SET_IRQS passed to VFIO");
        Ok(())
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if region == PCI_CONFIG_REGION_INDEX {
            self.kernel
                .config_read(offset as usize, data)
                .map_err(self.os("config read"))?;
            self.bars.overlay(offset as usize, data);
            return Ok(());
        }
        self.kernel
            .read(region, offset, data)
            .map_err(self.os(format!("read region {region} at {offset:#x}")))
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if region == PCI_CONFIG_REGION_INDEX {
            // BAR and ROM registers stay in the shadow; the rest goes on.
            let runs: Vec<(usize, Vec<u8>)> = self
                .bars
                .absorb(offset as usize, data)
                .into_iter()
                .map(|(o, d)| (o, d.to_vec()))
                .collect();
            for (o, d) in runs {
                self.kernel
                    .config_write(o, &d)
                    .map_err(self.os("config write"))?;
            }
            return Ok(());
        }
        self.kernel
            .write(region, offset, data)
            .map_err(self.os(format!("write region {region} at {offset:#x}")))
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        if self.kernel.flags & DEVICE_FLAGS_RESET == 0 {
            return Err(DeviceError::NoReset(self.name.clone()));
        }
        // A replaying client never resets: interrupts a killed server's
        // client left are not this client's.
        let stale = self.irqs.adopted().to_vec();
        self.drop_adopted_irqs(&stale, "DEVICE_RESET");
        ioctl::reset(self.kernel.fd()).map_err(self.os("VFIO_DEVICE_RESET"))
    }

    /// Bus mastering and decoding off, every interrupt torn down, then a
    /// reset if the device has one. The session unmaps DMA right after.
    /// Turning memory decoding off makes VFIO zap the client's BAR mmaps,
    /// so a departed client's mapping faults instead of reaching the device
    /// (until a next client enables decoding again: see README, fast path).
    fn quiesce(&mut self) {
        let mut cmd = [0u8; 2];
        if self.kernel.config_read(COMMAND, &mut cmd).is_ok() {
            let v = u16::from_le_bytes(cmd) & !(COMMAND_MASTER | COMMAND_MEMORY | COMMAND_IO);
            if let Err(e) = self.kernel.config_write(COMMAND, &v.to_le_bytes()) {
                warn!(device = %self.name, "cannot clear bus mastering: {e}");
            }
        }
        self.request.set(None);
        let (fd, table) = (self.kernel.fd(), self.maps.table());
        self.irqs.quiesce(fd, table, &self.kernel.irqs);
        if self.kernel.flags & DEVICE_FLAGS_RESET != 0 {
            if let Err(e) = ioctl::reset(self.kernel.fd()) {
                debug!(device = %self.name, "reset after disconnect failed: {e}");
            }
        }
    }

    fn withdrawn(&self) -> bool {
        request::requested()
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
        let map = DmaMap {
            iova,
            size,
            host,
            flags,
            file,
        };
        self.maps.map(self.kernel.container(), map)
    }

    fn dma_unmapped(&mut self, iova: u64, size: u64) {
        self.maps.unmap(self.kernel.container(), iova, size);
    }

    fn dma_unmapped_many(&mut self, ranges: &[(u64, u64)]) {
        self.maps.unmap_many(self.kernel.container(), ranges);
    }

    fn dma_summary(&mut self) -> Option<String> {
        Some(self.maps.summary())
    }

    fn adoption_ended(&mut self) {
        self.maps.adoption_ended(self.kernel.container());
    }
}
