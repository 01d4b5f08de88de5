//! IOVA ranges: one type for every range airlock reasons about (the host's
//! windows, the holes between VFIO's usable ranges, the ranges offered to a
//! client, DMA maps and adopted IOMMU mappings), with one overlap rule.
//!
//! A range is inclusive at both ends, as the kernel prints reserved regions
//! and as the protocol's `iova_ranges` carries them: [0, u64::MAX] is
//! representable, an empty range is not. Constructors return None where the
//! arithmetic would wrap, so no caller can build a range that lies.

mod windows;

use std::fmt;

use airlock_protocol::version::IovaRange as WireRange;

pub use windows::{
    holes, parse_reserve, parse_reserved_regions, read_reserved_regions, usable_ranges,
    DoorbellWindow, WindowError, WindowSource,
};

/// [first, last], both inclusive; never empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IovaRange {
    first: u64,
    last: u64,
}

impl IovaRange {
    /// The whole 64-bit IOVA space.
    pub const ALL: IovaRange = IovaRange {
        first: 0,
        last: u64::MAX,
    };

    /// [first, last]; None when last < first.
    pub fn new(first: u64, last: u64) -> Option<IovaRange> {
        (first <= last).then_some(IovaRange { first, last })
    }

    /// [iova, iova + size), as DMA_MAP gives it; None for size 0 or when
    /// the end is past the 64-bit space.
    pub fn from_span(iova: u64, size: u64) -> Option<IovaRange> {
        let last = iova.checked_add(size.checked_sub(1)?)?;
        Some(IovaRange { first: iova, last })
    }

    pub fn first(&self) -> u64 {
        self.first
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    /// The number of addresses (2^64 for the whole space, hence u128).
    pub fn len(&self) -> u128 {
        u128::from(self.last - self.first) + 1
    }

    /// Never true; here for clippy's len_without_is_empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The one overlap rule: some address lies in both.
    pub fn overlaps(&self, other: &IovaRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// Every address of `other` lies in self.
    pub fn contains(&self, other: &IovaRange) -> bool {
        self.first <= other.first && other.last <= self.last
    }

    /// The addresses in both, if any.
    pub fn intersection(&self, other: &IovaRange) -> Option<IovaRange> {
        IovaRange::new(self.first.max(other.first), self.last.min(other.last))
    }

    /// What is left of self with `cut` taken out: zero, one or two ranges,
    /// lowest first.
    pub fn minus(&self, cut: &IovaRange) -> Vec<IovaRange> {
        if !self.overlaps(cut) {
            return vec![*self];
        }
        let mut out = Vec::with_capacity(2);
        if cut.first > self.first {
            out.push(IovaRange {
                first: self.first,
                last: cut.first - 1,
            });
        }
        if cut.last < self.last {
            out.push(IovaRange {
                first: cut.last + 1,
                last: self.last,
            });
        }
        out
    }
}

impl fmt::Display for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}-{:#x}", self.first, self.last)
    }
}

impl From<IovaRange> for WireRange {
    fn from(r: IovaRange) -> WireRange {
        WireRange {
            start: r.first,
            end: r.last,
        }
    }
}

impl TryFrom<WireRange> for IovaRange {
    type Error = String;

    fn try_from(w: WireRange) -> Result<IovaRange, String> {
        IovaRange::new(w.start, w.end).ok_or_else(|| {
            format!(
                "IOVA range {:#x}-{:#x} ends before it starts",
                w.start, w.end
            )
        })
    }
}

/// `within` (or the whole space) minus every range of `cuts`, lowest first.
pub fn subtract(within: &[IovaRange], cuts: &[IovaRange]) -> Vec<IovaRange> {
    let mut left = within.to_vec();
    for cut in cuts {
        left = left.iter().flat_map(|r| r.minus(cut)).collect();
    }
    left.sort();
    left
}

/// The same IOVAs as `ranges`, lowest first, with overlapping and adjacent
/// ranges merged (what a client may take as one list without overlaps).
pub fn union(ranges: &[IovaRange]) -> Vec<IovaRange> {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut out: Vec<IovaRange> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.first() <= last.last().saturating_add(1) => {
                *last =
                    IovaRange::new(last.first(), last.last().max(r.last())).expect("first <= last");
            }
            _ => out.push(r),
        }
    }
    out
}

/// The complement of `ranges` in the 64-bit space, lowest first: the holes
/// between and around them (none for an empty list: nothing is known).
pub fn gaps(ranges: &[IovaRange]) -> Vec<IovaRange> {
    if ranges.is_empty() {
        return Vec::new();
    }
    subtract(&[IovaRange::ALL], ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(first: u64, last: u64) -> IovaRange {
        IovaRange::new(first, last).expect("a valid range")
    }

    #[test]
    fn union_merges_overlapping_and_adjacent_ranges_and_keeps_gaps() {
        assert_eq!(
            union(&[r(20, 30), r(0, 10), r(5, 12), r(13, 14), r(16, 16)]),
            [r(0, 14), r(16, 16), r(20, 30)]
        );
        assert_eq!(union(&[r(0, u64::MAX), r(7, 9)]), [r(0, u64::MAX)]);
        assert_eq!(union(&[]), []);
    }

    #[test]
    fn construction_refuses_empty_and_wrapping_ranges() {
        assert_eq!(IovaRange::new(5, 4), None);
        assert_eq!(IovaRange::from_span(0x1000, 0), None);
        assert_eq!(IovaRange::from_span(u64::MAX, 2), None);
        assert_eq!(
            IovaRange::from_span(u64::MAX, 1),
            Some(r(u64::MAX, u64::MAX))
        );
        assert_eq!(IovaRange::from_span(0, u64::MAX), Some(r(0, u64::MAX - 1)));
        assert_eq!(IovaRange::ALL.len(), 1u128 << 64);
        assert_eq!(r(7, 7).len(), 1);
    }

    #[test]
    fn overlap_at_the_edges() {
        // Adjacent ranges do not overlap; sharing one address does.
        assert!(!r(0, 0xfff).overlaps(&r(0x1000, 0x1fff)));
        assert!(r(0, 0x1000).overlaps(&r(0x1000, 0x1fff)));
        // Both ends of the space.
        assert!(r(0, 0).overlaps(&IovaRange::ALL));
        assert!(r(u64::MAX, u64::MAX).overlaps(&IovaRange::ALL));
        assert!(!r(0, 0).overlaps(&r(u64::MAX, u64::MAX)));
        assert!(r(u64::MAX - 1, u64::MAX).overlaps(&r(u64::MAX, u64::MAX)));
    }

    #[test]
    fn the_doorbell_window_refuses_a_map_one_byte_into_it() {
        let its = r(0x800_0000, 0x80f_ffff);
        let below = IovaRange::from_span(0x7ff_f000, 0x1000).unwrap();
        let into = IovaRange::from_span(0x7ff_f000, 0x1001).unwrap();
        let above = IovaRange::from_span(0x810_0000, 0x1000).unwrap();
        assert!(!its.overlaps(&below) && its.overlaps(&into) && !its.overlaps(&above));
    }

    #[test]
    fn subtract_cuts_every_window_out_and_gaps_are_the_rest() {
        let windows = [r(0x800_0000, 0x80f_ffff), r(0xfee0_0000, 0xfeef_ffff)];
        let usable = subtract(&[IovaRange::ALL], &windows);
        assert_eq!(
            usable,
            vec![
                r(0, 0x7ff_ffff),
                r(0x810_0000, 0xfedf_ffff),
                r(0xfef0_0000, u64::MAX)
            ]
        );
        assert_eq!(gaps(&usable), windows.to_vec());
        let host = [r(0, (1 << 48) - 1)];
        assert_eq!(gaps(&host), vec![r(1 << 48, u64::MAX)]);
        assert_eq!(gaps(&[IovaRange::ALL]), vec![]);
        assert_eq!(gaps(&[]), vec![]);
    }

    #[test]
    fn wire_ranges_convert_both_ways_and_a_backwards_one_is_refused() {
        let w: WireRange = r(1, 2).into();
        assert_eq!((w.start, w.end), (1, 2));
        assert_eq!(IovaRange::try_from(w), Ok(r(1, 2)));
        assert!(IovaRange::try_from(WireRange { start: 2, end: 1 }).is_err());
    }

    /// Ranges drawn near the edges of the space, where arithmetic wraps.
    fn edge_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..4,
            (u64::MAX - 3)..=u64::MAX,
            0x7ff_f000u64..0x810_1000,
            any::<u64>(),
        ]
    }

    fn any_range() -> impl Strategy<Value = IovaRange> {
        (edge_u64(), edge_u64()).prop_map(|(a, b)| r(a.min(b), a.max(b)))
    }

    proptest! {
        #[test]
        fn overlap_is_symmetric_and_means_a_shared_address(a in any_range(), b in any_range()) {
            prop_assert_eq!(a.overlaps(&b), b.overlaps(&a));
            let shared = a.first.max(b.first) <= a.last.min(b.last);
            prop_assert_eq!(a.overlaps(&b), shared);
        }

        #[test]
        fn from_span_agrees_with_checked_arithmetic(iova in edge_u64(), size in edge_u64()) {
            match IovaRange::from_span(iova, size) {
                None => prop_assert!(size == 0 || iova.checked_add(size - 1).is_none()),
                Some(x) => {
                    prop_assert_eq!(x.first(), iova);
                    prop_assert_eq!(x.len(), u128::from(size));
                }
            }
        }

        #[test]
        fn intersection_exists_exactly_when_ranges_overlap(a in any_range(), b in any_range()) {
            let i = a.intersection(&b);
            prop_assert_eq!(i.is_some(), a.overlaps(&b));
            if let Some(i) = i {
                prop_assert!(a.contains(&i) && b.contains(&i));
            }
        }

        #[test]
        fn minus_leaves_exactly_what_the_cut_does_not_cover(a in any_range(), cut in any_range()) {
            let left = a.minus(&cut);
            let total: u128 = left.iter().map(|x| x.len()).sum();
            let shared = if a.overlaps(&cut) {
                u128::from(a.last.min(cut.last) - a.first.max(cut.first)) + 1
            } else {
                0
            };
            prop_assert_eq!(total + shared, a.len());
            for x in &left {
                prop_assert!(a.contains(x));
                prop_assert!(!x.overlaps(&cut));
            }
        }

        #[test]
        fn gaps_and_ranges_tile_the_space(a in any_range(), b in any_range()) {
            let ranges = subtract(&[a], &[b]);
            let holes = gaps(&ranges);
            for h in &holes {
                prop_assert!(ranges.iter().all(|x| !x.overlaps(h)));
            }
            let covered: u128 = ranges.iter().chain(&holes).map(|x| x.len()).sum();
            if !ranges.is_empty() {
                prop_assert_eq!(covered, 1u128 << 64);
            }
        }
    }
}
