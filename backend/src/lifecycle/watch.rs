//! What the supervisor waits on while a server runs: the server's death,
//! its readiness byte, the stop and upgrade signals, a live upgrade's
//! predecessor (predecessor.rs), and clients left waiting in the backlog
//! (the server is busy with another one), which get a log line saying why
//! instead of an unexplained hang.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::predecessor::{Predecessor, Word};
use super::supervisor::{reap, step, Ending, Running, Scene, SupervisorError, STOPPING, UPGRADE};
use super::withdraw;
use crate::systemd;

/// How long a client may wait in the backlog before it is logged.
const WAIT_REPORT: Duration = Duration::from_secs(1);

/// What `watch` saw.
pub(super) enum Watched {
    Ended(Ending),
    UpgradeRequested,
}

pub(super) fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout.map_or(-1, |d| d.as_millis() as libc::c_int);
    // SAFETY: fds is a live slice of pollfd.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

pub(super) fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Empties the wake-up pipe.
pub(super) fn drain(wake_rx: &OwnedFd) {
    let mut b = [0u8; 64];
    // SAFETY: a read into a stack buffer from our non-blocking pipe.
    unsafe { libc::read(wake_rx.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
}

/// Since when a connection has sat unaccepted, and whether it was said.
type Waiting = Option<(Instant, bool)>;

/// Waits for the server to end or an upgrade request, noting readiness
/// and clients left waiting in the backlog.
pub(super) fn watch(
    scene: &Scene<'_>,
    run: &mut Running,
    predecessor: &mut Option<Predecessor>,
) -> Result<Watched, SupervisorError> {
    let mut waiting: Waiting = None;
    let mut stop_sent = false;
    let mut withdrawal = None;
    loop {
        if STOPPING.load(Ordering::SeqCst) && !stop_sent {
            stop(run);
            stop_sent = true;
        }
        let mut fds = watched_fds(scene, run, predecessor, waiting.is_none());
        // While the server starts up, wake now and then to re-check a stop
        // request that raced with poll.
        let mut timeout = (waiting.is_some() || !run.ready).then(|| Duration::from_millis(250));
        if let Some(w) = withdrawal.as_mut() {
            timeout = Some(withdraw::tick(scene.device, w, run.pid));
        }
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
            if run.ready_open && took_ready(&run.ready_rx) {
                run.ready = true;
            }
            let e = reap(run.pid)?;
            run.reaped = Some(e);
            return Ok(Watched::Ended(e));
        }
        if fds[3].revents != 0 {
            super::watch::drain(&scene.wake_rx);
        }
        if let (true, Some(r)) = (fds[5].revents != 0, scene.request) {
            withdraw::begin(scene.device, r, run.pid, &mut withdrawal);
        }
        if UPGRADE.swap(false, Ordering::SeqCst) && upgrade_allowed(scene, predecessor) {
            return Ok(Watched::UpgradeRequested);
        }
        if fds[1].revents != 0 {
            readiness(scene, run, predecessor);
        }
        if fds[4].revents != 0 {
            if let Some(p) = predecessor.as_mut() {
                if p.hear() == Word::Commit {
                    committed(scene, p);
                    *predecessor = None;
                }
            }
        }
        backlog(scene, fds[2].revents != 0, &mut waiting);
    }
}

/// What `watch` polls, in this order: the server's death, its readiness
/// byte, the listener (while no client is known to wait: it stays readable
/// until the server accepts), the signal wake-up pipe, the predecessor, the
/// device request.
fn watched_fds(
    scene: &Scene<'_>,
    run: &Running,
    predecessor: &Option<Predecessor>,
    listen: bool,
) -> [libc::pollfd; 6] {
    [
        pollfd(run.pidfd.as_raw_fd()),
        pollfd(if run.ready_open {
            run.ready_rx.as_raw_fd()
        } else {
            -1
        }),
        pollfd(if listen { scene.listener } else { -1 }),
        pollfd(scene.wake_rx.as_raw_fd()),
        pollfd(predecessor.as_ref().map_or(-1, Predecessor::raw_fd)),
        pollfd(scene.request.map_or(-1, |r| r.raw_fd())),
    ]
}

/// SIGUSR2 arrived: whether the upgrade may start now (else says why not).
fn upgrade_allowed(scene: &Scene<'_>, predecessor: &Option<Predecessor>) -> bool {
    if STOPPING.load(Ordering::SeqCst) {
        return false;
    }
    if withdraw::withdrawing() {
        warn!(
            "{}: live upgrade (SIGUSR2) ignored: the host asked for the device back",
            scene.device
        );
        return false;
    }
    if let Some(p) = predecessor {
        warn!("{}: live upgrade (SIGUSR2) ignored: this airlock is itself still taking over from pid {}", scene.device, p.pid());
        return false;
    }
    true
}

/// A stop signal arrived: the server stops (gracefully once it is ready).
fn stop(run: &mut Running) {
    // A ready byte not read yet still counts: that server has its
    // handler and stops gracefully (quiescing the device).
    if run.ready_open && !run.ready && took_ready(&run.ready_rx) {
        run.ready = true;
    }
    systemd::notify("STOPPING=1");
    // The signal handler forwarded SIGTERM if the server was known
    // by then; a pid namespace's PID 1 ignores it until it has a
    // handler, so a server still starting up is killed instead.
    // With the device in systemd's fd store the server dies as in a crash:
    // its graceful stop would quiesce and reset the device.
    let sig = if run.ready && !super::supervisor::device_kept() {
        libc::SIGTERM
    } else {
        libc::SIGKILL
    };
    // SAFETY: kill has no memory arguments.
    unsafe { libc::kill(run.pid, sig) };
}

/// The readiness pipe is readable: the server's byte, or its end closed.
fn readiness(scene: &Scene<'_>, run: &mut Running, predecessor: &mut Option<Predecessor>) {
    let mut b = [0u8; 1];
    // SAFETY: a one-byte read into a stack buffer.
    let n = unsafe { libc::read(run.ready_rx.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
    if n != 1 {
        run.ready_open = false;
        return;
    }
    run.ready = true;
    match predecessor {
        // The predecessor speaks for the service until it lets go.
        Some(p) => p.serving(),
        None => systemd::notify(&format!(
            "READY=1\nSTATUS=serving {} on {} (sandbox on)",
            scene.device, scene.socket
        )),
    }
}

/// The predecessor let go: this airlock is airlock now.
fn committed(scene: &Scene<'_>, p: &Predecessor) {
    info!(
        "live upgrade: airlock {} took over {} from pid {}; it serves as pid {} now",
        env!("CARGO_PKG_VERSION"),
        scene.socket,
        p.pid(),
        std::process::id()
    );
    systemd::notify(&format!(
        "READY=1\nSTATUS=serving {} on {} (sandbox on)",
        scene.device, scene.socket
    ));
    // The device request is this airlock's to hear from now on.
    if let Some(r) = scene.request {
        withdraw::arm(scene.device, r);
    }
}

/// Notes a client waiting in the backlog (`pending`: the listener is
/// readable), and says so once it has waited WAIT_REPORT.
fn backlog(scene: &Scene<'_>, pending: bool, waiting: &mut Waiting) {
    let device = scene.device;
    if pending {
        *waiting = Some((Instant::now(), false));
        return;
    }
    let Some((since, said)) = *waiting else {
        return;
    };
    let mut l = [pollfd(scene.listener)];
    if poll(&mut l, Some(Duration::ZERO)).unwrap_or(0) == 0 {
        if said {
            info!("{device}: the waiting client was accepted");
        }
        *waiting = None;
    } else if !said && since.elapsed() >= WAIT_REPORT {
        warn!(
            "{device}: a client has waited {} ms to be served: airlock serves one client at a time and another client holds the device; it is served when that client disconnects (one airlock per VM and device)",
            since.elapsed().as_millis()
        );
        *waiting = Some((since, true));
    }
}

/// Whether the readiness pipe holds the server's byte (without waiting).
pub(super) fn took_ready(ready_rx: &OwnedFd) -> bool {
    let mut p = [pollfd(ready_rx.as_raw_fd())];
    if poll(&mut p, Some(Duration::ZERO)).unwrap_or(0) == 0 {
        return false;
    }
    let mut b = [0u8; 1];
    // SAFETY: a one-byte read into a stack buffer; the pipe is readable.
    unsafe { libc::read(ready_rx.as_raw_fd(), b.as_mut_ptr().cast(), 1) == 1 }
}
