//! Small OS wrappers: page-aligned anonymous buffers and eventfds.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// An anonymous, page-aligned, zeroed mapping usable as a DMA target.
pub struct DmaBuf {
    ptr: *mut u8,
    len: usize,
}

impl DmaBuf {
    pub fn new(len: usize) -> Result<DmaBuf, String> {
        // SAFETY: a fresh private anonymous mapping with no address hint; it does
        // not alias any existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap {len} bytes: {}", io::Error::last_os_error()));
        }
        Ok(DmaBuf {
            ptr: p as *mut u8,
            len,
        })
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Copies the buffer out with volatile loads: the device writes it behind
    /// the compiler's back.
    pub fn read(&self) -> Vec<u8> {
        (0..self.len)
            // SAFETY: i < len, inside the mapping this DmaBuf owns.
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(i)) })
            .collect()
    }

    pub fn fill(&self, f: impl Fn(usize) -> u8) {
        for i in 0..self.len {
            // SAFETY: i < len, inside the mapping this DmaBuf owns.
            unsafe { std::ptr::write_volatile(self.ptr.add(i), f(i)) };
        }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in new(); nothing borrows it
        // past this point.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> Result<EventFd, String> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("eventfd: {}", io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Non-blocking read of the counter: None if it is zero.
    pub fn take(&self) -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: reads exactly 8 bytes into a live local u64.
        let n = unsafe { libc::read(self.fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        (n == 8).then_some(v)
    }

    /// Waits until the eventfd is readable, then reads it. Err on timeout.
    pub fn wait(&self, timeout: Duration) -> Result<u64, String> {
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            let mut p = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd on the stack, nfds = 1.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("poll: {e}"));
                }
            }
            if let Some(v) = self.take() {
                return Ok(v);
            }
            if start.elapsed() >= timeout {
                return Err(format!("eventfd not signalled within {timeout:?}"));
            }
        }
    }
}
