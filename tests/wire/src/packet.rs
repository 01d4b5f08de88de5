//! An AF_PACKET raw socket bound to one interface and the test EtherType:
//! whole Ethernet frames in and out, no IP anywhere.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::frame::{parse_mac, Mac, ETHERTYPE};

pub struct RawSocket {
    fd: OwnedFd,
    pub iface: String,
    pub mac: Mac,
}

/// What a receive saw.
pub enum Recv {
    Frame(usize),
    Timeout,
}

impl RawSocket {
    pub fn open(iface: &str) -> Result<RawSocket, String> {
        let name = CString::new(iface).map_err(|_| format!("bad interface name '{iface}'"))?;
        // SAFETY: a NUL-terminated name that lives across the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(format!(
                "{iface}: no such interface ({})",
                io::Error::last_os_error()
            ));
        }
        let mac = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
            .map_err(|e| format!("{iface}: reading its MAC: {e}"))
            .and_then(|s| parse_mac(&s))?;
        let proto = ETHERTYPE.to_be();
        // SAFETY: plain socket(2); a non-negative return is a new fd we own.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto as libc::c_int,
            )
        };
        if raw < 0 {
            return Err(format!(
                "{iface}: socket(AF_PACKET): {}",
                io::Error::last_os_error()
            ));
        }
        // SAFETY: raw was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a live sockaddr_ll and the length passed is its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(format!("{iface}: bind: {}", io::Error::last_os_error()));
        }
        let s = RawSocket {
            fd,
            iface: iface.to_string(),
            mac,
        };
        // Bursts of a window's frames must not be dropped by the socket.
        s.set_buf(libc::SO_RCVBUF, 4 << 20);
        s.set_buf(libc::SO_SNDBUF, 4 << 20);
        Ok(s)
    }

    fn set_buf(&self, opt: libc::c_int, bytes: libc::c_int) {
        // SAFETY: a live c_int and its size; a failure only leaves the default.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &bytes as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
    }

    /// Sends one whole frame (retrying while the device queue is full).
    pub fn send(&self, frame: &[u8]) -> Result<(), String> {
        loop {
            // SAFETY: frame is a live slice; send reads at most its length.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                )
            };
            if n == frame.len() as isize {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) => {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                _ => return Err(format!("{}: send: {e}", self.iface)),
            }
        }
    }

    /// Waits up to `timeout` for one received frame (frames this host sent
    /// are skipped).
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> Result<Recv, String> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd on the stack, nfds = 1.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(Recv::Timeout);
            }
            return Err(format!("{}: poll: {e}", self.iface));
        }
        if r == 0 {
            return Ok(Recv::Timeout);
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut flen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: buf and from are live and writable for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
                &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut flen,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Recv::Timeout),
                _ => Err(format!("{}: recv: {e}", self.iface)),
            };
        }
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            return Ok(Recv::Timeout);
        }
        Ok(Recv::Frame(n as usize))
    }
}
