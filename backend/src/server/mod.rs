//! The listening socket and the accept loop: one client at a time, served
//! on this thread with blocking reads; between clients the device is
//! quiesced. The serving process never creates a thread or process, so the
//! sandbox can forbid clone outright.
//!
//! SIGTERM/SIGINT set a stop flag and shut the active connection down, so
//! a blocked read returns, the session quiesces the device, and the loop
//! ends; the socket path is then removed by whoever created it.

mod device_dma;
pub mod session;
mod stats;

pub use session::Session;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use thiserror::Error;
use tracing::{info, warn};

use crate::config::{Listen, SocketAccess};
use crate::device::Device;
use crate::negotiate::ServerLimits;
use crate::signals::{self, Disposition};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(
        "{path}: exists and is not a socket; refusing to remove it (pick another --socket-path)"
    )]
    NotASocket { path: PathBuf },
    #[error("cannot listen on {path}: {source}{}", bind_fix(path, source))]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set {path}'s {what}: {source}. The socket directory's filesystem may refuse chown, or airlock lacks CAP_CHOWN for that group: pick a --socket-path on a local filesystem (e.g. /run/airlock/) and run airlock as root")]
    Access {
        path: PathBuf,
        what: String,
        source: io::Error,
    },
    #[error("--fd {fd} is not a listening unix socket: {why}")]
    BadFd { fd: RawFd, why: String },
    #[error("signal setup failed: {0}")]
    Signals(io::Error),
    #[error("waiting for clients failed: {0}")]
    Poll(io::Error),
}

/// What to do about a socket path airlock cannot bind.
fn bind_fix(path: &Path, e: &io::Error) -> String {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .display();
    match e.raw_os_error() {
        Some(libc::ENOENT) => format!(
            ". The directory {dir} does not exist: create it (mkdir -p {dir}) or pick another --socket-path"
        ),
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => format!(
            ". airlock may not create a socket in {dir}: pick a directory it can write with --socket-path (e.g. /run/airlock/ as root, $XDG_RUNTIME_DIR as a user)"
        ),
        Some(libc::EADDRINUSE) => ". Another process listens there: stop it or pick another --socket-path".into(),
        _ if e.kind() == io::ErrorKind::InvalidInput => {
            ". A unix socket path must be shorter than 108 bytes: pick a shorter --socket-path".into()
        }
        _ => String::new(),
    }
}

/// Gives the socket at `at` (staged for `path`) to --socket-group's group.
fn give_group(at: &Path, path: &Path, access: &SocketAccess) -> Result<(), ServerError> {
    let Some((gid, _)) = &access.group else {
        return Ok(());
    };
    std::os::unix::fs::lchown(at, None, Some(*gid)).map_err(|e| access_err(e, path, access))
}

fn access_err(source: io::Error, path: &Path, access: &SocketAccess) -> ServerError {
    ServerError::Access {
        path: path.into(),
        what: access.describe(),
        source,
    }
}

/// Who can connect, for the log: the default keeps other users out, and a
/// QEMU of another user then fails with EACCES; say what lets it in.
fn who_may_connect(access: &SocketAccess) -> String {
    match &access.group {
        Some((_, name)) => format!("{}: users in group {name} may connect", access.describe()),
        None => format!(
            "{}: only airlock's user may connect (a QEMU running as another user gets EACCES; let its group in with --socket-group GROUP)",
            access.describe()
        ),
    }
}

/// A listening socket; removes its path on drop when it owns the path.
pub struct Listener {
    listener: UnixListener,
    path: Option<PathBuf>,
    /// Whether drop removes `path` (false once a supervisor took that over).
    owns_path: bool,
}

impl Listener {
    pub fn open(listen: &Listen, access: &SocketAccess) -> Result<Listener, ServerError> {
        match listen {
            Listen::Path(p) => Self::bind(p, access),
            Listen::Fd(fd) => Self::inherit(*fd),
        }
    }

    fn bind(path: &Path, access: &SocketAccess) -> Result<Listener, ServerError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                let _ = std::fs::remove_file(path);
            }
            Ok(_) => return Err(ServerError::NotASocket { path: path.into() }),
            Err(_) => {}
        }
        let bind_err = |source| ServerError::Bind {
            path: path.into(),
            source,
        };
        // Bind and chmod under a temporary name, then rename into place:
        // once the path exists it accepts connections (a client racing
        // airlock's start never gets ECONNREFUSED from a bound socket that
        // is not listening yet).
        let tmp = path.with_file_name(format!(
            ".{}.{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let staged = tmp.as_os_str().len() < 108;
        let at = if staged { tmp.as_path() } else { path };
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(at).map_err(bind_err)?;
        // Group and mode before the socket is in place: nobody connects
        // while it is still root's alone or more open than asked.
        let placed = give_group(at, path, access)
            .and_then(|_| {
                std::fs::set_permissions(at, std::fs::Permissions::from_mode(access.mode))
                    .map_err(|e| access_err(e, path, access))
            })
            .and_then(|_| {
                if staged {
                    std::fs::rename(at, path).map_err(bind_err)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = placed {
            let _ = std::fs::remove_file(at);
            return Err(e);
        }
        info!("{}: {}", path.display(), who_may_connect(access));
        Ok(Listener {
            listener,
            path: Some(path.into()),
            owns_path: true,
        })
    }

    /// The socket a live upgrade's predecessor handed over (it listens
    /// already; clients wait in its backlog). The path, if any, stays the
    /// predecessor's until this airlock has taken over (`own_path`).
    pub fn resume(fd: OwnedFd, listen: &Listen) -> Result<Listener, ServerError> {
        check_listening(fd.as_raw_fd())?;
        Ok(Listener {
            listener: UnixListener::from(fd),
            path: match listen {
                Listen::Path(p) => Some(p.clone()),
                Listen::Fd(_) => None,
            },
            owns_path: false,
        })
    }

    fn inherit(fd: RawFd) -> Result<Listener, ServerError> {
        check_listening(fd)?;
        // Nothing airlock execs inherits it, except a live upgrade's
        // successor (lifecycle/upgrade.rs clears CLOEXEC for that exec only).
        // SAFETY: fcntl with integer arguments on a valid fd.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: the launcher handed this fd to us; from here we own it.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        Ok(Listener {
            listener,
            path: None,
            owns_path: false,
        })
    }

    pub fn local(listener: UnixListener) -> Listener {
        Listener {
            listener,
            path: None,
            owns_path: false,
        }
    }

    /// Gives up removing the path on drop (a supervisor outside the
    /// sandbox removes it instead).
    pub fn disown_path(&mut self) {
        self.owns_path = false;
    }

    /// Removes the path on drop (an upgrade's successor, once it has
    /// taken over; a no-op for a socket without a path).
    pub fn own_path(&mut self) {
        self.owns_path = self.path.is_some();
    }

    pub fn raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub fn describe(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => format!("fd {}", self.listener.as_raw_fd()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let (Some(p), true) = (&self.path, self.owns_path) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Whether `fd` is a listening socket (SO_ACCEPTCONN).
fn check_listening(fd: RawFd) -> Result<(), ServerError> {
    let bad = |why: String| ServerError::BadFd { fd, why };
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    if val == 0 {
        return Err(bad("it is not listening".into()));
    }
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);
static ACTIVE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(_sig: libc::c_int) {
    // Async-signal-safe: two atomics and one syscall.
    STOP.store(true, Ordering::SeqCst);
    let fd = ACTIVE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: shutdown on a socket fd has no memory arguments.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// Installs the SIGTERM/SIGINT handler (without SA_RESTART, so a blocked
/// poll returns EINTR).
pub fn install_stop_signals() -> Result<(), ServerError> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: on_stop_signal touches two atomics and calls shutdown.
        unsafe { signals::install(sig, Disposition::Handler(on_stop_signal), false) }
            .map_err(ServerError::Signals)?;
    }
    Ok(())
}

extern "C" fn on_upgrade_without_supervisor(_sig: libc::c_int) {
    const MSG: &[u8] = b"airlock: SIGUSR2 ignored: a live upgrade needs the supervisor, which runs only with the sandbox on (drop --sandbox off)\n";
    // SAFETY: write(2) from a static buffer; async-signal-safe.
    unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
}

/// With --sandbox off there is no supervisor to upgrade: SIGUSR2 says so
/// instead of killing airlock (its default action). SA_RESTART: a
/// blocked read or poll resumes.
pub fn refuse_upgrade_signal() -> Result<(), ServerError> {
    let refuse = Disposition::Handler(on_upgrade_without_supervisor);
    // SAFETY: the handler only writes a static message.
    unsafe { signals::install(libc::SIGUSR2, refuse, true) }.map_err(ServerError::Signals)
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn wait_for_client(fd: RawFd) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is one live pollfd.
    let r = unsafe { libc::poll(&mut p, 1, -1) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(true)
}

/// Serves clients one after another until a stop signal arrives (with no
/// handler installed: forever). Returns the device for reuse.
pub fn serve(
    listener: &Listener,
    mut device: Box<dyn Device>,
    limits: ServerLimits,
) -> Result<Box<dyn Device>, ServerError> {
    info!(
        device = device.name(),
        "listening on {}",
        listener.describe()
    );
    while !stop_requested() && !device.withdrawn() {
        if !wait_for_client(listener.listener.as_raw_fd()).map_err(ServerError::Poll)? {
            continue;
        }
        let stream = match listener.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("accept failed: {e}");
                continue;
            }
        };
        ACTIVE.store(stream.as_raw_fd(), Ordering::SeqCst);
        if stop_requested() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        info!(device = device.name(), "client connected");
        Session::new(stream, device.as_mut(), limits.clone()).run();
        ACTIVE.store(-1, Ordering::SeqCst);
        info!(device = device.name(), "client left; device quiesced");
    }
    if device.withdrawn() {
        info!(
            device = device.name(),
            "the host asked for the device back (device request): serving no further client"
        );
    } else {
        info!("stop signal received, shutting down");
    }
    Ok(device)
}

#[cfg(test)]
mod tests;
