//! The sending side: one sendmsg per message, and replies that wait in an
//! outbox while more requests are already buffered.
//!
//! A client that pipelines (QEMU sends the DMA_MAPs of one memory
//! transaction without waiting) leaves several requests queued. Answering
//! each with its own sendmsg costs a system call per reply, and the client
//! a wake-up per reply while it waits; holding the replies until the
//! queued requests are handled sends them all in one. A reply is held
//! while the read-ahead buffer holds another whole request, or while the
//! last read ended with a message's fds and the client is ahead of us: the
//! kernel ends a read at fds, so with DMA_MAPs (each carries an fd) one
//! read brings one map even when a hundred are queued. Whether the client
//! is ahead is seen when a message was already buffered, or by a look (a
//! read that does not wait) that found the next one. A client that waits
//! for each reply (QEMU's vIOMMU maps, SET_IRQS) never is, and its replies
//! go at once, but for one in LOOK_EVERY that is held to look again: a
//! look that finds nothing costs a system call. A reply only ever goes
//! later than its work, never earlier, and nothing waits in the outbox
//! while the server blocks: with replies held, a read first looks without
//! waiting, and sends them before it waits (socket.rs,
//! `recv_after_replies`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use super::{MessageSocket, CMSG_FDS};
use crate::error::ProtocolError;
use crate::header::{Header, HEADER_SIZE};

/// Most bytes of replies held back; a reply that would go past it sends
/// the outbox and itself at once.
const OUTBOX_MAX: usize = 64 << 10;

/// After a look found the socket empty, the replies to this many
/// requests that ended a read with fds go at once before the next look.
pub(super) const LOOK_EVERY: u32 = 8;

/// Payload parts per message (header excluded).
const MAX_PARTS: usize = 8;

impl MessageSocket {
    /// Sends whatever the outbox holds, then header + payload parts + fds,
    /// in one sendmsg (more only if the kernel takes a partial write).
    /// Nothing is allocated on this path.
    pub fn send(
        &self,
        header: &Header,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError> {
        if parts.len() > MAX_PARTS || fds.len() > CMSG_FDS {
            return Err(ProtocolError::Io(io::Error::from_raw_os_error(libc::E2BIG)));
        }
        let h = header.encode();
        let mut outbox = self.outbox.borrow_mut();
        let mut iovs = [iovec(&[]); MAX_PARTS + 2];
        let mut n_iov = 0;
        for p in [&outbox[..], &h[..]]
            .into_iter()
            .chain(parts.iter().copied())
        {
            if !p.is_empty() {
                iovs[n_iov] = iovec(p);
                n_iov += 1;
            }
        }
        let r = self.sendmsg_all(&mut iovs[..n_iov], fds);
        outbox.clear();
        r
    }

    /// Sends a reply, or holds it in the outbox while more requests are
    /// buffered or may be queued: it then goes with a later reply, or
    /// before the next read that would block.
    pub fn send_reply(&self, header: &Header, parts: &[&[u8]]) -> Result<(), ProtocolError> {
        let len = HEADER_SIZE + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut outbox = self.outbox.borrow_mut();
        let look = self.client_ahead.get() || self.since_empty.get() >= LOOK_EVERY;
        let more = self.holds_message() || (self.ended_at_fds.get() && look);
        if parts.len() <= MAX_PARTS && outbox.len() + len <= OUTBOX_MAX && more {
            outbox.extend_from_slice(&header.encode());
            for p in parts {
                outbox.extend_from_slice(p);
            }
            return Ok(());
        }
        drop(outbox);
        self.send(header, parts, &[])
    }

    /// Sends the replies held in the outbox, if any.
    pub(super) fn flush(&self) -> Result<(), ProtocolError> {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.is_empty() {
            return Ok(());
        }
        let r = self.sendmsg_all(&mut [iovec(&outbox)], &[]);
        outbox.clear();
        r
    }

    /// sendmsg until every byte of `iovs` went; `fds` ride on the first.
    fn sendmsg_all(
        &self,
        iovs: &mut [libc::iovec],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError> {
        let total: usize = iovs.iter().map(|v| v.iov_len).sum();
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut cbuf = [0u64; (CMSG_FDS * 4 + 64) / 8];
        let mut sent = 0usize;
        let mut start = 0usize;
        while sent < total {
            // SAFETY: plain data; zeroed is an empty msghdr.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovs[start..].as_mut_ptr();
            msg.msg_iovlen = iovs.len() - start;
            if sent == 0 && !fds.is_empty() {
                let bytes = std::mem::size_of_val(fds) as u32;
                // SAFETY: CMSG_SPACE only computes a size.
                msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as usize;
                msg.msg_control = cbuf.as_mut_ptr().cast();
                // SAFETY: cbuf holds CMSG_SPACE(CMSG_FDS * 4) bytes and is
                // aligned for cmsghdr; we write one header and the fds.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(&msg);
                    (*cmsg).cmsg_level = libc::SOL_SOCKET;
                    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as _;
                    let data = libc::CMSG_DATA(cmsg) as *mut RawFd;
                    for (i, fd) in fds.iter().enumerate() {
                        std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
                    }
                }
            }
            // SAFETY: every iovec points into a buffer alive for this call;
            // msg_control (if set) is cbuf.
            let n = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ProtocolError::Io(e));
            }
            sent += n as usize;
            // Step past what a partial write took.
            let mut took = n as usize;
            while start < iovs.len() && took >= iovs[start].iov_len {
                took -= iovs[start].iov_len;
                start += 1;
            }
            if took > 0 {
                // SAFETY: took < iovs[start].iov_len, so this stays inside the buffer.
                iovs[start].iov_base =
                    unsafe { (iovs[start].iov_base as *mut u8).add(took) }.cast();
                iovs[start].iov_len -= took;
            }
        }
        Ok(())
    }
}

/// An iovec over `b` (sendmsg only reads through it).
fn iovec(b: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr() as *mut _,
        iov_len: b.len(),
    }
}
