//! The 16-byte header every vfio-user message starts with.

use crate::error::ProtocolError;
use crate::wire::Reader;

pub const HEADER_SIZE: usize = 16;

pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const FLAG_TYPE_COMMAND: u32 = 0x0;
pub const FLAG_TYPE_REPLY: u32 = 0x1;
pub const FLAG_NO_REPLY: u32 = 0x10;
pub const FLAG_ERROR: u32 = 0x20;

/// vfio-user command numbers (docs/interop/vfio-user.rst, "Commands").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    DeviceGetRegionIoFds = 6,
    DeviceGetIrqInfo = 7,
    DeviceSetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
    DirtyPages = 14,
    RegionWriteMulti = 15,
    DeviceFeature = 16,
    MigDataRead = 17,
    MigDataWrite = 18,
    /// airlock's proposal (protocol dma_multi.rs), not in the spec.
    DmaMapMulti = 19,
    DmaUnmapMulti = 20,
}

impl Command {
    pub fn from_u16(v: u16) -> Option<Command> {
        use Command::*;
        Some(match v {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => DirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            19 => DmaMapMulti,
            20 => DmaUnmapMulti,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    /// Raw command number: kept raw so an unknown command can still be
    /// answered with its own number echoed.
    pub cmd: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn command(id: u16, cmd: Command, payload_len: usize, no_reply: bool) -> Header {
        Header {
            id,
            cmd: cmd as u16,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: FLAG_TYPE_COMMAND | if no_reply { FLAG_NO_REPLY } else { 0 },
            error: 0,
        }
    }

    /// The reply header for this request.
    pub fn reply(&self, payload_len: usize) -> Header {
        Header {
            id: self.id,
            cmd: self.cmd,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: FLAG_TYPE_REPLY,
            error: 0,
        }
    }

    /// An error reply for this request: header only, with the errno.
    pub fn error_reply(&self, errno: i32) -> Header {
        Header {
            id: self.id,
            cmd: self.cmd,
            size: HEADER_SIZE as u32,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error: errno as u32,
        }
    }

    pub fn kind(&self) -> u32 {
        self.flags & FLAG_TYPE_MASK
    }
    pub fn is_reply(&self) -> bool {
        self.kind() == FLAG_TYPE_REPLY
    }
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
    pub fn payload_len(&self) -> usize {
        (self.size as usize).saturating_sub(HEADER_SIZE)
    }

    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        let mut r = Reader::new(b, "header");
        // The buffer is exactly HEADER_SIZE bytes, so none of these can fail.
        Header {
            id: r.u16().unwrap_or(0),
            cmd: r.u16().unwrap_or(0),
            size: r.u32().unwrap_or(0),
            flags: r.u32().unwrap_or(0),
            error: r.u32().unwrap_or(0),
        }
    }

    /// Sent with every message: built in place, no allocation.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..2].copy_from_slice(&self.id.to_ne_bytes());
        out[2..4].copy_from_slice(&self.cmd.to_ne_bytes());
        out[4..8].copy_from_slice(&self.size.to_ne_bytes());
        out[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        out[12..16].copy_from_slice(&self.error.to_ne_bytes());
        out
    }

    /// Checks that the header can be framed at all under `max_size`.
    pub fn check_size(&self, max_size: usize) -> Result<(), ProtocolError> {
        if (self.size as usize) < HEADER_SIZE {
            return Err(ProtocolError::SizeBelowHeader(self.size));
        }
        if self.size as usize > max_size {
            return Err(ProtocolError::TooLarge {
                size: self.size,
                max: max_size,
            });
        }
        Ok(())
    }
}
