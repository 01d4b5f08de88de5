//! Live upgrade: SIGUSR2 to the supervisor (what `systemctl reload` sends)
//! replaces the running airlock with the binary at the path it was started
//! from, without closing what a client or the device depends on.
//!
//! The supervisor kills its sandboxed server as a crash would (no quiesce,
//! no reset) and execs that path with the same arguments, leaving open
//! (only for the exec: CLOEXEC is cleared on these fds and on nothing
//! else) the listening socket and, with --vfio, the container, group and
//! device fds and the handover table's memfd. AIRLOCK_UPGRADE names them;
//! the new airlock (the same pid, so systemd's MAINPID stays valid) takes
//! them instead of binding and opening, and its first server adopts the
//! device exactly as after a crash while a reconnecting client replays.
//! The socket path never disappears: clients that connect meanwhile wait
//! in the listen backlog.
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

use crate::config::Listen;
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
    /// The listening socket.
    pub listen: RawFd,
    /// --vfio: the device's fds and the handover table.
    pub vfio: Option<HandedVfio>,
    /// The path the first airlock was started from: later upgrades exec it
    /// again (a wrapper in between may have changed argv[0]).
    pub exe: PathBuf,
}

impl Handed {
    /// `pid=P,listen=L[,vfio=C:G:D:T],exe=PATH` (PATH last: it may hold commas).
    pub fn encode(&self, pid: u32) -> OsString {
        let mut s = format!("pid={pid},listen={}", self.listen);
        if let Some(v) = &self.vfio {
            s += &format!(",vfio={}:{}:{}:{}", v.container, v.group, v.device, v.table);
        }
        s += ",exe=";
        let mut b = s.into_bytes();
        b.extend_from_slice(self.exe.as_os_str().as_bytes());
        OsString::from_vec(b)
    }

    /// The inverse of `encode`; None when it is addressed to another
    /// process (inherited by something airlock did not exec itself).
    pub fn decode(value: &OsStr, pid: u32) -> Result<Option<Handed>, UpgradeError> {
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
        let fd = |v: &str| v.parse::<RawFd>().ok().filter(|f| *f > 2);
        let (mut for_pid, mut listen, mut vfio) = (None, None, None);
        for kv in head.split(',') {
            match kv.split_once('=') {
                Some(("pid", v)) => for_pid = Some(v.parse::<u32>().map_err(|_| bad("pid"))?),
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
        if for_pid.ok_or_else(|| bad("no pid="))? != pid {
            return Ok(None);
        }
        let handed = Handed {
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
        Ok(Some(handed))
    }

    /// Every fd handed over.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.listen];
        if let Some(h) = &self.vfio {
            v.extend([h.container, h.group, h.device, h.table]);
        }
        v
    }
}

/// Reads and removes AIRLOCK_UPGRADE (nothing airlock starts inherits
/// it); None when absent or addressed to another process.
pub fn take_from_env() -> Result<Option<Handed>, UpgradeError> {
    let Some(v) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    std::env::remove_var(ENV);
    Handed::decode(&v, std::process::id())
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

/// Takes what a predecessor handed over: the listening socket (resumed at
/// `listen`) and, with --vfio, the device's fds and mapping table. Without
/// a predecessor, opens the socket anew.
pub fn claim_handed(
    handed: Option<&Handed>,
    listen: &Listen,
) -> Result<(Listener, Option<HandedFds>), Box<dyn std::error::Error>> {
    let Some(h) = handed else {
        return Ok((Listener::open(listen)?, None));
    };
    let listener = Listener::resume(claim(h.listen, "listening socket")?, listen)?;
    let vfio = match h.vfio {
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

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments only.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn is_executable(p: &Path) -> io::Result<()> {
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

/// What SIGUSR2 execs: the binary at `exe` with this airlock's arguments,
/// handed `handed`'s fds.
pub struct Successor {
    exe: PathBuf,
    argv: Vec<OsString>,
    handed: Handed,
}

impl Successor {
    pub fn new(argv: Vec<OsString>, handed: Handed) -> Successor {
        Successor {
            exe: handed.exe.clone(),
            argv,
            handed,
        }
    }

    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Why the binary cannot be executed, checked before anything stops.
    pub fn check(&self) -> io::Result<()> {
        is_executable(&self.exe)
    }

    /// Replaces this process (same pid) with the successor; returns only
    /// if execve failed, with the handed fds CLOEXEC again.
    pub fn exec(&self) -> io::Error {
        let cstr = |s: &OsStr| {
            CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        };
        let mut env: Vec<OsString> = std::env::vars_os()
            .filter(|(k, _)| k != ENV)
            .map(|(k, v)| {
                let mut e = k;
                e.push("=");
                e.push(v);
                e
            })
            .collect();
        let mut mine = OsString::from(format!("{ENV}="));
        mine.push(self.handed.encode(std::process::id()));
        env.push(mine);
        let built = (|| -> io::Result<_> {
            let exe = cstr(self.exe.as_os_str())?;
            let argv = self
                .argv
                .iter()
                .map(|a| cstr(a))
                .collect::<io::Result<Vec<_>>>()?;
            let env = env
                .iter()
                .map(|e| cstr(e))
                .collect::<io::Result<Vec<_>>>()?;
            Ok((exe, argv, env))
        })();
        let (exe, argv, env) = match built {
            Ok(b) => b,
            Err(e) => return e,
        };
        let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_p.push(std::ptr::null());
        let mut env_p: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        env_p.push(std::ptr::null());
        let fds = self.handed.fds();
        for (i, &fd) in fds.iter().enumerate() {
            if let Err(e) = set_cloexec(fd, false) {
                for &f in &fds[..i] {
                    let _ = set_cloexec(f, true);
                }
                return e;
            }
        }
        // SAFETY: exe, argv and env are NUL-terminated strings kept alive
        // by the vectors above; both arrays end with a null pointer.
        unsafe { libc::execve(exe.as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
        let e = io::Error::last_os_error();
        for &fd in &fds {
            let _ = set_cloexec(fd, true);
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handed(vfio: bool) -> Handed {
        Handed {
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
            let v = h.encode(42);
            assert_eq!(Handed::decode(&v, 42).unwrap(), Some(h));
        }
    }

    #[test]
    fn a_handover_for_another_process_is_ignored() {
        let v = handed(true).encode(42);
        assert_eq!(Handed::decode(&v, 43).unwrap(), None);
    }

    #[test]
    fn malformed_handovers_are_errors_not_guesses() {
        for v in [
            "pid=1,listen=3",
            "pid=1,exe=/x",
            "pid=1,listen=1,exe=/x",
            "pid=1,listen=3,vfio=4:5:6,exe=/x",
            "pid=1,listen=3,vfio=3:5:6:7,exe=/x",
            "pid=x,listen=3,exe=/x",
            "pid=1,listen=3,color=red,exe=/x",
        ] {
            assert!(Handed::decode(OsStr::new(v), 1).is_err(), "{v}");
        }
    }

    #[test]
    fn a_handed_fd_that_is_not_open_is_named() {
        let e = claim(987_654, "listening socket").unwrap_err();
        assert!(e.to_string().contains("fd 987654"), "{e}");
    }
}
