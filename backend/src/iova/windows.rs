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

use thiserror::Error;

use super::{gaps, subtract, IovaRange};

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

/// An IOVA window DMA must stay out of, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoorbellWindow {
    pub range: IovaRange,
    pub source: WindowSource,
    /// The kernel's type word ("msi", "reserved", "direct", ...) or "user".
    pub kind: String,
}

impl fmt::Display for DoorbellWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.range, self.source, self.kind)
    }
}

impl DoorbellWindow {
    pub fn overlaps(&self, r: &IovaRange) -> bool {
        self.range.overlaps(r)
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
    let range =
        IovaRange::from_span(start, size).ok_or_else(|| WindowError::BadRange(spec.into()))?;
    Ok(DoorbellWindow {
        range,
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
                range: IovaRange::new(start, end)?,
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
    let cuts: Vec<IovaRange> = windows.iter().map(|w| w.range).collect();
    subtract(host.unwrap_or(&[IovaRange::ALL]), &cuts)
}

/// The holes around VFIO's usable ranges, as host-reserved windows.
pub fn holes(usable: &[IovaRange]) -> Vec<DoorbellWindow> {
    gaps(usable)
        .into_iter()
        .map(|range| DoorbellWindow {
            range,
            source: WindowSource::HostReserved,
            kind: "outside VFIO's usable IOVA ranges".into(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u64, last: u64) -> IovaRange {
        IovaRange::new(first, last).unwrap()
    }

    #[test]
    fn reserved_regions_text_becomes_windows_with_their_source() {
        let w = parse_reserved_regions("0x0000000008000000 0x00000000080fffff msi\n0x00000000fee00000 0x00000000feefffff reserved\n");
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[0].range, w[0].source),
            (r(0x800_0000, 0x80f_ffff), WindowSource::HostMsi)
        );
        assert_eq!(w[1].source, WindowSource::HostReserved);
    }

    #[test]
    fn reserve_iova_parses_hex_and_decimal_and_refuses_nonsense() {
        let w = parse_reserve("0x8000000:0x100000").unwrap();
        assert_eq!(
            (w.range, w.source),
            (r(0x800_0000, 0x80f_ffff), WindowSource::User)
        );
        assert_eq!(parse_reserve("4096:4096").unwrap().range.last(), 8191);
        assert!(parse_reserve("0x1000").is_err());
        assert!(parse_reserve("0x1000:0").is_err());
        assert!(parse_reserve("0xffffffffffffffff:2").is_err());
    }

    #[test]
    fn overlap_is_inclusive_at_both_ends() {
        let w = parse_reserve("0x8000000:0x100000").unwrap();
        let span = |iova, size| IovaRange::from_span(iova, size).unwrap();
        assert!(w.overlaps(&span(0x7fff000, 0x1000 + 1)));
        assert!(!w.overlaps(&span(0x7fff000, 0x1000)));
        assert!(w.overlaps(&span(0x80ff000, 0x1000)));
        assert!(!w.overlaps(&span(0x8100000, 0x1000)));
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
                r(0, 0x7ff_ffff),
                r(0x810_0000, 0xfedf_ffff),
                r(0xfef0_0000, u64::MAX)
            ]
        );
        let host = [r(0, (1 << 48) - 1)];
        assert_eq!(
            usable_ranges(Some(&host), &wins).last().unwrap().last(),
            (1 << 48) - 1
        );
        let h = holes(&host);
        assert_eq!(h[0].range, r(1 << 48, u64::MAX));
    }
}
