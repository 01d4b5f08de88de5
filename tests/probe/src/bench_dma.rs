//! `--bench-dma GROUP`: what a DMA_MAP+DMA_UNMAP pair costs through
//! `airlock --vfio` against its floor, the same two VFIO ioctls issued
//! directly by one process on memory it has mapped already (what
//! in-process vfio-pci does). The floor runs on another device's VFIO group
//! (GROUP, bound to vfio-pci and otherwise unused), because airlock holds
//! its own device's group. Rounds interleave the two; the figures are
//! medians. Prints `BENCH dma-map-unmap airlock_us=A floor_us=F ratio=R`.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use airlock_protocol::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};

use crate::os::Memfd;
use crate::report::{info, Outcome, Report};
use crate::restart::connect;

const ROUNDS: usize = 21;
const PAIRS: usize = 50;
const SIZE: usize = 4096;
const IOVA: u64 = 0x10_0000;

// <linux/vfio.h>: _IO(';', 100 + n).
const VFIO_GET_API_VERSION: libc::c_ulong = 0x3b64;
const VFIO_SET_IOMMU: libc::c_ulong = 0x3b66;
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = 0x3b68;
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = 0x3b71;
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = 0x3b72;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;

pub fn run(report: &mut Report, socket: &str, group: &str) {
    let outcome = match bench(socket, group) {
        Ok((a, f)) => {
            println!(
                "BENCH dma-map-unmap airlock_us={a:.1} floor_us={f:.1} ratio={:.2} (4 KiB, {ROUNDS} rounds x {PAIRS} pairs, medians)",
                a / f
            );
            Outcome::Pass
        }
        Err(e) => Outcome::Fail(e),
    };
    report.record("bench-dma-map-unmap", outcome);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(socket: &str, group: &str) -> Result<(f64, f64), String> {
    let mem = Memfd::new(c"probe-bench-dma", SIZE)?;
    let mut dev = connect(socket)?;
    let floor = Floor::open(group)?;
    let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
    let vaddr = mem.map.as_ptr() as u64;
    let (mut a, mut f) = (Vec::new(), Vec::new());
    let (mut rtt, mut fresh) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        // Where the rest goes: two message round trips (a REGION_READ of
        // the config space each), and the floor with a fresh mmap and
        // munmap of the memory around each pair (what airlock does now).
        let t = Instant::now();
        for _ in 0..PAIRS {
            for _ in 0..2 {
                dev.client
                    .read32(airlock_protocol::device::PCI_CONFIG_REGION_INDEX, 0)
                    .map_err(|e| format!("REGION_READ: {e}"))?;
            }
        }
        rtt.push(t.elapsed().as_secs_f64() * 1e6 / PAIRS as f64);
        let t = Instant::now();
        for _ in 0..PAIRS {
            let m = crate::os::Mapping::new(mem.fd.as_fd(), 0, SIZE)?;
            floor.map(m.as_ptr() as u64, IOVA, SIZE as u64)?;
            floor.unmap(IOVA, SIZE as u64)?;
            drop(m);
        }
        fresh.push(t.elapsed().as_secs_f64() * 1e6 / PAIRS as f64);
        let t = Instant::now();
        for _ in 0..PAIRS {
            dev.client
                .dma_map(IOVA, SIZE as u64, 0, rw, Some(mem.fd.as_fd()))
                .map_err(|e| format!("DMA_MAP: {e}"))?;
            dev.client
                .dma_unmap(IOVA, SIZE as u64, 0)
                .map_err(|e| format!("DMA_UNMAP: {e}"))?;
        }
        a.push(t.elapsed().as_secs_f64() * 1e6 / PAIRS as f64);
        let t = Instant::now();
        for _ in 0..PAIRS {
            floor.map(vaddr, IOVA, SIZE as u64)?;
            floor.unmap(IOVA, SIZE as u64)?;
        }
        f.push(t.elapsed().as_secs_f64() * 1e6 / PAIRS as f64);
    }
    info(&format!(
        "bench-dma: per pair, medians: two REGION_READ round trips {:.1} us; the floor with an mmap+munmap around it {:.1} us",
        median(rtt),
        median(fresh)
    ));
    info(&format!(
        "bench-dma: per pair, airlock min {:.1} us, floor min {:.1} us",
        a.iter().cloned().fold(f64::MAX, f64::min),
        f.iter().cloned().fold(f64::MAX, f64::min)
    ));
    Ok((median(a), median(f)))
}

/// A type1v2 container with GROUP attached: the direct-ioctl floor.
struct Floor {
    container: OwnedFd,
    _group: OwnedFd,
}

fn open(path: &str) -> Result<OwnedFd, String> {
    let c = std::ffi::CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open {path}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, arg: libc::c_ulong, what: &str) -> Result<(), String> {
    // SAFETY: these VFIO ioctls take an integer or a pointer to a live,
    // correctly sized struct (the callers').
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Floor {
    fn open(group: &str) -> Result<Floor, String> {
        let container = open("/dev/vfio/vfio")?;
        ioctl(&container, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")?;
        let g = open(&format!("/dev/vfio/{group}"))?;
        let cfd = container.as_raw_fd();
        ioctl(
            &g,
            VFIO_GROUP_SET_CONTAINER,
            &cfd as *const i32 as libc::c_ulong,
            "VFIO_GROUP_SET_CONTAINER",
        )?;
        ioctl(
            &container,
            VFIO_SET_IOMMU,
            VFIO_TYPE1V2_IOMMU,
            "VFIO_SET_IOMMU",
        )?;
        Ok(Floor {
            container,
            _group: g,
        })
    }

    fn map(&self, vaddr: u64, iova: u64, size: u64) -> Result<(), String> {
        // struct vfio_iommu_type1_dma_map: argsz, flags, vaddr, iova, size.
        let mut b = [0u64; 4];
        b[0] = 32 | (3u64 << 32); // argsz 32, flags READ | WRITE
        b[1] = vaddr;
        b[2] = iova;
        b[3] = size;
        ioctl(
            &self.container,
            VFIO_IOMMU_MAP_DMA,
            b.as_mut_ptr() as libc::c_ulong,
            "VFIO_IOMMU_MAP_DMA",
        )
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), String> {
        // struct vfio_iommu_type1_dma_unmap: argsz, flags, iova, size.
        let mut b = [0u64; 3];
        b[0] = 24;
        b[1] = iova;
        b[2] = size;
        ioctl(
            &self.container,
            VFIO_IOMMU_UNMAP_DMA,
            b.as_mut_ptr() as libc::c_ulong,
            "VFIO_IOMMU_UNMAP_DMA",
        )
    }
}
