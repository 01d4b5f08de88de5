//! A device that does what a test tells it and records what the server
//! asked of it: the transport (session dispatch, device DMA) is tested
//! in-process, command by command, with no hardware and no processes.

use airlock_protocol::device::{
    DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, PCI_CONFIG_REGION_INDEX, REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
};
use airlock_protocol::irqs::{IrqAction, IrqSet};

use super::{Device, DeviceError, DmaJob, RegionDesc};
use crate::dma::{DmaError, FileId};
use crate::iova::DoorbellWindow;

/// BAR0: read-write memory of this size.
pub const BAR0_SIZE: u64 = 0x1000;
/// BAR1: read-only, reads as 0xab.
pub const BAR1_SIZE: u64 = 0x100;
/// A write to this BAR0 offset starts the jobs in `dma_on_doorbell`.
pub const DOORBELL: u64 = 0x98;
/// IRQ indexes (INTx, MSI, MSI-X, ERR, REQ), one vector each.
pub const NUM_IRQS: u32 = 5;

#[derive(Default)]
pub struct MockDevice {
    pub bar0: Vec<u8>,
    pub config: Vec<u8>,
    /// What the server did, in order, one line per call.
    pub calls: Vec<String>,
    /// DMA_MAPs the device refuses (by IOVA).
    pub refuse_map_at: Option<u64>,
    /// Whether DEVICE_RESET fails.
    pub reset_fails: bool,
    pub windows: Vec<DoorbellWindow>,
    /// Jobs the device asks the server to carry out, now.
    pub dma_queue: Vec<DmaJob>,
    /// Jobs queued when BAR0's DOORBELL is written (as a driver starts DMA).
    pub dma_on_doorbell: Vec<DmaJob>,
    /// Outcomes of finished jobs.
    pub dma_done: Vec<(DmaJob, Result<Vec<u8>, DmaError>)>,
    /// The host took the device back (a VFIO device request); shared, so
    /// a test can raise it while a session runs.
    pub withdrawn: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MockDevice {
    pub fn new() -> Self {
        MockDevice {
            bar0: vec![0; BAR0_SIZE as usize],
            config: vec![0; 256],
            ..Default::default()
        }
    }

    /// Whether a call starting with `prefix` was recorded.
    pub fn called(&self, prefix: &str) -> bool {
        self.calls.iter().any(|c| c.starts_with(prefix))
    }
}

impl Device for MockDevice {
    fn name(&self) -> &str {
        "mock"
    }

    fn withdrawn(&self) -> bool {
        self.withdrawn.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn flags(&self) -> u32 {
        DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET
    }

    fn num_regions(&self) -> u32 {
        PCI_CONFIG_REGION_INDEX + 2
    }

    fn region(&self, index: u32) -> Option<RegionDesc<'_>> {
        let rw = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE;
        let (flags, size) = match index {
            0 => (rw, BAR0_SIZE),
            1 => (REGION_INFO_FLAG_READ, BAR1_SIZE),
            PCI_CONFIG_REGION_INDEX => (rw, 256),
            i if i < self.num_regions() => (0, 0),
            _ => return None,
        };
        Some(RegionDesc::by_message(flags, size))
    }

    fn num_irqs(&self) -> u32 {
        NUM_IRQS
    }

    fn irq_info(&self, index: u32) -> Option<(u32, u32)> {
        (index < NUM_IRQS).then_some((0, 1))
    }

    fn set_irqs(&mut self, set: IrqSet) -> Result<(), DeviceError> {
        let action = match set.action {
            IrqAction::Mask => "mask",
            IrqAction::Unmask => "unmask",
            IrqAction::Trigger => "trigger",
        };
        self.calls.push(format!(
            "set_irqs {} {} {} {action}",
            set.index, set.start, set.count
        ));
        Ok(())
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let at = offset as usize;
        match region {
            0 => data.copy_from_slice(&self.bar0[at..at + data.len()]),
            1 => data.fill(0xab),
            _ => data.copy_from_slice(&self.config[at..at + data.len()]),
        }
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let at = offset as usize;
        match region {
            0 => self.bar0[at..at + data.len()].copy_from_slice(data),
            _ => self.config[at..at + data.len()].copy_from_slice(data),
        }
        if region == 0 && offset == DOORBELL {
            self.dma_queue.append(&mut self.dma_on_doorbell);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.calls.push("reset".into());
        if self.reset_fails {
            return Err(DeviceError::NoReset("mock".into()));
        }
        Ok(())
    }

    fn quiesce(&mut self) {
        self.calls.push("quiesce".into());
    }

    fn dma_mapped(
        &mut self,
        iova: u64,
        size: u64,
        _host: Option<u64>,
        _flags: u32,
        file: Option<FileId>,
    ) -> Result<(), DeviceError> {
        if self.refuse_map_at == Some(iova) {
            return Err(DeviceError::Access {
                device: "mock".into(),
                region: 0,
                what: "DMA",
            });
        }
        self.calls.push(match file {
            Some(f) => format!("dma_mapped {iova:#x} {size:#x} fd@{:#x}", f.offset),
            None => format!("dma_mapped {iova:#x} {size:#x} nofd"),
        });
        Ok(())
    }

    fn adoption_ended(&mut self) {
        self.calls.push("adoption_ended".into());
    }

    fn dma_unmapped(&mut self, iova: u64, size: u64) {
        self.calls.push(format!("dma_unmapped {iova:#x} {size:#x}"));
    }

    /// One line for the step ("unmapped together N"), then each range as
    /// `dma_unmapped` records it.
    fn dma_unmapped_many(&mut self, ranges: &[(u64, u64)]) {
        self.calls
            .push(format!("unmapped together {}", ranges.len()));
        for &(iova, size) in ranges {
            self.dma_unmapped(iova, size);
        }
    }

    fn iova_windows(&self) -> Vec<DoorbellWindow> {
        self.windows.clone()
    }

    fn take_dma(&mut self) -> Option<DmaJob> {
        (!self.dma_queue.is_empty()).then(|| self.dma_queue.remove(0))
    }

    fn complete_dma(&mut self, job: DmaJob, result: Result<Vec<u8>, DmaError>) {
        self.dma_done.push((job, result));
    }
}
