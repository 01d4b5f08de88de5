//! The floor of `--bench-dma` under airlock's own seccomp filter: a forked
//! child installs the very BPF program airlock's sandboxed `--vfio` server
//! runs under (sandbox/seccomp.rs, built by airlock's code) and runs the
//! floor's loops on request. Beside the plain floor, in the same rounds,
//! that prices what the filter adds to the two VFIO ioctls (a filter with
//! argument checks runs its BPF on every ioctl; the kernel's cache only
//! skips it for calls allowed outright) apart from anything else the
//! sandbox or the server does.
//!
//! The same child is also the floor across a process boundary: the batch
//! as two requests (all maps, then all unmaps), each answered once its
//! ioctls are done and awaited in poll(2), as QEMU awaits a DMA_MAP_MULTI
//! and a DMA_UNMAP_MULTI. That is what any out-of-process server pays here
//! for the batched pair at least: the ioctls, two waited-for round trips,
//! and nothing of a protocol (one byte each way).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use airlock::sandbox::seccomp::{self, Profile};

use crate::bench_loops::{floor_batched, floor_mapped, floor_maps, floor_unmaps, Floor};

/// Which floor loop the child runs.
#[derive(Clone, Copy)]
pub enum Loop {
    /// A map and its unmap, PAIRS times (bench_loops::floor_mapped).
    Pairs = b'p' as isize,
    /// PAIRS maps, then their unmaps (bench_loops::floor_batched).
    Batched = b'b' as isize,
    /// PAIRS maps (bench_loops::floor_maps).
    Maps = b'm' as isize,
    /// Their unmaps (bench_loops::floor_unmaps).
    Unmaps = b'u' as isize,
}

/// The confined child and the socket it takes requests on; it ends when
/// the socket closes, and is reaped on drop.
pub struct Confined {
    sock: UnixStream,
    pid: libc::pid_t,
}

impl Confined {
    /// Forks the child, which installs airlock's `--vfio` filter and then
    /// waits for requests; it runs on `floor`'s container and `vaddr`
    /// (inherited), so it makes the same ioctls as the plain floor.
    pub fn spawn(floor: &Floor, vaddr: u64) -> Result<Confined, String> {
        // Built here, so the child only installs it: its allocations and
        // file reads would not pass the filter.
        let prog = seccomp::build(Profile::Vfio).map_err(|e| e.to_string())?;
        let (ours, pid) = crate::os::fork_with_socket(|theirs| {
            // As a File: read(2) and write(2), which the filter allows
            // (a UnixStream reads and writes with recvfrom and sendto).
            let file = std::fs::File::from(std::os::fd::OwnedFd::from(theirs));
            match seccompiler::apply_filter(&prog) {
                Ok(()) => serve(file, floor, vaddr),
                Err(_) => 1,
            }
        })?;
        Ok(Confined { sock: ours, pid })
    }

    /// The child's pid (its CPU time and switches are the server's).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Runs `which` in the child: microseconds per pair.
    pub fn run(&mut self, which: Loop) -> Result<f64, String> {
        self.ask(which, false)
    }

    /// The batched pair across the process boundary: the maps as one
    /// request, then the unmaps as another, each answer awaited in poll(2).
    pub fn batch_in_two(&mut self) -> Result<(), String> {
        self.ask(Loop::Maps, true)?;
        self.ask(Loop::Unmaps, true)?;
        Ok(())
    }

    /// Sends `which` and reads the child's answer (microseconds per pair
    /// of its loop); with `in_poll`, first sleeps in poll(2) until the
    /// answer is there, as a client in an event loop does.
    fn ask(&mut self, which: Loop, in_poll: bool) -> Result<f64, String> {
        let mut b = [0u8; 8];
        let asked = self.sock.write_all(&[which as u8]);
        let asked = asked.and_then(|_| if in_poll { self.readable() } else { Ok(()) });
        if let Err(e) = asked.and_then(|_| self.sock.read_exact(&mut b)) {
            return Err(format!(
                "the floor under airlock's seccomp filter: {e}; the child {}",
                self.end()
            ));
        }
        let us = f64::from_le_bytes(b);
        if us.is_nan() {
            return Err("the floor under airlock's seccomp filter: an ioctl failed".into());
        }
        Ok(us)
    }

    /// Sleeps in poll(2) until the child's answer can be read (10 s at most).
    fn readable(&self) -> std::io::Result<()> {
        match crate::os::readable(self.sock.as_fd(), 10_000)? {
            true => Ok(()),
            false => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Reaps the child that stopped answering: how it ended.
    fn end(&mut self) -> String {
        let mut status = 0;
        // SAFETY: waits for our own child; status is a live local.
        if unsafe { libc::waitpid(self.pid, &mut status, 0) } != self.pid {
            return "could not be reaped".into();
        }
        self.pid = -1;
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            let why = if sig == libc::SIGSYS {
                " (SIGSYS: a call outside airlock's allowlist)"
            } else {
                ""
            };
            return format!("was killed by signal {sig}{why}");
        }
        format!("exited with status {}", libc::WEXITSTATUS(status))
    }
}

impl Drop for Confined {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if self.pid < 0 {
            return;
        }
        let mut status = 0;
        // SAFETY: waits for our own child; status is a live local.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The child, confined: one loop per request byte until the socket
/// closes. Only read, write, the two VFIO ioctls and the clock: all in
/// airlock's allowlist. Returns the exit code.
fn serve(mut sock: std::fs::File, floor: &Floor, vaddr: u64) -> i32 {
    let mut req = [0u8; 1];
    while sock.read_exact(&mut req).is_ok() {
        let t = std::time::Instant::now();
        let done = match req[0] {
            r if r == Loop::Pairs as u8 => floor_mapped(floor, vaddr).is_ok(),
            r if r == Loop::Batched as u8 => floor_batched(floor, vaddr).is_ok(),
            r if r == Loop::Maps as u8 => floor_maps(floor, vaddr).is_ok(),
            r if r == Loop::Unmaps as u8 => floor_unmaps(floor).is_ok(),
            _ => false,
        };
        let us = if done {
            t.elapsed().as_secs_f64() * 1e6 / crate::bench_dma::PAIRS as f64
        } else {
            f64::NAN
        };
        if sock.write_all(&us.to_le_bytes()).is_err() {
            return 1;
        }
    }
    0
}
