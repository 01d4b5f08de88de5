//! The kernel's side of a VFIO device: the fds airlock owns, what VFIO
//! reports about the regions and interrupt indexes, and positional I/O on
//! the device fd. No PCI semantics beyond finding the MSI-X capability.

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

use airlock_protocol::device::{RegionCap, RegionInfo, SparseArea, PCI_CONFIG_REGION_INDEX};

use super::ioctl;
use super::sparse::Hole;

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
pub(super) struct Region {
    pub info: RegionInfo,
    /// Pages the client may mmap (empty: none).
    pub areas: Vec<SparseArea>,
}

impl Region {
    /// The kernel's sparse-mmap areas, or the whole region if it has none.
    pub fn kernel_areas(&self) -> Vec<SparseArea> {
        self.info
            .caps
            .iter()
            .find_map(|c| match c {
                RegionCap::SparseMmap(a) => Some(a.clone()),
                _ => None,
            })
            .unwrap_or_else(|| {
                vec![SparseArea {
                    offset: 0,
                    size: self.info.size,
                }]
            })
    }
}

/// An attached VFIO device as the kernel describes it.
pub(super) struct KernelDevice {
    pub fds: VfioFds,
    /// VFIO_DEVICE_GET_INFO flags.
    pub flags: u32,
    pub regions: Vec<Region>,
    /// (flags, count) per interrupt index.
    pub irqs: Vec<(u32, u32)>,
}

impl KernelDevice {
    /// Asks VFIO for the device's regions and interrupt indexes.
    pub fn query(fds: VfioFds) -> io::Result<KernelDevice> {
        let fd = fds.device.as_fd();
        let (flags, num_regions, num_irqs) = ioctl::device_info(fd)?;
        // Absent regions (no VGA, no ROM) answer EINVAL: they are empty.
        let regions = (0..num_regions.min(100))
            .map(|i| Region {
                info: ioctl::region_info(fd, i).unwrap_or(RegionInfo {
                    index: i,
                    ..Default::default()
                }),
                areas: Vec::new(),
            })
            .collect();
        let irqs = (0..num_irqs.min(50))
            .map(|i| ioctl::irq_info(fd, i).unwrap_or((0, 0)))
            .collect();
        Ok(KernelDevice {
            fds,
            flags,
            regions,
            irqs,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fds.device.as_fd()
    }

    pub fn container(&self) -> BorrowedFd<'_> {
        self.fds.container.as_fd()
    }

    /// The device fd viewed as a File for positional I/O.
    fn file(&self) -> ManuallyDrop<File> {
        // SAFETY: the fd stays open while self lives, and ManuallyDrop
        // keeps this view from closing the fd `fds` owns.
        ManuallyDrop::new(unsafe { File::from_raw_fd(self.fds.device.as_raw_fd()) })
    }

    /// Where region `index` starts in the device fd.
    pub fn region_base(&self, index: u32) -> u64 {
        self.regions
            .get(index as usize)
            .map_or(0, |r| r.info.offset)
    }

    pub fn read(&self, region: u32, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file()
            .read_exact_at(out, self.region_base(region) + offset)
    }

    pub fn write(&self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file()
            .write_all_at(data, self.region_base(region) + offset)
    }

    pub fn config_read(&self, offset: usize, out: &mut [u8]) -> io::Result<()> {
        self.read(PCI_CONFIG_REGION_INDEX, offset as u64, out)
    }

    pub fn config_write(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.write(PCI_CONFIG_REGION_INDEX, offset as u64, data)
    }

    /// The MSI-X table and PBA as (BAR, byte range), from the capability.
    pub fn msix_holes(&self) -> io::Result<Vec<(usize, Hole)>> {
        msix_holes(|at, out| self.config_read(at, out))
    }
}

/// The MSI-X table and PBA of the config space `read` reads, as (BAR, byte
/// range); none without an MSI-X capability.
pub(super) fn msix_holes(
    read: impl Fn(usize, &mut [u8]) -> io::Result<()>,
) -> io::Result<Vec<(usize, Hole)>> {
    let mut b = [0u8; 1];
    read(0x34, &mut b)?;
    let mut at = b[0] as usize & !3;
    // A bounded walk: a looping capability list must not hang airlock.
    for _ in 0..48 {
        if at < 0x40 {
            break;
        }
        let mut h = [0u8; 12];
        read(at, &mut h)?;
        if h[0] == crate::device::pci::CAP_ID_MSIX {
            let n = (u16::from_le_bytes([h[2], h[3]]) & 0x7ff) as u64 + 1;
            let table = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            let pba = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
            let hole = |bir: u32, len: u64| {
                let start = (bir & !7) as u64;
                let end = start + len;
                ((bir & 7) as usize, Hole { start, end })
            };
            return Ok(vec![hole(table, n * 16), hole(pba, n.div_ceil(64) * 8)]);
        }
        at = h[1] as usize & !3;
    }
    Ok(Vec::new())
}
