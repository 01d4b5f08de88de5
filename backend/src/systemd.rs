//! systemd conventions, without linking libsystemd: socket activation
//! (LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES, sd_listen_fds(3)) and
//! readiness notification (NOTIFY_SOCKET, sd_notify(3)).

use std::os::fd::RawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use thiserror::Error;
use tracing::debug;

/// The first fd systemd passes (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SystemdError {
    #[error("socket activation passed {count} sockets ({names}); airlock serves one device on one socket: give the .socket unit one ListenStream=, or name one FileDescriptorName=airlock")]
    TooManySockets { count: usize, names: String },
    #[error("socket activation: LISTEN_FDS={0:?} is not a number")]
    BadCount(String),
}

/// The listening socket systemd passed us, if we were socket-activated:
/// LISTEN_PID names this process and LISTEN_FDS >= 1. With several fds,
/// the one named "airlock" (FileDescriptorName=) is taken. The variables
/// are removed so nothing airlock starts inherits them.
pub fn listen_fd() -> Result<Option<RawFd>, SystemdError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let count: usize = fds
        .trim()
        .parse()
        .map_err(|_| SystemdError::BadCount(fds.clone()))?;
    pick(count, &names)
}

/// Which of `count` passed fds to serve on, given LISTEN_FDNAMES.
fn pick(count: usize, names: &str) -> Result<Option<RawFd>, SystemdError> {
    match count {
        0 => Ok(None),
        1 => Ok(Some(LISTEN_FDS_START)),
        _ => names
            .split(':')
            .position(|n| n == "airlock")
            .filter(|i| *i < count)
            .map(|i| Some(LISTEN_FDS_START + i as RawFd))
            .ok_or(SystemdError::TooManySockets {
                count,
                names: names.to_string(),
            }),
    }
}

/// Sends `state` (e.g. "READY=1", "STOPPING=1", "STATUS=...") to the
/// service manager when NOTIFY_SOCKET is set; silently nothing otherwise.
pub fn notify(state: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let addr = match path.strip_prefix('@') {
        Some(abs) => SocketAddr::from_abstract_name(abs.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        debug!("sd_notify {state:?} to {path}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_passed_socket_is_fd_3() {
        assert_eq!(pick(1, ""), Ok(Some(3)));
        assert_eq!(pick(0, ""), Ok(None));
    }

    #[test]
    fn of_several_sockets_the_one_named_airlock_is_served() {
        assert_eq!(pick(2, "qmp:airlock"), Ok(Some(4)));
        assert!(matches!(
            pick(2, "a:b"),
            Err(SystemdError::TooManySockets { count: 2, .. })
        ));
    }
}
