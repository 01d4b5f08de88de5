//! The old airlock's side of a live upgrade, in two phases (as nginx,
//! HAProxy and Envoy upgrade): the new binary runs beside the old one, and
//! the old lets go only once the new one has shown it serves.
//!
//! 1. The successor starts as a child of the supervisor, handed the
//!    listening socket, the device's fds and a control channel (ctl.rs).
//!    The old server keeps serving meanwhile. The successor must say
//!    `hello` in this handover's version within HELLO_WAIT.
//! 2. The old server is stopped as a crash would stop it (no quiesce, no
//!    reset) and the successor is told `go`: its first server adopts the
//!    device. It must say `serving` within SERVING_WAIT, and then keep
//!    running through PROBATION.
//! 3. Commit: systemd is told the new main pid (MAINPID=), the successor
//!    `commit`, and the old airlock exits without touching the device.
//!
//! If the successor fails at any step (it exits, crashes, hangs, refuses,
//! says something that is not this handover, or a stop signal arrives),
//! it and everything it started are killed, the socket path is put back if
//! it replaced it, and the old airlock serves again: its own server if it
//! still runs, else a fresh one that adopts the device as after a crash.
//! The old airlock never closed anything, so the device was never closed
//! or reset.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::ctl::{Ctl, Heard, Msg, HANDOVER_VERSION};
use super::upgrade::{is_executable, Handed, ENV};
use crate::device::vfio::HandedVfio;

/// How long the successor may take to start and say hello (the old server
/// serves meanwhile).
pub const HELLO_WAIT: Duration = Duration::from_secs(10);
/// How long the successor's first server may take to serve once the old
/// one is stopped (clients wait in the backlog meanwhile).
pub const SERVING_WAIT: Duration = Duration::from_secs(5);
/// How long the successor must keep running once it serves before the old
/// airlock lets go: a successor that crashes right after starting is
/// caught here.
pub const PROBATION: Duration = Duration::from_secs(2);

/// What SIGUSR2 starts: the binary at `exe` with this airlock's arguments,
/// handed the listening socket and, with --vfio, the device.
pub struct Successor {
    exe: PathBuf,
    argv: Vec<OsString>,
    listen: RawFd,
    vfio: Option<HandedVfio>,
    /// --socket-path: kept linked under another name during the upgrade,
    /// so it can be put back if a successor replaced it.
    socket_path: Option<PathBuf>,
}

/// A started successor: its pid, a pidfd to wait on, and our end of the
/// control channel.
pub struct Candidate {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub ctl: Ctl,
}

impl Successor {
    pub fn new(
        exe: PathBuf,
        argv: Vec<OsString>,
        listen: RawFd,
        vfio: Option<HandedVfio>,
        socket_path: Option<PathBuf>,
    ) -> Successor {
        Successor {
            exe,
            argv,
            listen,
            vfio,
            socket_path,
        }
    }

    pub fn exe(&self) -> &Path {
        &self.exe
    }

    pub fn socket_path(&self) -> Option<&Path> {
        self.socket_path.as_deref()
    }

    /// Why the binary cannot be executed, checked before anything starts.
    pub fn check(&self) -> io::Result<()> {
        is_executable(&self.exe)
    }

    /// Starts the successor as a child. It dies with this process until it
    /// says otherwise (PDEATHSIG), so an old airlock that dies mid-upgrade
    /// leaves no stranger holding the device.
    pub fn spawn(&self) -> io::Result<Candidate> {
        let (ctl, theirs) = Ctl::pair()?;
        let handed = Handed {
            owner: std::process::id(),
            ctl: theirs.as_raw_fd(),
            listen: self.listen,
            vfio: self.vfio,
            exe: self.exe.clone(),
        };
        let exec = Exec::new(&self.exe, &self.argv, &handed)?;
        let fds = handed.fds();
        // SAFETY: the supervisor is single-threaded, so the child may run
        // any code; it runs only async-signal-safe calls before execve.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            exec.run_child(&fds, theirs.as_raw_fd());
        }
        drop(theirs);
        let pidfd = pidfd(pid).inspect_err(|_| kill_tree(pid))?;
        Ok(Candidate { pid, pidfd, ctl })
    }
}

/// Everything execve needs, built before fork (the child allocates nothing).
struct Exec {
    exe: CString,
    _argv: Vec<CString>,
    _env: Vec<CString>,
    argv_p: Vec<*const libc::c_char>,
    env_p: Vec<*const libc::c_char>,
}

impl Exec {
    fn new(exe: &Path, argv: &[OsString], handed: &Handed) -> io::Result<Exec> {
        let cstr = |s: &OsStr| {
            CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        };
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != ENV)
            .map(|(k, v)| {
                let mut e = k;
                e.push("=");
                e.push(v);
                cstr(&e)
            })
            .collect::<io::Result<_>>()?;
        let mut mine = OsString::from(format!("{ENV}="));
        mine.push(handed.encode());
        env.push(cstr(&mine)?);
        let argv: Vec<CString> = argv.iter().map(|a| cstr(a)).collect::<io::Result<_>>()?;
        let nul = |v: &[CString]| {
            let mut p: Vec<*const libc::c_char> = v.iter().map(|c| c.as_ptr()).collect();
            p.push(std::ptr::null());
            p
        };
        Ok(Exec {
            exe: cstr(exe.as_os_str())?,
            argv_p: nul(&argv),
            env_p: nul(&env),
            _argv: argv,
            _env: env,
        })
    }

    /// In the forked child: leave the handed fds open for the exec, exec;
    /// if that fails, tell the parent the errno and exit 127.
    fn run_child(&self, fds: &[RawFd], ctl: RawFd) -> ! {
        // SAFETY: only async-signal-safe calls with integer arguments or
        // the pointers built before fork, which stay valid in the child.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            for &fd in fds {
                libc::fcntl(fd, libc::F_SETFD, 0);
            }
            libc::execve(self.exe.as_ptr(), self.argv_p.as_ptr(), self.env_p.as_ptr());
            let errno = *libc::__errno_location();
            let mut b = *b"refuse exec 000";
            b[12] = b'0' + (errno / 100 % 10) as u8;
            b[13] = b'0' + (errno / 10 % 10) as u8;
            b[14] = b'0' + (errno % 10) as u8;
            libc::send(ctl, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL);
            libc::_exit(127)
        }
    }
}

/// "exec NNN" from a child whose execve failed, as the OS error.
pub fn exec_failure(why: &str) -> Option<io::Error> {
    let n = why.strip_prefix("exec ")?.parse::<i32>().ok()?;
    Some(io::Error::from_raw_os_error(n))
}

/// Whether `pid` is `ancestor` or runs under it (a wrapper script may
/// start airlock as its child).
pub fn descends_from(pid: u32, ancestor: i32) -> bool {
    let mut p = pid as i32;
    for _ in 0..16 {
        if p == ancestor {
            return true;
        }
        if p <= 1 {
            return false;
        }
        p = parent_of(p).unwrap_or(0);
    }
    false
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The field after the command (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

fn children_of(pid: i32) -> Vec<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Kills `pid` (a child of this process) and everything it started, and
/// waits until they are gone: a successor's server must not touch the
/// device once the old airlock serves it again.
pub fn kill_tree(pid: i32) {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() && all.len() < 256 {
        let more = children_of(all[i]);
        all.extend(more);
        i += 1;
    }
    // Stop them all first (none can start another), then kill.
    for &p in &all {
        // SAFETY: kill has no memory arguments.
        unsafe { libc::kill(p, libc::SIGSTOP) };
    }
    let late = children_of_all(&all);
    all.extend(late);
    let pidfds: Vec<OwnedFd> = all.iter().filter_map(|&p| pidfd(p).ok()).collect();
    for &p in &all {
        // SAFETY: kill has no memory arguments.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: waitpid writes the status into our local.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let until = Instant::now() + Duration::from_secs(5);
    for fd in &pidfds {
        let left = until.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, left.as_millis() as libc::c_int) };
    }
}

/// Children started between the listing and the SIGSTOP.
fn children_of_all(pids: &[i32]) -> Vec<i32> {
    pids.iter()
        .flat_map(|&p| children_of(p))
        .filter(|c| !pids.contains(c))
        .collect()
}

/// A pidfd of `pid`, to wait on its end (for any process, not only a child).
pub(super) fn pidfd(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The socket path kept under a second name while a successor starts: a
/// successor that is not a handover-speaking airlock may bind the path
/// anew, and the old airlock must be reachable there again if it fails.
pub struct KeptPath {
    path: PathBuf,
    keep: PathBuf,
}

impl KeptPath {
    pub fn keep(path: &Path) -> io::Result<KeptPath> {
        let keep = path.with_file_name(format!(
            ".{}.{}.keep",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&keep);
        std::fs::hard_link(path, &keep)?;
        Ok(KeptPath {
            path: path.into(),
            keep,
        })
    }

    /// The upgrade failed: the path names this airlock's socket again.
    /// Returns whether it had been replaced.
    pub fn restore(self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let same = match (std::fs::metadata(&self.path), std::fs::metadata(&self.keep)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            let _ = std::fs::remove_file(&self.keep);
            return false;
        }
        let _ = std::fs::rename(&self.keep, &self.path);
        true
    }

    /// The upgrade committed: the second name goes.
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.keep);
    }
}

/// The successor's hello, checked: this version, from it or its descendant.
pub fn check_hello(heard: Heard, cand: &Candidate) -> Result<u32, String> {
    match heard {
        Heard::Msg(Msg::Hello { version, pid }) if version == HANDOVER_VERSION => {
            if descends_from(pid, cand.pid) {
                Ok(pid)
            } else {
                Err(format!(
                    "it said hello as pid {pid}, which it did not start"
                ))
            }
        }
        Heard::Msg(Msg::Hello { version, .. }) => Err(format!(
            "it speaks handover version {version}, this airlock {HANDOVER_VERSION}"
        )),
        other => Err(unexpected(other, "hello")),
    }
}

/// Why a message other than `want` fails the upgrade.
pub fn unexpected(heard: Heard, want: &str) -> String {
    match heard {
        Heard::Msg(Msg::Refuse(why)) => match exec_failure(&why) {
            Some(e) => format!("it cannot be executed: {e}"),
            None => format!("it refused: {why}"),
        },
        Heard::Msg(m) => format!("it said {m:?} where {want} was due"),
        Heard::Garbage => {
            format!("it said something that is not airlock's handover (an older airlock or another program?) where {want} was due")
        }
        Heard::Closed => format!("it closed the handover channel before {want}"),
        Heard::TimedOut => format!("no {want} in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_exec_is_reported_with_its_errno() {
        let e = exec_failure("exec 008").unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOEXEC));
        assert!(exec_failure("exec").is_none());
        assert!(exec_failure("the table is not a memfd").is_none());
    }

    #[test]
    fn this_process_descends_from_itself_and_its_parent_not_from_a_stranger() {
        let me = std::process::id();
        assert!(descends_from(me, me as i32));
        assert!(descends_from(me, parent_of(me as i32).unwrap()));
        assert!(!descends_from(1, me as i32));
    }

    #[test]
    fn a_kept_path_is_put_back_only_when_it_was_replaced() {
        let dir = std::env::temp_dir().join(format!("airlock-kept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        std::fs::write(&path, "mine").unwrap();
        let k = KeptPath::keep(&path).unwrap();
        assert!(!k.restore(), "not replaced");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mine");
        let k = KeptPath::keep(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "theirs").unwrap();
        assert!(k.restore(), "replaced");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mine");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no second name left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
