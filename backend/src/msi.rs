//! IOVA windows guest DMA must stay out of, and the host's MSI isolation.
//!
//! On ARM64 with an SMMU the kernel maps the GICv3 ITS doorbell at an IOVA
//! window (0x08000000-0x080fffff); x86's interrupt window is
//! 0xfee00000-0xfeefffff. A guest RAM or IOVA map landing in such a window
//! either fails opaquely in VFIO or, worse, has the device's DMA hit the
//! doorbell. airlock learns the host's windows (sysfs reserved_regions and
//! VFIO's usable IOVA ranges), takes extra ones from --reserve-iova, and
//! refuses a DMA_MAP that overlaps any of them with an error naming both.

use std::fmt;
use std::path::Path;

use airlock_protocol::version::IovaRange;
use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowSource {
    /// The host's MSI doorbell window (reserved_regions type "msi").
    HostMsi,
    /// Another host reserved region, or a hole in VFIO's usable IOVA ranges.
    HostReserved,
    /// Given with --reserve-iova.
    User,
}

impl fmt::Display for WindowSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WindowSource::HostMsi => "host msi",
            WindowSource::HostReserved => "host reserved",
            WindowSource::User => "user (--reserve-iova)",
        })
    }
}

/// [start, end] inclusive, as the kernel prints reserved regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoorbellWindow {
    pub start: u64,
    pub end: u64,
    pub source: WindowSource,
    /// The kernel's type word ("msi", "reserved", "direct", ...) or "user".
    pub kind: String,
}

impl fmt::Display for DoorbellWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x}-{:#x} ({}, {})",
            self.start, self.end, self.source, self.kind
        )
    }
}

impl DoorbellWindow {
    pub fn overlaps(&self, iova: u64, size: u64) -> bool {
        size > 0 && iova <= self.end && iova.saturating_add(size - 1) >= self.start
    }

    /// What a guest must do about this window, for error messages.
    pub fn meaning(&self) -> &'static str {
        match self.source {
            WindowSource::HostMsi => "the host maps the MSI doorbell (GICv3 ITS or x86 interrupt window) here for the device's interrupts; DMA there would hit the doorbell",
            WindowSource::HostReserved => "the host IOMMU cannot map this range for the device",
            WindowSource::User => "reserved for the guest's own doorbell with --reserve-iova",
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WindowError {
    #[error("--reserve-iova {0:?} is not START:SIZE (e.g. 0x8000000:0x100000)")]
    BadSpec(String),
    #[error("--reserve-iova {0:?}: size 0 or start + size overflows")]
    BadRange(String),
}

fn num(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses --reserve-iova START:SIZE (hex with 0x, or decimal).
pub fn parse_reserve(spec: &str) -> Result<DoorbellWindow, WindowError> {
    let (a, b) = spec
        .split_once(':')
        .ok_or_else(|| WindowError::BadSpec(spec.into()))?;
    let (start, size) = (
        num(a).ok_or_else(|| WindowError::BadSpec(spec.into()))?,
        num(b).ok_or_else(|| WindowError::BadSpec(spec.into()))?,
    );
    if size == 0 || start.checked_add(size - 1).is_none() {
        return Err(WindowError::BadRange(spec.into()));
    }
    Ok(DoorbellWindow {
        start,
        end: start + size - 1,
        source: WindowSource::User,
        kind: "user".into(),
    })
}

/// Parses /sys/kernel/iommu_groups/N/reserved_regions ("start end type").
pub fn parse_reserved_regions(text: &str) -> Vec<DoorbellWindow> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (start, end, kind) = (num(w.next()?)?, num(w.next()?)?, w.next()?.to_string());
            let source = if kind == "msi" {
                WindowSource::HostMsi
            } else {
                WindowSource::HostReserved
            };
            Some(DoorbellWindow {
                start,
                end,
                source,
                kind,
            })
        })
        .collect()
}

pub fn read_reserved_regions(group: &str) -> Vec<DoorbellWindow> {
    let p = Path::new("/sys/kernel/iommu_groups")
        .join(group)
        .join("reserved_regions");
    std::fs::read_to_string(p)
        .map(|t| parse_reserved_regions(&t))
        .unwrap_or_default()
}

/// Usable IOVA ranges: `host` (or the whole 64-bit space) minus every window.
pub fn usable_ranges(host: Option<&[IovaRange]>, windows: &[DoorbellWindow]) -> Vec<IovaRange> {
    let mut ranges: Vec<IovaRange> = host.map(|h| h.to_vec()).unwrap_or(vec![IovaRange {
        start: 0,
        end: u64::MAX,
    }]);
    for w in windows {
        ranges = ranges
            .into_iter()
            .flat_map(|r| {
                let mut out = Vec::new();
                if w.end < r.start || w.start > r.end {
                    out.push(r);
                } else {
                    if w.start > r.start {
                        out.push(IovaRange {
                            start: r.start,
                            end: w.start - 1,
                        });
                    }
                    if w.end < r.end {
                        out.push(IovaRange {
                            start: w.end + 1,
                            end: r.end,
                        });
                    }
                }
                out
            })
            .collect();
    }
    ranges.sort_by_key(|r| r.start);
    ranges
}

/// The holes between usable ranges, as host-reserved windows.
pub fn holes(usable: &[IovaRange]) -> Vec<DoorbellWindow> {
    let mut sorted = usable.to_vec();
    sorted.sort_by_key(|r| r.start);
    let mut out = Vec::new();
    let mut at = 0u64;
    let mut open = true;
    for r in &sorted {
        if open && r.start > at {
            out.push(DoorbellWindow {
                start: at,
                end: r.start - 1,
                source: WindowSource::HostReserved,
                kind: "outside VFIO's usable IOVA ranges".into(),
            });
        }
        match r.end.checked_add(1) {
            Some(n) => at = n,
            None => open = false,
        }
    }
    if open && !sorted.is_empty() {
        out.push(DoorbellWindow {
            start: at,
            end: u64::MAX,
            source: WindowSource::HostReserved,
            kind: "outside VFIO's usable IOVA ranges".into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_regions_text_becomes_windows_with_their_source() {
        let w = parse_reserved_regions("0x0000000008000000 0x00000000080fffff msi\n0x00000000fee00000 0x00000000feefffff reserved\n");
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[0].start, w[0].end, w[0].source),
            (0x800_0000, 0x80f_ffff, WindowSource::HostMsi)
        );
        assert_eq!(w[1].source, WindowSource::HostReserved);
    }

    #[test]
    fn reserve_iova_parses_hex_and_decimal_and_refuses_nonsense() {
        let w = parse_reserve("0x8000000:0x100000").unwrap();
        assert_eq!(
            (w.start, w.end, w.source),
            (0x800_0000, 0x80f_ffff, WindowSource::User)
        );
        assert_eq!(parse_reserve("4096:4096").unwrap().end, 8191);
        assert!(parse_reserve("0x1000").is_err());
        assert!(parse_reserve("0x1000:0").is_err());
        assert!(parse_reserve("0xffffffffffffffff:2").is_err());
    }

    #[test]
    fn overlap_is_inclusive_at_both_ends() {
        let w = parse_reserve("0x8000000:0x100000").unwrap();
        assert!(w.overlaps(0x7fff000, 0x1000 + 1));
        assert!(!w.overlaps(0x7fff000, 0x1000));
        assert!(w.overlaps(0x80ff000, 0x1000));
        assert!(!w.overlaps(0x8100000, 0x1000));
    }

    #[test]
    fn usable_ranges_cut_every_window_out() {
        let wins = [
            parse_reserve("0x8000000:0x100000").unwrap(),
            parse_reserve("0xfee00000:0x100000").unwrap(),
        ];
        let u = usable_ranges(None, &wins);
        assert_eq!(
            u,
            vec![
                IovaRange {
                    start: 0,
                    end: 0x7ff_ffff
                },
                IovaRange {
                    start: 0x810_0000,
                    end: 0xfedf_ffff
                },
                IovaRange {
                    start: 0xfef0_0000,
                    end: u64::MAX
                },
            ]
        );
        let host = [IovaRange {
            start: 0,
            end: (1 << 48) - 1,
        }];
        assert_eq!(
            usable_ranges(Some(&host), &wins).last().unwrap().end,
            (1 << 48) - 1
        );
        let h = holes(&host);
        assert_eq!((h[0].start, h[0].end), (1 << 48, u64::MAX));
    }
}
