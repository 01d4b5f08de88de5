//! The record of what airlock put in the IOMMU: this server's clients'
//! DMA maps, each with a slot in the handover table, and the mappings a
//! killed server left that the client has not re-mapped yet (adoption:
//! see adopt.rs for the decisions, handover.rs for the table).

use std::collections::HashMap;
use std::os::fd::BorrowedFd;

use airlock_protocol::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use tracing::{debug, info, warn};

use super::adopt::{self, MapDecision, MapRecord, Tally};
use super::handover::{Handover, SlotState};
use super::ioctl;
use crate::device::DeviceError;
use crate::dma::FileId;

pub(super) struct IommuMaps {
    name: String,
    /// What the kernel holds, shared with the servers before and after.
    table: Handover,
    /// This server's clients' maps in the IOMMU: (iova, size) -> slot.
    by_range: HashMap<(u64, u64), usize>,
    /// Mappings a killed server left that no client has re-mapped yet:
    /// (slot, record).
    adopted: Vec<(usize, MapRecord)>,
    tally: Tally,
    /// Since the last `summary`: mappings taken out of the IOMMU, and the
    /// VFIO_IOMMU_UNMAP_DMA calls that did it.
    unmapped: u64,
    unmap_calls: u64,
}

/// One DMA_MAP as the device sees it.
pub(super) struct DmaMap {
    pub iova: u64,
    pub size: u64,
    /// airlock's mapping of the memory (None: the client sent no fd).
    pub host: Option<u64>,
    pub flags: u32,
    pub file: Option<FileId>,
}

/// A client map on its way out of the IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Unmapping {
    iova: u64,
    size: u64,
    /// Its handover slot.
    slot: usize,
}

/// The runs of adjacent maps in `sorted` (by IOVA, none overlapping).
fn runs(sorted: &[Unmapping]) -> impl Iterator<Item = &[Unmapping]> {
    sorted.chunk_by(|a, b| a.iova.checked_add(a.size) == Some(b.iova))
}

/// (start, size) of a run of adjacent maps, sorted and non-empty.
fn joined(run: &[Unmapping]) -> (u64, u64) {
    let start = run[0].iova;
    let last = run[run.len() - 1];
    (start, last.iova + last.size - start)
}

impl IommuMaps {
    pub fn new(name: String, table: Handover) -> IommuMaps {
        IommuMaps {
            name,
            table,
            by_range: HashMap::new(),
            adopted: Vec::new(),
            tally: Tally::default(),
            unmapped: 0,
            unmap_calls: 0,
        }
    }

    pub fn table(&self) -> &Handover {
        &self.table
    }

    /// Takes over the mappings a killed server left. Those whose map or
    /// unmap was cut short are unmapped (returned: how many); the others
    /// wait for the client to re-map them.
    pub fn adopt(&mut self, container: BorrowedFd<'_>) -> usize {
        let mut settled = 0;
        for (slot, state, r) in self.table.scan() {
            if state == SlotState::Mapped {
                self.adopted.push((slot, r));
                continue;
            }
            // Unmapping an exact range nobody mapped is a no-op.
            if let Err(e) = ioctl::iommu_unmap(container, r.iova, r.size) {
                warn!(device = %self.name, "VFIO_IOMMU_UNMAP_DMA [{:#x}, +{:#x}) of a map the previous server left half done failed: {e}", r.iova, r.size);
            }
            self.table.free(slot);
            settled += 1;
        }
        self.tally = Tally {
            adopted: self.adopted.len(),
            ..Tally::default()
        };
        settled
    }

    /// (count, bytes) of adopted mappings not yet claimed.
    pub fn adopted_size(&self) -> (usize, u64) {
        let bytes = self.adopted.iter().map(|(_, r)| r.size).sum();
        (self.adopted.len(), bytes)
    }

    /// Puts a client's DMA_MAP in the IOMMU, or takes over the adopted
    /// mapping that is this very map.
    pub fn map(&mut self, container: BorrowedFd<'_>, m: DmaMap) -> Result<(), DeviceError> {
        if self.claim(container, &m) {
            return Ok(());
        }
        let Some(host) = m.host else {
            // QEMU maps its firmware ROMs (read-only, no fd) too; the device
            // never DMAs there, so they are recorded but kept out of the
            // IOMMU. Writable memory without an fd is guest RAM that is not
            // shared: the device could not reach it, so that is refused.
            if m.flags & DMA_MAP_FLAG_WRITE == 0 {
                debug!(device = %self.name, "read-only DMA_MAP [{:#x}, +{:#x}) without fd (firmware ROM): not mapped for the device", m.iova, m.size);
                return Ok(());
            }
            return Err(DeviceError::NeedsSharedMemory {
                device: self.name.clone(),
                iova: m.iova,
                size: m.size,
            });
        };
        self.pin(container, &m, host)
    }

    /// Settles a DMA_MAP against the adopted mappings: true if it took one
    /// over as it is; otherwise the adopted mappings it overlaps are gone.
    fn claim(&mut self, container: BorrowedFd<'_>, m: &DmaMap) -> bool {
        if self.adopted.is_empty() {
            return false;
        }
        let (iova, size) = (m.iova, m.size);
        let records: Vec<MapRecord> = self.adopted.iter().map(|(_, r)| *r).collect();
        let mut replace = match adopt::decide(&records, iova, size, m.flags, m.file) {
            MapDecision::Claim(i) if m.host.is_some() => {
                // The same memory: the mapping stays as it is, so a DMA
                // the device has in flight keeps landing in the same page.
                let (slot, _) = self.adopted.swap_remove(i);
                self.by_range.insert((iova, size), slot);
                self.tally.claimed += 1;
                debug!(device = %self.name, "DMA_MAP [{iova:#x}, +{size:#x}) takes over the previous server's IOMMU mapping");
                return true;
            }
            MapDecision::Claim(i) => vec![i],
            MapDecision::Fresh { replace } => replace,
        };
        replace.sort_unstable_by(|a, b| b.cmp(a));
        for i in replace {
            let (slot, r) = self.adopted.remove(i);
            debug!(device = %self.name, "DMA_MAP [{iova:#x}, +{size:#x}) is other memory than the adopted mapping [{:#x}, +{:#x}): unmapping that first", r.iova, r.size);
            self.unmap_slot(container, slot, r.iova, r.size);
            self.tally.replaced += 1;
        }
        false
    }

    /// VFIO_IOMMU_MAP_DMA of airlock's mapping `host`, recorded first so a
    /// death mid-way leaves a slot the next server settles.
    fn pin(&mut self, container: BorrowedFd<'_>, m: &DmaMap, host: u64) -> Result<(), DeviceError> {
        let (iova, size) = (m.iova, m.size);
        let mut vflags = 0;
        if m.flags & DMA_MAP_FLAG_READ != 0 {
            vflags |= ioctl::VFIO_DMA_MAP_FLAG_READ;
        }
        if m.flags & DMA_MAP_FLAG_WRITE != 0 {
            vflags |= ioctl::VFIO_DMA_MAP_FLAG_WRITE;
        }
        let record = MapRecord {
            iova,
            size,
            flags: m.flags,
            file: m.file.unwrap_or_default(),
        };
        let slot = match self.table.begin_map(&record) {
            Some(s) => s,
            None => {
                // Full only while unclaimed adopted mappings hold slots.
                self.adoption_ended(container);
                self.table
                    .begin_map(&record)
                    .ok_or_else(|| DeviceError::Os {
                        device: self.name.clone(),
                        what: format!(
                            "recording DMA_MAP [{iova:#x}, +{size:#x}) for a restarted server"
                        ),
                        source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                    })?
            }
        };
        // SAFETY: `host` is airlock's mapping of the client's memory for
        // exactly this DMA_MAP (DmaSpace); the session takes a range out of
        // the device (dma_unmapped: the IOMMU unmap) before it unmaps it
        // from airlock, and the kernel keeps the pages pinned while the
        // IOMMU maps them, so they are never reused under the device.
        let mapped = unsafe { ioctl::iommu_map(container, host, iova, size, vflags) };
        if let Err(source) = mapped {
            self.table.free(slot);
            if source.raw_os_error() == Some(libc::ENOMEM) {
                // VFIO pins every mapped page against RLIMIT_MEMLOCK.
                let pinned: u64 = self.by_range.keys().map(|(_, s)| s).sum();
                return Err(DeviceError::MemlockTooLow {
                    device: self.name.clone(),
                    iova,
                    size,
                    pinned,
                });
            }
            return Err(DeviceError::Os {
                device: self.name.clone(),
                what: format!("VFIO_IOMMU_MAP_DMA [{iova:#x}, +{size:#x})"),
                source,
            });
        }
        self.table.mark(slot, SlotState::Mapped);
        self.by_range.insert((iova, size), slot);
        Ok(())
    }

    pub fn unmap(&mut self, container: BorrowedFd<'_>, iova: u64, size: u64) {
        if let Some(slot) = self.by_range.remove(&(iova, size)) {
            self.unmap_slot(container, slot, iova, size);
        }
    }

    /// Several client maps leave together: each run of adjacent ones goes
    /// in one VFIO_IOMMU_UNMAP_DMA over their joined range. type1 removes
    /// every mapping inside a range whose ends are mapping ends, so that is
    /// one system call and one pass under the container's lock instead of
    /// one per map; the kernel still flushes the IOTLB for each mapping.
    pub fn unmap_many(&mut self, container: BorrowedFd<'_>, ranges: &[(u64, u64)]) {
        let maps = self.take_sorted(ranges);
        for run in runs(&maps) {
            self.unmap_run(container, run);
        }
    }

    /// The maps among `ranges` that this server's clients put in the
    /// IOMMU (others, such as a ROM kept out of it, are skipped), out of
    /// the record, by IOVA.
    fn take_sorted(&mut self, ranges: &[(u64, u64)]) -> Vec<Unmapping> {
        let mut maps: Vec<Unmapping> = ranges
            .iter()
            .filter_map(|&(iova, size)| {
                let slot = self.by_range.remove(&(iova, size))?;
                Some(Unmapping { iova, size, slot })
            })
            .collect();
        maps.sort_unstable_by_key(|m| m.iova);
        maps
    }

    /// One run of adjacent maps (sorted, each still in its slot): all
    /// marked Unmapping, one unmap of their joined range, all freed.
    fn unmap_run(&mut self, container: BorrowedFd<'_>, run: &[Unmapping]) {
        if let [m] = run {
            return self.unmap_slot(container, m.slot, m.iova, m.size);
        }
        let (iova, size) = joined(run);
        for m in run {
            self.table.mark(m.slot, SlotState::Unmapping);
        }
        self.unmapped += run.len() as u64;
        self.unmap_calls += 1;
        let mut gone = ioctl::iommu_unmap(container, iova, size).unwrap_or_else(|e| {
            debug!(device = %self.name, "VFIO_IOMMU_UNMAP_DMA [{iova:#x}, +{size:#x}) ({} adjacent maps) failed: {e}", run.len());
            0
        });
        if gone != size {
            // type1 stops at a mapping this process may not unmap (before
            // Linux 6.0, one a previous server made), or the call failed:
            // each map again on its own, so that all the others still go
            // (an exact unmap of a range already gone is a no-op).
            self.unmap_calls += run.len() as u64;
            for m in run {
                match ioctl::iommu_unmap(container, m.iova, m.size) {
                    Ok(n) => gone += n,
                    Err(e) => {
                        warn!(device = %self.name, "VFIO_IOMMU_UNMAP_DMA [{:#x}, +{:#x}) failed: {e}", m.iova, m.size);
                    }
                }
            }
        }
        if gone != size {
            warn!(device = %self.name, "VFIO_IOMMU_UNMAP_DMA of [{iova:#x}, +{size:#x}) ({} adjacent maps) unmapped {gone:#x} bytes: a mapping made by a previous server may stay in the IOMMU (Linux before 6.0 lets only the process that mapped it unmap it; restart airlock to clear it)", run.len());
        }
        for m in run {
            self.table.free(m.slot);
        }
    }

    /// How many mappings left the IOMMU in how many calls since the last
    /// summary (the session line's; adjacent unmaps are joined).
    pub fn summary(&mut self) -> String {
        let s = format!(
            "{} IOMMU unmaps in {} VFIO_IOMMU_UNMAP_DMA calls",
            self.unmapped, self.unmap_calls
        );
        (self.unmapped, self.unmap_calls) = (0, 0);
        s
    }

    /// Unmaps what no client re-mapped within the adoption window.
    pub fn adoption_ended(&mut self, container: BorrowedFd<'_>) {
        let left = std::mem::take(&mut self.adopted);
        for (slot, r) in &left {
            self.unmap_slot(container, *slot, r.iova, r.size);
        }
        let t = Tally {
            dropped: self.tally.dropped + left.len(),
            ..self.tally
        };
        if t.adopted > 0 {
            info!(
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

    /// Unmaps a recorded mapping from the IOMMU and frees its slot.
    fn unmap_slot(&mut self, container: BorrowedFd<'_>, slot: usize, iova: u64, size: u64) {
        self.table.mark(slot, SlotState::Unmapping);
        self.unmapped += 1;
        self.unmap_calls += 1;
        match ioctl::iommu_unmap(container, iova, size) {
            Ok(n) if n != size => {
                // Before Linux 6.0, type1 let only the mapping process unmap.
                warn!(device = %self.name, "VFIO_IOMMU_UNMAP_DMA [{iova:#x}, +{size:#x}) unmapped {n:#x} bytes: a mapping made by a previous server may stay in the IOMMU (Linux before 6.0 lets only the process that mapped it unmap it; restart airlock to clear it)");
            }
            Ok(_) => {}
            Err(e) => {
                warn!(device = %self.name, "VFIO_IOMMU_UNMAP_DMA [{iova:#x}, +{size:#x}) failed: {e}");
            }
        }
        self.table.free(slot);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// A record with these client maps in the IOMMU, each in its slot.
    fn mapped(ranges: &[(u64, u64)]) -> IommuMaps {
        let mut m = IommuMaps::new("test".into(), Handover::new(16).unwrap());
        for &(iova, size) in ranges {
            let r = MapRecord {
                iova,
                size,
                flags: 3,
                file: FileId::default(),
            };
            let slot = m.table.begin_map(&r).unwrap();
            m.table.mark(slot, SlotState::Mapped);
            m.by_range.insert((iova, size), slot);
        }
        m
    }

    fn spans(sorted: &[Unmapping]) -> Vec<(u64, u64, usize)> {
        runs(sorted)
            .map(|r| {
                let (iova, size) = joined(r);
                (iova, size, r.len())
            })
            .collect()
    }

    #[test]
    fn adjacent_maps_leave_as_one_run_whatever_order_they_are_named_in() {
        let mut m = mapped(&[
            (0x1000, 0x1000),
            (0x2000, 0x2000),
            (0x4000, 0x1000),
            (0x8000, 0x1000),
            (0x9000, 0x1000),
            (0x20000, 0x1000),
        ]);
        // Unsorted, with a gap (0x5000..0x8000), a map not named
        // (0x20000), one never mapped and one named with the wrong size.
        let taken = m.take_sorted(&[
            (0x9000, 0x1000),
            (0x2000, 0x2000),
            (0x30000, 0x1000),
            (0x1000, 0x1000),
            (0x8000, 0x2000),
            (0x4000, 0x1000),
            (0x8000, 0x1000),
        ]);
        assert_eq!(
            spans(&taken),
            vec![(0x1000, 0x4000, 3), (0x8000, 0x2000, 2)],
            "[0x1000, 0x5000) and [0x8000, 0xa000), each joined"
        );
        assert_eq!(
            m.by_range.keys().collect::<Vec<_>>(),
            vec![&(0x20000, 0x1000)],
            "only the map nobody named is left in the record"
        );
    }

    #[test]
    fn a_failed_joined_unmap_still_unmaps_and_frees_every_map() {
        // Not a VFIO container: every unmap fails (ENOTTY), which takes
        // the fallback path, one unmap per map.
        let not_vfio = std::fs::File::open("/dev/null").unwrap();
        let mut m = mapped(&[(0x1000, 0x1000), (0x2000, 0x1000), (0x5000, 0x1000)]);
        m.unmap_many(not_vfio.as_fd(), &[(0x1000, 0x1000), (0x2000, 0x1000)]);
        assert!(m.by_range.keys().eq([&(0x5000, 0x1000)]));
        let left: Vec<u64> = m.table.scan().iter().map(|(_, _, r)| r.iova).collect();
        assert_eq!(left, vec![0x5000], "the two slots are free, the third kept");
        // One joined call, then one per map when it failed.
        assert_eq!(
            m.summary(),
            "2 IOMMU unmaps in 3 VFIO_IOMMU_UNMAP_DMA calls"
        );
        assert_eq!(
            m.summary(),
            "0 IOMMU unmaps in 0 VFIO_IOMMU_UNMAP_DMA calls"
        );
    }
}
