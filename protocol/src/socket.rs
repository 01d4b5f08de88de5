//! Framing over a unix stream socket: one message = header + payload, with
//! file descriptors as SCM_RIGHTS ancillary data.
//!
//! Reads are blocking (one thread per connection): an epoll_wait before each
//! read costs ~30% per round trip on these machines. Each send is one
//! sendmsg carrying header, payload and fds together.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::error::ProtocolError;
use crate::header::{Header, HEADER_SIZE};
use crate::limits::Limits;

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

pub struct MessageSocket {
    stream: UnixStream,
}

impl MessageSocket {
    pub fn new(stream: UnixStream) -> Self {
        MessageSocket { stream }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Receives one message: the header, then exactly `size - 16` payload
    /// bytes into `payload` (reused between calls), and any fds.
    pub fn recv(
        &self,
        limits: &Limits,
        payload: &mut Vec<u8>,
    ) -> Result<(Header, Vec<OwnedFd>), RecvError> {
        let mut fds = Vec::new();
        let mut hbuf = [0u8; HEADER_SIZE];
        let mut ctrunc = false;
        let got = self
            .recv_exact(&mut hbuf, &mut fds, &mut ctrunc, true)
            .map_err(RecvError::Fatal)?;
        if got == 0 {
            return Err(RecvError::Closed);
        }
        let header = Header::decode(&hbuf);
        if let Err(e) = header.check_size(limits.max_msg_size) {
            let len = header.payload_len();
            if (header.size as usize) < HEADER_SIZE || len > MAX_DRAIN {
                return Err(RecvError::Unframeable(header, e));
            }
            self.drain(len, &mut fds, &mut ctrunc)
                .map_err(RecvError::Fatal)?;
            return Err(RecvError::Rejected(header, e));
        }
        payload.clear();
        payload.resize(header.payload_len(), 0);
        self.recv_exact(payload, &mut fds, &mut ctrunc, false)
            .map_err(RecvError::Fatal)?;
        if ctrunc || fds.len() > limits.max_fds {
            return Err(RecvError::Rejected(
                header,
                ProtocolError::TooManyFds {
                    max: limits.max_fds,
                },
            ));
        }
        Ok((header, fds))
    }

    /// Fills `buf` completely. Returns 0 only if EOF came before the first
    /// byte and `eof_ok` is set.
    fn recv_exact(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        ctrunc: &mut bool,
        eof_ok: bool,
    ) -> Result<usize, ProtocolError> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.recvmsg(&mut buf[done..], fds, ctrunc)?;
            if n == 0 {
                if done == 0 && eof_ok {
                    return Ok(0);
                }
                return Err(ProtocolError::Truncated {
                    what: "message (peer closed mid-message)",
                    need: buf.len(),
                    got: done,
                });
            }
            done += n;
        }
        Ok(done)
    }

    fn drain(
        &self,
        mut len: usize,
        fds: &mut Vec<OwnedFd>,
        ctrunc: &mut bool,
    ) -> Result<(), ProtocolError> {
        let mut scratch = [0u8; 4096];
        while len > 0 {
            let n = len.min(scratch.len());
            self.recv_exact(&mut scratch[..n], fds, ctrunc, false)?;
            len -= n;
        }
        fds.clear();
        Ok(())
    }

    /// One recvmsg; received fds are owned at once so none can leak.
    fn recvmsg(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        ctrunc: &mut bool,
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
            let n =
                unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
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

    /// Sends header + payload parts + fds in one sendmsg (more only if the
    /// kernel takes a partial write).
    pub fn send(
        &self,
        header: &Header,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError> {
        let h = header.encode();
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(parts.len() + 1);
        iovs.push(libc::iovec {
            iov_base: h.as_ptr() as *mut _,
            iov_len: h.len(),
        });
        for p in parts {
            if !p.is_empty() {
                iovs.push(libc::iovec {
                    iov_base: p.as_ptr() as *mut _,
                    iov_len: p.len(),
                });
            }
        }
        let total: usize = iovs.iter().map(|v| v.iov_len).sum();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut cbuf = vec![0u64; (raw.len() * 4 + 64) / 8];
        let mut sent = 0usize;
        let mut first = true;
        while sent < total {
            // Skip what a partial write already sent.
            let mut skip = sent;
            let mut start = 0;
            while skip >= iovs[start].iov_len {
                skip -= iovs[start].iov_len;
                start += 1;
            }
            let mut cur: Vec<libc::iovec> = iovs[start..].to_vec();
            // SAFETY: skip < cur[0].iov_len, so the pointer stays in the buffer.
            cur[0].iov_base = unsafe { (cur[0].iov_base as *mut u8).add(skip) }.cast();
            cur[0].iov_len -= skip;
            // SAFETY: plain data; zeroed is an empty msghdr.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = cur.as_mut_ptr();
            msg.msg_iovlen = cur.len();
            if first && !raw.is_empty() {
                // SAFETY: CMSG_SPACE/LEN only compute sizes.
                let space = unsafe { libc::CMSG_SPACE((raw.len() * 4) as u32) } as usize;
                msg.msg_control = cbuf.as_mut_ptr().cast();
                msg.msg_controllen = space;
                // SAFETY: cbuf holds at least `space` bytes, aligned for cmsghdr.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(&msg);
                    (*cmsg).cmsg_level = libc::SOL_SOCKET;
                    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                    (*cmsg).cmsg_len = libc::CMSG_LEN((raw.len() * 4) as u32) as _;
                    std::ptr::copy_nonoverlapping(
                        raw.as_ptr(),
                        libc::CMSG_DATA(cmsg) as *mut RawFd,
                        raw.len(),
                    );
                }
            }
            // SAFETY: every iovec points into a live buffer; control is cbuf.
            let n = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ProtocolError::Io(e));
            }
            first = false;
            sent += n as usize;
        }
        Ok(())
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
