//! Capabilities, identity, no_new_privs and rlimits.

use std::io;

use super::SandboxError;

fn check(r: libc::c_int, what: &'static str) -> Result<(), SandboxError> {
    if r != 0 {
        return Err(SandboxError::Step {
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub nofile: u64,
    pub memlock: u64,
}

pub fn set_rlimits(l: Limits) -> Result<(), SandboxError> {
    let set = |res, v: u64, what| {
        let r = libc::rlimit {
            rlim_cur: v as libc::rlim_t,
            rlim_max: v as libc::rlim_t,
        };
        // SAFETY: setrlimit reads one rlimit we own.
        check(unsafe { libc::setrlimit(res, &r) }, what)
    };
    set(libc::RLIMIT_NOFILE, l.nofile, "RLIMIT_NOFILE")?;
    // No new processes (root is exempt from NPROC; seccomp forbids clone).
    set(libc::RLIMIT_NPROC, 0, "RLIMIT_NPROC")?;
    set(libc::RLIMIT_MEMLOCK, l.memlock, "RLIMIT_MEMLOCK")?;
    set(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    Ok(())
}

/// Empties the bounding set (needs CAP_SETPCAP, so it comes first).
pub fn drop_bounding_set() -> Result<(), SandboxError> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(SandboxError::Step {
                what: "dropping the capability bounding set",
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Leaves root for `uid:gid` (supplementary groups cleared).
pub fn become_user(uid: u32, gid: u32) -> Result<(), SandboxError> {
    // SAFETY: identity syscalls with integer arguments; setgroups gets an
    // empty list.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(gid, gid, gid), "setresgid")?;
        check(libc::setresuid(uid, uid, uid), "setresuid")?;
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Clears the effective, permitted, inheritable and ambient sets.
pub fn drop_capabilities() -> Result<(), SandboxError> {
    let mut h = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let d = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs we own.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) };
    check(rc as libc::c_int, "capset")?;
    check(
        // SAFETY: prctl with integer arguments only.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        },
        "clearing ambient capabilities",
    )?;
    Ok(())
}

pub fn no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: prctl with integer arguments only.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "no_new_privs",
    )
}
