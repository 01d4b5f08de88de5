//! Waiting for input without reading it: `poll` spins (a server that
//! would rather burn CPU than sleep and wake per message), `wait_readable`
//! sleeps in poll(2) (a client collecting replies).
//!
//! Why a client should sleep in poll(2) rather than in recvmsg: a unix
//! stream reader asleep in recvmsg is woken each time its peer frees
//! buffer space the reader's own sends took (the peer consuming its
//! requests: the write-space wake-up goes to every sleeper on the socket),
//! only to find no input and sleep again. A poll(2) for POLLIN is woken by
//! input only. A client that sent a batch and waits for the replies while
//! the server works through it would otherwise wake about once per request
//! the server consumes, and the server pays for each of those wake-ups.
//! QEMU waits for replies in its event loop, which polls.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::MessageSocket;
use crate::error::ProtocolError;

impl MessageSocket {
    /// Waits up to `limit` for the next message without sleeping: true at
    /// once if bytes of one are buffered, else peeks at the socket without
    /// blocking until bytes arrive (true) or `limit` passes (false); held
    /// replies go out at the first peek that finds nothing. `recv` then
    /// reads as usual. A server that sleeps in its read pays a wake-up per
    /// message; polling a little first saves it when the next message
    /// follows closely, for the CPU time spent.
    pub fn poll(&self, limit: Duration) -> Result<bool, ProtocolError> {
        if self.ahead.borrow().avail() > 0 {
            return Ok(true);
        }
        let deadline = Instant::now() + limit;
        let mut byte = 0u8;
        loop {
            let mut iov = libc::iovec {
                iov_base: (&mut byte as *mut u8).cast(),
                iov_len: 1,
            };
            // SAFETY: msghdr is plain data; zeroed is a valid empty value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            // SAFETY: msg points at a live iovec over one local byte and at
            // no control buffer (a peeked message's fds are not taken: the
            // kernel drops its duplicates and sets MSG_CTRUNC).
            let n = unsafe {
                libc::recvmsg(
                    self.stream.as_raw_fd(),
                    &mut msg,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                // Bytes, or the end of the stream: recv sees either.
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => return Err(ProtocolError::Io(e)),
            }
            // Nothing is queued: the client is not ahead of us, and may be
            // waiting for these.
            self.client_ahead.set(false);
            self.since_empty.set(0);
            self.flush()?;
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// Sleeps until input is there to read, up to `limit`: true at once if
    /// bytes are buffered or the socket is readable (bytes, or the end of
    /// the stream), false when `limit` passes first. Held replies go first.
    pub fn wait_readable(&self, limit: Duration) -> Result<bool, ProtocolError> {
        if self.ahead.borrow().avail() > 0 {
            return Ok(true);
        }
        self.flush()?;
        let ms = libc::c_int::try_from(limit.as_millis()).unwrap_or(libc::c_int::MAX);
        let mut p = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one live pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n >= 0 {
                return Ok(n > 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(ProtocolError::Io(e));
            }
        }
    }
}
