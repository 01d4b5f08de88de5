//! What the bench reads besides wall time: CPU clocks of server threads
//! and processes, an allocation counter, thread ids and CPU affinity.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts allocations (and reallocations) in this process: the client
/// thread's apart from everyone else's (the in-process servers').
pub struct Counting;

pub static ALLOCS: AtomicU64 = AtomicU64::new(0);
pub static CLIENT_ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static IS_CLIENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as the client (its allocations are counted apart).
pub fn mark_client() {
    IS_CLIENT.with(|c| c.set(true));
}

fn count() {
    if IS_CLIENT.with(|c| c.get()) {
        CLIENT_ALLOCS.fetch_add(1, Ordering::Relaxed);
    } else {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter is a relaxed atomic with no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for GlobalAlloc::alloc holds.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: as alloc.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: p came from this allocator (System) with layout l.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: p came from System with layout l; the caller's contract holds.
        unsafe { System.realloc(p, l, n) }
    }
}

/// Allocations so far by threads other than the client.
pub fn allocs() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

pub fn client_allocs() -> u64 {
    CLIENT_ALLOCS.load(Ordering::Relaxed)
}

/// A CPU-time clock (a thread's or a whole process's).
#[derive(Clone, Copy)]
pub struct CpuClock(libc::clockid_t);

impl CpuClock {
    pub fn of_thread(t: &std::thread::JoinHandle<()>) -> CpuClock {
        use std::os::unix::thread::JoinHandleExt;
        let mut c: libc::clockid_t = 0;
        // SAFETY: the thread is alive (its handle is held); c is written.
        let r = unsafe { libc::pthread_getcpuclockid(t.as_pthread_t(), &mut c) };
        assert_eq!(r, 0, "pthread_getcpuclockid");
        CpuClock(c)
    }

    pub fn of_process(pid: i32) -> CpuClock {
        let mut c: libc::clockid_t = 0;
        // SAFETY: c is written; pid is a process we started.
        let r = unsafe { libc::clock_getcpuclockid(pid, &mut c) };
        assert_eq!(r, 0, "clock_getcpuclockid({pid})");
        CpuClock(c)
    }

    /// CPU time so far, in microseconds.
    pub fn us(self) -> f64 {
        // SAFETY: plain data, written by clock_gettime.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: ts is a valid timespec to write.
        unsafe { libc::clock_gettime(self.0, &mut ts) };
        ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
    }
}

pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments.
    unsafe { libc::gettid() }
}

/// Restricts thread `tid` (0: the caller) to `cpus`.
pub fn pin(tid: i32, cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Every thread of process `pid` (for pinning a whole server process).
pub fn tasks(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The first child of process `pid` (the sandboxed server of a supervisor).
pub fn child_of(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}
