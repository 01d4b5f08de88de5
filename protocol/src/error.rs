//! Protocol errors, each mapped to the errno the peer receives.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("{what} is truncated: needs {need} bytes, message has {got}")]
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("message size {0} is below the 16-byte header")]
    SizeBelowHeader(u32),
    #[error("message size {size} exceeds the limit of {max} bytes")]
    TooLarge { size: u32, max: usize },
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("command {0} is sent by the server, not the client")]
    WrongDirection(u16),
    #[error("message type {0:#x} is neither a command nor a reply")]
    BadType(u32),
    #[error("expected a command, got a reply (id {0})")]
    UnexpectedReply(u16),
    #[error("{what}: argsz {argsz} is invalid (needs {need})")]
    BadArgsz {
        what: &'static str,
        argsz: u32,
        need: usize,
    },
    #[error("{what}: unsupported flags {flags:#x}")]
    BadFlags { what: &'static str, flags: u32 },
    #[error("{what}: {fields} overflows")]
    Overflow {
        what: &'static str,
        fields: &'static str,
    },
    #[error("count {count} exceeds max_data_xfer_size {max}")]
    CountTooLarge { count: u64, max: u64 },
    #[error("{what}: payload has {got} bytes of data, count says {count}")]
    DataMismatch {
        what: &'static str,
        count: u64,
        got: usize,
    },
    #[error("{what} carries {got} file descriptors, expected {expected}")]
    FdCount {
        what: &'static str,
        got: usize,
        expected: &'static str,
    },
    #[error("too many file descriptors in one message (limit {max})")]
    TooManyFds { max: usize },
    #[error("version {major}.{minor} is not supported (airlock speaks 0.0)")]
    BadVersion { major: u16, minor: u16 },
    #[error("version capabilities are not valid JSON: {0}")]
    BadJson(String),
    #[error("peer replied with error {errno} ({text})", text = std::io::Error::from_raw_os_error(*errno as i32))]
    Remote { errno: u32 },
    #[error("reply to message {id} does not match the request: {why}")]
    BadReply { id: u16, why: &'static str },
    #[error("peer closed the connection")]
    Closed,
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// A read that timed out (SO_RCVTIMEO), not a broken stream.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProtocolError::Io(e)
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    }

    /// The errno that goes into the error reply for this failure.
    pub fn errno(&self) -> i32 {
        use ProtocolError::*;
        match self {
            TooLarge { .. } | CountTooLarge { .. } => libc::E2BIG,
            UnknownCommand(_) | WrongDirection(_) => libc::ENOSYS,
            BadVersion { .. } => libc::ENOTSUP,
            Overflow { .. } => libc::EOVERFLOW,
            TooManyFds { .. } => libc::EMFILE,
            Remote { errno } => *errno as i32,
            Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Closed => libc::ECONNRESET,
            _ => libc::EINVAL,
        }
    }
}
