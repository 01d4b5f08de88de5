//! The seccomp allowlists, one per device kind. Anything not named here
//! traps (SIGSYS): the server's handler reports the call and exits. The serving process is single-threaded and
//! opens nothing after setup, so open/socket/clone/execve/ptrace are absent.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SandboxError;
use crate::device::vfio::ioctl;

/// Syscalls every serving process needs.
const COMMON: &[(libc::c_long, &str)] = &[
    (libc::SYS_read, "client socket"),
    (libc::SYS_write, "eventfd signals, logs"),
    (libc::SYS_recvmsg, "client messages with fds"),
    (libc::SYS_sendmsg, "replies with fds"),
    (libc::SYS_accept4, "the next client"),
    (
        libc::SYS_shutdown,
        "closing a client; the stop signal handler",
    ),
    (
        libc::SYS_setsockopt,
        "read timeout while draining a closing client",
    ),
    (libc::SYS_close, "fds of a finished client"),
    (libc::SYS_ppoll, "waiting for a client (aarch64 poll)"),
    (libc::SYS_fstat, "checking a DMA_MAP fd is a regular file"),
    (libc::SYS_newfstatat, "same, newer libc"),
    (libc::SYS_statx, "same, newest libc"),
    (libc::SYS_lseek, "sizing a DMA_MAP fd"),
    (
        libc::SYS_pread64,
        "device DMA reads of client memory; BAR and config reads",
    ),
    (
        libc::SYS_pwrite64,
        "device DMA writes of client memory; BAR and config writes",
    ),
    (libc::SYS_mmap, "DMA maps, allocator"),
    (libc::SYS_munmap, "DMA unmaps, allocator"),
    (libc::SYS_mremap, "allocator"),
    (libc::SYS_madvise, "allocator"),
    (libc::SYS_brk, "allocator"),
    (libc::SYS_futex, "std locks"),
    (libc::SYS_getrandom, "HashMap seeds"),
    (libc::SYS_clock_gettime, "log timestamps without vDSO"),
    (
        libc::SYS_rt_sigreturn,
        "return from the stop signal handler",
    ),
    (libc::SYS_rt_sigprocmask, "libc signal masking"),
    (libc::SYS_sigaltstack, "std stack overflow guard"),
    (libc::SYS_tgkill, "abort() on a bug"),
    (libc::SYS_restart_syscall, "resumed waits"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit"),
];

#[cfg(target_arch = "x86_64")]
const ARCH_ONLY: &[(libc::c_long, &str)] = &[(libc::SYS_poll, "waiting for a client")];
#[cfg(not(target_arch = "x86_64"))]
const ARCH_ONLY: &[(libc::c_long, &str)] = &[];

/// The only ioctls allowed (--vfio only): request numbers from linux/vfio.h.
const VFIO_IOCTLS: &[(u64, &str)] = &[
    (
        ioctl::VFIO_DEVICE_SET_IRQS,
        "client eventfds into the device",
    ),
    (ioctl::VFIO_DEVICE_RESET, "DEVICE_RESET, quiesce"),
    (ioctl::VFIO_IOMMU_MAP_DMA, "DMA_MAP"),
    (ioctl::VFIO_IOMMU_UNMAP_DMA, "DMA_UNMAP"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Emulated,
    Vfio,
}

/// (syscalls, ioctls) the profile allows, for the start-up log line.
pub fn counts(p: Profile) -> (usize, usize) {
    let base = COMMON.len() + ARCH_ONLY.len() + 1;
    match p {
        Profile::Emulated => (base, 0),
        // --vfio adds only ioctl (with the VFIO requests below).
        Profile::Vfio => (base + 1, VFIO_IOCTLS.len()),
    }
}

pub fn build(p: Profile) -> Result<BpfProgram, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _why) in COMMON.iter().chain(ARCH_ONLY) {
        rules.insert(*nr, vec![]);
    }
    // fcntl(fd, F_GETFD) only: debug builds check an fd is open before
    // closing it (std's IO-safety assertion).
    let getfd = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )
    .map_err(err)?;
    rules.insert(
        libc::SYS_fcntl,
        vec![SeccompRule::new(vec![getfd]).map_err(err)?],
    );
    if p == Profile::Vfio {
        let mut ioctls = Vec::new();
        for (req, _why) in VFIO_IOCTLS {
            let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *req)
                .map_err(err)?;
            ioctls.push(SeccompRule::new(vec![c]).map_err(err)?);
        }
        rules.insert(libc::SYS_ioctl, ioctls);
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    let filter =
        SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch).map_err(err)?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e))
}

/// Installs the filter on this (the only) thread.
pub fn apply(p: Profile) -> Result<(), SandboxError> {
    let prog = build(p)?;
    seccompiler::apply_filter(&prog).map_err(|e| SandboxError::Seccomp(e.to_string()))
}
