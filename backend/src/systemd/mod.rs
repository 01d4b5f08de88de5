//! systemd conventions, without linking libsystemd: socket activation
//! (LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES, sd_listen_fds(3)), readiness
//! notification (NOTIFY_SOCKET, sd_notify(3)) and the fd store (fdstore.rs).

pub mod fdstore;

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

/// What systemd passed at start: the listening socket (socket activation)
/// and what an earlier airlock of this service left in its fd store.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Passed {
    pub listen: Option<RawFd>,
    /// (FDNAME, fd) of each fd-store entry airlock knows (fdstore::NAMES).
    pub stored: Vec<(String, RawFd)>,
}

/// What systemd passed us, if LISTEN_PID names this process and LISTEN_FDS
/// is at least 1. The fd-store entries are told apart by name; of the rest,
/// the one socket, or the one named "airlock" (FileDescriptorName=), is
/// served. The variables are removed so nothing airlock starts inherits them.
pub fn passed() -> Result<Passed, SystemdError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Passed::default());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Passed::default());
    }
    let count: usize = fds
        .trim()
        .parse()
        .map_err(|_| SystemdError::BadCount(fds.clone()))?;
    pick(count, &names)
}

/// Sorts `count` passed fds by LISTEN_FDNAMES.
fn pick(count: usize, names: &str) -> Result<Passed, SystemdError> {
    let names: Vec<&str> = names.split(':').collect();
    let mut passed = Passed::default();
    let mut sockets = Vec::new();
    for i in 0..count {
        let fd = LISTEN_FDS_START + i as RawFd;
        match names.get(i) {
            Some(n) if fdstore::NAMES.contains(n) => passed.stored.push((n.to_string(), fd)),
            n => sockets.push((n.copied().unwrap_or(""), fd)),
        }
    }
    passed.listen = match sockets[..] {
        [] => None,
        [(_, fd)] => Some(fd),
        _ => Some(
            sockets
                .iter()
                .find(|(n, _)| *n == "airlock")
                .map(|(_, fd)| *fd)
                .ok_or(SystemdError::TooManySockets {
                    count: sockets.len(),
                    names: names.join(":"),
                })?,
        ),
    };
    Ok(passed)
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

    fn listen(count: usize, names: &str) -> Result<Option<RawFd>, SystemdError> {
        pick(count, names).map(|p| p.listen)
    }

    #[test]
    fn one_passed_socket_is_fd_3() {
        assert_eq!(listen(1, ""), Ok(Some(3)));
        assert_eq!(listen(0, ""), Ok(None));
    }

    #[test]
    fn of_several_sockets_the_one_named_airlock_is_served() {
        assert_eq!(listen(2, "qmp:airlock"), Ok(Some(4)));
        assert!(matches!(
            listen(2, "a:b"),
            Err(SystemdError::TooManySockets { count: 2, .. })
        ));
    }

    #[test]
    fn fd_store_entries_are_told_apart_from_the_socket_by_name() {
        let p = pick(
            5,
            "airlock:vfio-container:vfio-group:vfio-device:vfio-table",
        )
        .unwrap();
        assert_eq!(p.listen, Some(3));
        assert_eq!(
            p.stored,
            [
                ("vfio-container".into(), 4),
                ("vfio-group".into(), 5),
                ("vfio-device".into(), 6),
                ("vfio-table".into(), 7)
            ]
        );
        // Without socket activation (--socket-path), only the store.
        let p = pick(2, "vfio-device:vfio-table").unwrap();
        assert_eq!(p.listen, None);
        assert_eq!(p.stored.len(), 2);
    }
}
