//! Framing over a unix stream socket: one message = header + payload, with
//! file descriptors as SCM_RIGHTS ancillary data.
//!
//! Reads are blocking (one thread per connection): an epoll_wait before each
//! read costs ~30% per round trip on these machines. A server asleep in
//! recvmsg is also woken, for nothing, when QEMU takes its reply (the
//! write-space wake-up, wait.rs); sleeping in poll(2) instead saves that
//! wake-up but puts a system call between a request's arrival and its read,
//! and made the nested bed's strict-vIOMMU 4 KiB reads slower (0.41 of
//! in-process against 0.52, 2026-12-07), so reads stay in recvmsg.
//!
//! Each send is one sendmsg carrying header, payload and fds together;
//! replies to requests that are already queued go out together (send.rs).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::error::ProtocolError;
use crate::header::{Header, HEADER_SIZE};
use crate::limits::Limits;

mod send;
mod wait;

/// Control-buffer room for this many fds; more in one message is MSG_CTRUNC.
const CMSG_FDS: usize = 64;

/// How receiving a message can fail.
#[derive(Debug)]
pub enum RecvError {
    /// The peer closed the connection between messages.
    Closed,
    /// The stream cannot be resynchronized: close it.
    Fatal(ProtocolError),
    /// The message was consumed whole but is unacceptable: answer `header`
    /// with an error reply and go on.
    Rejected(Header, ProtocolError),
    /// The header announced a size that cannot be framed; answer it, then
    /// close (the stream position is lost).
    Unframeable(Header, ProtocolError),
}

/// Largest oversized payload drained (rather than closing) so the stream
/// stays in sync.
const MAX_DRAIN: usize = 64 << 20;

/// How much is read ahead in one recvmsg: a typical message (header and
/// payload) arrives in one system call, and back-to-back posted writes
/// several at a time. Larger payloads are read straight into place.
const READ_AHEAD: usize = 64 << 10;

/// Bytes received beyond the message being framed, and the fds that came
/// with them.
///
/// Which message an fd belongs to: a unix stream read stops right after
/// the chunk (one sendmsg) that carried fds, and a sender puts a message's
/// fds on the sendmsg that starts with its header. So the fds one recvmsg
/// returns belong to the message that holds the last byte of that read.
/// Each is kept with the stream offset of that byte.
#[derive(Default)]
struct ReadAhead {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of buf[start] (the next unconsumed byte).
    at: u64,
    fds: VecDeque<(u64, OwnedFd)>,
    /// Stream offsets (last byte) of reads whose control data was truncated.
    ctrunc: VecDeque<u64>,
}

impl ReadAhead {
    fn avail(&self) -> usize {
        self.end - self.start
    }

    /// Copies up to `out.len()` buffered bytes into `out`.
    fn take(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.avail());
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.consume(n);
        n
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.at += n as u64;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// The fds of the message that ended just before `self.at`, which
    /// started at stream offset `from`; and whether its control data was
    /// truncated. Anything older is dropped.
    fn fds_of(&mut self, from: u64) -> (Vec<OwnedFd>, bool) {
        let mut fds = Vec::new();
        while self.fds.front().is_some_and(|(k, _)| *k < self.at) {
            let (k, fd) = self.fds.pop_front().expect("checked");
            if k >= from {
                fds.push(fd);
            }
        }
        let mut truncated = false;
        while self.ctrunc.front().is_some_and(|k| *k < self.at) {
            truncated |= self.ctrunc.pop_front().expect("checked") >= from;
        }
        (fds, truncated)
    }
}

pub struct MessageSocket {
    stream: UnixStream,
    /// Only the receiving side touches it; a RefCell keeps `recv(&self)`.
    ahead: RefCell<ReadAhead>,
    /// Replies held back while more requests are buffered (send.rs).
    outbox: RefCell<Vec<u8>>,
    /// The last read ended with a message's fds. The kernel ends a read
    /// there even when more is queued (a client that pipelines DMA_MAPs
    /// gets one per read), so more requests may be waiting.
    ended_at_fds: Cell<bool>,
    /// The client is ahead of us: a message was already whole in the
    /// read-ahead buffer when asked for, or a look found the next one
    /// queued, and no look since found the socket empty (send.rs).
    client_ahead: Cell<bool>,
    /// Reads that ended at fds since a look found the socket empty.
    since_empty: Cell<u32>,
}

impl MessageSocket {
    pub fn new(stream: UnixStream) -> Self {
        MessageSocket {
            stream,
            ahead: RefCell::default(),
            outbox: RefCell::default(),
            ended_at_fds: Cell::new(false),
            client_ahead: Cell::new(false),
            // The first fd-carrying request is looked past.
            since_empty: Cell::new(send::LOOK_EVERY),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Whether the read-ahead buffer holds another whole message, which
    /// `recv` returns without reading the socket.
    fn holds_message(&self) -> bool {
        let ra = self.ahead.borrow();
        let avail = ra.avail();
        match ra.buf[ra.start..ra.end].first_chunk::<HEADER_SIZE>() {
            Some(h) => Header::decode(h).size as usize <= avail,
            None => false,
        }
    }

    /// Receives one message: the header, then exactly `size - 16` payload
    /// bytes into `payload` (reused between calls), and any fds. Usually one
    /// recvmsg: bytes past the message wait in the read-ahead buffer.
    pub fn recv(
        &self,
        limits: &Limits,
        payload: &mut Vec<u8>,
    ) -> Result<(Header, Vec<OwnedFd>), RecvError> {
        if self.holds_message() {
            self.client_ahead.set(true);
        }
        let mut ra = self.ahead.borrow_mut();
        while ra.avail() < HEADER_SIZE {
            let had = ra.avail();
            if self.fill(&mut ra).map_err(RecvError::Fatal)? == 0 {
                if had == 0 {
                    return Err(RecvError::Closed);
                }
                return Err(RecvError::Fatal(ProtocolError::Truncated {
                    what: "message (peer closed mid-message)",
                    need: HEADER_SIZE,
                    got: had,
                }));
            }
        }
        let from = ra.at;
        let mut hbuf = [0u8; HEADER_SIZE];
        ra.take(&mut hbuf);
        let header = Header::decode(&hbuf);
        if let Err(e) = header.check_size(limits.max_msg_size) {
            let len = header.payload_len();
            if (header.size as usize) < HEADER_SIZE || len > MAX_DRAIN {
                return Err(RecvError::Unframeable(header, e));
            }
            self.skip(&mut ra, len).map_err(RecvError::Fatal)?;
            drop(ra.fds_of(from));
            return Err(RecvError::Rejected(header, e));
        }
        let len = header.payload_len();
        payload.clear();
        payload.resize(len, 0);
        let mut got = ra.take(payload);
        while got < len {
            let n = if len - got > READ_AHEAD / 2 {
                // A large payload goes straight into place.
                self.recv_tracked(&mut ra, &mut payload[got..])
            } else {
                self.fill(&mut ra).map(|n| {
                    if n == 0 {
                        0
                    } else {
                        ra.take(&mut payload[got..])
                    }
                })
            }
            .map_err(RecvError::Fatal)?;
            if n == 0 {
                return Err(RecvError::Fatal(ProtocolError::Truncated {
                    what: "message (peer closed mid-message)",
                    need: header.size as usize,
                    got: HEADER_SIZE + got,
                }));
            }
            got += n;
        }
        let (fds, truncated) = ra.fds_of(from);
        if truncated || fds.len() > limits.max_fds {
            return Err(RecvError::Rejected(
                header,
                ProtocolError::TooManyFds {
                    max: limits.max_fds,
                },
            ));
        }
        Ok((header, fds))
    }

    /// One recvmsg into the free end of the read-ahead buffer; 0 at EOF.
    fn fill(&self, ra: &mut ReadAhead) -> Result<usize, ProtocolError> {
        if ra.buf.is_empty() {
            ra.buf = vec![0u8; READ_AHEAD];
        }
        if ra.start > 0 {
            let (s, e) = (ra.start, ra.end);
            ra.buf.copy_within(s..e, 0);
            ra.end -= s;
            ra.start = 0;
        }
        let mut buf = std::mem::take(&mut ra.buf);
        let end = ra.end;
        let r = self.recv_tracked(ra, &mut buf[end..]);
        ra.buf = buf;
        let n = r?;
        // recv_tracked advanced `at` as if the bytes were consumed: they
        // are buffered instead.
        ra.at -= n as u64;
        ra.end += n;
        Ok(n)
    }

    /// One recvmsg into `buf` (the bytes right after everything buffered);
    /// keeps its fds with the stream offset of its last byte and advances
    /// the stream offset past it.
    fn recv_tracked(&self, ra: &mut ReadAhead, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let mut fds = Vec::new();
        let mut ctrunc = false;
        let n = self.recv_after_replies(buf, &mut fds, &mut ctrunc)?;
        self.ended_at_fds.set(!fds.is_empty());
        if !fds.is_empty() {
            self.since_empty
                .set(self.since_empty.get().saturating_add(1));
        }
        let first = ra.at + ra.avail() as u64;
        let last = first + (n as u64).saturating_sub(1);
        ra.fds.extend(fds.into_iter().map(|fd| (last, fd)));
        if ctrunc {
            ra.ctrunc.push_back(last);
        }
        ra.at += n as u64;
        Ok(n)
    }

    /// One recvmsg that never blocks while replies are held: with some
    /// held, it first reads without waiting, and only when nothing is
    /// queued sends them and then waits (send.rs).
    fn recv_after_replies(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        ctrunc: &mut bool,
    ) -> Result<usize, ProtocolError> {
        if !self.outbox.borrow().is_empty() {
            match self.recvmsg(buf, fds, ctrunc, libc::MSG_DONTWAIT) {
                Err(ProtocolError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.client_ahead.set(false);
                    self.since_empty.set(0);
                }
                r => {
                    self.client_ahead.set(true);
                    return r;
                }
            }
        }
        self.flush()?;
        self.recvmsg(buf, fds, ctrunc, 0)
    }

    /// Consumes and discards `len` bytes (an oversized payload).
    fn skip(&self, ra: &mut ReadAhead, mut len: usize) -> Result<(), ProtocolError> {
        let n = len.min(ra.avail());
        ra.consume(n);
        len -= n;
        let mut scratch = [0u8; 4096];
        while len > 0 {
            let want = len.min(scratch.len());
            let n = self.recv_tracked(ra, &mut scratch[..want])?;
            if n == 0 {
                return Err(ProtocolError::Truncated {
                    what: "message (peer closed mid-message)",
                    need: len,
                    got: 0,
                });
            }
            len -= n;
        }
        Ok(())
    }

    /// Shuts the write side, then reads (recvmsg, dropping any fds) until
    /// the peer closes or `limit` passes, so the peer never sees its unread
    /// input reset (QEMU's client aborts on that). Never reads with read():
    /// the sandbox allows recvmsg only.
    pub fn close_gracefully(&self, limit: std::time::Duration) {
        *self.ahead.borrow_mut() = ReadAhead::default();
        let _ = self.flush();
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let _ = self.stream.set_read_timeout(Some(limit));
        let deadline = std::time::Instant::now() + limit;
        let mut scratch = [0u8; 4096];
        let mut fds = Vec::new();
        let mut ctrunc = false;
        while std::time::Instant::now() < deadline {
            match self.recvmsg(&mut scratch, &mut fds, &mut ctrunc, 0) {
                Ok(0) | Err(_) => break,
                Ok(_) => fds.clear(),
            }
        }
    }

    /// One recvmsg with `flags` (MSG_CMSG_CLOEXEC is added); received fds
    /// are owned at once so none can leak.
    fn recvmsg(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        ctrunc: &mut bool,
        flags: libc::c_int,
    ) -> Result<usize, ProtocolError> {
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut cbuf = [0u64; (CMSG_FDS * 4 + 64) / 8];
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain data; zeroed is a valid empty value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cbuf);
            // SAFETY: msg points at a live iovec over `buf` and at `cbuf`,
            // both valid for their stated lengths for the whole call.
            let n = unsafe {
                libc::recvmsg(
                    self.stream.as_raw_fd(),
                    &mut msg,
                    flags | libc::MSG_CMSG_CLOEXEC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ProtocolError::Io(e));
            }
            if msg.msg_flags & libc::MSG_CTRUNC != 0 {
                *ctrunc = true;
            }
            // SAFETY: the kernel filled msg_control; the CMSG_* macros walk
            // it within msg_controllen.
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_SOCKET
                        && (*cmsg).cmsg_type == libc::SCM_RIGHTS
                    {
                        let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                        let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                        for i in 0..len / std::mem::size_of::<RawFd>() {
                            // SAFETY: SCM_RIGHTS gave us a new fd nobody else owns.
                            fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                        }
                    }
                    cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
                }
            }
            return Ok(n as usize);
        }
    }

    /// Sends raw bytes (tests use it to build malformed messages).
    pub fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ProtocolError> {
        // A raw send is one message-shaped blob; reuse the iovec path with a
        // header-less part list by splitting off the first 16 bytes if any.
        use std::io::Write;
        if fds.is_empty() {
            (&self.stream).write_all(bytes)?;
            return Ok(());
        }
        let (h, rest) = bytes.split_at(bytes.len().min(HEADER_SIZE));
        let mut hb = [0u8; HEADER_SIZE];
        hb[..h.len()].copy_from_slice(h);
        if h.len() < HEADER_SIZE {
            return Err(ProtocolError::Truncated {
                what: "raw message with fds",
                need: HEADER_SIZE,
                got: h.len(),
            });
        }
        self.send(&Header::decode(&hb), &[rest], fds)
    }
}

impl Drop for MessageSocket {
    /// Replies still held go out before the socket closes.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}
