//! REGION_READ / REGION_WRITE and REGION_WRITE_MULTI.

use crate::error::ProtocolError;
use crate::wire::{Reader, Writer};

pub const REGION_ACCESS_SIZE: usize = 16;
/// QEMU's limits for one coalesced write message (hw/vfio-user/protocol.h).
pub const WRITE_MULTI_MAX: u64 = 200;
pub const WRITE_MULTI_DATA: usize = 8;
const WRITE_ONE_SIZE: usize = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

impl RegionAccess {
    /// Decodes the fixed part and returns the bytes after it.
    pub fn decode<'a>(
        payload: &'a [u8],
        what: &'static str,
        max_xfer: u64,
    ) -> Result<(RegionAccess, &'a [u8]), ProtocolError> {
        let mut r = Reader::new(payload, what);
        let a = RegionAccess {
            offset: r.u64()?,
            region: r.u32()?,
            count: r.u32()?,
        };
        if a.count as u64 > max_xfer {
            return Err(ProtocolError::CountTooLarge {
                count: a.count as u64,
                max: max_xfer,
            });
        }
        if a.offset.checked_add(a.count as u64).is_none() {
            return Err(ProtocolError::Overflow {
                what,
                fields: "offset + count",
            });
        }
        Ok((a, r.rest()))
    }

    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut w = Writer::with_capacity(REGION_ACCESS_SIZE + data.len());
        w.u64(self.offset)
            .u32(self.region)
            .u32(self.count)
            .bytes(data);
        w.into_vec()
    }

    /// The fixed part alone, for building a reply around borrowed data.
    pub fn encode_fixed(&self) -> [u8; REGION_ACCESS_SIZE] {
        let mut out = [0u8; REGION_ACCESS_SIZE];
        out[..8].copy_from_slice(&self.offset.to_ne_bytes());
        out[8..12].copy_from_slice(&self.region.to_ne_bytes());
        out[12..].copy_from_slice(&self.count.to_ne_bytes());
        out
    }
}

/// One write inside a REGION_WRITE_MULTI message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOne {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
    pub data: [u8; WRITE_MULTI_DATA],
}

impl WriteOne {
    pub fn bytes(&self) -> &[u8] {
        &self.data[..(self.count as usize).min(WRITE_MULTI_DATA)]
    }
}

pub fn decode_write_multi(payload: &[u8]) -> Result<Vec<WriteOne>, ProtocolError> {
    const WHAT: &str = "REGION_WRITE_MULTI";
    let mut r = Reader::new(payload, WHAT);
    let n = r.u64()?;
    if n > WRITE_MULTI_MAX || r.remaining() != n as usize * WRITE_ONE_SIZE {
        return Err(ProtocolError::DataMismatch {
            what: WHAT,
            count: n,
            got: r.remaining(),
        });
    }
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let offset = r.u64()?;
        let region = r.u32()?;
        let count = r.u32()?;
        let mut data = [0u8; WRITE_MULTI_DATA];
        data.copy_from_slice(r.bytes(WRITE_MULTI_DATA)?);
        if count as usize > WRITE_MULTI_DATA || count == 0 {
            return Err(ProtocolError::DataMismatch {
                what: WHAT,
                count: count as u64,
                got: WRITE_MULTI_DATA,
            });
        }
        if offset.checked_add(count as u64).is_none() {
            return Err(ProtocolError::Overflow {
                what: WHAT,
                fields: "offset + count",
            });
        }
        out.push(WriteOne {
            offset,
            region,
            count,
            data,
        });
    }
    Ok(out)
}

pub fn encode_write_multi(writes: &[WriteOne]) -> Vec<u8> {
    let mut w = Writer::with_capacity(8 + writes.len() * WRITE_ONE_SIZE);
    w.u64(writes.len() as u64);
    for one in writes {
        w.u64(one.offset)
            .u32(one.region)
            .u32(one.count)
            .bytes(&one.data);
    }
    w.into_vec()
}
