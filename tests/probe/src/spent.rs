//! What a process spent: CPU time and context switches, summed over every
//! thread of it and of its descendants (airlock's supervisor serves
//! nothing; its sandboxed server is its child). The kernel's own
//! accounting, not a clock around a loop:
//! - CPU time: each process's CPU-time clock (clock_getcpuclockid), in ns.
//!   /proc's schedstat would do for a sleeping process, but for a running
//!   one (this probe, reading itself) it lags by up to a scheduler tick;
//! - switches: voluntary_ctxt_switches (the thread slept: waited for input
//!   or a lock) and nonvoluntary_ctxt_switches (it was preempted) in
//!   /proc/<pid>/task/<tid>/status.
//!
//! The two are read apart, so that a caller can keep the /proc reading
//! (which costs CPU time of its own) out of the CPU time it measures.

/// A process and its descendants, as found when it was made.
pub struct Tree(Vec<u32>);

/// Totals since the processes started; subtract two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spent {
    pub cpu_ns: u64,
    pub voluntary: u64,
    pub involuntary: u64,
}

impl Tree {
    pub fn of(pid: u32) -> Result<Tree, String> {
        let mut pids = vec![pid];
        let mut i = 0;
        while i < pids.len() {
            let dir = format!("/proc/{}/task", pids[i]);
            let tasks = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
            for e in tasks.flatten() {
                // A thread may exit between readdir and open: skip it.
                if let Ok(k) = std::fs::read_to_string(e.path().join("children")) {
                    pids.extend(k.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
                }
            }
            i += 1;
        }
        Ok(Tree(pids))
    }

    /// The process alone, without its descendants.
    pub fn process(pid: u32) -> Tree {
        Tree(vec![pid])
    }

    /// The CPU time of every process so far (a process that ended counts 0).
    pub fn cpu_ns(&self) -> u64 {
        self.0.iter().map(|&p| cpu_ns(p).unwrap_or(0)).sum()
    }

    /// (user, system) CPU nanoseconds of the tree, from /proc/<pid>/stat's
    /// utime and stime: the kernel splits each process's exact run time
    /// by where its scheduler ticks fell, and reports it in clock ticks
    /// (USER_HZ), so only a long span gives a usable split.
    pub fn user_system_ns(&self) -> (u64, u64) {
        // SAFETY: sysconf takes a constant and touches no memory of ours.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let mut total = (0, 0);
        for pid in &self.0 {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The fields after the command, which is in parentheses and
            // may hold spaces: utime and stime are the 14th and 15th.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let f: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            if let [u, s] = f[..] {
                total.0 += u * 1_000_000_000 / hz;
                total.1 += s * 1_000_000_000 / hz;
            }
        }
        total
    }

    /// The switch counters of every thread so far (cpu_ns left 0).
    pub fn switches(&self) -> Spent {
        let mut total = Spent::default();
        for pid in &self.0 {
            let dir = format!("/proc/{pid}/task");
            let Ok(tasks) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in tasks.flatten() {
                if let Ok(s) = std::fs::read_to_string(e.path().join("status")) {
                    total.add_switches(&s);
                }
            }
        }
        total
    }
}

impl Spent {
    /// Both readings of `pid` and its descendants (tests; a measurement
    /// reads them apart, see bench_spent.rs).
    #[cfg(test)]
    pub fn of(pid: u32) -> Result<Spent, String> {
        let tree = Tree::of(pid)?;
        Ok(Spent {
            cpu_ns: tree.cpu_ns(),
            ..tree.switches()
        })
    }

    pub fn switches(&self) -> u64 {
        self.voluntary + self.involuntary
    }

    /// What was spent between `before` and this reading.
    pub fn since(&self, before: &Spent) -> Spent {
        Spent {
            cpu_ns: self.cpu_ns.saturating_sub(before.cpu_ns),
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }

    /// Adds the two switch counters of one thread's status file.
    fn add_switches(&mut self, status: &str) {
        for line in status.lines() {
            let n = |v: &str| v.trim().parse::<u64>().unwrap_or(0);
            if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                self.voluntary += n(v);
            } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                self.involuntary += n(v);
            }
        }
    }
}

/// Voluntary and involuntary switches of `pid` and its descendants so far.
pub fn context_switches(pid: u32) -> Result<u64, String> {
    Ok(Tree::of(pid)?.switches().switches())
}

/// The CPU time of every thread of process `pid` so far, in ns.
fn cpu_ns(pid: u32) -> Result<u64, String> {
    let what = |e: std::io::Error| format!("CPU-time clock of pid {pid}: {e}");
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock is a live local the call writes.
    let r = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    if r != 0 {
        return Err(what(std::io::Error::from_raw_os_error(r)));
    }
    // SAFETY: plain data; zeroed is a valid timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: ts is a live local the call writes.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(what(std::io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_computes_then_waits_spends_cpu_and_sleeps_and_its_child_counts() {
        // sh counts, then waits for its own child (sleep): a voluntary
        // switch. A process of its own, so that no test thread of this
        // one ending between two readings can take counts away.
        let mut sh = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 5",
            ])
            .spawn()
            .unwrap();
        let before = Spent::of(sh.id()).unwrap();
        let mut tree = Tree::of(sh.id()).unwrap();
        for _ in 0..100 {
            if tree.0.len() > 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            tree = Tree::of(sh.id()).unwrap();
        }
        // Time for sh to reach its wait for sleep.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let d = Spent::of(sh.id()).unwrap().since(&before);
        sh.kill().unwrap();
        sh.wait().unwrap();
        assert_eq!(tree.0.len(), 2, "sh and its sleep: {:?}", tree.0);
        assert!(d.cpu_ns > 0, "{d:?}");
        assert!(d.voluntary >= 1, "{d:?}");
    }

    #[test]
    fn cpu_burnt_in_user_space_counts_as_user_time() {
        let me = Tree::of(std::process::id()).unwrap();
        let (u0, _) = me.user_system_ns();
        // 300 ms of this thread's own CPU time, all in user space (other
        // tests' threads only add to the process's figures).
        let thread_ns = || {
            // SAFETY: timespec is plain integers; all-zero is valid.
            let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
            // SAFETY: ts is a live local the call fills.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        };
        let start = thread_ns();
        let mut x = 0u64;
        while thread_ns() - start < 300_000_000 {
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        let (u1, _) = me.user_system_ns();
        assert!(u1 - u0 >= 150_000_000, "user time grew by {} ns", u1 - u0);
    }

    #[test]
    fn a_status_file_gives_both_counters() {
        let mut s = Spent::default();
        s.add_switches("Name:\tx\nvoluntary_ctxt_switches:\t7\nnonvoluntary_ctxt_switches:\t2\n");
        assert_eq!((s.voluntary, s.involuntary, s.switches()), (7, 2, 9));
    }
}
