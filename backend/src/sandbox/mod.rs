//! The per-device jail. airlock acquires everything first (socket, device,
//! eventfds), then confines itself, then serves:
//!
//! 1. `enter_pid_namespace`: fork; the child is PID 1 of a new pid
//!    namespace and becomes the server, the parent stays outside as a
//!    supervisor that forwards SIGTERM/SIGINT and removes the socket path.
//! 2. the child opens the socket and the device.
//! 3. `confine`: new mount, net, ipc and uts namespaces; an empty read-only
//!    root; rlimits; no capabilities; optionally another uid/gid;
//!    no_new_privs; a seccomp allowlist that kills on anything else.

mod privileges;
mod root;
pub mod seccomp;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use thiserror::Error;
use tracing::{error, info};

pub use privileges::Limits;
pub use seccomp::Profile;

#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("sandbox: {what} failed: {source}. The sandbox needs root (CAP_SYS_ADMIN) for its namespaces; pass --user UID:GID to serve as another user, or --sandbox off to debug without it")]
    Step {
        what: &'static str,
        source: io::Error,
    },
    #[error("sandbox: no directory to mount the empty root on (/tmp, /run, /mnt or /dev)")]
    NoMountPoint,
    #[error("sandbox: seccomp filter: {0}")]
    Seccomp(String),
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub profile: Profile,
    pub user: Option<(u32, u32)>,
    pub limits: Limits,
}

pub enum Role {
    /// We are the sandboxed server (PID 1 of the new pid namespace).
    Server,
    /// We are the supervisor; the server's exit code once it ends.
    Supervisor(i32),
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill has no memory arguments; async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Forks into a new pid namespace. In the supervisor this blocks until the
/// server ends, then removes `socket_path` (the server cannot: its root is
/// empty) and returns the exit code to use.
pub fn enter_pid_namespace(
    socket_path: impl FnOnce() -> Option<PathBuf>,
) -> Result<Role, SandboxError> {
    // SAFETY: unshare and fork take no pointers; only the main thread exists.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            return Err(SandboxError::Step {
                what: "creating a pid namespace",
                source: io::Error::last_os_error(),
            });
        }
    }
    // SAFETY: single-threaded here, so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SandboxError::Step {
            what: "fork into the pid namespace",
            source: io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        // The server dies with its supervisor.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        return Ok(Role::Server);
    }
    CHILD.store(pid, Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a handler that only calls kill.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    info!("sandbox: serving process is pid {pid} (host view), in its own pid namespace");
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into our local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid || (r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted) {
            break;
        }
    }
    if let Some(p) = socket_path() {
        let _ = std::fs::remove_file(p);
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        let sig = libc::WTERMSIG(status);
        if sig == libc::SIGSYS {
            error!("the sandboxed server (pid {pid}) was killed by seccomp (SIGSYS): it made a system call outside its allowlist; this is a bug or an attack; --sandbox off shows which call");
        } else {
            error!("the sandboxed server (pid {pid}) was killed by signal {sig}");
        }
        128 + sig
    };
    Ok(Role::Supervisor(code))
}

/// Confines the server after setup and before it serves anyone.
pub fn confine(policy: &Policy) -> Result<(), SandboxError> {
    // SAFETY: unshare takes flags only.
    if unsafe {
        libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
        )
    } != 0
    {
        return Err(SandboxError::Step {
            what: "creating mount/net/ipc/uts namespaces",
            source: io::Error::last_os_error(),
        });
    }
    root::enter_empty_root()?;
    privileges::set_rlimits(policy.limits)?;
    privileges::drop_bounding_set()?;
    if let Some((uid, gid)) = policy.user {
        privileges::become_user(uid, gid)?;
    }
    privileges::drop_capabilities()?;
    privileges::no_new_privs()?;
    seccomp::apply(policy.profile)?;
    let (syscalls, ioctls) = seccomp::counts(policy.profile);
    let memlock = if policy.limits.memlock == u64::MAX {
        "unlimited".to_string()
    } else {
        policy.limits.memlock.to_string()
    };
    info!(
        "sandbox on: pid/mnt/net/ipc/uts namespaces, empty read-only root, no capabilities{}, no_new_privs, rlimits nofile={} nproc=0 memlock={}, seccomp allowlist {:?}: {} syscalls, {} ioctls",
        policy.user.map(|(u, g)| format!(", uid {u} gid {g}")).unwrap_or_default(),
        policy.limits.nofile,
        memlock,
        policy.profile,
        syscalls,
        ioctls
    );
    Ok(())
}
