//! upgrade-broken (only with --broken-upgrades, as it replaces airlock's
//! installed binary for a moment): a live upgrade to a binary that exits at
//! once, then to one that hangs. Each time the running airlock must kill
//! the successor and serve on: the probe's connection, set up as a guest
//! driver would (a DMA map, bus mastering, an MSI eventfd, a value in the
//! liveness register), stays up throughout, the server is never stopped,
//! and afterwards the device still holds the value, DMAs and interrupts
//! (no reset). The real binary is put back at the end.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_protocol::device::PCI_MSI_IRQ_INDEX;
use airlock_protocol::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use airlock_protocol::irqs::{IrqAction, IrqData};

use crate::device::*;
use crate::os::{EventFd, Memfd};
use crate::report::{info, Outcome};

const IOVA: u64 = 0x1000000;
const SIZE: usize = 64 << 10;
const SENTINEL: u32 = 0x0b51_ca7e;

pub fn broken_upgrades(socket: &str, supervisor: Option<u32>, enabled: bool) -> Outcome {
    if !enabled {
        return Outcome::Skip("no --broken-upgrades (it replaces airlock's binary)".into());
    }
    let Some(sup) = supervisor else {
        return Outcome::Skip("no --airlock-pid".into());
    };
    let exe = match installed_path(sup) {
        Ok(p) => p,
        Err(e) => return Outcome::Skip(e),
    };
    let good = exe.with_extension("probe-good");
    if let Err(e) = std::fs::rename(&exe, &good) {
        return Outcome::Fail(format!("moving {} aside: {e}", exe.display()));
    }
    let r = run(socket, sup, &exe);
    if let Err(e) = std::fs::rename(&good, &exe) {
        return Outcome::Fail(format!("putting {} back: {e}", exe.display()));
    }
    r.into()
}

/// The absolute path the supervisor was started from (what SIGUSR2 runs).
fn installed_path(sup: u32) -> Result<PathBuf, String> {
    let cmdline = std::fs::read(format!("/proc/{sup}/cmdline")).map_err(|e| e.to_string())?;
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let p = PathBuf::from(String::from_utf8_lossy(argv0).into_owned());
    if !p.is_absolute() {
        return Err(format!(
            "airlock was started as {p:?}, not by an absolute path"
        ));
    }
    Ok(p)
}

fn children(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn install(exe: &Path, script: &str) -> Result<(), String> {
    let tmp = exe.with_extension("probe-new");
    std::fs::write(&tmp, script).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .and_then(|_| std::fs::rename(&tmp, exe))
        .map_err(|e| format!("installing {}: {e}", exe.display()))
}

/// Waits until the supervisor has only its server again, having started
/// (and lost) a successor; returns how long that took.
fn wait_settled(sup: u32, server: i32, limit: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let mut seen = false;
    while t.elapsed() < limit {
        let c = children(sup);
        if c.is_empty() {
            return Err(format!("airlock pid {sup} has no server any more: {c:?}"));
        }
        seen |= c.iter().any(|&p| p != server);
        // An airlock that exits at once may come and go unseen.
        if c == [server] && (seen || t.elapsed() > Duration::from_secs(2)) {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "the successor was still there {} s after SIGUSR2",
        limit.as_secs()
    ))
}

fn run(socket: &str, sup: u32, exe: &Path) -> Result<(), String> {
    let mut dev = crate::restart::connect(socket)?;
    let mem = Memfd::new(c"airlock-probe-broken-upgrade", SIZE)?;
    let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
    dev.client
        .dma_map(IOVA, SIZE as u64, 0, rw, Some(mem.fd.as_fd()))
        .map_err(|e| format!("DMA_MAP: {e}"))?;
    dev.enable_bus_master()?;
    let irq = EventFd::new()?;
    dev.client
        .set_irqs(
            PCI_MSI_IRQ_INDEX,
            0,
            1,
            IrqAction::Trigger,
            IrqData::Eventfds(vec![irq.dup()?]),
        )
        .map_err(|e| format!("SET_IRQS MSI eventfd: {e}"))?;
    dev.msg_write32(REG_LIVENESS, SENTINEL)?;
    let server = *children(sup).first().ok_or("airlock has no server")?;
    for (what, script, limit) in [
        ("a binary that exits at once", "#!/bin/sh\nexit 1\n", 10),
        ("a binary that hangs", "#!/bin/sh\nexec sleep 600\n", 30),
    ] {
        install(exe, script)?;
        // SAFETY: kill has no memory arguments.
        if unsafe { libc::kill(sup as i32, libc::SIGUSR2) } != 0 {
            return Err(format!(
                "SIGUSR2 to {sup}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let took = wait_settled(sup, server, Duration::from_secs(limit))?;
        let live = dev.msg_read32(REG_LIVENESS)?;
        if live != !SENTINEL {
            return Err(format!(
                "after an upgrade to {what}: liveness reads {live:#x}, expected {:#x}: the device was reset",
                !SENTINEL
            ));
        }
        mem.map.fill(0, 4096, |i| i as u8 ^ 0x5a);
        dev.dma(IOVA, DMA_BUFFER, 4096, 1)?;
        let _ = irq.take();
        dev.msg_write32(REG_IRQ_RAISE, 1)?;
        irq.wait(Duration::from_secs(5))
            .map_err(|e| format!("MSI after an upgrade to {what}: {e}"))?;
        dev.msg_write32(REG_IRQ_ACK, 1)?;
        info(&format!(
            "upgrade-broken: an upgrade to {what} was given up after {} ms; the same server (pid {server}) served on over the same connection, the liveness sentinel kept (no reset), DMA and MSI work",
            took.as_millis()
        ));
    }
    let _ = dev
        .client
        .set_irqs(PCI_MSI_IRQ_INDEX, 0, 0, IrqAction::Trigger, IrqData::None);
    Ok(())
}
