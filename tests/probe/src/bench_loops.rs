//! The loops `--bench-dma` times (bench_dma.rs): DMA_MAP+DMA_UNMAP pairs
//! through a vfio-user server, serially or pipelined, empty round trips,
//! and the floor: the same two VFIO ioctls issued directly on a container
//! of this process's own.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use airlock_protocol::client::Client;
use airlock_protocol::device::PCI_CONFIG_REGION_INDEX;
use airlock_protocol::dma::{DmaMap, DmaUnmap, DMA_MAP_SIZE, DMA_UNMAP_SIZE};
use airlock_protocol::dma_multi::{
    decode_multi_reply, encode_map_multi, encode_unmap_multi, DmaMapEntry, DmaUnmapEntry,
};
use airlock_protocol::Command;

use crate::bench_dma::{IOVA, PAIRS, RW, SIZE};
use crate::os::Memfd;

// <linux/vfio.h>: _IO(';', 100 + n).
const VFIO_GET_API_VERSION: libc::c_ulong = 0x3b64;
const VFIO_SET_IOMMU: libc::c_ulong = 0x3b66;
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = 0x3b68;
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = 0x3b71;
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = 0x3b72;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;

pub(crate) fn round_trips(c: &mut Client) -> Result<(), String> {
    for _ in 0..PAIRS * 2 {
        c.read32(PCI_CONFIG_REGION_INDEX, 0)
            .map_err(|e| format!("REGION_READ: {e}"))?;
    }
    Ok(())
}

/// Two empty round trips to the echo per pair; with `floor`, each is
/// followed by one of the pair's ioctls. With `poll`, each answer is
/// awaited by polling the socket (MessageSocket::poll, as airlock's
/// --poll-us) rather than by sleeping in recvmsg.
pub(crate) fn echo_pings(
    echo: &mut Client,
    floor: Option<(&Floor, u64)>,
    poll: bool,
) -> Result<(), String> {
    let ping = |c: &mut Client| {
        let id = c
            .send_command(Command::DeviceGetInfo, &[], &[])
            .map_err(|e| format!("echo ping: {e}"))?;
        if poll {
            // What `airlock --poll-us` does before its read; a timeout or
            // an error is left to reply_to below to report.
            let _ = c.socket().poll(std::time::Duration::from_secs(10));
        }
        c.reply_to(id, Command::DeviceGetInfo)
            .map(drop)
            .map_err(|e| format!("echo ping: {e}"))
    };
    for _ in 0..PAIRS {
        ping(echo)?;
        if let Some((f, vaddr)) = floor {
            f.map(vaddr, IOVA, SIZE as u64)?;
        }
        ping(echo)?;
        if let Some((f, _)) = floor {
            f.unmap(IOVA, SIZE as u64)?;
        }
    }
    Ok(())
}

pub(crate) fn floor_fresh(floor: &Floor, mem: &Memfd) -> Result<(), String> {
    for _ in 0..PAIRS {
        let m = crate::os::Mapping::new(mem.fd.as_fd(), 0, SIZE)?;
        floor.map(m.as_ptr() as u64, IOVA, SIZE as u64)?;
        floor.unmap(IOVA, SIZE as u64)?;
        drop(m);
    }
    Ok(())
}

pub(crate) fn floor_mapped(floor: &Floor, vaddr: u64) -> Result<(), String> {
    for _ in 0..PAIRS {
        floor.map(vaddr, IOVA, SIZE as u64)?;
        floor.unmap(IOVA, SIZE as u64)?;
    }
    Ok(())
}

/// Each message waits for its reply: two round trips per pair.
pub(crate) fn serial(c: &mut Client, mem: &Memfd) -> Result<(), String> {
    for _ in 0..PAIRS {
        c.dma_map(IOVA, SIZE as u64, 0, RW, Some(mem.fd.as_fd()))
            .map_err(|e| format!("DMA_MAP: {e}"))?;
        c.dma_unmap(IOVA, SIZE as u64, 0)
            .map_err(|e| format!("DMA_UNMAP: {e}"))?;
    }
    Ok(())
}

/// Where a pipelined client sleeps while it waits for replies.
#[derive(Clone, Copy)]
pub(crate) enum Await {
    /// In recvmsg, as `Client` reads.
    InRecv,
    /// In poll(2) for input, before each read with nothing buffered (as
    /// QEMU's event loop does), then recvmsg.
    InPoll,
}

/// All PAIRS pairs sent before any reply is read, then the replies
/// collected in order. Every pair uses the same IOVA: the server handles
/// messages in order, so MAP, UNMAP, MAP, ... there is valid. 100 small
/// messages fit in the socket buffers, so sending cannot block on replies
/// nobody is reading yet.
pub(crate) fn pipelined(c: &mut Client, mem: &Memfd, wait: Await) -> Result<(), String> {
    let map = DmaMap {
        argsz: DMA_MAP_SIZE as u32,
        flags: RW,
        offset: 0,
        iova: IOVA,
        size: SIZE as u64,
    }
    .encode();
    let unmap = DmaUnmap {
        argsz: DMA_UNMAP_SIZE as u32,
        flags: 0,
        iova: IOVA,
        size: SIZE as u64,
    }
    .encode();
    let mut ids = [(0u16, 0u16); PAIRS];
    for (i, id) in ids.iter_mut().enumerate() {
        let err = |what: &str, e| format!("{what} {i} (pipelined, sending): {e}");
        id.0 = c
            .send_command(Command::DmaMap, &map, &[mem.fd.as_fd()])
            .map_err(|e| err("DMA_MAP", e))?;
        id.1 = c
            .send_command(Command::DmaUnmap, &unmap, &[])
            .map_err(|e| err("DMA_UNMAP", e))?;
    }
    for (i, &(m, u)) in ids.iter().enumerate() {
        // An error reply arrives as ProtocolError::Remote, which names
        // the errno; a reply to another id or command is a BadReply.
        let err = |what: &str, e| format!("{what} {i} (pipelined): {e}");
        await_reply(c, wait).map_err(|e| format!("DMA_MAP {i} (pipelined): {e}"))?;
        c.reply_to(m, Command::DmaMap)
            .map_err(|e| err("DMA_MAP", e))?;
        await_reply(c, wait).map_err(|e| format!("DMA_UNMAP {i} (pipelined): {e}"))?;
        let r = c
            .reply_to(u, Command::DmaUnmap)
            .map_err(|e| err("DMA_UNMAP", e))?;
        // What dma_unmap() checks in the serial loop, so both do the same.
        DmaUnmap::decode(&r.payload).map_err(|e| err("DMA_UNMAP", e))?;
    }
    Ok(())
}

/// The PAIRS pairs as two messages: one DMA_MAP_MULTI of PAIRS maps (all
/// of the one memfd, at PAIRS IOVAs), then one DMA_UNMAP_MULTI of them,
/// each awaited like a memory-listener transaction's commit. The server
/// makes the same IOMMU calls as for PAIRS DMA_MAPs and DMA_UNMAPs; only
/// the messages are fewer.
pub(crate) fn batched(c: &mut Client, mem: &Memfd) -> Result<(), String> {
    batched_of(c, mem, PAIRS, Await::InRecv)
}

/// `batched` with batches of `n` pairs (at most DMA_MULTI_MAX), each reply
/// awaited as `wait` says.
pub(crate) fn batched_of(c: &mut Client, mem: &Memfd, n: usize, wait: Await) -> Result<(), String> {
    let maps: Vec<DmaMapEntry> = (0..n as u64)
        .map(|i| DmaMapEntry {
            flags: RW,
            fd_index: 0,
            offset: 0,
            iova: IOVA + i * SIZE as u64,
            size: SIZE as u64,
        })
        .collect();
    let unmaps: Vec<DmaUnmapEntry> = maps
        .iter()
        .map(|m| DmaUnmapEntry {
            flags: 0,
            iova: m.iova,
            size: m.size,
        })
        .collect();
    let (mapped, unmapped) = match wait {
        Await::InRecv => (
            c.dma_map_multi(&maps, &[mem.fd.as_fd()])
                .map_err(|e| format!("DMA_MAP_MULTI of {n}: {e}"))?,
            c.dma_unmap_multi(&unmaps)
                .map_err(|e| format!("DMA_UNMAP_MULTI of {n}: {e}"))?,
        ),
        Await::InPoll => (
            request_in_poll(
                c,
                Command::DmaMapMulti,
                &encode_map_multi(&maps),
                &[mem.fd.as_fd()],
            )?,
            request_in_poll(c, Command::DmaUnmapMulti, &encode_unmap_multi(&unmaps), &[])?,
        ),
    };
    // Each entry has its own errno; every one must be 0.
    let refused = |e: &[u32]| e.len() != n || e.iter().any(|&x| x != 0);
    if refused(&mapped) || refused(&unmapped) {
        return Err(format!(
            "DMA_MAP_MULTI / DMA_UNMAP_MULTI of {n}: errnos {mapped:?} / {unmapped:?}"
        ));
    }
    Ok(())
}

/// One DMA_MAP_MULTI or DMA_UNMAP_MULTI with `fds`, its reply awaited in
/// poll(2) as QEMU's event loop waits; each entry's errno.
fn request_in_poll(
    c: &mut Client,
    cmd: Command,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<Vec<u32>, String> {
    let err = |e| format!("{cmd:?} (reply awaited in poll): {e}");
    let id = c.send_command(cmd, payload, fds).map_err(err)?;
    await_reply(c, Await::InPoll)?;
    let r = c.reply_to(id, cmd).map_err(err)?;
    decode_multi_reply(&r.payload, "multi reply").map_err(err)
}

/// The floor in the batched loop's order: PAIRS maps at PAIRS IOVAs, then
/// their PAIRS unmaps.
pub(crate) fn floor_batched(floor: &Floor, vaddr: u64) -> Result<(), String> {
    floor_maps(floor, vaddr)?;
    floor_unmaps(floor)
}

/// The first half of `floor_batched`: PAIRS maps at PAIRS IOVAs.
pub(crate) fn floor_maps(floor: &Floor, vaddr: u64) -> Result<(), String> {
    (0..PAIRS as u64).try_for_each(|i| floor.map(vaddr, IOVA + i * SIZE as u64, SIZE as u64))
}

/// The second half of `floor_batched`: the PAIRS maps' unmaps.
pub(crate) fn floor_unmaps(floor: &Floor) -> Result<(), String> {
    (0..PAIRS as u64).try_for_each(|i| floor.unmap(IOVA + i * SIZE as u64, SIZE as u64))
}

/// The floor in the batched loop's order with the unmaps joined: PAIRS
/// maps at adjacent IOVAs, then one VFIO_IOMMU_UNMAP_DMA over all of them
/// (type1 unmaps every mapping inside the range). What a server that
/// joins a DMA_UNMAP_MULTI's adjacent entries into one ioctl makes.
pub(crate) fn floor_batched_joined(floor: &Floor, vaddr: u64) -> Result<(), String> {
    for i in 0..PAIRS as u64 {
        floor.map(vaddr, IOVA + i * SIZE as u64, SIZE as u64)?;
    }
    floor.unmap(IOVA, (PAIRS * SIZE) as u64)
}

/// With `Await::InPoll`, sleeps in poll(2) until a reply can be read (at
/// once when one is buffered).
fn await_reply(c: &Client, wait: Await) -> Result<(), String> {
    if let Await::InPoll = wait {
        let limit = std::time::Duration::from_secs(10);
        if !c.socket().wait_readable(limit).map_err(|e| e.to_string())? {
            return Err("no reply within 10 s".into());
        }
    }
    Ok(())
}

/// A type1v2 container with GROUP attached: the direct-ioctl floor.
pub(crate) struct Floor {
    container: OwnedFd,
    _group: OwnedFd,
}

fn open(path: &str) -> Result<OwnedFd, String> {
    let c = std::ffi::CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open {path}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(fd: &OwnedFd, req: libc::c_ulong, arg: libc::c_ulong, what: &str) -> Result<(), String> {
    // SAFETY: these VFIO ioctls take an integer or a pointer to a live,
    // correctly sized struct (the callers').
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Floor {
    pub(crate) fn open(group: &str) -> Result<Floor, String> {
        let container = open("/dev/vfio/vfio")?;
        ioctl(&container, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")?;
        let g = open(&format!("/dev/vfio/{group}"))?;
        let cfd = container.as_raw_fd();
        ioctl(
            &g,
            VFIO_GROUP_SET_CONTAINER,
            &cfd as *const i32 as libc::c_ulong,
            "VFIO_GROUP_SET_CONTAINER",
        )?;
        ioctl(
            &container,
            VFIO_SET_IOMMU,
            VFIO_TYPE1V2_IOMMU,
            "VFIO_SET_IOMMU",
        )?;
        Ok(Floor {
            container,
            _group: g,
        })
    }

    fn map(&self, vaddr: u64, iova: u64, size: u64) -> Result<(), String> {
        // struct vfio_iommu_type1_dma_map: argsz, flags, vaddr, iova, size.
        let mut b = [0u64; 4];
        b[0] = 32 | (3u64 << 32); // argsz 32, flags READ | WRITE
        b[1] = vaddr;
        b[2] = iova;
        b[3] = size;
        ioctl(
            &self.container,
            VFIO_IOMMU_MAP_DMA,
            b.as_mut_ptr() as libc::c_ulong,
            "VFIO_IOMMU_MAP_DMA",
        )
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), String> {
        // struct vfio_iommu_type1_dma_unmap: argsz, flags, iova, size.
        let mut b = [0u64; 3];
        b[0] = 24;
        b[1] = iova;
        b[2] = size;
        ioctl(
            &self.container,
            VFIO_IOMMU_UNMAP_DMA,
            b.as_mut_ptr() as libc::c_ulong,
            "VFIO_IOMMU_UNMAP_DMA",
        )
    }
}
