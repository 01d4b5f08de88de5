//! The checks, in order: negotiate, ident, liveness, factorial,
//! bar0-fast-path, dma, msi (+ msi-no-wakeups), dma-unmapped-blocked,
//! dma-map-msi-window-refused (only with --msi-window), disconnect-quiesces,
//! upgrade-broken (broken_upgrade.rs, only with --broken-upgrades),
//! restart-replay and upgrade-replay (restart.rs: kill airlock's sandboxed
//! server, or SIGUSR2 its supervisor for a live upgrade, so only with
//! --airlock-pid naming the supervisor). Each returns an Outcome; state that later checks
//! reuse (the connection, BAR0's mappings, the first DMA map) lives in Probe.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use airlock_protocol::client::Client;
use airlock_protocol::device::*;
use airlock_protocol::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use airlock_protocol::irqs::{IrqAction, IrqData};

use crate::args::Args;
use crate::device::*;
use crate::os::{in_child, pread, ChildEnd, EventFd, Mapping, Memfd};
use crate::report::{info, Outcome, Report};
use crate::spent::context_switches;

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
const IOVA: u64 = 0x100000;
const IOVA_SIZE: usize = 2 << 20;
const IOVA_BACK: u64 = IOVA + 0x10000;
const IOVA_GONE: u64 = 0x400000;
const GONE_SIZE: usize = 64 << 10;

struct Probe<'a> {
    args: &'a Args,
    dev: Dev,
    /// The 2 MiB map at IOVA, once the dma check (or a later one) made it.
    mem: Option<Memfd>,
}

pub fn run(report: &mut Report, args: &Args) {
    let mut dev = None;
    report.check("negotiate", || match negotiate(&args.socket) {
        Ok(d) => {
            dev = Some(d);
            Outcome::Pass
        }
        Err(e) => Outcome::Fail(e),
    });
    let Some(dev) = dev else {
        return;
    };
    let mut p = Probe {
        args,
        dev,
        mem: None,
    };
    // As a guest driver does first (pci_enable_device): a device that the
    // previous client left quiesced has memory decoding off.
    match p.dev.config16(4) {
        Ok(cmd) if cmd & CMD_MEMORY == 0 => {
            info(&format!(
                "command register {cmd:#06x} at connect (memory decoding off: the previous client left, the device was quiesced); turning decoding on as a driver does"
            ));
            if let Err(e) = p.dev.set_config16(4, cmd | CMD_MEMORY) {
                info(&format!("turning memory decoding on failed: {e}"));
            }
        }
        Ok(_) => {}
        Err(e) => info(&format!("command register not readable at connect: {e}")),
    }
    report.check("ident", || ident(&mut p.dev).into());
    report.check("liveness", || liveness(&mut p.dev).into());
    report.check("factorial", || factorial(&mut p.dev).into());
    report.check("bar0-fast-path", || bar0_fast_path(&mut p));
    report.check("dma", || dma(&mut p).into());
    msi(report, &mut p);
    report.check("dma-unmapped-blocked", || {
        dma_unmapped_blocked(&mut p).into()
    });
    if let Some((start, size)) = args.msi_window {
        report.check("dma-map-msi-window-refused", || {
            dma_map_msi_window_refused(&mut p, start, size).into()
        });
    }
    report.check("disconnect-quiesces", || disconnect_quiesces(p).into());
    report.check("upgrade-broken", || {
        crate::broken_upgrade::broken_upgrades(&args.socket, args.airlock_pid, args.broken_upgrades)
    });
    report.check("restart-replay", || {
        crate::restart::restart_replay(&args.socket, args.airlock_pid)
    });
    report.check("upgrade-replay", || {
        crate::restart::upgrade_replay(&args.socket, args.airlock_pid)
    });
}

fn negotiate(path: &str) -> Result<Dev, String> {
    let mut dev = Dev::connect(path)?;
    let v = dev
        .client
        .negotiate(Client::qemu_capabilities())
        .map_err(|e| format!("VERSION: {e}"))?;
    if (v.major, v.minor) != (0, 0) {
        return Err(format!("server replied version {}.{}", v.major, v.minor));
    }
    let i = dev
        .client
        .device_info()
        .map_err(|e| format!("DEVICE_GET_INFO: {e}"))?;
    info(&format!(
        "device: {} regions, {} irqs, reset {}",
        i.num_regions,
        i.num_irqs,
        if i.flags & DEVICE_FLAGS_RESET != 0 {
            "offered"
        } else {
            "not offered"
        }
    ));
    if i.flags & DEVICE_FLAGS_PCI == 0 {
        return Err(format!(
            "DEVICE_GET_INFO flags {:#x} lack the PCI flag",
            i.flags
        ));
    }
    Ok(dev)
}

fn ident(d: &mut Dev) -> Result<(), String> {
    match d.msg_read32(REG_IDENT)? {
        IDENT => Ok(()),
        v => Err(format!("ident {v:#010x}, expected {IDENT:#010x}")),
    }
}

fn liveness(d: &mut Dev) -> Result<(), String> {
    for v in [0x1234_5678u32, 0xa5a5_0f0f] {
        d.msg_write32(REG_LIVENESS, v)?;
        let got = d.msg_read32(REG_LIVENESS)?;
        if got != !v {
            return Err(format!("wrote {v:#x}, read {got:#x}, expected {:#x}", !v));
        }
    }
    Ok(())
}

fn factorial(d: &mut Dev) -> Result<(), String> {
    d.msg_write32(REG_FACTORIAL, 10)?;
    // QEMU's edu computes in a thread: wait for status bit 0 to clear.
    let start = Instant::now();
    while d.msg_read32(REG_STATUS)? & 1 != 0 {
        if start.elapsed() > Duration::from_secs(5) {
            return Err("status bit 0 (computing) still set after 5 s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    match d.msg_read32(REG_FACTORIAL)? {
        3628800 => Ok(()),
        v => Err(format!("10! read back as {v}")),
    }
}

fn ctx(pid: Option<u32>) -> Result<Option<u64>, String> {
    pid.map(context_switches).transpose()
}

fn bar0_fast_path(p: &mut Probe) -> Outcome {
    match bar0_map(p) {
        Ok(None) => {}
        Ok(Some(skip)) => return Outcome::Skip(skip),
        Err(e) => return Outcome::Fail(e),
    }
    let d = &mut p.dev;
    let r = (|| {
        let v = d.read32(REG_IDENT)?;
        if v != IDENT {
            return Err(format!("ident through the mapping: {v:#010x}"));
        }
        d.write32(REG_LIVENESS, 0x0bad_f00d)?;
        let v = d.read32(REG_LIVENESS)?;
        if v != !0x0bad_f00du32 {
            return Err(format!(
                "liveness through the mapping: wrote 0xbadf00d, read {v:#x}"
            ));
        }
        let Some(pid) = p.args.airlock_pid else {
            info("bar0-fast-path: no --airlock-pid, airlock's wakeups not measured");
            return Ok(());
        };
        let n = p.args.iterations;
        let before = context_switches(pid)?;
        let t = Instant::now();
        for _ in 0..n {
            d.read32(REG_LIVENESS)?;
        }
        let ns = t.elapsed().as_nanos() / n as u128;
        let grew = context_switches(pid)?.saturating_sub(before);
        info(&format!(
            "bar0-fast-path: {n} mmap reads, {ns} ns each; airlock context switches +{grew} (limit < {})",
            n / 10
        ));
        if grew >= (n / 10) as u64 {
            return Err(format!(
                "airlock switched context {grew} times during {n} mmap reads"
            ));
        }
        Ok(())
    })();
    r.into()
}

/// Maps BAR0's mmap'able areas into p.dev. Ok(Some(reason)) means "skip".
fn bar0_map(p: &mut Probe) -> Result<Option<String>, String> {
    let (ri, fd) = p.dev.region_info(PCI_BAR0_REGION_INDEX)?;
    info(&format!(
        "bar0: size {:#x}, flags {:#x}, offset {:#x}, fd {}, caps {:?}",
        ri.size,
        ri.flags,
        ri.offset,
        if fd.is_some() { "yes" } else { "no" },
        ri.caps
    ));
    if ri.flags & REGION_INFO_FLAG_MMAP == 0 {
        return Ok(Some(
            "BAR0 has no VFIO_REGION_INFO_FLAG_MMAP (emulated or mediated BAR: served by messages)"
                .into(),
        ));
    }
    let fd = fd.ok_or("BAR0 has FLAG_MMAP but GET_REGION_INFO carried no fd")?;
    // What else the fd opens: on vfio-pci, config space sits at 7 << 40.
    let mut id = [0u8; 4];
    info(&format!(
        "bar0-fast-path: the region fd read at the vfio-pci config offset (7 << 40): {}",
        match pread(fd.as_fd(), 7 << 40, &mut id) {
            Ok(()) => format!(
                "vendor:device {:04x}:{:04x} (the client holds the whole VFIO device fd)",
                u16::from_le_bytes([id[0], id[1]]),
                u16::from_le_bytes([id[2], id[3]])
            ),
            Err(e) => format!("refused ({e})"),
        }
    ));
    let areas: Vec<SparseArea> = ri
        .caps
        .iter()
        .find_map(|c| match c {
            RegionCap::SparseMmap(a) => Some(a.clone()),
            _ => None,
        })
        .unwrap_or(vec![SparseArea {
            offset: 0,
            size: ri.size,
        }]);
    for a in areas.iter().filter(|a| a.size > 0) {
        if a.offset.checked_add(a.size).is_none_or(|end| end > ri.size) {
            return Err(format!(
                "sparse area {a:?} leaves the {:#x}-byte region",
                ri.size
            ));
        }
        let map = Mapping::new(fd.as_fd(), ri.offset + a.offset, a.size as usize)?;
        p.dev.bar0.push(Area {
            offset: a.offset,
            map,
        });
    }
    if !p
        .dev
        .bar0
        .iter()
        .any(|a| a.offset == 0 && a.map.len() >= 0x100)
    {
        return Err(format!(
            "no mmap'able area covers the registers at 0..0x100: {areas:?}"
        ));
    }
    Ok(None)
}

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

fn dma(p: &mut Probe) -> Result<(), String> {
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

fn msi(report: &mut Report, p: &mut Probe) {
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

fn dma_unmapped_blocked(p: &mut Probe) -> Result<(), String> {
    first_map(p)?;
    let gone = Memfd::new(c"airlock-probe-unmapped", GONE_SIZE)?;
    gone.map.fill(0, GONE_SIZE, |_| 0x5a);
    let c = &mut p.dev.client;
    c.dma_map(IOVA_GONE, GONE_SIZE as u64, 0, RW, Some(gone.fd.as_fd()))
        .map_err(|e| format!("DMA_MAP {IOVA_GONE:#x}: {e}"))?;
    c.dma_unmap(IOVA_GONE, GONE_SIZE as u64, 0)
        .map_err(|e| format!("DMA_UNMAP {IOVA_GONE:#x}: {e}"))?;
    let mem = p.mem.as_ref().expect("first_map made it");
    mem.map.fill(0, 4096, |i| (i as u8).wrapping_mul(31) ^ 0xc3);
    p.dev.dma(IOVA, DMA_BUFFER, 4096, 1)?;
    if let Some(e) = dma_error(&mut p.dev)? {
        if e != 0 {
            return Err(format!("DMA error {e:#x} on the mapped RAM -> device copy"));
        }
    }
    p.dev.dma(DMA_BUFFER, IOVA_GONE, 4096, 3)?;
    let changed = gone
        .map
        .bytes(0, GONE_SIZE)
        .iter()
        .filter(|b| **b != 0x5a)
        .count();
    if changed != 0 {
        return Err(format!(
            "{changed} bytes of the unmapped memfd changed: the device reached it after DMA_UNMAP"
        ));
    }
    if let Some(e) = dma_error(&mut p.dev)? {
        if e & 1 == 0 {
            return Err(format!(
                "airlock's DMA error register is {e:#x}, bit 0 (unmapped) not set"
            ));
        }
        p.dev.write32(REG_DMA_ERROR, 0)?;
        info(&format!(
            "dma-unmapped-blocked: DMA error register {e:#x}, cleared"
        ));
    }
    Ok(())
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

/// DMA_MAP of 64 KiB at the start of the host's MSI doorbell window must get
/// an error reply (non-zero errno); the same map just past the window must
/// succeed. Both are undone.
fn dma_map_msi_window_refused(p: &mut Probe, start: u64, size: u64) -> Result<(), String> {
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

fn disconnect_quiesces(p: Probe) -> Result<(), String> {
    let Probe { args, mut dev, mem } = p;
    // Leave bus mastering on so the check below means something.
    dev.enable_bus_master()?;
    // Keep BAR0's mappings past the disconnect: whether they still reach the
    // device afterwards is reported below (INFO).
    let stale = std::mem::take(&mut dev.bar0);
    drop(dev);
    drop(mem);
    let t = Instant::now();
    let mut dev = negotiate(&args.socket).map_err(|e| format!("second connection: {e}"))?;
    info(&format!(
        "disconnect-quiesces: served again after {} ms",
        t.elapsed().as_millis()
    ));
    let cmd = dev.config16(4)?;
    if cmd & CMD_MASTER != 0 {
        return Err(format!(
            "bus master still on after the client left (command {cmd:#06x})"
        ));
    }
    info(&format!(
        "disconnect-quiesces: command register after the client left {cmd:#06x} (memory decoding {})",
        if cmd & CMD_MEMORY != 0 { "on" } else { "off" }
    ));
    if let Some(a) = stale.iter().find(|a| a.offset == 0) {
        info(&format!(
            "disconnect-quiesces: the first client's BAR0 mapping after it left: {}",
            stale_access(&a.map)
        ));
    }
    // A quiesced device is like a reset one: decoding may be off, so the
    // new client turns it on, as a guest driver would, before MMIO.
    dev.set_config16(4, cmd | CMD_MEMORY)?;
    let id = dev.msg_read32(REG_IDENT)?;
    match id {
        IDENT => Ok(()),
        v => Err(format!("ident {v:#010x} on the second connection")),
    }
}

/// What a read of ident through a mapping the previous client kept does.
fn stale_access(m: &Mapping) -> String {
    match in_child(|| i32::from(m.read32(0) != IDENT), Duration::from_secs(5)) {
        Ok(ChildEnd::Exited(0)) => "still reaches the device (ident reads back)".into(),
        Ok(ChildEnd::Exited(_)) => "reads something other than ident".into(),
        Ok(ChildEnd::Signaled(libc::SIGBUS)) => "revoked (SIGBUS)".into(),
        Ok(ChildEnd::Signaled(s)) => format!("child killed by signal {s}"),
        Ok(ChildEnd::TimedOut) => "read hung for 5 s".into(),
        Err(e) => format!("not measured: {e}"),
    }
}
