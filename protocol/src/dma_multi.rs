//! DMA_MAP_MULTI / DMA_UNMAP_MULTI: several DMA maps, or unmaps, in one
//! message (an airlock proposal, specified in qemu-patches/0021; only for
//! a client that proposed the `dma_multiple` capability).
//!
//! One message per map costs a client and a server a send, a receive and
//! a wake-up each, and the map's fd ends the receiver's read. A client that
//! has many maps to make at once (a memory-listener transaction; a guest
//! IOMMU's batch of unmaps) sends them as one message, and the server then
//! issues its IOMMU calls back to back. The layout follows
//! REGION_WRITE_MULTI: a u64 count, then fixed-size entries. Each entry is
//! handled as its own DMA_MAP or DMA_UNMAP would be, so the reply is the
//! count and each entry's errno (0: done): a refused entry (QEMU's
//! fd-less map of another device's BAR, say) costs the others nothing,
//! as when they came one message each.

use crate::dma::{check_map, DmaMap, DMA_MAP_SIZE};
use crate::error::ProtocolError;
use crate::wire::{Reader, Writer};

/// Most entries in one message: 32 KiB of map entries, within every
/// message size limit airlock reads.
pub const DMA_MULTI_MAX: u64 = 1024;
pub const DMA_MAP_ENTRY_SIZE: usize = 32;
pub const DMA_UNMAP_ENTRY_SIZE: usize = 24;
/// `fd_index` of a map without a file descriptor (reached with
/// DMA_READ/DMA_WRITE, as a DMA_MAP without fd).
pub const DMA_MULTI_NO_FD: u32 = u32::MAX;

const MAP: &str = "DMA_MAP_MULTI";
const UNMAP: &str = "DMA_UNMAP_MULTI";

/// One map: DMA_MAP's fields, with the index of its fd among the
/// message's fds in place of argsz.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMapEntry {
    pub flags: u32,
    pub fd_index: u32,
    pub offset: u64,
    pub iova: u64,
    pub size: u64,
}

impl DmaMapEntry {
    /// The DMA_MAP this entry stands for (its fd is the message's).
    pub fn as_map(&self) -> DmaMap {
        DmaMap {
            argsz: DMA_MAP_SIZE as u32,
            flags: self.flags,
            offset: self.offset,
            iova: self.iova,
            size: self.size,
        }
    }
}

/// One unmap of one whole earlier map; no flags are defined (unmap-all and
/// dirty bitmaps stay with DMA_UNMAP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmapEntry {
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

/// The entry count, checked against the payload's length and the cap
/// before anything is allocated.
fn count(r: &mut Reader<'_>, what: &'static str, entry: usize) -> Result<usize, ProtocolError> {
    let n = r.u64()?;
    if n > DMA_MULTI_MAX || r.remaining() as u64 != n * entry as u64 {
        return Err(ProtocolError::DataMismatch {
            what,
            count: n,
            got: r.remaining(),
        });
    }
    Ok(n as usize)
}

/// Decodes a DMA_MAP_MULTI payload; `fds`: how many fds came with it. Every
/// fd must be named by some entry, so a client's stray fd is an error
/// rather than a silent close.
pub fn decode_map_multi(payload: &[u8], fds: usize) -> Result<Vec<DmaMapEntry>, ProtocolError> {
    let mut r = Reader::new(payload, MAP);
    let n = count(&mut r, MAP, DMA_MAP_ENTRY_SIZE)?;
    let mut out = Vec::with_capacity(n);
    let mut used = 0u32;
    for _ in 0..n {
        let e = DmaMapEntry {
            flags: r.u32()?,
            fd_index: r.u32()?,
            offset: r.u64()?,
            iova: r.u64()?,
            size: r.u64()?,
        };
        check_map(&e.as_map(), MAP)?;
        if e.fd_index != DMA_MULTI_NO_FD {
            if e.fd_index as usize >= fds {
                return Err(ProtocolError::FdCount {
                    what: MAP,
                    got: fds,
                    expected: "more than the largest fd_index",
                });
            }
            // fds is at most the socket's fd limit (16), far below 32.
            used |= 1u32.checked_shl(e.fd_index).unwrap_or(0);
        }
        out.push(e);
    }
    if fds > 32 || used.count_ones() as usize != fds {
        return Err(ProtocolError::FdCount {
            what: MAP,
            got: fds,
            expected: "exactly the fds its entries name",
        });
    }
    Ok(out)
}

pub fn encode_map_multi(entries: &[DmaMapEntry]) -> Vec<u8> {
    let mut w = Writer::with_capacity(8 + entries.len() * DMA_MAP_ENTRY_SIZE);
    w.u64(entries.len() as u64);
    for e in entries {
        w.u32(e.flags)
            .u32(e.fd_index)
            .u64(e.offset)
            .u64(e.iova)
            .u64(e.size);
    }
    w.into_vec()
}

pub fn decode_unmap_multi(payload: &[u8]) -> Result<Vec<DmaUnmapEntry>, ProtocolError> {
    let mut r = Reader::new(payload, UNMAP);
    let n = count(&mut r, UNMAP, DMA_UNMAP_ENTRY_SIZE)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let flags = r.u32()?;
        let _reserved = r.u32()?;
        let e = DmaUnmapEntry {
            flags,
            iova: r.u64()?,
            size: r.u64()?,
        };
        if e.flags != 0 {
            return Err(ProtocolError::BadFlags {
                what: UNMAP,
                flags: e.flags,
            });
        }
        if e.iova.checked_add(e.size).is_none() {
            return Err(ProtocolError::Overflow {
                what: UNMAP,
                fields: "address + size",
            });
        }
        out.push(e);
    }
    Ok(out)
}

pub fn encode_unmap_multi(entries: &[DmaUnmapEntry]) -> Vec<u8> {
    let mut w = Writer::with_capacity(8 + entries.len() * DMA_UNMAP_ENTRY_SIZE);
    w.u64(entries.len() as u64);
    for e in entries {
        w.u32(e.flags).u32(0).u64(e.iova).u64(e.size);
    }
    w.into_vec()
}

/// The reply of either: the count, then each entry's errno (0: done).
pub fn encode_multi_reply(errnos: &[u32]) -> Vec<u8> {
    let mut w = Writer::with_capacity(8 + 4 * errnos.len());
    w.u64(errnos.len() as u64);
    for e in errnos {
        w.u32(*e);
    }
    w.into_vec()
}

pub fn decode_multi_reply(payload: &[u8], what: &'static str) -> Result<Vec<u32>, ProtocolError> {
    let mut r = Reader::new(payload, what);
    let n = r.u64()?;
    if n > DMA_MULTI_MAX || r.remaining() as u64 != 4 * n {
        return Err(ProtocolError::DataMismatch {
            what,
            count: n,
            got: r.remaining(),
        });
    }
    // The length was checked: exactly n errnos follow the count. An
    // exact-size iterator, so the Vec is allocated once.
    Ok(r.rest()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};

    fn map(fd_index: u32) -> DmaMapEntry {
        DmaMapEntry {
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            fd_index,
            offset: 0x2000,
            iova: 0x10_0000,
            size: 0x1000,
        }
    }

    #[test]
    fn maps_round_trip_and_share_one_fd() {
        let entries = [map(0), map(0), map(DMA_MULTI_NO_FD)];
        let got = decode_map_multi(&encode_map_multi(&entries), 1).unwrap();
        assert_eq!(got, entries);
    }

    #[test]
    fn an_fd_no_entry_names_or_an_index_past_the_fds_is_refused() {
        let p = encode_map_multi(&[map(0)]);
        assert!(decode_map_multi(&p, 2).is_err(), "fd 1 is named by nobody");
        assert!(decode_map_multi(&p, 0).is_err(), "fd 0 was not sent");
        let none = encode_map_multi(&[map(DMA_MULTI_NO_FD)]);
        assert!(decode_map_multi(&none, 1).is_err());
        assert!(decode_map_multi(&none, 0).is_ok());
    }

    #[test]
    fn a_count_that_disagrees_with_the_payload_or_the_cap_is_refused() {
        let mut p = encode_map_multi(&[map(0), map(0)]);
        p[0] = 3;
        assert!(decode_map_multi(&p, 1).is_err());
        let mut big = vec![0u8; 8];
        big[..8].copy_from_slice(&(DMA_MULTI_MAX + 1).to_ne_bytes());
        assert!(decode_unmap_multi(&big).is_err());
        assert!(decode_unmap_multi(&[1, 2, 3]).is_err(), "truncated count");
    }

    #[test]
    fn replies_round_trip_and_a_short_one_is_refused() {
        let p = encode_multi_reply(&[0, 22, 0]);
        assert_eq!(decode_multi_reply(&p, "t").unwrap(), [0, 22, 0]);
        assert!(decode_multi_reply(&p[..p.len() - 1], "t").is_err());
    }

    #[test]
    fn bad_flags_and_overflows_are_refused_per_entry() {
        let mut m = map(0);
        m.flags = 0;
        assert!(decode_map_multi(&encode_map_multi(&[m]), 1).is_err());
        let mut m = map(0);
        m.size = u64::MAX;
        assert!(decode_map_multi(&encode_map_multi(&[m]), 1).is_err());
        let u = DmaUnmapEntry {
            flags: 2,
            iova: 0,
            size: 0x1000,
        };
        assert!(decode_unmap_multi(&encode_unmap_multi(&[u])).is_err());
        let ok = DmaUnmapEntry { flags: 0, ..u };
        assert_eq!(
            decode_unmap_multi(&encode_unmap_multi(&[ok])).unwrap(),
            [ok]
        );
    }
}
