//! The checks, in order, against an edu-compatible device opened through VFIO.

use crate::edu::{self, Bar0};
use crate::os::{DmaBuf, EventFd};
use crate::report::{info, Outcome, Report};
use crate::sysfs;
use crate::vfio::{self, Container, Device, Group};
use std::time::{Duration, Instant};

/// Upper bound for every wait (an edu DMA takes ~100 ms of virtual time).
pub const TIMEOUT: Duration = Duration::from_secs(5);
const PAGE: u64 = 4096;
/// IOVAs below edu's default 28-bit DMA mask.
const IOVA_A: u64 = 0x10_0000;
const IOVA_B: u64 = 0x20_0000;
const IOVA_C: u64 = 0x30_0000;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// Declared so that they drop device, then group, then container.
pub struct Vfio {
    pub device: Device,
    /// Held only to keep the group attached to the container.
    _group: Group,
    pub container: Container,
}

/// Binds the device to vfio-pci and opens it through a type1 container.
pub fn open(bdf_arg: Option<&str>) -> Result<Vfio, String> {
    let bdf = match bdf_arg {
        Some(b) => b.to_string(),
        None => sysfs::find_device(edu::VENDOR, edu::DEVICE)?,
    };
    info(&format!(
        "device {bdf}, driver {}",
        sysfs::driver(&bdf).unwrap_or("none".into())
    ));
    sysfs::bind_vfio_pci(&bdf, TIMEOUT)?;
    let g = sysfs::iommu_group(&bdf, TIMEOUT)?;
    let container = Container::open()?;
    let group = vfio::Group::open(g)?;
    group.set_container(&container)?;
    let mut container = container;
    let t = container.set_iommu()?;
    let device = group.device(&bdf)?;
    let name = if t == vfio::VFIO_TYPE1V2_IOMMU {
        "type1v2"
    } else {
        "type1"
    };
    info(&format!("iommu group {g}, container iommu {name}"));
    Ok(Vfio {
        device,
        _group: group,
        container,
    })
}

fn pattern(seed: u32, i: usize) -> u8 {
    ((i as u32).wrapping_mul(31).wrapping_add(seed) ^ (i as u32 >> 8)) as u8
}

fn compare(got: &[u8], want: &[u8]) -> Result<(), String> {
    let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
    match bad.first() {
        None => Ok(()),
        Some(&i) => Err(format!(
            "{} of {} bytes differ; first at {i:#x}: got {:#04x}, want {:#04x}",
            bad.len(),
            want.len(),
            got[i],
            want[i]
        )),
    }
}

/// The two mapped DMA buffers.
struct Dma {
    a: DmaBuf,
    b: DmaBuf,
}

struct Ctx<'v> {
    v: &'v Vfio,
    bar: Bar0<'v>,
    msix_count: u32,
    dma: Option<Dma>,
}

impl Ctx<'_> {
    fn config_command(&self) -> Result<(u64, u16), String> {
        let ri = self.v.device.region_info(vfio::PCI_CONFIG_REGION_INDEX)?;
        let mut b = [0u8; 2];
        self.v.device.read_at(&mut b, ri.offset + PCI_COMMAND)?;
        Ok((ri.offset + PCI_COMMAND, u16::from_le_bytes(b)))
    }

    /// Sets and clears bits of the PCI command register; returns the new value.
    fn update_command(&self, set: u16, clear: u16) -> Result<u16, String> {
        let (at, old) = self.config_command()?;
        let new = (old | set) & !clear;
        self.v.device.write_at(&new.to_le_bytes(), at)?;
        let (_, now) = self.config_command()?;
        if now & (set | clear) != set {
            return Err(format!(
                "command register {now:#06x} after writing {new:#06x} (was {old:#06x})"
            ));
        }
        Ok(now)
    }

    fn ident(&self) -> Outcome {
        let v = self.bar.read32(edu::IDENT);
        if v == edu::IDENT_VALUE {
            Outcome::Pass
        } else {
            Outcome::Fail(format!("ident {v:#010x}, want {:#010x}", edu::IDENT_VALUE))
        }
    }

    fn liveness(&self) -> Outcome {
        let w = 0x1234_5678u32;
        self.bar.write32(edu::LIVENESS, w);
        let v = self.bar.read32(edu::LIVENESS);
        if v == !w {
            Outcome::Pass
        } else {
            Outcome::Fail(format!(
                "wrote {w:#010x}, read {v:#010x}, want {:#010x}",
                !w
            ))
        }
    }

    fn factorial(&self) -> Result<(), String> {
        self.bar.write32(edu::FACTORIAL, 10);
        self.bar
            .wait_clear(edu::STATUS, edu::STATUS_COMPUTING, TIMEOUT)?;
        let v = self.bar.read32(edu::FACTORIAL);
        if v != 3_628_800 {
            return Err(format!("10! read as {v}, want 3628800"));
        }
        Ok(())
    }

    fn mmio_read_time(&self) -> Result<(), String> {
        const BATCHES: usize = 5;
        const READS: usize = 20_000 / BATCHES;
        let want = !0x1234_5678u32;
        self.bar.write32(edu::LIVENESS, 0x1234_5678);
        let mut per_read = Vec::new();
        let mut wrong = 0usize;
        for _ in 0..BATCHES {
            // Instant is CLOCK_MONOTONIC on Linux.
            let t = Instant::now();
            for _ in 0..READS {
                wrong += (self.bar.read32(edu::LIVENESS) != want) as usize;
            }
            per_read.push(t.elapsed().as_nanos() / READS as u128);
        }
        per_read.sort();
        let how = if self.bar.is_mmap() { "mmap" } else { "pread" };
        info(&format!(
            "mmio-read batches ({how}, {READS} reads each, ns/read): {per_read:?}"
        ));
        info(&format!("mmio-read-ns {}", per_read[BATCHES / 2]));
        if wrong > 0 {
            return Err(format!(
                "{wrong} of {} liveness reads returned a wrong value",
                READS * BATCHES
            ));
        }
        Ok(())
    }

    fn dma_setup(&mut self) -> Result<(), String> {
        let cmd = self.update_command(PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY, 0)?;
        info(&format!("PCI command {cmd:#06x} (bus master on)"));
        let a = DmaBuf::new(PAGE as usize)?;
        let b = DmaBuf::new(PAGE as usize)?;
        let c = &self.v.container;
        c.map_dma(a.addr(), IOVA_A, PAGE)?;
        if let Err(e) = c.map_dma(b.addr(), IOVA_B, PAGE) {
            let _ = c.unmap_dma(IOVA_A, PAGE);
            return Err(e);
        }
        info(&format!(
            "DMA buffers mapped at IOVA {IOVA_A:#x} and {IOVA_B:#x}"
        ));
        self.dma = Some(Dma { a, b });
        Ok(())
    }

    fn dma_to_device(&self, d: &Dma) -> Result<(), String> {
        d.a.fill(|i| pattern(0x11, i));
        let t = self.bar.dma(
            IOVA_A,
            edu::DEV_BUF,
            edu::DEV_BUF_SIZE as u32,
            false,
            TIMEOUT,
        )?;
        info(&format!("dma-to-device took {} ms", t.as_millis()));
        Ok(())
    }

    fn dma_from_device(&self, d: &Dma) -> Result<(), String> {
        d.b.fill(|_| 0);
        let t = self.bar.dma(
            edu::DEV_BUF,
            IOVA_B,
            edu::DEV_BUF_SIZE as u32,
            true,
            TIMEOUT,
        )?;
        info(&format!("dma-from-device took {} ms", t.as_millis()));
        compare(&d.b.read(), &d.a.read())
    }

    fn irq_status_clear(&self) -> Result<(), String> {
        match self.bar.read32(edu::IRQ_STATUS) {
            0 => Ok(()),
            s => Err(format!("irq status {s:#x} after ack, want 0")),
        }
    }

    fn msi(&self) -> Result<(), String> {
        let dev = &self.v.device;
        let ii = dev.irq_info(vfio::PCI_MSI_IRQ_INDEX)?;
        if ii.count == 0 {
            return Err("device has no MSI (irq info count 0)".into());
        }
        let efd = EventFd::new()?;
        self.bar.write32(edu::IRQ_ACK, !0);
        dev.irq_eventfds(vfio::PCI_MSI_IRQ_INDEX, 0, &[efd.fd()])?;
        let r = (|| {
            self.bar.write32(edu::IRQ_RAISE, 1);
            efd.wait(TIMEOUT).map_err(|e| format!("after raise: {e}"))?;
            self.bar.write32(edu::IRQ_ACK, 1);
            print_vfio_interrupts("msi");
            self.irq_status_clear()
        })();
        let d = dev.irq_disable(vfio::PCI_MSI_IRQ_INDEX);
        r.and(d)
    }

    fn msix(&self, report: &mut Report) {
        let n = self.msix_count;
        if n == 0 {
            report.record(
                "msix",
                Outcome::Skip("device has no MSI-X (QEMU's in-process edu)".into()),
            );
            return;
        }
        if report.skipped_by_user("msix") {
            report.record("msix", Outcome::Skip("skipped by --skip".into()));
            return;
        }
        let dev = &self.v.device;
        let efds: Result<Vec<EventFd>, String> = (0..n).map(|_| EventFd::new()).collect();
        let efds = match efds {
            Ok(e) => e,
            Err(e) => {
                report.record("msix", Outcome::Fail(e));
                return;
            }
        };
        let fds: Vec<i32> = efds.iter().map(|e| e.fd()).collect();
        if let Err(e) = dev.irq_eventfds(vfio::PCI_MSIX_IRQ_INDEX, 0, &fds) {
            report.record("msix", Outcome::Fail(e));
            return;
        }
        info(&format!("MSI-X: {n} vectors enabled"));
        for v in 0..n {
            report.check(&format!("msix-vector-{v}"), || {
                Outcome::from((|| {
                    for e in &efds {
                        e.take();
                    }
                    self.bar.write32(edu::MSIX_RAISE, v);
                    efds[v as usize].wait(TIMEOUT)?;
                    std::thread::sleep(Duration::from_millis(10));
                    let others: Vec<u32> = (0..n)
                        .filter(|&o| o != v && efds[o as usize].take().is_some())
                        .collect();
                    if !others.is_empty() {
                        return Err(format!("vectors {others:?} also fired"));
                    }
                    Ok(())
                })())
            });
        }
        print_vfio_interrupts("msix");
        if let Err(e) = dev.irq_disable(vfio::PCI_MSIX_IRQ_INDEX) {
            report.record("msix-disable", Outcome::Fail(e));
        }
    }

    fn intx(&self) -> Result<(), String> {
        let dev = &self.v.device;
        let idx = vfio::PCI_INTX_IRQ_INDEX;
        let ii = dev.irq_info(idx)?;
        if ii.count == 0 {
            return Err("device has no INTx (irq info count 0)".into());
        }
        let efd = EventFd::new()?;
        self.bar.write32(edu::IRQ_ACK, !0);
        dev.irq_eventfds(idx, 0, &[efd.fd()])?;
        let r = (|| {
            for round in ["first", "second (after unmask)"] {
                self.bar.write32(edu::IRQ_RAISE, 1);
                efd.wait(TIMEOUT)
                    .map_err(|e| format!("{round} interrupt: {e}"))?;
                self.bar.write32(edu::IRQ_ACK, 1);
                dev.irq_unmask(idx)?;
            }
            self.irq_status_clear()
        })();
        let d = dev.irq_disable(idx);
        r.and(d)
    }

    fn dma_unmapped_blocked(&self, d: &Dma) -> Result<(), String> {
        let c = DmaBuf::new(PAGE as usize)?;
        c.fill(|_| 0x5a);
        let ct = &self.v.container;
        ct.map_dma(c.addr(), IOVA_C, PAGE)?;
        let n = ct.unmap_dma(IOVA_C, PAGE)?;
        if n != PAGE {
            return Err(format!(
                "VFIO_IOMMU_UNMAP_DMA unmapped {n:#x} bytes, want {PAGE:#x}"
            ));
        }
        // New contents in the device buffer, proven by a control read-back into B.
        d.a.fill(|i| pattern(0xa7, i));
        self.bar
            .dma(IOVA_A, edu::DEV_BUF, PAGE as u32, false, TIMEOUT)?;
        d.b.fill(|_| 0);
        self.bar
            .dma(edu::DEV_BUF, IOVA_B, PAGE as u32, true, TIMEOUT)?;
        compare(&d.b.read(), &d.a.read()).map_err(|e| format!("control DMA via B: {e}"))?;

        let airlock = self.msix_count > 0;
        if airlock {
            self.bar.write32(edu::DMA_ERROR, 0);
        }
        self.bar
            .dma(edu::DEV_BUF, IOVA_C, PAGE as u32, true, TIMEOUT)
            .map_err(|e| format!("DMA to unmapped IOVA: {e}"))?;
        let changed = c.read().iter().filter(|&&x| x != 0x5a).count();
        if changed > 0 {
            return Err(format!(
                "{changed} bytes of the unmapped buffer were overwritten"
            ));
        }
        if !airlock {
            info("in-process edu has no DMA error register (no MSI-X): register part skipped");
            return Ok(());
        }
        let e = self.bar.read32(edu::DMA_ERROR);
        info(&format!("dma-error-register {e:#x}"));
        if e & 1 == 0 {
            return Err(format!(
                "DMA error register {e:#x}: bit0 (IOVA not mapped) not set"
            ));
        }
        self.bar.write32(edu::DMA_ERROR, 0);
        match self.bar.read32(edu::DMA_ERROR) {
            0 => Ok(()),
            v => Err(format!("DMA error register {v:#x} after writing 0")),
        }
    }

    fn teardown(&mut self) -> Result<(), String> {
        let mut errs = Vec::new();
        if let Err(e) = self.update_command(0, PCI_COMMAND_MASTER) {
            errs.push(format!("disable bus master: {e}"));
        }
        if self.dma.take().is_some() {
            for iova in [IOVA_A, IOVA_B] {
                if let Err(e) = self.v.container.unmap_dma(iova, PAGE) {
                    errs.push(e);
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}

/// Prints the guest's /proc/interrupts lines for VFIO's vectors as
/// `INFO interrupts <label>: <line>` (whitespace collapsed). VFIO requests
/// those irqs only while the index is enabled, so call it before disabling.
/// The line names the interrupt controller (e.g. ITS-MSI, GICv2m-MSI, PCI-MSI).
fn print_vfio_interrupts(label: &str) {
    match std::fs::read_to_string("/proc/interrupts") {
        Ok(s) => {
            let mut any = false;
            for l in s.lines().filter(|l| l.contains("vfio")) {
                any = true;
                let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
                info(&format!("interrupts {label}: {l}"));
            }
            if !any {
                info(&format!(
                    "interrupts {label}: no vfio lines in /proc/interrupts"
                ));
            }
        }
        Err(e) => info(&format!("interrupts {label}: /proc/interrupts: {e}")),
    }
}

fn skip_no_dma() -> Outcome {
    Outcome::Skip("dma-setup did not succeed".into())
}

/// Runs every check after vfio-setup, reporting each.
pub fn run(report: &mut Report, v: &Vfio) {
    let bar = match Bar0::open(&v.device) {
        Ok(b) => b,
        Err(e) => {
            report.record("bar0", Outcome::Fail(e));
            return;
        }
    };
    let count = |i| v.device.irq_info(i).map(|ii| ii.count).unwrap_or(0);
    let msix_count = count(vfio::PCI_MSIX_IRQ_INDEX);
    info(&format!(
        "irqs: intx {} msi {} msix {}",
        count(vfio::PCI_INTX_IRQ_INDEX),
        count(vfio::PCI_MSI_IRQ_INDEX),
        msix_count
    ));
    let mut cx = Ctx {
        v,
        bar,
        msix_count,
        dma: None,
    };

    report.check("ident", || cx.ident());
    report.check("liveness", || cx.liveness());
    report.check("factorial", || cx.factorial().into());
    report.check("mmio-read-time", || cx.mmio_read_time().into());
    report.check("dma-setup", || cx.dma_setup().into());
    report.check("dma-to-device", || {
        cx.dma
            .as_ref()
            .map_or_else(skip_no_dma, |d| cx.dma_to_device(d).into())
    });
    report.check("dma-from-device", || {
        cx.dma
            .as_ref()
            .map_or_else(skip_no_dma, |d| cx.dma_from_device(d).into())
    });
    report.check("msi", || cx.msi().into());
    cx.msix(report);
    report.check("intx", || cx.intx().into());
    report.check("dma-unmapped-blocked", || {
        cx.dma
            .as_ref()
            .map_or_else(skip_no_dma, |d| cx.dma_unmapped_blocked(d).into())
    });
    let t = cx.teardown();
    report.record("teardown", t.into());
}
