//! A seccomp violation names itself. The filter traps (SIGSYS) instead of
//! killing; the server's SIGSYS handler records the syscall number in a
//! page shared with the supervisor, writes one line to stderr and exits.
//! The supervisor, outside the sandbox, turns the number into a name and
//! logs it with the device, then restarts the server.
//!
//! Everything the handler does is async-signal-safe: atomic stores into
//! the shared page, write(2) of a stack buffer, exit_group(2) — all three
//! are in every allowlist, so the report cannot itself be forbidden.

use std::io;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, Ordering};

/// Exit code of a server stopped by its own SIGSYS handler (128 + SIGSYS,
/// what a shell shows for a SIGSYS death).
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

/// The shared record: written by the server's handler, read by the
/// supervisor after the server is gone.
#[repr(C)]
pub struct Record {
    /// 1 once a violation was recorded.
    hit: AtomicU32,
    nr: AtomicI32,
    arch: AtomicU32,
}

/// One MAP_SHARED anonymous page holding a Record, made by the supervisor
/// before it starts a server so both see the same memory.
pub struct SharedRecord {
    page: *mut Record,
}

// SAFETY: the page is only touched through atomics.
unsafe impl Send for SharedRecord {}
// SAFETY: as for Send: every access to the page is an atomic operation.
unsafe impl Sync for SharedRecord {}

impl SharedRecord {
    pub fn new() -> io::Result<SharedRecord> {
        // SAFETY: a new anonymous shared mapping; checked below and owned
        // (unmapped on drop) by SharedRecord.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedRecord { page: p.cast() })
    }

    fn record(&self) -> &Record {
        // SAFETY: the page is mapped for the life of self, zero-filled
        // (a valid Record) and only accessed through atomics.
        unsafe { &*self.page }
    }

    /// Forgets a previous server's violation.
    pub fn clear(&self) {
        let r = self.record();
        r.nr.store(0, Ordering::SeqCst);
        r.arch.store(0, Ordering::SeqCst);
        r.hit.store(0, Ordering::SeqCst);
    }

    /// The syscall number a server was stopped for, if any.
    pub fn taken(&self) -> Option<i32> {
        let r = self.record();
        (r.hit.load(Ordering::SeqCst) == 1).then(|| r.nr.load(Ordering::SeqCst))
    }

    /// In the server: route SIGSYS to the reporting handler. Call before
    /// the filter is applied (sigaction itself is not in the allowlist).
    pub fn install_handler(&self) -> io::Result<()> {
        RECORD.store(self.page, Ordering::SeqCst);
        // SAFETY: on_sigsys only stores atomics, writes to stderr and exits
        // (see the module doc): async-signal-safe.
        unsafe {
            crate::signals::install(
                libc::SIGSYS,
                crate::signals::Disposition::InfoHandler(on_sigsys),
                false,
            )
        }
    }
}

impl Drop for SharedRecord {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the page new() mapped.
        unsafe { libc::munmap(self.page.cast(), 4096) };
    }
}

static RECORD: AtomicPtr<Record> = AtomicPtr::new(std::ptr::null_mut());

/// siginfo_t for SIGSYS on 64-bit Linux: si_signo, si_errno, si_code, a
/// pad, then _sigsys { call_addr, syscall, arch } (libc does not expose it).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, laid out as
    // SigsysInfo (include/uapi/asm-generic/siginfo.h).
    let (nr, arch) = unsafe {
        let i = &*(info as *const SigsysInfo);
        (i.syscall, i.arch)
    };
    let rec = RECORD.load(Ordering::SeqCst);
    if !rec.is_null() {
        // SAFETY: RECORD points at the shared page, mapped for the whole
        // life of the server process.
        let r = unsafe { &*rec };
        r.nr.store(nr, Ordering::SeqCst);
        r.arch.store(arch, Ordering::SeqCst);
        r.hit.store(1, Ordering::SeqCst);
    }
    let mut line = [0u8; 96];
    let n = format_line(&mut line, nr);
    // SAFETY: write and exit_group take a stack buffer and integers; both
    // are allowed by every filter and async-signal-safe.
    unsafe {
        libc::write(2, line.as_ptr().cast(), n);
        libc::syscall(libc::SYS_exit_group, EXIT_SECCOMP);
    }
}

/// "airlock: seccomp: forbidden system call N\n" into `buf` without
/// allocating; returns its length.
fn format_line(buf: &mut [u8; 96], nr: i32) -> usize {
    let head = b"airlock: sandboxed server: forbidden system call ";
    buf[..head.len()].copy_from_slice(head);
    let mut at = head.len();
    let mut digits = [0u8; 12];
    let mut d = 0;
    let mut v = nr.unsigned_abs();
    if nr < 0 {
        buf[at] = b'-';
        at += 1;
    }
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        buf[at] = digits[d];
        at += 1;
    }
    buf[at] = b'\n';
    at + 1
}

/// "recvfrom" for 45 on x86_64: the name of a syscall of this architecture.
pub fn syscall_name(nr: i32) -> &'static str {
    u32::try_from(nr)
        .ok()
        .and_then(|n| syscalls::Sysno::new(n as usize))
        .map(|s| s.name())
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handler_line_names_the_number() {
        let mut b = [0u8; 96];
        let n = format_line(&mut b, 45);
        assert_eq!(
            &b[..n],
            b"airlock: sandboxed server: forbidden system call 45\n"
        );
        let n = format_line(&mut b, -1);
        assert!(b[..n].ends_with(b" -1\n"));
    }

    #[test]
    fn syscall_numbers_have_names() {
        assert_eq!(syscall_name(libc::SYS_openat as i32), "openat");
        assert_eq!(syscall_name(-5), "unknown");
    }
}
