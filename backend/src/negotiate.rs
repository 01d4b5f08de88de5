//! VERSION negotiation: what airlock answers to a client's proposal.
//!
//! Matches QEMU 11.1's client: the reply is 0.0; max_msg_fds and
//! max_data_xfer_size are always advertised (QEMU assumes 8 fds when the
//! key is missing, the spec says 1); other keys only when the client
//! proposed them and airlock honours them, because QEMU warns about keys it
//! did not propose.

use airlock_protocol::version::{Capabilities, Version, MAJOR, MINOR};
use airlock_protocol::ProtocolError;

use crate::iova::IovaRange;

use crate::dma::PAGE_SIZE;
use crate::iova::{usable_ranges, DoorbellWindow};

/// What airlock itself can take, and the IOVA windows it keeps clear.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub max_msg_fds: u32,
    pub max_data_xfer: u64,
    pub max_dma_maps: u64,
    /// --reserve-iova windows (the device adds its own host windows).
    pub windows: Vec<DoorbellWindow>,
    /// --poll-us: how long a session polls its socket for the next message
    /// before it sleeps in the read (zero: it never polls).
    pub poll: std::time::Duration,
}

/// The IOVA space the client may use, for the iova_ranges capability.
pub struct IovaSpace<'a> {
    pub host: Option<&'a [IovaRange]>,
    pub windows: &'a [DoorbellWindow],
}

/// What the client told us about itself (spec defaults when absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub max_msg_fds: u32,
    pub max_data_xfer: u64,
    pub max_dma_maps: u64,
    /// Proposed write_multiple (REGION_WRITE_MULTI is refused otherwise).
    pub write_multiple: bool,
    /// Proposed dma_multiple (DMA_MAP_MULTI / DMA_UNMAP_MULTI).
    pub dma_multiple: bool,
}

impl Default for Peer {
    fn default() -> Self {
        Peer {
            max_msg_fds: 1,
            max_data_xfer: 1 << 20,
            max_dma_maps: 65535,
            write_multiple: false,
            dma_multiple: false,
        }
    }
}

/// The most ranges an iova_ranges reply lists (docs/interop/vfio-user.rst,
/// qemu-patches/0009: QEMU's client takes at most 256).
pub const MAX_IOVA_RANGES: usize = 256;

/// The usable ranges for an iova_ranges proposal, as the spec wants them:
/// within the proposed ranges (if any), sorted, without overlaps, at least
/// one and at most MAX_IOVA_RANGES (the largest; leaving a small range out
/// only makes fewer IOVAs usable).
fn usable_for(
    proposed: &[airlock_protocol::version::IovaRange],
    space: &IovaSpace<'_>,
) -> Result<Vec<IovaRange>, ProtocolError> {
    let mut usable = usable_ranges(space.host, space.windows);
    if !proposed.is_empty() {
        // A proposed range that ends before it starts narrows nothing.
        let proposed: Vec<IovaRange> = proposed
            .iter()
            .filter_map(|p| IovaRange::try_from(*p).ok())
            .collect();
        let within: Vec<IovaRange> = usable
            .iter()
            .flat_map(|u| proposed.iter().filter_map(|p| u.intersection(p)))
            .collect();
        usable = crate::iova::union(&within);
    }
    if usable.is_empty() {
        return Err(ProtocolError::BadJson(
            "iova_ranges: none of the proposed IOVA ranges is usable (they lie inside the IOVA windows DMA must avoid)".into(),
        ));
    }
    if usable.len() > MAX_IOVA_RANGES {
        usable.sort_by_key(|r| std::cmp::Reverse(r.len()));
        usable.truncate(MAX_IOVA_RANGES);
        usable.sort();
    }
    Ok(usable)
}

pub fn negotiate(
    proposal: &Version,
    ours: &ServerLimits,
    space: &IovaSpace<'_>,
) -> Result<(Version, Peer), ProtocolError> {
    if proposal.major != MAJOR {
        return Err(ProtocolError::BadVersion {
            major: proposal.major,
            minor: proposal.minor,
        });
    }
    let theirs = proposal.capabilities.clone().unwrap_or_default();
    let mut peer = Peer::default();
    if let Some(n) = theirs.max_msg_fds {
        peer.max_msg_fds = n;
    }
    if let Some(n) = theirs.max_data_xfer_size {
        peer.max_data_xfer = n.max(1);
    }
    let mut reply = Capabilities {
        max_msg_fds: Some(ours.max_msg_fds),
        max_data_xfer_size: Some(ours.max_data_xfer),
        ..Default::default()
    };
    if let Some(p) = theirs.pgsizes {
        if p & PAGE_SIZE == 0 {
            return Err(ProtocolError::BadJson(format!(
                "pgsizes {p:#x} lacks the 4 KiB page airlock maps with"
            )));
        }
        reply.pgsizes = Some(PAGE_SIZE);
    }
    if let Some(m) = theirs.max_dma_maps {
        let m = m.min(ours.max_dma_maps);
        reply.max_dma_maps = Some(m);
        peer.max_dma_maps = m;
    } else {
        peer.max_dma_maps = ours.max_dma_maps;
    }
    if theirs.write_multiple == Some(true) {
        reply.write_multiple = Some(true);
        peer.write_multiple = true;
    }
    // airlock's own extension: answered only to a client that proposed it.
    if theirs.dma_multiple == Some(true) {
        reply.dma_multiple = Some(true);
        peer.dma_multiple = true;
    }
    // Only for a client that proposed it: stock QEMU warns about keys it
    // did not propose. A non-empty proposal narrows the answer further.
    if let Some(proposed) = &theirs.iova_ranges {
        reply.iova_ranges = Some(
            usable_for(proposed, space)?
                .into_iter()
                .map(Into::into)
                .collect(),
        );
    }
    Ok((
        Version {
            major: MAJOR,
            minor: MINOR,
            capabilities: Some(reply),
        },
        peer,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_protocol::version::IovaRange as Wire;

    fn r(first: u64, last: u64) -> IovaRange {
        IovaRange::new(first, last).unwrap()
    }

    fn wire(first: u64, last: u64) -> Wire {
        Wire {
            start: first,
            end: last,
        }
    }

    #[test]
    fn overlapping_proposals_get_sorted_ranges_without_overlaps() {
        let host = [r(0, 0xffff_ffff)];
        let space = IovaSpace {
            host: Some(&host),
            windows: &[],
        };
        let got = usable_for(&[wire(0x5000, 0x8fff), wire(0x1000, 0x5fff)], &space).unwrap();
        assert_eq!(got, [r(0x1000, 0x8fff)]);
    }

    #[test]
    fn a_proposal_with_nothing_usable_is_refused() {
        let host = [r(0x1000, 0x1fff)];
        let space = IovaSpace {
            host: Some(&host),
            windows: &[],
        };
        let e = usable_for(&[wire(0x8000, 0x8fff)], &space).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("none of the proposed"), "{e}");
    }

    #[test]
    fn at_most_256_ranges_are_listed_the_largest_kept_in_order() {
        // 300 usable ranges of growing size, split by one-page holes.
        let mut host = Vec::new();
        let mut at = 0u64;
        for i in 0..300u64 {
            host.push(r(at, at + (i + 1) * 0x1000 - 1));
            at += (i + 2) * 0x1000;
        }
        let space = IovaSpace {
            host: Some(&host),
            windows: &[],
        };
        let got = usable_for(&[], &space).unwrap();
        assert_eq!(got.len(), MAX_IOVA_RANGES);
        assert_eq!(got[0], host[300 - MAX_IOVA_RANGES], "the smallest left out");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "sorted");
    }
}
