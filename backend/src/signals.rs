//! Every signal disposition airlock sets goes through [`install`]: one
//! place calls sigaction, and each caller says why its handler is safe to
//! run at any instruction. The handlers themselves live beside the state
//! they touch (server/, lifecycle/, sandbox/violation.rs).

use std::io;

/// What a signal does.
pub enum Disposition {
    /// A handler that gets the signal number.
    Handler(extern "C" fn(libc::c_int)),
    /// An SA_SIGINFO handler that also gets the siginfo (SIGSYS's syscall).
    InfoHandler(extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)),
    /// Ignored.
    Ignore,
}

/// Sets `sig`'s disposition. With `restart` (SA_RESTART) a blocked read or
/// poll resumes after the handler; without it, it returns EINTR, which is
/// how a stop request wakes a blocked loop.
///
/// # Safety
/// A handler may run between any two instructions of any thread: its body
/// must be async-signal-safe (atomics, and syscalls such as write, kill and
/// shutdown; no allocation, no locks, no formatting).
pub unsafe fn install(sig: libc::c_int, what: Disposition, restart: bool) -> io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (no flags, an empty
    // mask, SIG_DFL); the fields set below make it what the caller asked.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    let (handler, info) = match what {
        Disposition::Handler(f) => (f as usize, false),
        Disposition::InfoHandler(f) => (f as usize, true),
        Disposition::Ignore => (libc::SIG_IGN, false),
    };
    sa.sa_sigaction = handler;
    if info {
        sa.sa_flags |= libc::SA_SIGINFO;
    }
    if restart {
        sa.sa_flags |= libc::SA_RESTART;
    }
    // SAFETY: sigemptyset writes only the mask of our local sigaction;
    // sigaction reads it and writes no old action (null).
    let r = unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
