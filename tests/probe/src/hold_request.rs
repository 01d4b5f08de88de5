//! `--hold-request SECONDS`: the client side of the host's device request.
//! The probe holds the device as a guest's QEMU would (a DMA map, bus
//! mastering, an MSI eventfd) with a REQ eventfd (index 4) registered, says
//! so on stdout, and waits for the request (the test unbinds the device
//! from vfio-pci meanwhile). When the eventfd fires it lets the device go,
//! as QEMU does once its guest has released it, and reports how long the
//! relay took.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use airlock_protocol::device::PCI_MSI_IRQ_INDEX;
use airlock_protocol::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use airlock_protocol::irqs::{IrqAction, IrqData};

use crate::os::{EventFd, Memfd};
use crate::report::{Outcome, Report};
use crate::restart::connect;

/// vfio-pci's REQ interrupt index.
const REQ_INDEX: u32 = 4;

pub fn run(report: &mut Report, socket: &str, seconds: u64) {
    let name = "device-request-relayed";
    let outcome = match hold(socket, seconds) {
        Ok(ms) => {
            crate::report::info(&format!(
                "hold-request: the REQ eventfd fired {ms} ms after the device was held; the client let the device go"
            ));
            Outcome::Pass
        }
        Err(e) => Outcome::Fail(e),
    };
    report.record(name, outcome);
}

fn hold(socket: &str, seconds: u64) -> Result<u128, String> {
    let mut dev = connect(socket)?;
    let info = dev
        .client
        .irq_info(REQ_INDEX)
        .map_err(|e| format!("GET_IRQ_INFO REQ: {e}"))?;
    if info.count != 1 {
        return Err(format!(
            "the device offers {} REQ vectors, not 1",
            info.count
        ));
    }
    let mem = Memfd::new(c"probe-req", 1 << 20)?;
    let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
    dev.client
        .dma_map(0x100000, 1 << 20, 0, rw, Some(mem.fd.as_fd()))
        .map_err(|e| format!("DMA_MAP: {e}"))?;
    dev.enable_bus_master()?;
    let msi = EventFd::new()?;
    dev.client
        .set_irqs(
            PCI_MSI_IRQ_INDEX,
            0,
            1,
            IrqAction::Trigger,
            IrqData::Eventfds(vec![msi.dup()?]),
        )
        .map_err(|e| format!("SET_IRQS MSI eventfd: {e}"))?;
    let req = EventFd::new()?;
    dev.client
        .set_irqs(
            REQ_INDEX,
            0,
            1,
            IrqAction::Trigger,
            IrqData::Eventfds(vec![req.dup()?]),
        )
        .map_err(|e| format!("SET_IRQS REQ eventfd: {e}"))?;
    if req.take().is_some() {
        return Err("the REQ eventfd fired before any request".into());
    }
    let since = Instant::now();
    crate::report::info("hold-request: holding the device with a REQ eventfd registered");
    req.wait(Duration::from_secs(seconds))
        .map_err(|e| format!("no device request reached the client: {e}"))?;
    let ms = since.elapsed().as_millis();
    drop(dev);
    Ok(ms)
}
