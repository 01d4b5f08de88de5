//! The DMA map commands: DMA_MAP and DMA_UNMAP, and airlock's batched
//! DMA_MAP_MULTI and DMA_UNMAP_MULTI (protocol dma_multi.rs), whose entries
//! are handled one by one exactly as the single commands. Every map is
//! judged against the IOVA windows, mapped by airlock, then handed to the
//! device; every unmap takes the range from the device before airlock's
//! mapping of it goes, and before the reply.

use std::os::fd::OwnedFd;

use airlock_protocol::dma::{DmaMap, DmaUnmap, DMA_UNMAP_FLAG_ALL, DMA_UNMAP_SIZE};
use airlock_protocol::dma_multi::{
    encode_multi_reply, DmaMapEntry, DmaUnmapEntry, DMA_MULTI_NO_FD,
};
use tracing::{debug, warn};

use super::{fail, Answer, Handled, Refusal, Session};
use crate::dma::{ClientFile, DmaError};
use crate::iova::IovaRange;

impl Session<'_> {
    /// DMA_MAP: one map, with or without an fd.
    pub(super) fn dma_map(&mut self, map: &DmaMap, fd: Option<OwnedFd>) -> Handled {
        self.stats.dma_maps += 1;
        let file = match fd {
            None => None,
            Some(fd) => Some(ClientFile::open(fd).map_err(|_| self.refuse_backing(map))?),
        };
        self.map_one(map, file.as_ref())?;
        Ok(Answer::empty())
    }

    /// DMA_UNMAP: one exact map, or all of them with FLAG_ALL.
    pub(super) fn dma_unmap(&mut self, u: DmaUnmap) -> Handled {
        self.stats.dma_unmaps += 1;
        if u.flags & DMA_UNMAP_FLAG_ALL != 0 {
            if u.iova != 0 || u.size != 0 {
                return Err((
                    libc::EINVAL,
                    "DMA_UNMAP with FLAG_ALL must have iova = size = 0".into(),
                ));
            }
            self.unmap_all();
        } else {
            self.unmap_one(u.iova, u.size)?;
        }
        let echo = DmaUnmap {
            argsz: DMA_UNMAP_SIZE as u32,
            ..u
        };
        Ok(Answer::fixed(&echo.encode_fixed()))
    }

    /// DMA_MAP_MULTI: each entry as its own DMA_MAP would be; the reply
    /// has every entry's errno, so a refused one leaves the others be.
    pub(super) fn dma_map_multi(&mut self, maps: &[DmaMapEntry], fds: Vec<OwnedFd>) -> Handled {
        self.need_dma_multiple("DMA_MAP_MULTI")?;
        self.stats.dma_maps += maps.len() as u64;
        self.stats.dma_batches += 1;
        self.stats.dma_batched += maps.len() as u64;
        // A file that is not a regular one fails the entries naming it.
        let files: Vec<Option<ClientFile>> = fds
            .into_iter()
            .map(|fd| ClientFile::open(fd).ok())
            .collect();
        let mut errnos = Vec::with_capacity(maps.len());
        for e in maps {
            let map = e.as_map();
            let done = if e.fd_index == DMA_MULTI_NO_FD {
                self.map_one(&map, None)
            } else {
                // Decoding checked every index against the fds sent.
                match files.get(e.fd_index as usize) {
                    Some(Some(f)) => self.map_one(&map, Some(f)),
                    _ => Err(self.refuse_backing(&map)),
                }
            };
            errnos.push(done.err().map_or(0, |(errno, _)| errno as u32));
        }
        Ok(Answer::Payload(encode_multi_reply(&errnos)))
    }

    /// DMA_UNMAP_MULTI: each entry as its own DMA_UNMAP would be, in
    /// order; the reply, with every entry's errno, is sent after every
    /// range has left the device.
    ///
    /// An entry's errno depends only on the table (it names exactly one
    /// map still there), so every entry is judged and taken out of the
    /// table first, then all the taken ranges leave the device in one call
    /// (a passthrough device unmaps adjacent ones with one IOMMU call),
    /// then airlock's mappings of them go: per range, the same order as
    /// DMA_UNMAP.
    pub(super) fn dma_unmap_multi(&mut self, unmaps: &[DmaUnmapEntry]) -> Handled {
        self.need_dma_multiple("DMA_UNMAP_MULTI")?;
        self.stats.dma_unmaps += unmaps.len() as u64;
        self.stats.dma_batches += 1;
        self.stats.dma_batched += unmaps.len() as u64;
        let mut errnos = Vec::with_capacity(unmaps.len());
        let (mut ranges, mut taken) = (Vec::new(), Vec::new());
        for u in unmaps {
            match self.dma.take(u.iova, u.size) {
                Ok(t) => {
                    ranges.push((u.iova, u.size));
                    taken.push(t);
                    errnos.push(0);
                }
                Err(e) => errnos.push(e.errno() as u32),
            }
        }
        self.device.dma_unmapped_many(&ranges);
        for t in taken {
            self.dma.release(t);
        }
        Ok(Answer::Payload(encode_multi_reply(&errnos)))
    }

    fn need_dma_multiple(&self, what: &str) -> Result<(), Refusal> {
        if self.peer.is_some_and(|p| p.dma_multiple) {
            return Ok(());
        }
        Err((
            libc::EINVAL,
            format!("{what} needs the dma_multiple capability, which this client did not propose in VERSION"),
        ))
    }

    /// One map: refused inside an IOVA window; mapped by airlock first,
    /// then handed to the device (undone if the device refuses).
    fn map_one(&mut self, map: &DmaMap, file: Option<&ClientFile>) -> Result<(), Refusal> {
        let dev = &self.name;
        // An empty map overlaps nothing (the DMA space judges it).
        let range = IovaRange::from_span(map.iova, map.size);
        if let Some(w) = range.and_then(|r| self.windows.iter().find(|w| w.overlaps(&r))) {
            let why = format!(
                "{dev}: DMA_MAP [{:#x}, +{:#x}) refused: it overlaps the IOVA window {w}: {}. Fix: keep guest RAM and guest IOVAs out of it (without a vIOMMU, place guest RAM elsewhere; with one, the guest's IOMMU driver must reserve the window: a client can learn the usable ranges by proposing the iova_ranges capability)",
                map.iova,
                map.size,
                w.meaning()
            );
            warn!("{why}");
            return Err((libc::EINVAL, why));
        }
        let placed = self.dma.map_file(map, file).map_err(|e| {
            warn!(device = %dev, "DMA_MAP refused: {e}");
            fail(&e, e.errno())
        })?;
        if let Err(e) =
            self.device
                .dma_mapped(map.iova, map.size, placed.host, map.flags, placed.file)
        {
            warn!("DMA_MAP refused: {e}");
            let _ = self.dma.unmap(map.iova, map.size);
            return Err(fail(&e, e.errno()));
        }
        debug!(
            iova = map.iova,
            size = map.size,
            backed = file.is_some(),
            "DMA_MAP"
        );
        Ok(())
    }

    /// The map's fd is no regular file.
    fn refuse_backing(&self, map: &DmaMap) -> Refusal {
        let e = DmaError::backing(map);
        warn!(device = %self.name, "DMA_MAP refused: {e}");
        fail(&e, e.errno())
    }

    /// The map that is exactly [iova, iova + size) leaves the table (no
    /// access of the emulated device finds it), then the device (the
    /// IOMMU unmap), then airlock's address space.
    fn unmap_one(&mut self, iova: u64, size: u64) -> Result<(), Refusal> {
        let taken = self.dma.take(iova, size).map_err(|e| fail(&e, e.errno()))?;
        self.device.dma_unmapped(iova, size);
        self.dma.release(taken);
        Ok(())
    }

    /// Every map leaves the device first, then airlock's address space.
    pub(super) fn unmap_all(&mut self) {
        self.device.dma_unmapped_many(&self.dma.ranges());
        self.dma.clear();
    }
}
