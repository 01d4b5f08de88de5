//! An emulated PCI device register-compatible with QEMU's `edu`
//! (hw/misc/edu.c), so the same guest tests run against QEMU's in-process
//! edu, this one, and a real edu passed through with VFIO.
//!
//! BAR0 (1 MiB, registers), as QEMU's edu:
//!   0x00 ident 0x010000ed (RO)      0x04 liveness: reads back ~written
//!   0x08 factorial (status bit 0 while computing)
//!   0x20 status (bit 7: raise irq 0x1 when a factorial is done)
//!   0x24 irq status  0x60 raise irq  0x64 ack irq
//!   0x80 DMA src  0x88 DMA dst  0x90 DMA count  0x98 DMA cmd
//!        (bit 0 start, bit 1 device->RAM, bit 2 raise irq 0x100 when done)
//!   DMA buffer at 0x40000, 4 KiB; RAM addresses masked to 28 bits.
//! airlock extensions (reads of these on QEMU's edu return all-ones):
//!   0x84 / 0x8c   high halves of DMA src / dst for 32-bit writes
//!   0x68 write N: raise MSI-X vector N
//!   0xa0 DMA error: bit 0 the IOVA was not mapped (or the client failed
//!        the access), bit 1 bus mastering was off, bit 2 the device-side
//!        range left the buffer; any write clears it. QEMU's edu aborts on
//!        a bad device-side range; this device refuses the DMA instead.
//! BAR1 (4 KiB): MSI-X table (4 vectors) at 0, PBA at 0x800.
//! Capabilities: MSI (1 vector, 64-bit), PCI Express endpoint, MSI-X.

use airlock_protocol::device::{
    DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, PCI_CONFIG_REGION_INDEX, PCI_INTX_IRQ_INDEX,
    PCI_MSIX_IRQ_INDEX, PCI_MSI_IRQ_INDEX, PCI_NUM_REGIONS, REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
};
use airlock_protocol::irqs::IrqSet;

use crate::device::emulated::irq_table::{IrqMode, IrqTable};
use crate::device::pci::{
    Bar, ConfigSpace, CAP_ID_EXP, CAP_ID_MSI, CAP_ID_MSIX, COMMAND_INTX_DISABLE, COMMAND_MASTER,
    CONFIG_SPACE_SIZE, MSIX_FLAGS_ENABLE, MSIX_FLAGS_MASKALL, MSI_FLAGS_64BIT, STATUS,
    STATUS_INTERRUPT,
};
use crate::device::{Device, DeviceError, DmaJob, RegionDesc};
use crate::dma::DmaError;

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x11e8;
pub const IDENT: u32 = 0x010000ed;
pub const BAR0_SIZE: u64 = 1 << 20;
pub const BAR1_SIZE: u64 = 4096;
pub const MSIX_VECTORS: u32 = 4;
pub const MSIX_PBA_OFFSET: u64 = 0x800;

pub const REG_IDENT: u64 = 0x00;
pub const REG_LIVENESS: u64 = 0x04;
pub const REG_FACTORIAL: u64 = 0x08;
pub const REG_STATUS: u64 = 0x20;
pub const REG_IRQ_STATUS: u64 = 0x24;
pub const REG_IRQ_RAISE: u64 = 0x60;
pub const REG_IRQ_ACK: u64 = 0x64;
pub const REG_MSIX_RAISE: u64 = 0x68;
pub const REG_DMA_SRC: u64 = 0x80;
pub const REG_DMA_DST: u64 = 0x88;
pub const REG_DMA_COUNT: u64 = 0x90;
pub const REG_DMA_CMD: u64 = 0x98;
pub const REG_DMA_ERROR: u64 = 0xa0;

pub const STATUS_COMPUTING: u32 = 0x01;
pub const STATUS_IRQFACT: u32 = 0x80;
pub const DMA_CMD_RUN: u64 = 0x1;
pub const DMA_CMD_FROM_DEVICE: u64 = 0x2;
pub const DMA_CMD_IRQ: u64 = 0x4;
pub const DMA_IRQ: u32 = 0x100;
pub const FACT_IRQ: u32 = 0x1;
pub const DMA_BUFFER: u64 = 0x40000;
pub const DMA_BUFFER_SIZE: usize = 4096;
pub const DMA_MASK: u64 = (1 << 28) - 1;

pub const DMA_ERR_UNMAPPED: u32 = 1 << 0;
pub const DMA_ERR_NO_MASTER: u32 = 1 << 1;
pub const DMA_ERR_RANGE: u32 = 1 << 2;

#[derive(Default)]
struct Registers {
    liveness: u32,
    factorial: u32,
    status: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_count: u64,
    dma_cmd: u64,
    dma_error: u32,
}

pub struct Edu {
    config: ConfigSpace,
    regs: Registers,
    buffer: Box<[u8; DMA_BUFFER_SIZE]>,
    msix_table: [u8; 16 * MSIX_VECTORS as usize],
    irqs: IrqTable,
    queued: Option<DmaJob>,
}

impl Default for Edu {
    fn default() -> Self {
        Self::new()
    }
}

impl Edu {
    pub fn new() -> Edu {
        // Class "other" (0x00ff00), subsystem as QEMU's defaults.
        let mut config = ConfigSpace::new(VENDOR, DEVICE, 0x00ff00, 0x10);
        config.set_subsystem(0x1af4, 0x1100);
        config.add_mem_bar32(Bar {
            index: 0,
            size: BAR0_SIZE,
        });
        config.add_mem_bar32(Bar {
            index: 1,
            size: BAR1_SIZE,
        });
        // MSI: control (64-bit, 1 vector), address lo/hi, data, pad.
        let mut msi = [0u8; 14];
        msi[..2].copy_from_slice(&MSI_FLAGS_64BIT.to_le_bytes());
        let mut msi_w = [0u8; 14];
        msi_w[0] = 0x71; // enable + multiple message enable
        msi_w[2..6].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        msi_w[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        msi_w[10..12].copy_from_slice(&u16::MAX.to_le_bytes());
        config.add_cap(CAP_ID_MSI, &msi, &msi_w);
        // PCI Express v2 endpoint: capabilities register, then zeroed
        // device/link/slot blocks with device and link control writable.
        let mut exp = [0u8; 58];
        exp[..2].copy_from_slice(&0x0002u16.to_le_bytes());
        let mut exp_w = [0u8; 58];
        exp_w[6..8].copy_from_slice(&0x7fffu16.to_le_bytes()); // device control
        exp_w[14..16].copy_from_slice(&0x0fffu16.to_le_bytes()); // link control
        config.add_cap(CAP_ID_EXP, &exp, &exp_w);
        // MSI-X: control (table size N-1), table in BAR1 at 0, PBA at 0x800.
        let mut msix = [0u8; 10];
        msix[..2].copy_from_slice(&((MSIX_VECTORS - 1) as u16).to_le_bytes());
        msix[2..6].copy_from_slice(&1u32.to_le_bytes());
        msix[6..10].copy_from_slice(&(MSIX_PBA_OFFSET as u32 | 1).to_le_bytes());
        let mut msix_w = [0u8; 10];
        msix_w[..2].copy_from_slice(&(MSIX_FLAGS_ENABLE | MSIX_FLAGS_MASKALL).to_le_bytes());
        config.add_cap(CAP_ID_MSIX, &msix, &msix_w);
        Edu {
            config,
            regs: Registers::default(),
            buffer: Box::new([0; DMA_BUFFER_SIZE]),
            msix_table: [0; 16 * MSIX_VECTORS as usize],
            irqs: IrqTable::pci(1, MSIX_VECTORS),
            queued: None,
        }
    }

    fn intx_disabled(&self) -> bool {
        self.config.command() & COMMAND_INTX_DISABLE != 0
    }

    /// Drives the INTx line from irq_status, as edu's pci_set_irq does.
    fn update_intx(&mut self) {
        let level =
            self.irqs.mode() == IrqMode::Intx && self.regs.irq_status != 0 && !self.intx_disabled();
        let status = self.config.get16(STATUS);
        let status = if level {
            status | STATUS_INTERRUPT
        } else {
            status & !STATUS_INTERRUPT
        };
        self.config.set16(STATUS, status);
        self.irqs.set_intx_level(level);
    }

    fn raise_irq(&mut self, val: u32) {
        self.regs.irq_status |= val;
        if self.regs.irq_status == 0 {
            return;
        }
        match self.irqs.mode() {
            IrqMode::Msix => self.irqs.fire(PCI_MSIX_IRQ_INDEX, 0),
            IrqMode::Msi => self.irqs.fire(PCI_MSI_IRQ_INDEX, 0),
            IrqMode::Intx => self.update_intx(),
        }
    }

    fn lower_irq(&mut self, val: u32) {
        self.regs.irq_status &= !val;
        self.update_intx();
    }

    fn factorial(n: u32) -> u32 {
        // 34! holds 2^32, so every larger factorial is 0 modulo 2^32; this
        // keeps a guest-chosen n from spinning the server.
        if n >= 34 {
            return 0;
        }
        (1..=n).fold(1u32, |acc, k| acc.wrapping_mul(k))
    }

    fn bar0_read(&self, offset: u64, len: usize) -> u64 {
        // 4-byte accesses anywhere; 8-byte ones only from 0x80 (the DMA registers).
        if len != 4 && (offset < 0x80 || len != 8) {
            return u64::MAX;
        }
        let r = &self.regs;
        match offset {
            REG_IDENT => IDENT as u64,
            REG_LIVENESS => r.liveness as u64,
            REG_FACTORIAL => r.factorial as u64,
            REG_STATUS => r.status as u64,
            REG_IRQ_STATUS => r.irq_status as u64,
            REG_DMA_SRC => r.dma_src,
            0x84 => r.dma_src >> 32,
            REG_DMA_DST => r.dma_dst,
            0x8c => r.dma_dst >> 32,
            REG_DMA_COUNT => r.dma_count,
            REG_DMA_CMD => r.dma_cmd,
            REG_DMA_ERROR => r.dma_error as u64,
            _ => u64::MAX,
        }
    }

    fn dma_running(&self) -> bool {
        self.regs.dma_cmd & DMA_CMD_RUN != 0
    }

    fn bar0_write(&mut self, offset: u64, len: usize, val: u64) {
        // 4-byte accesses anywhere; 8-byte ones only from 0x80 (the DMA registers).
        if len != 4 && (offset < 0x80 || len != 8) {
            return;
        }
        let v32 = val as u32;
        match offset {
            REG_LIVENESS => self.regs.liveness = !v32,
            REG_FACTORIAL if self.regs.status & STATUS_COMPUTING == 0 => {
                self.regs.factorial = Self::factorial(v32);
                if self.regs.status & STATUS_IRQFACT != 0 {
                    self.raise_irq(FACT_IRQ);
                }
            }
            REG_STATUS => {
                self.regs.status = (self.regs.status & !STATUS_IRQFACT) | (v32 & STATUS_IRQFACT);
            }
            REG_IRQ_RAISE => self.raise_irq(v32),
            REG_IRQ_ACK => self.lower_irq(v32),
            REG_MSIX_RAISE if v32 < MSIX_VECTORS => {
                self.irqs.fire(PCI_MSIX_IRQ_INDEX, v32);
            }
            REG_DMA_SRC if !self.dma_running() => self.regs.dma_src = val,
            0x84 if !self.dma_running() => {
                self.regs.dma_src = (self.regs.dma_src & 0xffff_ffff) | (val << 32);
            }
            REG_DMA_DST if !self.dma_running() => self.regs.dma_dst = val,
            0x8c if !self.dma_running() => {
                self.regs.dma_dst = (self.regs.dma_dst & 0xffff_ffff) | (val << 32);
            }
            REG_DMA_COUNT if !self.dma_running() => self.regs.dma_count = val,
            REG_DMA_CMD if val & DMA_CMD_RUN != 0 && !self.dma_running() => {
                self.regs.dma_cmd = val;
                self.start_dma();
            }
            REG_DMA_ERROR => self.regs.dma_error = 0,
            _ => {}
        }
    }

    /// Checks a started DMA and queues it for the server.
    fn start_dma(&mut self) {
        let r = &self.regs;
        let from_device = r.dma_cmd & DMA_CMD_FROM_DEVICE != 0;
        let (dev_addr, ram_addr) = if from_device {
            (r.dma_src, r.dma_dst)
        } else {
            (r.dma_dst, r.dma_src)
        };
        let count = r.dma_count;
        if self.config.command() & COMMAND_MASTER == 0 {
            return self.finish_dma(DMA_ERR_NO_MASTER);
        }
        let in_buffer = dev_addr >= DMA_BUFFER
            && count <= DMA_BUFFER_SIZE as u64
            && dev_addr - DMA_BUFFER <= DMA_BUFFER_SIZE as u64 - count;
        if !in_buffer {
            return self.finish_dma(DMA_ERR_RANGE);
        }
        let at = (dev_addr - DMA_BUFFER) as usize;
        let len = count as usize;
        let iova = ram_addr & DMA_MASK;
        self.queued = Some(if from_device {
            DmaJob::Write {
                iova,
                data: self.buffer[at..at + len].to_vec(),
            }
        } else {
            DmaJob::Read { iova, len }
        });
    }

    fn finish_dma(&mut self, error: u32) {
        self.regs.dma_error |= error;
        self.regs.dma_cmd &= !DMA_CMD_RUN;
        if self.regs.dma_cmd & DMA_CMD_IRQ != 0 {
            self.raise_irq(DMA_IRQ);
        }
    }

    fn bar1_read(&self, offset: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            let at = offset as usize + i;
            *b = if at < self.msix_table.len() {
                self.msix_table[at]
            } else if at >= MSIX_PBA_OFFSET as usize {
                let bit = (at - MSIX_PBA_OFFSET as usize) * 8;
                (0..8)
                    .filter(|k| self.irqs.pending(PCI_MSIX_IRQ_INDEX, (bit + k) as u32))
                    .fold(0u8, |acc, k| acc | 1 << k)
            } else {
                0
            };
        }
    }

    fn bar1_write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset as usize + i;
            if at < self.msix_table.len() {
                self.msix_table[at] = *b;
            }
        }
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl Device for Edu {
    fn name(&self) -> &str {
        "edu"
    }

    fn flags(&self) -> u32 {
        DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET
    }

    fn num_regions(&self) -> u32 {
        PCI_NUM_REGIONS
    }

    fn region(&self, index: u32) -> Option<RegionDesc<'_>> {
        let rw = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE;
        let (flags, size) = match index {
            0 => (rw, BAR0_SIZE),
            1 => (rw, BAR1_SIZE),
            PCI_CONFIG_REGION_INDEX => (rw, CONFIG_SPACE_SIZE as u64),
            i if i < PCI_NUM_REGIONS => (0, 0),
            _ => return None,
        };
        Some(RegionDesc::by_message(flags, size))
    }

    fn num_irqs(&self) -> u32 {
        self.irqs.num_indexes()
    }

    fn irq_info(&self, index: u32) -> Option<(u32, u32)> {
        self.irqs.info(index)
    }

    fn set_irqs(&mut self, set: IrqSet) -> Result<(), DeviceError> {
        let index = set.index;
        self.irqs
            .apply(set)
            .map_err(|e| DeviceError::Irq(e, self.name().to_string()))?;
        if index == PCI_INTX_IRQ_INDEX || !self.irqs.enabled(index) {
            // Switching modes may hand the pending state back to INTx.
            self.update_intx();
        }
        Ok(())
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match region {
            0 => {
                let v = self.bar0_read(offset, data.len()).to_le_bytes();
                let n = data.len().min(8);
                data[..n].copy_from_slice(&v[..n]);
                data[n..].fill(0xff);
            }
            1 => self.bar1_read(offset, data),
            PCI_CONFIG_REGION_INDEX => self.config.read(offset as usize, data),
            _ => {
                return Err(DeviceError::Access {
                    device: self.name().into(),
                    region,
                    what: "read",
                })
            }
        }
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        match region {
            0 => self.bar0_write(offset, data.len(), le_value(data)),
            1 => self.bar1_write(offset, data),
            PCI_CONFIG_REGION_INDEX => {
                self.config.write(offset as usize, data);
                self.update_intx();
            }
            _ => {
                return Err(DeviceError::Access {
                    device: self.name().into(),
                    region,
                    what: "write",
                })
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.regs = Registers::default();
        self.buffer.fill(0);
        self.msix_table.fill(0);
        self.config.reset_writable();
        self.irqs.clear();
        self.queued = None;
        Ok(())
    }

    fn quiesce(&mut self) {
        let _ = self.reset();
    }

    fn take_dma(&mut self) -> Option<DmaJob> {
        self.queued.take()
    }

    fn complete_dma(&mut self, job: DmaJob, result: Result<Vec<u8>, DmaError>) {
        if !self.dma_running() {
            return; // reset while in flight
        }
        match (job, result) {
            (DmaJob::Read { .. }, Ok(data)) => {
                let at = (self.regs.dma_dst - DMA_BUFFER) as usize;
                self.buffer[at..at + data.len()].copy_from_slice(&data);
                self.finish_dma(0);
            }
            (DmaJob::Write { .. }, Ok(_)) => self.finish_dma(0),
            (_, Err(_)) => self.finish_dma(DMA_ERR_UNMAPPED),
        }
    }
}
