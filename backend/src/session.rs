//! One client connection: negotiate, dispatch each command to the device,
//! DMA space and interrupt table, reply, and quiesce when the client goes.
//!
//! Every command gets exactly one reply unless it carried NO_REPLY; errors
//! carry a real errno. A message is consumed whole before it is judged, so
//! a malformed one never desyncs the stream; only an unframeable header
//! closes the connection, and then gracefully (write side first, input
//! drained) because QEMU's client aborts when its unread input is reset.

use std::collections::VecDeque;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use airlock_protocol::device::{
    DeviceInfo, IrqInfo, RegionInfo, RegionIoFds, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
};
use airlock_protocol::dma::{DmaAccess, DmaUnmap, DMA_UNMAP_FLAG_ALL, DMA_UNMAP_SIZE};
use airlock_protocol::header::Command;
use airlock_protocol::region::{RegionAccess, WriteOne, REGION_ACCESS_SIZE};
use airlock_protocol::request::{command_name, Request};
use airlock_protocol::{Header, Limits, MessageSocket, RecvError};
use tracing::{debug, info, warn};

use crate::device::{Device, DmaJob};
use crate::dma::{DmaError, DmaSpace, Segment};
use crate::msi::DoorbellWindow;
use crate::negotiate::{negotiate, IovaSpace, Peer, ServerLimits};

/// How long a new client may take to send VERSION.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// A DMA being carried out with DMA_READ/DMA_WRITE messages.
struct InFlight {
    job: DmaJob,
    /// Pieces still to do, in order; Direct ones are done when reached.
    todo: VecDeque<Segment>,
    /// Bytes read so far (Read jobs) or the position in the data (Write).
    data: Vec<u8>,
    done: usize,
    /// The message id we await a reply for, and the chunk (length, IOVA)
    /// it covers.
    awaiting: Option<(u16, usize, u64)>,
}

/// What one connection asked for, logged when it ends: it shows, e.g.,
/// that BAR accesses went through the mmap fast path (no REGION_* for it).
const READ_SAMPLES: usize = 1024;
const WRITE_SPOTS: usize = 8;

#[derive(Debug)]
struct Stats {
    messages: u64,
    /// REGION_READ / REGION_WRITE (incl. WRITE_MULTI entries) per region
    /// index; the last slot counts indexes >= 9.
    reads: [u64; 10],
    writes: [u64; 10],
    dma_maps: u64,
    set_irqs: u64,
    /// Commands answered with an error (or posted ones that failed).
    errors: u64,
    /// The first distinct (region, offset) pairs written by message, and
    /// how often: which registers miss the mmap fast path.
    write_spots: [(u32, u64, u64); WRITE_SPOTS],
    /// Time spent on the last REGION_READs, arrival to reply sent (ns).
    read_ns: [u32; READ_SAMPLES],
    read_samples: usize,
    /// Device DMAs carried out, and those that failed.
    device_dma: u64,
    device_dma_failed: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            messages: 0,
            reads: [0; 10],
            writes: [0; 10],
            dma_maps: 0,
            set_irqs: 0,
            errors: 0,
            write_spots: [(0, 0, 0); WRITE_SPOTS],
            read_ns: [0; READ_SAMPLES],
            read_samples: 0,
            device_dma: 0,
            device_dma_failed: 0,
        }
    }
}

impl Stats {
    fn slot(region: u32) -> usize {
        (region as usize).min(9)
    }

    fn count_write(&mut self, region: u32, offset: u64) {
        self.writes[Stats::slot(region)] += 1;
        // Config space always goes by message: only BAR registers count.
        if region == airlock_protocol::device::PCI_CONFIG_REGION_INDEX {
            return;
        }
        if let Some(spot) = self
            .write_spots
            .iter_mut()
            .find(|s| s.2 == 0 || (s.0, s.1) == (region, offset))
        {
            *spot = (region, offset, spot.2 + 1);
        }
    }

    /// "region:offset xcount" of the BAR registers written by message.
    fn write_spots(&self) -> String {
        let spots: Vec<String> = self
            .write_spots
            .iter()
            .filter(|s| s.2 > 0)
            .map(|(r, o, n)| format!("{r}:{o:#x} x{n}"))
            .collect();
        spots.join(", ")
    }

    /// Median REGION_READ handling time over the last samples (0: none).
    fn read_median_ns(&self) -> u32 {
        let n = self.read_samples.min(READ_SAMPLES);
        let mut v = self.read_ns[..n].to_vec();
        v.sort_unstable();
        v.get(n / 2).copied().unwrap_or(0)
    }
}

pub struct Session<'a> {
    sock: MessageSocket,
    device: &'a mut dyn Device,
    dma: DmaSpace,
    limits: Limits,
    server: ServerLimits,
    peer: Option<Peer>,
    inflight: Option<InFlight>,
    next_id: u16,
    stats: Stats,
    /// Every IOVA window DMA_MAP must avoid: the device's and --reserve-iova's.
    windows: Vec<DoorbellWindow>,
    /// The device's name for errors, shared so a message costs no allocation.
    name: std::sync::Arc<str>,
    /// REGION_READ data, reused from message to message.
    read_buf: Vec<u8>,
    /// Until the first command other than VERSION, DMA_MAP and DMA_UNMAP:
    /// a replaying client re-maps what it had, and the device may take
    /// over the mappings a killed server left (see Device::adoption_ended).
    adopting: bool,
}

/// How a reply to the current command is produced.
enum Answer {
    /// Send this payload (and fds).
    Payload(Vec<u8>),
    /// A small fixed reply (REGION_WRITE, DMA_UNMAP, WRITE_MULTI echoes),
    /// kept off the heap: these are per-I/O messages.
    Fixed([u8; 32], usize),
    /// Already sent (REGION_READ sends header and data in one sendmsg).
    Sent,
}

impl Answer {
    fn fixed(b: &[u8]) -> Answer {
        let mut buf = [0u8; 32];
        buf[..b.len()].copy_from_slice(b);
        Answer::Fixed(buf, b.len())
    }
}

type Handled = Result<Answer, (i32, String)>;

fn fail(e: impl std::fmt::Display, errno: i32) -> (i32, String) {
    (errno, e.to_string())
}

impl<'a> Session<'a> {
    pub fn new(stream: UnixStream, device: &'a mut dyn Device, server: ServerLimits) -> Self {
        if let Some(w) = device.connect_warning() {
            warn!("{w}");
        }
        let mut windows = device.iova_windows();
        windows.extend(server.windows.iter().cloned());
        let host_mappings = device.needs_host_addresses();
        Session {
            windows,
            name: device.name().into(),
            sock: MessageSocket::new(stream),
            device,
            dma: DmaSpace::new(server.max_dma_maps as usize, host_mappings),
            limits: Limits::new(server.max_data_xfer, server.max_msg_fds as usize),
            server,
            peer: None,
            inflight: None,
            next_id: 0,
            stats: Stats::default(),
            read_buf: Vec::new(),
            adopting: true,
        }
    }

    /// Serves until the client leaves, then quiesces the device and drops
    /// every DMA map (in that order: nothing may DMA into unmapped memory).
    pub fn run(mut self) {
        let started = std::time::Instant::now();
        let mut payload = Vec::new();
        // A client that never negotiates (e.g. the reconnecting chardev of a
        // QEMU whose device is gone) must not hold the device forever.
        let _ = self.sock.stream().set_read_timeout(Some(VERSION_TIMEOUT));
        let mut negotiating = true;
        loop {
            if negotiating && self.peer.is_some() {
                negotiating = false;
                let _ = self.sock.stream().set_read_timeout(None);
            }
            let (header, fds) = match self.sock.recv(&self.limits, &mut payload) {
                Ok(m) => m,
                Err(RecvError::Closed) => break,
                Err(RecvError::Fatal(e)) if negotiating && e.is_timeout() => {
                    warn!(
                        device = self.device.name(),
                        "closing a client that sent no VERSION within {} s; the device is free for the next client",
                        VERSION_TIMEOUT.as_secs()
                    );
                    break;
                }
                Err(RecvError::Fatal(e)) => {
                    warn!(device = self.device.name(), "closing connection: {e}");
                    break;
                }
                Err(RecvError::Rejected(h, e)) => {
                    self.reply_error(&h, e.errno(), &e.to_string());
                    continue;
                }
                Err(RecvError::Unframeable(h, e)) => {
                    self.reply_error(&h, e.errno(), &e.to_string());
                    warn!(
                        device = self.device.name(),
                        "closing connection, stream cannot be resynchronized: {e}"
                    );
                    self.close_gracefully();
                    break;
                }
            };
            if header.is_reply() {
                self.on_reply(&header, &payload);
            } else {
                // airlock's share of a guest's MMIO read: from the request's
                // arrival to the reply's send (the last 1024 kept, for a
                // median that preemption cannot skew). Other commands are
                // not timed: no clock read on their path.
                let arrived =
                    (header.cmd == Command::RegionRead as u16).then(std::time::Instant::now);
                self.dispatch(&header, &payload, fds);
                if let Some(arrived) = arrived {
                    let ns = arrived.elapsed().as_nanos().min(u32::MAX as u128) as u32;
                    let n = self.stats.read_samples;
                    self.stats.read_ns[n % READ_SAMPLES] = ns;
                    self.stats.read_samples += 1;
                }
            }
            self.pump_dma();
        }
        self.device.quiesce();
        self.inflight = None;
        self.end_adoption();
        self.unmap_all();
        let st = &self.stats;
        info!(
            device = self.device.name(),
            "session ended after {:.1} s: {} messages ({} answered with an error), {} DMA maps, {} SET_IRQS, {} device DMAs ({} failed), region reads per index {:?}, region writes per index {:?} (first BAR registers written: {}), REGION_READ handled in {} ns (median of the last {}; arrival to reply sent)",
            started.elapsed().as_secs_f64(),
            st.messages,
            st.errors,
            st.dma_maps,
            st.set_irqs,
            st.device_dma,
            st.device_dma_failed,
            st.reads,
            st.writes,
            st.write_spots(),
            st.read_median_ns(),
            st.read_samples.min(READ_SAMPLES)
        );
    }

    fn end_adoption(&mut self) {
        if std::mem::take(&mut self.adopting) {
            self.device.adoption_ended();
        }
    }

    /// Every map leaves the device first, then airlock's address space.
    fn unmap_all(&mut self) {
        for (iova, size) in self.dma.ranges() {
            self.device.dma_unmapped(iova, size);
        }
        self.dma.clear();
    }

    fn dispatch(&mut self, h: &Header, payload: &[u8], fds: Vec<OwnedFd>) {
        self.stats.messages += 1;
        let req = match Request::decode(h, payload, fds, &self.limits) {
            Ok(r) => r,
            Err(e) => return self.reply_error(h, e.errno(), &e.to_string()),
        };
        if self.peer.is_none() && !matches!(req, Request::Version(_)) {
            return self.reply_error(h, libc::EINVAL, "the first command must be VERSION");
        }
        if self.adopting
            && !matches!(
                req,
                Request::Version(_) | Request::DmaMap { .. } | Request::DmaUnmap(_)
            )
        {
            self.end_adoption();
        }
        let answer = self.handle(h, req);
        if h.no_reply() {
            if let Err((_, why)) = answer {
                self.stats.errors += 1;
                warn!(device = self.device.name(), "posted command failed: {why}");
            }
            return;
        }
        match answer {
            Ok(Answer::Fixed(b, n)) => {
                if let Err(e) = self.sock.send(&h.reply(n), &[&b[..n]], &[]) {
                    debug!("reply failed: {e}");
                }
            }
            Ok(Answer::Payload(p)) => {
                if let Err(e) = self.sock.send(&h.reply(p.len()), &[&p], &[]) {
                    debug!("reply failed: {e}");
                }
            }
            Ok(Answer::Sent) => {}
            Err((errno, why)) => self.reply_error(h, errno, &why),
        }
    }

    fn handle(&mut self, h: &Header, req: Request<'_>) -> Handled {
        let dev = self.name.clone();
        match req {
            Request::Version(v) => {
                if self.peer.is_some() {
                    return Err((libc::EINVAL, "VERSION was already negotiated".into()));
                }
                let host = self.device.usable_iova();
                let space = IovaSpace {
                    host: host.as_deref(),
                    windows: &self.windows,
                };
                let (reply, peer) =
                    negotiate(&v, &self.server, &space).map_err(|e| fail(&e, e.errno()))?;
                info!(device = %dev, "client negotiated vfio-user 0.0");
                debug!(?peer, "client limits");
                self.peer = Some(peer);
                Ok(Answer::Payload(reply.encode()))
            }
            Request::DmaMap { map, fd } => {
                self.stats.dma_maps += 1;
                if let Some(w) = self.windows.iter().find(|w| w.overlaps(map.iova, map.size)) {
                    let why = format!(
                        "{dev}: DMA_MAP [{:#x}, +{:#x}) refused: it overlaps the IOVA window {w}: {}. Fix: keep guest RAM and guest IOVAs out of it (without a vIOMMU, place guest RAM elsewhere; with one, the guest's IOMMU driver must reserve the window: a client can learn the usable ranges by proposing the iova_ranges capability)",
                        map.iova,
                        map.size,
                        w.meaning()
                    );
                    warn!("{why}");
                    return Err((libc::EINVAL, why));
                }
                let backed = fd.is_some();
                self.dma.map(&map, fd).map_err(|e| {
                    warn!(device = %dev, "DMA_MAP refused: {e}");
                    fail(&e, e.errno())
                })?;
                let host = self.dma.host_address(map.iova);
                let file = self.dma.file_id(map.iova);
                if let Err(e) = self
                    .device
                    .dma_mapped(map.iova, map.size, host, map.flags, file)
                {
                    warn!("DMA_MAP refused: {e}");
                    let _ = self.dma.unmap(map.iova, map.size);
                    return Err(fail(&e, e.errno()));
                }
                debug!(iova = map.iova, size = map.size, backed, "DMA_MAP");
                Ok(Answer::Payload(Vec::new()))
            }
            Request::DmaUnmap(u) => {
                if u.flags & DMA_UNMAP_FLAG_ALL != 0 {
                    if u.iova != 0 || u.size != 0 {
                        return Err((
                            libc::EINVAL,
                            "DMA_UNMAP with FLAG_ALL must have iova = size = 0".into(),
                        ));
                    }
                    self.unmap_all();
                } else {
                    if !self.dma.has_exact(u.iova, u.size) {
                        let e = crate::dma::DmaError::NoSuchMap {
                            iova: u.iova,
                            size: u.size,
                        };
                        return Err(fail(&e, e.errno()));
                    }
                    // The device loses the range before airlock's mapping goes.
                    self.device.dma_unmapped(u.iova, u.size);
                    self.dma
                        .unmap(u.iova, u.size)
                        .map_err(|e| fail(&e, e.errno()))?;
                }
                let echo = DmaUnmap {
                    argsz: DMA_UNMAP_SIZE as u32,
                    ..u
                };
                Ok(Answer::fixed(&echo.encode_fixed()))
            }
            Request::DeviceGetInfo(_) => Ok(Answer::Payload(
                DeviceInfo {
                    argsz: DeviceInfo::SIZE as u32,
                    flags: self.device.flags(),
                    num_regions: self.device.num_regions(),
                    num_irqs: self.device.num_irqs(),
                }
                .encode(),
            )),
            Request::RegionInfo(q) => {
                let d = self.device.region(q.index).ok_or_else(|| {
                    (
                        libc::EINVAL,
                        format!("{dev}: region {} does not exist", q.index),
                    )
                })?;
                let info = RegionInfo {
                    argsz: 0,
                    flags: d.flags,
                    index: q.index,
                    cap_offset: 0,
                    size: d.size,
                    offset: d.offset,
                    caps: d.caps,
                };
                let body = info.encode_reply(q.argsz);
                // An mmap-able region's fd goes with the full reply only; a
                // client whose argsz was too small asks again and gets it then.
                let full = body.len() >= info.full_size();
                let fds: Vec<BorrowedFd> =
                    d.fd.filter(|_| full && d.flags & REGION_INFO_FLAG_MMAP != 0)
                        .into_iter()
                        .collect();
                if !h.no_reply() {
                    if let Err(e) = self.sock.send(&h.reply(body.len()), &[&body], &fds) {
                        debug!("reply failed: {e}");
                    }
                }
                Ok(Answer::Sent)
            }
            Request::RegionIoFds(q) => {
                if q.index >= self.device.num_regions() {
                    return Err((
                        libc::EINVAL,
                        format!("{dev}: region {} does not exist", q.index),
                    ));
                }
                // No ioeventfds are offered: an empty sub-region list.
                Ok(Answer::Payload(
                    RegionIoFds {
                        argsz: RegionIoFds::SIZE as u32,
                        flags: 0,
                        index: q.index,
                        count: 0,
                    }
                    .encode(),
                ))
            }
            Request::IrqInfo(q) => {
                let (flags, count) = self.device.irq_info(q.index).ok_or_else(|| {
                    (
                        libc::EINVAL,
                        format!("{dev}: irq index {} does not exist", q.index),
                    )
                })?;
                Ok(Answer::Payload(
                    IrqInfo {
                        argsz: IrqInfo::SIZE as u32,
                        flags,
                        index: q.index,
                        count,
                    }
                    .encode(),
                ))
            }
            Request::SetIrqs(set) => {
                self.stats.set_irqs += 1;
                self.device.set_irqs(set).map_err(|e| fail(&e, e.errno()))?;
                Ok(Answer::Payload(Vec::new()))
            }
            Request::RegionRead(a) => {
                self.stats.reads[Stats::slot(a.region)] += 1;
                self.check_access(&a, REGION_INFO_FLAG_READ)?;
                // One buffer per connection: no allocation per read.
                let buf = &mut self.read_buf;
                buf.clear();
                buf.resize(a.count as usize, 0);
                self.device
                    .read(a.region, a.offset, buf)
                    .map_err(|e| fail(&e, e.errno()))?;
                let buf = &self.read_buf;
                if !h.no_reply() {
                    let fixed = a.encode_fixed();
                    if let Err(e) = self.sock.send(
                        &h.reply(REGION_ACCESS_SIZE + buf.len()),
                        &[&fixed, buf],
                        &[],
                    ) {
                        debug!("reply failed: {e}");
                    }
                }
                Ok(Answer::Sent)
            }
            Request::RegionWrite { access, data } => {
                self.stats.count_write(access.region, access.offset);
                self.check_access(&access, REGION_INFO_FLAG_WRITE)?;
                self.device
                    .write(access.region, access.offset, data)
                    .map_err(|e| fail(&e, e.errno()))?;
                Ok(Answer::fixed(&access.encode_fixed()))
            }
            Request::RegionWriteMulti(writes) => {
                if !self.peer.is_some_and(|p| p.write_multiple) {
                    return Err((
                        libc::EINVAL,
                        "REGION_WRITE_MULTI needs the write_multiple capability, which this client did not propose in VERSION".into(),
                    ));
                }
                for w in &writes {
                    self.write_one(w)?;
                }
                Ok(Answer::fixed(&(writes.len() as u64).to_ne_bytes()))
            }
            Request::DeviceReset => {
                self.device.reset().map_err(|e| fail(&e, e.errno()))?;
                self.inflight = None;
                Ok(Answer::Payload(Vec::new()))
            }
            Request::DeviceFeature(_) => Err((
                libc::ENOTSUP,
                format!("{dev}: no device features are offered"),
            )),
            Request::Unsupported(cmd) => Err((
                libc::ENOTSUP,
                format!("{} is not supported", command_name(cmd)),
            )),
        }
    }

    fn write_one(&mut self, w: &WriteOne) -> Result<(), (i32, String)> {
        self.stats.count_write(w.region, w.offset);
        let a = RegionAccess {
            offset: w.offset,
            region: w.region,
            count: w.count,
        };
        self.check_access(&a, REGION_INFO_FLAG_WRITE)?;
        self.device
            .write(w.region, w.offset, w.bytes())
            .map_err(|e| fail(&e, e.errno()))
    }

    /// Region exists, allows the access, and [offset, offset+count) fits.
    fn check_access(&self, a: &RegionAccess, need: u32) -> Result<(), (i32, String)> {
        let dev = self.device.name();
        let (flags, size) = self.device.region_limits(a.region).ok_or_else(|| {
            (
                libc::EINVAL,
                format!("{dev}: region {} does not exist", a.region),
            )
        })?;
        if flags & need == 0 {
            return Err((
                libc::EINVAL,
                format!("{dev}: region {} does not allow this access", a.region),
            ));
        }
        // Decoding checked offset + count does not overflow.
        if a.offset + a.count as u64 > size {
            return Err((
                libc::EINVAL,
                format!(
                    "{dev}: access [{:#x}, +{:#x}) is outside region {} of size {:#x}",
                    a.offset, a.count, a.region, size
                ),
            ));
        }
        Ok(())
    }

    fn reply_error(&mut self, h: &Header, errno: i32, why: &str) {
        debug!(id = h.id, cmd = h.cmd, errno, "error reply: {why}");
        self.stats.errors += 1;
        if h.no_reply() && !h.is_reply() {
            return;
        }
        if h.is_reply() {
            // Never answer a reply; a stray one is only logged.
            warn!(
                device = self.device.name(),
                "unexpected reply id {}: {why}", h.id
            );
            return;
        }
        if let Err(e) = self.sock.send(&h.error_reply(errno), &[], &[]) {
            debug!("error reply failed: {e}");
        }
    }

    /// Shut our side, then read until the client closes (bounded), so the
    /// client never sees its unread input reset.
    fn close_gracefully(&mut self) {
        self.sock.close_gracefully(Duration::from_secs(5));
    }

    // ---- device DMA -------------------------------------------------------

    /// Starts queued device DMA when none is in flight: direct pieces are
    /// done at once, message pieces are sent one at a time.
    fn pump_dma(&mut self) {
        while self.inflight.is_none() {
            let Some(job) = self.device.take_dma() else {
                return;
            };
            self.stats.device_dma += 1;
            let (iova, len, write) = match &job {
                DmaJob::Read { iova, len } => (*iova, *len, false),
                DmaJob::Write { iova, data } => (*iova, data.len(), true),
            };
            match self.dma.segments(iova, len, write) {
                Err(e) => {
                    self.stats.device_dma_failed += 1;
                    debug!(device = self.device.name(), "device DMA refused: {e}");
                    self.device.complete_dma(job, Err(e));
                }
                Ok(segs) => {
                    let data = match &job {
                        DmaJob::Read { len, .. } => vec![0u8; *len],
                        DmaJob::Write { data, .. } => data.clone(),
                    };
                    self.inflight = Some(InFlight {
                        job,
                        todo: segs.into(),
                        data,
                        done: 0,
                        awaiting: None,
                    });
                    self.advance();
                }
            }
        }
    }

    /// Moves the in-flight DMA forward until it waits on a message or ends.
    fn advance(&mut self) {
        loop {
            let Some(f) = self.inflight.as_mut() else {
                return;
            };
            let write = matches!(f.job, DmaJob::Write { .. });
            let Some(seg) = f.todo.pop_front() else {
                let f = self.inflight.take().expect("checked above");
                let data = if write { Vec::new() } else { f.data };
                self.device.complete_dma(f.job, Ok(data));
                return;
            };
            match seg {
                Segment::Direct { iova, len } => {
                    let range = f.done..f.done + len;
                    let r = if write {
                        self.dma.write_direct(iova, &f.data[range])
                    } else {
                        self.dma.read_direct(iova, &mut f.data[range])
                    };
                    f.done += len;
                    if let Err(e) = r {
                        return self.fail_dma(e);
                    }
                }
                Segment::Message { iova, len } => {
                    let peer = self.peer.unwrap_or_default();
                    let chunk = len
                        .min(peer.max_data_xfer as usize)
                        .min(self.server.max_data_xfer as usize);
                    if chunk < len {
                        f.todo.push_front(Segment::Message {
                            iova: iova + chunk as u64,
                            len: len - chunk,
                        });
                    }
                    self.next_id = self.next_id.wrapping_add(1);
                    let id = self.next_id;
                    let a = DmaAccess {
                        iova,
                        count: chunk as u32,
                    };
                    let (cmd, body) = if write {
                        (
                            Command::DmaWrite,
                            a.encode_write_request(&f.data[f.done..f.done + chunk]),
                        )
                    } else {
                        (Command::DmaRead, a.encode_read_request())
                    };
                    f.awaiting = Some((id, chunk, iova));
                    let h = Header::command(id, cmd, body.len(), false);
                    if let Err(e) = self.sock.send(&h, &[&body], &[]) {
                        return self.fail_dma(DmaError::Client {
                            iova,
                            errno: e.errno(),
                        });
                    }
                    return;
                }
            }
        }
    }

    fn fail_dma(&mut self, e: DmaError) {
        if let Some(f) = self.inflight.take() {
            self.stats.device_dma_failed += 1;
            debug!(device = self.device.name(), "device DMA failed: {e}");
            self.device.complete_dma(f.job, Err(e));
        }
    }

    /// A reply from the client: the answer to our DMA_READ/DMA_WRITE.
    fn on_reply(&mut self, h: &Header, payload: &[u8]) {
        let awaited = self.inflight.as_ref().and_then(|f| f.awaiting).map(|a| a.0);
        if awaited != Some(h.id) {
            // A reply nobody awaits (e.g. to a DMA_READ a DEVICE_RESET
            // abandoned) is dropped: answering a reply would put a message
            // the client never asked for into its stream.
            debug!(
                device = self.device.name(),
                "dropping a reply nobody awaits: id {} (command {})", h.id, h.cmd
            );
            return;
        }
        let Some(f) = self.inflight.as_mut() else {
            return;
        };
        let Some((_, chunk, iova)) = f.awaiting.take() else {
            return;
        };
        let write = matches!(f.job, DmaJob::Write { .. });
        if h.is_error() {
            return self.fail_dma(DmaError::Client {
                iova,
                errno: h.error as i32,
            });
        }
        let want = if write {
            Command::DmaWrite
        } else {
            Command::DmaRead
        };
        let checked = if h.cmd != want as u16 {
            Err(format!("reply to message {} names command {}", h.id, h.cmd))
        } else if write {
            Ok(())
        } else {
            DmaAccess::decode(payload, "DMA_READ reply")
                .and_then(|(a, rest)| Ok((a, a.data(rest, "DMA_READ reply")?)))
                .map_err(|e| e.to_string())
                .and_then(|(a, data)| {
                    if a.iova != iova || a.count as usize != chunk {
                        return Err(format!(
                            "DMA_READ reply is for [{:#x}, +{:#x}), the request was [{iova:#x}, +{chunk:#x})",
                            a.iova, a.count
                        ));
                    }
                    f.data[f.done..f.done + chunk].copy_from_slice(data);
                    Ok(())
                })
        };
        if let Err(why) = checked {
            warn!(
                device = self.device.name(),
                "device DMA at {iova:#x} failed: the client's reply is malformed ({why}); airlock expects QEMU's layout (address u64, count u32, data)"
            );
            return self.fail_dma(DmaError::Client {
                iova,
                errno: libc::EPROTO,
            });
        }
        f.done += chunk;
        self.advance();
    }
}
