//! DmaSpace's map and unmap steps on their own: what a map hands the
//! device (Placed), and an unmap in two steps (take, then release) that
//! keeps airlock's host mapping until the device has let go of the range.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use airlock_protocol::dma::{DmaMap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};

use super::{ClientFile, DmaError, DmaSpace};

fn memfd(size: u64) -> ClientFile {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    File::from(fd.try_clone().unwrap()).set_len(size).unwrap();
    ClientFile::open(fd).unwrap()
}

fn map(iova: u64, offset: u64) -> DmaMap {
    DmaMap {
        argsz: 32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset,
        iova,
        size: 0x1000,
    }
}

#[test]
fn a_map_hands_the_device_its_host_address_and_its_memory() {
    let ram = memfd(0x10000);
    let mut host = DmaSpace::new(16, true);
    let a = host.map_file(&map(0x10_0000, 0x1000), Some(&ram)).unwrap();
    let b = host.map_file(&map(0x20_0000, 0x3000), Some(&ram)).unwrap();
    let (ha, hb) = (a.host.unwrap(), b.host.unwrap());
    assert_eq!(
        hb - ha,
        0x2000,
        "one mapping of the file, at the maps' offsets"
    );
    let (fa, fb) = (a.file.unwrap(), b.file.unwrap());
    assert_eq!((fa.dev, fa.ino), (fb.dev, fb.ino), "the same file");
    assert_eq!((fa.offset, fb.offset), (0x1000, 0x3000));

    let mut plain = DmaSpace::new(16, false);
    let p = plain.map_file(&map(0x10_0000, 0), Some(&ram)).unwrap();
    assert_eq!(p.host, None, "no host mapping unless the device needs one");
    assert!(p.file.is_some());
    let none = plain.map_file(&map(0x20_0000, 0), None).unwrap();
    assert_eq!((none.host, none.file), (None, None), "a map without fd");
}

#[test]
fn take_removes_only_an_exact_map_and_release_drops_the_host_mapping_user() {
    let ram = memfd(0x10000);
    let mut dma = DmaSpace::new(16, true);
    dma.map_file(&map(0x10_0000, 0), Some(&ram)).unwrap();
    dma.map_file(&map(0x20_0000, 0x1000), Some(&ram)).unwrap();

    let wrong = dma.take(0x10_0000, 0x2000);
    assert!(matches!(wrong, Err(DmaError::NoSuchMap { .. })));
    assert_eq!(dma.ranges().len(), 2, "a refused take leaves the map");

    let taken = dma.take(0x10_0000, 0x1000).unwrap();
    assert_eq!(
        dma.ranges(),
        [(0x20_0000, 0x1000)],
        "out of the table at once"
    );
    assert!(
        dma.segments(0x10_0000, 4, false).is_err(),
        "no access finds it"
    );
    assert!(
        matches!(dma.take(0x10_0000, 0x1000), Err(DmaError::NoSuchMap { .. })),
        "taken once"
    );
    assert_eq!(
        dma.host.users(),
        2,
        "the taken map still holds airlock's mapping until release"
    );
    dma.release(taken);
    assert_eq!(dma.host.users(), 1);
    dma.unmap(0x20_0000, 0x1000).unwrap();
    assert_eq!(dma.host.users(), 0);
    assert_eq!(
        dma.host.count(),
        1,
        "an idle mapping is kept for the next map"
    );
    dma.clear();
    assert_eq!(dma.host.count(), 0);
}
