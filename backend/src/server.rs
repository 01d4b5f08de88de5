//! The listening socket and the accept loop: one client at a time, each
//! served on its own thread with blocking reads; between clients the device
//! is quiesced. SIGTERM/SIGINT end the loop cleanly and remove the socket.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::{info, warn};

use crate::config::Listen;
use crate::device::Device;
use crate::negotiate::ServerLimits;
use crate::session::Session;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(
        "{path}: exists and is not a socket; refusing to remove it (pick another --socket-path)"
    )]
    NotASocket { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("--fd {fd} is not a listening unix socket: {why}")]
    BadFd { fd: RawFd, why: String },
    #[error("signal setup failed: {0}")]
    Signals(io::Error),
    #[error("accept failed: {0}")]
    Accept(io::Error),
}

/// A listening socket; removes its path on drop when airlock created it.
pub struct Listener {
    listener: UnixListener,
    path: Option<PathBuf>,
}

impl Listener {
    pub fn open(listen: &Listen) -> Result<Listener, ServerError> {
        match listen {
            Listen::Path(p) => Self::bind(p),
            Listen::Fd(fd) => Self::inherit(*fd),
        }
    }

    fn bind(path: &Path) -> Result<Listener, ServerError> {
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
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Ok(Listener {
            listener,
            path: Some(path.into()),
        })
    }

    fn inherit(fd: RawFd) -> Result<Listener, ServerError> {
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
        // SAFETY: the launcher handed this fd to us; from here we own it.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        Ok(Listener {
            listener,
            path: None,
        })
    }

    pub fn local(listener: UnixListener) -> Listener {
        Listener {
            listener,
            path: None,
        }
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
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// SIGTERM/SIGINT as a readable fd: blocked for every thread, read here.
pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    pub fn install() -> Result<Signals, ServerError> {
        // SAFETY: sigset operations write only into `set`, which we own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            // Blocked before any thread is spawned, so all threads inherit it.
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(ServerError::Signals(io::Error::last_os_error()));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(ServerError::Signals(io::Error::last_os_error()));
            }
            Ok(Signals {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }
}

/// Waits until one of `fds` is readable; returns their readiness.
fn wait_readable(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: p is a live array of p.len() pollfds.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(p.iter().map(|x| x.revents != 0).collect());
    }
}

/// Serves clients one after another until a signal arrives (or, with
/// `signals` None, forever). Returns the device for reuse by the caller.
pub fn serve(
    listener: &Listener,
    mut device: Box<dyn Device>,
    limits: ServerLimits,
    signals: Option<&Signals>,
) -> Result<Box<dyn Device>, ServerError> {
    let sigfd = signals.map(|s| s.fd.as_raw_fd());
    info!(
        device = device.name(),
        "listening on {}",
        listener.describe()
    );
    loop {
        let mut watch = vec![listener.listener.as_raw_fd()];
        watch.extend(sigfd);
        let ready = wait_readable(&watch).map_err(ServerError::Accept)?;
        if ready.get(1).copied().unwrap_or(false) {
            info!("signal received, shutting down");
            return Ok(device);
        }
        let stream = match listener.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("accept failed: {e}");
                continue;
            }
        };
        info!(device = device.name(), "client connected");
        let (dev, stopped) = serve_one(stream, device, limits, sigfd)?;
        device = dev;
        info!(device = device.name(), "client left; device quiesced");
        if stopped {
            info!("signal received, shutting down");
            return Ok(device);
        }
    }
}

/// Runs one session on its own thread; a signal meanwhile shuts the
/// connection so the session ends (and quiesces) before we return.
fn serve_one(
    stream: UnixStream,
    device: Box<dyn Device>,
    limits: ServerLimits,
    sigfd: Option<RawFd>,
) -> Result<(Box<dyn Device>, bool), ServerError> {
    let control = stream.try_clone().map_err(ServerError::Accept)?;
    let done = crate::irq::eventfd().map_err(ServerError::Accept)?;
    let done_w = done.try_clone().map_err(ServerError::Accept)?;
    let worker = std::thread::Builder::new()
        .name("airlock-session".into())
        .spawn(move || {
            let mut device = device;
            Session::new(stream, device.as_mut(), limits).run();
            let _ = io::Write::write(&mut std::fs::File::from(done_w), &1u64.to_ne_bytes());
            device
        })
        .map_err(ServerError::Accept)?;
    let mut watch = vec![done.as_fd().as_raw_fd()];
    watch.extend(sigfd);
    let ready = wait_readable(&watch).map_err(ServerError::Accept)?;
    let stopped = ready.get(1).copied().unwrap_or(false) && !ready[0];
    if stopped {
        let _ = control.shutdown(std::net::Shutdown::Both);
    }
    let device = worker.join().unwrap_or_else(|_| {
        // A panicking session is a bug; the device state is unknown.
        std::process::abort()
    });
    Ok((device, stopped))
}
