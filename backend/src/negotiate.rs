//! VERSION negotiation: what airlock answers to a client's proposal.
//!
//! Matches QEMU 11.1's client: the reply is 0.0; max_msg_fds and
//! max_data_xfer_size are always advertised (QEMU assumes 8 fds when the
//! key is missing, the spec says 1); other keys only when the client
//! proposed them and airlock honours them, because QEMU warns about keys it
//! did not propose.

use airlock_protocol::version::{Capabilities, Version, MAJOR, MINOR};
use airlock_protocol::ProtocolError;

use crate::dma::PAGE_SIZE;

/// What airlock itself can take.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub max_msg_fds: u32,
    pub max_data_xfer: u64,
    pub max_dma_maps: u64,
}

/// What the client told us about itself (spec defaults when absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub max_msg_fds: u32,
    pub max_data_xfer: u64,
    pub max_dma_maps: u64,
}

impl Default for Peer {
    fn default() -> Self {
        Peer {
            max_msg_fds: 1,
            max_data_xfer: 1 << 20,
            max_dma_maps: 65535,
        }
    }
}

pub fn negotiate(
    proposal: &Version,
    ours: &ServerLimits,
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
