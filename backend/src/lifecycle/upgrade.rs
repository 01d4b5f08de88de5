//! Live upgrade, the handover itself: what one airlock hands its successor
//! (AIRLOCK_UPGRADE names the fds), and the successor claiming it.
//!
//! SIGUSR2 to the supervisor (what `systemctl reload` sends) starts the
//! binary at the path airlock was started from as a child (successor.rs),
//! with the same arguments and these fds left open for its exec only: the
//! listening socket, the control channel (ctl.rs) and, with --vfio, the
//! container, group and device fds and the handover table's memfd. The
//! successor takes them instead of binding and opening; the old airlock
//! keeps its own copies until the successor serves, so a successor that
//! fails leaves nothing lost.
//!
//! The path is resolved when airlock starts (argv[0], searched on PATH
//! as the shell did), not /proc/self/exe: that is the old inode, and the
//! point is to run what an upgrade (`cargo install`, a package) put there.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::ctl::{Ctl, HANDOVER_VERSION};
use crate::config::{Listen, SocketAccess};
use crate::device::vfio::{HandedVfio, VfioFds};
use crate::server::Listener;

/// Names the handed-over fds in the successor's environment.
pub const ENV: &str = "AIRLOCK_UPGRADE";

#[derive(Debug, Error)]
pub enum UpgradeError {
    #[error(
        "{ENV}={value:?} from the previous airlock is malformed ({why}); start airlock without it"
    )]
    Malformed { value: String, why: &'static str },
    #[error("{ENV}: the previous airlock speaks handover version {got}, this airlock {HANDOVER_VERSION}: it cannot take over from that version; it refuses, and the running airlock carries on")]
    Version { got: String },
    #[error("{ENV}: the control channel (fd {fd}) was not made by pid {owner} as the handover says ({why}); refusing fds of unknown origin")]
    Stranger { fd: RawFd, owner: u32, why: String },
    #[error("{ENV}: the previous airlock handed over fd {fd} as the {what}, but it is not open here ({source}); a wrapper between the two binaries may close fds: exec airlock directly")]
    NotOpen {
        fd: RawFd,
        what: &'static str,
        source: io::Error,
    },
}

/// What one airlock hands its successor across execve, as fd numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handed {
    /// The pid that made the control channel (its SO_PEERCRED).
    pub owner: u32,
    /// The successor's end of the control channel.
    pub ctl: RawFd,
    /// The listening socket.
    pub listen: RawFd,
    /// --vfio: the device's fds and the handover table.
    pub vfio: Option<HandedVfio>,
    /// The path the first airlock was started from: later upgrades exec it
    /// again (a wrapper in between may have changed argv[0]).
    pub exe: PathBuf,
}

impl Handed {
    /// `version=V,owner=P,ctl=C,listen=L[,vfio=C:G:D:T],exe=PATH` (version
    /// first, so any other version is recognised as such; PATH last: it may
    /// hold commas).
    pub fn encode(&self) -> OsString {
        let mut s = format!(
            "version={HANDOVER_VERSION},owner={},ctl={},listen={}",
            self.owner, self.ctl, self.listen
        );
        if let Some(v) = &self.vfio {
            s += &format!(",vfio={}:{}:{}:{}", v.container, v.group, v.device, v.table);
        }
        s += ",exe=";
        let mut b = s.into_bytes();
        b.extend_from_slice(self.exe.as_os_str().as_bytes());
        OsString::from_vec(b)
    }

    /// The inverse of `encode`, for this version of the handover only.
    pub fn decode(value: &OsStr) -> Result<Handed, UpgradeError> {
        let bad = |why| UpgradeError::Malformed {
            value: value.to_string_lossy().into_owned(),
            why,
        };
        let bytes = value.as_bytes();
        let split = bytes
            .windows(5)
            .position(|w| w == b",exe=")
            .ok_or_else(|| bad("no exe="))?;
        let exe = PathBuf::from(OsStr::from_bytes(&bytes[split + 5..]));
        let head = std::str::from_utf8(&bytes[..split]).map_err(|_| bad("not ASCII"))?;
        let version = head
            .strip_prefix("version=")
            .and_then(|v| v.split(',').next())
            .ok_or_else(|| bad("no version= first (an older airlock's handover)"))?;
        if version != HANDOVER_VERSION.to_string() {
            return Err(UpgradeError::Version {
                got: version.chars().take(20).collect(),
            });
        }
        let fd = |v: &str| v.parse::<RawFd>().ok().filter(|f| *f > 2);
        let (mut owner, mut ctl, mut listen, mut vfio) = (None, None, None, None);
        for kv in head.split(',').skip(1) {
            match kv.split_once('=') {
                Some(("owner", v)) => owner = Some(v.parse::<u32>().map_err(|_| bad("owner"))?),
                Some(("ctl", v)) => ctl = Some(fd(v).ok_or_else(|| bad("ctl"))?),
                Some(("listen", v)) => listen = Some(fd(v).ok_or_else(|| bad("listen"))?),
                Some(("vfio", v)) => {
                    let n: Vec<RawFd> = v.split(':').filter_map(fd).collect();
                    let [container, group, device, table] = n[..] else {
                        return Err(bad("vfio needs four fds"));
                    };
                    vfio = Some(HandedVfio {
                        container,
                        group,
                        device,
                        table,
                    });
                }
                _ => return Err(bad("unknown field")),
            }
        }
        let handed = Handed {
            owner: owner.ok_or_else(|| bad("no owner="))?,
            ctl: ctl.ok_or_else(|| bad("no ctl="))?,
            listen: listen.ok_or_else(|| bad("no listen="))?,
            vfio,
            exe,
        };
        let mut all = handed.fds();
        all.sort_unstable();
        all.dedup();
        if all.len() != handed.fds().len() {
            return Err(bad("an fd is named twice"));
        }
        Ok(handed)
    }

    /// Every fd handed over.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.ctl, self.listen];
        if let Some(h) = &self.vfio {
            v.extend([h.container, h.group, h.device, h.table]);
        }
        v
    }
}

/// Reads and removes AIRLOCK_UPGRADE (nothing airlock starts inherits
/// it); None when absent.
pub fn take_from_env() -> Result<Option<Handed>, UpgradeError> {
    let Some(v) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    std::env::remove_var(ENV);
    Handed::decode(&v).map(Some)
}

/// Takes ownership of a handed fd: it must be open; CLOEXEC is set again
/// (it was cleared only for the exec).
pub fn claim(fd: RawFd, what: &'static str) -> Result<OwnedFd, UpgradeError> {
    set_cloexec(fd, true).map_err(|source| UpgradeError::NotOpen { fd, what, source })?;
    // SAFETY: the fd is open (F_SETFD succeeded) and was handed to this
    // process to own; `decode` refused a number named twice.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The VFIO device's fds and the table of its IOMMU mappings, as a
/// predecessor handed them over.
pub type HandedFds = (VfioFds, OwnedFd);

/// Takes the control channel to the predecessor, checked to be the one
/// the predecessor made.
pub fn claim_ctl(h: &Handed) -> Result<Ctl, UpgradeError> {
    let ctl = Ctl::from_fd(claim(h.ctl, "control channel")?);
    match ctl.creator() {
        Ok(pid) if pid == h.owner => Ok(ctl),
        Ok(pid) => Err(UpgradeError::Stranger {
            fd: h.ctl,
            owner: h.owner,
            why: format!("it was made by pid {pid}"),
        }),
        Err(e) => Err(UpgradeError::Stranger {
            fd: h.ctl,
            owner: h.owner,
            why: e.to_string(),
        }),
    }
}

/// Takes what a predecessor handed over: the listening socket (resumed at
/// `listen`; its path stays the predecessor's until it lets go) and, with
/// --vfio, the device's fds and mapping table (or `restored`: the same
/// from systemd's fd store). Without a predecessor, opens the socket anew.
pub fn claim_handed(
    handed: Option<&Handed>,
    restored: Option<HandedVfio>,
    listen: &Listen,
    access: &SocketAccess,
) -> Result<(Listener, Option<HandedFds>), Box<dyn std::error::Error>> {
    let listener = match handed {
        Some(h) => Listener::resume(claim(h.listen, "listening socket")?, listen)?,
        None => Listener::open(listen, access)?,
    };
    let vfio = match handed.and_then(|h| h.vfio).or(restored) {
        Some(v) => Some((
            VfioFds {
                device: claim(v.device, "VFIO device fd")?,
                group: claim(v.group, "VFIO group fd")?,
                container: claim(v.container, "VFIO container fd")?,
            },
            claim(v.table, "table of IOMMU mappings")?,
        )),
        None => None,
    };
    Ok((listener, vfio))
}

pub(super) fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments only.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn is_executable(p: &Path) -> io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if !std::fs::metadata(p)?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    // SAFETY: c is NUL-terminated.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The path this airlock was started from, absolute (not resolving
/// symlinks: a link an upgrade re-points is followed at the exec).
pub fn started_from() -> Option<PathBuf> {
    let argv0 = PathBuf::from(std::env::args_os().next()?);
    if argv0.as_os_str().as_bytes().contains(&b'/') {
        return std::path::absolute(&argv0).ok();
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(&argv0))
        .find(|c| is_executable(c).is_ok())
        .and_then(|c| std::path::absolute(c).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handed(vfio: bool) -> Handed {
        Handed {
            owner: 42,
            ctl: 8,
            listen: 3,
            vfio: vfio.then_some(HandedVfio {
                container: 4,
                group: 5,
                device: 6,
                table: 7,
            }),
            exe: PathBuf::from("/opt/air,lock/bin/airlock"),
        }
    }

    #[test]
    fn the_successor_reads_what_its_predecessor_wrote() {
        for vfio in [false, true] {
            let h = handed(vfio);
            assert_eq!(Handed::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn another_version_of_the_handover_is_refused_by_name() {
        let v = handed(false).encode().into_string().unwrap();
        let other = v.replace("version=2", "version=3");
        let e = Handed::decode(OsStr::new(&other)).unwrap_err();
        assert!(
            matches!(e, UpgradeError::Version { ref got } if got == "3"),
            "{e}"
        );
        // The first airlocks' handover had no version.
        let e = Handed::decode(OsStr::new("pid=1,listen=3,exe=/x")).unwrap_err();
        assert!(e.to_string().contains("no version="), "{e}");
    }

    #[test]
    fn malformed_handovers_are_errors_not_guesses() {
        for v in [
            "version=2,owner=1,ctl=8,listen=3",
            "version=2,owner=1,ctl=8,exe=/x",
            "version=2,ctl=8,listen=3,exe=/x",
            "version=2,owner=1,listen=3,exe=/x",
            "version=2,owner=1,ctl=8,listen=1,exe=/x",
            "version=2,owner=1,ctl=8,listen=3,vfio=4:5:6,exe=/x",
            "version=2,owner=1,ctl=8,listen=3,vfio=3:5:6:7,exe=/x",
            "version=2,owner=1,ctl=3,listen=3,exe=/x",
            "version=2,owner=x,ctl=8,listen=3,exe=/x",
            "version=2,owner=1,ctl=8,listen=3,color=red,exe=/x",
        ] {
            assert!(Handed::decode(OsStr::new(v)).is_err(), "{v}");
        }
    }

    #[test]
    fn a_handed_fd_that_is_not_open_is_named() {
        let e = claim(987_654, "listening socket").unwrap_err();
        assert!(e.to_string().contains("fd 987654"), "{e}");
    }

    #[test]
    fn a_control_channel_made_by_another_process_is_refused() {
        let (_mine, theirs) = Ctl::pair().unwrap();
        let h = Handed {
            owner: std::process::id() + 1,
            ctl: std::os::fd::IntoRawFd::into_raw_fd(theirs),
            ..handed(false)
        };
        let e = claim_ctl(&h).unwrap_err();
        assert!(matches!(e, UpgradeError::Stranger { .. }), "{e}");
    }
}
