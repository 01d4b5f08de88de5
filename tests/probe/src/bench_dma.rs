//! `--bench-dma GROUP`: what a DMA_MAP+DMA_UNMAP pair costs through
//! `airlock --vfio` against its floor, the same two VFIO ioctls issued
//! directly by one process on memory it has mapped already (what
//! in-process vfio-pci does). The floor runs on another device's VFIO group
//! (GROUP, bound to vfio-pci and otherwise unused), because airlock holds
//! its own device's group.
//!
//! airlock is timed two ways. Serially, each message waits for its reply
//! (two round trips per pair), which is what a lone map costs. Pipelined,
//! all the pairs are sent before any reply is read and the replies are then
//! collected in order: what QEMU's vfio-user container does with the
//! DMA_MAPs of one memory-listener transaction (sent without waiting,
//! waited for at commit), so that figure is airlock's own cost per pair
//! with the round-trip latency mostly overlapped.
//!
//! The same two loops also run against a forked echo (bench_echo.rs) that
//! receives with airlock's socket code and answers at once: what the
//! messages cost by themselves here, so that airlock minus echo is
//! airlock's own work plus the two ioctls.
//!
//! The floor is a tight loop; a server's ioctls come right after the
//! request woke it. So the floor also runs with an empty round trip to the
//! echo before each ioctl, and the round trips alone, which prices the two
//! ioctls when they follow a process switch (an INFO line).
//!
//! Rounds interleave the loops; the figures are medians. Prints
//! `BENCH dma-map-unmap airlock_us=A floor_us=F ratio=R pipelined_us=P
//! pipelined_ratio=Q echo_us=E echo_pipelined_us=EP (...)`, Q being P / F;
//! later fields come after the earlier ones so that parsers of the older
//! prefix keep working.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use airlock_protocol::client::Client;
use airlock_protocol::device::PCI_CONFIG_REGION_INDEX;
use airlock_protocol::dma::{
    DmaMap, DmaUnmap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_MAP_SIZE, DMA_UNMAP_SIZE,
};
use airlock_protocol::Command;

use crate::bench_echo::Echo;
use crate::os::Memfd;
use crate::report::{info, Outcome, Report};
use crate::restart::connect;

const ROUNDS: usize = 21;
const PAIRS: usize = 50;
const SIZE: usize = 4096;
const IOVA: u64 = 0x10_0000;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

// <linux/vfio.h>: _IO(';', 100 + n).
const VFIO_GET_API_VERSION: libc::c_ulong = 0x3b64;
const VFIO_SET_IOMMU: libc::c_ulong = 0x3b66;
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = 0x3b68;
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = 0x3b71;
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = 0x3b72;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;

/// Median microseconds per pair.
struct Figures {
    airlock: f64,
    floor: f64,
    pipelined: f64,
    echo: f64,
    echo_pipelined: f64,
}

pub fn run(report: &mut Report, socket: &str, group: &str) {
    let outcome = match bench(socket, group) {
        Ok(Figures {
            airlock: a,
            floor: f,
            pipelined: p,
            echo: e,
            echo_pipelined: ep,
        }) => {
            println!(
                "BENCH dma-map-unmap airlock_us={a:.1} floor_us={f:.1} ratio={:.2} pipelined_us={p:.1} pipelined_ratio={:.2} echo_us={e:.1} echo_pipelined_us={ep:.1} (4 KiB, {ROUNDS} rounds x {PAIRS} pairs, medians)",
                a / f,
                p / f
            );
            Outcome::Pass
        }
        Err(e) => Outcome::Fail(e),
    };
    report.record("bench-dma-map-unmap", outcome);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::MAX, f64::min)
}

/// Context switches per pair on the whole machine (/proc/stat's ctxt), one
/// entry per round: whether a server sleeps and wakes per message even
/// when the next messages are already queued (pipelined).
#[derive(Default)]
struct Switches {
    airlock: Vec<f64>,
    pipelined: Vec<f64>,
    echo: Vec<f64>,
    echo_pipelined: Vec<f64>,
    floor: Vec<f64>,
}

impl Switches {
    fn report(self) {
        info(&format!(
            "bench-dma: context switches per pair on the whole machine (/proc/stat ctxt, medians): airlock serial {:.1}, pipelined {:.1}; echo serial {:.1}, pipelined {:.1}; the floor's ioctls {:.1}",
            median(self.airlock),
            median(self.pipelined),
            median(self.echo),
            median(self.echo_pipelined),
            median(self.floor)
        ));
    }
}

/// /proc/stat's ctxt: context switches since boot on every CPU (0 if it
/// cannot be read).
fn ctxt() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("ctxt ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// per_pair, also pushing the context switches per pair into `sw` (read
/// outside the timed loop).
fn per_pair_counted(
    sw: &mut Vec<f64>,
    body: impl FnOnce() -> Result<(), String>,
) -> Result<f64, String> {
    let before = ctxt();
    let us = per_pair(body)?;
    sw.push(ctxt().saturating_sub(before) as f64 / PAIRS as f64);
    Ok(us)
}

/// Runs one timed loop over PAIRS pairs; returns microseconds per pair.
fn per_pair(body: impl FnOnce() -> Result<(), String>) -> Result<f64, String> {
    let t = Instant::now();
    body()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / PAIRS as f64)
}

fn bench(socket: &str, group: &str) -> Result<Figures, String> {
    let mem = Memfd::new(c"probe-bench-dma", SIZE)?;
    let mut dev = connect(socket)?;
    let c = &mut dev.client;
    let floor = Floor::open(group)?;
    let mut echo = Echo::spawn()?;
    let vaddr = mem.map.as_ptr() as u64;
    let (mut a, mut f, mut p) = (Vec::new(), Vec::new(), Vec::new());
    let (mut e, mut ep) = (Vec::new(), Vec::new());
    let (mut rtt, mut fresh, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pings, mut switched, mut spun) = (Vec::new(), Vec::new(), Vec::new());
    // A second mapping of the memory that this process never touches, as
    // airlock's own mapping of a client's file (dma/host.rs): the VFIO
    // pin is then the first access through it.
    let untouched = crate::os::Mapping::new(mem.fd.as_fd(), 0, SIZE)?;
    let mut sw = Switches::default();
    for _ in 0..ROUNDS {
        // Where the rest goes: two message round trips (a REGION_READ of
        // the config space each), and the floor with a fresh mmap and
        // munmap of the memory around each pair (what airlock did per map
        // before it kept one mapping per client file, dma/host.rs).
        rtt.push(per_pair(|| round_trips(c))?);
        fresh.push(per_pair(|| floor_fresh(&floor, &mem))?);
        a.push(per_pair_counted(&mut sw.airlock, || serial(c, &mem))?);
        p.push(per_pair_counted(&mut sw.pipelined, || pipelined(c, &mem))?);
        f.push(per_pair_counted(&mut sw.floor, || {
            floor_mapped(&floor, vaddr)
        })?);
        kept.push(per_pair(|| {
            floor_mapped(&floor, untouched.as_ptr() as u64)
        })?);
        // The floor with a round trip to the echo before each ioctl: the
        // ioctls then run right after a process switch, as airlock's do
        // when it serves one message at a time.
        pings.push(per_pair(|| echo_pings(&mut echo.client, None, false))?);
        switched.push(per_pair(|| {
            echo_pings(&mut echo.client, Some((&floor, vaddr)), false)
        })?);
        // The same, waiting for each answer by polling the socket instead
        // of sleeping in recvmsg: what a server that polls before it sleeps
        // would pay for the ioctls.
        spun.push(per_pair(|| {
            echo_pings(&mut echo.client, Some((&floor, vaddr)), true)
        })?);
        e.push(per_pair_counted(&mut sw.echo, || {
            serial(&mut echo.client, &mem)
        })?);
        ep.push(per_pair_counted(&mut sw.echo_pipelined, || {
            pipelined(&mut echo.client, &mem)
        })?);
    }
    info(&format!(
        "bench-dma: per pair, medians: two REGION_READ round trips {:.1} us; the floor with an mmap+munmap around it {:.1} us; the floor on a kept mapping it never touches {:.1} us",
        median(rtt),
        median(fresh),
        median(kept)
    ));
    report_switch_cost(pings, switched, spun);
    info(&format!(
        "bench-dma: one clock read (Instant::now, what airlock's timing of DMA_MAP/UNMAP makes twice per message) {:.0} ns",
        clock_read_ns()
    ));
    info(&format!(
        "bench-dma: per pair, airlock min {:.1} us, pipelined min {:.1} us, floor min {:.1} us",
        min(&a),
        min(&p),
        min(&f)
    ));
    sw.report();
    Ok(Figures {
        airlock: median(a),
        floor: median(f),
        pipelined: median(p),
        echo: median(e),
        echo_pipelined: median(ep),
    })
}

/// What the floor's ioctls cost right after a process switch (`switched`:
/// an echo round trip before each) and after a polled answer (`spun`),
/// against the round trips alone (`pings`); medians per pair.
fn report_switch_cost(pings: Vec<f64>, switched: Vec<f64>, spun: Vec<f64>) {
    let pings = median(pings);
    let (switched, spun) = (median(switched), median(spun));
    info(&format!(
        "bench-dma: per pair, medians: the floor with a process switch (an echo round trip) before each ioctl {switched:.1} us, the two round trips alone {pings:.1} us: the ioctls after a switch {:.1} us",
        switched - pings
    ));
    info(&format!(
        "bench-dma: per pair, medians: the same floor, each answer awaited by polling the socket instead of sleeping {spun:.1} us: the ioctls after a poll {:.1} us",
        spun - pings
    ));
}

/// Nanoseconds per Instant::now(): cheap with a vDSO clock, a system call
/// and a clock device read where the guest's clocksource has no vDSO.
fn clock_read_ns() -> f64 {
    const N: u32 = 10_000;
    let t = Instant::now();
    for _ in 0..N {
        std::hint::black_box(Instant::now());
    }
    t.elapsed().as_nanos() as f64 / N as f64
}

fn round_trips(c: &mut Client) -> Result<(), String> {
    for _ in 0..PAIRS * 2 {
        c.read32(PCI_CONFIG_REGION_INDEX, 0)
            .map_err(|e| format!("REGION_READ: {e}"))?;
    }
    Ok(())
}

/// Two empty round trips to the echo per pair; with `floor`, each is
/// followed by one of the pair's ioctls. With `poll`, each answer is
/// awaited by polling the socket (MessageSocket::poll, as airlock's
/// --poll-us) rather than by sleeping in recvmsg.
fn echo_pings(echo: &mut Client, floor: Option<(&Floor, u64)>, poll: bool) -> Result<(), String> {
    let ping = |c: &mut Client| {
        let id = c
            .send_command(Command::DeviceGetInfo, &[], &[])
            .map_err(|e| format!("echo ping: {e}"))?;
        if poll {
            // What `airlock --poll-us` does before its read; a timeout or
            // an error is left to reply_to below to report.
            let _ = c.socket().poll(std::time::Duration::from_secs(10));
        }
        c.reply_to(id, Command::DeviceGetInfo)
            .map(drop)
            .map_err(|e| format!("echo ping: {e}"))
    };
    for _ in 0..PAIRS {
        ping(echo)?;
        if let Some((f, vaddr)) = floor {
            f.map(vaddr, IOVA, SIZE as u64)?;
        }
        ping(echo)?;
        if let Some((f, _)) = floor {
            f.unmap(IOVA, SIZE as u64)?;
        }
    }
    Ok(())
}

fn floor_fresh(floor: &Floor, mem: &Memfd) -> Result<(), String> {
    for _ in 0..PAIRS {
        let m = crate::os::Mapping::new(mem.fd.as_fd(), 0, SIZE)?;
        floor.map(m.as_ptr() as u64, IOVA, SIZE as u64)?;
        floor.unmap(IOVA, SIZE as u64)?;
        drop(m);
    }
    Ok(())
}

fn floor_mapped(floor: &Floor, vaddr: u64) -> Result<(), String> {
    for _ in 0..PAIRS {
        floor.map(vaddr, IOVA, SIZE as u64)?;
        floor.unmap(IOVA, SIZE as u64)?;
    }
    Ok(())
}

/// Each message waits for its reply: two round trips per pair.
fn serial(c: &mut Client, mem: &Memfd) -> Result<(), String> {
    for _ in 0..PAIRS {
        c.dma_map(IOVA, SIZE as u64, 0, RW, Some(mem.fd.as_fd()))
            .map_err(|e| format!("DMA_MAP: {e}"))?;
        c.dma_unmap(IOVA, SIZE as u64, 0)
            .map_err(|e| format!("DMA_UNMAP: {e}"))?;
    }
    Ok(())
}

/// All PAIRS pairs sent before any reply is read, then the replies
/// collected in order. Every pair uses the same IOVA: the server handles
/// messages in order, so MAP, UNMAP, MAP, ... there is valid. 100 small
/// messages fit in the socket buffers, so sending cannot block on replies
/// nobody is reading yet.
fn pipelined(c: &mut Client, mem: &Memfd) -> Result<(), String> {
    let map = DmaMap {
        argsz: DMA_MAP_SIZE as u32,
        flags: RW,
        offset: 0,
        iova: IOVA,
        size: SIZE as u64,
    }
    .encode();
    let unmap = DmaUnmap {
        argsz: DMA_UNMAP_SIZE as u32,
        flags: 0,
        iova: IOVA,
        size: SIZE as u64,
    }
    .encode();
    let mut ids = [(0u16, 0u16); PAIRS];
    for (i, id) in ids.iter_mut().enumerate() {
        let err = |what: &str, e| format!("{what} {i} (pipelined, sending): {e}");
        id.0 = c
            .send_command(Command::DmaMap, &map, &[mem.fd.as_fd()])
            .map_err(|e| err("DMA_MAP", e))?;
        id.1 = c
            .send_command(Command::DmaUnmap, &unmap, &[])
            .map_err(|e| err("DMA_UNMAP", e))?;
    }
    for (i, &(m, u)) in ids.iter().enumerate() {
        // An error reply arrives as ProtocolError::Remote, which names
        // the errno; a reply to another id or command is a BadReply.
        let err = |what: &str, e| format!("{what} {i} (pipelined): {e}");
        c.reply_to(m, Command::DmaMap)
            .map_err(|e| err("DMA_MAP", e))?;
        let r = c
            .reply_to(u, Command::DmaUnmap)
            .map_err(|e| err("DMA_UNMAP", e))?;
        // What dma_unmap() checks in the serial loop, so both do the same.
        DmaUnmap::decode(&r.payload).map_err(|e| err("DMA_UNMAP", e))?;
    }
    Ok(())
}

/// A type1v2 container with GROUP attached: the direct-ioctl floor.
struct Floor {
    container: OwnedFd,
    _group: OwnedFd,
}

fn open(path: &str) -> Result<OwnedFd, String> {
    let c = std::ffi::CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open {path}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, arg: libc::c_ulong, what: &str) -> Result<(), String> {
    // SAFETY: these VFIO ioctls take an integer or a pointer to a live,
    // correctly sized struct (the callers').
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Floor {
    fn open(group: &str) -> Result<Floor, String> {
        let container = open("/dev/vfio/vfio")?;
        ioctl(&container, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")?;
        let g = open(&format!("/dev/vfio/{group}"))?;
        let cfd = container.as_raw_fd();
        ioctl(
            &g,
            VFIO_GROUP_SET_CONTAINER,
            &cfd as *const i32 as libc::c_ulong,
            "VFIO_GROUP_SET_CONTAINER",
        )?;
        ioctl(
            &container,
            VFIO_SET_IOMMU,
            VFIO_TYPE1V2_IOMMU,
            "VFIO_SET_IOMMU",
        )?;
        Ok(Floor {
            container,
            _group: g,
        })
    }

    fn map(&self, vaddr: u64, iova: u64, size: u64) -> Result<(), String> {
        // struct vfio_iommu_type1_dma_map: argsz, flags, vaddr, iova, size.
        let mut b = [0u64; 4];
        b[0] = 32 | (3u64 << 32); // argsz 32, flags READ | WRITE
        b[1] = vaddr;
        b[2] = iova;
        b[3] = size;
        ioctl(
            &self.container,
            VFIO_IOMMU_MAP_DMA,
            b.as_mut_ptr() as libc::c_ulong,
            "VFIO_IOMMU_MAP_DMA",
        )
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), String> {
        // struct vfio_iommu_type1_dma_unmap: argsz, flags, iova, size.
        let mut b = [0u64; 3];
        b[0] = 24;
        b[1] = iova;
        b[2] = size;
        ioctl(
            &self.container,
            VFIO_IOMMU_UNMAP_DMA,
            b.as_mut_ptr() as libc::c_ulong,
            "VFIO_IOMMU_UNMAP_DMA",
        )
    }
}
