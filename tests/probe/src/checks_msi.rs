//! The MSI checks: msi and msi-no-wakeups (raise, eventfd, ack; wakeups).

use std::time::{Duration, Instant};

use airlock_protocol::device::PCI_MSI_IRQ_INDEX;
use airlock_protocol::irqs::{IrqAction, IrqData};

use crate::checks::Probe;
use crate::device::*;
use crate::os::EventFd;
use crate::report::{info, Outcome, Report};
use crate::spent::context_switches;

fn ctx(pid: Option<u32>) -> Result<Option<u64>, String> {
    pid.map(context_switches).transpose()
}

pub(crate) fn msi(report: &mut Report, p: &mut Probe) {
    let n = (p.args.iterations / 10).max(20);
    let mut grew = None;
    report.check("msi", || msi_loop(p, n, &mut grew).into());
    let why_not = if !p.dev.mapped() {
        Some("BAR0 is not mmap'd: raise/ack go through airlock")
    } else if p.args.airlock_pid.is_none() {
        Some("no --airlock-pid")
    } else if grew.is_none() {
        Some("msi did not complete")
    } else {
        None
    };
    report.check("msi-no-wakeups", || match (why_not, grew) {
        (Some(why), _) => Outcome::Skip(why.into()),
        (None, Some(g)) if g < (n / 4) as u64 => Outcome::Pass,
        (None, g) => Outcome::Fail(format!(
            "airlock switched context {} times for {n} interrupts (limit < {})",
            g.unwrap_or(0),
            n / 4
        )),
    });
}

fn msi_loop(p: &mut Probe, n: u32, grew: &mut Option<u64>) -> Result<(), String> {
    let e = EventFd::new()?;
    p.dev
        .client
        .set_irqs(
            PCI_MSI_IRQ_INDEX,
            0,
            1,
            IrqAction::Trigger,
            IrqData::Eventfds(vec![e.dup()?]),
        )
        .map_err(|e| format!("SET_IRQS MSI eventfd: {e}"))?;
    let d = &mut p.dev;
    let r = (|| {
        let before = ctx(p.args.airlock_pid)?;
        let t = Instant::now();
        for i in 0..n {
            d.write32(REG_IRQ_RAISE, 1)?;
            e.wait(Duration::from_secs(5))
                .map_err(|err| format!("interrupt {i} of {n}: {err}"))?;
            d.write32(REG_IRQ_ACK, 1)?;
        }
        let us = t.elapsed().as_micros() / n as u128;
        let after = ctx(p.args.airlock_pid)?;
        if let (Some(b), Some(a)) = (before, after) {
            *grew = Some(a.saturating_sub(b));
            info(&format!(
                "msi: {n} interrupts, {us} us each; airlock context switches +{} (limit < {})",
                a.saturating_sub(b),
                n / 4
            ));
        } else {
            info(&format!("msi: {n} interrupts, {us} us each"));
        }
        let st = d.read32(REG_IRQ_STATUS)?;
        if st & 1 != 0 {
            return Err(format!("irq status {st:#x} after the last ack"));
        }
        if let Some(extra) = e.take() {
            return Err(format!("{extra} spurious interrupt(s) after the last ack"));
        }
        // While the vector is still enabled: how the host kernel routes it
        // (IR-PCI-MSI behind intel-iommu, ITS-MSI behind an arm64 GICv3 ITS).
        show_interrupts("msi: /proc/interrupts while enabled");
        Ok(())
    })();
    let off = d
        .client
        .set_irqs(PCI_MSI_IRQ_INDEX, 0, 0, IrqAction::Trigger, IrqData::None)
        .map_err(|e| format!("SET_IRQS MSI off: {e}"));
    r.and(off)
}

/// Prints the /proc/interrupts lines of VFIO's vectors (as INFO lines).
fn show_interrupts(what: &str) {
    match std::fs::read_to_string("/proc/interrupts") {
        Ok(s) => {
            let lines: Vec<String> = s
                .lines()
                .filter(|l| l.contains("vfio"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect();
            if lines.is_empty() {
                info(&format!("{what}: no vfio line"));
            }
            for l in lines {
                info(&format!("{what}: {l}"));
            }
        }
        Err(e) => info(&format!("{what}: not readable ({e})")),
    }
}
