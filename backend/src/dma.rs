//! The DMA space: what the client mapped for the device, by IOVA.
//!
//! fd-backed maps are mmapped here (vm-memory) and reached directly; maps
//! without an fd are recorded so the server can reach them with
//! DMA_READ/DMA_WRITE messages. Removing a map munmaps it before the unmap
//! is acknowledged, so no device access can reach memory after the client
//! took it back.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use airlock_protocol::dma::{DmaMap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use thiserror::Error;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

/// Page size offered in VERSION (pgsizes); maps must be aligned to it.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, Error)]
pub enum DmaError {
    #[error("DMA map [{iova:#x}, +{size:#x}) is not aligned to the {PAGE_SIZE}-byte page size")]
    Unaligned { iova: u64, size: u64 },
    #[error("DMA map [{iova:#x}, +{size:#x}) is empty")]
    Empty { iova: u64, size: u64 },
    #[error(
        "DMA map [{iova:#x}, +{size:#x}) overlaps the existing map [{other:#x}, +{other_size:#x})"
    )]
    Overlap {
        iova: u64,
        size: u64,
        other: u64,
        other_size: u64,
    },
    #[error("DMA map limit of {0} maps reached")]
    TooMany(usize),
    #[error("DMA map [{iova:#x}, +{size:#x}): its fd is not a regular file or is shorter than offset {offset:#x} + size (back guest RAM with memory-backend-memfd,share=on)")]
    BadBacking { iova: u64, size: u64, offset: u64 },
    #[error("DMA map [{iova:#x}, +{size:#x}): mmap of the client's fd failed: {source}")]
    Mmap {
        iova: u64,
        size: u64,
        source: std::io::Error,
    },
    #[error("DMA unmap [{iova:#x}, +{size:#x}) matches no map exactly")]
    NoSuchMap { iova: u64, size: u64 },
    #[error("DMA to [{iova:#x}, +{len:#x}) hits an IOVA nobody mapped")]
    Unmapped { iova: u64, len: u64 },
    #[error("DMA {dir} at {iova:#x} is not permitted by the map's flags")]
    Permission { iova: u64, dir: &'static str },
    #[error("DMA at {iova:#x} failed in the client: errno {errno}")]
    Client { iova: u64, errno: i32 },
}

impl DmaError {
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::Overlap { .. } => libc::EEXIST,
            DmaError::TooMany(_) => libc::ENOSPC,
            DmaError::Mmap { source, .. } => source.raw_os_error().unwrap_or(libc::ENOMEM),
            DmaError::NoSuchMap { .. } => libc::ENOENT,
            DmaError::Unmapped { .. } => libc::EFAULT,
            DmaError::Permission { .. } => libc::EPERM,
            DmaError::Client { errno, .. } => *errno,
            _ => libc::EINVAL,
        }
    }
}

struct Mapping {
    size: u64,
    flags: u32,
    /// None: the client sent no fd; reach it with DMA_READ/DMA_WRITE.
    memory: Option<GuestRegionMmap>,
}

/// A contiguous piece of a DMA access that falls in one map.
#[derive(Debug, PartialEq, Eq)]
pub enum Segment {
    /// Reachable directly.
    Direct { iova: u64, len: usize },
    /// Must go over the socket.
    Message { iova: u64, len: usize },
}

pub struct DmaSpace {
    maps: BTreeMap<u64, Mapping>,
    max_maps: usize,
}

impl DmaSpace {
    pub fn new(max_maps: usize) -> Self {
        DmaSpace {
            maps: BTreeMap::new(),
            max_maps,
        }
    }

    pub fn map(&mut self, m: &DmaMap, fd: Option<OwnedFd>) -> Result<(), DmaError> {
        let (iova, size) = (m.iova, m.size);
        if size == 0 {
            return Err(DmaError::Empty { iova, size });
        }
        if iova % PAGE_SIZE != 0
            || size % PAGE_SIZE != 0
            || (fd.is_some() && m.offset % PAGE_SIZE != 0)
        {
            return Err(DmaError::Unaligned { iova, size });
        }
        // Decoding already rejected iova + size overflow.
        let end = iova + size;
        if let Some((&other, o)) = self.maps.range(..end).next_back() {
            if other + o.size > iova {
                return Err(DmaError::Overlap {
                    iova,
                    size,
                    other,
                    other_size: o.size,
                });
            }
        }
        if self.maps.len() >= self.max_maps {
            return Err(DmaError::TooMany(self.max_maps));
        }
        let memory = match fd {
            None => None,
            Some(fd) => Some(mmap_backing(m, fd)?),
        };
        self.maps.insert(
            iova,
            Mapping {
                size,
                flags: m.flags,
                memory,
            },
        );
        Ok(())
    }

    /// Removes the map that matches [iova, iova + size) exactly; dropping
    /// it munmaps the memory before this returns.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<(), DmaError> {
        match self.maps.get(&iova) {
            Some(m) if m.size == size => {
                self.maps.remove(&iova);
                Ok(())
            }
            _ => Err(DmaError::NoSuchMap { iova, size }),
        }
    }

    pub fn clear(&mut self) {
        self.maps.clear();
    }

    /// True when a map covers exactly [iova, iova + size).
    pub fn has_exact(&self, iova: u64, size: u64) -> bool {
        self.maps.get(&iova).is_some_and(|m| m.size == size)
    }

    /// Every map as (iova, size).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.maps.iter().map(|(&iova, m)| (iova, m.size)).collect()
    }

    /// Where airlock mapped the map starting at `iova` (None without an fd).
    pub fn host_address(&self, iova: u64) -> Option<u64> {
        let m = self.maps.get(&iova)?.memory.as_ref()?;
        Some(m.as_ptr() as u64)
    }

    /// Splits an access into per-map segments, checking every byte is
    /// mapped with the needed permission.
    pub fn segments(&self, iova: u64, len: usize, write: bool) -> Result<Vec<Segment>, DmaError> {
        let mut out = Vec::new();
        let mut at = iova;
        let end = iova.checked_add(len as u64).ok_or(DmaError::Unmapped {
            iova,
            len: len as u64,
        })?;
        while at < end {
            let (&base, m) = self
                .maps
                .range(..=at)
                .next_back()
                .filter(|(b, m)| *b + m.size > at)
                .ok_or(DmaError::Unmapped {
                    iova: at,
                    len: end - at,
                })?;
            let need = if write {
                DMA_MAP_FLAG_WRITE
            } else {
                DMA_MAP_FLAG_READ
            };
            if m.flags & need == 0 {
                return Err(DmaError::Permission {
                    iova: at,
                    dir: if write { "write" } else { "read" },
                });
            }
            let n = (base + m.size).min(end) - at;
            out.push(if m.memory.is_some() {
                Segment::Direct {
                    iova: at,
                    len: n as usize,
                }
            } else {
                Segment::Message {
                    iova: at,
                    len: n as usize,
                }
            });
            at += n;
        }
        Ok(out)
    }

    fn region(&self, iova: u64) -> Option<(&GuestRegionMmap, u64)> {
        let (&base, m) = self.maps.range(..=iova).next_back()?;
        Some((m.memory.as_ref()?, iova - base))
    }

    /// Reads a Direct segment (as returned by `segments`).
    pub fn read_direct(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let (r, off) = self.region(iova).ok_or(DmaError::Unmapped {
            iova,
            len: buf.len() as u64,
        })?;
        r.read_slice(buf, MemoryRegionAddress(off))
            .map_err(|_| DmaError::Unmapped {
                iova,
                len: buf.len() as u64,
            })
    }

    /// Writes a Direct segment (as returned by `segments`).
    pub fn write_direct(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let (r, off) = self.region(iova).ok_or(DmaError::Unmapped {
            iova,
            len: data.len() as u64,
        })?;
        r.write_slice(data, MemoryRegionAddress(off))
            .map_err(|_| DmaError::Unmapped {
                iova,
                len: data.len() as u64,
            })
    }
}

/// mmaps the client's fd for a map, refusing fds that could SIGBUS us.
fn mmap_backing(m: &DmaMap, fd: OwnedFd) -> Result<GuestRegionMmap, DmaError> {
    let bad = DmaError::BadBacking {
        iova: m.iova,
        size: m.size,
        offset: m.offset,
    };
    // SAFETY: fstat only writes into the stat buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a valid open descriptor owned by `fd`.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(bad);
    }
    // An access past the file's end would SIGBUS the server: refuse it up
    // front (the offset + size sum was overflow-checked when decoding).
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || (st.st_size as u64) < m.offset + m.size {
        return Err(bad);
    }
    let mut prot = 0;
    if m.flags & DMA_MAP_FLAG_READ != 0 {
        prot |= libc::PROT_READ;
    }
    if m.flags & DMA_MAP_FLAG_WRITE != 0 {
        prot |= libc::PROT_WRITE;
    }
    let size = usize::try_from(m.size).map_err(|_| DmaError::BadBacking {
        iova: m.iova,
        size: m.size,
        offset: m.offset,
    })?;
    let region = MmapRegion::build(
        Some(FileOffset::new(File::from(fd), m.offset)),
        size,
        prot,
        libc::MAP_SHARED,
    )
    .map_err(|e| DmaError::Mmap {
        iova: m.iova,
        size: m.size,
        source: std::io::Error::other(e.to_string()),
    })?;
    GuestRegionMmap::new(region, GuestAddress(m.iova)).map_err(|e| DmaError::Mmap {
        iova: m.iova,
        size: m.size,
        source: std::io::Error::other(e.to_string()),
    })
}
