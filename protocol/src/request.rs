//! A client command, decoded and validated (the server's view).

use std::os::fd::OwnedFd;

use crate::device::{DeviceInfo, IrqInfo, RegionInfo, RegionIoFds};
use crate::dma::{DmaMap, DmaUnmap};
use crate::dma_multi::{decode_map_multi, decode_unmap_multi, DmaMapEntry, DmaUnmapEntry};
use crate::error::ProtocolError;
use crate::feature::DeviceFeature;
use crate::header::{Command, Header, FLAG_TYPE_COMMAND, FLAG_TYPE_REPLY};
use crate::irqs::IrqSet;
use crate::limits::Limits;
use crate::region::{decode_write_multi, RegionAccess, WriteOne};
use crate::version::Version;

#[derive(Debug)]
pub enum Request<'a> {
    Version(Version),
    DmaMap {
        map: DmaMap,
        fd: Option<OwnedFd>,
    },
    DmaUnmap(DmaUnmap),
    /// Entries name their fd by index into `fds` (several may share one).
    DmaMapMulti {
        maps: Vec<DmaMapEntry>,
        fds: Vec<OwnedFd>,
    },
    DmaUnmapMulti(Vec<DmaUnmapEntry>),
    DeviceGetInfo(DeviceInfo),
    RegionInfo(RegionInfo),
    RegionIoFds(RegionIoFds),
    IrqInfo(IrqInfo),
    SetIrqs(IrqSet),
    RegionRead(RegionAccess),
    RegionWrite {
        access: RegionAccess,
        data: &'a [u8],
    },
    RegionWriteMulti(Vec<WriteOne>),
    DeviceReset,
    DeviceFeature(DeviceFeature),
    /// Commands airlock knows but does not offer (migration, dirty pages).
    Unsupported(Command),
}

fn no_fds(what: &'static str, fds: &[OwnedFd]) -> Result<(), ProtocolError> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::FdCount {
            what,
            got: fds.len(),
            expected: "none",
        })
    }
}

fn empty(what: &'static str, payload: &[u8]) -> Result<(), ProtocolError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::DataMismatch {
            what,
            count: 0,
            got: payload.len(),
        })
    }
}

impl<'a> Request<'a> {
    /// Decodes one client command. Fds not taken into the request are
    /// dropped (closed) here.
    pub fn decode(
        header: &Header,
        payload: &'a [u8],
        mut fds: Vec<OwnedFd>,
        limits: &Limits,
    ) -> Result<Request<'a>, ProtocolError> {
        match header.kind() {
            FLAG_TYPE_COMMAND => {}
            FLAG_TYPE_REPLY => return Err(ProtocolError::UnexpectedReply(header.id)),
            t => return Err(ProtocolError::BadType(t)),
        }
        let cmd = Command::from_u16(header.cmd).ok_or(ProtocolError::UnknownCommand(header.cmd))?;
        let name = command_name(cmd);
        if !matches!(
            cmd,
            Command::DmaMap | Command::DmaMapMulti | Command::DeviceSetIrqs
        ) {
            no_fds(name, &fds)?;
        }
        Ok(match cmd {
            Command::Version => Request::Version(Version::decode(payload)?),
            Command::DmaMap => {
                let map = DmaMap::decode(payload)?;
                if fds.len() > 1 {
                    return Err(ProtocolError::FdCount {
                        what: name,
                        got: fds.len(),
                        expected: "zero or one",
                    });
                }
                Request::DmaMap { map, fd: fds.pop() }
            }
            Command::DmaUnmap => Request::DmaUnmap(DmaUnmap::decode(payload)?),
            Command::DmaMapMulti => Request::DmaMapMulti {
                maps: decode_map_multi(payload, fds.len())?,
                fds,
            },
            Command::DmaUnmapMulti => Request::DmaUnmapMulti(decode_unmap_multi(payload)?),
            Command::DeviceGetInfo => {
                let info = DeviceInfo::decode(payload)?;
                check_argsz(name, info.argsz, DeviceInfo::SIZE)?;
                Request::DeviceGetInfo(info)
            }
            Command::DeviceGetRegionInfo => {
                Request::RegionInfo(RegionInfo::decode_request(payload)?)
            }
            Command::DeviceGetRegionIoFds => {
                let r = RegionIoFds::decode(payload)?;
                check_argsz(name, r.argsz, RegionIoFds::SIZE)?;
                Request::RegionIoFds(r)
            }
            Command::DeviceGetIrqInfo => {
                let i = IrqInfo::decode(payload)?;
                check_argsz(name, i.argsz, IrqInfo::SIZE)?;
                Request::IrqInfo(i)
            }
            Command::DeviceSetIrqs => Request::SetIrqs(IrqSet::decode(payload, fds)?),
            Command::RegionRead => {
                let (a, rest) = RegionAccess::decode(payload, name, limits.max_data_xfer)?;
                empty(name, rest)?;
                Request::RegionRead(a)
            }
            Command::RegionWrite => {
                let (access, data) = RegionAccess::decode(payload, name, limits.max_data_xfer)?;
                if data.len() != access.count as usize {
                    return Err(ProtocolError::DataMismatch {
                        what: name,
                        count: access.count as u64,
                        got: data.len(),
                    });
                }
                Request::RegionWrite { access, data }
            }
            Command::RegionWriteMulti => Request::RegionWriteMulti(decode_write_multi(payload)?),
            Command::DeviceReset => {
                empty(name, payload)?;
                Request::DeviceReset
            }
            Command::DeviceFeature => Request::DeviceFeature(DeviceFeature::decode(payload)?),
            Command::DmaRead | Command::DmaWrite => {
                return Err(ProtocolError::WrongDirection(header.cmd))
            }
            Command::DirtyPages | Command::MigDataRead | Command::MigDataWrite => {
                Request::Unsupported(cmd)
            }
        })
    }
}

fn check_argsz(what: &'static str, argsz: u32, need: usize) -> Result<(), ProtocolError> {
    if (argsz as usize) < need {
        return Err(ProtocolError::BadArgsz { what, argsz, need });
    }
    Ok(())
}

pub fn command_name(cmd: Command) -> &'static str {
    use Command::*;
    match cmd {
        Version => "VERSION",
        DmaMap => "DMA_MAP",
        DmaUnmap => "DMA_UNMAP",
        DeviceGetInfo => "DEVICE_GET_INFO",
        DeviceGetRegionInfo => "DEVICE_GET_REGION_INFO",
        DeviceGetRegionIoFds => "DEVICE_GET_REGION_IO_FDS",
        DeviceGetIrqInfo => "DEVICE_GET_IRQ_INFO",
        DeviceSetIrqs => "DEVICE_SET_IRQS",
        RegionRead => "REGION_READ",
        RegionWrite => "REGION_WRITE",
        DmaRead => "DMA_READ",
        DmaWrite => "DMA_WRITE",
        DeviceReset => "DEVICE_RESET",
        DirtyPages => "DIRTY_PAGES",
        RegionWriteMulti => "REGION_WRITE_MULTI",
        DeviceFeature => "DEVICE_FEATURE",
        MigDataRead => "MIG_DATA_READ",
        MigDataWrite => "MIG_DATA_WRITE",
        DmaMapMulti => "DMA_MAP_MULTI",
        DmaUnmapMulti => "DMA_UNMAP_MULTI",
    }
}
