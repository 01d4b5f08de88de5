//! Whose time a `--bench-dma` loop is: per pair, the context switches of
//! the whole machine (/proc/stat's ctxt), and the CPU time and switches of
//! the server (airlock's process tree, or the echo) and of the client (this
//! probe), from the kernel's own accounting (spent.rs). Read before and
//! after each loop, outside its timed span.
//!
//! A process clock counts a thread that is running on another CPU when it
//! is read only up to that thread's last tick or switch: a server that
//! still spins when the loop ends (`--poll-us`) is undercounted, one that
//! sleeps in its read is exact.
//!
//! The whole-machine count alone cannot tell a server that sleeps between
//! queued messages from a client that sleeps waiting for each flush of
//! replies; the split can, and the CPU times say whether a slower pair is
//! work (the server's CPU time per pair grows) or waiting (it does not).

use crate::bench_dma::median;
use crate::report::info;
use crate::spent::{Spent, Tree};

/// Per-pair figures of one loop, one entry per round.
#[derive(Default)]
pub struct Account {
    machine: Vec<f64>,
    server: Vec<[f64; 3]>,
    client: Vec<[f64; 3]>,
}

impl Account {
    /// Runs `body` (a loop over `pairs` pairs) and records what it cost
    /// per pair. `server`: the pid whose tree serves the loop (None: no
    /// server, the floor's ioctls).
    pub fn measure<T>(
        &mut self,
        server: Option<u32>,
        pairs: usize,
        body: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        let me = Tree::of(std::process::id()).ok();
        let srv = server.and_then(|p| Tree::of(p).ok());
        // The /proc reading takes CPU time of this process: the switch
        // counters are read outside the span the CPU clocks cover.
        let switches = |t: &Option<Tree>| t.as_ref().map(Tree::switches);
        let cpu = |t: &Option<Tree>| t.as_ref().map(Tree::cpu_ns);
        let (s0, c0, m0) = (switches(&srv), switches(&me), ctxt());
        let (sc0, cc0) = (cpu(&srv), cpu(&me));
        let out = body()?;
        let (sc1, cc1) = (cpu(&srv), cpu(&me));
        let (s1, c1, m1) = (switches(&srv), switches(&me), ctxt());
        let with =
            |s: Option<Spent>, c: Option<u64>| s.zip(c).map(|(s, cpu_ns)| Spent { cpu_ns, ..s });
        let (s0, s1) = (with(s0, sc0), with(s1, sc1));
        let (c0, c1) = (with(c0, cc0), with(c1, cc1));
        let per = |d: Spent| {
            let n = pairs as f64;
            [
                d.cpu_ns as f64 / 1e3 / n,
                d.voluntary as f64 / n,
                d.involuntary as f64 / n,
            ]
        };
        self.machine
            .push(m1.saturating_sub(m0) as f64 / pairs as f64);
        if let (Some(a), Some(b)) = (s0, s1) {
            self.server.push(per(b.since(&a)));
        }
        if let (Some(a), Some(b)) = (c0, c1) {
            self.client.push(per(b.since(&a)));
        }
        Ok(out)
    }

    /// One INFO line: medians per pair.
    pub fn report(self, what: &str) {
        let side = |name: &str, v: Vec<[f64; 3]>| {
            if v.is_empty() {
                return String::new();
            }
            let f = |i: usize| median(v.iter().map(|x| x[i]).collect());
            format!(
                "; {name} CPU {:.1} us, slept {:.2}, preempted {:.2}",
                f(0),
                f(1),
                f(2)
            )
        };
        info(&format!(
            "bench-dma: per pair, {what} (medians): whole machine {:.2} switches{}{}",
            median(self.machine),
            side("server", self.server),
            side("client", self.client)
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
