//! DMA_MAP_MULTI and DMA_UNMAP_MULTI against the mock device: each entry
//! as its own DMA_MAP or DMA_UNMAP, one fd for many maps, and only for a
//! client that proposed them.

use airlock_protocol::dma_multi::{DmaMapEntry, DmaUnmapEntry, DMA_MULTI_NO_FD};

use super::*;

/// As `negotiated`, with dma_multiple proposed.
fn batching<R>(dev: &mut MockDevice, client: impl FnOnce(&mut Client) -> R) -> R {
    serve(dev, |c| {
        let mut caps = Client::qemu_capabilities();
        caps.dma_multiple = Some(true);
        let v = c.negotiate(caps).expect("VERSION");
        assert_eq!(v.capabilities.and_then(|c| c.dma_multiple), Some(true));
        client(c)
    })
}

fn map(iova: u64, fd_index: u32, offset: u64) -> DmaMapEntry {
    DmaMapEntry {
        flags: RW,
        fd_index,
        offset,
        iova,
        size: 0x1000,
    }
}

fn unmap(iova: u64) -> DmaUnmapEntry {
    DmaUnmapEntry {
        flags: 0,
        iova,
        size: 0x1000,
    }
}

fn calls(dev: &MockDevice, prefix: &str) -> usize {
    dev.calls.iter().filter(|c| c.starts_with(prefix)).count()
}

const EINVAL: u32 = libc::EINVAL as u32;
const ENOENT: u32 = libc::ENOENT as u32;
const EEXIST: u32 = libc::EEXIST as u32;

#[test]
fn maps_share_one_fd_and_one_unmap_message_takes_them_all() {
    let mut dev = MockDevice::new();
    let ram = memfd(0x10000);
    batching(&mut dev, |c| {
        let maps = [
            map(0x10000, 0, 0x3000),
            map(0x20000, DMA_MULTI_NO_FD, 0),
            map(0x30000, 0, 0x5000),
        ];
        let got = c.dma_map_multi(&maps, &[ram.as_fd()]).expect("MAP_MULTI");
        assert_eq!(got, [0, 0, 0]);
        let all = [unmap(0x30000), unmap(0x10000), unmap(0x20000)];
        assert_eq!(c.dma_unmap_multi(&all).expect("UNMAP_MULTI"), [0, 0, 0]);
        assert_eq!(errno(c.dma_unmap(0x10000, 0x1000, 0)), libc::ENOENT);
    });
    assert!(dev.called("dma_mapped 0x10000 0x1000 fd@0x3000"));
    assert!(dev.called("dma_mapped 0x20000 0x1000 nofd"));
    assert!(dev.called("dma_mapped 0x30000 0x1000 fd@0x5000"));
    for iova in ["0x10000", "0x20000", "0x30000"] {
        assert!(dev.called(&format!("dma_unmapped {iova} 0x1000")), "{iova}");
    }
    // The three leave the device in one step (a passthrough device joins
    // adjacent ones into one IOMMU unmap).
    assert_eq!(calls(&dev, "unmapped together 3"), 1, "{:?}", dev.calls);
}

/// A refused entry gets its own errno, as its own DMA_MAP would, and the
/// entries around it stand: a batch of guest RAM is not lost to one map
/// the device cannot take.
#[test]
fn a_refused_entry_gets_its_errno_and_the_others_stand() {
    let mut dev = MockDevice::new();
    dev.refuse_map_at = Some(0x30000);
    dev.windows = vec![window(0x800_0000, 0x80f_ffff)];
    let ram = memfd(0x10000);
    batching(&mut dev, |c| {
        let maps = [
            map(0x10000, 0, 0),
            map(0x30000, 0, 0),       // the device refuses it
            map(0x800_0000, 0, 0),    // in the window
            map(0x50000, 0, 0x10000), // past the file's end
            map(0x10000, 0, 0),       // over the first
            map(0x60000, 0, 0x1000),
        ];
        let got = c.dma_map_multi(&maps, &[ram.as_fd()]).expect("MAP_MULTI");
        assert_eq!(got, [0, EINVAL, EINVAL, EINVAL, EEXIST, 0]);
        // The two that stand are single maps like any other.
        c.dma_unmap(0x10000, 0x1000, 0).expect("the first stands");
        c.dma_unmap(0x60000, 0x1000, 0).expect("the last stands");
        assert_eq!(errno(c.dma_unmap(0x30000, 0x1000, 0)), libc::ENOENT);
    });
    assert!(!dev.called("dma_mapped 0x800"));
    assert!(!dev.called("dma_mapped 0x50000"));
    assert_eq!(calls(&dev, "dma_mapped"), 2, "{:?}", dev.calls);
}

#[test]
fn unmap_entries_are_taken_in_order_each_with_its_errno() {
    let mut dev = MockDevice::new();
    batching(&mut dev, |c| {
        let maps = [
            map(0x10000, DMA_MULTI_NO_FD, 0),
            map(0x20000, DMA_MULTI_NO_FD, 0),
        ];
        assert_eq!(c.dma_map_multi(&maps, &[]).expect("MAP_MULTI"), [0, 0]);
        let part = DmaUnmapEntry {
            size: 0x800,
            ..unmap(0x20000)
        };
        // Missing, then whole, then again (gone by then), then part of one.
        let all = [unmap(0x50000), unmap(0x10000), unmap(0x10000), part];
        assert_eq!(
            c.dma_unmap_multi(&all).expect("UNMAP_MULTI"),
            [ENOENT, 0, ENOENT, ENOENT]
        );
        c.dma_unmap(0x20000, 0x1000, 0)
            .expect("part of a map took nothing");
    });
    assert_eq!(calls(&dev, "dma_unmapped"), 2, "{:?}", dev.calls);
    // Only the entry that took a map reached the device.
    let at = dev.calls.iter().position(|c| c == "unmapped together 1");
    let at = at.unwrap_or_else(|| panic!("{:?}", dev.calls));
    assert_eq!(dev.calls[at + 1], "dma_unmapped 0x10000 0x1000");
}

#[test]
fn the_batches_are_refused_to_a_client_that_did_not_propose_them() {
    let mut dev = MockDevice::new();
    let ram = memfd(0x10000);
    negotiated(&mut dev, |c| {
        let maps = [map(0x10000, 0, 0)];
        assert_eq!(errno(c.dma_map_multi(&maps, &[ram.as_fd()])), libc::EINVAL);
        assert_eq!(errno(c.dma_unmap_multi(&[unmap(0x10000)])), libc::EINVAL);
        c.dma_map(0x10000, 0x1000, 0, RW, Some(ram.as_fd()))
            .expect("the stream goes on");
    });
    assert_eq!(calls(&dev, "dma_mapped"), 1, "{:?}", dev.calls);
}

#[test]
fn a_file_that_is_no_regular_file_fails_only_its_entries() {
    let mut dev = MockDevice::new();
    let ram = memfd(0x10000);
    let (sock, _peer) = UnixStream::pair().expect("socketpair");
    batching(&mut dev, |c| {
        let maps = [map(0x10000, 1, 0), map(0x20000, 0, 0)];
        let got = c.dma_map_multi(&maps, &[ram.as_fd(), sock.as_fd()]);
        assert_eq!(got.expect("MAP_MULTI"), [EINVAL, 0]);
    });
    assert_eq!(calls(&dev, "dma_mapped"), 1, "{:?}", dev.calls);
}

#[test]
fn version_answers_dma_multiple_only_when_proposed() {
    let mut dev = MockDevice::new();
    let v = serve(&mut dev, |c| {
        c.negotiate(Client::qemu_capabilities()).expect("VERSION")
    });
    assert_eq!(v.capabilities.and_then(|c| c.dma_multiple), None);
}
