//! One connection to airlock's edu: the vfio-user client plus, once the
//! fast-path check has mapped them, BAR0's mmap'able areas. Register access
//! goes through a mapping when one covers the register, else through
//! REGION_READ / REGION_WRITE.

use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;

use airlock_protocol::client::Client;
use airlock_protocol::device::{RegionInfo, PCI_BAR0_REGION_INDEX, PCI_CONFIG_REGION_INDEX};
use airlock_protocol::Command;

use crate::os::Mapping;

pub const REG_IDENT: u64 = 0x00;
pub const REG_LIVENESS: u64 = 0x04;
pub const REG_FACTORIAL: u64 = 0x08;
pub const REG_STATUS: u64 = 0x20;
pub const REG_IRQ_STATUS: u64 = 0x24;
pub const REG_IRQ_RAISE: u64 = 0x60;
pub const REG_IRQ_ACK: u64 = 0x64;
pub const REG_DMA_SRC: u64 = 0x80;
pub const REG_DMA_DST: u64 = 0x88;
pub const REG_DMA_COUNT: u64 = 0x90;
pub const REG_DMA_CMD: u64 = 0x98;
/// airlock's emulated edu only; QEMU's edu reads all-ones here.
pub const REG_DMA_ERROR: u64 = 0xa0;
pub const IDENT: u32 = 0x010000ed;
pub const DMA_BUFFER: u64 = 0x40000;
pub const CMD_MASTER: u16 = 1 << 2;
pub const CMD_MEMORY: u16 = 1 << 1;

/// A BAR0 area mapped from the region fd: [offset, offset + map.len()).
pub struct Area {
    pub offset: u64,
    pub map: Mapping,
}

pub struct Dev {
    pub client: Client,
    pub bar0: Vec<Area>,
}

fn perr(what: &str, e: airlock_protocol::ProtocolError) -> String {
    format!("{what}: {e}")
}

impl Dev {
    pub fn connect(path: &str) -> Result<Dev, String> {
        let client = Client::connect(path).map_err(|e| perr(&format!("connect {path}"), e))?;
        for t in [
            client
                .socket()
                .stream()
                .set_read_timeout(Some(Duration::from_secs(10))),
            client
                .socket()
                .stream()
                .set_write_timeout(Some(Duration::from_secs(10))),
        ] {
            t.map_err(|e| format!("socket timeout: {e}"))?;
        }
        Ok(Dev {
            client,
            bar0: Vec::new(),
        })
    }

    pub fn mapped(&self) -> bool {
        !self.bar0.is_empty()
    }

    fn area(&self, off: u64, len: u64) -> Option<(&Mapping, usize)> {
        self.bar0
            .iter()
            .find(|a| off >= a.offset && off + len <= a.offset + a.map.len() as u64)
            .map(|a| (&a.map, (off - a.offset) as usize))
    }

    /// GET_REGION_INFO with the capability chain and the region fd.
    ///
    /// Not `Client::region_info`: its retry re-encodes the request with
    /// `RegionInfo::encode_reply`, which writes argsz = 32 (the request's own
    /// size) whatever argsz it meant, so the server never sees the larger
    /// buffer and the caps and fd never arrive. This sends argsz explicitly.
    pub fn region_info(&mut self, index: u32) -> Result<(RegionInfo, Option<OwnedFd>), String> {
        let mut argsz = RegionInfo::SIZE as u32;
        for _ in 0..2 {
            let mut q = [0u8; RegionInfo::SIZE];
            q[..4].copy_from_slice(&argsz.to_ne_bytes());
            q[8..12].copy_from_slice(&index.to_ne_bytes());
            let mut r = self
                .client
                .request(Command::DeviceGetRegionInfo, &q, &[])
                .map_err(|e| perr(&format!("GET_REGION_INFO {index} (argsz {argsz})"), e))?;
            let info = RegionInfo::decode_reply(&r.payload)
                .map_err(|e| perr(&format!("GET_REGION_INFO {index} reply"), e))?;
            if info.argsz > argsz {
                argsz = info.argsz;
                continue;
            }
            return Ok((info, r.fds.pop()));
        }
        Err(format!("GET_REGION_INFO {index}: argsz kept growing"))
    }

    /// A BAR0 register, through the mapping if one covers it.
    pub fn read32(&mut self, off: u64) -> Result<u32, String> {
        if let Some((m, at)) = self.area(off, 4) {
            return Ok(m.read32(at));
        }
        self.msg_read32(off)
    }

    pub fn write32(&mut self, off: u64, v: u32) -> Result<(), String> {
        if let Some((m, at)) = self.area(off, 4) {
            m.write32(at, v);
            return Ok(());
        }
        self.msg_write32(off, v)
    }

    /// A BAR0 register through REGION_READ, whatever is mapped.
    pub fn msg_read32(&mut self, off: u64) -> Result<u32, String> {
        self.client
            .read32(PCI_BAR0_REGION_INDEX, off)
            .map_err(|e| perr(&format!("REGION_READ bar0+{off:#x}"), e))
    }

    pub fn msg_write32(&mut self, off: u64, v: u32) -> Result<(), String> {
        self.client
            .write32(PCI_BAR0_REGION_INDEX, off, v)
            .map_err(|e| perr(&format!("REGION_WRITE bar0+{off:#x}"), e))
    }

    pub fn config16(&mut self, off: u64) -> Result<u16, String> {
        let d = self
            .client
            .region_read(PCI_CONFIG_REGION_INDEX, off, 2)
            .map_err(|e| perr(&format!("config read {off:#x}"), e))?;
        Ok(u16::from_le_bytes([d[0], d[1]]))
    }

    pub fn set_config16(&mut self, off: u64, v: u16) -> Result<(), String> {
        self.client
            .region_write(PCI_CONFIG_REGION_INDEX, off, &v.to_le_bytes())
            .map_err(|e| perr(&format!("config write {off:#x}"), e))
    }

    /// Sets memory decoding and bus mastering (read-modify-write of COMMAND).
    pub fn enable_bus_master(&mut self) -> Result<(), String> {
        let c = self.config16(4)?;
        self.set_config16(4, c | CMD_MEMORY | CMD_MASTER)?;
        let now = self.config16(4)?;
        if now & CMD_MASTER == 0 {
            return Err(format!("bus master bit did not stick (command {now:#06x})"));
        }
        Ok(())
    }

    /// Polls BAR0 `off` until `(value & mask) == 0`; Err after `timeout`.
    pub fn poll_clear(&mut self, off: u64, mask: u32, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let v = self.read32(off)?;
            if v & mask == 0 {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(format!(
                    "bar0+{off:#x} = {v:#x}: bit(s) {mask:#x} still set after {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs one edu DMA and waits (10 s) for it to finish. cmd 1 = RAM ->
    /// device, 3 = device -> RAM.
    pub fn dma(&mut self, src: u64, dst: u64, count: u32, cmd: u32) -> Result<(), String> {
        // Low half at 0x80/0x88, then the high half at +4 (airlock's edu takes
        // it; QEMU's edu ignores 32-bit writes there and zero-extends).
        self.write32(REG_DMA_SRC, src as u32)?;
        self.write32(REG_DMA_SRC + 4, (src >> 32) as u32)?;
        self.write32(REG_DMA_DST, dst as u32)?;
        self.write32(REG_DMA_DST + 4, (dst >> 32) as u32)?;
        self.write32(REG_DMA_COUNT, count)?;
        self.write32(REG_DMA_CMD, cmd)?;
        self.poll_clear(REG_DMA_CMD, 1, Duration::from_secs(10))
            .map_err(|e| format!("DMA {src:#x} -> {dst:#x} ({count} bytes, cmd {cmd}): {e}"))
    }
}
