//! One client connection: negotiate, dispatch each command to the device,
//! DMA space and interrupt table, reply, and quiesce when the client goes.
//!
//! Every command gets exactly one reply unless it carried NO_REPLY; errors
//! carry a real errno. A message is consumed whole before it is judged, so
//! a malformed one never desyncs the stream; only an unframeable header
//! closes the connection, and then gracefully (write side first, input
//! drained) because QEMU's client aborts when its unread input is reset.
//! Each command has its own method below; the device's own DMA runs in
//! [`super::device_dma`], the summary's counters in [`super::stats`], the
//! DMA map commands in dma.rs, the region commands in regions.rs.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use airlock_protocol::device::{DeviceInfo, IrqInfo};
use airlock_protocol::irqs::IrqSet;
use airlock_protocol::request::{command_name, Request};
use airlock_protocol::version::Version;
use airlock_protocol::{Header, Limits, MessageSocket, RecvError};
use tracing::{debug, info, warn};

use super::device_dma::{DeviceDma, Link};
use super::stats::{Stats, Timed, SAMPLES};
use crate::device::Device;
use crate::dma::DmaSpace;
use crate::iova::DoorbellWindow;
use crate::negotiate::{negotiate, IovaSpace, Peer, ServerLimits};

/// How long a new client may take to send VERSION.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Session<'a> {
    sock: MessageSocket,
    device: &'a mut dyn Device,
    dma: DmaSpace,
    limits: Limits,
    server: ServerLimits,
    peer: Option<Peer>,
    device_dma: DeviceDma,
    stats: Stats,
    /// Every IOVA window DMA_MAP must avoid: the device's and --reserve-iova's.
    windows: Vec<DoorbellWindow>,
    /// The device's name for errors, shared so a message costs no allocation.
    name: std::sync::Arc<str>,
    /// REGION_READ data, reused from message to message.
    read_buf: Vec<u8>,
    /// Until the first command other than VERSION and the DMA (un)maps:
    /// a replaying client re-maps what it had, and the device may take
    /// over the mappings a killed server left (see Device::adoption_ended).
    adopting: bool,
}

/// How a reply to the current command is produced.
enum Answer {
    /// Send this payload.
    Payload(Vec<u8>),
    /// A small fixed reply (REGION_WRITE, DMA_UNMAP, WRITE_MULTI echoes),
    /// kept off the heap: these are per-I/O messages.
    Fixed([u8; 32], usize),
    /// Already sent (REGION_READ sends header and data in one sendmsg,
    /// GET_REGION_INFO its fd with the reply).
    Sent,
}

impl Answer {
    fn fixed(b: &[u8]) -> Answer {
        let mut buf = [0u8; 32];
        buf[..b.len()].copy_from_slice(b);
        Answer::Fixed(buf, b.len())
    }

    fn empty() -> Answer {
        Answer::Payload(Vec::new())
    }
}

/// An error reply: errno and why, for the client and the log.
type Refusal = (i32, String);
type Handled = Result<Answer, Refusal>;

fn fail(e: impl std::fmt::Display, errno: i32) -> Refusal {
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
            device_dma: DeviceDma::default(),
            stats: Stats::default(),
            read_buf: Vec::new(),
            adopting: true,
        }
    }

    /// Serves until the client leaves, then quiesces the device and drops
    /// every DMA map (in that order: nothing may DMA into unmapped memory).
    pub fn run(mut self) {
        let started = Instant::now();
        self.serve();
        self.device.quiesce();
        self.device_dma.abandon();
        self.end_adoption();
        self.unmap_all();
        let iommu = self.device.dma_summary().map(|s| format!(" ({s})"));
        let st = &self.stats;
        info!(
            device = self.device.name(),
            "session ended after {:.1} s: {} messages ({} answered with an error), {} DMA maps, {} DMA unmaps ({} of them in {} DMA_MAP_MULTI/DMA_UNMAP_MULTI){}, {} SET_IRQS, {} device DMAs ({} failed), region reads per index {:?}, region writes per index {:?} (first BAR registers written: {}), handled in (medians of at most the last {SAMPLES} of each, arrival to reply sent): REGION_READ {} ns, DMA_MAP {} ns, DMA_UNMAP {} ns, DMA_MAP_MULTI {} ns, DMA_UNMAP_MULTI {} ns",
            started.elapsed().as_secs_f64(),
            st.messages,
            st.errors,
            st.dma_maps,
            st.dma_unmaps,
            st.dma_batched,
            st.dma_batches,
            iommu.unwrap_or_default(),
            st.set_irqs,
            self.device_dma.started,
            self.device_dma.failed,
            st.reads,
            st.writes,
            st.write_spots(),
            st.read_ns.median_ns(),
            st.map_ns.median_ns(),
            st.unmap_ns.median_ns(),
            st.map_multi_ns.median_ns(),
            st.unmap_multi_ns.median_ns()
        );
    }

    /// The receive loop: returns when the client closed, timed out before
    /// VERSION, or sent a stream that cannot be resynchronized.
    fn serve(&mut self) {
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
            if !negotiating && !self.server.poll.is_zero() {
                // An error here is the read's to report.
                let _ = self.sock.poll(self.server.poll);
            }
            let (header, fds) = match self.sock.recv(&self.limits, &mut payload) {
                Ok(m) => m,
                Err(RecvError::Closed) => return,
                Err(RecvError::Fatal(e)) if negotiating && e.is_timeout() => {
                    warn!(
                        device = self.device.name(),
                        "closing a client that sent no VERSION within {} s; the device is free for the next client",
                        VERSION_TIMEOUT.as_secs()
                    );
                    return;
                }
                Err(RecvError::Fatal(e)) => {
                    warn!(device = self.device.name(), "closing connection: {e}");
                    return;
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
                    // Shut our side, then read until the client closes
                    // (bounded), so it never sees its unread input reset.
                    self.sock.close_gracefully(Duration::from_secs(5));
                    return;
                }
            };
            if header.is_reply() {
                self.with_device_dma(|d, link| d.on_reply(link, &header, &payload));
            } else {
                // Only REGION_READ, DMA_MAP and DMA_UNMAP are timed: no
                // clock read on other paths.
                let timed = Timed::of(header.cmd).map(|t| (t, Instant::now()));
                self.dispatch(&header, &payload, fds);
                if let Some((t, arrived)) = timed {
                    self.stats.take(t, arrived);
                }
            }
            self.pump_dma();
        }
    }

    fn pump_dma(&mut self) {
        self.with_device_dma(|d, link| d.pump(link));
    }

    /// Runs `f` on the device DMA with what it needs of the session.
    fn with_device_dma(&mut self, f: impl FnOnce(&mut DeviceDma, &mut Link<'_>)) {
        let mut link = Link {
            device: &mut *self.device,
            dma: &self.dma,
            sock: &self.sock,
            max_chunk: max_chunk(self.peer, &self.server),
        };
        f(&mut self.device_dma, &mut link);
    }

    fn end_adoption(&mut self) {
        if std::mem::take(&mut self.adopting) {
            self.device.adoption_ended();
        }
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
                Request::Version(_)
                    | Request::DmaMap { .. }
                    | Request::DmaUnmap(_)
                    | Request::DmaMapMulti { .. }
                    | Request::DmaUnmapMulti(_)
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
        let sent = match answer {
            Ok(Answer::Fixed(b, n)) => self.sock.send_reply(&h.reply(n), &[&b[..n]]),
            Ok(Answer::Payload(p)) => self.sock.send_reply(&h.reply(p.len()), &[&p]),
            Ok(Answer::Sent) => Ok(()),
            Err((errno, why)) => return self.reply_error(h, errno, &why),
        };
        if let Err(e) = sent {
            debug!("reply failed: {e}");
        }
    }

    fn handle(&mut self, h: &Header, req: Request<'_>) -> Handled {
        match req {
            Request::Version(v) => self.version(&v),
            Request::DmaMap { map, fd } => self.dma_map(&map, fd),
            Request::DmaUnmap(u) => self.dma_unmap(u),
            Request::DmaMapMulti { maps, fds } => self.dma_map_multi(&maps, fds),
            Request::DmaUnmapMulti(unmaps) => self.dma_unmap_multi(&unmaps),
            Request::DeviceGetInfo(_) => Ok(self.device_info()),
            Request::RegionInfo(q) => self.region_info(h, &q),
            Request::RegionIoFds(q) => self.region_io_fds(&q),
            Request::IrqInfo(q) => self.irq_info(&q),
            Request::SetIrqs(set) => self.set_irqs(set),
            Request::RegionRead(a) => self.region_read(h, &a),
            Request::RegionWrite { access, data } => self.region_write(&access, data),
            Request::RegionWriteMulti(writes) => self.region_write_multi(&writes),
            Request::DeviceReset => self.device_reset(),
            Request::DeviceFeature(_) => Err((
                libc::ENOTSUP,
                format!("{}: no device features are offered", self.name),
            )),
            Request::Unsupported(cmd) => Err((
                libc::ENOTSUP,
                format!("{} is not supported", command_name(cmd)),
            )),
        }
    }

    /// VERSION: once, first; the reply carries airlock's limits and, to a
    /// client that proposed iova_ranges, the usable IOVA ranges.
    fn version(&mut self, v: &Version) -> Handled {
        if self.peer.is_some() {
            return Err((libc::EINVAL, "VERSION was already negotiated".into()));
        }
        let host = self.device.usable_iova();
        let space = IovaSpace {
            host: host.as_deref(),
            windows: &self.windows,
        };
        let (reply, peer) = negotiate(v, &self.server, &space).map_err(|e| fail(&e, e.errno()))?;
        info!(device = %self.name, "client negotiated vfio-user 0.0");
        debug!(?peer, "client limits");
        self.peer = Some(peer);
        Ok(Answer::Payload(reply.encode()))
    }

    fn device_info(&self) -> Answer {
        Answer::Payload(
            DeviceInfo {
                argsz: DeviceInfo::SIZE as u32,
                flags: self.device.flags(),
                num_regions: self.device.num_regions(),
                num_irqs: self.device.num_irqs(),
            }
            .encode(),
        )
    }

    fn irq_info(&self, q: &IrqInfo) -> Handled {
        let (flags, count) = self.device.irq_info(q.index).ok_or_else(|| {
            (
                libc::EINVAL,
                format!("{}: irq index {} does not exist", self.name, q.index),
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

    fn set_irqs(&mut self, set: IrqSet) -> Handled {
        self.stats.set_irqs += 1;
        self.device.set_irqs(set).map_err(|e| fail(&e, e.errno()))?;
        Ok(Answer::empty())
    }

    /// DEVICE_RESET: a device DMA in flight is abandoned with it.
    fn device_reset(&mut self) -> Handled {
        self.device.reset().map_err(|e| fail(&e, e.errno()))?;
        self.device_dma.abandon();
        Ok(Answer::empty())
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
        if let Err(e) = self.sock.send_reply(&h.error_reply(errno), &[]) {
            debug!("error reply failed: {e}");
        }
    }
}

/// The largest DMA_READ/DMA_WRITE chunk both sides accept.
fn max_chunk(peer: Option<Peer>, server: &ServerLimits) -> usize {
    let peer = peer.unwrap_or_default();
    peer.max_data_xfer.min(server.max_data_xfer) as usize
}

mod dma;
mod regions;
#[cfg(test)]
mod tests;
