//! The per-device jail: confinement only. airlock acquires everything
//! first (socket, device, eventfds), then confines itself, then serves:
//!
//! 1. the supervisor (lifecycle/supervisor.rs) opens the socket and starts
//!    each server as PID 1 of a new pid namespace, outside the jail.
//! 2. the server makes the emulated device; with --vfio the supervisor
//!    opened the device before the first server and each server inherits
//!    it (so the device outlives a server).
//! 3. `confine`: new mount, net, ipc and uts namespaces; an empty read-only
//!    root; rlimits; no capabilities; optionally another uid/gid;
//!    no_new_privs; a seccomp allowlist that traps anything else (the
//!    server reports the call and exits; see violation.rs).

mod privileges;
mod root;
pub mod seccomp;
pub mod violation;

use std::io;

use thiserror::Error;
use tracing::info;

pub use privileges::Limits;
pub use seccomp::Profile;
pub use violation::SharedRecord;

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

/// Confines the server after setup and before it serves anyone; a
/// seccomp violation is then recorded in `record`, the page the supervisor
/// shares with the server.
pub fn confine(policy: &Policy, record: &SharedRecord) -> Result<(), SandboxError> {
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
    record
        .install_handler()
        .map_err(|source| SandboxError::Step {
            what: "installing the SIGSYS reporter",
            source,
        })?;
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
