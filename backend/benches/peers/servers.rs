//! The servers measured side by side, each behind a connected client
//! socket: the raw AF_UNIX floor (one echo thread per operation), airlock
//! on a thread of this process, the airlock binary (sandbox off / on), and
//! rust-vmm's vfio_user server on a thread of this process.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use airlock::device::emulated::edu::Edu;
use airlock::server::{serve, Listener};
use airlock_protocol::client::Client;
use airlock_protocol::MessageSocket;

use crate::measure::{child_of, gettid, tasks, CpuClock};
use crate::ops::Op;
use crate::peer;

/// One column of the table.
pub struct Target {
    pub name: &'static str,
    /// Per operation: the client socket and the server's CPU clock.
    pub socks: Vec<MessageSocket>,
    pub clocks: Vec<CpuClock>,
    /// Server threads (this process) or processes' threads, for pinning.
    pub tasks: Vec<i32>,
    /// Whether the server shares this process (allocations are counted).
    pub in_process: bool,
    /// For strace: the threads to attach to, and whether to follow forks.
    pub trace: Vec<i32>,
    pub process: Option<i32>,
}

impl Target {
    /// An echo floor's column, its servers added one per operation.
    fn echo(name: &'static str, in_process: bool) -> Target {
        Target {
            name,
            socks: vec![],
            clocks: vec![],
            tasks: vec![],
            in_process,
            trace: vec![],
            process: None,
        }
    }
}

/// Keeps servers alive; kills the spawned binaries on drop.
pub struct Keep {
    threads: Vec<JoinHandle<()>>,
    children: Vec<Child>,
    /// Forked echo servers (the floor in a process of its own).
    forked: Vec<i32>,
    pub dir: PathBuf,
}

impl Keep {
    pub fn new(dir: PathBuf) -> Keep {
        Keep {
            threads: Vec::new(),
            children: Vec::new(),
            forked: Vec::new(),
            dir,
        }
    }
}

impl Drop for Keep {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: kill with the pid of a child we spawned.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        for &pid in &self.forked {
            // SAFETY: kill and reap a child we forked; status may be null.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_tid(keep: &mut Keep, f: impl FnOnce() + Send + 'static) -> (i32, CpuClock) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        tx.send(gettid()).expect("tid");
        f()
    });
    let tid = rx.recv().expect("tid");
    let clock = CpuClock::of_thread(&t);
    keep.threads.push(t);
    (tid, clock)
}

fn shared(stream: UnixStream, n: usize) -> Vec<MessageSocket> {
    (0..n)
        .map(|_| MessageSocket::new(stream.try_clone().expect("clone")))
        .collect()
}

fn connect(path: &Path) -> Option<UnixStream> {
    for _ in 0..1000 {
        if let Ok(mut c) = Client::connect(path) {
            c.negotiate(Client::qemu_capabilities()).ok()?;
            return c.socket().stream().try_clone().ok();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// The floor: per operation an echo thread doing one blocking read of the
/// request (recvmsg, so fds are taken and closed as a server must) and one
/// write of a reply of the same size a server sends. With `split` it reads
/// the 16-byte header and the payload with two recvmsg calls: the
/// difference prices one more syscall per message.
pub fn floor(keep: &mut Keep, ops: &[Op], split: bool) -> Target {
    let mut t = Target::echo(if split { "floor 2 reads" } else { "floor" }, true);
    for op in ops {
        let (client, server) = UnixStream::pair().expect("pair");
        let mut echo = Echo::new(op, split);
        let (tid, clock) = spawn_tid(keep, move || echo.serve(&server));
        t.socks.push(MessageSocket::new(client));
        t.clocks.push(clock);
        t.tasks.push(tid);
        t.trace.push(tid);
    }
    t
}

/// The floor in a process of its own (forked, one per operation): beside
/// the floor's thread, it prices the switch between two processes that
/// every round trip to the airlock binary pays.
pub fn floor_process(keep: &mut Keep, ops: &[Op]) -> Target {
    let mut t = Target::echo("floor process", false);
    for op in ops {
        let (client, server) = UnixStream::pair().expect("pair");
        // Everything the child uses is allocated before the fork: after it,
        // only this thread exists in the child and the allocator's locks
        // may be held by threads that are gone.
        let mut echo = Echo::new(op, false);
        // SAFETY: the child runs only Echo::serve (recvmsg, write, close on
        // memory allocated above) and then _exit: nothing that needs the
        // parent's other threads.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            drop(client);
            echo.serve(&server);
            // SAFETY: leave without running the parent's atexit handlers.
            unsafe { libc::_exit(0) };
        }
        keep.forked.push(pid);
        t.socks.push(MessageSocket::new(client));
        t.clocks.push(CpuClock::of_process(pid));
        t.tasks.push(pid);
        t.trace.push(pid);
    }
    t
}

/// One operation's echo loop, with its buffers made up front.
struct Echo {
    /// (request, reply) sizes of each step.
    sizes: Vec<(usize, usize)>,
    /// A reply per step whose header names its size, as a server's would.
    replies: Vec<Vec<u8>>,
    buf: Vec<u8>,
    split: bool,
}

impl Echo {
    fn new(op: &Op, split: bool) -> Echo {
        let sizes: Vec<(usize, usize)> = op
            .steps
            .iter()
            .map(|s| (s.request.len(), s.reply_len))
            .collect();
        let replies = sizes
            .iter()
            .map(|&(_, rep)| {
                let mut r = vec![0u8; rep];
                r[4..8].copy_from_slice(&(rep as u32).to_le_bytes());
                r[8] = 1;
                r
            })
            .collect();
        Echo {
            sizes,
            replies,
            buf: vec![0u8; 8192],
            split,
        }
    }

    /// Until the client goes: allocates nothing.
    fn serve(&mut self, mut server: &UnixStream) {
        loop {
            for (&(req, _), out) in self.sizes.iter().zip(&self.replies) {
                let mut got = 0;
                while got < req {
                    let upto = if self.split && got < 16 { 16 } else { req };
                    match recv_dropping_fds(server, &mut self.buf[got..upto]) {
                        n if n > 0 => got += n as usize,
                        _ => return,
                    }
                }
                if server.write_all(out).is_err() {
                    return;
                }
            }
        }
    }
}

/// One recvmsg; any fds that came along are closed. Returns recvmsg's result.
fn recv_dropping_fds(s: &UnixStream, buf: &mut [u8]) -> isize {
    let mut cbuf = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is an empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points at iov (over buf) and cbuf, alive for the call.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    // SAFETY: the kernel filled msg_control within msg_controllen; each
    // SCM_RIGHTS fd is new and ours, so owning (and dropping) it is right.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while n > 0 && !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const i32;
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..len / 4 {
                    drop(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    n
}

/// airlock's serve() with the emulated edu on a thread of this process.
pub fn airlock_thread(keep: &mut Keep, n_ops: usize) -> Target {
    let path = keep.dir.join("thread.sock");
    let l = UnixListener::bind(&path).expect("bind");
    let (tid, clock) = spawn_tid(keep, move || {
        let _ = serve(
            &Listener::local(l),
            Box::new(Edu::new()),
            airlock::server_limits(1 << 20),
        );
    });
    let stream = connect(&path).expect("airlock thread serves");
    Target {
        name: "airlock thread",
        socks: shared(stream, n_ops),
        clocks: vec![clock; n_ops],
        tasks: vec![tid],
        in_process: true,
        trace: vec![tid],
        process: None,
    }
}

/// The airlock binary; `sandbox` "off" or "on". None if it did not serve.
pub fn airlock_binary(keep: &mut Keep, sandbox: &str, n_ops: usize) -> Option<Target> {
    let sock = keep.dir.join(format!("bin-{sandbox}.sock"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["--socket-path", sock.to_str()?, "--emulate", "edu"])
        .args(["--sandbox", sandbox])
        .env("AIRLOCK_LOG", "warn")
        .spawn()
        .ok()?;
    let pid = child.id() as i32;
    keep.children.push(child);
    let stream = connect(&sock)?;
    // With the sandbox the server is the supervisor's child.
    let server = if sandbox == "on" { child_of(pid)? } else { pid };
    let mut all = tasks(pid);
    if server != pid {
        all.extend(tasks(server));
    }
    Some(Target {
        name: if sandbox == "on" {
            "binary sandbox on"
        } else {
            "binary sandbox off"
        },
        socks: shared(stream, n_ops),
        clocks: vec![CpuClock::of_process(server); n_ops],
        tasks: all,
        in_process: false,
        trace: vec![server],
        process: Some(server),
    })
}

/// rust-vmm's vfio_user Server::run on a thread of this process.
pub fn rust_vmm(keep: &mut Keep, n_ops: usize) -> Target {
    let path = keep.dir.join("rust-vmm.sock");
    let server = peer::server(&path);
    let (tid, clock) = spawn_tid(keep, move || {
        let mut dev = peer::PeerEdu::new();
        if let Err(e) = server.run(&mut dev) {
            eprintln!("rust-vmm server: {e}");
        }
    });
    let stream = connect(&path).expect("rust-vmm server serves");
    Target {
        name: "rust-vmm",
        socks: shared(stream, n_ops),
        clocks: vec![clock; n_ops],
        tasks: vec![tid],
        in_process: true,
        trace: vec![tid],
        process: None,
    }
}
