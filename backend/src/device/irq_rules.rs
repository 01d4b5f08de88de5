//! The SET_IRQS rules every device applies before it acts, whether it
//! emulates its interrupts (emulated/irq_table.rs) or passes them to VFIO.

use airlock_protocol::irqs::{IrqAction, IrqData, IrqSet};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum IrqError {
    #[error("irq index {index} does not exist (device has {count})")]
    NoSuchIndex { index: u32, count: usize },
    #[error("irq index {index}: vectors [{start}, +{count}) are not within its {have} vectors (count 0 only with ACTION_TRIGGER and DATA_NONE, which disables the index)")]
    Range {
        index: u32,
        start: u32,
        count: u32,
        have: u32,
    },
    #[error("irq index {index} does not support {what}")]
    Unsupported { index: u32, what: &'static str },
}

/// Kernel VFIO's range rule for SET_IRQS on an index of `have` vectors:
/// start names a vector even when count is 0, and count 0 only means
/// something as TRIGGER + DATA_NONE ("disable the index", returns true).
pub fn check_range(set: &IrqSet, have: u32) -> Result<bool, IrqError> {
    let disable_all =
        set.action == IrqAction::Trigger && set.count == 0 && matches!(set.data, IrqData::None);
    // Decoding checked start + count does not overflow.
    if set.start >= have || (!disable_all && (set.count == 0 || set.start + set.count > have)) {
        return Err(IrqError::Range {
            index: set.index,
            start: set.start,
            count: set.count,
            have,
        });
    }
    Ok(disable_all)
}

impl IrqError {
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}
