//! What outlives one server: the supervisor that restarts a server that
//! dies (crash-only serving), and the live upgrade that replaces airlock's
//! own binary. Both keep the listening socket and, with --vfio, the device's
//! fds and IOMMU mappings, so a reconnecting client replays onto the same
//! device. lifecycle/ sits above the server and the sandbox: it starts
//! servers, the sandbox confines each one, the server serves.

pub mod supervisor;
pub mod upgrade;

pub use supervisor::{supervise, ServerStart, SupervisorError};
