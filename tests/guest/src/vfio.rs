//! Thin layer over the Linux VFIO ioctls (type1 container, group, device),
//! with the few uapi structs this program needs written out by hand.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

// ioctl numbers from <linux/vfio.h>: _IO(VFIO_TYPE = ';', VFIO_BASE + n).
const fn vfio_io(n: u64) -> u64 {
    ((b';' as u64) << 8) | (100 + n)
}
const VFIO_GET_API_VERSION: u64 = vfio_io(0);
const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
const VFIO_SET_IOMMU: u64 = vfio_io(2);
const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const VFIO_DEVICE_GET_IRQ_INFO: u64 = vfio_io(9);
const VFIO_DEVICE_SET_IRQS: u64 = vfio_io(10);
const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: u64 = vfio_io(14);

const VFIO_API_VERSION: i32 = 0;
pub const VFIO_TYPE1_IOMMU: u32 = 1;
pub const VFIO_TYPE1V2_IOMMU: u32 = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;

pub const REGION_FLAG_READ: u32 = 1;
pub const REGION_FLAG_WRITE: u32 = 2;
pub const REGION_FLAG_MMAP: u32 = 4;

pub const PCI_BAR0_REGION_INDEX: u32 = 0;
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const PCI_INTX_IRQ_INDEX: u32 = 0;
pub const PCI_MSI_IRQ_INDEX: u32 = 1;
pub const PCI_MSIX_IRQ_INDEX: u32 = 2;

pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

const DMA_MAP_FLAG_READ: u32 = 1;
const DMA_MAP_FLAG_WRITE: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Default)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
#[derive(Default)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn open_rw(path: &str) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {path}: {e}"))
}

/// ioctl whose third argument is a plain integer.
fn ioctl_val(fd: RawFd, req: u64, arg: libc::c_ulong) -> libc::c_int {
    // SAFETY: every caller passes a VFIO request that takes an integer argument
    // (or none), so the kernel does not dereference `arg`.
    unsafe { libc::ioctl(fd, req as _, arg) }
}

/// ioctl whose third argument points at `*arg` (read and/or written by the kernel).
fn ioctl_ptr<T>(fd: RawFd, req: u64, arg: *mut T) -> libc::c_int {
    // SAFETY: every caller passes a pointer to a live, properly sized #[repr(C)]
    // value (or buffer) whose argsz matches its size; the kernel accesses at most
    // argsz bytes of it during the call only.
    unsafe { libc::ioctl(fd, req as _, arg) }
}

pub struct Container {
    file: File,
    pub iommu_type: u32,
}

pub struct Group {
    file: File,
}

pub struct Device {
    file: File,
}

impl Container {
    pub fn open() -> Result<Container, String> {
        let file = open_rw("/dev/vfio/vfio")?;
        let v = ioctl_val(file.as_raw_fd(), VFIO_GET_API_VERSION, 0);
        if v != VFIO_API_VERSION {
            return Err(format!(
                "VFIO_GET_API_VERSION returned {v}, want {VFIO_API_VERSION}"
            ));
        }
        Ok(Container {
            file,
            iommu_type: 0,
        })
    }

    pub fn has_extension(&self, ext: u32) -> bool {
        ioctl_val(self.file.as_raw_fd(), VFIO_CHECK_EXTENSION, ext as _) > 0
    }

    /// VFIO_SET_IOMMU with type1v2, falling back to type1. Needs a group attached.
    pub fn set_iommu(&mut self) -> Result<u32, String> {
        let mut errs = Vec::new();
        for t in [VFIO_TYPE1V2_IOMMU, VFIO_TYPE1_IOMMU] {
            if !self.has_extension(t) {
                errs.push(format!("type {t} unsupported"));
                continue;
            }
            if ioctl_val(self.file.as_raw_fd(), VFIO_SET_IOMMU, t as _) == 0 {
                self.iommu_type = t;
                return Ok(t);
            }
            errs.push(os_err(&format!("VFIO_SET_IOMMU type {t}")));
        }
        Err(errs.join("; "))
    }

    pub fn map_dma(&self, vaddr: u64, iova: u64, size: u64) -> Result<(), String> {
        let mut m = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size,
        };
        if ioctl_ptr(self.file.as_raw_fd(), VFIO_IOMMU_MAP_DMA, &mut m) != 0 {
            return Err(os_err(&format!(
                "VFIO_IOMMU_MAP_DMA iova {iova:#x} size {size:#x}"
            )));
        }
        Ok(())
    }

    /// Returns the number of bytes the kernel reports as unmapped.
    pub fn unmap_dma(&self, iova: u64, size: u64) -> Result<u64, String> {
        let mut u = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size,
        };
        if ioctl_ptr(self.file.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA, &mut u) != 0 {
            return Err(os_err(&format!("VFIO_IOMMU_UNMAP_DMA iova {iova:#x}")));
        }
        Ok(u.size)
    }
}

impl Group {
    pub fn open(group: u32) -> Result<Group, String> {
        let file = open_rw(&format!("/dev/vfio/{group}"))?;
        let mut st = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        if ioctl_ptr(file.as_raw_fd(), VFIO_GROUP_GET_STATUS, &mut st) != 0 {
            return Err(os_err("VFIO_GROUP_GET_STATUS"));
        }
        if st.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(format!(
                "group {group} not viable (flags {:#x}): another device in it is not bound to vfio",
                st.flags
            ));
        }
        Ok(Group { file })
    }

    pub fn set_container(&self, c: &Container) -> Result<(), String> {
        let mut fd: libc::c_int = c.file.as_raw_fd();
        if ioctl_ptr(self.file.as_raw_fd(), VFIO_GROUP_SET_CONTAINER, &mut fd) != 0 {
            return Err(os_err("VFIO_GROUP_SET_CONTAINER"));
        }
        Ok(())
    }

    pub fn device(&self, bdf: &str) -> Result<Device, String> {
        let name = CString::new(bdf).map_err(|_| "BDF contains NUL".to_string())?;
        let fd = ioctl_ptr(
            self.file.as_raw_fd(),
            VFIO_GROUP_GET_DEVICE_FD,
            name.as_ptr() as *mut libc::c_char,
        );
        if fd < 0 {
            return Err(os_err(&format!("VFIO_GROUP_GET_DEVICE_FD {bdf}")));
        }
        // SAFETY: the ioctl just returned `fd` as a new descriptor that nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Device { file })
    }
}

impl Device {
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn region_info(&self, index: u32) -> Result<RegionInfo, String> {
        let mut ri = RegionInfo {
            argsz: std::mem::size_of::<RegionInfo>() as u32,
            index,
            ..Default::default()
        };
        if ioctl_ptr(self.fd(), VFIO_DEVICE_GET_REGION_INFO, &mut ri) != 0 {
            return Err(os_err(&format!("VFIO_DEVICE_GET_REGION_INFO {index}")));
        }
        Ok(ri)
    }

    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, String> {
        let mut ii = IrqInfo {
            argsz: std::mem::size_of::<IrqInfo>() as u32,
            index,
            ..Default::default()
        };
        if ioctl_ptr(self.fd(), VFIO_DEVICE_GET_IRQ_INFO, &mut ii) != 0 {
            return Err(os_err(&format!("VFIO_DEVICE_GET_IRQ_INFO {index}")));
        }
        Ok(ii)
    }

    /// VFIO_DEVICE_SET_IRQS with a u32 header (argsz, flags, index, start, count)
    /// followed by `data` (eventfds, or nothing for DATA_NONE).
    fn set_irqs(
        &self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[i32],
    ) -> Result<(), String> {
        let mut buf: Vec<u32> = vec![0, flags, index, start, count];
        buf.extend(data.iter().map(|&fd| fd as u32));
        buf[0] = (buf.len() * 4) as u32;
        if ioctl_ptr(self.fd(), VFIO_DEVICE_SET_IRQS, buf.as_mut_ptr()) != 0 {
            return Err(os_err(&format!(
                "VFIO_DEVICE_SET_IRQS index {index} flags {flags:#x} start {start} count {count}"
            )));
        }
        Ok(())
    }

    /// Routes vectors start.. of `index` to the given eventfds.
    pub fn irq_eventfds(&self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), String> {
        let flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        self.set_irqs(flags, index, start, fds.len() as u32, fds)
    }

    /// Disables all interrupts of `index` (TRIGGER, DATA_NONE, count 0).
    pub fn irq_disable(&self, index: u32) -> Result<(), String> {
        self.set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, index, 0, 0, &[])
    }

    pub fn irq_unmask(&self, index: u32) -> Result<(), String> {
        self.set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, index, 0, 1, &[])
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| format!("pread {} bytes at {offset:#x}: {e}", buf.len()))
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), String> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| format!("pwrite {} bytes at {offset:#x}: {e}", buf.len()))
    }
}
