//! A vfio-user client: what tests, benchmarks and tools use to drive a
//! server. Server-to-client DMA_READ/DMA_WRITE arriving while a reply is
//! awaited are served from a [`DmaMemory`] the caller provides.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::device::{DeviceInfo, IrqInfo, RegionInfo};
use crate::dma::{DmaAccess, DmaMap, DmaUnmap, DMA_MAP_SIZE, DMA_UNMAP_SIZE};
use crate::dma_multi::{
    decode_multi_reply, encode_map_multi, encode_unmap_multi, DmaMapEntry, DmaUnmapEntry,
};
use crate::error::ProtocolError;
use crate::header::{Command, Header};
use crate::irqs::{IrqAction, IrqData, IrqSet};
use crate::limits::Limits;
use crate::region::{encode_write_multi, RegionAccess, WriteOne, REGION_ACCESS_SIZE};
use crate::socket::{MessageSocket, RecvError};
use crate::version::{Capabilities, Version};

/// Client memory the server may reach with DMA_READ / DMA_WRITE.
pub trait DmaMemory {
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), i32>;
    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), i32>;
}

/// A reply: its header, payload and fds.
pub struct Reply {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

pub struct Client {
    sock: MessageSocket,
    next_id: u16,
    limits: Limits,
    dma: Option<Box<dyn DmaMemory + Send>>,
    /// Server-to-client requests served so far (tests check the fallback path).
    pub dma_requests_served: u64,
}

impl Client {
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ProtocolError> {
        Ok(Client::from_stream(UnixStream::connect(path)?))
    }

    pub fn from_stream(stream: UnixStream) -> Client {
        Client {
            sock: MessageSocket::new(stream),
            next_id: 0,
            limits: Limits::default(),
            dma: None,
            dma_requests_served: 0,
        }
    }

    pub fn socket(&self) -> &MessageSocket {
        &self.sock
    }

    pub fn set_dma_memory(&mut self, mem: Box<dyn DmaMemory + Send>) {
        self.dma = Some(mem);
    }

    fn id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    /// Sends a command and returns its reply; an error reply becomes
    /// `ProtocolError::Remote` with the server's errno.
    pub fn request(
        &mut self,
        cmd: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, ProtocolError> {
        let id = self.send_command(cmd, payload, fds)?;
        self.reply_to(id, cmd)
    }

    /// Sends a command that wants a reply without waiting for it, and
    /// returns its message id for [`Client::reply_to`]. This lets a caller
    /// keep several requests outstanding, as QEMU does with DMA_MAPs inside
    /// a memory transaction. The server answers in order, so the replies
    /// must be collected in the order the commands were sent: each
    /// `reply_to` takes the next reply off the socket, and one carrying an
    /// id other than the one asked for is a `BadReply` (and is gone). Keep
    /// the batch within what the socket buffers hold, since nothing reads
    /// replies while sending.
    pub fn send_command(
        &mut self,
        cmd: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<u16, ProtocolError> {
        let id = self.id();
        let h = Header::command(id, cmd, payload.len(), false);
        self.sock.send(&h, &[payload], fds)?;
        Ok(id)
    }

    /// Waits for the reply to `id`, sent as `cmd` by [`Client::send_command`];
    /// an error reply becomes `ProtocolError::Remote` with the server's errno,
    /// and the reply is consumed either way, so the next id can be collected.
    pub fn reply_to(&mut self, id: u16, cmd: Command) -> Result<Reply, ProtocolError> {
        let reply = self.wait_reply(id)?;
        if reply.header.cmd != cmd as u16 {
            return Err(ProtocolError::BadReply {
                id,
                why: "reply names another command",
            });
        }
        Ok(reply)
    }

    /// Sends a command with NO_REPLY set.
    pub fn post(&mut self, cmd: Command, payload: &[u8]) -> Result<(), ProtocolError> {
        let id = self.id();
        self.sock.send(
            &Header::command(id, cmd, payload.len(), true),
            &[payload],
            &[],
        )
    }

    /// Receives until the reply to `id` arrives, serving DMA requests
    /// meanwhile. The next reply must be the one to `id` (replies come in
    /// order); [`Client::reply_to`] also checks the reply's command.
    pub fn wait_reply(&mut self, id: u16) -> Result<Reply, ProtocolError> {
        let mut payload = Vec::new();
        loop {
            let (header, fds) = match self.sock.recv(&self.limits, &mut payload) {
                Ok(m) => m,
                Err(RecvError::Closed) => return Err(ProtocolError::Closed),
                Err(RecvError::Fatal(e))
                | Err(RecvError::Rejected(_, e))
                | Err(RecvError::Unframeable(_, e)) => return Err(e),
            };
            if !header.is_reply() {
                self.serve(&header, &payload)?;
                continue;
            }
            if header.id != id {
                return Err(ProtocolError::BadReply {
                    id,
                    why: "reply carries another message id",
                });
            }
            if header.is_error() {
                return Err(ProtocolError::Remote {
                    errno: header.error,
                });
            }
            return Ok(Reply {
                header,
                payload: std::mem::take(&mut payload),
                fds,
            });
        }
    }

    /// Answers a server-to-client command.
    fn serve(&mut self, header: &Header, payload: &[u8]) -> Result<(), ProtocolError> {
        let cmd = Command::from_u16(header.cmd);
        let result: Result<Vec<u8>, i32> = match (cmd, self.dma.as_mut()) {
            (Some(Command::DmaRead), Some(mem)) => DmaAccess::decode(payload, "DMA_READ")
                .map_err(|e| e.errno())
                .and_then(|(a, _)| {
                    if a.count as u64 > self.limits.max_data_xfer {
                        return Err(libc::E2BIG);
                    }
                    let mut buf = vec![0u8; a.count as usize];
                    mem.read(a.iova, &mut buf)?;
                    Ok(a.encode_read_reply(&buf))
                }),
            (Some(Command::DmaWrite), Some(mem)) => (|| {
                let (a, rest) = DmaAccess::decode(payload, "DMA_WRITE").map_err(|e| e.errno())?;
                let data = a.data(rest, "DMA_WRITE").map_err(|e| e.errno())?;
                mem.write(a.iova, data)?;
                Ok(Vec::new())
            })(),
            (Some(Command::DmaRead | Command::DmaWrite), None) => Err(libc::ENODEV),
            _ => Err(libc::ENOSYS),
        };
        self.dma_requests_served += 1;
        if header.no_reply() {
            return Ok(());
        }
        match result {
            Ok(body) => self.sock.send(&header.reply(body.len()), &[&body], &[]),
            Err(errno) => self.sock.send(&header.error_reply(errno), &[], &[]),
        }
    }

    /// VERSION: proposes 0.0 with `caps`; returns the server's reply.
    pub fn negotiate(&mut self, caps: Capabilities) -> Result<Version, ProtocolError> {
        let v = Version {
            major: 0,
            minor: 0,
            capabilities: Some(caps),
        };
        let r = self.request(Command::Version, &v.encode(), &[])?;
        let reply = Version::decode(&r.payload)?;
        // The server's max_data_xfer_size bounds what it sends us, so it is
        // also the largest data message this client must accept.
        if let Some(x) = reply
            .capabilities
            .as_ref()
            .and_then(|c| c.max_data_xfer_size)
        {
            self.limits = Limits::new(x.min(64 << 20), self.limits.max_fds);
        }
        Ok(reply)
    }

    /// The capabilities QEMU 11.1 proposes (platform.md).
    pub fn qemu_capabilities() -> Capabilities {
        let mut c = Capabilities {
            max_msg_fds: Some(16),
            max_data_xfer_size: Some(1 << 20),
            pgsizes: Some(4096),
            max_dma_maps: Some(65535),
            write_multiple: Some(true),
            ..Default::default()
        };
        c.other.insert(
            "migration".into(),
            serde_json::json!({"pgsize": 4096, "max_bitmap_size": 256u64 << 20}),
        );
        c
    }

    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        offset: u64,
        flags: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ProtocolError> {
        let m = DmaMap {
            argsz: DMA_MAP_SIZE as u32,
            flags,
            offset,
            iova,
            size,
        };
        let fds: Vec<BorrowedFd> = fd.into_iter().collect();
        self.request(Command::DmaMap, &m.encode(), &fds).map(|_| ())
    }

    pub fn dma_unmap(
        &mut self,
        iova: u64,
        size: u64,
        flags: u32,
    ) -> Result<DmaUnmap, ProtocolError> {
        let m = DmaUnmap {
            argsz: DMA_UNMAP_SIZE as u32,
            flags,
            iova,
            size,
        };
        let r = self.request(Command::DmaUnmap, &m.encode(), &[])?;
        DmaUnmap::decode(&r.payload)
    }

    /// DMA_MAP_MULTI (needs the dma_multiple capability): every entry
    /// names its fd by index into `fds`; returns each entry's errno (0:
    /// mapped).
    pub fn dma_map_multi(
        &mut self,
        maps: &[DmaMapEntry],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Vec<u32>, ProtocolError> {
        let r = self.request(Command::DmaMapMulti, &encode_map_multi(maps), fds)?;
        decode_multi_reply(&r.payload, "DMA_MAP_MULTI reply")
    }

    /// DMA_UNMAP_MULTI: returns each entry's errno (0: unmapped).
    pub fn dma_unmap_multi(&mut self, unmaps: &[DmaUnmapEntry]) -> Result<Vec<u32>, ProtocolError> {
        let r = self.request(Command::DmaUnmapMulti, &encode_unmap_multi(unmaps), &[])?;
        decode_multi_reply(&r.payload, "DMA_UNMAP_MULTI reply")
    }

    pub fn device_info(&mut self) -> Result<DeviceInfo, ProtocolError> {
        let q = DeviceInfo {
            argsz: DeviceInfo::SIZE as u32,
            ..Default::default()
        };
        let r = self.request(Command::DeviceGetInfo, &q.encode(), &[])?;
        DeviceInfo::decode(&r.payload)
    }

    /// GET_REGION_INFO, asking again with a larger argsz when the
    /// capabilities did not fit. Returns the region's fd if it has one.
    pub fn region_info(
        &mut self,
        index: u32,
    ) -> Result<(RegionInfo, Option<OwnedFd>), ProtocolError> {
        let mut argsz = RegionInfo::SIZE as u32;
        for _ in 0..2 {
            let q = RegionInfo::encode_request(argsz, index);
            let mut r = self.request(Command::DeviceGetRegionInfo, &q, &[])?;
            let info = RegionInfo::decode_reply(&r.payload)?;
            if info.argsz > argsz {
                argsz = info.argsz;
                continue;
            }
            return Ok((info, r.fds.pop()));
        }
        Err(ProtocolError::BadReply {
            id: 0,
            why: "region info argsz kept growing",
        })
    }

    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo, ProtocolError> {
        let q = IrqInfo {
            argsz: IrqInfo::SIZE as u32,
            index,
            ..Default::default()
        };
        let r = self.request(Command::DeviceGetIrqInfo, &q.encode(), &[])?;
        IrqInfo::decode(&r.payload)
    }

    pub fn set_irqs(
        &mut self,
        index: u32,
        start: u32,
        count: u32,
        action: IrqAction,
        data: IrqData,
    ) -> Result<(), ProtocolError> {
        let set = IrqSet {
            index,
            start,
            count,
            action,
            data,
        };
        let payload = set.encode();
        let fds: Vec<BorrowedFd> = match &set.data {
            IrqData::Eventfds(v) => v.iter().map(|f| f.as_fd()).collect(),
            _ => Vec::new(),
        };
        self.request(Command::DeviceSetIrqs, &payload, &fds)
            .map(|_| ())
    }

    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        count: u32,
    ) -> Result<Vec<u8>, ProtocolError> {
        let a = RegionAccess {
            offset,
            region,
            count,
        };
        let r = self.request(Command::RegionRead, &a.encode(&[]), &[])?;
        let (got, data) = RegionAccess::decode(&r.payload, "REGION_READ reply", u64::MAX)?;
        if got != a || data.len() != count as usize {
            return Err(ProtocolError::BadReply {
                id: r.header.id,
                why: "REGION_READ reply does not echo the request or has the wrong length",
            });
        }
        Ok(data.to_vec())
    }

    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        let a = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        let r = self.request(Command::RegionWrite, &a.encode(data), &[])?;
        if r.payload.len() < REGION_ACCESS_SIZE {
            return Err(ProtocolError::BadReply {
                id: r.header.id,
                why: "REGION_WRITE reply is shorter than 16 bytes",
            });
        }
        Ok(())
    }

    /// A posted REGION_WRITE, as QEMU sends them.
    pub fn region_write_posted(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        let a = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        self.post(Command::RegionWrite, &a.encode(data))
    }

    pub fn read32(&mut self, region: u32, offset: u64) -> Result<u32, ProtocolError> {
        let d = self.region_read(region, offset, 4)?;
        Ok(u32::from_ne_bytes([d[0], d[1], d[2], d[3]]))
    }

    pub fn write32(&mut self, region: u32, offset: u64, v: u32) -> Result<(), ProtocolError> {
        self.region_write(region, offset, &v.to_ne_bytes())
    }

    pub fn write_multi(&mut self, writes: &[WriteOne]) -> Result<u64, ProtocolError> {
        let r = self.request(Command::RegionWriteMulti, &encode_write_multi(writes), &[])?;
        let mut b = [0u8; 8];
        b.copy_from_slice(r.payload.get(..8).ok_or(ProtocolError::BadReply {
            id: r.header.id,
            why: "WRITE_MULTI reply shorter than 8 bytes",
        })?);
        Ok(u64::from_ne_bytes(b))
    }

    pub fn reset(&mut self) -> Result<(), ProtocolError> {
        self.request(Command::DeviceReset, &[], &[]).map(|_| ())
    }
}
