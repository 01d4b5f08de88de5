//! DEVICE_GET_INFO, DEVICE_GET_REGION_INFO (with its capability chain),
//! DEVICE_GET_REGION_IO_FDS and DEVICE_GET_IRQ_INFO.

use crate::error::ProtocolError;
use crate::wire::{Reader, Writer};

pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;

pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
pub const REGION_INFO_CAP_TYPE: u16 = 2;
pub const REGION_INFO_CAP_MSIX_MAPPABLE: u16 = 3;

pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// VFIO PCI region and IRQ indexes (linux/vfio.h).
pub const PCI_BAR0_REGION_INDEX: u32 = 0;
pub const PCI_ROM_REGION_INDEX: u32 = 6;
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const PCI_VGA_REGION_INDEX: u32 = 8;
pub const PCI_NUM_REGIONS: u32 = 9;
pub const PCI_INTX_IRQ_INDEX: u32 = 0;
pub const PCI_MSI_IRQ_INDEX: u32 = 1;
pub const PCI_MSIX_IRQ_INDEX: u32 = 2;
pub const PCI_ERR_IRQ_INDEX: u32 = 3;
pub const PCI_REQ_IRQ_INDEX: u32 = 4;
pub const PCI_NUM_IRQS: u32 = 5;

/// The shared 16-byte shape of GET_INFO, GET_IRQ_INFO and GET_REGION_IO_FDS.
fn decode4(payload: &[u8], what: &'static str) -> Result<[u32; 4], ProtocolError> {
    let mut r = Reader::new(payload, what);
    let v = [r.u32()?, r.u32()?, r.u32()?, r.u32()?];
    if payload.len() != 16 {
        return Err(ProtocolError::BadArgsz {
            what,
            argsz: v[0],
            need: 16,
        });
    }
    Ok(v)
}

fn encode4(v: [u32; 4]) -> Vec<u8> {
    let mut w = Writer::with_capacity(16);
    for x in v {
        w.u32(x);
    }
    w.into_vec()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

impl DeviceInfo {
    pub const SIZE: usize = 16;
    pub fn decode(payload: &[u8]) -> Result<DeviceInfo, ProtocolError> {
        let [argsz, flags, num_regions, num_irqs] = decode4(payload, "DEVICE_GET_INFO")?;
        Ok(DeviceInfo {
            argsz,
            flags,
            num_regions,
            num_irqs,
        })
    }
    pub fn encode(&self) -> Vec<u8> {
        encode4([self.argsz, self.flags, self.num_regions, self.num_irqs])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

impl IrqInfo {
    pub const SIZE: usize = 16;
    pub fn decode(payload: &[u8]) -> Result<IrqInfo, ProtocolError> {
        let [argsz, flags, index, count] = decode4(payload, "DEVICE_GET_IRQ_INFO")?;
        Ok(IrqInfo {
            argsz,
            flags,
            index,
            count,
        })
    }
    pub fn encode(&self) -> Vec<u8> {
        encode4([self.argsz, self.flags, self.index, self.count])
    }
}

/// DEVICE_GET_REGION_IO_FDS request and the fixed part of its reply. airlock
/// offers no ioeventfds yet, so replies carry `count` 0 and no sub-regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RegionIoFds {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

impl RegionIoFds {
    pub const SIZE: usize = 16;
    pub fn decode(payload: &[u8]) -> Result<RegionIoFds, ProtocolError> {
        let [argsz, flags, index, count] = decode4(payload, "DEVICE_GET_REGION_IO_FDS")?;
        Ok(RegionIoFds {
            argsz,
            flags,
            index,
            count,
        })
    }
    pub fn encode(&self) -> Vec<u8> {
        encode4([self.argsz, self.flags, self.index, self.count])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseArea {
    pub offset: u64,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionCap {
    SparseMmap(Vec<SparseArea>),
    Type { kind: u32, subtype: u32 },
    MsixMappable,
}

impl RegionCap {
    fn id(&self) -> u16 {
        match self {
            RegionCap::SparseMmap(_) => REGION_INFO_CAP_SPARSE_MMAP,
            RegionCap::Type { .. } => REGION_INFO_CAP_TYPE,
            RegionCap::MsixMappable => REGION_INFO_CAP_MSIX_MAPPABLE,
        }
    }

    fn body(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            RegionCap::SparseMmap(areas) => {
                w.u32(areas.len() as u32).u32(0);
                for a in areas {
                    w.u64(a.offset).u64(a.size);
                }
            }
            RegionCap::Type { kind, subtype } => {
                w.u32(*kind).u32(*subtype);
            }
            RegionCap::MsixMappable => {}
        }
        w.into_vec()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
    pub caps: Vec<RegionCap>,
}

/// Longest capability chain a decoder follows (defends against loops).
const MAX_CAPS: usize = 16;

impl RegionInfo {
    pub const SIZE: usize = 32;

    /// Decodes a request (only the fixed part is meaningful).
    pub fn decode_request(payload: &[u8]) -> Result<RegionInfo, ProtocolError> {
        let mut r = Reader::new(payload, "DEVICE_GET_REGION_INFO");
        let info = RegionInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            cap_offset: r.u32()?,
            size: r.u64()?,
            offset: r.u64()?,
            caps: Vec::new(),
        };
        if payload.len() != Self::SIZE || (info.argsz as usize) < Self::SIZE {
            return Err(ProtocolError::BadArgsz {
                what: "DEVICE_GET_REGION_INFO",
                argsz: info.argsz,
                need: Self::SIZE,
            });
        }
        Ok(info)
    }

    /// Encodes a request: only argsz (the reply room offered) and index matter.
    pub fn encode_request(argsz: u32, index: u32) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(argsz).u32(0).u32(index).u32(0).u64(0).u64(0);
        w.into_vec()
    }

    /// Size of the full reply payload with every capability.
    pub fn full_size(&self) -> usize {
        Self::SIZE + self.caps.iter().map(|c| 8 + c.body().len()).sum::<usize>()
    }

    /// Encodes a reply that fits in `max` bytes (the client's argsz). When
    /// the capabilities do not fit, the reply carries only the fixed part
    /// with argsz set to the size needed, as VFIO does, so the client asks
    /// again with a bigger buffer.
    pub fn encode_reply(&self, max: u32) -> Vec<u8> {
        let full = self.full_size();
        let with_caps = !self.caps.is_empty() && full <= max as usize;
        let mut flags = self.flags;
        if !self.caps.is_empty() {
            flags |= REGION_INFO_FLAG_CAPS;
        }
        let mut w = Writer::with_capacity(full);
        w.u32(full as u32)
            .u32(flags)
            .u32(self.index)
            // With capabilities that did not fit, VFIO leaves cap_offset 0,
            // but QEMU's vfio-user client rejects CAPS with an offset below
            // 32 before it asks again; 32 is where the chain will start.
            .u32(if self.caps.is_empty() {
                0
            } else {
                Self::SIZE as u32
            })
            .u64(self.size)
            .u64(self.offset);
        if with_caps {
            let mut at = Self::SIZE;
            for (i, cap) in self.caps.iter().enumerate() {
                let body = cap.body();
                let next = if i + 1 == self.caps.len() {
                    0
                } else {
                    at + 8 + body.len()
                };
                w.u16(cap.id()).u16(1).u32(next as u32).bytes(&body);
                at += 8 + body.len();
            }
        }
        w.into_vec()
    }

    /// Decodes a reply, following the capability chain with bounds checks.
    pub fn decode_reply(payload: &[u8]) -> Result<RegionInfo, ProtocolError> {
        let mut r = Reader::new(payload, "region info reply");
        let mut info = RegionInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            cap_offset: r.u32()?,
            size: r.u64()?,
            offset: r.u64()?,
            caps: Vec::new(),
        };
        // A reply shorter than its argsz left the capabilities out.
        let mut at = if info.argsz as usize > payload.len() {
            0
        } else {
            info.cap_offset as usize
        };
        while at != 0 && info.caps.len() < MAX_CAPS {
            if at < Self::SIZE {
                return Err(ProtocolError::BadReply {
                    id: 0,
                    why: "capability offset points into the fixed region info",
                });
            }
            let mut c = Reader::new(payload.get(at..).unwrap_or(&[]), "region capability");
            let id = c.u16()?;
            let _version = c.u16()?;
            let next = c.u32()? as usize;
            let cap = match id {
                REGION_INFO_CAP_SPARSE_MMAP => {
                    let n = c.u32()? as usize;
                    let _ = c.u32()?;
                    if n > c.remaining() / 16 {
                        return Err(ProtocolError::BadReply {
                            id: 0,
                            why: "sparse mmap area count exceeds the reply",
                        });
                    }
                    let mut areas = Vec::with_capacity(n);
                    for _ in 0..n {
                        areas.push(SparseArea {
                            offset: c.u64()?,
                            size: c.u64()?,
                        });
                    }
                    Some(RegionCap::SparseMmap(areas))
                }
                REGION_INFO_CAP_TYPE => Some(RegionCap::Type {
                    kind: c.u32()?,
                    subtype: c.u32()?,
                }),
                REGION_INFO_CAP_MSIX_MAPPABLE => Some(RegionCap::MsixMappable),
                _ => None,
            };
            info.caps.extend(cap);
            if next != 0 && next <= at {
                return Err(ProtocolError::BadReply {
                    id: 0,
                    why: "capability chain goes backwards",
                });
            }
            at = next;
        }
        Ok(info)
    }
}
