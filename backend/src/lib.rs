//! airlock: an out-of-process PCI device backend for QEMU over vfio-user.
//! Data flows one way: socket -> protocol decode -> session dispatch ->
//! device / DMA space / interrupt table -> protocol encode -> socket.

pub mod app;
pub mod config;
pub mod device;
pub mod dma;
pub mod iova;
pub mod lifecycle;
pub mod negotiate;
pub mod qemu_args;
pub mod sandbox;
pub mod server;
pub mod signals;
pub mod systemd;

use airlock_protocol::limits::QEMU_MAX_MSG_FDS;

/// Limits airlock serves with for a given --max-data-xfer.
pub fn server_limits(max_data_xfer: u64) -> negotiate::ServerLimits {
    negotiate::ServerLimits {
        max_msg_fds: QEMU_MAX_MSG_FDS as u32,
        max_data_xfer,
        max_dma_maps: 65535,
        windows: Vec::new(),
        poll: std::time::Duration::ZERO,
    }
}

/// fds a server needs besides its DMA maps: the socket, eventfds
/// (SET_IRQS), one message's worth of received fds, the device's own.
const NOFILE_HEADROOM: u64 = 256;

/// Raises RLIMIT_NOFILE so the server can hold `limits.max_dma_maps` maps
/// (an emulated device keeps each map's fd) and, where the hard limit
/// cannot be raised (no CAP_SYS_RESOURCE), lowers max_dma_maps to what the
/// limit honours, so VERSION never advertises more than can be held.
/// Returns the limit to keep.
pub fn fit_dma_maps_to_nofile(limits: &mut negotiate::ServerLimits) -> u64 {
    let want = limits.max_dma_maps + NOFILE_HEADROOM;
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one rlimit we own.
    let got = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        let raised = libc::rlimit {
            rlim_cur: want as libc::rlim_t,
            rlim_max: (want as libc::rlim_t).max(r.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            want
        } else {
            let capped = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &capped);
            r.rlim_max
        }
    };
    limits.max_dma_maps = limits
        .max_dma_maps
        .min(got.saturating_sub(NOFILE_HEADROOM).max(1));
    got
}

/// The most DMA maps a passthrough server can hold: each is an mmap, and
/// the kernel caps a process's mappings at vm.max_map_count (leave room for
/// the program's own).
pub fn vfio_max_dma_maps(wanted: u64) -> u64 {
    let max_map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(65530);
    wanted.min(max_map_count.saturating_sub(1024))
}
