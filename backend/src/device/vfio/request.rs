//! The host asking for the device back: VFIO's REQ interrupt (index 4).
//! vfio-pci signals it when the device is to leave vfio-pci (an unbind, a
//! VF removed by `sriov_numvfs=0`, a hot removal) and then waits until
//! every fd of the device is closed, signalling again every 10 s. Nothing
//! else tells the process that holds the device.
//!
//! So the kernel's REQ trigger is always airlock's own eventfd
//! ([`RequestWatch`]), armed by the process that holds the device longest
//! (the supervisor; with --sandbox off, the one process); a client's REQ
//! eventfd never reaches the kernel. The server keeps the client's eventfd
//! here instead, and SIGUSR1 makes it relay the request ([`install_relay`]):
//! QEMU then unplugs the device from its guest, as it does for in-process
//! vfio-pci (the patched QEMU: stock 11.1's vfio-user-pci lacks the x-req
//! property and never registers a REQ eventfd, qemu-patches/ patch 16). Once the client has left (or a grace period is over) the
//! device is quiesced, every fd closed, and airlock exits with
//! [`EXIT_WITHDRAWN`] so that no supervisor restarts it on a device that
//! is gone (lifecycle/withdraw.rs).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use airlock_protocol::irqs::{
    IrqAction, IrqData, IrqSet, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD,
};

use super::ioctl;
use crate::device::irq_rules::{check_range, IrqError};
use crate::signals::{self, Disposition};

/// vfio-pci's REQ interrupt index.
pub const REQ_INDEX: u32 = 4;

/// airlock's exit status once the host took the device back (sysexits'
/// EX_UNAVAILABLE); the systemd unit names it in RestartPreventExitStatus=.
pub const EXIT_WITHDRAWN: i32 = 69;

/// The signal that makes a server relay the request to its client.
pub const RELAY_SIGNAL: libc::c_int = libc::SIGUSR1;

/// airlock's eventfd behind the kernel's REQ trigger, with its own copy of
/// the device fd so it can be (re-)armed by whoever holds it.
pub struct RequestWatch {
    eventfd: OwnedFd,
    device: OwnedFd,
}

impl RequestWatch {
    /// A watch on `device` (not armed yet: see [`RequestWatch::arm`]).
    pub fn new(device: BorrowedFd<'_>) -> io::Result<RequestWatch> {
        // SAFETY: eventfd takes integer arguments only.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd returned a new fd that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let device = device.try_clone_to_owned()?;
        Ok(RequestWatch { eventfd, device })
    }

    /// Makes this eventfd the kernel's REQ trigger (replacing whatever an
    /// earlier airlock armed).
    pub fn arm(&self) -> io::Result<()> {
        let fd = self.eventfd.as_raw_fd();
        ioctl::set_irqs(
            self.device.as_fd(),
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            REQ_INDEX,
            0,
            1,
            &fd.to_ne_bytes(),
        )
    }

    /// The eventfd, to poll.
    pub fn raw_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// How many requests arrived since the last call (0: none).
    pub fn take(&self) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: an 8-byte read into a stack buffer from our non-blocking
        // eventfd.
        let n = unsafe { libc::read(self.eventfd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        if n == 8 {
            u64::from_ne_bytes(b)
        } else {
            0
        }
    }
}

/// The client's REQ eventfd, for the relay handler (-1: none).
static CLIENT: AtomicI32 = AtomicI32::new(-1);
/// A request was relayed to this process.
static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_relay(_sig: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
    let fd = CLIENT.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a stack buffer; async-signal-safe.
        unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
    }
}

/// Installs the relay (SA_RESTART: a blocked read of the client's socket
/// goes on; the session ends when the client leaves).
pub fn install_relay() -> io::Result<()> {
    // SAFETY: on_relay touches two atomics and calls write(2).
    unsafe { signals::install(RELAY_SIGNAL, Disposition::Handler(on_relay), true) }
}

/// Whether the host asked for the device back (a relay signal arrived).
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The client's REQ eventfd, as a server holds it: the relay handler reads
/// its raw fd from [`CLIENT`].
#[derive(Default)]
pub struct ClientRequest {
    file: Option<File>,
}

impl ClientRequest {
    /// Sets (Some) or clears (None) the client's eventfd. The server is one
    /// thread, so the handler runs between two of these steps, never
    /// during one: it sees the old fd still open, -1, or the new one.
    pub fn set(&mut self, file: Option<File>) {
        CLIENT.store(-1, Ordering::SeqCst);
        self.file = file;
        if let Some(f) = &self.file {
            CLIENT.store(f.as_raw_fd(), Ordering::SeqCst);
        }
    }

    /// Signals the client's eventfd now (SET_IRQS with DATA_NONE or a true
    /// BOOL: the kernel's loopback of an index).
    pub fn fire(&self) {
        if let Some(mut f) = self.file.as_ref() {
            let _ = f.write(&1u64.to_ne_bytes());
        }
    }

    /// Whether `f` can be the client's REQ eventfd: VFIO takes eventfds
    /// only (EINVAL otherwise). An anonymous inode (no file type bits) is an
    /// eventfd or another fd whose write fails at once; a pipe or socket
    /// could block the relay handler, so it is refused.
    pub fn acceptable(f: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        f.metadata().is_ok_and(|m| m.mode() & libc::S_IFMT == 0)
    }

    /// A client's SET_IRQS on REQ: its eventfd stays here (the kernel's
    /// trigger is airlock's); DATA_NONE or a true BOOL fires it, as the
    /// kernel's loopback does.
    pub fn apply(&mut self, set: IrqSet) -> Result<(), IrqError> {
        if set.action != IrqAction::Trigger {
            return Err(IrqError::Unsupported {
                index: REQ_INDEX,
                what: "MASK or UNMASK (only TRIGGER)",
            });
        }
        let disable_all = check_range(&set, 1)?;
        match set.data {
            _ if disable_all => self.set(None),
            IrqData::None => self.fire(),
            IrqData::Bool(v) if v.first() == Some(&true) => self.fire(),
            IrqData::Bool(_) => {}
            IrqData::Eventfds(mut fds) => {
                // None (or -1) de-assigns.
                let file = fds.pop().map(File::from);
                if file.as_ref().is_some_and(|f| !Self::acceptable(f)) {
                    return Err(IrqError::Unsupported {
                        index: REQ_INDEX,
                        what: "an fd that is not an eventfd",
                    });
                }
                self.set(file);
            }
        }
        Ok(())
    }

    pub fn is_set(&self) -> bool {
        self.file.is_some()
    }
}

impl Drop for ClientRequest {
    fn drop(&mut self) {
        self.set(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eventfd() -> File {
        // SAFETY: eventfd takes integer arguments only.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: a new fd that nothing else owns.
        unsafe { File::from_raw_fd(fd) }
    }

    fn count(f: &File) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: an 8-byte read into a stack buffer.
        let n = unsafe { libc::read(f.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
        if n == 8 {
            u64::from_ne_bytes(b)
        } else {
            0
        }
    }

    /// CLIENT is one per process: the tests that set it take turns.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn set(action: IrqAction, count: u32, data: IrqData) -> IrqSet {
        IrqSet {
            index: REQ_INDEX,
            start: 0,
            count,
            action,
            data,
        }
    }

    #[test]
    fn a_clients_req_set_irqs_keeps_its_eventfd_and_follows_the_kernels_rules() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let mut req = ClientRequest::default();
        let client = eventfd();
        let watch = client.try_clone().unwrap();
        req.apply(set(
            IrqAction::Trigger,
            1,
            IrqData::Eventfds(vec![client.into()]),
        ))
        .unwrap();
        assert!(req.is_set());
        req.apply(set(IrqAction::Trigger, 1, IrqData::None))
            .unwrap();
        req.apply(set(IrqAction::Trigger, 1, IrqData::Bool(vec![false])))
            .unwrap();
        req.apply(set(IrqAction::Trigger, 1, IrqData::Bool(vec![true])))
            .unwrap();
        assert_eq!(
            count(&watch),
            2,
            "DATA_NONE and a true BOOL fire it (loopback)"
        );
        for bad in [
            set(IrqAction::Mask, 1, IrqData::None),
            set(IrqAction::Unmask, 1, IrqData::None),
            set(IrqAction::Trigger, 2, IrqData::None),
        ] {
            assert!(req.apply(bad).is_err());
        }
        let (r, _w) = std::io::pipe().unwrap();
        let pipe = set(
            IrqAction::Trigger,
            1,
            IrqData::Eventfds(vec![OwnedFd::from(r)]),
        );
        assert!(req.apply(pipe).is_err(), "a pipe could block the relay");
        assert!(req.is_set(), "a refused SET_IRQS keeps the eventfd");
        req.apply(set(IrqAction::Trigger, 1, IrqData::Eventfds(vec![])))
            .unwrap();
        assert!(!req.is_set(), "no fd de-assigns");
        req.apply(set(
            IrqAction::Trigger,
            1,
            IrqData::Eventfds(vec![eventfd().into()]),
        ))
        .unwrap();
        req.apply(set(IrqAction::Trigger, 0, IrqData::None))
            .unwrap();
        assert!(!req.is_set(), "count 0 disables the index");
    }

    #[test]
    fn only_anonymous_inodes_can_be_the_clients_eventfd() {
        assert!(ClientRequest::acceptable(&eventfd()));
        let (r, _w) = std::io::pipe().unwrap();
        assert!(!ClientRequest::acceptable(&File::from(OwnedFd::from(r))));
        assert!(!ClientRequest::acceptable(
            &File::open("/dev/null").unwrap()
        ));
    }

    #[test]
    fn the_relay_signals_the_clients_eventfd_and_marks_the_request() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let client = eventfd();
        let watch = client.try_clone().unwrap();
        let mut req = ClientRequest::default();
        req.set(Some(client));
        assert!(req.is_set());
        on_relay(RELAY_SIGNAL);
        assert!(requested());
        assert_eq!(count(&watch), 1, "QEMU's REQ eventfd was signalled");
        req.fire();
        assert_eq!(count(&watch), 1, "a loopback SET_IRQS fires it too");
        req.set(None);
        on_relay(RELAY_SIGNAL);
        assert_eq!(count(&watch), 0, "a cleared eventfd is never written");
        assert_eq!(CLIENT.load(Ordering::SeqCst), -1);
    }
}
