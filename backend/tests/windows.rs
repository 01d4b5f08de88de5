//! Given IOVA windows (here from --reserve-iova), a DMA_MAP overlapping one
//! is refused with an errno while maps outside succeed; a client proposing
//! the iova_ranges capability learns the usable ranges with every window
//! cut out, and a client that does not sees the VERSION reply unchanged.

mod common;

use std::os::fd::AsFd;

use airlock_protocol::client::Client;
use airlock_protocol::version::IovaRange;
use airlock_protocol::ProtocolError;
use common::*;

const RESERVED: &[&str] = &["--reserve-iova", "0x8000000:0x100000"];

#[test]
fn a_dma_map_into_a_reserved_window_is_refused_and_one_outside_succeeds() {
    let s = start_edu_args("window-map", RESERVED);
    let mut c = connect(&s);
    let mem = Memfd::new(0x20000);
    for iova in [0x8000000u64, 0x80f0000, 0x7ff8000] {
        match c.dma_map(iova, 0x10000, 0, 3, Some(mem.fd.as_fd())) {
            Err(ProtocolError::Remote { errno }) => {
                assert_eq!(errno as i32, libc::EINVAL, "map at {iova:#x}")
            }
            other => panic!("map at {iova:#x} into the window: {other:?}"),
        }
    }
    c.dma_map(0x7ff0000, 0x10000, 0, 3, Some(mem.fd.as_fd()))
        .expect("just below the window");
    c.dma_map(0x8100000, 0x10000, 0, 3, Some(mem.fd.as_fd()))
        .expect("just above the window");
}

#[test]
fn a_client_proposing_iova_ranges_gets_the_usable_space_without_the_windows() {
    let s = start_edu_args("window-caps", RESERVED);
    let mut c = Client::connect(&s.path).unwrap();
    let mut caps = Client::qemu_capabilities();
    caps.iova_ranges = Some(vec![]);
    let v = c.negotiate(caps).unwrap();
    assert_eq!(
        v.capabilities.unwrap().iova_ranges,
        Some(vec![
            IovaRange {
                start: 0,
                end: 0x7ff_ffff
            },
            IovaRange {
                start: 0x810_0000,
                end: u64::MAX
            }
        ])
    );
    // A proposal narrows the answer (one client at a time: the first goes).
    drop(c);
    let mut c = Client::connect(&s.path).unwrap();
    let mut caps = Client::qemu_capabilities();
    caps.iova_ranges = Some(vec![IovaRange {
        start: 0x100_0000,
        end: 0xffff_ffff,
    }]);
    let v = c.negotiate(caps).unwrap();
    assert_eq!(
        v.capabilities.unwrap().iova_ranges,
        Some(vec![
            IovaRange {
                start: 0x100_0000,
                end: 0x7ff_ffff
            },
            IovaRange {
                start: 0x810_0000,
                end: 0xffff_ffff
            }
        ])
    );
}

#[test]
fn a_client_not_proposing_iova_ranges_sees_the_same_version_reply_as_without_windows() {
    let with = start_edu_args("window-none", RESERVED);
    let without = start_edu("window-plain");
    let a = Client::connect(&with.path)
        .unwrap()
        .negotiate(Client::qemu_capabilities())
        .unwrap();
    let b = Client::connect(&without.path)
        .unwrap()
        .negotiate(Client::qemu_capabilities())
        .unwrap();
    assert_eq!(a, b);
    assert!(a.capabilities.unwrap().iova_ranges.is_none());
}
