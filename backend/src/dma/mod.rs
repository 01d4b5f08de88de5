//! The DMA space: what the client mapped for the device, by IOVA.
//!
//! A map that came with an fd is reached through that fd with
//! pread/pwrite, never through a mapping: a client can shrink its file
//! after DMA_MAP, and a load or store past the end of a mapped file would
//! kill the server with SIGBUS, while pread/pwrite just come up short.
//! Only a device that needs a host address (VFIO pins it into the IOMMU)
//! gets the fd mmapped; airlock's CPU never touches that mapping (VFIO
//! pinned the pages, so shrinking the file cannot pull them away). Maps
//! without an fd are recorded so the server can reach them with
//! DMA_READ/DMA_WRITE messages. Removing a map takes it out of the table
//! (every access is looked up there), drops its reference to the file and
//! its user of the host mapping, before the unmap is acknowledged, so no
//! device access can reach memory after the client took it back. Maps sent
//! together in a DMA_MAP_MULTI share one file (the client sent its fd once);
//! it closes with the last of them.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use airlock_protocol::dma::{DmaMap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use thiserror::Error;

mod host;

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
    #[error("DMA at {iova:#x}: the client's memory file no longer covers it ({source}); did the client shrink it after DMA_MAP?")]
    Backing { iova: u64, source: std::io::Error },
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
            DmaError::Backing { .. } => libc::EFAULT,
            _ => libc::EINVAL,
        }
    }
}

/// Which memory a map came from: the file (st_dev, st_ino) and the offset
/// into it. Tells "the same guest memory" from other memory at the same
/// IOVA when a restarted server adopts an IOMMU mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
}

/// Kept small: a BTreeMap moves its values within a node on every insert
/// and removal, and a guest behind a vIOMMU maps and unmaps per I/O.
struct Mapping {
    size: u64,
    flags: u32,
    backing: Backing,
}

/// What a new map is for the device: airlock's mapping of it (None: not
/// mmapped) and the memory behind it (None: no fd).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    pub host: Option<u64>,
    pub file: Option<FileId>,
}

/// A map taken out of the table (`DmaSpace::take`) whose host mapping is
/// still there: the caller takes the range out of the device, then hands
/// this back to `DmaSpace::release`. Dropped instead, the mapping stays
/// until the session ends (it holds no pages, see dma/host.rs).
#[must_use = "release it once the device no longer reaches the range"]
pub struct Taken(Option<u64>);

enum Backing {
    /// The client sent no fd; reach it with DMA_READ/DMA_WRITE.
    Messages,
    /// Reached with pread/pwrite at `offset` + (address - map start).
    File { file: Arc<File>, offset: u64 },
    /// mmapped for a device that needs a host address (host.rs: the fd is
    /// closed, the mapping keeps the file): its address.
    Host(u64),
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
    /// mmap fd-backed maps (for a device that needs host addresses).
    host_mappings: bool,
    host: host::HostFiles,
}

impl DmaSpace {
    pub fn new(max_maps: usize, host_mappings: bool) -> Self {
        DmaSpace {
            maps: BTreeMap::new(),
            max_maps,
            host_mappings,
            host: host::HostFiles::default(),
        }
    }

    /// A map into `file` (None: no fd, reached with DMA_READ/DMA_WRITE).
    /// Several maps may name one file: DMA_MAP_MULTI sends its fd once.
    pub fn map_file(&mut self, m: &DmaMap, file: Option<&ClientFile>) -> Result<Placed, DmaError> {
        let (iova, size) = (m.iova, m.size);
        if size == 0 {
            return Err(DmaError::Empty { iova, size });
        }
        if iova % PAGE_SIZE != 0
            || size % PAGE_SIZE != 0
            || (file.is_some() && !m.offset.is_multiple_of(PAGE_SIZE))
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
        let mut placed = Placed::default();
        let backing = match file {
            None => Backing::Messages,
            Some(f) => {
                // The offset + size sum was overflow-checked when decoding.
                if f.len < m.offset + m.size {
                    return Err(DmaError::backing(m));
                }
                let file_id = f.id(m.offset);
                placed.file = Some(file_id);
                if self.host_mappings {
                    let host = self
                        .host
                        .acquire(&f.file, &file_id, f.len, m.size, prot(m.flags))
                        .map_err(|source| DmaError::Mmap { iova, size, source })?;
                    placed.host = Some(host);
                    Backing::Host(host)
                } else {
                    Backing::File {
                        file: Arc::clone(&f.file),
                        offset: m.offset,
                    }
                }
            }
        };
        self.maps.insert(
            iova,
            Mapping {
                size,
                flags: m.flags,
                backing,
            },
        );
        Ok(placed)
    }

    /// Takes the map that matches [iova, iova + size) exactly out of the
    /// table: no access is looked up there any more, and a file it reached
    /// with pread/pwrite closes with it. Its host mapping stays until
    /// `release`.
    pub fn take(&mut self, iova: u64, size: u64) -> Result<Taken, DmaError> {
        match self.maps.entry(iova) {
            Entry::Occupied(e) if e.get().size == size => Ok(Taken(match e.remove().backing {
                Backing::Host(h) => Some(h),
                _ => None,
            })),
            _ => Err(DmaError::NoSuchMap { iova, size }),
        }
    }

    /// The host mapping of a map `take` took loses a user.
    pub fn release(&mut self, taken: Taken) {
        if let Some(h) = taken.0 {
            self.host.release(h);
        }
    }

    /// `take` and `release` at once: for a map no device has reached.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<(), DmaError> {
        let taken = self.take(iova, size)?;
        self.release(taken);
        Ok(())
    }

    /// Removes every map; no host mapping is kept.
    pub fn clear(&mut self) {
        self.maps.clear();
        self.host = host::HostFiles::default();
    }

    /// Every map as (iova, size).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.maps.iter().map(|(&iova, m)| (iova, m.size)).collect()
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
            out.push(if matches!(m.backing, Backing::File { .. }) {
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

    /// The file and file offset behind a Direct segment at `iova`.
    fn file_at(&self, iova: u64, len: usize) -> Result<(&File, u64), DmaError> {
        let unmapped = DmaError::Unmapped {
            iova,
            len: len as u64,
        };
        let (&base, m) = self.maps.range(..=iova).next_back().ok_or(unmapped)?;
        match &m.backing {
            Backing::File { file, offset } => Ok((file, offset + (iova - base))),
            _ => Err(DmaError::Unmapped {
                iova,
                len: len as u64,
            }),
        }
    }

    /// Reads a Direct segment (as returned by `segments`). A file the
    /// client shrank under the map reads short: an error, not a fault.
    pub fn read_direct(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let (file, at) = self.file_at(iova, buf.len())?;
        file.read_exact_at(buf, at)
            .map_err(|source| DmaError::Backing { iova, source })
    }

    /// Writes a Direct segment (as returned by `segments`).
    pub fn write_direct(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let (file, at) = self.file_at(iova, data.len())?;
        // A write past a shrunken end would grow the file (or fail on a
        // sealed memfd): refuse it the same way a short read is refused.
        let end = at + data.len() as u64;
        let len = file
            .metadata()
            .map_err(|source| DmaError::Backing { iova, source })?
            .len();
        if end > len {
            return Err(DmaError::Backing {
                iova,
                source: std::io::Error::from_raw_os_error(libc::EFAULT),
            });
        }
        file.write_all_at(data, at)
            .map_err(|source| DmaError::Backing { iova, source })
    }
}

/// A client's fd for DMA maps, checked once: a regular file (a later
/// shrink is survived, see the module doc), with its identity and length
/// as fstat found them.
pub struct ClientFile {
    /// Shared by every pread/pwrite-reached map into it.
    file: Arc<File>,
    dev: u64,
    ino: u64,
    len: u64,
}

impl ClientFile {
    pub fn open(fd: OwnedFd) -> std::io::Result<ClientFile> {
        use std::os::unix::fs::MetadataExt;
        let file = File::from(fd);
        let meta = file.metadata()?;
        if !meta.file_type().is_file() {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(ClientFile {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            file: Arc::new(file),
        })
    }

    fn id(&self, offset: u64) -> FileId {
        FileId {
            dev: self.dev,
            ino: self.ino,
            offset,
        }
    }
}

impl DmaError {
    /// The map's fd is no regular file, or too short for it.
    pub fn backing(m: &DmaMap) -> DmaError {
        DmaError::BadBacking {
            iova: m.iova,
            size: m.size,
            offset: m.offset,
        }
    }
}

/// The mmap protection a map's flags ask for.
fn prot(flags: u32) -> i32 {
    let mut prot = 0;
    if flags & DMA_MAP_FLAG_READ != 0 {
        prot |= libc::PROT_READ;
    }
    if flags & DMA_MAP_FLAG_WRITE != 0 {
        prot |= libc::PROT_WRITE;
    }
    prot
}

#[cfg(test)]
mod tests;
