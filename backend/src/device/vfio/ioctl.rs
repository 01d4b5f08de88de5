//! The VFIO ioctls airlock issues (linux/vfio.h): opening the container,
//! group and device (legacy container + type1v2), per-vector SET_IRQS with
//! holes, masks and bools, capability chains, DMA maps; errors as values.
//! airlock owns the three fds itself (plain OwnedFds), so a live upgrade
//! can hand them across execve and the successor can use them as they are.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use airlock_protocol::device::RegionInfo;

const VFIO_TYPE: u64 = b';' as u64;
const VFIO_BASE: u64 = 100;
const fn vfio_io(nr: u64) -> u64 {
    (VFIO_TYPE << 8) | (VFIO_BASE + nr)
}
pub const VFIO_GET_API_VERSION: u64 = vfio_io(0);
pub const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
pub const VFIO_SET_IOMMU: u64 = vfio_io(2);
pub const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
pub const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
pub const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
pub const VFIO_DEVICE_GET_INFO: u64 = vfio_io(7);
pub const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
pub const VFIO_DEVICE_GET_IRQ_INFO: u64 = vfio_io(9);
pub const VFIO_DEVICE_SET_IRQS: u64 = vfio_io(10);
pub const VFIO_DEVICE_RESET: u64 = vfio_io(11);
pub const VFIO_IOMMU_GET_INFO: u64 = vfio_io(12);

/// Issues an ioctl whose argument is a buffer starting with argsz.
///
/// # Safety
/// `request` must be a VFIO ioctl whose argument layout fits in `buf`
/// (the kernel never writes past argsz, which is buf.len()).
unsafe fn ioctl_buf(fd: BorrowedFd<'_>, request: u64, buf: &mut [u8]) -> io::Result<()> {
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: per the caller's contract, `buf` is large enough for the
    // request's structure and argsz tells the kernel its size.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;

/// An ioctl whose argument is an integer (or none); returns its result.
fn ioctl_int(fd: BorrowedFd<'_>, request: u64, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: the requests used with this take an integer argument (or
    // ignore it); no memory is passed.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

fn open_rw(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: path is NUL-terminated; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// /dev/vfio/vfio, checked for the API version and type1v2.
pub fn open_container() -> io::Result<OwnedFd> {
    let c = open_rw(c"/dev/vfio/vfio")?;
    let v = ioctl_int(c.as_fd(), VFIO_GET_API_VERSION, 0)?;
    if v != VFIO_API_VERSION {
        return Err(io::Error::other(format!(
            "VFIO API version {v}, airlock speaks {VFIO_API_VERSION}"
        )));
    }
    if ioctl_int(c.as_fd(), VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU)? != 1 {
        return Err(io::Error::other(
            "the kernel's VFIO has no type1v2 IOMMU (load vfio_iommu_type1)",
        ));
    }
    Ok(c)
}

/// /dev/vfio/<group>, checked viable (every device of the group bound to
/// vfio-pci or unbound).
pub fn open_group(group: &str) -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/dev/vfio/{group}"))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let g = open_rw(&path)?;
    let mut b = [0u8; 8];
    // SAFETY: struct vfio_group_status is 8 bytes (argsz, flags).
    unsafe { ioctl_buf(g.as_fd(), VFIO_GROUP_GET_STATUS, &mut b)? };
    if u32_at(&b, 4) & VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(io::Error::other("the group is not viable"));
    }
    Ok(g)
}

/// Attaches the group to the container and, as the first group, selects
/// the type1v2 IOMMU; the kernel checks MSI isolation here.
pub fn attach_group(container: BorrowedFd<'_>, group: BorrowedFd<'_>) -> io::Result<()> {
    let fd: i32 = container.as_raw_fd();
    // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd).
    let r = unsafe {
        libc::ioctl(
            group.as_raw_fd(),
            VFIO_GROUP_SET_CONTAINER as _,
            &fd as *const i32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    ioctl_int(container, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU).map(|_| ())
}

/// The device fd for `bdf` from its (attached) group.
pub fn group_device(group: BorrowedFd<'_>, bdf: &str) -> io::Result<OwnedFd> {
    let name =
        std::ffi::CString::new(bdf).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated name; the
    // result (a new fd, O_CLOEXEC) is checked.
    let fd = unsafe {
        libc::ioctl(
            group.as_raw_fd(),
            VFIO_GROUP_GET_DEVICE_FD as _,
            name.as_ptr(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// (flags, num_regions, num_irqs) from VFIO_DEVICE_GET_INFO.
pub fn device_info(fd: BorrowedFd<'_>) -> io::Result<(u32, u32, u32)> {
    let mut b = [0u8; 16];
    // SAFETY: struct vfio_device_info is 16 bytes (argsz, flags, regions, irqs).
    unsafe { ioctl_buf(fd, VFIO_DEVICE_GET_INFO, &mut b)? };
    Ok((u32_at(&b, 4), u32_at(&b, 8), u32_at(&b, 12)))
}

/// VFIO_DEVICE_GET_REGION_INFO with its capability chain (the kernel's
/// struct has the vfio-user layout, so the protocol decoder reads it).
pub fn region_info(fd: BorrowedFd<'_>, index: u32) -> io::Result<RegionInfo> {
    let mut size = RegionInfo::SIZE;
    for _ in 0..3 {
        let mut b = vec![0u8; size];
        b[8..12].copy_from_slice(&index.to_ne_bytes());
        // SAFETY: the buffer is at least struct vfio_region_info (32 bytes)
        // and argsz says how much more the kernel may fill.
        unsafe { ioctl_buf(fd, VFIO_DEVICE_GET_REGION_INFO, &mut b)? };
        let need = u32_at(&b, 0) as usize;
        if need > size {
            size = need;
            continue;
        }
        return RegionInfo::decode_reply(&b)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "region info keeps growing",
    ))
}

/// (flags, count) from VFIO_DEVICE_GET_IRQ_INFO.
pub fn irq_info(fd: BorrowedFd<'_>, index: u32) -> io::Result<(u32, u32)> {
    let mut b = [0u8; 16];
    b[8..12].copy_from_slice(&index.to_ne_bytes());
    // SAFETY: struct vfio_irq_info is 16 bytes (argsz, flags, index, count).
    unsafe { ioctl_buf(fd, VFIO_DEVICE_GET_IRQ_INFO, &mut b)? };
    Ok((u32_at(&b, 4), u32_at(&b, 12)))
}

/// VFIO_DEVICE_SET_IRQS with raw flags and data (bools or eventfds as i32,
/// -1 de-assigning a vector).
pub fn set_irqs(
    fd: BorrowedFd<'_>,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = vec![0u8; 20 + data.len()];
    b[4..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&index.to_ne_bytes());
    b[12..16].copy_from_slice(&start.to_ne_bytes());
    b[16..20].copy_from_slice(&count.to_ne_bytes());
    b[20..].copy_from_slice(data);
    // SAFETY: struct vfio_irq_set is 20 bytes followed by `data`, and argsz
    // covers exactly that.
    unsafe { ioctl_buf(fd, VFIO_DEVICE_SET_IRQS, &mut b) }
}

pub fn reset(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), VFIO_DEVICE_RESET as _) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(13);
pub const VFIO_IOMMU_UNMAP_DMA: u64 = vfio_io(14);
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;

/// struct vfio_iommu_type1_dma_map (linux/vfio.h).
#[repr(C)]
struct DmaMapArg {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

/// struct vfio_iommu_type1_dma_unmap, without the dirty-bitmap tail (no
/// bitmap flag is ever set).
#[repr(C)]
struct DmaUnmapArg {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

const _: () = assert!(std::mem::size_of::<DmaMapArg>() == 32);
const _: () = assert!(std::mem::size_of::<DmaUnmapArg>() == 24);

/// Issues an ioctl whose argument is one `T` (argsz filled in by the caller).
///
/// # Safety
/// `request` must be a VFIO ioctl whose argument structure is `T`, a
/// repr(C) struct laid out as the kernel's.
unsafe fn ioctl_arg<T>(fd: BorrowedFd<'_>, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: per the caller's contract the kernel reads and writes exactly
    // a `T`, which `arg` is, for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// VFIO_IOMMU_MAP_DMA on the container: [iova, iova+size) -> our `vaddr`,
/// readable and/or writable by the device as `flags` say; the kernel pins
/// the pages.
///
/// # Safety
/// [vaddr, vaddr + size) must be memory of this process that stays mapped
/// (and is not reused for anything else) until the range is taken out of
/// the IOMMU with [`iommu_unmap`] or the container is closed: until then the
/// device may DMA into it at any time.
pub unsafe fn iommu_map(
    container: BorrowedFd<'_>,
    vaddr: u64,
    iova: u64,
    size: u64,
    flags: u32,
) -> io::Result<()> {
    let mut arg = DmaMapArg {
        argsz: std::mem::size_of::<DmaMapArg>() as u32,
        flags,
        vaddr,
        iova,
        size,
    };
    // SAFETY: VFIO_IOMMU_MAP_DMA takes a vfio_iommu_type1_dma_map, which
    // DmaMapArg is; the memory contract is the caller's.
    unsafe { ioctl_arg(container, VFIO_IOMMU_MAP_DMA, &mut arg) }
}

/// VFIO_IOMMU_UNMAP_DMA on the container; returns once the IOMMU no longer
/// translates the range (the kernel unpins the pages), with the number of
/// bytes the kernel unmapped.
pub fn iommu_unmap(container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<u64> {
    let mut arg = DmaUnmapArg {
        argsz: std::mem::size_of::<DmaUnmapArg>() as u32,
        flags: 0,
        iova,
        size,
    };
    // SAFETY: VFIO_IOMMU_UNMAP_DMA takes a vfio_iommu_type1_dma_unmap, which
    // DmaUnmapArg is when no bitmap flag is set.
    unsafe { ioctl_arg(container, VFIO_IOMMU_UNMAP_DMA, &mut arg)? };
    Ok(arg.size)
}

const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;

/// The container's usable IOVA ranges (VFIO_IOMMU_GET_INFO's IOVA-range
/// capability), end inclusive; None if the kernel does not report them.
pub fn iommu_iova_ranges(
    container: BorrowedFd<'_>,
) -> io::Result<Option<Vec<crate::iova::IovaRange>>> {
    let mut size = 24usize;
    for _ in 0..3 {
        let mut b = vec![0u8; size];
        // SAFETY: struct vfio_iommu_type1_info is 24 bytes; argsz (= b.len())
        // bounds what the kernel writes after it.
        unsafe { ioctl_buf(container, VFIO_IOMMU_GET_INFO, &mut b)? };
        let need = u32_at(&b, 0) as usize;
        if need > size {
            size = need;
            continue;
        }
        if u32_at(&b, 4) & VFIO_IOMMU_INFO_CAPS == 0 {
            return Ok(None);
        }
        let mut at = u32_at(&b, 16) as usize;
        for _ in 0..16 {
            if at < 24 || at + 16 > b.len() {
                break;
            }
            let id = u16::from_ne_bytes([b[at], b[at + 1]]);
            let next = u32_at(&b, at + 4) as usize;
            if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
                let n = u32_at(&b, at + 8) as usize;
                let mut out = Vec::new();
                for i in 0..n {
                    let o = at + 16 + i * 16;
                    if o + 16 > b.len() {
                        break;
                    }
                    let u64_at =
                        |p: usize| u64::from_ne_bytes(b[p..p + 8].try_into().unwrap_or([0; 8]));
                    // A range the kernel gives backwards is no range.
                    out.extend(crate::iova::IovaRange::new(u64_at(o), u64_at(o + 8)));
                }
                return Ok(Some(out));
            }
            if next <= at {
                break;
            }
            at = next;
        }
        return Ok(None);
    }
    Ok(None)
}
