//! Small OS wrappers: memfd-backed shared memory, eventfds, shared mappings
//! of a region fd.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A shared mapping of `len` bytes of `fd` at `offset`, unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<Mapping, String> {
        // SAFETY: no address hint, so the kernel picks a fresh range that
        // aliases nothing of ours; fd is a live descriptor; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap {len:#x} bytes at offset {offset:#x}: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The start of the mapping, for a reader on another thread.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    pub fn read32(&self, off: usize) -> u32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "read32 at {off:#x}"
        );
        // SAFETY: aligned and inside the mapping (asserted); volatile because a
        // device or another process changes it behind the compiler's back.
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u32>()) }
    }

    pub fn write32(&self, off: usize, v: u32) {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "write32 at {off:#x}"
        );
        // SAFETY: aligned and inside the mapping (asserted); volatile so every
        // store reaches the device.
        unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<u32>(), v) }
    }

    pub fn read8(&self, off: usize) -> u8 {
        assert!(off < self.len, "read8 at {off:#x}");
        // SAFETY: inside the mapping (asserted); volatile, see read32.
        unsafe { std::ptr::read_volatile(self.ptr.add(off)) }
    }

    pub fn write8(&self, off: usize, v: u8) {
        assert!(off < self.len, "write8 at {off:#x}");
        // SAFETY: inside the mapping (asserted); volatile, see write32.
        unsafe { std::ptr::write_volatile(self.ptr.add(off), v) }
    }

    pub fn bytes(&self, off: usize, n: usize) -> Vec<u8> {
        (off..off + n).map(|i| self.read8(i)).collect()
    }

    pub fn fill(&self, off: usize, n: usize, f: impl Fn(usize) -> u8) {
        for i in 0..n {
            self.write8(off + i, f(i));
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned in new(); no reference into
        // it outlives self (all accessors copy).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A memfd of `len` bytes, mapped shared so the probe sees what DMA wrote.
pub struct Memfd {
    pub fd: OwnedFd,
    pub map: Mapping,
}

impl Memfd {
    pub fn new(name: &std::ffi::CStr, len: usize) -> Result<Memfd, String> {
        // SAFETY: name is a valid NUL-terminated string; the result is checked.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(format!("memfd_create: {}", io::Error::last_os_error()));
        }
        // SAFETY: raw is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a valid fd and a length that fits off_t.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(format!("ftruncate memfd: {}", io::Error::last_os_error()));
        }
        let map = Mapping::new(fd.as_fd(), 0, len)?;
        Ok(Memfd { fd, map })
    }
}

pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> Result<EventFd, String> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a new fd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("eventfd: {}", io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn dup(&self) -> Result<OwnedFd, String> {
        self.0.try_clone().map_err(|e| format!("dup eventfd: {e}"))
    }

    /// Non-blocking read of the counter: None if it is zero.
    pub fn take(&self) -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live local u64.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut v as *mut u64).cast::<libc::c_void>(),
                8,
            )
        };
        (n == 8).then_some(v)
    }

    /// Waits until the eventfd is readable, then reads it. Err on timeout.
    pub fn wait(&self, timeout: Duration) -> Result<u64, String> {
        let start = Instant::now();
        loop {
            if let Some(v) = self.take() {
                return Ok(v);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(format!("eventfd not signalled within {timeout:?}"));
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            if let Err(e) = readable(self.0.as_fd(), ms) {
                return Err(format!("poll eventfd: {e}"));
            }
        }
    }
}

/// Sleeps in poll(2) until `fd` is readable (true) or `ms` milliseconds
/// pass (false); an interrupted poll is retried.
pub fn readable(fd: BorrowedFd<'_>, ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd on the stack, nfds = 1.
        match unsafe { libc::poll(&mut p, 1, ms) } {
            0 => return Ok(false),
            1.. => return Ok(true),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// How a forked child ended.
#[derive(Debug)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(i32),
    TimedOut,
}

/// Runs `f` in a forked child (so a SIGBUS or a hang cannot take the probe
/// down) and reports how it ended. The probe is single-threaded, so the
/// child may run ordinary code.
pub fn in_child(f: impl FnOnce() -> i32, timeout: Duration) -> Result<ChildEnd, String> {
    // SAFETY: fork in a single-threaded process; the child only runs `f`
    // and then _exit, never returning into the parent's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child; status is a live local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if libc::WIFSIGNALED(status) {
                return Ok(ChildEnd::Signaled(libc::WTERMSIG(status)));
            }
            return Ok(ChildEnd::Exited(libc::WEXITSTATUS(status)));
        }
        if r < 0 {
            return Err(format!("waitpid: {}", io::Error::last_os_error()));
        }
        if start.elapsed() >= timeout {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Ok(ChildEnd::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Forks a child that runs `child` on its end of a new socket pair and
/// exits with what it returns; returns this end and the child's pid (the
/// caller reaps it). The probe is single-threaded, so the child may run
/// ordinary code.
pub fn fork_with_socket(
    child: impl FnOnce(UnixStream) -> i32,
) -> Result<(UnixStream, libc::pid_t), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    // SAFETY: fork in a single-threaded process; the child only runs
    // `child` and then _exit, never returning into the parent's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(ours);
        let code = child(theirs);
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    Ok((ours, pid))
}

/// pread of `buf.len()` bytes at `offset` of `fd`.
pub fn pread(fd: BorrowedFd<'_>, offset: u64, buf: &mut [u8]) -> Result<(), String> {
    // SAFETY: buf is a live, writable slice of exactly buf.len() bytes.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    };
    match n {
        n if n < 0 => Err(io::Error::last_os_error().to_string()),
        n if n as usize != buf.len() => Err(format!("short read ({n} bytes)")),
        _ => Ok(()),
    }
}
