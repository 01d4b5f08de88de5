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
//! Pipelined, the replies are awaited two ways: in recvmsg, and in
//! poll(2) for input before each read that has nothing buffered
//! (`evloop`), as QEMU's event loop waits. A reader asleep in recvmsg is
//! woken each time the server consumes one of its requests (the socket's
//! write-space wake-up; protocol socket/wait.rs), so while a slower server
//! works through the batch, the client wakes about once per pair for
//! nothing, and the server pays for every wake-up it causes.
//!
//! The same loops also run against a forked echo (bench_echo.rs) that
//! receives with airlock's socket code and answers at once: what the
//! messages cost by themselves here, so that airlock minus echo is
//! airlock's own work plus the two ioctls.
//!
//! The floor is a tight loop; a server's ioctls come right after the
//! request woke it. So the floor also runs with an empty round trip to the
//! echo before each ioctl, and the round trips alone, which prices the two
//! ioctls when they follow a process switch (an INFO line).
//!
//! Batched, the pairs go as one DMA_MAP_MULTI and one DMA_UNMAP_MULTI
//! (airlock's proposal, protocol dma_multi.rs; the connection proposes
//! dma_multiple): the server's IOMMU calls are the same, the messages, fds
//! and wake-ups per pair fall by PAIRS. Its floor in the same order (all
//! maps, then all unmaps) is an INFO line.
//!
//! With `--airlock-pid`, each loop also reports whose time it was: the
//! CPU time and switches per pair of the server and of the probe
//! (bench_spent.rs).
//!
//! Two more INFO lines say whether what is left is airlock's: the floor
//! run in a forked child under airlock's own seccomp filter
//! (bench_confined.rs), and one long batched run with airlock's, this
//! probe's and the floor's user and system time (bench_split.rs). A third
//! splits the batched pair into what each batch costs and what each pair
//! costs, from batches of 1 to 250 pairs (bench_sizes.rs).
//!
//! `boundary` is the least any out-of-process server could cost for the
//! batched pair here: the same forked child makes the floor's maps on one
//! request and the unmaps on a second, each answer awaited in poll(2)
//! (bench_confined.rs). The floor plus two round trips, with no protocol:
//! `boundary_ratio` is the price of the process boundary alone on this
//! machine, and airlock's batched pair over `boundary` is airlock's own.
//!
//! Rounds interleave the loops; the figures are medians. Prints
//! `BENCH dma-map-unmap airlock_us=A floor_us=F ratio=R pipelined_us=P
//! pipelined_ratio=Q echo_us=E echo_pipelined_us=EP evloop_us=V
//! evloop_ratio=W echo_evloop_us=EV batched_us=B batched_ratio=BR
//! batched_evloop_us=BV batched_evloop_ratio=BVR boundary_us=X
//! boundary_ratio=XR (...)`, Q being P / F, W V / F, BR B / F, BVR BV / F
//! (the batched loop with each reply awaited in poll(2), as QEMU's event
//! loop waits) and XR X / F;
//! later fields come after the earlier ones so that parsers of the older
//! prefix keep working.

use std::os::fd::AsFd;
use std::time::Instant;

use airlock_protocol::client::Client;
use airlock_protocol::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};

use crate::bench_confined::{Confined, Loop};
use crate::bench_echo::Echo;
use crate::bench_loops::{
    batched, batched_of, echo_pings, floor_batched, floor_batched_joined, floor_fresh,
    floor_mapped, pipelined, round_trips, serial, Await, Floor,
};
use crate::bench_spent::Account;
use crate::device::Dev;
use crate::os::Memfd;
use crate::report::{info, Outcome, Report};

const ROUNDS: usize = 21;
pub(crate) const PAIRS: usize = 50;
pub(crate) const SIZE: usize = 4096;
pub(crate) const IOVA: u64 = 0x10_0000;
pub(crate) const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

/// Median microseconds per pair.
struct Figures {
    airlock: f64,
    floor: f64,
    pipelined: f64,
    echo: f64,
    echo_pipelined: f64,
    evloop: f64,
    echo_evloop: f64,
    batched: f64,
    batched_evloop: f64,
    boundary: f64,
}

pub fn run(report: &mut Report, socket: &str, group: &str, airlock: Option<u32>) {
    let outcome = match bench(socket, group, airlock) {
        Ok(Figures {
            airlock: a,
            floor: f,
            pipelined: p,
            echo: e,
            echo_pipelined: ep,
            evloop: v,
            echo_evloop: ev,
            batched: b,
            batched_evloop: bv,
            boundary: x,
        }) => {
            println!(
                "BENCH dma-map-unmap airlock_us={a:.1} floor_us={f:.1} ratio={:.2} pipelined_us={p:.1} pipelined_ratio={:.2} echo_us={e:.1} echo_pipelined_us={ep:.1} evloop_us={v:.1} evloop_ratio={:.2} echo_evloop_us={ev:.1} batched_us={b:.1} batched_ratio={:.2} batched_evloop_us={bv:.1} batched_evloop_ratio={:.2} boundary_us={x:.1} boundary_ratio={:.2} (4 KiB, {ROUNDS} rounds x {PAIRS} pairs, medians)",
                a / f,
                p / f,
                v / f,
                b / f,
                bv / f,
                x / f
            );
            Outcome::Pass
        }
        Err(e) => Outcome::Fail(e),
    };
    report.record("bench-dma-map-unmap", outcome);
}

/// The median of one or more figures.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::MAX, f64::min)
}

/// What each loop cost per pair, and whose it was (bench_spent.rs).
#[derive(Default)]
struct Accounts {
    airlock: Account,
    pipelined: Account,
    echo: Account,
    echo_pipelined: Account,
    evloop: Account,
    echo_evloop: Account,
    batched: Account,
    batched_evloop: Account,
    boundary: Account,
    floor: Account,
}

impl Accounts {
    fn report(self) {
        self.airlock.report("airlock serially");
        self.pipelined.report("airlock pipelined");
        self.echo.report("echo serially");
        self.echo_pipelined.report("echo pipelined");
        self.evloop
            .report("airlock pipelined, replies awaited in poll(2)");
        self.echo_evloop
            .report("echo pipelined, replies awaited in poll(2)");
        self.batched
            .report("airlock batched (one DMA_MAP_MULTI, one DMA_UNMAP_MULTI)");
        self.batched_evloop
            .report("airlock batched, replies awaited in poll(2)");
        self.boundary
            .report("the floor across a process boundary (two requests per batch)");
        self.floor.report("the floor's ioctls");
    }
}

/// per_pair, with whose time it was recorded in `acct` (outside the
/// timed span); `server`: the pid serving the loop.
fn counted(
    acct: &mut Account,
    server: Option<u32>,
    body: impl FnOnce() -> Result<(), String>,
) -> Result<f64, String> {
    acct.measure(server, PAIRS, || per_pair(body))
}

/// Runs one timed loop over PAIRS pairs; returns microseconds per pair.
fn per_pair(body: impl FnOnce() -> Result<(), String>) -> Result<f64, String> {
    let t = Instant::now();
    body()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / PAIRS as f64)
}

/// Per-pair times of every loop, one entry per round.
#[derive(Default)]
struct Loops {
    airlock: Vec<f64>,
    floor: Vec<f64>,
    pipelined: Vec<f64>,
    evloop: Vec<f64>,
    echo: Vec<f64>,
    echo_pipelined: Vec<f64>,
    echo_evloop: Vec<f64>,
    batched: Vec<f64>,
    batched_evloop: Vec<f64>,
    boundary: Vec<f64>,
    batched_warm: Vec<f64>,
    floor_warm: Vec<f64>,
    floor_batched: Vec<f64>,
    floor_joined: Vec<f64>,
    confined: Vec<f64>,
    confined_batched: Vec<f64>,
    rtt: Vec<f64>,
    fresh: Vec<f64>,
    kept: Vec<f64>,
    pings: Vec<f64>,
    switched: Vec<f64>,
    spun: Vec<f64>,
}

/// What one round runs against.
struct Peers<'a> {
    c: &'a mut Client,
    echo: &'a mut Echo,
    floor: &'a Floor,
    /// The floor under airlock's seccomp filter (bench_confined.rs).
    confined: Confined,
    mem: &'a Memfd,
    /// A second mapping of the memory that this process never touches, as
    /// airlock's own mapping of a client's file (dma/host.rs): the VFIO
    /// pin is then the first access through it.
    untouched: crate::os::Mapping,
    /// Whose CPU time and switches count as the server's.
    airlock: Option<u32>,
    echo_pid: Option<u32>,
}

/// `airlock`: the pid of airlock's supervisor (or server), whose CPU time
/// and switches are then counted.
fn bench(socket: &str, group: &str, airlock: Option<u32>) -> Result<Figures, String> {
    let mem = Memfd::new(c"probe-bench-dma", SIZE)?;
    let mut dev = connect_batching(socket)?;
    let mut echo = Echo::spawn()?;
    let floor = Floor::open(group)?;
    let mut peers = Peers {
        c: &mut dev.client,
        echo_pid: Some(echo.pid()),
        echo: &mut echo,
        confined: Confined::spawn(&floor, mem.map.as_ptr() as u64)?,
        floor: &floor,
        mem: &mem,
        untouched: crate::os::Mapping::new(mem.fd.as_fd(), 0, SIZE)?,
        airlock,
    };
    let (mut l, mut acct) = (Loops::default(), Accounts::default());
    for _ in 0..ROUNDS {
        round(&mut peers, &mut l, &mut acct)?;
    }
    info(&format!(
        "bench-dma: per pair, medians: two REGION_READ round trips {:.1} us; the floor with an mmap+munmap around it {:.1} us; the floor on a kept mapping it never touches {:.1} us",
        median(l.rtt),
        median(l.fresh),
        median(l.kept)
    ));
    report_switch_cost(l.pings, l.switched, l.spun);
    info(&format!(
        "bench-dma: one clock read (Instant::now, what airlock's timing of DMA_MAP/UNMAP makes twice per message) {:.0} ns",
        clock_read_ns()
    ));
    info(&format!(
        "bench-dma: per pair, airlock min {:.1} us, pipelined min {:.1} us, floor min {:.1} us",
        min(&l.airlock),
        min(&l.pipelined),
        min(&l.floor)
    ));
    info(&format!(
        "bench-dma: per pair, medians: the floor in the batched loop's order (all {PAIRS} maps, then all unmaps) {:.1} us; the same with the {PAIRS} unmaps as one ioctl over their joined range {:.1} us",
        median(l.floor_batched),
        median(l.floor_joined)
    ));
    info(&format!(
        "bench-dma: per pair, medians: the floor under airlock's seccomp filter (a forked child) {:.1} us, in the batched loop's order {:.1} us",
        median(l.confined),
        median(l.confined_batched)
    ));
    let (bw, fw) = (median(l.batched_warm), median(l.floor_warm));
    info(&format!(
        "bench-dma: per pair, medians, warm (each loop right after an untimed run of itself): airlock batched {bw:.1} us, the floor {fw:.1} us: {:.2}x",
        bw / fw
    ));
    let (bv, x, floor_us) = (
        median(l.batched_evloop),
        median(l.boundary),
        median(l.floor),
    );
    info(&format!(
        "bench-dma: per pair, medians: the floor across a process boundary (a forked child under airlock's seccomp filter makes the {PAIRS} maps on one request and their unmaps on a second, each answer awaited in poll(2)) {x:.1} us, {:.2}x the floor: what any out-of-process server pays here at least; airlock batched, awaited the same way, {bv:.1} us, {:.2}x that",
        x / floor_us,
        bv / x
    ));
    acct.report();
    crate::bench_sizes::report(peers.c, &mem, floor_us)?;
    if let Some(pid) = airlock {
        crate::bench_split::report(peers.c, &mem, &floor, mem.map.as_ptr() as u64, pid)?;
    }
    Ok(Figures {
        airlock: median(l.airlock),
        floor: floor_us,
        pipelined: median(l.pipelined),
        echo: median(l.echo),
        echo_pipelined: median(l.echo_pipelined),
        evloop: median(l.evloop),
        echo_evloop: median(l.echo_evloop),
        batched: median(l.batched),
        batched_evloop: bv,
        boundary: x,
    })
}

/// A QEMU-like VERSION that also proposes dma_multiple, which airlock must
/// answer.
fn connect_batching(socket: &str) -> Result<Dev, String> {
    let mut dev = Dev::connect(socket)?;
    let mut caps = Client::qemu_capabilities();
    caps.dma_multiple = Some(true);
    let v = dev
        .client
        .negotiate(caps)
        .map_err(|e| format!("VERSION: {e}"))?;
    if v.capabilities.and_then(|c| c.dma_multiple) != Some(true) {
        return Err("VERSION: the server did not answer the proposed dma_multiple".into());
    }
    Ok(dev)
}

/// One round of every loop, interleaved.
fn round(p: &mut Peers<'_>, l: &mut Loops, acct: &mut Accounts) -> Result<(), String> {
    let (mem, floor, vaddr) = (p.mem, p.floor, p.mem.map.as_ptr() as u64);
    // Where the rest goes: two message round trips (a REGION_READ of the
    // config space each), and the floor with a fresh mmap and munmap of the
    // memory around each pair (what airlock did per map before it kept one
    // mapping per client file, dma/host.rs).
    l.rtt.push(per_pair(|| round_trips(p.c))?);
    l.fresh.push(per_pair(|| floor_fresh(floor, mem))?);
    let srv = p.airlock;
    l.airlock
        .push(counted(&mut acct.airlock, srv, || serial(p.c, mem))?);
    l.pipelined.push(counted(&mut acct.pipelined, srv, || {
        pipelined(p.c, mem, Await::InRecv)
    })?);
    l.evloop.push(counted(&mut acct.evloop, srv, || {
        pipelined(p.c, mem, Await::InPoll)
    })?);
    l.batched
        .push(counted(&mut acct.batched, srv, || batched(p.c, mem))?);
    l.batched_evloop
        .push(counted(&mut acct.batched_evloop, srv, || {
            batched_of(p.c, mem, PAIRS, Await::InPoll)
        })?);
    let child = Some(p.confined.pid());
    l.boundary.push(counted(&mut acct.boundary, child, || {
        p.confined.batch_in_two()
    })?);
    l.floor.push(counted(&mut acct.floor, None, || {
        floor_mapped(floor, vaddr)
    })?);
    // Warm: each loop again right after an untimed run of itself, so
    // neither side pays for the other loops that ran before it.
    batched(p.c, mem)?;
    l.batched_warm.push(per_pair(|| batched(p.c, mem))?);
    floor_mapped(floor, vaddr)?;
    l.floor_warm.push(per_pair(|| floor_mapped(floor, vaddr))?);
    l.floor_batched
        .push(per_pair(|| floor_batched(floor, vaddr))?);
    l.floor_joined
        .push(per_pair(|| floor_batched_joined(floor, vaddr))?);
    l.confined.push(p.confined.run(Loop::Pairs)?);
    l.confined_batched.push(p.confined.run(Loop::Batched)?);
    let untouched = p.untouched.as_ptr() as u64;
    l.kept.push(per_pair(|| floor_mapped(floor, untouched))?);
    // The floor with a round trip to the echo before each ioctl: the
    // ioctls then run right after a process switch, as airlock's do when
    // it serves one message at a time. Then the same, waiting for each
    // answer by polling the socket instead of sleeping in recvmsg: what a
    // server that polls before it sleeps would pay for the ioctls.
    let echo = &mut p.echo.client;
    l.pings.push(per_pair(|| echo_pings(echo, None, false))?);
    l.switched
        .push(per_pair(|| echo_pings(echo, Some((floor, vaddr)), false))?);
    l.spun
        .push(per_pair(|| echo_pings(echo, Some((floor, vaddr)), true))?);
    let srv = p.echo_pid;
    l.echo
        .push(counted(&mut acct.echo, srv, || serial(echo, mem))?);
    l.echo_pipelined
        .push(counted(&mut acct.echo_pipelined, srv, || {
            pipelined(echo, mem, Await::InRecv)
        })?);
    l.echo_evloop.push(counted(&mut acct.echo_evloop, srv, || {
        pipelined(echo, mem, Await::InPoll)
    })?);
    Ok(())
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
