//! The IOVA windows a passed-through device's DMA must avoid, as the host
//! reports them for its IOMMU group and container.

use std::os::fd::BorrowedFd;

use super::ioctl;
use crate::iova::{self, DoorbellWindow, IovaRange};

/// The windows DMA must avoid (reserved regions of the IOMMU group and
/// holes between the usable ranges) and the usable ranges themselves.
pub(super) fn iova_windows(
    container: BorrowedFd<'_>,
    group: &str,
) -> (Vec<DoorbellWindow>, Option<Vec<IovaRange>>) {
    let usable = ioctl::iommu_iova_ranges(container).unwrap_or(None);
    let mut windows = iova::read_reserved_regions(group);
    for h in usable.iter().flat_map(|u| iova::holes(u)) {
        if !windows.iter().any(|w| w.range == h.range) {
            windows.push(h);
        }
    }
    (windows, usable)
}
