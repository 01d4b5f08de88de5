//! airlock's mirror of the interrupts it set in VFIO: the client's
//! trigger and resample eventfds (held so airlock's table matches what the
//! kernel signals), the record in the handover table a restarted server
//! reads, and the indexes a killed server left that this client has not
//! taken over yet.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use airlock_protocol::irqs::{
    IrqAction, IrqData, IrqSet, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
use tracing::{debug, info};

use super::handover::Handover;
use super::ioctl;
use super::request::REQ_INDEX;

#[derive(Default)]
pub(super) struct IrqMirror {
    /// Trigger eventfds, per (index, vector).
    triggers: HashMap<(u32, u32), File>,
    /// Mask/unmask notifier eventfds (INTx resample), per (index, vector, action).
    notifiers: HashMap<(u32, u32, u32), File>,
    /// Indexes a killed server left enabled that this server's client has
    /// not set since.
    adopted: Vec<u32>,
}

/// A SET_IRQS in VFIO_DEVICE_SET_IRQS's terms.
struct Encoded {
    flags: u32,
    action: u32,
    eventfds: bool,
    data: Vec<u8>,
    /// Per vector from `start`: the eventfd set (None: unassigned).
    files: Vec<Option<File>>,
}

fn encode(set: IrqSet) -> Encoded {
    let action = match set.action {
        IrqAction::Mask => IRQ_SET_ACTION_MASK,
        IrqAction::Unmask => IRQ_SET_ACTION_UNMASK,
        IrqAction::Trigger => IRQ_SET_ACTION_TRIGGER,
    };
    let (dflag, data, files) = match set.data {
        IrqData::None => (IRQ_SET_DATA_NONE, vec![], vec![]),
        IrqData::Bool(v) => (
            IRQ_SET_DATA_BOOL,
            v.iter().map(|b| *b as u8).collect(),
            vec![],
        ),
        // No fds with DATA_EVENTFD: unassign every vector in the range.
        IrqData::Eventfds(fds) if fds.is_empty() => (
            IRQ_SET_DATA_EVENTFD,
            (0..set.count).flat_map(|_| (-1i32).to_ne_bytes()).collect(),
            (0..set.count).map(|_| None).collect(),
        ),
        IrqData::Eventfds(fds) => (
            IRQ_SET_DATA_EVENTFD,
            fds.iter()
                .flat_map(|f| f.as_raw_fd().to_ne_bytes())
                .collect(),
            fds.into_iter()
                .map(|f: OwnedFd| Some(File::from(f)))
                .collect(),
        ),
    };
    Encoded {
        flags: dflag | action,
        action,
        eventfds: dflag == IRQ_SET_DATA_EVENTFD,
        data,
        files,
    }
}

impl IrqMirror {
    /// Adopts the indexes a killed server left enabled.
    pub fn adopt(&mut self, indexes: Vec<u32>) {
        self.adopted = indexes;
    }

    /// Passes a checked SET_IRQS to VFIO and mirrors it. `disable_all`:
    /// the set tears the whole index down.
    pub fn apply(
        &mut self,
        device: BorrowedFd<'_>,
        table: &Handover,
        set: IrqSet,
        disable_all: bool,
    ) -> io::Result<()> {
        let (index, start) = (set.index, set.start);
        let count = set.count;
        // From here the client owns this index (a replay continues it).
        self.adopted.retain(|&i| i != index);
        let e = encode(set);
        ioctl::set_irqs(device, e.flags, index, start, count, &e.data)?;
        // The kernel holds its own references now; airlock's table mirrors them.
        if disable_all {
            self.forget(table, index);
        } else if e.eventfds {
            self.record(table, index, start, e.action, e.files);
        }
        Ok(())
    }

    fn record(
        &mut self,
        table: &Handover,
        index: u32,
        start: u32,
        action: u32,
        files: Vec<Option<File>>,
    ) {
        if action == IRQ_SET_ACTION_TRIGGER {
            table.irq_enabled(index);
        }
        for (k, f) in files.into_iter().enumerate() {
            let v = start + k as u32;
            match action {
                IRQ_SET_ACTION_TRIGGER => table.irq_vector(index, v, f.is_some()),
                IRQ_SET_ACTION_UNMASK => table.irq_resample(index, f.is_some()),
                _ => {}
            }
            match (action, f) {
                (IRQ_SET_ACTION_TRIGGER, Some(f)) => {
                    self.triggers.insert((index, v), f);
                }
                (IRQ_SET_ACTION_TRIGGER, None) => {
                    self.triggers.remove(&(index, v));
                }
                (a, Some(f)) => {
                    self.notifiers.insert((index, v, a), f);
                }
                (a, None) => {
                    self.notifiers.remove(&(index, v, a));
                }
            }
        }
    }

    /// Drops an index's eventfds and its record in the table.
    fn forget(&mut self, table: &Handover, index: u32) {
        table.irq_disabled(index);
        self.triggers.retain(|(i, _), _| *i != index);
        self.notifiers.retain(|(i, _, _), _| *i != index);
    }

    /// Tears down an interrupt index in the kernel and in the table.
    pub fn disable(&mut self, device: BorrowedFd<'_>, table: &Handover, index: u32, name: &str) {
        let off = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER;
        if let Err(e) = ioctl::set_irqs(device, off, index, 0, 0, &[]) {
            debug!(device = %name, "disabling IRQ index {index} failed: {e}");
        }
        self.forget(table, index);
        self.adopted.retain(|&i| i != index);
    }

    /// Tears down adopted indexes this client is not replaying (it resets
    /// the device, or enables another one).
    pub fn drop_adopted(
        &mut self,
        device: BorrowedFd<'_>,
        table: &Handover,
        which: &[u32],
        why: &str,
        name: &str,
    ) {
        for &index in which {
            if index == REQ_INDEX {
                // An older airlock passed the client's REQ eventfd to the
                // kernel; the trigger is the holder's own now (request.rs).
                continue;
            }
            info!(device = %name, "{why}: disabling IRQ index {} the previous server's client had enabled", index_name(index));
            self.disable(device, table, index, name);
        }
    }

    pub fn adopted(&self) -> &[u32] {
        &self.adopted
    }

    /// Every index off, in the kernel and in the table (`counts`: vectors
    /// per index, as VFIO reports them).
    pub fn quiesce(&mut self, device: BorrowedFd<'_>, table: &Handover, counts: &[(u32, u32)]) {
        for (index, &(_, count)) in counts.iter().enumerate() {
            // REQ's trigger belongs to the process that holds the device
            // (request.rs): it must outlive every client.
            if count > 0 && index as u32 != REQ_INDEX {
                let off = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER;
                let _ = ioctl::set_irqs(device, off, index as u32, 0, 0, &[]);
            }
            table.irq_disabled(index as u32);
        }
        self.adopted.clear();
        self.triggers.clear();
        self.notifiers.clear();
    }
}

/// vfio-pci's interrupt indexes by name, for logs.
pub(super) fn index_name(index: u32) -> String {
    match index {
        0 => "INTx".into(),
        1 => "MSI".into(),
        2 => "MSI-X".into(),
        3 => "ERR".into(),
        4 => "REQ".into(),
        i => format!("index {i}"),
    }
}
