//! The edu register map (QEMU's hw/misc/edu.c plus airlock's extensions) and
//! 32-bit access to BAR0, by mmap of the VFIO region or by pread/pwrite.

use crate::vfio::{self, Device, RegionInfo};
use std::time::{Duration, Instant};

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x11e8;

pub const IDENT: u64 = 0x00;
pub const IDENT_VALUE: u32 = 0x010000ed;
pub const LIVENESS: u64 = 0x04;
pub const FACTORIAL: u64 = 0x08;
pub const STATUS: u64 = 0x20;
pub const STATUS_COMPUTING: u32 = 0x01;
pub const IRQ_STATUS: u64 = 0x24;
pub const IRQ_RAISE: u64 = 0x60;
pub const IRQ_ACK: u64 = 0x64;
/// airlock extension: writing v raises MSI-X vector v.
pub const MSIX_RAISE: u64 = 0x68;
pub const DMA_SRC: u64 = 0x80;
pub const DMA_DST: u64 = 0x88;
pub const DMA_COUNT: u64 = 0x90;
pub const DMA_CMD: u64 = 0x98;
pub const DMA_CMD_START: u32 = 0x1;
pub const DMA_CMD_TO_RAM: u32 = 0x2;
/// airlock extension: last DMA error (bit0: IOVA not mapped); write 0 clears.
pub const DMA_ERROR: u64 = 0xa0;
/// Device-side DMA buffer address and size.
pub const DEV_BUF: u64 = 0x40000;
pub const DEV_BUF_SIZE: u64 = 4096;

enum Access {
    Mmap { base: *mut u8, len: usize },
    Pread { offset: u64, size: u64 },
}

pub struct Bar0<'d> {
    dev: &'d Device,
    access: Access,
}

impl<'d> Bar0<'d> {
    /// Maps BAR0 if the region allows it, else uses pread/pwrite.
    pub fn open(dev: &'d Device) -> Result<Bar0<'d>, String> {
        let ri: RegionInfo = dev.region_info(vfio::PCI_BAR0_REGION_INDEX)?;
        if ri.size < 0x100 {
            return Err(format!("BAR0 region too small: {:#x} bytes", ri.size));
        }
        if ri.flags & (vfio::REGION_FLAG_READ | vfio::REGION_FLAG_WRITE)
            != (vfio::REGION_FLAG_READ | vfio::REGION_FLAG_WRITE)
        {
            return Err(format!(
                "BAR0 region not read/write (flags {:#x})",
                ri.flags
            ));
        }
        let pread = Access::Pread {
            offset: ri.offset,
            size: ri.size,
        };
        if ri.flags & vfio::REGION_FLAG_MMAP == 0 {
            crate::report::info(&format!(
                "BAR0: {:#x} bytes, flags {:#x}, no MMAP flag: using pread/pwrite",
                ri.size, ri.flags
            ));
            return Ok(Bar0 { dev, access: pread });
        }
        let len = ri.size as usize;
        // SAFETY: a fresh shared mapping of the device fd at the region offset the
        // kernel reported; we pass no address hint, so nothing existing is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                dev.fd(),
                ri.offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            crate::report::info(&format!(
                "BAR0: mmap failed ({}): using pread/pwrite",
                std::io::Error::last_os_error()
            ));
            return Ok(Bar0 { dev, access: pread });
        }
        crate::report::info(&format!("BAR0: {:#x} bytes, accessed by mmap", ri.size));
        Ok(Bar0 {
            dev,
            access: Access::Mmap {
                base: p as *mut u8,
                len,
            },
        })
    }

    pub fn is_mmap(&self) -> bool {
        matches!(self.access, Access::Mmap { .. })
    }

    fn check(off: u64, len: u64) {
        assert!(
            off.is_multiple_of(4) && off + 4 <= len,
            "BAR0 offset {off:#x} out of range"
        );
    }

    pub fn read32(&self, off: u64) -> u32 {
        match self.access {
            Access::Mmap { base, len } => {
                Self::check(off, len as u64);
                // SAFETY: off is 4-aligned and inside the live BAR0 mapping (checked
                // above); a volatile load is the MMIO access we want.
                unsafe { std::ptr::read_volatile(base.add(off as usize) as *const u32) }
            }
            Access::Pread { offset, size } => {
                Self::check(off, size);
                let mut b = [0u8; 4];
                match self.dev.read_at(&mut b, offset + off) {
                    Ok(()) => u32::from_le_bytes(b),
                    Err(e) => {
                        crate::report::info(&format!("BAR0 read {off:#x}: {e}"));
                        u32::MAX
                    }
                }
            }
        }
    }

    pub fn write32(&self, off: u64, val: u32) {
        match self.access {
            Access::Mmap { base, len } => {
                Self::check(off, len as u64);
                // SAFETY: off is 4-aligned and inside the live BAR0 mapping (checked
                // above); a volatile store is the MMIO access we want.
                unsafe { std::ptr::write_volatile(base.add(off as usize) as *mut u32, val) }
            }
            Access::Pread { offset, size } => {
                Self::check(off, size);
                if let Err(e) = self.dev.write_at(&val.to_le_bytes(), offset + off) {
                    crate::report::info(&format!("BAR0 write {off:#x}: {e}"));
                }
            }
        }
    }

    /// A 64-bit register as two 32-bit writes, low half first.
    pub fn write64(&self, off: u64, val: u64) {
        self.write32(off, val as u32);
        self.write32(off + 4, (val >> 32) as u32);
    }

    /// Polls until `reg & mask == 0`; returns how long it took.
    pub fn wait_clear(&self, reg: u64, mask: u32, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let v = self.read32(reg);
            if v & mask == 0 {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "register {reg:#x} = {v:#x}: bits {mask:#x} still set after {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs one edu DMA of `count` bytes and waits for it to finish.
    pub fn dma(
        &self,
        src: u64,
        dst: u64,
        count: u32,
        to_ram: bool,
        timeout: Duration,
    ) -> Result<Duration, String> {
        self.wait_clear(DMA_CMD, DMA_CMD_START, timeout)
            .map_err(|e| format!("previous DMA still running: {e}"))?;
        self.write64(DMA_SRC, src);
        self.write64(DMA_DST, dst);
        self.write32(DMA_COUNT, count);
        let cmd = DMA_CMD_START | if to_ram { DMA_CMD_TO_RAM } else { 0 };
        self.write32(DMA_CMD, cmd);
        self.wait_clear(DMA_CMD, DMA_CMD_START, timeout)
            .map_err(|e| format!("DMA {src:#x} -> {dst:#x} ({count} bytes) did not finish: {e}"))
    }
}

impl Drop for Bar0<'_> {
    fn drop(&mut self) {
        if let Access::Mmap { base, len } = self.access {
            // SAFETY: base/len are exactly the mapping made in open(), and no
            // reference into it outlives self.
            unsafe { libc::munmap(base as *mut libc::c_void, len) };
        }
    }
}
