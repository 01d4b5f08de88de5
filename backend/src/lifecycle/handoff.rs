//! SIGUSR2 in the supervisor: the old airlock's three phases of a live
//! upgrade (successor.rs has the why): start the successor beside the
//! serving server and wait for its hello; stop the old server and wait for
//! the successor to serve; keep everything through its probation, then
//! let go. Any failure kills the successor and serves on.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{debug, error, info};

use super::ctl::{Heard, Msg};
use super::successor::{
    check_hello, kill_tree, unexpected, Candidate, KeptPath, Successor, HELLO_WAIT, PROBATION,
    SERVING_WAIT,
};
use super::supervisor::{reap, Running, Scene, SupervisorError, CHILD, STOPPING};
use super::watch::{drain, poll, pollfd};
use crate::systemd;

/// How a live upgrade ended for the old airlock.
pub(super) enum Upgrade {
    /// The successor serves: this airlock exits without touching the
    /// device or the socket path.
    Committed,
    /// This airlock carries on: with its server if `Running::reaped` is
    /// None, else with a fresh one.
    Failed,
}

/// What interrupted a wait on the successor.
enum Interrupt {
    Heard(Heard),
    /// The successor process ended.
    Exited(String),
    Stop,
}

pub(super) fn upgrade(
    scene: &Scene<'_>,
    successor: Option<&Successor>,
    run: &mut Running,
) -> Result<Upgrade, SupervisorError> {
    let device = scene.device;
    let Some(s) = successor else {
        error!("{device}: live upgrade (SIGUSR2) refused: the path airlock was started from is unknown (argv[0] is not a path and not on PATH); this airlock carries on. Start airlock by its full path to upgrade it in place");
        return Ok(Upgrade::Failed);
    };
    let exe = s.exe().display().to_string();
    if let Err(e) = s.check() {
        error!("{device}: live upgrade (SIGUSR2) refused: {exe} cannot be executed ({e}); this airlock carries on serving, nothing was stopped. Install the new airlock there and send SIGUSR2 again");
        return Ok(Upgrade::Failed);
    }
    systemd::notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=live upgrade: starting {exe} on {}",
        monotonic_usec(),
        scene.socket
    ));
    let kept = s.socket_path().and_then(|p| match KeptPath::keep(p) {
        Ok(k) => Some(k),
        Err(e) => {
            debug!("{device}: keeping {} under a second name: {e}", p.display());
            None
        }
    });
    let cand = match s.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Ok(fail(
                scene,
                None,
                kept,
                run,
                &format!("starting {exe}: {e}"),
            ))
        }
    };
    info!(
        "{device}: live upgrade: started {exe} as pid {}; this airlock serves until it takes over",
        cand.pid
    );
    match phases(scene, &cand, run)? {
        Ok(main_pid) => {
            commit(scene, &cand, kept, main_pid, &exe);
            Ok(Upgrade::Committed)
        }
        Err(why) => Ok(fail(scene, Some(&cand), kept, run, &why)),
    }
}

/// Hello, go, serving, probation. Ok: the successor's main pid.
fn phases(
    scene: &Scene<'_>,
    cand: &Candidate,
    run: &mut Running,
) -> Result<Result<u32, String>, SupervisorError> {
    let main_pid = match wait(scene, cand, Some(run), HELLO_WAIT)? {
        Interrupt::Heard(h) if h != Heard::TimedOut => match check_hello(h, cand) {
            Ok(pid) => pid,
            Err(why) => return Ok(Err(why)),
        },
        other => return Ok(Err(interrupted(other, "hello", HELLO_WAIT))),
    };
    stop_server(run)?;
    if let Err(e) = cand.ctl.send(&Msg::Go) {
        return Ok(Err(format!("telling it to go: {e}")));
    }
    let t = Instant::now();
    match wait(scene, cand, None, SERVING_WAIT)? {
        Interrupt::Heard(Heard::Msg(Msg::Serving)) => {}
        Interrupt::Heard(h) if h != Heard::TimedOut => return Ok(Err(unexpected(h, "serving"))),
        other => return Ok(Err(interrupted(other, "serving", SERVING_WAIT))),
    }
    debug!(
        "{}: live upgrade: the successor serves {} ms after the old server stopped",
        scene.device,
        t.elapsed().as_millis()
    );
    let until = Instant::now() + PROBATION;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match wait(scene, cand, None, left)? {
            Interrupt::Heard(Heard::TimedOut) => return Ok(Ok(main_pid)),
            Interrupt::Heard(Heard::Closed) => {
                return Ok(Err(
                    "it closed the handover channel while on probation".into()
                ))
            }
            // Anything else it says is ignored; it is judged by staying up.
            Interrupt::Heard(_) => {}
            other => return Ok(Err(interrupted(other, "its probation to end", PROBATION))),
        }
    }
}

fn interrupted(i: Interrupt, want: &str, limit: Duration) -> String {
    match i {
        Interrupt::Heard(Heard::TimedOut) => {
            format!("it did not say {want} within {} s", limit.as_secs())
        }
        Interrupt::Heard(h) => unexpected(h, want),
        Interrupt::Exited(how) => format!("it {how} before {want}"),
        Interrupt::Stop => format!("a stop signal arrived before {want}"),
    }
}

/// Waits up to `limit` for the successor to say something, end, or for a
/// stop signal. While `run` is given, the old server is watched too: if it
/// dies meanwhile it is reaped (the upgrade goes on; it is not restarted).
fn wait(
    scene: &Scene<'_>,
    cand: &Candidate,
    mut run: Option<&mut Running>,
    limit: Duration,
) -> Result<Interrupt, SupervisorError> {
    let until = Instant::now() + limit;
    loop {
        if STOPPING.load(Ordering::SeqCst) {
            return Ok(Interrupt::Stop);
        }
        let server = run
            .as_ref()
            .filter(|r| r.reaped.is_none())
            .map_or(-1, |r| r.pidfd.as_raw_fd());
        let mut fds = [
            pollfd(cand.ctl.raw_fd()),
            pollfd(cand.pidfd.as_raw_fd()),
            pollfd(scene.wake_rx.as_raw_fd()),
            pollfd(server),
        ];
        let left = until.saturating_duration_since(Instant::now());
        match poll(&mut fds, Some(left)) {
            Ok(0) => return Ok(Interrupt::Heard(Heard::TimedOut)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(super::supervisor::step("waiting on the successor")(e)),
        }
        if fds[0].revents != 0 {
            let h = cand.ctl.take();
            // A closed channel usually means the process is ending: its
            // exit status says more.
            if h != Heard::Closed || !exits_soon(cand) {
                return Ok(Interrupt::Heard(h));
            }
            return Ok(Interrupt::Exited(exit_of(cand.pid)));
        }
        if fds[1].revents != 0 {
            return Ok(Interrupt::Exited(exit_of(cand.pid)));
        }
        if fds[2].revents != 0 {
            drain(&scene.wake_rx);
        }
        if let (Some(r), true) = (run.as_deref_mut(), fds[3].revents != 0) {
            r.reaped = Some(reap(r.pid)?);
            CHILD.store(0, Ordering::SeqCst);
            error!(
                "{}: the server (pid {}) died during the live upgrade; the successor will serve",
                scene.device, r.pid
            );
        }
    }
}

/// Whether the successor's process ends within a second.
fn exits_soon(cand: &Candidate) -> bool {
    let mut p = [pollfd(cand.pidfd.as_raw_fd())];
    poll(&mut p, Some(Duration::from_secs(1))).unwrap_or(0) == 1
}

/// How the successor ended (it is reaped).
fn exit_of(pid: i32) -> String {
    let mut status = 0;
    // SAFETY: waitpid writes the status into our local.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r != pid {
        return "ended".into();
    }
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else {
        format!("was killed by signal {}", libc::WTERMSIG(status))
    }
}

/// Stops the old server as a crash would: no quiesce, no reset; what it
/// left in the kernel waits for the successor's first server to adopt.
fn stop_server(run: &mut Running) -> Result<(), SupervisorError> {
    if run.reaped.is_some() {
        return Ok(());
    }
    // SAFETY: kill has no memory arguments.
    unsafe { libc::kill(run.pid, libc::SIGKILL) };
    run.reaped = Some(reap(run.pid)?);
    run.stopped_for_upgrade = true;
    CHILD.store(0, Ordering::SeqCst);
    Ok(())
}

fn commit(scene: &Scene<'_>, cand: &Candidate, kept: Option<KeptPath>, main_pid: u32, exe: &str) {
    // systemd follows the new main process before this one exits.
    systemd::notify(&format!(
        "MAINPID={main_pid}\nREADY=1\nSTATUS=serving {} on {} (live upgrade to {exe} done)",
        scene.device, scene.socket
    ));
    if let Some(k) = kept {
        k.release();
    }
    let _ = cand.ctl.send(&Msg::Commit);
    info!(
        "{}: live upgrade: pid {main_pid} ({exe}) serves {} now; this airlock (pid {}) exits without touching the device",
        scene.device,
        scene.socket,
        std::process::id()
    );
}

/// The upgrade failed: the successor and what it started go, the socket
/// path is this airlock's again, systemd hears the reload is over.
fn fail(
    scene: &Scene<'_>,
    cand: Option<&Candidate>,
    kept: Option<KeptPath>,
    run: &Running,
    why: &str,
) -> Upgrade {
    if let Some(c) = cand {
        kill_tree(c.pid);
    }
    let replaced = kept.is_some_and(KeptPath::restore);
    let how = if run.reaped.is_none() {
        "this airlock's server serves on (it was never stopped)"
    } else {
        "this airlock carries on with a fresh server (it adopts the device as after a crash; the device was not reset)"
    };
    let path = if replaced {
        format!(
            "; the successor had replaced {}, which is put back",
            scene.socket
        )
    } else {
        String::new()
    };
    error!(
        "{}: live upgrade failed: {why}; the successor was stopped and {how}{path}",
        scene.device
    );
    systemd::notify(&format!(
        "READY=1\nSTATUS=serving {} on {}; live upgrade failed: {why}",
        scene.device, scene.socket
    ));
    Upgrade::Failed
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
