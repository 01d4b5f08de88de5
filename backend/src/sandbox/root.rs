//! An empty, read-only root in a private mount namespace: no host path is
//! reachable afterwards.

use std::ffi::{CStr, CString};
use std::io;
use std::ptr::null;

use super::SandboxError;

fn c(s: &str) -> CString {
    CString::new(s).expect("literal paths have no NUL")
}

fn check(r: libc::c_int, what: &'static str) -> Result<(), SandboxError> {
    if r != 0 {
        return Err(SandboxError::Step {
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// mount(2) with an optional source, filesystem type and data.
fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
    what: &'static str,
) -> Result<(), SandboxError> {
    let p = |s: Option<&CStr>| s.map_or(null(), CStr::as_ptr);
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call, or null where mount(2) allows it; none is retained.
    check(
        unsafe { libc::mount(p(source), target.as_ptr(), p(fstype), flags, p(data).cast()) },
        what,
    )
}

pub fn enter_empty_root() -> Result<(), SandboxError> {
    // Somewhere to mount the new root: any existing directory will do, as
    // the mount is private to our namespace.
    let dir = ["/tmp", "/run", "/mnt", "/dev"]
        .into_iter()
        .find(|d| std::path::Path::new(d).is_dir())
        .ok_or(SandboxError::NoMountPoint)?;
    let (root, dirc, old) = (c("/"), c(dir), c(&format!("{dir}/old")));
    let tmpfs = c("tmpfs");
    mount(
        None,
        &root,
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "making mounts private",
    )?;
    mount(
        Some(&tmpfs),
        &dirc,
        Some(&tmpfs),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(&c("size=16k,mode=0700")),
        "mounting the empty root",
    )?;
    // SAFETY: mkdir, pivot_root and rmdir get NUL-terminated paths.
    unsafe {
        check(
            libc::mkdir(old.as_ptr(), 0o700),
            "creating the old-root mount point",
        )?;
        if libc::syscall(libc::SYS_pivot_root, dirc.as_ptr(), old.as_ptr()) == 0 {
            detach_old_root(&root)?;
        } else {
            check(
                libc::rmdir(old.as_ptr()),
                "removing the old-root mount point",
            )?;
            move_over_root(&root, &dirc)?;
        }
    }
    mount(
        None,
        &root,
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
        "making the root read-only",
    )
}

/// After pivot_root: the host root, now at /old, is detached.
fn detach_old_root(root: &CStr) -> Result<(), SandboxError> {
    let old_in = c("/old");
    // SAFETY: chdir, umount2 and rmdir get NUL-terminated paths.
    unsafe {
        check(libc::chdir(root.as_ptr()), "entering the new root")?;
        check(
            libc::umount2(old_in.as_ptr(), libc::MNT_DETACH),
            "detaching the host root",
        )?;
        check(
            libc::rmdir(old_in.as_ptr()),
            "removing the old-root mount point",
        )
    }
}

/// The initramfs root (rootfs) cannot be pivoted: move the new root over /
/// and chroot into it; without CAP_SYS_CHROOT (dropped next) the covered
/// host root stays out of reach.
fn move_over_root(root: &CStr, dir: &CStr) -> Result<(), SandboxError> {
    let dot = c(".");
    // SAFETY: chdir gets a NUL-terminated path.
    let entered = unsafe { libc::chdir(dir.as_ptr()) };
    check(entered, "entering the new root")?;
    mount(
        Some(&dot),
        root,
        None,
        libc::MS_MOVE,
        None,
        "moving the new root over /",
    )?;
    // SAFETY: chroot and chdir get NUL-terminated paths.
    unsafe {
        check(libc::chroot(dot.as_ptr()), "chroot into the new root")?;
        check(libc::chdir(root.as_ptr()), "entering the new root")
    }
}
