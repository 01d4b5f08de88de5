//! The checks, in order: negotiate, ident, liveness, factorial,
//! bar0-fast-path, dma, msi (+ msi-no-wakeups), dma-unmapped-blocked,
//! dma-unmap-multi-blocked,
//! dma-map-msi-window-refused (only with --msi-window), disconnect-quiesces,
//! upgrade-broken (broken_upgrade.rs, only with --broken-upgrades),
//! restart-replay and upgrade-replay (restart.rs: kill airlock's sandboxed
//! server, or SIGUSR2 its supervisor for a live upgrade, so only with
//! --airlock-pid naming the supervisor). The DMA checks live in
//! checks_dma.rs, the MSI ones in checks_msi.rs. Each returns an Outcome;
//! state that later checks reuse (the connection, BAR0's mappings, the first
//! DMA map) lives in Probe.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use airlock_protocol::client::Client;
use airlock_protocol::device::*;

use crate::args::Args;
use crate::checks_dma::{
    dma, dma_map_msi_window_refused, dma_unmap_multi_blocked, dma_unmapped_blocked,
};
use crate::checks_msi::msi;
use crate::device::*;
use crate::os::{in_child, pread, ChildEnd, Mapping, Memfd};
use crate::report::{info, Outcome, Report};
use crate::spent::context_switches;

pub(crate) struct Probe<'a> {
    pub(crate) args: &'a Args,
    pub(crate) dev: Dev,
    /// The 2 MiB map at IOVA, once the dma check (or a later one) made it.
    pub(crate) mem: Option<Memfd>,
    /// The server answered the dma_multiple capability (DMA_MAP_MULTI,
    /// DMA_UNMAP_MULTI) the probe proposes, as patched QEMU does.
    pub(crate) dma_multiple: bool,
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
    let Some((dev, dma_multiple)) = dev else {
        return;
    };
    let mut p = Probe {
        args,
        dev,
        mem: None,
        dma_multiple,
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
    report.check("dma-unmap-multi-blocked", || {
        dma_unmap_multi_blocked(&mut p).into()
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

/// The connection, and whether the server answered dma_multiple.
fn negotiate(path: &str) -> Result<(Dev, bool), String> {
    let mut dev = Dev::connect(path)?;
    let mut caps = Client::qemu_capabilities();
    caps.dma_multiple = Some(true);
    let v = dev
        .client
        .negotiate(caps)
        .map_err(|e| format!("VERSION: {e}"))?;
    let dma_multiple = v.capabilities.and_then(|c| c.dma_multiple) == Some(true);
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
    Ok((dev, dma_multiple))
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

fn disconnect_quiesces(p: Probe) -> Result<(), String> {
    let Probe {
        args, mut dev, mem, ..
    } = p;
    // Leave bus mastering on so the check below means something.
    dev.enable_bus_master()?;
    // Keep BAR0's mappings past the disconnect: whether they still reach the
    // device afterwards is reported below (INFO).
    let stale = std::mem::take(&mut dev.bar0);
    drop(dev);
    drop(mem);
    let t = Instant::now();
    let (mut dev, _) = negotiate(&args.socket).map_err(|e| format!("second connection: {e}"))?;
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
