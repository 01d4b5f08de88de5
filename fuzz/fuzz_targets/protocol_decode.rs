//! Arbitrary bytes through every decoder a server or client applies to
//! untrusted input: the header (decode, check_size), Request::decode for
//! every command number (with and without fds), VERSION JSON, DMA_READ /
//! DMA_WRITE bodies, REGION_WRITE_MULTI, DEVICE_SET_IRQS and the rest of
//! the fixed-layout bodies. None may panic. Where a decoder has an encoder,
//! what decoded must encode back to something that decodes the same.
//!
//! Input: the first 16 bytes are a header, the rest its payload (for the
//! Request::decode half); the whole input is also fed to each body decoder.

#![no_main]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use airlock_protocol::device::{DeviceInfo, IrqInfo, RegionInfo, RegionIoFds};
use airlock_protocol::dma::{DmaAccess, DmaMap, DmaUnmap};
use airlock_protocol::feature::DeviceFeature;
use airlock_protocol::header::{FLAG_TYPE_COMMAND, FLAG_TYPE_MASK};
use airlock_protocol::irqs::IrqSet;
use airlock_protocol::limits::QEMU_MAX_MSG_FDS;
use airlock_protocol::region::{decode_write_multi, encode_write_multi, RegionAccess};
use airlock_protocol::version::Version;
use airlock_protocol::{Header, Limits, Request, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

/// One /dev/null kept open for the process; each fd handed to a decoder is
/// a dup of it (decoders take ownership and close what they do not keep).
fn devnull() -> &'static std::fs::File {
    static F: OnceLock<std::fs::File> = OnceLock::new();
    F.get_or_init(|| std::fs::File::open("/dev/null").expect("/dev/null opens"))
}

fn fds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| {
            devnull()
                .as_fd()
                .try_clone_to_owned()
                .expect("dup of /dev/null")
        })
        .collect()
}

fn limits_for(sel: u8) -> Limits {
    match sel % 3 {
        0 => Limits::new(4096, QEMU_MAX_MSG_FDS),
        1 => Limits::default(),
        _ => Limits::new(0, 0),
    }
}

fn message(data: &[u8]) {
    let Some(hb) = data.get(..HEADER_SIZE) else {
        return;
    };
    let hb: [u8; HEADER_SIZE] = hb.try_into().expect("16 bytes");
    let h = Header::decode(&hb);
    assert_eq!(h.encode(), hb, "header encode(decode(x)) != x");
    let limits = limits_for(data[HEADER_SIZE - 1]);
    let _ = h.check_size(limits.max_msg_size);
    let _ = (h.payload_len(), h.is_reply(), h.no_reply(), h.is_error());
    let _ = h.reply(data.len()).encode();
    let _ = h.error_reply(h.error as i32).encode();
    let payload = &data[HEADER_SIZE..];
    // The header's error field means nothing in a command: it picks how many
    // fds come with the message (0..=3, and sometimes more than allowed).
    let nfds = match h.error & 0x7 {
        n @ 0..=3 => n as usize,
        4 => QEMU_MAX_MSG_FDS + 1,
        _ => 0,
    };
    let _ = Request::decode(&h, payload, fds(nfds), &limits);
    // The same payload as every command number (0 and 19 are unknown).
    for cmd in 0..=19u16 {
        let hh = Header {
            cmd,
            flags: (h.flags & !FLAG_TYPE_MASK) | FLAG_TYPE_COMMAND,
            ..h
        };
        let n = if cmd == 2 || cmd == 8 { nfds } else { 0 };
        let _ = Request::decode(&hh, payload, fds(n), &limits);
    }
}

fn bodies(data: &[u8]) {
    if let Ok(v) = Version::decode(data) {
        let again = Version::decode(&v.encode()).expect("an encoded VERSION decodes");
        assert_eq!(again, v, "VERSION decode(encode(v)) != v");
    }

    if let Ok((a, rest)) = DmaAccess::decode(data, "DMA_READ reply") {
        if let Ok(d) = a.data(rest, "DMA_READ reply") {
            assert_eq!(d.len(), a.count as usize);
            let enc = a.encode_read_reply(d);
            let (b, rest2) = DmaAccess::decode(&enc, "re-encoded").expect("re-encoded decodes");
            assert_eq!(b, a);
            assert_eq!(b.data(rest2, "re-encoded").expect("re-encoded data"), d);
        }
        let _ = a.encode_read_request();
    }

    if let Ok(w) = decode_write_multi(data) {
        assert_eq!(encode_write_multi(&w), data, "WRITE_MULTI round trip");
        for one in &w {
            assert!(!one.bytes().is_empty() && one.bytes().len() <= 8);
        }
    }

    let nfds = data.first().map_or(0, |b| (b & 3) as usize);
    let _ = IrqSet::decode(data, fds(nfds));
    if let Ok(s) = IrqSet::decode(data, Vec::new()) {
        let _ = s.encode();
    }

    if let Ok(m) = DmaMap::decode(data) {
        assert_eq!(DmaMap::decode(&m.encode()).ok(), Some(m));
    }
    if let Ok(m) = DmaUnmap::decode(data) {
        let _ = m.encode();
    }
    let _ = DeviceInfo::decode(data).map(|d| d.encode());
    let _ = IrqInfo::decode(data).map(|d| d.encode());
    let _ = RegionIoFds::decode(data).map(|d| d.encode());
    let _ = RegionInfo::decode_request(data);
    if let Ok(info) = RegionInfo::decode_reply(data) {
        let _ = info.full_size();
        for max in [0u32, 16, 32, 4096, u32::MAX] {
            let _ = info.encode_reply(max);
        }
    }
    let _ = DeviceFeature::decode(data).map(|f| f.encode());
    for max in [0u64, 4096, u64::MAX] {
        if let Ok((a, rest)) = RegionAccess::decode(data, "REGION_ACCESS", max) {
            assert!(a.count as u64 <= max);
            let _ = (a.encode(rest), a.encode_fixed());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    message(data);
    bodies(data);
});
