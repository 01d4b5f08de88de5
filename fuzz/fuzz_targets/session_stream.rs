//! A whole session with the emulated edu, fed an arbitrary byte stream with
//! file descriptors attached: it must never panic, hang or leak an fd.
//!
//! Input: a sequence of records `[tag u8][len u16 LE][len bytes]` (len is
//! clipped to what is left; at most MAX_RECORDS records, MAX_FDS fds in
//! all). Each record is one sendmsg from the client end, carrying the fds
//! its tag names (SCM_RIGHTS):
//!   tag & 7: 0 none, 1 memfd, 2 eventfd, 3 /dev/null, 4 a socket end,
//!            5 memfd + eventfd, 6 two eventfds, 7 seventeen eventfds
//!            (one more than max_msg_fds)
//!   (tag >> 3) & 3: memfd size 0, 4 KiB, 8 KiB, 2 MiB
//!   tag & 0x20: the memfd is sealed against shrinking (as QEMU's are)
//! After the last record the client shuts its write side. The session runs
//! on the fuzz thread; a helper thread sends the records and reads and
//! discards everything the server writes (both at once, with poll, so
//! neither side can block the other), until the server closes.
//! After each input the process's fd count must be what it was before.

#![no_main]

use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use airlock::device::emulated::edu::Edu;
use airlock::server::Session;
use libfuzzer_sys::fuzz_target;

const MAX_RECORDS: usize = 64;
/// Most fds one input creates (a record past it goes without): stays far
/// below a default RLIMIT_NOFILE of 1024.
const MAX_FDS: usize = 256;
/// max_data_xfer for the session: small keeps every message small and fast.
const MAX_DATA_XFER: u64 = 4096;
const MEMFD_SIZES: [i64; 4] = [0, 4096, 8192, 2 << 20];

struct Record<'a> {
    tag: u8,
    bytes: &'a [u8],
}

fn records(mut data: &[u8]) -> Vec<Record<'_>> {
    let mut out = Vec::new();
    while data.len() >= 3 && out.len() < MAX_RECORDS {
        let tag = data[0];
        let len = (u16::from_le_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
        let (bytes, rest) = data[3..].split_at(len);
        data = rest;
        if !bytes.is_empty() {
            out.push(Record { tag, bytes });
        }
    }
    out
}

fn check(r: libc::c_int, what: &str) -> libc::c_int {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    r
}

fn owned(fd: libc::c_int, what: &str) -> OwnedFd {
    check(fd, what);
    // SAFETY: fd was just returned by the kernel to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn memfd(tag: u8) -> OwnedFd {
    let size = MEMFD_SIZES[((tag >> 3) & 3) as usize];
    // SAFETY: the name is a NUL-terminated literal.
    let fd = owned(
        unsafe {
            libc::memfd_create(
                c"fuzz-dma".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        },
        "memfd_create",
    );
    // SAFETY: plain syscalls on an fd we own.
    unsafe {
        check(libc::ftruncate(fd.as_raw_fd(), size), "ftruncate");
        if tag & 0x20 != 0 {
            check(
                libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK),
                "F_ADD_SEALS",
            );
        }
    }
    fd
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory arguments.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }, "eventfd")
}

fn fds_for(tag: u8) -> Vec<OwnedFd> {
    match tag & 7 {
        0 => Vec::new(),
        1 => vec![memfd(tag)],
        2 => vec![eventfd()],
        3 => vec![std::fs::File::open("/dev/null")
            .expect("/dev/null opens")
            .into()],
        4 => {
            // One end of a fresh pair; the other end is closed on return.
            let (a, _b) = UnixStream::pair().expect("socketpair");
            vec![a.into()]
        }
        5 => vec![memfd(tag), eventfd()],
        6 => vec![eventfd(), eventfd()],
        _ => (0..17).map(|_| eventfd()).collect(),
    }
}

/// One sendmsg of `bytes` with `fds` as SCM_RIGHTS, without blocking.
fn send(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut cbuf = [0u64; 32]; // room for 17 fds
                               // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let len = (fds.len() * std::mem::size_of::<libc::c_int>()) as u32;
        // SAFETY: cbuf is 256 bytes, more than CMSG_SPACE(17 * 4); the
        // CMSG_* macros stay inside msg_control as set here, and the copy
        // writes fds.len() ints into the cmsg's data.
        unsafe {
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = libc::CMSG_SPACE(len) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len) as usize;
            let data = libc::CMSG_DATA(cmsg) as *mut libc::c_int;
            for (i, fd) in fds.iter().enumerate() {
                *data.add(i) = fd.as_raw_fd();
            }
        }
    }
    // SAFETY: msg points at iov, bytes and cbuf, all alive for the call.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The client: sends every record (then shuts its write side) while
/// reading and discarding the server's output, until the server closes.
fn client(mut sock: UnixStream, recs: Vec<(Vec<OwnedFd>, &[u8])>) {
    sock.set_nonblocking(true).expect("nonblocking");
    let mut next = 0; // record being sent
    let mut at = 0; // bytes of it already sent (its fds went with the first)
    let mut shut = false;
    let mut buf = [0u8; 16384];
    loop {
        if next == recs.len() && !shut {
            let _ = sock.shutdown(std::net::Shutdown::Write);
            shut = true;
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN | if shut { 0 } else { libc::POLLOUT },
            revents: 0,
        };
        // SAFETY: one pollfd, alive for the call.
        if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
            assert_eq!(
                std::io::Error::last_os_error().kind(),
                ErrorKind::Interrupted
            );
            continue;
        }
        if pfd.revents & libc::POLLOUT != 0 && !shut {
            let (fds, bytes) = &recs[next];
            let fds: &[OwnedFd] = if at == 0 { fds } else { &[] };
            match send(&sock, &bytes[at..], fds) {
                Ok(n) => {
                    at += n;
                    if at == bytes.len() {
                        next += 1;
                        at = 0;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The server closed: nothing more can be sent.
                Err(_) => next = recs.len(),
            }
        }
        if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            // read() drops any fds the server sent (none expected from edu).
            match sock.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn fd_list() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok())
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect();
    v.sort();
    v
}

fn one_session(data: &[u8]) {
    let mut total = 0;
    let recs: Vec<(Vec<OwnedFd>, &[u8])> = records(data)
        .into_iter()
        .map(|r| {
            let n = [0, 1, 1, 1, 1, 2, 2, 17][(r.tag & 7) as usize];
            if total + n > MAX_FDS {
                return (Vec::new(), r.bytes);
            }
            total += n;
            (fds_for(r.tag), r.bytes)
        })
        .collect();
    let (server_end, client_end) = UnixStream::pair().expect("socketpair");
    std::thread::scope(|s| {
        let helper = s.spawn(move || client(client_end, recs));
        let mut edu = Edu::new();
        Session::new(server_end, &mut edu, airlock::server_limits(MAX_DATA_XFER)).run();
        drop(edu);
        helper.join().expect("the client thread");
    });
}

fuzz_target!(|data: &[u8]| {
    let before = fd_count();
    one_session(data);
    let after = fd_count();
    if after != before {
        panic!(
            "fd leak: {before} fds before the session, {after} after; now open: {:#?}",
            fd_list()
        );
    }
});
