//! restart-replay: airlock's sandboxed server is killed -9 while the device
//! has a DMA in flight; the probe reconnects and replays its state the way
//! patched QEMU does (VERSION, every DMA_MAP with a new fd to the same
//! memory, the infos, the config writes, SET_IRQS with the same eventfd;
//! no DEVICE_RESET), then checks that the device was neither reset nor
//! unmapped: the liveness register holds its value, the DMA issued during
//! the restart window landed in the right page, an MSI still reaches the
//! same eventfd. It also replays one map with different memory at the same
//! IOVA (it must replace the adopted mapping) and leaves one map out (it
//! must be dropped when the adoption window ends).
//!
//! upgrade-replay: the same, but the disruption is a live upgrade: SIGUSR2
//! to airlock's supervisor, which starts the airlock binary again beside
//! itself, handing over the socket and the VFIO fds, kills its own server
//! as a crash would once the new airlock holds them, and exits once the new
//! one serves. The probe waits, as QEMU does, until the old server's
//! connection hangs up, then reconnects and replays; the new airlock's
//! supervisor is the old one's child until the old one exits.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use airlock_protocol::client::Client;
use airlock_protocol::device::{
    IrqInfo, RegionInfo, PCI_BAR0_REGION_INDEX, PCI_MSI_IRQ_INDEX, REGION_INFO_FLAG_MMAP,
};
use airlock_protocol::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use airlock_protocol::irqs::{IrqAction, IrqData};

use crate::device::*;
use crate::os::{EventFd, Mapping, Memfd};
use crate::report::{info, Outcome};

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
/// Replayed with the same memory: the DMA in flight lands here.
const IOVA_SAME: u64 = 0x800000;
const SAME_SIZE: usize = 2 << 20;
/// Where the in-flight DMA writes (a page inside IOVA_SAME).
const LANDING: usize = 0x3000;
/// Replayed with different memory: the adopted mapping must be replaced.
const IOVA_OTHER: u64 = 0xc00000;
/// Not replayed: dropped when the adoption window ends.
const IOVA_LEFT: u64 = 0xe00000;
const SMALL: usize = 64 << 10;
const LIVENESS: u32 = 0x5eed_0b0e;

/// What the first connection saw, to compare with after the restart.
struct Layout {
    info: airlock_protocol::device::DeviceInfo,
    regions: Vec<RegionInfo>,
    irqs: Vec<IrqInfo>,
}

fn layout(dev: &mut Dev) -> Result<Layout, String> {
    let info = dev
        .client
        .device_info()
        .map_err(|e| format!("DEVICE_GET_INFO: {e}"))?;
    let mut regions = Vec::new();
    for i in 0..info.num_regions {
        regions.push(dev.region_info(i)?.0);
    }
    let mut irqs = Vec::new();
    for i in 0..info.num_irqs {
        irqs.push(
            dev.client
                .irq_info(i)
                .map_err(|e| format!("GET_IRQ_INFO {i}: {e}"))?,
        );
    }
    Ok(Layout {
        info,
        regions,
        irqs,
    })
}

/// A connection that has done a QEMU-like VERSION.
pub(crate) fn connect(path: &str) -> Result<Dev, String> {
    let mut dev = Dev::connect(path)?;
    dev.client
        .negotiate(Client::qemu_capabilities())
        .map_err(|e| format!("VERSION: {e}"))?;
    Ok(dev)
}

/// The sandboxed server: the supervisor's only child.
fn server_pid(supervisor: u32) -> Option<i32> {
    let path = format!("/proc/{supervisor}/task/{supervisor}/children");
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(13) ^ 0x6c
}

/// Starts an edu DMA without waiting for it (device buffer -> RAM).
fn start_dma_to_ram(dev: &mut Dev, dst: u64) -> Result<(), String> {
    dev.msg_write32(REG_DMA_SRC, DMA_BUFFER as u32)?;
    dev.msg_write32(REG_DMA_SRC + 4, 0)?;
    dev.msg_write32(REG_DMA_DST, dst as u32)?;
    dev.msg_write32(REG_DMA_DST + 4, (dst >> 32) as u32)?;
    dev.msg_write32(REG_DMA_COUNT, 4096)?;
    dev.msg_write32(REG_DMA_CMD, 3)
}

/// A pointer to BAR0's register page that a watcher thread may read.
struct Bar0Page(*const u8);
// SAFETY: the page is a device mapping read with volatile loads only; the
// Mapping it points into outlives the thread (joined before it is dropped).
unsafe impl Send for Bar0Page {}

impl Bar0Page {
    fn dma_busy(&self) -> bool {
        // SAFETY: REG_DMA_CMD is inside the mapped register page (checked
        // when it was mapped) and 4-byte aligned; volatile: the device
        // changes it.
        let v = unsafe { std::ptr::read_volatile(self.0.add(REG_DMA_CMD as usize).cast::<u32>()) };
        v & 1 != 0
    }
}

/// BAR0's first page through the region fd, if the server offers the mmap.
fn bar0_page(dev: &mut Dev) -> Result<Option<Mapping>, String> {
    let (ri, fd) = dev.region_info(PCI_BAR0_REGION_INDEX)?;
    let (Some(fd), true) = (fd, ri.flags & REGION_INFO_FLAG_MMAP != 0) else {
        return Ok(None);
    };
    Mapping::new(fd.as_fd(), ri.offset, 4096).map(Some)
}

/// What takes the server away.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Disruption {
    /// kill -9 of the sandboxed server; the supervisor starts another.
    KillServer,
    /// SIGUSR2 to the supervisor: a live upgrade (exec in place).
    Upgrade,
}

impl Disruption {
    fn name(self) -> &'static str {
        match self {
            Disruption::KillServer => "restart-replay",
            Disruption::Upgrade => "upgrade-replay",
        }
    }
}

/// Waits until the server closes this connection (it died), as QEMU
/// notices a server going away.
fn wait_hangup(dev: &Dev, limit: Duration) -> Result<(), String> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(dev.client.socket().stream());
    let t = Instant::now();
    while t.elapsed() < limit {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: p is one live pollfd.
        let r = unsafe { libc::poll(&mut p, 1, 100) };
        if r > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
            return Ok(());
        }
    }
    Err(format!(
        "the server did not go away within {} s of SIGUSR2",
        limit.as_secs()
    ))
}

pub fn restart_replay(socket: &str, supervisor: Option<u32>) -> Outcome {
    replay_check(socket, supervisor, Disruption::KillServer)
}

pub fn upgrade_replay(socket: &str, supervisor: Option<u32>) -> Outcome {
    replay_check(socket, supervisor, Disruption::Upgrade)
}

fn replay_check(socket: &str, supervisor: Option<u32>, how: Disruption) -> Outcome {
    let Some(sup) = supervisor else {
        return Outcome::Skip("no --airlock-pid: the server to kill is unknown".into());
    };
    if server_pid(sup).is_none() {
        return Outcome::Skip(format!(
            "pid {sup} has no child: airlock runs without the sandbox's supervisor"
        ));
    }
    run(socket, sup, how).into()
}

fn run(socket: &str, sup: u32, how: Disruption) -> Result<(), String> {
    let name = how.name();
    let event = match how {
        Disruption::KillServer => "kill",
        Disruption::Upgrade => "upgrade signal",
    };
    // --- first server: set the device up as a guest driver would ---------
    let mut dev = connect(socket)?;
    let before = layout(&mut dev)?;
    let same = Memfd::new(c"airlock-probe-restart-same", SAME_SIZE)?;
    let other_old = Memfd::new(c"airlock-probe-restart-old", SMALL)?;
    let left = Memfd::new(c"airlock-probe-restart-left", SMALL)?;
    for (iova, m, size) in [
        (IOVA_SAME, &same, SAME_SIZE),
        (IOVA_OTHER, &other_old, SMALL),
        (IOVA_LEFT, &left, SMALL),
    ] {
        dev.client
            .dma_map(iova, size as u64, 0, RW, Some(m.fd.as_fd()))
            .map_err(|e| format!("DMA_MAP {iova:#x}: {e}"))?;
    }
    let cmd = dev.config16(4)? | CMD_MEMORY | CMD_MASTER;
    dev.set_config16(4, cmd)?;
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
    dev.msg_write32(REG_LIVENESS, LIVENESS)?;
    // The device buffer gets a pattern; the landing page is cleared.
    same.map.fill(0, 4096, pattern);
    dev.dma(IOVA_SAME, DMA_BUFFER, 4096, 1)?;
    same.map.fill(LANDING, 4096, |_| 0);
    other_old.map.fill(0, SMALL, |_| 0x11);
    left.map.fill(0, SMALL, |_| 0x22);
    let bar0 = bar0_page(&mut dev)?;

    // --- take the server away with a DMA in flight ------------------------
    let srv = server_pid(sup).ok_or("the server disappeared before the kill")?;
    start_dma_to_ram(&mut dev, IOVA_SAME + LANDING as u64)?;
    let killed = Instant::now();
    let (target, sig, what) = match how {
        Disruption::KillServer => (srv, libc::SIGKILL, "kill -9 of server"),
        Disruption::Upgrade => (sup as i32, libc::SIGUSR2, "SIGUSR2 to supervisor"),
    };
    // SAFETY: kill has no memory arguments; target is airlock's.
    if unsafe { libc::kill(target, sig) } != 0 {
        return Err(format!(
            "{what} {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Watch the device finish that DMA while no server runs (BAR0 mmap).
    let watcher = bar0.as_ref().map(|m| {
        let page = Bar0Page(m.as_ptr());
        std::thread::spawn(move || {
            while killed.elapsed() < Duration::from_secs(10) {
                if !page.dma_busy() {
                    return Some(killed.elapsed());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            None
        })
    });
    if how == Disruption::Upgrade {
        // The old server still serves until the supervisor kills it: a
        // client leaving before that would have it quiesce the device.
        wait_hangup(&dev, Duration::from_secs(10))?;
    }
    drop(dev);

    // --- reconnect and replay, as patched QEMU does -----------------------
    let reconnected = connect(socket).map_err(|e| format!("reconnect: {e}"));
    let outage = killed.elapsed();
    // After an upgrade the new supervisor is the old one's only child.
    let new_sup = match how {
        Disruption::KillServer => Some(sup as i32),
        Disruption::Upgrade => server_pid(sup),
    };
    let new_srv = new_sup.and_then(|s| server_pid(s as u32));
    // Joined before `bar0` (the mapping it reads) can be dropped.
    let dma_done = watcher.and_then(|w| w.join().ok().flatten());
    let mut dev = reconnected?;
    info(&format!(
        "{name}: outage {} ms ({what} pid {target} to the replayed VERSION's reply from server pid {})",
        outage.as_millis(),
        new_srv.map_or("?".into(), |p| p.to_string())
    ));
    match dma_done {
        Some(t) if t < outage => info(&format!(
            "{name}: the device finished the in-flight DMA {} ms after the {event}, before the restarted server's first reply",
            t.as_millis()
        )),
        Some(t) => info(&format!(
            "{name}: the in-flight DMA finished {} ms after the {event} (after the new server answered)",
            t.as_millis()
        )),
        None => info(&format!("{name}: DMA completion not observed through BAR0 (no mmap, or still busy after 10 s)")),
    }
    if new_srv == Some(srv) {
        return Err(format!("server pid {srv} still runs after the {what}"));
    }
    if how == Disruption::Upgrade {
        let new_sup = new_sup.ok_or("no new airlock under the old one after SIGUSR2")?;
        // The old airlock exits once the new one has served through its probation.
        let t = Instant::now();
        // SAFETY: kill with signal 0 only checks the process exists.
        while unsafe { libc::kill(sup as i32, 0) } == 0 && t.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if t.elapsed() >= Duration::from_secs(15) {
            return Err(format!(
                "the old airlock pid {sup} did not exit within 15 s of the new one serving"
            ));
        }
        info(&format!(
            "{name}: airlock pid {new_sup} took over from pid {sup}, which exited"
        ));
    }
    let other_new = Memfd::new(c"airlock-probe-restart-new", SMALL)?;
    other_new.map.fill(0, SMALL, |_| 0x33);
    let same_again = same.fd.try_clone().map_err(|e| format!("dup memfd: {e}"))?;
    dev.client
        .dma_map(IOVA_SAME, SAME_SIZE as u64, 0, RW, Some(same_again.as_fd()))
        .map_err(|e| format!("replayed DMA_MAP {IOVA_SAME:#x} (same memory): {e}"))?;
    dev.client
        .dma_map(IOVA_OTHER, SMALL as u64, 0, RW, Some(other_new.fd.as_fd()))
        .map_err(|e| {
            format!("DMA_MAP {IOVA_OTHER:#x} of different memory over an adopted mapping: {e}")
        })?;
    let after = layout(&mut dev)?;
    if after.info != before.info || after.regions != before.regions || after.irqs != before.irqs {
        return Err("the device's info, regions or IRQ layout changed across the restart".into());
    }
    dev.set_config16(4, cmd)?;
    dev.client
        .set_irqs(
            PCI_MSI_IRQ_INDEX,
            0,
            1,
            IrqAction::Trigger,
            IrqData::Eventfds(vec![irq.dup()?]),
        )
        .map_err(|e| format!("replayed SET_IRQS MSI eventfd: {e}"))?;

    // --- what survived -----------------------------------------------------
    let live = dev.msg_read32(REG_LIVENESS)?;
    if live != !LIVENESS {
        return Err(format!(
            "liveness reads {live:#x} after the restart, wrote {LIVENESS:#x} before it (expected {:#x}): the device was reset",
            !LIVENESS
        ));
    }
    dev.poll_clear(REG_DMA_CMD, 1, Duration::from_secs(10))?;
    let landed = same.map.bytes(LANDING, 4096);
    if let Some(i) = (0..4096).find(|&i| landed[i] != pattern(i)) {
        return Err(format!(
            "the DMA issued before the {event} did not land: byte {i} of the page is {:#04x}, expected {:#04x}",
            landed[i],
            pattern(i)
        ));
    }
    info(&format!("{name}: the DMA in flight at the {event} landed in the same guest page; liveness kept its value (no reset)"));
    let _ = irq.take();
    dev.msg_write32(REG_IRQ_RAISE, 1)?;
    irq.wait(Duration::from_secs(5))
        .map_err(|e| format!("MSI through the replayed eventfd: {e}"))?;
    dev.msg_write32(REG_IRQ_ACK, 1)?;
    // Different memory at IOVA_OTHER replaced the adopted mapping.
    dev.dma(DMA_BUFFER, IOVA_OTHER, 4096, 3)?;
    let new_page = other_new.map.bytes(0, 4096);
    if let Some(i) = (0..4096).find(|&i| new_page[i] != pattern(i)) {
        return Err(format!(
            "a DMA to {IOVA_OTHER:#x} did not reach the memory re-mapped there (byte {i}: {:#04x})",
            new_page[i]
        ));
    }
    if other_old.map.bytes(0, SMALL).iter().any(|b| *b != 0x11) {
        return Err(format!(
            "a DMA to {IOVA_OTHER:#x} reached the memory mapped there before the restart"
        ));
    }
    // The map the client did not replay was dropped: the device cannot reach it.
    dev.dma(DMA_BUFFER, IOVA_LEFT, 4096, 3)?;
    if left.map.bytes(0, SMALL).iter().any(|b| *b != 0x22) {
        return Err(format!(
            "a DMA to {IOVA_LEFT:#x} reached memory the new client never mapped: the adopted mapping was not dropped"
        ));
    }
    info(&format!("{name}: MSI through the replayed eventfd; different memory at an adopted IOVA replaced the mapping; the map left out was dropped"));
    // Leave as a client does: the server quiesces and unmaps everything.
    let _ = dev
        .client
        .set_irqs(PCI_MSI_IRQ_INDEX, 0, 0, IrqAction::Trigger, IrqData::None);
    Ok(())
}
