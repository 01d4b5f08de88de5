//! The DMA checks: dma, dma-unmapped-blocked, dma-unmap-multi-blocked,
//! dma-map-msi-window-refused.

use std::os::fd::AsFd;
use std::time::Instant;

use airlock_protocol::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use airlock_protocol::dma_multi::{DmaMapEntry, DmaUnmapEntry};

use crate::checks::Probe;
use crate::device::*;
use crate::os::Memfd;
use crate::report::info;

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
const IOVA: u64 = 0x100000;
const IOVA_SIZE: usize = 2 << 20;
const IOVA_BACK: u64 = IOVA + 0x10000;
const IOVA_GONE: u64 = 0x400000;
const GONE_SIZE: usize = 64 << 10;

/// The 2 MiB memfd mapped at IOVA with bus mastering on (made once).
fn first_map(p: &mut Probe) -> Result<(), String> {
    if p.mem.is_some() {
        return Ok(());
    }
    let mem = Memfd::new(c"airlock-probe-dma", IOVA_SIZE)?;
    p.dev
        .client
        .dma_map(IOVA, IOVA_SIZE as u64, 0, RW, Some(mem.fd.as_fd()))
        .map_err(|e| format!("DMA_MAP {IOVA:#x}+{IOVA_SIZE:#x}: {e}"))?;
    p.mem = Some(mem);
    p.dev.enable_bus_master()
}

/// Reads 0xa0: all-ones on QEMU's edu (no such register); on airlock's
/// emulated edu a DMA error register. Returns it if it is airlock's.
fn dma_error(d: &mut Dev) -> Result<Option<u32>, String> {
    let v = d.read32(REG_DMA_ERROR)?;
    Ok((v != u32::MAX).then_some(v))
}

pub(crate) fn dma(p: &mut Probe) -> Result<(), String> {
    first_map(p)?;
    let mem = p.mem.as_ref().expect("first_map made it");
    let pattern = |i: usize| (i * 7 + 3) as u8 ^ (i >> 8) as u8;
    mem.map.fill(0, 4096, pattern);
    mem.map.fill(0x10000, 4096, |_| 0);
    let t = Instant::now();
    p.dev.dma(IOVA, DMA_BUFFER, 4096, 1)?;
    p.dev.dma(DMA_BUFFER, IOVA_BACK, 4096, 3)?;
    info(&format!(
        "dma: 2 x 4096 bytes in {} ms ({})",
        t.elapsed().as_millis(),
        if p.dev.mapped() {
            "registers via mmap"
        } else {
            "registers via messages"
        }
    ));
    if let Some(e) = dma_error(&mut p.dev)? {
        if e != 0 {
            return Err(format!("DMA error register {e:#x}"));
        }
    }
    let back = mem.map.bytes(0x10000, 4096);
    let want: Vec<u8> = (0..4096).map(pattern).collect();
    match back.iter().zip(&want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "byte {i} came back {:#04x}, sent {:#04x}",
            back[i], want[i]
        )),
    }
}

pub(crate) fn dma_unmapped_blocked(p: &mut Probe) -> Result<(), String> {
    first_map(p)?;
    let gone = Memfd::new(c"airlock-probe-unmapped", GONE_SIZE)?;
    gone.map.fill(0, GONE_SIZE, |_| 0x5a);
    let c = &mut p.dev.client;
    c.dma_map(IOVA_GONE, GONE_SIZE as u64, 0, RW, Some(gone.fd.as_fd()))
        .map_err(|e| format!("DMA_MAP {IOVA_GONE:#x}: {e}"))?;
    c.dma_unmap(IOVA_GONE, GONE_SIZE as u64, 0)
        .map_err(|e| format!("DMA_UNMAP {IOVA_GONE:#x}: {e}"))?;
    dma_blocked(p, &gone, IOVA_GONE, "dma-unmapped-blocked")
}

/// The same with batches: GONE as 16 adjacent 4 KiB maps in one
/// DMA_MAP_MULTI (one fd), all taken back in one DMA_UNMAP_MULTI, which
/// airlock unmaps from a passthrough device's IOMMU with one call over the
/// joined range. A device DMA into the middle of the range must not land.
pub(crate) fn dma_unmap_multi_blocked(p: &mut Probe) -> Result<(), String> {
    if !p.dma_multiple {
        return Err(
            "the server did not answer the dma_multiple capability the probe proposed".into(),
        );
    }
    first_map(p)?;
    const PIECE: u64 = 4096;
    let gone = Memfd::new(c"airlock-probe-unmapped-multi", GONE_SIZE)?;
    gone.map.fill(0, GONE_SIZE, |_| 0x5a);
    let maps: Vec<DmaMapEntry> = (0..GONE_SIZE as u64 / PIECE)
        .map(|i| DmaMapEntry {
            flags: RW,
            fd_index: 0,
            offset: i * PIECE,
            iova: IOVA_GONE + i * PIECE,
            size: PIECE,
        })
        .collect();
    let unmaps: Vec<DmaUnmapEntry> = maps
        .iter()
        .rev()
        .map(|m| DmaUnmapEntry {
            flags: 0,
            iova: m.iova,
            size: m.size,
        })
        .collect();
    let c = &mut p.dev.client;
    let refused = |e: &[u32]| e.len() != maps.len() || e.iter().any(|&x| x != 0);
    let mapped = c
        .dma_map_multi(&maps, &[gone.fd.as_fd()])
        .map_err(|e| format!("DMA_MAP_MULTI of {} at {IOVA_GONE:#x}: {e}", maps.len()))?;
    if refused(&mapped) {
        return Err(format!("DMA_MAP_MULTI errnos {mapped:?}"));
    }
    let unmapped = c
        .dma_unmap_multi(&unmaps)
        .map_err(|e| format!("DMA_UNMAP_MULTI of {}: {e}", unmaps.len()))?;
    if refused(&unmapped) {
        return Err(format!("DMA_UNMAP_MULTI errnos {unmapped:?}"));
    }
    let middle = IOVA_GONE + GONE_SIZE as u64 / 2;
    dma_blocked(p, &gone, middle, "dma-unmap-multi-blocked")
}

/// A device copy from mapped RAM works, and one into `iova` (in `gone`,
/// which the client took back) changes nothing of it; airlock's edu says
/// so in its DMA error register.
fn dma_blocked(p: &mut Probe, gone: &Memfd, iova: u64, check: &str) -> Result<(), String> {
    let mem = p.mem.as_ref().expect("first_map made it");
    mem.map.fill(0, 4096, |i| (i as u8).wrapping_mul(31) ^ 0xc3);
    p.dev.dma(IOVA, DMA_BUFFER, 4096, 1)?;
    if let Some(e) = dma_error(&mut p.dev)? {
        if e != 0 {
            return Err(format!("DMA error {e:#x} on the mapped RAM -> device copy"));
        }
    }
    p.dev.dma(DMA_BUFFER, iova, 4096, 3)?;
    let changed = gone
        .map
        .bytes(0, GONE_SIZE)
        .iter()
        .filter(|b| **b != 0x5a)
        .count();
    if changed != 0 {
        return Err(format!(
            "{changed} bytes of the unmapped memfd changed: the device reached it at {iova:#x} after the client unmapped it"
        ));
    }
    if let Some(e) = dma_error(&mut p.dev)? {
        if e & 1 == 0 {
            return Err(format!(
                "airlock's DMA error register is {e:#x}, bit 0 (unmapped) not set"
            ));
        }
        p.dev.write32(REG_DMA_ERROR, 0)?;
        info(&format!("{check}: DMA error register {e:#x}, cleared"));
    }
    Ok(())
}

/// DMA_MAP of 64 KiB at the start of the host's MSI doorbell window must get
/// an error reply (non-zero errno); the same map just past the window must
/// succeed. Both are undone.
pub(crate) fn dma_map_msi_window_refused(
    p: &mut Probe,
    start: u64,
    size: u64,
) -> Result<(), String> {
    const LEN: usize = 64 << 10;
    let mem = Memfd::new(c"airlock-probe-msi-window", LEN)?;
    let c = &mut p.dev.client;
    match c.dma_map(start, LEN as u64, 0, RW, Some(mem.fd.as_fd())) {
        Err(airlock_protocol::ProtocolError::Remote { errno }) if errno != 0 => info(&format!(
            "dma-map-msi-window-refused: DMA_MAP {start:#x}+{LEN:#x} refused with errno {errno} ({})",
            std::io::Error::from_raw_os_error(errno as i32)
        )),
        Err(e) => return Err(format!("DMA_MAP {start:#x}+{LEN:#x}: {e} (wanted an error reply with an errno)")),
        Ok(()) => {
            let undo = c.dma_unmap(start, LEN as u64, 0);
            return Err(format!(
                "DMA_MAP {start:#x}+{LEN:#x} inside the MSI window {start:#x}+{size:#x} succeeded{}",
                match undo {
                    Ok(_) => String::new(),
                    Err(e) => format!(" (and DMA_UNMAP failed: {e})"),
                }
            ));
        }
    }
    let outside = start + size;
    c.dma_map(outside, LEN as u64, 0, RW, Some(mem.fd.as_fd()))
        .map_err(|e| format!("DMA_MAP {outside:#x}+{LEN:#x} just past the MSI window: {e}"))?;
    c.dma_unmap(outside, LEN as u64, 0)
        .map_err(|e| format!("DMA_UNMAP {outside:#x}+{LEN:#x}: {e}"))?;
    Ok(())
}
