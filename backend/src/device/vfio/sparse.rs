//! Which pages of a BAR the client may mmap: every mmap-able page except
//! those holding the MSI-X table or PBA (QEMU emulates the table; the PBA
//! and table must keep going through airlock and the kernel).

use airlock_protocol::device::SparseArea;

pub const PAGE: u64 = 4096;

/// A byte range [start, end) of a BAR that must not be mmapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hole {
    pub start: u64,
    pub end: u64,
}

/// Cuts page-aligned holes out of `areas` (the kernel's mmap-able areas).
pub fn mmap_areas(areas: &[SparseArea], holes: &[Hole]) -> Vec<SparseArea> {
    let mut out: Vec<(u64, u64)> = areas
        .iter()
        .map(|a| (a.offset, a.offset + a.size))
        .collect();
    for h in holes {
        let hs = h.start / PAGE * PAGE;
        let he = h.end.div_ceil(PAGE) * PAGE;
        out = out
            .into_iter()
            .flat_map(|(s, e)| {
                let mut parts = Vec::new();
                if he <= s || hs >= e {
                    parts.push((s, e));
                } else {
                    if s < hs {
                        parts.push((s, hs));
                    }
                    if he < e {
                        parts.push((he, e));
                    }
                }
                parts
            })
            .collect();
    }
    out.into_iter()
        .filter(|(s, e)| e > s)
        .map(|(s, e)| SparseArea {
            offset: s,
            size: e - s,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(offset: u64, size: u64) -> SparseArea {
        SparseArea { offset, size }
    }

    #[test]
    fn a_bar_without_msix_is_mapped_whole() {
        assert_eq!(mmap_areas(&[area(0, 0x10000)], &[]), vec![area(0, 0x10000)]);
    }

    #[test]
    fn the_msix_table_and_pba_pages_are_cut_out() {
        let holes = [
            Hole {
                start: 0x2000,
                end: 0x2000 + 64 * 16,
            },
            Hole {
                start: 0x3000,
                end: 0x3008,
            },
        ];
        assert_eq!(
            mmap_areas(&[area(0, 0x4000)], &holes),
            vec![area(0, 0x2000)]
        );
    }

    #[test]
    fn a_table_in_the_middle_splits_the_area_on_page_boundaries() {
        let holes = [Hole {
            start: 0x1800,
            end: 0x1900,
        }];
        assert_eq!(
            mmap_areas(&[area(0, 0x4000)], &holes),
            vec![area(0, 0x1000), area(0x2000, 0x2000)]
        );
    }

    #[test]
    fn a_bar_that_is_all_table_has_no_areas() {
        let holes = [
            Hole {
                start: 0,
                end: 0x800,
            },
            Hole {
                start: 0x800,
                end: 0x808,
            },
        ];
        assert!(mmap_areas(&[area(0, 0x1000)], &holes).is_empty());
    }
}
