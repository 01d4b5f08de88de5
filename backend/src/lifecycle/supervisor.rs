//! Crash-only serving. The supervisor stays outside the sandbox, owns the
//! listening socket (so its path stays in place), and runs the server as
//! PID 1 of a fresh pid namespace. When the server dies for any reason
//! (signal, panic, seccomp) it logs why and starts a fresh, fully confined
//! server on the same socket; clients queue in the listen backlog
//! meanwhile. A restart storm is bounded.
//!
//! With --vfio the supervisor opens the device (container, group, device
//! fds) before the first server and every server inherits it: clone
//! without CLONE_VM copies fds and memory, like fork. The supervisor's
//! copies keep the device open while no server runs, so a server's death
//! neither resets the device (vfio-pci resets on the last release) nor
//! removes its IOMMU mappings (they go with the container): the pages stay
//! pinned, a DMA in flight lands in the same guest page, and the next
//! server adopts what the dead one left (device/vfio/handover.rs) while a
//! reconnecting client replays its state. The supervisor never serves and
//! never touches the device while a server runs; it quiesces it only once
//! every server is reaped (airlock stopping, or giving up on restarts).
//! The server still confines itself before serving: the inherited fds are
//! what it would have opened itself, and seccomp still names each ioctl.
//!
//! SIGUSR2 is a live upgrade (upgrade.rs): the supervisor kills its
//! server as a crash would and execs the binary at the path airlock was
//! started from, handing over the socket and the device; if the binary
//! cannot be executed it says why and carries on (with a fresh server if
//! the old one was already stopped). Stop signals that arrive meanwhile
//! are blocked, so they stay pending across the exec and stop the
//! successor instead of getting lost.
//!
//! It also watches the listening socket: a client left waiting in the
//! backlog (the server is busy with another one) gets a log line saying
//! why, instead of an unexplained hang.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use thiserror::Error;

use super::upgrade::Successor;
use crate::sandbox::violation::{syscall_name, SharedRecord};
use crate::signals::{self, Disposition};
use crate::systemd;

#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error("supervisor: {what} failed: {source}. The supervisor starts each server in a new pid namespace, which needs root (CAP_SYS_ADMIN); pass --sandbox off to debug without it")]
    Step {
        what: &'static str,
        source: io::Error,
    },
}

/// At most this many restarts within RESTART_WINDOW, then give up.
pub const MAX_RESTARTS: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long a client may wait in the backlog before it is logged.
const WAIT_REPORT: Duration = Duration::from_secs(1);

static CHILD: AtomicI32 = AtomicI32::new(0);
static STOPPING: AtomicBool = AtomicBool::new(false);
static UPGRADE: AtomicBool = AtomicBool::new(false);
/// Write end of the pipe that wakes `watch` when a signal arrives.
static WAKE: AtomicI32 = AtomicI32::new(-1);

fn wake() {
    let fd = WAKE.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = [1u8];
        // SAFETY: a one-byte write from a stack buffer; async-signal-safe
        // (the pipe is non-blocking: a full pipe already wakes).
        unsafe { libc::write(fd, b.as_ptr().cast(), 1) };
    }
}

extern "C" fn forward(sig: libc::c_int) {
    STOPPING.store(true, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill has no memory arguments; async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
    wake();
}

extern "C" fn on_upgrade(_sig: libc::c_int) {
    UPGRADE.store(true, Ordering::SeqCst);
    wake();
}

/// The signals the supervisor handles: stop (forwarded) and upgrade.
const HANDLED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR2];

/// Blocks (or unblocks) the handled signals; blocked ones stay pending
/// across execve.
fn block_handled(block: bool) {
    // SAFETY: a sigset we own, filled by sigemptyset/sigaddset, passed to
    // sigprocmask with no old-set pointer.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in HANDLED {
            libc::sigaddset(&mut set, sig);
        }
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::sigprocmask(how, &set, std::ptr::null_mut());
    }
}

/// What the server gets from its supervisor.
pub struct ServerStart<'a> {
    /// Where the server records a seccomp violation (install its handler).
    pub record: &'a SharedRecord,
    /// 0 for the first server, then one more per restart.
    pub generation: u32,
    /// Write end of the readiness pipe: call `ready()` once confined.
    ready: RawFd,
}

impl ServerStart<'_> {
    /// Tells the supervisor the server is confined and about to serve.
    pub fn ready(&self) {
        let b = [1u8];
        // SAFETY: a one-byte write from a stack buffer to our pipe.
        unsafe { libc::write(self.ready, b.as_ptr().cast(), 1) };
    }
}

/// What `watch` saw.
enum Watched {
    Ended(Ending),
    UpgradeRequested,
}

/// How a server ended.
enum Ending {
    Exited(i32),
    Signaled(i32),
}

impl Ending {
    fn code(&self) -> i32 {
        match self {
            Ending::Exited(c) => *c,
            Ending::Signaled(s) => 128 + s,
        }
    }
}

fn step(what: &'static str) -> impl FnOnce(io::Error) -> SupervisorError {
    move |source| SupervisorError::Step { what, source }
}

/// Runs `server` (returning its exit code) as the sandboxed server until
/// a stop signal, restarting it when it dies. `device` names the device in logs; `listener` is the
/// socket to watch for waiting clients; `successor` is what SIGUSR2
/// execs (None: the path airlock was started from is unknown). Returns
/// the exit code for airlock.
pub fn supervise(
    device: &str,
    socket: &str,
    listener: RawFd,
    successor: Option<&Successor>,
    mut server: impl FnMut(&ServerStart<'_>) -> i32,
) -> Result<i32, SupervisorError> {
    let (wake_rx, wake_tx) = pipe(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .map_err(step("creating the supervisor's wake-up pipe"))?;
    WAKE.store(wake_tx.as_raw_fd(), Ordering::SeqCst);
    for sig in HANDLED {
        let handler = if sig == libc::SIGUSR2 {
            Disposition::Handler(on_upgrade)
        } else {
            Disposition::Handler(forward)
        };
        // SAFETY: both handlers only touch atomics, call kill and write to
        // a pipe.
        unsafe { signals::install(sig, handler, false) }
            .map_err(step("installing the supervisor's signal handlers"))?;
    }
    // A predecessor blocked them for its exec: what arrived meanwhile
    // is delivered now.
    block_handled(false);
    let record = SharedRecord::new().map_err(step("mapping the seccomp report page"))?;
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    let mut ever_ready = false;
    let mut restarts_total = 0u32;
    loop {
        record.clear();
        let generation = restarts_total;
        restarts_total += 1;
        let (pid, pidfd, ready_rx) = spawn(&record, generation, &mut server)?;
        let mut ready = false;
        // None: the server was stopped for an upgrade whose exec failed.
        let ending = loop {
            match watch(
                device, socket, listener, pid, &pidfd, &ready_rx, &wake_rx, &mut ready,
            )? {
                Watched::Ended(e) => break Some(e),
                Watched::UpgradeRequested => {
                    if upgrade(device, socket, successor, pid)? {
                        break None;
                    }
                }
            }
        };
        CHILD.store(0, Ordering::SeqCst);
        ever_ready |= ready;
        if STOPPING.load(Ordering::SeqCst) {
            return Ok(ending.map_or(0, |e| e.code()));
        }
        let Some(ending) = ending else {
            // Not a crash: no restart counted.
            continue;
        };
        systemd::notify(&format!(
            "STATUS={device}: the server died; restarting it on {socket}"
        ));
        let why = describe(device, pid, &ending, &record);
        if !ever_ready {
            // It never served: a setup error (its message is above), not a
            // crash; restarting would only repeat it.
            if !matches!(ending, Ending::Exited(_)) {
                error!("{why}");
            }
            return Ok(ending.code());
        }
        let now = Instant::now();
        while restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            restarts.pop_front();
        }
        if restarts.len() >= MAX_RESTARTS {
            error!("{why}");
            error!(
                "{device}: the server died {} times within {} s; giving up (the socket is removed). Check the lines above; `--sandbox off` runs without the sandbox to reproduce",
                restarts.len() + 1,
                RESTART_WINDOW.as_secs()
            );
            return Ok(ending.code().max(1));
        }
        restarts.push_back(now);
        error!(
            "{why}; starting a fresh sandboxed server on the same socket (restart {} of at most {} per {} s)",
            restarts.len(),
            MAX_RESTARTS,
            RESTART_WINDOW.as_secs()
        );
    }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into our timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// SIGUSR2: replaces this airlock with `successor` (same pid). Returns
/// false if nothing was stopped (the binary cannot be executed: said
/// why), true if the server was stopped and the exec failed (said why;
/// the caller starts a fresh server). Does not return when the exec
/// succeeds.
fn upgrade(
    device: &str,
    socket: &str,
    successor: Option<&Successor>,
    pid: i32,
) -> Result<bool, SupervisorError> {
    let Some(s) = successor else {
        error!("{device}: live upgrade (SIGUSR2) refused: the path airlock was started from is unknown (argv[0] is not a path and not on PATH); this airlock carries on. Start airlock by its full path to upgrade it in place");
        return Ok(false);
    };
    let exe = s.exe().display();
    if let Err(e) = s.check() {
        error!("{device}: live upgrade (SIGUSR2) refused: {exe} cannot be executed ({e}); this airlock carries on serving, nothing was stopped. Install the new airlock there and send SIGUSR2 again");
        return Ok(false);
    }
    // A stop signal from here on stays pending: delivered to the
    // successor, or to this supervisor again if the exec fails.
    block_handled(true);
    systemd::notify(&format!(
        "RELOADING=1
MONOTONIC_USEC={}
STATUS=live upgrade: executing {exe} on {socket}",
        monotonic_usec()
    ));
    // The server dies as in a crash: no quiesce, no reset; what it left
    // in the kernel waits for the successor's first server to adopt.
    // SAFETY: kill has no memory arguments.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    reap(pid)?;
    CHILD.store(0, Ordering::SeqCst);
    debug!("{device}: live upgrade: server pid {pid} stopped; executing {exe}");
    let e = s.exec();
    error!("{device}: live upgrade failed: executing {exe}: {e}; carrying on with a fresh server of this airlock (it adopts the device as after a crash)");
    block_handled(false);
    Ok(true)
}

fn pipe(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut p = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into p.
    if unsafe { libc::pipe2(p.as_mut_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

fn describe(device: &str, pid: i32, ending: &Ending, record: &SharedRecord) -> String {
    if let Some(nr) = record.taken() {
        return format!(
            "{device}: the sandboxed server (pid {pid}) made system call {nr} ({}) outside its seccomp allowlist and was stopped. This is a bug in airlock or an attack through the socket: please report this line; `--sandbox off` reproduces without the filter",
            syscall_name(nr)
        );
    }
    match ending {
        Ending::Signaled(libc::SIGSYS) => format!(
            "{device}: the sandboxed server (pid {pid}) was killed by seccomp (SIGSYS) before it could say which call; `--sandbox off` reproduces without the filter"
        ),
        Ending::Signaled(s) => {
            format!("{device}: the sandboxed server (pid {pid}) was killed by signal {s}")
        }
        Ending::Exited(c) => {
            format!("{device}: the sandboxed server (pid {pid}) exited with status {c}")
        }
    }
}

/// Starts one server as PID 1 of a new pid namespace. Returns its pid (as
/// seen here), a pidfd to wait on, and the read end of its ready pipe.
fn spawn(
    record: &SharedRecord,
    generation: u32,
    server: &mut impl FnMut(&ServerStart<'_>) -> i32,
) -> Result<(i32, OwnedFd, OwnedFd), SupervisorError> {
    let (rx, tx) = pipe(libc::O_CLOEXEC).map_err(step("creating the readiness pipe"))?;
    // A raw clone with a new pid namespace each time: unshare(CLONE_NEWPID)
    // works once per process, and a namespace dies with its PID 1.
    // SAFETY: clone without CLONE_VM or a stack behaves like fork; only
    // this thread exists, so the child may run arbitrary code.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    } as i32;
    if pid < 0 {
        return Err(SupervisorError::Step {
            what: "starting the server in a new pid namespace",
            source: io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        // The server dies with its supervisor, and leaves upgrades to it.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        // SAFETY: SIG_IGN runs no handler code.
        let _ = unsafe { signals::install(libc::SIGUSR2, Disposition::Ignore, false) };
        WAKE.store(-1, Ordering::SeqCst);
        drop(rx);
        let start = ServerStart {
            record,
            generation,
            ready: tx.as_raw_fd(),
        };
        // Exit without unwinding into the supervisor's frames: the
        // listener and its path belong to the supervisor.
        std::process::exit(server(&start));
    }
    drop(tx);
    CHILD.store(pid, Ordering::SeqCst);
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if fd < 0 {
        return Err(step("pidfd_open on the server")(io::Error::last_os_error()));
    }
    info!("sandbox: serving process is pid {pid} (host view), in its own pid namespace");
    // SAFETY: pidfd_open returned a new fd nobody else owns.
    Ok((pid, unsafe { OwnedFd::from_raw_fd(fd) }, rx))
}

fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout.map_or(-1, |d| d.as_millis() as libc::c_int);
    // SAFETY: fds is a live slice of pollfd.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits for the server to end or an upgrade request, noting readiness
/// (in `ready`, kept across calls for the same server) and clients left
/// waiting in the backlog.
#[allow(clippy::too_many_arguments)]
fn watch(
    device: &str,
    socket: &str,
    listener: RawFd,
    pid: i32,
    pidfd: &OwnedFd,
    ready_rx: &OwnedFd,
    wake_rx: &OwnedFd,
    ready: &mut bool,
) -> Result<Watched, SupervisorError> {
    let mut ready_open = !*ready;
    // Since when a connection has sat unaccepted, and whether it was said.
    let mut waiting: Option<(Instant, bool)> = None;
    let mut stop_sent = false;
    loop {
        if STOPPING.load(Ordering::SeqCst) && !stop_sent {
            // A ready byte not read yet still counts: that server has its
            // handler and stops gracefully (quiescing the device).
            if ready_open && !*ready && took_ready(ready_rx) {
                *ready = true;
            }
            systemd::notify("STOPPING=1");
            // The signal handler forwarded SIGTERM if the server was known
            // by then; a pid namespace's PID 1 ignores it until it has a
            // handler, so a server still starting up is killed instead.
            let sig = if *ready { libc::SIGTERM } else { libc::SIGKILL };
            // SAFETY: kill has no memory arguments.
            unsafe { libc::kill(pid, sig) };
            stop_sent = true;
        }
        let mut fds = [
            pollfd(pidfd.as_raw_fd()),
            pollfd(if ready_open { ready_rx.as_raw_fd() } else { -1 }),
            // While a client waits, poll the listener by timeout instead
            // (it stays readable until the server accepts).
            pollfd(if waiting.is_none() { listener } else { -1 }),
            pollfd(wake_rx.as_raw_fd()),
        ];
        // While the server starts up, wake now and then to re-check a stop
        // request that raced with poll.
        let timeout = (waiting.is_some() || !*ready).then(|| Duration::from_millis(250));
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(step("waiting on the server")(e)),
        }
        if fds[0].revents != 0 {
            // A server that said ready and died at once (a fault right
            // after confinement) shows both in one poll: its byte must be
            // read first, or its death looks like a setup error and airlock
            // gives up instead of restarting it.
            if ready_open && took_ready(ready_rx) {
                *ready = true;
            }
            return Ok(Watched::Ended(reap(pid)?));
        }
        if fds[3].revents != 0 {
            let mut b = [0u8; 64];
            // SAFETY: a read into a stack buffer from our non-blocking pipe.
            unsafe { libc::read(wake_rx.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        }
        if UPGRADE.swap(false, Ordering::SeqCst) && !STOPPING.load(Ordering::SeqCst) {
            return Ok(Watched::UpgradeRequested);
        }
        if fds[1].revents != 0 {
            let mut b = [0u8; 1];
            // SAFETY: a one-byte read into a stack buffer.
            let n = unsafe { libc::read(ready_rx.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
            if n == 1 {
                *ready = true;
                systemd::notify(&format!(
                    "READY=1\nSTATUS=serving {device} on {socket} (sandbox on)"
                ));
            } else {
                ready_open = false;
            }
        }
        if fds[2].revents != 0 {
            waiting = Some((Instant::now(), false));
        } else if let Some((since, said)) = waiting {
            let mut l = [pollfd(listener)];
            if poll(&mut l, Some(Duration::ZERO)).unwrap_or(0) == 0 {
                if said {
                    info!("{device}: the waiting client was accepted");
                }
                waiting = None;
            } else if !said && since.elapsed() >= WAIT_REPORT {
                warn!(
                    "{device}: a client has waited {} ms to be served: airlock serves one client at a time and another client holds the device; it is served when that client disconnects (one airlock per VM and device)",
                    since.elapsed().as_millis()
                );
                waiting = Some((since, true));
            }
        }
    }
}

/// Whether the readiness pipe holds the server's byte (without waiting).
fn took_ready(ready_rx: &OwnedFd) -> bool {
    let mut p = [pollfd(ready_rx.as_raw_fd())];
    if poll(&mut p, Some(Duration::ZERO)).unwrap_or(0) == 0 {
        return false;
    }
    let mut b = [0u8; 1];
    // SAFETY: a one-byte read into a stack buffer; the pipe is readable.
    unsafe { libc::read(ready_rx.as_raw_fd(), b.as_mut_ptr().cast(), 1) == 1 }
}

fn reap(pid: i32) -> Result<Ending, SupervisorError> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into our local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(step("reaping the server")(e));
        }
    }
    Ok(if libc::WIFEXITED(status) {
        Ending::Exited(libc::WEXITSTATUS(status))
    } else {
        Ending::Signaled(libc::WTERMSIG(status))
    })
}
