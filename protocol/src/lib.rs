//! The vfio-user wire format and framing (QEMU docs/interop/vfio-user.rst),
//! usable by a server and by a client. No device logic lives here.
//!
//! Decoding never panics and never reads past a message: every field read is
//! bounds-checked ([`wire::Reader`]), every size is checked against
//! [`Limits`] before anything is allocated.

pub mod client;
pub mod device;
pub mod dma;
pub mod dma_multi;
pub mod error;
pub mod feature;
pub mod header;
pub mod irqs;
pub mod limits;
pub mod region;
pub mod request;
pub mod socket;
pub mod version;
pub mod wire;

pub use error::ProtocolError;
pub use header::{Command, Header, HEADER_SIZE};
pub use limits::Limits;
pub use request::Request;
pub use socket::{MessageSocket, RecvError};
