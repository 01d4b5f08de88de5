//! The interrupt table of an emulated device: (irq index, vector) -> the
//! client's eventfd, with VFIO's mask, pending and INTx level semantics.
//!
//! Rules (docs/interop/vfio-user.rst, DEVICE_SET_IRQS, and linux/vfio.h):
//! - TRIGGER + EVENTFD assigns one eventfd per vector of [start, start+count);
//!   with no fds it de-assigns the range.
//! - TRIGGER + NONE with count 0 disables the whole index.
//! - TRIGGER + NONE/BOOL fires the selected vectors (a loopback test).
//! - MASK / UNMASK + NONE/BOOL mask or unmask the selected vectors; a vector
//!   fired while masked or unassigned is pending and is delivered on unmask
//!   or assignment.
//! - MASK / UNMASK + EVENTFD register notifier eventfds (KVM's INTx resample
//!   fd arrives as UNMASK + EVENTFD).
//! - INTx is level-triggered and automasked: delivery masks it; an unmask
//!   while the line is still asserted delivers again.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;

use crate::device::irq_rules::{check_range, IrqError};
use airlock_protocol::device::{
    IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
    PCI_INTX_IRQ_INDEX, PCI_MSIX_IRQ_INDEX, PCI_MSI_IRQ_INDEX,
};
use airlock_protocol::irqs::{IrqAction, IrqData, IrqSet};

#[derive(Default)]
struct Vector {
    trigger: Option<File>,
    masked: bool,
    pending: bool,
    mask_notify: Option<File>,
    unmask_notify: Option<File>,
}

struct Line {
    flags: u32,
    vectors: Vec<Vector>,
    /// INTx only: the device's line level.
    level: bool,
}

pub struct IrqTable {
    lines: Vec<Line>,
}

fn signal(f: &File) {
    // An eventfd write of 1 only fails if the counter would overflow, in
    // which case the interrupt is already pending there.
    let _ = (&*f).write(&1u64.to_ne_bytes());
}

impl IrqTable {
    /// A PCI device's five indexes: INTx (1), MSI (msi), MSI-X (msix), ERR, REQ.
    pub fn pci(msi: u32, msix: u32) -> IrqTable {
        let mk = |flags: u32, n: u32| Line {
            flags,
            vectors: (0..n).map(|_| Vector::default()).collect(),
            level: false,
        };
        IrqTable {
            lines: vec![
                mk(
                    IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
                    1,
                ),
                mk(IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE, msi),
                mk(
                    IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
                    msix,
                ),
                mk(IRQ_INFO_EVENTFD, 1),
                mk(IRQ_INFO_EVENTFD, 1),
            ],
        }
    }

    pub fn num_indexes(&self) -> u32 {
        self.lines.len() as u32
    }

    /// (flags, count) for GET_IRQ_INFO.
    pub fn info(&self, index: u32) -> Option<(u32, u32)> {
        self.lines
            .get(index as usize)
            .map(|l| (l.flags, l.vectors.len() as u32))
    }

    /// True when the client has assigned an eventfd to any vector of `index`.
    pub fn enabled(&self, index: u32) -> bool {
        self.lines
            .get(index as usize)
            .is_some_and(|l| l.vectors.iter().any(|v| v.trigger.is_some()))
    }

    pub fn pending(&self, index: u32, vector: u32) -> bool {
        self.vector(index, vector).is_some_and(|v| v.pending)
    }

    fn vector(&self, index: u32, vector: u32) -> Option<&Vector> {
        self.lines.get(index as usize)?.vectors.get(vector as usize)
    }

    /// Fires an edge interrupt (MSI, MSI-X, ERR, REQ): delivered now, or
    /// left pending while masked or unassigned.
    pub fn fire(&mut self, index: u32, vector: u32) {
        if index == PCI_INTX_IRQ_INDEX {
            self.intx_pulse();
            return;
        }
        let Some(v) = self
            .lines
            .get_mut(index as usize)
            .and_then(|l| l.vectors.get_mut(vector as usize))
        else {
            return;
        };
        match (&v.trigger, v.masked) {
            (Some(f), false) => {
                signal(f);
                v.pending = false;
            }
            _ => v.pending = true,
        }
    }

    /// Sets the INTx line level; a rising edge on an unmasked line is
    /// delivered and automasks it.
    pub fn set_intx_level(&mut self, asserted: bool) {
        let line = &mut self.lines[PCI_INTX_IRQ_INDEX as usize];
        let rising = asserted && !line.level;
        line.level = asserted;
        if rising {
            self.intx_deliver();
        } else if !asserted {
            line.vectors[0].pending = false;
        }
    }

    fn intx_pulse(&mut self) {
        self.lines[PCI_INTX_IRQ_INDEX as usize].vectors[0].pending = true;
        self.intx_deliver();
    }

    fn intx_deliver(&mut self) {
        let v = &mut self.lines[PCI_INTX_IRQ_INDEX as usize].vectors[0];
        v.pending = true;
        if v.masked {
            return;
        }
        if let Some(f) = &v.trigger {
            signal(f);
            v.pending = false;
            v.masked = true;
            if let Some(n) = &v.mask_notify {
                signal(n);
            }
        }
    }

    /// Applies one SET_IRQS request.
    pub fn apply(&mut self, set: IrqSet) -> Result<(), IrqError> {
        let count = self.lines.len();
        let line = self
            .lines
            .get_mut(set.index as usize)
            .ok_or(IrqError::NoSuchIndex {
                index: set.index,
                count,
            })?;
        let have = line.vectors.len() as u32;
        if check_range(&set, have)? {
            for v in &mut line.vectors {
                *v = Vector::default();
            }
            return Ok(());
        }
        if set.action != IrqAction::Trigger && line.flags & IRQ_INFO_MASKABLE == 0 {
            return Err(IrqError::Unsupported {
                index: set.index,
                what: "mask/unmask",
            });
        }
        let range = set.start as usize..(set.start + set.count) as usize;
        let is_intx = set.index == PCI_INTX_IRQ_INDEX;
        // The vectors a BOOL array selects (all of the range otherwise),
        // without collecting them.
        let bools: &[bool] = match &set.data {
            IrqData::Bool(b) => b,
            _ => &[],
        };
        let use_bools = matches!(set.data, IrqData::Bool(_));
        let start = set.start as usize;
        let selected = |i: &usize| !use_bools || bools.get(i - start).copied().unwrap_or(false);
        match (set.action, &set.data) {
            (action, IrqData::Eventfds(_)) => {
                let IrqData::Eventfds(fds) = set.data else {
                    unreachable!("matched above")
                };
                let mut fds = fds.into_iter().map(File::from);
                for i in range.clone() {
                    let v = &mut line.vectors[i];
                    let fd = fds.next();
                    match action {
                        IrqAction::Trigger => v.trigger = fd,
                        IrqAction::Mask => v.mask_notify = fd,
                        IrqAction::Unmask => v.unmask_notify = fd,
                    }
                }
                if action == IrqAction::Trigger {
                    self.redeliver(set.index, range);
                }
            }
            (IrqAction::Trigger, _) => {
                for i in range.filter(selected) {
                    if is_intx {
                        self.intx_pulse();
                    } else {
                        self.fire(set.index, i as u32);
                    }
                }
            }
            (IrqAction::Mask, _) => {
                for i in range.filter(selected) {
                    line.vectors[i].masked = true;
                }
            }
            (IrqAction::Unmask, _) => {
                for i in range.clone().filter(selected) {
                    line.vectors[i].masked = false;
                    if let Some(n) = &line.vectors[i].unmask_notify {
                        signal(n);
                    }
                }
                self.redeliver(set.index, range.filter(selected));
            }
        }
        Ok(())
    }

    /// Delivers what became deliverable after an unmask or assignment.
    fn redeliver(&mut self, index: u32, vectors: impl Iterator<Item = usize>) {
        if index == PCI_INTX_IRQ_INDEX {
            let line = &self.lines[index as usize];
            if line.level || line.vectors[0].pending {
                self.intx_deliver();
            }
            return;
        }
        for i in vectors {
            if self.pending(index, i as u32) {
                self.fire(index, i as u32);
            }
        }
    }

    /// Removes every eventfd and resets masks and pending bits (reset,
    /// disconnect).
    pub fn clear(&mut self) {
        for line in &mut self.lines {
            line.level = false;
            for v in &mut line.vectors {
                *v = Vector::default();
            }
        }
    }

    /// Which interrupt mode the client enabled, as VFIO's irq_type.
    pub fn mode(&self) -> IrqMode {
        if self.enabled(PCI_MSIX_IRQ_INDEX) {
            IrqMode::Msix
        } else if self.enabled(PCI_MSI_IRQ_INDEX) {
            IrqMode::Msi
        } else {
            IrqMode::Intx
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqMode {
    Intx,
    Msi,
    Msix,
}

/// Lets tests hand the table eventfds.
pub fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory arguments; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests;
