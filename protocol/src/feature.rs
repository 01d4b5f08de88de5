//! DEVICE_FEATURE (the vfio-user twin of VFIO_DEVICE_FEATURE).

use crate::error::ProtocolError;
use crate::wire::{Reader, Writer};

pub const FEATURE_MASK: u32 = 0xffff;
pub const FEATURE_GET: u32 = 1 << 16;
pub const FEATURE_SET: u32 = 1 << 17;
pub const FEATURE_PROBE: u32 = 1 << 18;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFeature {
    pub argsz: u32,
    pub flags: u32,
    pub data: Vec<u8>,
}

impl DeviceFeature {
    pub fn decode(payload: &[u8]) -> Result<DeviceFeature, ProtocolError> {
        let mut r = Reader::new(payload, "DEVICE_FEATURE");
        let argsz = r.u32()?;
        let flags = r.u32()?;
        if flags & !(FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE) != 0
            || (flags & FEATURE_GET != 0 && flags & FEATURE_SET != 0 && flags & FEATURE_PROBE == 0)
        {
            return Err(ProtocolError::BadFlags {
                what: "DEVICE_FEATURE",
                flags,
            });
        }
        Ok(DeviceFeature {
            argsz,
            flags,
            data: r.rest().to_vec(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(8 + self.data.len());
        w.u32(self.argsz).u32(self.flags).bytes(&self.data);
        w.into_vec()
    }
}
