//! DMA a device asked for, carried out for it: directly through the DMA
//! space where the client's memory is mapped, or with DMA_READ/DMA_WRITE
//! messages to the client, one chunk in flight at a time. The device never
//! blocks the connection while the client answers: the session hands each
//! reply here ([`DeviceDma::on_reply`]) between commands.

use std::collections::VecDeque;

use airlock_protocol::dma::DmaAccess;
use airlock_protocol::header::Command;
use airlock_protocol::{Header, MessageSocket};
use tracing::{debug, warn};

use crate::device::{Device, DmaJob};
use crate::dma::{DmaError, DmaSpace, Segment};

/// What a device DMA needs of the session while it runs.
pub(super) struct Link<'s> {
    pub device: &'s mut dyn Device,
    pub dma: &'s DmaSpace,
    pub sock: &'s MessageSocket,
    /// The largest DMA_READ/DMA_WRITE chunk: the smaller of the client's
    /// and airlock's max_data_xfer.
    pub max_chunk: usize,
}

/// A DMA being carried out with DMA_READ/DMA_WRITE messages.
struct InFlight {
    job: DmaJob,
    /// Pieces still to do, in order; Direct ones are done when reached.
    todo: VecDeque<Segment>,
    /// Bytes read so far (Read jobs) or the data to write (Write jobs).
    data: Vec<u8>,
    /// Position in `data` of the next piece.
    done: usize,
    /// The message id a reply is awaited for, and the chunk (length, IOVA)
    /// it covers.
    awaiting: Option<(u16, usize, u64)>,
}

impl InFlight {
    fn writes(&self) -> bool {
        matches!(self.job, DmaJob::Write { .. })
    }
}

/// The device DMA of one connection: at most one job in flight.
#[derive(Default)]
pub(super) struct DeviceDma {
    inflight: Option<InFlight>,
    next_id: u16,
    /// Jobs started, and those that failed (for the session's summary).
    pub started: u64,
    pub failed: u64,
}

impl DeviceDma {
    /// Forgets the job in flight (DEVICE_RESET, the client leaving): a late
    /// reply to it is then dropped as one nobody awaits.
    pub fn abandon(&mut self) {
        self.inflight = None;
    }

    /// Starts queued device DMA when none is in flight: direct pieces are
    /// done at once, message pieces are sent one at a time.
    pub fn pump(&mut self, link: &mut Link<'_>) {
        while self.inflight.is_none() {
            let Some(job) = link.device.take_dma() else {
                return;
            };
            self.started += 1;
            let (iova, len, write) = match &job {
                DmaJob::Read { iova, len } => (*iova, *len, false),
                DmaJob::Write { iova, data } => (*iova, data.len(), true),
            };
            match link.dma.segments(iova, len, write) {
                Err(e) => {
                    self.failed += 1;
                    debug!(device = link.device.name(), "device DMA refused: {e}");
                    link.device.complete_dma(job, Err(e));
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
                    self.advance(link);
                }
            }
        }
    }

    /// Moves the job in flight forward until it waits on a message or ends.
    fn advance(&mut self, link: &mut Link<'_>) {
        loop {
            let Some(f) = self.inflight.as_mut() else {
                return;
            };
            let write = f.writes();
            let Some(seg) = f.todo.pop_front() else {
                let Some(f) = self.inflight.take() else {
                    return;
                };
                let data = if write { Vec::new() } else { f.data };
                link.device.complete_dma(f.job, Ok(data));
                return;
            };
            match seg {
                Segment::Direct { iova, len } => {
                    let range = f.done..f.done + len;
                    let r = if write {
                        link.dma.write_direct(iova, &f.data[range])
                    } else {
                        link.dma.read_direct(iova, &mut f.data[range])
                    };
                    f.done += len;
                    if let Err(e) = r {
                        return self.fail(link, e);
                    }
                }
                Segment::Message { iova, len } => {
                    let chunk = len.min(link.max_chunk);
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
                    if let Err(e) = link.sock.send(&h, &[&body], &[]) {
                        return self.fail(
                            link,
                            DmaError::Client {
                                iova,
                                errno: e.errno(),
                            },
                        );
                    }
                    return;
                }
            }
        }
    }

    fn fail(&mut self, link: &mut Link<'_>, e: DmaError) {
        if let Some(f) = self.inflight.take() {
            self.failed += 1;
            debug!(device = link.device.name(), "device DMA failed: {e}");
            link.device.complete_dma(f.job, Err(e));
        }
    }

    /// A reply from the client: the answer to our DMA_READ/DMA_WRITE.
    pub fn on_reply(&mut self, link: &mut Link<'_>, h: &Header, payload: &[u8]) {
        let awaited = self.inflight.as_ref().and_then(|f| f.awaiting).map(|a| a.0);
        if awaited != Some(h.id) {
            // A reply nobody awaits (e.g. to a DMA_READ a DEVICE_RESET
            // abandoned) is dropped: answering a reply would put a message
            // the client never asked for into its stream.
            debug!(
                device = link.device.name(),
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
        if h.is_error() {
            return self.fail(
                link,
                DmaError::Client {
                    iova,
                    errno: h.error as i32,
                },
            );
        }
        if let Err(why) = take_reply(f, h, payload, chunk, iova) {
            warn!(
                device = link.device.name(),
                "device DMA at {iova:#x} failed: the client's reply is malformed ({why}); airlock expects QEMU's layout (address u64, count u32, data)"
            );
            return self.fail(
                link,
                DmaError::Client {
                    iova,
                    errno: libc::EPROTO,
                },
            );
        }
        f.done += chunk;
        self.advance(link);
    }
}

/// Checks a reply against the chunk it answers; a DMA_READ reply's data
/// lands in the job's buffer.
fn take_reply(
    f: &mut InFlight,
    h: &Header,
    payload: &[u8],
    chunk: usize,
    iova: u64,
) -> Result<(), String> {
    let want = if f.writes() {
        Command::DmaWrite
    } else {
        Command::DmaRead
    };
    if h.cmd != want as u16 {
        return Err(format!("reply to message {} names command {}", h.id, h.cmd));
    }
    if f.writes() {
        return Ok(());
    }
    let (a, rest) = DmaAccess::decode(payload, "DMA_READ reply").map_err(|e| e.to_string())?;
    let data = a.data(rest, "DMA_READ reply").map_err(|e| e.to_string())?;
    if a.iova != iova || a.count as usize != chunk {
        return Err(format!(
            "DMA_READ reply is for [{:#x}, +{:#x}), the request was [{iova:#x}, +{chunk:#x})",
            a.iova, a.count
        ));
    }
    f.data[f.done..f.done + chunk].copy_from_slice(data);
    Ok(())
}
