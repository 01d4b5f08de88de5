//! DEVICE_SET_IRQS: the request and its validated, typed form.

use std::os::fd::OwnedFd;

use crate::error::ProtocolError;
use crate::wire::{Reader, Writer};

pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const DATA_MASK: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
const ACTION_MASK: u32 = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;

pub const IRQ_SET_SIZE: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqAction {
    Mask,
    Unmask,
    Trigger,
}

#[derive(Debug)]
pub enum IrqData {
    /// Act on every sub-index of the range; start = count = 0 with Trigger
    /// disables the whole index.
    None,
    /// Act on the sub-indexes whose byte is non-zero.
    Bool(Vec<bool>),
    /// One eventfd per sub-index; an empty list de-assigns the range.
    Eventfds(Vec<OwnedFd>),
}

#[derive(Debug)]
pub struct IrqSet {
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub action: IrqAction,
    pub data: IrqData,
}

impl IrqSet {
    /// Validates every rule the spec gives for the header fields, the data
    /// and the file descriptors. Range checks against the device's IRQ
    /// counts are the server's job.
    pub fn decode(payload: &[u8], fds: Vec<OwnedFd>) -> Result<IrqSet, ProtocolError> {
        const WHAT: &str = "DEVICE_SET_IRQS";
        let mut r = Reader::new(payload, WHAT);
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let start = r.u32()?;
        let count = r.u32()?;
        let data = r.rest();
        if argsz as usize != payload.len() {
            return Err(ProtocolError::BadArgsz {
                what: WHAT,
                argsz,
                need: payload.len(),
            });
        }
        let dflags = flags & DATA_MASK;
        let aflags = flags & ACTION_MASK;
        if flags & !(DATA_MASK | ACTION_MASK) != 0
            || dflags.count_ones() != 1
            || aflags.count_ones() != 1
        {
            return Err(ProtocolError::BadFlags { what: WHAT, flags });
        }
        if start.checked_add(count).is_none() {
            return Err(ProtocolError::Overflow {
                what: WHAT,
                fields: "start + count",
            });
        }
        let action = match aflags {
            IRQ_SET_ACTION_MASK => IrqAction::Mask,
            IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
            _ => IrqAction::Trigger,
        };
        if dflags != IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
            return Err(ProtocolError::FdCount {
                what: WHAT,
                got: fds.len(),
                expected: "none without DATA_EVENTFD",
            });
        }
        let data = match dflags {
            IRQ_SET_DATA_NONE => {
                if !data.is_empty() {
                    return Err(ProtocolError::DataMismatch {
                        what: WHAT,
                        count: 0,
                        got: data.len(),
                    });
                }
                IrqData::None
            }
            IRQ_SET_DATA_BOOL => {
                if data.len() != count as usize {
                    return Err(ProtocolError::DataMismatch {
                        what: WHAT,
                        count: count as u64,
                        got: data.len(),
                    });
                }
                IrqData::Bool(data.iter().map(|b| *b != 0).collect())
            }
            _ => {
                if !data.is_empty() {
                    return Err(ProtocolError::DataMismatch {
                        what: WHAT,
                        count: 0,
                        got: data.len(),
                    });
                }
                if !fds.is_empty() && fds.len() != count as usize {
                    return Err(ProtocolError::FdCount {
                        what: WHAT,
                        got: fds.len(),
                        expected: "zero (de-assign) or one per sub-index",
                    });
                }
                IrqData::Eventfds(fds)
            }
        };
        Ok(IrqSet {
            index,
            start,
            count,
            action,
            data,
        })
    }

    /// Encodes the request payload; eventfds travel separately as SCM_RIGHTS.
    pub fn encode(&self) -> Vec<u8> {
        let (dflag, bytes): (u32, Vec<u8>) = match &self.data {
            IrqData::None => (IRQ_SET_DATA_NONE, vec![]),
            IrqData::Bool(v) => (IRQ_SET_DATA_BOOL, v.iter().map(|b| *b as u8).collect()),
            IrqData::Eventfds(_) => (IRQ_SET_DATA_EVENTFD, vec![]),
        };
        let aflag = match self.action {
            IrqAction::Mask => IRQ_SET_ACTION_MASK,
            IrqAction::Unmask => IRQ_SET_ACTION_UNMASK,
            IrqAction::Trigger => IRQ_SET_ACTION_TRIGGER,
        };
        let mut w = Writer::with_capacity(IRQ_SET_SIZE + bytes.len());
        w.u32((IRQ_SET_SIZE + bytes.len()) as u32)
            .u32(dflag | aflag)
            .u32(self.index)
            .u32(self.start)
            .u32(self.count)
            .bytes(&bytes);
        w.into_vec()
    }
}
