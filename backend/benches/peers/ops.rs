//! The measured operations as raw vfio-user messages (built once with the
//! protocol crate's encoders, so every server gets the same bytes), and one
//! request/reply exchange: one sendmsg, one blocking read of the reply's
//! known size. The client side allocates nothing per exchange.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use airlock_protocol::dma::{DmaMap, DmaUnmap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use airlock_protocol::header::{Command, Header, FLAG_ERROR, HEADER_SIZE};
use airlock_protocol::irqs::{IrqAction, IrqData, IrqSet};
use airlock_protocol::region::RegionAccess;
use airlock_protocol::MessageSocket;

/// One message and the size of its reply.
pub struct Step {
    pub request: Vec<u8>,
    pub fd: Option<Arc<OwnedFd>>,
    pub reply_len: usize,
}

pub struct Op {
    pub name: &'static str,
    pub steps: Vec<Step>,
}

fn message(cmd: Command, payload: &[u8]) -> Vec<u8> {
    [
        &Header::command(7, cmd, payload.len(), false).encode()[..],
        payload,
    ]
    .concat()
}

fn access(offset: u64, count: u32) -> RegionAccess {
    RegionAccess {
        offset,
        region: 0,
        count,
    }
}

const LIVENESS: u64 = 4;
const BUF: u64 = 0x40000;
const MSIX_INDEX: u32 = 2;

/// REGION_READ/WRITE at 4 B (the liveness register) and 4 KiB (the edu
/// buffer), a DMA_MAP + DMA_UNMAP pair of a 4 KiB memfd, and SET_IRQS
/// assigning an eventfd to MSI-X vector 0.
pub fn all() -> Vec<Op> {
    let memfd = Arc::new(memfd(4096));
    let eventfd = Arc::new(eventfd());
    let read = |name, offset, count: u32| Op {
        name,
        steps: vec![Step {
            request: message(Command::RegionRead, &access(offset, count).encode(&[])),
            fd: None,
            reply_len: HEADER_SIZE + 16 + count as usize,
        }],
    };
    let write = |name, offset, count: usize| Op {
        name,
        steps: vec![Step {
            request: message(
                Command::RegionWrite,
                &access(offset, count as u32).encode(&vec![0x5a; count]),
            ),
            fd: None,
            reply_len: HEADER_SIZE + 16,
        }],
    };
    let iova = 0x100000;
    let map = DmaMap {
        argsz: 32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset: 0,
        iova,
        size: 4096,
    };
    let unmap = DmaUnmap {
        argsz: 24,
        flags: 0,
        iova,
        size: 4096,
    };
    let set = IrqSet {
        index: MSIX_INDEX,
        start: 0,
        count: 1,
        action: IrqAction::Trigger,
        data: IrqData::Eventfds(Vec::new()),
    };
    vec![
        read("REGION_READ 4 B", LIVENESS, 4),
        read("REGION_READ 4 KiB", BUF, 4096),
        write("REGION_WRITE 4 B", LIVENESS, 4),
        write("REGION_WRITE 4 KiB", BUF, 4096),
        Op {
            name: "DMA_MAP+UNMAP 4 KiB",
            steps: vec![
                Step {
                    request: message(Command::DmaMap, &map.encode()),
                    fd: Some(memfd),
                    reply_len: HEADER_SIZE,
                },
                Step {
                    request: message(Command::DmaUnmap, &unmap.encode()),
                    fd: None,
                    reply_len: HEADER_SIZE + 24,
                },
            ],
        },
        Op {
            name: "SET_IRQS 1 eventfd",
            steps: vec![Step {
                request: message(Command::DeviceSetIrqs, &set.encode()),
                fd: Some(eventfd),
                reply_len: HEADER_SIZE,
            }],
        },
    ]
}

fn memfd(len: i64) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated literal; the fd is checked and
    // then owned.
    unsafe {
        let fd = libc::memfd_create(c"airlock-bench".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create failed");
        assert_eq!(libc::ftruncate(fd, len), 0);
        std::os::fd::FromRawFd::from_raw_fd(fd)
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory arguments; the fd is checked and owned.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_CLOEXEC);
        assert!(fd >= 0, "eventfd failed");
        std::os::fd::FromRawFd::from_raw_fd(fd)
    }
}

/// One exchange: the request in one sendmsg, then the reply's known size
/// with blocking reads. Panics on an error reply (the bench would be
/// measuring the wrong thing).
pub fn exchange(sock: &MessageSocket, step: &Step, reply: &mut [u8]) {
    match &step.fd {
        Some(fd) => sock.send_raw(&step.request, &[fd.as_fd()]),
        None => sock.send_raw(&step.request, &[]),
    }
    .expect("send");
    let reply = &mut reply[..step.reply_len];
    sock.stream().read_exact(reply).expect("reply");
    let flags = u32::from_le_bytes(reply[8..12].try_into().expect("4 bytes"));
    assert!(flags & FLAG_ERROR == 0, "error reply {:?}", &reply[12..16]);
}

/// Checks that a server's reply to `step` has exactly the size the timed
/// loop will read (run once per server and op before timing).
pub fn check(sock: &MessageSocket, step: &Step) -> Result<(), String> {
    match &step.fd {
        Some(fd) => sock.send_raw(&step.request, &[fd.as_fd()]),
        None => sock.send_raw(&step.request, &[]),
    }
    .map_err(|e| e.to_string())?;
    let mut h = [0u8; HEADER_SIZE];
    sock.stream()
        .read_exact(&mut h)
        .map_err(|e| e.to_string())?;
    let size = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) as usize;
    let flags = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    let mut rest = vec![0u8; size.saturating_sub(HEADER_SIZE)];
    sock.stream()
        .read_exact(&mut rest)
        .map_err(|e| e.to_string())?;
    if flags & FLAG_ERROR != 0 {
        return Err(format!(
            "error reply, errno {}",
            u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"))
        ));
    }
    if size != step.reply_len {
        return Err(format!(
            "reply of {size} bytes, expected {}",
            step.reply_len
        ));
    }
    Ok(())
}
