//! The channel between an airlock and the successor it starts for a live
//! upgrade: a SOCK_SEQPACKET socketpair, one short text message per packet.
//!
//! successor -> old: `hello <version> <pid>` (it runs, speaks this
//! handover, and holds the handed state), `serving` (its sandboxed server is
//! confined and accepting), `refuse <why>`.
//! old -> successor: `go` (the old server is gone: start yours), `commit`
//! (the old airlock lets go: you are airlock now).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// The version of the handover this airlock speaks (the AIRLOCK_UPGRADE
/// fields and these messages). A successor that speaks another refuses.
pub const HANDOVER_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello { version: u32, pid: u32 },
    Serving,
    Refuse(String),
    Go,
    Commit,
}

impl Msg {
    fn encode(&self) -> String {
        match self {
            Msg::Hello { version, pid } => format!("hello {version} {pid}"),
            Msg::Serving => "serving".into(),
            Msg::Refuse(why) => format!("refuse {why}"),
            Msg::Go => "go".into(),
            Msg::Commit => "commit".into(),
        }
    }

    /// None for anything this airlock does not understand.
    pub fn decode(b: &[u8]) -> Option<Msg> {
        let s = std::str::from_utf8(b).ok()?;
        let mut w = s.splitn(2, ' ');
        Some(match (w.next()?, w.next()) {
            ("hello", Some(rest)) => {
                let (v, p) = rest.split_once(' ')?;
                Msg::Hello {
                    version: v.parse().ok()?,
                    pid: p.parse().ok()?,
                }
            }
            ("serving", None) => Msg::Serving,
            ("refuse", why) => Msg::Refuse(why.unwrap_or("").chars().take(300).collect()),
            ("go", None) => Msg::Go,
            ("commit", None) => Msg::Commit,
            _ => return None,
        })
    }
}

/// What a wait on the channel saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    Msg(Msg),
    /// Something that is not a message of this handover.
    Garbage,
    /// The other side closed (exited).
    Closed,
    TimedOut,
}

/// One end of the channel.
#[derive(Debug)]
pub struct Ctl {
    fd: OwnedFd,
}

impl Ctl {
    /// A connected pair: (this airlock's end, the successor's end), both
    /// CLOEXEC (the successor's end is inherited only by its exec).
    pub fn pair() -> io::Result<(Ctl, OwnedFd)> {
        let mut p = [0 as RawFd; 2];
        // SAFETY: socketpair writes two fds into p.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                p.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socketpair returned two new fds that nothing else owns.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        Ok((Ctl { fd: a }, b))
    }

    pub fn from_fd(fd: OwnedFd) -> Ctl {
        Ctl { fd }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The pid of the process that made the pair (SO_PEERCRED).
    pub fn creator(&self) -> io::Result<u32> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cred.pid as u32)
    }

    pub fn send(&self, m: &Msg) -> io::Result<()> {
        let b = m.encode();
        // SAFETY: a send from a live buffer; MSG_NOSIGNAL: a closed peer is
        // an error here, not a SIGPIPE.
        let r = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                b.as_ptr().cast(),
                b.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one message if one is ready (no waiting).
    pub fn take(&self) -> Heard {
        self.wait(Some(Duration::ZERO))
    }

    /// Waits up to `limit` (None: no limit) for one message.
    pub fn wait(&self, limit: Option<Duration>) -> Heard {
        let until = limit.map(|l| Instant::now() + l);
        loop {
            let ms = until.map_or(-1, |u| {
                u.saturating_duration_since(Instant::now()).as_millis() as libc::c_int
            });
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Heard::Closed;
            }
            if r == 0 {
                return Heard::TimedOut;
            }
            let mut b = [0u8; 512];
            // SAFETY: a receive into a stack buffer of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    b.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            return match n {
                0 => Heard::Closed,
                n if n < 0 => match io::Error::last_os_error().kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                    _ => Heard::Closed,
                },
                n => Msg::decode(&b[..n as usize]).map_or(Heard::Garbage, Heard::Msg),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_sent() {
        let (a, b) = Ctl::pair().unwrap();
        let b = Ctl::from_fd(b);
        for m in [
            Msg::Hello {
                version: HANDOVER_VERSION,
                pid: 42,
            },
            Msg::Serving,
            Msg::Refuse("the handed table is not a memfd".into()),
            Msg::Go,
            Msg::Commit,
        ] {
            a.send(&m).unwrap();
            assert_eq!(b.wait(Some(Duration::from_secs(1))), Heard::Msg(m));
        }
    }

    #[test]
    fn anything_else_is_garbage_silence_times_out_and_a_closed_end_is_seen() {
        let (a, b) = Ctl::pair().unwrap();
        let b = Ctl::from_fd(b);
        for junk in [&b"hello two 3"[..], b"HELLO", b"go now", b"\xff\xfe"] {
            // SAFETY: a send from a live buffer.
            unsafe { libc::send(a.raw_fd(), junk.as_ptr().cast(), junk.len(), 0) };
            assert_eq!(
                b.wait(Some(Duration::from_secs(1))),
                Heard::Garbage,
                "{junk:?}"
            );
        }
        assert_eq!(b.wait(Some(Duration::from_millis(10))), Heard::TimedOut);
        assert_eq!(b.creator().unwrap(), std::process::id());
        drop(a);
        assert_eq!(b.wait(Some(Duration::from_secs(1))), Heard::Closed);
    }
}
