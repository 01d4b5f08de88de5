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
//! SIGUSR2 is a live upgrade in two phases (handoff.rs): the new binary
//! starts beside this one and this airlock lets go only once it serves.
//! watch.rs waits on the server, the signals and the backlog.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{error, info};

use super::handoff::{self, Upgrade};
use super::predecessor::Predecessor;
use super::successor::Successor;
use super::watch::{watch, Watched};
use super::withdraw;
use crate::device::vfio::request::{RequestWatch, EXIT_WITHDRAWN};
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

pub(super) static CHILD: AtomicI32 = AtomicI32::new(0);
pub(super) static STOPPING: AtomicBool = AtomicBool::new(false);
pub(super) static UPGRADE: AtomicBool = AtomicBool::new(false);
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

/// systemd's fd store keeps the device: a stop kills the server as a
/// crash would (no quiesce), and the store decides (restart: adopted;
/// stop: released, and vfio-pci resets the device).
static DEVICE_KEPT: AtomicBool = AtomicBool::new(false);

extern "C" fn forward(sig: libc::c_int) {
    STOPPING.store(true, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        let sig = if DEVICE_KEPT.load(Ordering::SeqCst) {
            libc::SIGKILL
        } else {
            sig
        };
        // SAFETY: kill has no memory arguments; async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
    wake();
}

pub(super) fn device_kept() -> bool {
    DEVICE_KEPT.load(Ordering::SeqCst)
}

extern "C" fn on_upgrade(_sig: libc::c_int) {
    UPGRADE.store(true, Ordering::SeqCst);
    wake();
}

/// The signals the supervisor handles: stop (forwarded) and upgrade.
const HANDLED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR2];

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

/// How airlock's supervision ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Stopped, or gave up: every server is reaped and the device is this
    /// airlock's to quiesce and the socket path its to remove.
    Stopped(i32),
    /// The device and the socket path are not this airlock's to release:
    /// it handed them to a successor, or it is a successor that never took
    /// them over (its predecessor still serves).
    LetGo(i32),
}

/// A running server.
pub(super) struct Running {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub ready_rx: OwnedFd,
    /// It said it is confined and serving.
    pub ready: bool,
    /// The readiness pipe may still carry its byte.
    pub ready_open: bool,
    /// Reaped already (it died, or was stopped for an upgrade).
    pub reaped: Option<Ending>,
    /// Stopped by the supervisor for an upgrade (not a crash).
    pub stopped_for_upgrade: bool,
}

/// How a server ended.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ending {
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

/// What the supervisor watches and names in its logs.
pub(super) struct Scene<'a> {
    pub device: &'a str,
    /// The kernel's device request, heard by this airlock (withdraw.rs).
    pub request: Option<&'a RequestWatch>,
    pub socket: &'a str,
    pub listener: RawFd,
    pub wake_rx: OwnedFd,
}

pub(super) fn step(what: &'static str) -> impl FnOnce(io::Error) -> SupervisorError {
    move |source| SupervisorError::Step { what, source }
}

/// What the supervisor is given.
pub struct Supervision<'a> {
    /// The device's name, for logs.
    pub device: &'a str,
    /// The socket, for logs.
    pub socket: &'a str,
    /// The listening socket, watched for clients left waiting.
    pub listener: RawFd,
    /// What SIGUSR2 starts (None: the path airlock was started from is
    /// unknown).
    pub successor: Option<&'a Successor>,
    /// The airlock that started this one for a live upgrade.
    pub predecessor: Option<Predecessor>,
    /// systemd's fd store keeps the device across a stop (systemd/fdstore.rs).
    pub device_kept: bool,
    /// The device's request watch (--vfio), armed already unless this
    /// airlock is a successor: it arms it once its predecessor let go.
    pub request: Option<&'a RequestWatch>,
}

/// Runs `server` (returning its exit code) as the sandboxed server until
/// a stop signal, restarting it when it dies.
pub fn supervise(
    s: Supervision<'_>,
    mut server: impl FnMut(&ServerStart<'_>) -> i32,
) -> Result<Exit, SupervisorError> {
    let Supervision {
        device,
        socket,
        listener,
        successor,
        mut predecessor,
        device_kept,
        request,
    } = s;
    DEVICE_KEPT.store(device_kept, Ordering::SeqCst);
    let scene = Scene {
        device,
        request,
        socket,
        listener,
        wake_rx: install_handlers()?,
    };
    let record = SharedRecord::new().map_err(step("mapping the seccomp report page"))?;
    if let Some(p) = predecessor.as_mut() {
        if let Err(why) = p.greet() {
            error!("{device}: live upgrade: {why}; exiting, the previous airlock keeps serving");
            return Ok(Exit::LetGo(1));
        }
    }
    let mut restarts = Restarts::default();
    let mut ever_ready = false;
    for generation in 0.. {
        record.clear();
        let mut running = spawn(&record, generation, &mut server)?;
        let ending = loop {
            match watch(&scene, &mut running, &mut predecessor)? {
                Watched::Ended(e) => break e,
                Watched::UpgradeRequested => {
                    match handoff::upgrade(&scene, successor, &mut running)? {
                        Upgrade::Committed => return Ok(Exit::LetGo(0)),
                        Upgrade::Failed => {}
                    }
                    if let Some(e) = running.reaped {
                        // Stopped for the upgrade: not a crash, no restart counted.
                        break e;
                    }
                }
            }
        };
        CHILD.store(0, Ordering::SeqCst);
        ever_ready |= running.ready;
        let pending = predecessor.is_some();
        if let Some(exit) = after(
            &scene,
            &running,
            ending,
            &record,
            ever_ready,
            pending,
            &mut restarts,
        ) {
            return Ok(exit);
        }
    }
    unreachable!("generations do not run out")
}

/// After a server ended: the exit if airlock ends too, None to start a
/// fresh server. `pending`: a predecessor has not let go yet.
fn after(
    scene: &Scene<'_>,
    running: &Running,
    ending: Ending,
    record: &SharedRecord,
    ever_ready: bool,
    pending: bool,
    restarts: &mut Restarts,
) -> Option<Exit> {
    let device = scene.device;
    let exit = |code| match pending || device_kept() {
        true => Exit::LetGo(code),
        false => Exit::Stopped(code),
    };
    if withdraw::withdrawing() {
        return Some(Exit::Stopped(EXIT_WITHDRAWN));
    }
    if STOPPING.load(Ordering::SeqCst) && device_kept() {
        info!("{device}: stopping; the device stays open in systemd's fd store: systemctl restart keeps it (the next airlock adopts it), systemctl stop releases it (vfio-pci then resets it)");
        return Some(exit(0));
    }
    if STOPPING.load(Ordering::SeqCst) {
        let code = if running.stopped_for_upgrade {
            0
        } else {
            ending.code()
        };
        return Some(exit(code));
    }
    if running.stopped_for_upgrade {
        // Not a crash: no restart counted.
        return None;
    }
    if !pending {
        systemd::notify(&format!(
            "STATUS={device}: the server died; restarting it on {}",
            scene.socket
        ));
    }
    let why = describe(device, running.pid, &ending, record);
    if !ever_ready {
        // It never served: a setup error (its message is above), not a
        // crash; restarting would only repeat it.
        if !matches!(ending, Ending::Exited(_)) {
            error!("{why}");
        }
        return Some(exit(ending.code()));
    }
    if let Err(n) = restarts.count() {
        error!("{why}");
        error!(
            "{device}: the server died {n} times within {} s; giving up (the socket is removed). Check the lines above; `--sandbox off` runs without the sandbox to reproduce",
            RESTART_WINDOW.as_secs()
        );
        return Some(exit(ending.code().max(1)));
    }
    error!(
        "{why}; starting a fresh sandboxed server on the same socket (restart {} of at most {MAX_RESTARTS} per {} s)",
        restarts.0.len(),
        RESTART_WINDOW.as_secs()
    );
    None
}

/// Restart times within the window.
#[derive(Default)]
struct Restarts(VecDeque<Instant>);

impl Restarts {
    /// Counts one more; Err(n) once that would be too many.
    fn count(&mut self) -> Result<(), usize> {
        let now = Instant::now();
        while self
            .0
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            self.0.pop_front();
        }
        if self.0.len() >= MAX_RESTARTS {
            return Err(self.0.len() + 1);
        }
        self.0.push_back(now);
        Ok(())
    }
}

/// Installs the stop and upgrade handlers; returns the pipe they wake.
fn install_handlers() -> Result<OwnedFd, SupervisorError> {
    let (wake_rx, wake_tx) = pipe(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .map_err(step("creating the supervisor's wake-up pipe"))?;
    WAKE.store(wake_tx.as_raw_fd(), Ordering::SeqCst);
    // The write end lives as long as the process.
    std::mem::forget(wake_tx);
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
    Ok(wake_rx)
}

pub(super) fn pipe(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
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

/// Starts one server as PID 1 of a new pid namespace.
fn spawn(
    record: &SharedRecord,
    generation: u32,
    server: &mut impl FnMut(&ServerStart<'_>) -> i32,
) -> Result<Running, SupervisorError> {
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
        return Err(step("starting the server in a new pid namespace")(
            io::Error::last_os_error(),
        ));
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
    let pidfd = super::successor::pidfd(pid).map_err(step("pidfd_open on the server"))?;
    info!("sandbox: serving process is pid {pid} (host view), in its own pid namespace");
    Ok(Running {
        pid,
        pidfd,
        ready_rx: rx,
        ready: false,
        ready_open: true,
        reaped: None,
        stopped_for_upgrade: false,
    })
}

pub(super) fn reap(pid: i32) -> Result<Ending, SupervisorError> {
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
