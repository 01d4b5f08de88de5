//! The seam between the server and a device: the emulated devices and the
//! VFIO passthrough device implement [`Device`] and pass the same tests.

pub mod emulated;
pub mod irq_rules;
#[cfg(test)]
pub mod mock;
pub mod pci;
pub mod vfio;

use std::os::fd::BorrowedFd;

use airlock_protocol::device::RegionCap;
use airlock_protocol::irqs::IrqSet;
use thiserror::Error;

use self::irq_rules::IrqError;
use crate::dma::DmaError;

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("{device}: region {region} has no {what} access")]
    Access {
        device: String,
        region: u32,
        what: &'static str,
    },
    #[error("{device}: {0}", device = .1)]
    Irq(IrqError, String),
    #[error("{device}: reset is not supported", device = .0)]
    NoReset(String),
    #[error("{device}: {what}: {source}")]
    Os {
        device: String,
        what: String,
        source: std::io::Error,
    },
    #[error("{device}: VFIO cannot pin DMA_MAP [{iova:#x}, +{size:#x}) ({pinned:#x} bytes are pinned already): RLIMIT_MEMLOCK is too low. VFIO pins all of the guest's RAM: start airlock with --memlock of at least the guest RAM size (e.g. --memlock 4294967296 for -m 4G), or without --memlock (unlimited with --vfio)")]
    MemlockTooLow {
        device: String,
        iova: u64,
        size: u64,
        pinned: u64,
    },
    #[error("{device}: DMA_MAP [{iova:#x}, +{size:#x}) has no file descriptor: VFIO can only map shared memory; back guest RAM with -object memory-backend-memfd,share=on and -machine memory-backend=...")]
    NeedsSharedMemory {
        device: String,
        iova: u64,
        size: u64,
    },
}

impl DeviceError {
    pub fn errno(&self) -> i32 {
        match self {
            DeviceError::Access { .. } => libc::EINVAL,
            DeviceError::Irq(e, _) => e.errno(),
            DeviceError::NoReset(_) => libc::ENOTTY,
            DeviceError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            DeviceError::NeedsSharedMemory { .. } => libc::EINVAL,
            DeviceError::MemlockTooLow { .. } => libc::ENOMEM,
        }
    }
}

/// What GET_REGION_INFO reports for one region.
pub struct RegionDesc<'a> {
    pub flags: u32,
    pub size: u64,
    /// mmap offset into `fd`.
    pub offset: u64,
    pub caps: Vec<RegionCap>,
    pub fd: Option<BorrowedFd<'a>>,
}

impl RegionDesc<'_> {
    /// A region reached by message only: no mmap, no capabilities.
    pub fn by_message(flags: u32, size: u64) -> RegionDesc<'static> {
        RegionDesc {
            flags,
            size,
            offset: 0,
            caps: Vec::new(),
            fd: None,
        }
    }
}

/// A DMA the device wants done. The server carries it out, directly
/// through the DMA space or with DMA_READ/DMA_WRITE messages, and hands the
/// outcome back with [`Device::complete_dma`]; so a device never blocks the
/// connection while the client serves a DMA message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmaJob {
    /// Read `len` bytes of client memory at `iova` into the device.
    Read { iova: u64, len: usize },
    /// Write `data` into client memory at `iova`.
    Write { iova: u64, data: Vec<u8> },
}

pub trait Device: Send {
    /// Names the device in logs and errors (e.g. "edu", "vfio 0000:00:04.0").
    fn name(&self) -> &str;
    /// DEVICE_GET_INFO flags (PCI, RESET).
    fn flags(&self) -> u32;
    fn num_regions(&self) -> u32;
    /// None for an index past num_regions.
    fn region(&self, index: u32) -> Option<RegionDesc<'_>>;
    /// (flags, size) of a region, for the per-access bounds check; devices
    /// whose `region` allocates (capability lists) answer it directly.
    fn region_limits(&self, index: u32) -> Option<(u32, u64)> {
        self.region(index).map(|d| (d.flags, d.size))
    }
    fn num_irqs(&self) -> u32;
    /// (flags, count) of an IRQ index.
    fn irq_info(&self, index: u32) -> Option<(u32, u32)>;
    fn set_irqs(&mut self, set: IrqSet) -> Result<(), DeviceError>;
    /// Region access; the server checked index, bounds and size limits.
    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;
    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    fn reset(&mut self) -> Result<(), DeviceError>;
    /// The client left: stop DMA and interrupts, forget its eventfds.
    fn quiesce(&mut self);
    /// The client made [iova, iova + size) reachable; `host` is where
    /// airlock mapped it and `file` the memory behind it (both None when
    /// it came without an fd). A passthrough device maps it into the IOMMU
    /// here, or takes over the same mapping a killed server left.
    fn dma_mapped(
        &mut self,
        _iova: u64,
        _size: u64,
        _host: Option<u64>,
        _flags: u32,
        _file: Option<crate::dma::FileId>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The client sent its first command other than VERSION, DMA_MAP and
    /// DMA_UNMAP (or left): a replaying client has re-mapped everything it
    /// had, so what a killed server left and nobody re-mapped goes.
    fn adoption_ended(&mut self) {}
    /// Whether `dma_mapped` needs a host address for fd-backed maps (a
    /// passthrough device pins it into the IOMMU); otherwise airlock never
    /// mmaps client memory and reaches it with pread/pwrite.
    fn needs_host_addresses(&self) -> bool {
        false
    }
    /// The client takes [iova, iova + size) back; called before airlock
    /// unmaps its own mapping, so the device can no longer reach it.
    fn dma_unmapped(&mut self, _iova: u64, _size: u64) {}
    /// Several ranges leave together (DMA_UNMAP_MULTI, DMA_UNMAP with
    /// FLAG_ALL): as `dma_unmapped` for each, but a device may take
    /// adjacent ones out in one step. All of them are gone on return.
    fn dma_unmapped_many(&mut self, ranges: &[(u64, u64)]) {
        for &(iova, size) in ranges {
            self.dma_unmapped(iova, size);
        }
    }
    /// What the device did with the client's DMA maps since the last call,
    /// for the session's closing line (None: nothing to say).
    fn dma_summary(&mut self) -> Option<String> {
        None
    }
    /// IOVA windows the host keeps for itself (e.g. the MSI doorbell).
    fn iova_windows(&self) -> Vec<crate::iova::DoorbellWindow> {
        Vec::new()
    }
    /// The host IOMMU's usable IOVA ranges (None: the whole space).
    fn usable_iova(&self) -> Option<Vec<crate::iova::IovaRange>> {
        None
    }
    /// The host took the device back (VFIO's device request): serve no
    /// further client.
    fn withdrawn(&self) -> bool {
        false
    }
    /// A warning to log at every client connect (e.g. unsafe interrupts).
    fn connect_warning(&self) -> Option<String> {
        None
    }
    /// The next DMA the device has queued, if any.
    fn take_dma(&mut self) -> Option<DmaJob> {
        None
    }
    /// The outcome of a job from `take_dma` (data for a Read).
    fn complete_dma(&mut self, _job: DmaJob, _result: Result<Vec<u8>, DmaError>) {}
}
