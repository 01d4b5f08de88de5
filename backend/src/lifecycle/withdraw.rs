//! The host asks for the device back (device/vfio/request.rs): the
//! supervisor's side. Its own eventfd is the kernel's REQ trigger; when
//! the request comes it says so, takes the device out of systemd's fd
//! store, and has the server relay the request to its client (QEMU then
//! unplugs the device from its guest). The client gets GRACE to let go;
//! then the server is stopped (gracefully: quiesce, unmap), and killed if
//! it has not ended KILL_AFTER later. Once the server is reaped airlock
//! quiesces and closes the device and exits EXIT_WITHDRAWN, which the
//! unit's RestartPreventExitStatus= names: nothing restarts an airlock
//! for a device that is gone.
//!
//! vfio-pci's unbind waits for the last fd of the device, so the whole
//! path is bounded: at most GRACE + KILL_AFTER after the request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{error, warn};

use crate::device::vfio::request::{RequestWatch, EXIT_WITHDRAWN, RELAY_SIGNAL};
use crate::systemd;

/// How long the client has to release the device after the request.
pub const GRACE: Duration = Duration::from_secs(3);
/// How long a stopped server has to end before it is killed.
pub const KILL_AFTER: Duration = Duration::from_millis(1500);

/// A request came: no upgrade, no restart; airlock ends once the server does.
pub(super) static WITHDRAWING: AtomicBool = AtomicBool::new(false);

pub(super) fn withdrawing() -> bool {
    WITHDRAWING.load(Ordering::SeqCst)
}

/// A request being carried out.
pub(super) struct Withdrawal {
    since: Instant,
    stopped: bool,
    killed: bool,
}

/// The request eventfd is readable: starts the withdrawal (once).
pub(super) fn begin(
    device: &str,
    watch: &RequestWatch,
    server: i32,
    current: &mut Option<Withdrawal>,
) {
    let n = watch.take();
    if n == 0 || current.is_some() {
        return;
    }
    WITHDRAWING.store(true, Ordering::SeqCst);
    warn!(
        "{device}: device request: the host asks for the device back (an unbind from vfio-pci, the VF removed by sriov_numvfs, or a hot removal); relaying it to the client (a QEMU that registered a REQ eventfd, as the patched one does, unplugs the device from its guest) and releasing the device within {} ms",
        (GRACE + KILL_AFTER).as_millis()
    );
    systemd::notify(&format!(
        "STATUS={device}: the host asked for the device back; releasing it"
    ));
    super::super::systemd::fdstore::remove_device();
    signal(server, RELAY_SIGNAL);
    *current = Some(Withdrawal {
        since: Instant::now(),
        stopped: false,
        killed: false,
    });
}

/// Escalates when the client keeps the device past GRACE; returns how
/// long to wait before the next check.
pub(super) fn tick(device: &str, w: &mut Withdrawal, server: i32) -> Duration {
    let waited = w.since.elapsed();
    if !w.stopped && waited >= GRACE {
        warn!(
            "{device}: device request: the client has not released the device after {} ms; stopping the server (the device is quiesced and its DMA unmapped)",
            waited.as_millis()
        );
        signal(server, libc::SIGTERM);
        w.stopped = true;
    }
    if !w.killed && waited >= GRACE + KILL_AFTER {
        error!(
            "{device}: device request: the server did not end within {} ms of its stop; killing it",
            KILL_AFTER.as_millis()
        );
        signal(server, libc::SIGKILL);
        w.killed = true;
    }
    Duration::from_millis(100)
}

/// Makes `watch` the kernel's REQ trigger; a failure is logged (the device
/// is still served, but an unbind from vfio-pci then waits for airlock).
pub fn arm(device: &str, watch: &RequestWatch) -> bool {
    match watch.arm() {
        Ok(()) => true,
        Err(e) => {
            warn!("{device}: arming the device request (VFIO REQ) failed: {e}; an unbind from vfio-pci then waits for airlock to stop");
            false
        }
    }
}

/// The last word once the device went back to the host.
pub fn released(device: &str) {
    error!("{device}: released to the host after its device request (quiesced, every fd closed); exiting with status {EXIT_WITHDRAWN} so that nothing restarts airlock for a device that is gone");
}

fn signal(pid: i32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill has no memory arguments.
        unsafe { libc::kill(pid, sig) };
    }
}

/// With --sandbox off there is no supervisor: a thread of the one process
/// hears the request and signals that process (the relay handler then runs
/// on the serving thread: this one blocks every signal).
pub fn watch_in_thread(device: String, watch: RequestWatch) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("device-request".into())
        .spawn(move || {
            // SAFETY: sigfillset/pthread_sigmask write only our local set
            // and this thread's mask.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
            }
            // SAFETY: getpid has no arguments.
            let me = unsafe { libc::getpid() };
            let mut current = None;
            let mut timeout = -1;
            loop {
                let mut p = libc::pollfd {
                    fd: watch.raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: p is one live pollfd.
                unsafe { libc::poll(&mut p, 1, timeout) };
                if p.revents != 0 {
                    begin(&device, &watch, me, &mut current);
                }
                if let Some(w) = current.as_mut() {
                    timeout = tick(&device, w, me).as_millis() as libc::c_int;
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::process::{Child, Command};

    use super::*;

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().expect("sleep")
    }

    /// The signal that ended `c` (None if it still runs after 2 s).
    fn ended_by(c: &mut Child) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        for _ in 0..200 {
            if let Some(s) = c.try_wait().unwrap() {
                return s.signal();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    #[test]
    fn a_request_is_relayed_once_and_escalates_to_stop_then_kill() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let watch = RequestWatch::new(null.as_fd()).unwrap();
        let mut server = sleeper();
        let mut current = None;
        begin("dev", &watch, server.id() as i32, &mut current);
        assert!(current.is_none(), "no request pending: nothing happens");

        // The kernel signals airlock's eventfd.
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a stack buffer to our eventfd.
        unsafe { libc::write(watch.raw_fd(), one.as_ptr().cast(), 8) };
        begin("dev", &watch, server.id() as i32, &mut current);
        assert!(withdrawing());
        assert_eq!(
            ended_by(&mut server),
            Some(RELAY_SIGNAL),
            "the server was told to relay"
        );
        let w = current.as_mut().expect("a withdrawal runs");
        let mut s2 = sleeper();
        tick("dev", w, s2.id() as i32);
        assert!(
            !w.stopped,
            "within the grace period the client may release it"
        );

        w.since = Instant::now() - GRACE;
        tick("dev", w, s2.id() as i32);
        assert_eq!(
            ended_by(&mut s2),
            Some(libc::SIGTERM),
            "then the server is stopped"
        );

        let mut s3 = sleeper();
        w.since = Instant::now() - GRACE - KILL_AFTER;
        tick("dev", w, s3.id() as i32);
        assert_eq!(
            ended_by(&mut s3),
            Some(libc::SIGKILL),
            "and killed if it lingers"
        );
        WITHDRAWING.store(false, Ordering::SeqCst);
    }
}
