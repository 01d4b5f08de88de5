//! The region commands: GET_REGION_INFO, GET_REGION_IO_FDS, REGION_READ,
//! REGION_WRITE and REGION_WRITE_MULTI, each checked against the region's
//! access flags and size before the device sees it.

use std::os::fd::BorrowedFd;

use airlock_protocol::device::{
    RegionInfo, RegionIoFds, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use airlock_protocol::region::{RegionAccess, WriteOne, REGION_ACCESS_SIZE};
use airlock_protocol::Header;
use tracing::debug;

use super::{fail, Answer, Handled, Refusal, Session};

impl Session<'_> {
    /// GET_REGION_INFO: an mmap-able region's fd goes with the full reply
    /// only; a client whose argsz was too small asks again and gets it then.
    pub(super) fn region_info(&mut self, h: &Header, q: &RegionInfo) -> Handled {
        let d = self
            .device
            .region(q.index)
            .ok_or_else(|| no_region(&self.name, q.index))?;
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

    /// GET_REGION_IO_FDS: no ioeventfds are offered, an empty list.
    pub(super) fn region_io_fds(&self, q: &RegionIoFds) -> Handled {
        if q.index >= self.device.num_regions() {
            return Err(no_region(&self.name, q.index));
        }
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

    /// REGION_READ: the reply's header and data go in one sendmsg (with
    /// other held replies, see protocol socket/send.rs), from a buffer kept
    /// for the connection (no allocation per read).
    pub(super) fn region_read(&mut self, h: &Header, a: &RegionAccess) -> Handled {
        self.stats.count_read(a.region);
        self.check_access(a, REGION_INFO_FLAG_READ)?;
        let buf = &mut self.read_buf;
        buf.clear();
        buf.resize(a.count as usize, 0);
        self.device
            .read(a.region, a.offset, buf)
            .map_err(|e| fail(&e, e.errno()))?;
        if !h.no_reply() {
            let fixed = a.encode_fixed();
            let buf = &self.read_buf;
            if let Err(e) = self
                .sock
                .send_reply(&h.reply(REGION_ACCESS_SIZE + buf.len()), &[&fixed, buf])
            {
                debug!("reply failed: {e}");
            }
        }
        Ok(Answer::Sent)
    }

    pub(super) fn region_write(&mut self, access: &RegionAccess, data: &[u8]) -> Handled {
        self.stats.count_write(access.region, access.offset);
        self.check_access(access, REGION_INFO_FLAG_WRITE)?;
        self.device
            .write(access.region, access.offset, data)
            .map_err(|e| fail(&e, e.errno()))?;
        Ok(Answer::fixed(&access.encode_fixed()))
    }

    /// REGION_WRITE_MULTI: only for a client that proposed write_multiple;
    /// the writes are done in order until one fails.
    pub(super) fn region_write_multi(&mut self, writes: &[WriteOne]) -> Handled {
        if !self.peer.is_some_and(|p| p.write_multiple) {
            return Err((
                libc::EINVAL,
                "REGION_WRITE_MULTI needs the write_multiple capability, which this client did not propose in VERSION".into(),
            ));
        }
        for w in writes {
            self.stats.count_write(w.region, w.offset);
            let a = RegionAccess {
                offset: w.offset,
                region: w.region,
                count: w.count,
            };
            self.check_access(&a, REGION_INFO_FLAG_WRITE)?;
            self.device
                .write(w.region, w.offset, w.bytes())
                .map_err(|e| fail(&e, e.errno()))?;
        }
        Ok(Answer::fixed(&(writes.len() as u64).to_ne_bytes()))
    }

    /// Region exists, allows the access, and [offset, offset+count) fits.
    fn check_access(&self, a: &RegionAccess, need: u32) -> Result<(), Refusal> {
        let dev = &self.name;
        let (flags, size) = self
            .device
            .region_limits(a.region)
            .ok_or_else(|| no_region(dev, a.region))?;
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
}

fn no_region(dev: &str, index: u32) -> Refusal {
    (
        libc::EINVAL,
        format!("{dev}: region {index} does not exist"),
    )
}
