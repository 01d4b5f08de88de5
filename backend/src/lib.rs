//! airlock: an out-of-process PCI device backend for QEMU over vfio-user.
//! Data flows one way: socket -> protocol decode -> session dispatch ->
//! device / DMA space / interrupt table -> protocol encode -> socket.

pub mod config;
pub mod device;
pub mod dma;
pub mod irq;
pub mod msi;
pub mod negotiate;
pub mod pci;
pub mod qemu_args;
pub mod sandbox;
pub mod server;
pub mod session;

use airlock_protocol::limits::QEMU_MAX_MSG_FDS;

/// Limits airlock serves with for a given --max-data-xfer.
pub fn server_limits(max_data_xfer: u64) -> negotiate::ServerLimits {
    negotiate::ServerLimits {
        max_msg_fds: QEMU_MAX_MSG_FDS as u32,
        max_data_xfer,
        max_dma_maps: 65535,
        windows: Vec::new(),
    }
}
