//! airlock side by side with the raw AF_UNIX floor and with rust-vmm's
//! vfio_user server, in one process run: REGION_READ/WRITE at 4 B and
//! 4 KiB, a DMA_MAP+UNMAP pair (4 KiB memfd), SET_IRQS (one eventfd).
//!
//! Columns: the floor (an echo thread: one blocking read, one write, same
//! sizes), the floor reading header and payload apart (two reads: prices
//! one more recvmsg), the floor in a process of its own (prices the switch
//! between processes the binaries pay), airlock's serve() on a thread, the airlock binary with the
//! sandbox off and on (root only), rust-vmm's server on a thread. Every
//! client uses the same bytes and the same exchange (one sendmsg, one
//! blocking read). Rounds are interleaved (each round runs every mode,
//! operation and column, the column order rotating). Latency is the median
//! of every op's time (robust to preemption by other jobs on shared CPUs);
//! the other figures are medians of per-round means. Server CPU per op comes from the server thread's or
//! process's CPU clock; allocations per op from a counting allocator
//! (in-process servers only; the client allocates nothing).
//!
//! Modes: `pinned` (client and servers on CPU 0), `cross` (client on CPU 0,
//! servers on CPU 1: what a vCPU thread and airlock see), `unpinned`.
//!
//!     cargo bench -p airlock --bench peers [-- ROUNDS OPS [MODES]]
//!     cargo bench -p airlock --bench peers -- strace N

mod measure;
mod ops;
mod peer;
mod servers;
mod strace;

use std::time::Instant;

use measure::{allocs, client_allocs, gettid, mark_client, median, pin, Counting};
use ops::{exchange, Op};
use servers::{Keep, Target};

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Default, Clone)]
struct Samples {
    /// Every op's latency (us): its median shrugs off preemptions by the
    /// other jobs on these shared CPUs, which per-round means do not.
    lat: Vec<f32>,
    cpu: Vec<f64>,
    allocs: Vec<f64>,
}

fn median32(v: &[f32]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2] as f64
}

fn apply(mode: &str, targets: &[Target], ncpu: usize) {
    let all: Vec<usize> = (0..ncpu).collect();
    let (client, server): (&[usize], &[usize]) = match mode {
        "pinned" => (&[0], &[0]),
        "cross" => (&[0], &[1]),
        _ => (&all, &all),
    };
    pin(gettid(), client);
    for t in targets {
        for &tid in &t.tasks {
            pin(tid, server);
        }
    }
}

fn round(t: &Target, i: usize, op: &Op, n: usize, s: &mut Samples) {
    let sock = &t.socks[i];
    let mut reply = [0u8; 8192];
    let (c0, a0) = (t.clocks[i].us(), allocs());
    for _ in 0..n {
        let t0 = Instant::now();
        for step in &op.steps {
            exchange(sock, step, &mut reply);
        }
        s.lat.push(t0.elapsed().as_secs_f32() * 1e6);
    }
    s.cpu.push((t.clocks[i].us() - c0) / n as f64);
    s.allocs.push((allocs() - a0) as f64 / n as f64);
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    // SAFETY: sysconf has no memory arguments.
    let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    mark_client();
    let ops = ops::all();
    let mut keep =
        Keep::new(std::env::temp_dir().join(format!("airlock-peers-{}", std::process::id())));
    std::fs::create_dir_all(&keep.dir).expect("temp dir");
    let n = ops.len();
    let mut targets = vec![
        servers::floor(&mut keep, &ops, false),
        servers::floor(&mut keep, &ops, true),
        servers::floor_process(&mut keep, &ops),
        servers::airlock_thread(&mut keep, n),
    ];
    targets.extend(servers::airlock_binary(&mut keep, "off", n));
    // SAFETY: geteuid has no arguments.
    match (unsafe { libc::geteuid() } == 0)
        .then(|| servers::airlock_binary(&mut keep, "on", n))
        .flatten()
    {
        Some(t) => targets.push(t),
        None => println!("SKIP binary sandbox on: not root or the sandbox could not start"),
    }
    targets.push(servers::rust_vmm(&mut keep, n));
    for t in &targets {
        for (i, op) in ops.iter().enumerate() {
            for s in &op.steps {
                if let Err(e) = ops::check(&t.socks[i], s) {
                    panic!("{} {}: {e}", t.name, op.name);
                }
            }
        }
    }

    if args.first().map(String::as_str) == Some("strace") {
        let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
        return syscalls(&targets, &ops, n);
    }
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(21);
    let per: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let modes: Vec<String> = args
        .get(2)
        .map(|m| m.split(',').map(String::from).collect())
        .unwrap_or_else(|| vec!["pinned".into(), "cross".into()]);

    let mut res = vec![vec![vec![Samples::default(); targets.len()]; ops.len()]; modes.len()];
    for (m, mode) in modes.iter().enumerate() {
        apply(mode, &targets, ncpu);
        for (j, t) in targets.iter().enumerate() {
            for (i, op) in ops.iter().enumerate() {
                round(t, i, op, per / 10, &mut res[m][i][j].clone());
            }
        }
    }
    let client0 = client_allocs();
    for r in 0..rounds {
        for (m, mode) in modes.iter().enumerate() {
            apply(mode, &targets, ncpu);
            for (i, op) in ops.iter().enumerate() {
                for k in 0..targets.len() {
                    let j = (k + r) % targets.len();
                    round(&targets[j], i, op, per, &mut res[m][i][j]);
                }
            }
        }
    }
    apply("unpinned", &targets, ncpu);
    let client = (client_allocs() - client0) as f64
        / (modes.len() * rounds * per * ops.len() * targets.len()) as f64;
    println!("{rounds} interleaved rounds x {per} ops per cell; latency: median of every op; CPU and allocations: medians of per-round means; client allocations per op: {client:.2}");
    for (m, mode) in modes.iter().enumerate() {
        table(mode, &targets, &ops, &res[m]);
    }
}

fn table(mode: &str, targets: &[Target], ops: &[Op], res: &[Vec<Samples>]) {
    let what = match mode {
        "pinned" => "client and servers on CPU 0",
        "cross" => "client on CPU 0, servers on CPU 1",
        _ => "scheduler's choice",
    };
    println!("\n== {mode}: {what}; latency us per op (x floor) ==");
    let peer = targets.iter().position(|t| t.name == "rust-vmm");
    let mut head = format!("{:<20} {:>8}", "operation", "floor");
    for t in &targets[1..] {
        head += &format!(" {:>19}", t.name);
    }
    println!("{head}  {:>9} {:>9}", "thr/peer", "bin/peer");
    for (i, op) in ops.iter().enumerate() {
        let lat: Vec<f64> = res[i].iter().map(|s| median32(&s.lat)).collect();
        let thr = targets
            .iter()
            .position(|t| t.name == "airlock thread")
            .unwrap_or(1);
        let mut line = format!("{:<20} {:>8.2}", op.name, lat[0]);
        for l in &lat[1..] {
            line += &format!(" {:>10.2} ({:>5.2})", l, l / lat[0]);
        }
        if let Some(p) = peer {
            let bin = targets.iter().rposition(|t| t.name.starts_with("binary"));
            line += &format!("  {:>9.3}", lat[thr] / lat[p]);
            if let Some(b) = bin {
                line += &format!(" {:>9.3}", lat[b] / lat[p]);
            }
        }
        println!("{line}");
    }
    println!("-- {mode}: server CPU us per op; allocations per op (in-process servers) --");
    let mut head = format!("{:<20}", "operation");
    for t in targets {
        head += &format!(" {:>19}", t.name);
    }
    println!("{head}");
    for (i, op) in ops.iter().enumerate() {
        let mut line = format!("{:<20}", op.name);
        for (j, t) in targets.iter().enumerate() {
            let cpu = median(&res[i][j].cpu);
            if t.in_process {
                line += &format!(" {:>9.2} {:>4.1} al", cpu, median(&res[i][j].allocs));
            } else {
                line += &format!(" {:>9.2} {:>7}", cpu, "");
            }
        }
        println!("{line}");
    }
}

fn syscalls(targets: &[Target], ops: &[Op], n: usize) {
    println!("server syscalls per message (strace -c attached to the server thread, or -f to the");
    println!("binary's server process; {n} ops each; a DMA_MAP+UNMAP pair is 2 messages)");
    let mut head = format!("{:<20}", "operation");
    for t in targets {
        head += &format!(" {:>19}", t.name);
    }
    println!("{head}");
    let mut detail = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let mut line = format!("{:<20}", op.name);
        for t in targets {
            match strace::count(t, i, op, n) {
                Ok((per, top)) => {
                    line += &format!(" {:>19.2}", per);
                    detail.push(format!("  {:<20} {:<20} {top}", op.name, t.name));
                }
                Err(e) => {
                    line += &format!(" {:>19}", "n/a");
                    detail.push(format!("  {:<20} {:<20} {e}", op.name, t.name));
                }
            }
        }
        println!("{line}");
    }
    println!("which calls, per message:");
    for d in detail {
        println!("{d}");
    }
}
