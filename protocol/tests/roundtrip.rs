//! Every message encodes and decodes back to itself, and no byte string
//! makes a decoder panic or read past its message.

use std::os::fd::OwnedFd;

use airlock_protocol::device::*;
use airlock_protocol::dma::*;
use airlock_protocol::feature::DeviceFeature;
use airlock_protocol::header::*;
use airlock_protocol::irqs::*;
use airlock_protocol::region::*;
use airlock_protocol::version::*;
use airlock_protocol::{Limits, Request};

fn eventfd() -> OwnedFd {
    // SAFETY: no pointers; result checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd nobody else owns.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

#[test]
fn header_round_trips_and_reply_headers_echo_id_and_command() {
    let h = Header::command(7, Command::RegionRead, 16, true);
    assert_eq!(Header::decode(&h.encode()), h);
    assert!(h.no_reply() && !h.is_reply());
    let r = h.reply(20);
    assert_eq!((r.id, r.cmd, r.size, r.is_reply()), (7, 9, 36, true));
    let e = h.error_reply(libc::EINVAL);
    assert_eq!(
        (e.size, e.error, e.is_error()),
        (16, libc::EINVAL as u32, true)
    );
    for c in 1..=20u16 {
        assert_eq!(Command::from_u16(c).map(|c| c as u16), Some(c));
    }
    assert_eq!(Command::from_u16(21), None);
}

#[test]
fn version_round_trips_with_known_and_unknown_capabilities() {
    let mut caps = Capabilities {
        max_msg_fds: Some(16),
        max_data_xfer_size: Some(1 << 20),
        max_dma_maps: Some(65535),
        pgsizes: Some(4096),
        write_multiple: Some(true),
        iova_ranges: Some(vec![IovaRange {
            start: 0,
            end: 0x7fff_ffff,
        }]),
        ..Default::default()
    };
    caps.other
        .insert("migration".into(), serde_json::json!({"pgsize": 4096}));
    let v = Version {
        major: 0,
        minor: 0,
        capabilities: Some(caps),
    };
    let bytes = v.encode();
    assert_eq!(*bytes.last().unwrap(), 0, "JSON is NUL-terminated");
    assert_eq!(Version::decode(&bytes).unwrap(), v);
    let bare = Version {
        major: 0,
        minor: 0,
        capabilities: None,
    };
    assert_eq!(Version::decode(&bare.encode()).unwrap(), bare);
}

#[test]
fn an_unknown_capability_with_a_number_too_large_for_an_integer_round_trips() {
    // JSON integers beyond u64 are parsed as floats; they must parse to the
    // nearest float, or re-encoding and decoding them gives another one
    // (found by the protocol_decode fuzzer; serde_json's float_roundtrip).
    let mut payload = vec![1, 0, 1, 0];
    payload.extend_from_slice(br#"{"capabilities":{"x":4090000000000000000000000006,"y":1e-320}}"#);
    payload.push(0);
    let v = Version::decode(&payload).unwrap();
    assert_eq!(Version::decode(&v.encode()).unwrap(), v);
}

#[test]
fn dma_map_and_unmap_round_trip() {
    let m = DmaMap {
        argsz: 32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset: 0x1000,
        iova: 0x10_0000,
        size: 0x2000,
    };
    assert_eq!(DmaMap::decode(&m.encode()).unwrap(), m);
    let u = DmaUnmap {
        argsz: 24,
        flags: DMA_UNMAP_FLAG_ALL,
        iova: 0,
        size: 0,
    };
    assert_eq!(DmaUnmap::decode(&u.encode()).unwrap(), u);
}

#[test]
fn dma_read_and_write_use_qemus_layout_and_round_trip() {
    let a = DmaAccess {
        iova: 0x1234_5000,
        count: 5,
    };
    let req = a.encode_read_request();
    assert_eq!(req.len(), 16, "QEMU requires hdr.size >= 32");
    assert_eq!(DmaAccess::decode(&req, "t").unwrap().0, a);
    let w = a.encode_write_request(b"hello");
    assert_eq!(w.len(), 12 + 5 + 4);
    let (got, rest) = DmaAccess::decode(&w, "t").unwrap();
    assert_eq!((got, got.data(rest, "t").unwrap()), (a, &b"hello"[..]));
    let reply = a.encode_read_reply(b"world");
    let (got, rest) = DmaAccess::decode(&reply, "t").unwrap();
    assert_eq!(got.data(rest, "t").unwrap(), b"world");
    assert!(DmaAccess { iova: 0, count: 9 }.data(b"short", "t").is_err());
}

#[test]
fn info_messages_round_trip() {
    let d = DeviceInfo {
        argsz: 16,
        flags: DEVICE_FLAGS_PCI,
        num_regions: 9,
        num_irqs: 5,
    };
    assert_eq!(DeviceInfo::decode(&d.encode()).unwrap(), d);
    let i = IrqInfo {
        argsz: 16,
        flags: IRQ_INFO_EVENTFD,
        index: 2,
        count: 4,
    };
    assert_eq!(IrqInfo::decode(&i.encode()).unwrap(), i);
    let f = RegionIoFds {
        argsz: 16,
        flags: 0,
        index: 0,
        count: 0,
    };
    assert_eq!(RegionIoFds::decode(&f.encode()).unwrap(), f);
}

#[test]
fn region_info_round_trips_with_a_capability_chain_and_truncates_when_argsz_is_small() {
    let info = RegionInfo {
        argsz: 0,
        flags: REGION_INFO_FLAG_READ | REGION_INFO_FLAG_MMAP,
        index: 0,
        cap_offset: 0,
        size: 1 << 20,
        offset: 0,
        caps: vec![
            RegionCap::SparseMmap(vec![
                SparseArea {
                    offset: 0,
                    size: 0x1000,
                },
                SparseArea {
                    offset: 0x3000,
                    size: 0xd000,
                },
            ]),
            RegionCap::Type {
                kind: 1,
                subtype: 2,
            },
            RegionCap::MsixMappable,
        ],
    };
    let full = info.encode_reply(4096);
    assert_eq!(full.len(), info.full_size());
    let back = RegionInfo::decode_reply(&full).unwrap();
    assert_eq!(back.caps, info.caps);
    assert_eq!(back.flags & REGION_INFO_FLAG_CAPS, REGION_INFO_FLAG_CAPS);
    let short = info.encode_reply(32);
    assert_eq!(short.len(), 32);
    let back = RegionInfo::decode_reply(&short).unwrap();
    assert_eq!(
        (back.argsz as usize, back.cap_offset, back.caps.len()),
        (info.full_size(), 32, 0)
    );
    let req = RegionInfo {
        argsz: 32,
        index: 3,
        ..Default::default()
    }
    .encode_reply(32);
    assert_eq!(RegionInfo::decode_request(&req).unwrap().index, 3);
}

#[test]
fn irq_set_round_trips_for_every_data_kind() {
    for (action, data) in [
        (IrqAction::Trigger, IrqData::None),
        (IrqAction::Mask, IrqData::Bool(vec![true, false, true])),
        (
            IrqAction::Unmask,
            IrqData::Eventfds(vec![eventfd(), eventfd(), eventfd()]),
        ),
    ] {
        let fds: Vec<OwnedFd> = match &data {
            IrqData::Eventfds(v) => v.iter().map(|f| f.try_clone().unwrap()).collect(),
            _ => vec![],
        };
        let s = IrqSet {
            index: 2,
            start: 1,
            count: 3,
            action,
            data,
        };
        let back = IrqSet::decode(&s.encode(), fds).unwrap();
        assert_eq!(
            (back.index, back.start, back.count, back.action),
            (2, 1, 3, action)
        );
        match (&s.data, &back.data) {
            (IrqData::None, IrqData::None) => {}
            (IrqData::Bool(a), IrqData::Bool(b)) => assert_eq!(a, b),
            (IrqData::Eventfds(a), IrqData::Eventfds(b)) => assert_eq!(a.len(), b.len()),
            other => panic!("data kind changed: {other:?}"),
        }
    }
}

#[test]
fn region_access_write_multi_and_feature_round_trip() {
    let a = RegionAccess {
        offset: 0x98,
        region: 0,
        count: 4,
    };
    let bytes = a.encode(&[1, 2, 3, 4]);
    let (back, data) = RegionAccess::decode(&bytes, "t", 1 << 20).unwrap();
    assert_eq!((back, data), (a, &[1u8, 2, 3, 4][..]));
    assert_eq!(&a.encode_fixed()[..], &a.encode(&[])[..]);
    let w = vec![
        WriteOne {
            offset: 4,
            region: 0,
            count: 4,
            data: [1, 2, 3, 4, 0, 0, 0, 0],
        },
        WriteOne {
            offset: 0x80,
            region: 0,
            count: 8,
            data: [9; 8],
        },
    ];
    assert_eq!(decode_write_multi(&encode_write_multi(&w)).unwrap(), w);
    let f = DeviceFeature {
        argsz: 16,
        flags: 1 | airlock_protocol::feature::FEATURE_GET,
        data: vec![0; 8],
    };
    assert_eq!(DeviceFeature::decode(&f.encode()).unwrap(), f);
}

/// A tiny deterministic generator, so the no-panic sweep needs no crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn no_payload_makes_any_decoder_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let limits = Limits::default();
    for round in 0..20_000 {
        let len = (rng.next() % 96) as usize;
        let mut payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Bias the argsz field toward the payload length half the time so
        // decoding gets past the first checks.
        if round % 2 == 0 && len >= 4 {
            payload[..4].copy_from_slice(&(len as u32).to_ne_bytes());
        }
        let cmd = (rng.next() % 20) as u16;
        let flags = [0, FLAG_NO_REPLY, FLAG_TYPE_REPLY, 7][(rng.next() % 4) as usize];
        let h = Header {
            id: 1,
            cmd,
            size: (16 + len) as u32,
            flags,
            error: 0,
        };
        let _ = Request::decode(&h, &payload, Vec::new(), &limits);
        let _ = RegionInfo::decode_reply(&payload);
        let _ = Version::decode(&payload);
        if let Ok((a, rest)) = DmaAccess::decode(&payload, "t") {
            let _ = a.data(rest, "t");
        }
    }
}
