//! Adopting what a killed server left in the kernel: which replayed
//! DMA_MAP takes over an IOMMU mapping as it stands, which one replaces
//! it, and which interrupt index a new client's SET_IRQS displaces.
//! Pure decisions over records; the shared table (handover.rs) and the
//! ioctls (mod.rs) act on them.
//!
//! A replayed map is the same map only if everything the IOMMU and the
//! pinned pages depend on is the same: IOVA range, access flags, and the
//! memory behind it (the file's st_dev/st_ino and the offset into it).
//! Memory at the same IOVA from another file, or another part of the same
//! file, is different memory: the old mapping must go before the new one.

use crate::dma::FileId;
use crate::iova::IovaRange;

/// One IOMMU mapping: range, DMA_MAP flags and the memory behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRecord {
    pub iova: u64,
    pub size: u64,
    /// DMA_MAP flags (READ / WRITE).
    pub flags: u32,
    pub file: FileId,
}

impl MapRecord {
    /// [iova, iova + size); None for a record that describes no memory.
    pub fn range(&self) -> Option<IovaRange> {
        IovaRange::from_span(self.iova, self.size)
    }

    /// The one overlap rule (iova.rs), for [iova, iova + size).
    pub fn overlaps(&self, iova: u64, size: u64) -> bool {
        match (self.range(), IovaRange::from_span(iova, size)) {
            (Some(mine), Some(theirs)) => mine.overlaps(&theirs),
            _ => false,
        }
    }
}

/// What to do with a DMA_MAP while adopted mappings are still unclaimed.
#[derive(Debug, PartialEq, Eq)]
pub enum MapDecision {
    /// The adopted mapping at this position is this very map: take it
    /// over as it is (no VFIO_IOMMU_MAP_DMA; the pages stay pinned).
    Claim(usize),
    /// Map afresh, after unmapping the adopted mappings at these
    /// positions (they overlap but are not the same map).
    Fresh { replace: Vec<usize> },
}

/// Decides a DMA_MAP of [iova, iova + size) with `flags`, backed by
/// `file` (None: no fd, e.g. a firmware ROM, which is never in the IOMMU).
pub fn decide(
    adopted: &[MapRecord],
    iova: u64,
    size: u64,
    flags: u32,
    file: Option<FileId>,
) -> MapDecision {
    if let Some(file) = file {
        let want = MapRecord {
            iova,
            size,
            flags,
            file,
        };
        if let Some(i) = adopted.iter().position(|a| *a == want) {
            return MapDecision::Claim(i);
        }
    }
    MapDecision::Fresh {
        replace: adopted
            .iter()
            .enumerate()
            .filter(|(_, a)| a.overlaps(iova, size))
            .map(|(i, _)| i)
            .collect(),
    }
}

/// Where the adoption of a previous server's mappings stands, for the
/// log line that closes the window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Adopted at server start.
    pub adopted: usize,
    /// Re-mapped by the client with the same memory: kept as they were.
    pub claimed: usize,
    /// Overlapped by a different map: unmapped first.
    pub replaced: usize,
    /// Not re-mapped by the end of the window: unmapped.
    pub dropped: usize,
}

/// vfio-pci enables one of INTx (0), MSI (1) and MSI-X (2) at a time.
const EXCLUSIVE: [u32; 3] = [0, 1, 2];

/// The adopted (still enabled, not yet touched by this client) interrupt
/// indexes that must be torn down before the client's SET_IRQS on
/// `index`: the kernel refuses one of INTx/MSI/MSI-X while another is
/// enabled, and a client that sets up MSI when the previous one left
/// MSI-X on is not replaying.
pub fn displaced_irqs(adopted: &[u32], index: u32) -> Vec<u32> {
    if !EXCLUSIVE.contains(&index) {
        return Vec::new();
    }
    adopted
        .iter()
        .copied()
        .filter(|&i| i != index && EXCLUSIVE.contains(&i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: u32 = 3;
    const RO: u32 = 1;

    fn file(ino: u64, offset: u64) -> FileId {
        FileId {
            dev: 7,
            ino,
            offset,
        }
    }

    fn rec(iova: u64, size: u64, flags: u32, f: FileId) -> MapRecord {
        MapRecord {
            iova,
            size,
            flags,
            file: f,
        }
    }

    fn guest_ram() -> Vec<MapRecord> {
        vec![
            rec(0, 0xa0000, RW, file(10, 0)),
            rec(0x100000, 0x3ff00000, RW, file(10, 0x100000)),
        ]
    }

    #[test]
    fn a_replayed_map_of_the_same_memory_is_claimed_as_it_is() {
        let a = guest_ram();
        assert_eq!(
            decide(&a, 0x100000, 0x3ff00000, RW, Some(file(10, 0x100000))),
            MapDecision::Claim(1)
        );
        assert_eq!(
            decide(&a, 0, 0xa0000, RW, Some(file(10, 0))),
            MapDecision::Claim(0)
        );
    }

    #[test]
    fn the_same_range_from_another_file_replaces_the_adopted_map() {
        let a = guest_ram();
        assert_eq!(
            decide(&a, 0x100000, 0x3ff00000, RW, Some(file(11, 0x100000))),
            MapDecision::Fresh { replace: vec![1] }
        );
    }

    #[test]
    fn another_offset_of_the_same_file_is_different_memory() {
        let a = guest_ram();
        assert_eq!(
            decide(&a, 0, 0xa0000, RW, Some(file(10, 0x1000))),
            MapDecision::Fresh { replace: vec![0] }
        );
    }

    #[test]
    fn other_flags_or_size_are_not_the_same_map() {
        let a = guest_ram();
        assert_eq!(
            decide(&a, 0, 0xa0000, RO, Some(file(10, 0))),
            MapDecision::Fresh { replace: vec![0] }
        );
        assert_eq!(
            decide(&a, 0, 0x90000, RW, Some(file(10, 0))),
            MapDecision::Fresh { replace: vec![0] }
        );
    }

    #[test]
    fn a_map_across_two_adopted_ones_replaces_both() {
        let a = guest_ram();
        assert_eq!(
            decide(&a, 0x9f000, 0x62000, RW, Some(file(12, 0))),
            MapDecision::Fresh {
                replace: vec![0, 1]
            }
        );
    }

    #[test]
    fn a_map_beside_the_adopted_ones_replaces_nothing() {
        let a = guest_ram();
        assert_eq!(
            decide(&a, 0xa0000, 0x60000, RW, Some(file(12, 0))),
            MapDecision::Fresh { replace: vec![] }
        );
        assert_eq!(
            decide(&a, 0x40000000, 0x1000, RW, Some(file(12, 0))),
            MapDecision::Fresh { replace: vec![] }
        );
    }

    #[test]
    fn a_map_without_fd_is_never_claimed_but_still_replaces() {
        let a = guest_ram();
        // A ROM map over adopted RAM: the RAM mapping cannot stay in the IOMMU.
        assert_eq!(
            decide(&a, 0xc0000, 0x20000, RO, None),
            MapDecision::Fresh { replace: vec![] }
        );
        assert_eq!(
            decide(&a, 0x100000, 0x1000, RO, None),
            MapDecision::Fresh { replace: vec![1] }
        );
    }

    #[test]
    fn nothing_adopted_means_every_map_is_fresh() {
        assert_eq!(
            decide(&[], 0, 0x1000, RW, Some(file(1, 0))),
            MapDecision::Fresh { replace: vec![] }
        );
    }

    #[test]
    fn overlap_is_half_open() {
        let r = rec(0x1000, 0x1000, RW, file(1, 0));
        assert!(r.overlaps(0x1fff, 1));
        assert!(r.overlaps(0, 0x1001));
        assert!(!r.overlaps(0x2000, 0x1000));
        assert!(!r.overlaps(0, 0x1000));
        assert!(r.overlaps(0, u64::MAX));
        // Nothing overlaps an empty map, nor a record of one.
        assert!(!r.overlaps(0x1000, 0));
        assert!(!rec(0x1000, 0, RW, file(1, 0)).overlaps(0, u64::MAX));
        // A map ending at the top of the space.
        let top = rec(u64::MAX - 0xfff, 0x1000, RW, file(1, 0));
        assert!(top.overlaps(u64::MAX, 1));
        assert!(!top.overlaps(0, u64::MAX - 0xfff));
    }

    #[test]
    fn setting_msi_displaces_an_adopted_msix_but_not_the_error_index() {
        assert_eq!(displaced_irqs(&[2, 3], 1), vec![2]);
        assert_eq!(displaced_irqs(&[0], 2), vec![0]);
    }

    #[test]
    fn replaying_the_enabled_index_displaces_nothing() {
        assert_eq!(displaced_irqs(&[2], 2), Vec::<u32>::new());
        assert_eq!(displaced_irqs(&[2, 4], 4), Vec::<u32>::new());
        assert_eq!(displaced_irqs(&[], 1), Vec::<u32>::new());
    }
}
