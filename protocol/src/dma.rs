//! DMA_MAP / DMA_UNMAP (client -> server) and DMA_READ / DMA_WRITE
//! (server -> client).

use crate::error::ProtocolError;
use crate::wire::{Reader, Writer};

pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// VFIO's "unmap everything"; QEMU sends it with iova = size = 0.
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

pub const DMA_MAP_SIZE: usize = 32;
pub const DMA_UNMAP_SIZE: usize = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    /// Offset into the file descriptor sent with the message.
    pub offset: u64,
    pub iova: u64,
    pub size: u64,
}

impl DmaMap {
    pub fn decode(payload: &[u8]) -> Result<DmaMap, ProtocolError> {
        let mut r = Reader::new(payload, "DMA_MAP");
        let m = DmaMap {
            argsz: r.u32()?,
            flags: r.u32()?,
            offset: r.u64()?,
            iova: r.u64()?,
            size: r.u64()?,
        };
        if m.argsz as usize != DMA_MAP_SIZE || payload.len() != DMA_MAP_SIZE {
            return Err(ProtocolError::BadArgsz {
                what: "DMA_MAP",
                argsz: m.argsz,
                need: DMA_MAP_SIZE,
            });
        }
        check_map(&m, "DMA_MAP")?;
        Ok(m)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(DMA_MAP_SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u64(self.offset)
            .u64(self.iova)
            .u64(self.size);
        w.into_vec()
    }
}

/// What every map must be, alone or in a DMA_MAP_MULTI: kernel VFIO
/// refuses a map that grants neither read nor write, and no end may wrap.
pub(crate) fn check_map(m: &DmaMap, what: &'static str) -> Result<(), ProtocolError> {
    let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
    if m.flags & !rw != 0 || m.flags & rw == 0 {
        return Err(ProtocolError::BadFlags {
            what,
            flags: m.flags,
        });
    }
    if m.iova.checked_add(m.size).is_none() || m.offset.checked_add(m.size).is_none() {
        return Err(ProtocolError::Overflow {
            what,
            fields: "address + size or offset + size",
        });
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

impl DmaUnmap {
    pub fn decode(payload: &[u8]) -> Result<DmaUnmap, ProtocolError> {
        let mut r = Reader::new(payload, "DMA_UNMAP");
        let m = DmaUnmap {
            argsz: r.u32()?,
            flags: r.u32()?,
            iova: r.u64()?,
            size: r.u64()?,
        };
        if (m.argsz as usize) < DMA_UNMAP_SIZE || payload.len() != DMA_UNMAP_SIZE {
            return Err(ProtocolError::BadArgsz {
                what: "DMA_UNMAP",
                argsz: m.argsz,
                need: DMA_UNMAP_SIZE,
            });
        }
        // Dirty-page bitmaps belong to migration, which airlock does not offer.
        if m.flags & !DMA_UNMAP_FLAG_ALL != 0 {
            return Err(ProtocolError::BadFlags {
                what: "DMA_UNMAP",
                flags: m.flags,
            });
        }
        if m.iova.checked_add(m.size).is_none() {
            return Err(ProtocolError::Overflow {
                what: "DMA_UNMAP",
                fields: "address + size",
            });
        }
        Ok(m)
    }

    pub fn encode(&self) -> Vec<u8> {
        self.encode_fixed().to_vec()
    }

    /// The reply echo without allocating.
    pub fn encode_fixed(&self) -> [u8; DMA_UNMAP_SIZE] {
        let mut out = [0u8; DMA_UNMAP_SIZE];
        out[0..4].copy_from_slice(&self.argsz.to_ne_bytes());
        out[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        out[8..16].copy_from_slice(&self.iova.to_ne_bytes());
        out[16..24].copy_from_slice(&self.size.to_ne_bytes());
        out
    }
}

/// DMA_READ / DMA_WRITE body in the layout QEMU's client implements
/// (hw/vfio-user/protocol.h `VFIOUserDMARW`): address u64, count u32, data
/// from payload offset 12, and 4 bytes of struct padding at the end. The spec
/// text lists count as u64 with data at 16; QEMU is the client that exists,
/// so airlock speaks its layout (the two agree on every field but the data
/// offset).
pub const DMA_RW_FIXED: usize = 12;
pub const DMA_RW_PAD: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaAccess {
    pub iova: u64,
    pub count: u32,
}

impl DmaAccess {
    /// DMA_READ request: no data, padded to QEMU's minimum of 16 bytes.
    pub fn encode_read_request(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(DMA_RW_FIXED + DMA_RW_PAD);
        w.u64(self.iova).u32(self.count).u32(0);
        w.into_vec()
    }

    /// DMA_WRITE request: the data, then the padding QEMU counts in its size check.
    pub fn encode_write_request(&self, data: &[u8]) -> Vec<u8> {
        let mut w = Writer::with_capacity(DMA_RW_FIXED + data.len() + DMA_RW_PAD);
        w.u64(self.iova)
            .u32(self.count)
            .bytes(data)
            .bytes(&[0; DMA_RW_PAD]);
        w.into_vec()
    }

    /// Decodes the fixed part and returns the data that follows it, checked
    /// against `count` (trailing padding is allowed).
    pub fn decode<'a>(
        payload: &'a [u8],
        what: &'static str,
    ) -> Result<(DmaAccess, &'a [u8]), ProtocolError> {
        let mut r = Reader::new(payload, what);
        let a = DmaAccess {
            iova: r.u64()?,
            count: r.u32()?,
        };
        let rest = r.rest();
        Ok((a, rest))
    }

    /// The data of a DMA_READ reply or DMA_WRITE request: exactly `count`
    /// bytes, or `count` plus QEMU's 4 bytes of zero padding (its
    /// sizeof(VFIOUserDMARW)). Anything else is an error, never data: a
    /// reply in the spec text's layout (count u64, data at 16) has the same
    /// size as QEMU's, and its non-zero tail tells it apart (see README,
    /// spec conformance).
    pub fn data<'a>(&self, rest: &'a [u8], what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = self.count as usize;
        let exact = rest.len() == n;
        let padded = rest.len() == n + DMA_RW_PAD && rest[n..].iter().all(|b| *b == 0);
        if !(exact || padded) {
            return Err(ProtocolError::DataMismatch {
                what,
                count: self.count as u64,
                got: rest.len(),
            });
        }
        Ok(&rest[..n])
    }

    /// DMA_READ reply: fixed part, data, padding (what QEMU sends back).
    pub fn encode_read_reply(&self, data: &[u8]) -> Vec<u8> {
        self.encode_write_request(data)
    }
}
