//! An empty, read-only root in a private mount namespace: no host path is
//! reachable afterwards.

use std::ffi::CString;
use std::io;

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

pub fn enter_empty_root() -> Result<(), SandboxError> {
    // Somewhere to mount the new root: any existing directory will do, as
    // the mount is private to our namespace.
    let dir = ["/tmp", "/run", "/mnt", "/dev"]
        .into_iter()
        .find(|d| std::path::Path::new(d).is_dir())
        .ok_or(SandboxError::NoMountPoint)?;
    let (root, dirc, old) = (c("/"), c(dir), c(&format!("{dir}/old")));
    let tmpfs = c("tmpfs");
    let opts = c("size=16k,mode=0700");
    // SAFETY: every pointer is a valid NUL-terminated string or null, as
    // mount(2), mkdir(2), pivot_root(2), chdir(2), umount2(2) and chroot(2)
    // expect; none is retained by the kernel.
    unsafe {
        check(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "making mounts private",
        )?;
        check(
            libc::mount(
                tmpfs.as_ptr(),
                dirc.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            ),
            "mounting the empty root",
        )?;
        check(
            libc::mkdir(old.as_ptr(), 0o700),
            "creating the old-root mount point",
        )?;
        if libc::syscall(libc::SYS_pivot_root, dirc.as_ptr(), old.as_ptr()) == 0 {
            check(libc::chdir(root.as_ptr()), "entering the new root")?;
            let old_in = c("/old");
            check(
                libc::umount2(old_in.as_ptr(), libc::MNT_DETACH),
                "detaching the host root",
            )?;
            check(
                libc::rmdir(old_in.as_ptr()),
                "removing the old-root mount point",
            )?;
        } else {
            // The initramfs root (rootfs) cannot be pivoted: move the new
            // root over / and chroot into it; without CAP_SYS_CHROOT (dropped
            // next) the covered host root stays out of reach.
            check(
                libc::rmdir(old.as_ptr()),
                "removing the old-root mount point",
            )?;
            check(libc::chdir(dirc.as_ptr()), "entering the new root")?;
            let dot = c(".");
            check(
                libc::mount(
                    dot.as_ptr(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_MOVE,
                    std::ptr::null(),
                ),
                "moving the new root over /",
            )?;
            check(libc::chroot(dot.as_ptr()), "chroot into the new root")?;
            check(libc::chdir(root.as_ptr()), "entering the new root")?;
        }
        check(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
            "making the root read-only",
        )?;
    }
    Ok(())
}
