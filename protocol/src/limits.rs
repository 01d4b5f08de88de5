//! Explicit limits, checked before anything is allocated.

/// What one side accepts in one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole message (header included) this side reads.
    pub max_msg_size: usize,
    /// Most file descriptors this side takes in one message.
    pub max_fds: usize,
    /// Largest `count` in REGION/DMA read and write messages.
    pub max_data_xfer: u64,
}

/// QEMU's own ceiling for max_msg_fds (VFIO_USER_MAX_MAX_FDS): a larger
/// value makes it refuse the server.
pub const QEMU_MAX_MSG_FDS: usize = 16;
pub const DEFAULT_MAX_DATA_XFER: u64 = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits::new(DEFAULT_MAX_DATA_XFER, QEMU_MAX_MSG_FDS)
    }
}

impl Limits {
    pub fn new(max_data_xfer: u64, max_fds: usize) -> Limits {
        Limits {
            // A data message is header + 16 bytes of fixed fields + data;
            // 4 KiB more leaves room for VERSION JSON and WRITE_MULTI.
            max_msg_size: 16 + 16 + max_data_xfer as usize + 4096,
            max_fds,
            max_data_xfer,
        }
    }
}
