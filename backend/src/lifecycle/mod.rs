//! What outlives one server: the supervisor that restarts a server that
//! dies (crash-only serving), and the live upgrade that replaces airlock's
//! own binary. Both keep the listening socket and, with --vfio, the device's
//! fds and IOMMU mappings, so a reconnecting client replays onto the same
//! device. lifecycle/ sits above the server and the sandbox: it starts
//! servers, the sandbox confines each one, the server serves.
//!
//! supervisor.rs (restarts) and watch.rs (what it waits on); the live
//! upgrade: upgrade.rs (what is handed over), ctl.rs (the channel between
//! the two airlocks), successor.rs + handoff.rs (the old airlock's side),
//! predecessor.rs (the new one's side); withdraw.rs: the host asking for
//! the device back.

pub mod ctl;
mod handoff;
pub mod predecessor;
pub mod successor;
pub mod supervisor;
pub mod upgrade;
mod watch;
pub mod withdraw;

pub use supervisor::{supervise, Exit, ServerStart, Supervision, SupervisorError};
