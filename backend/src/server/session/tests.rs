//! Session dispatch, command by command, in-process against the mock
//! device: given a client that sends X, the server replies Y and the device
//! ends in state Z.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use airlock_protocol::client::{Client, DmaMemory};
use airlock_protocol::device::{
    RegionInfo, RegionIoFds, DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, PCI_CONFIG_REGION_INDEX,
    REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use airlock_protocol::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL};
use airlock_protocol::error::ProtocolError;
use airlock_protocol::header::Command;
use airlock_protocol::irqs::{IrqAction, IrqData};
use airlock_protocol::region::WriteOne;
use airlock_protocol::version::Capabilities;

use super::Session;
use crate::device::mock::{MockDevice, BAR0_SIZE, DOORBELL, NUM_IRQS};
use crate::device::DmaJob;
use crate::iova::{DoorbellWindow, IovaRange, WindowSource};

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

/// Serves `dev` on one end of a socket pair while `client` runs on the
/// other; the session ends when the client is dropped.
fn serve<R>(dev: &mut MockDevice, client: impl FnOnce(&mut Client) -> R) -> R {
    let (server_end, client_end) = UnixStream::pair().expect("socketpair");
    std::thread::scope(|s| {
        let server = s.spawn(move || {
            Session::new(server_end, dev, crate::server_limits(1 << 20)).run();
        });
        let mut c = Client::from_stream(client_end);
        let r = client(&mut c);
        drop(c);
        server.join().expect("the session panicked");
        r
    })
}

/// As `serve`, after a QEMU-like VERSION.
fn negotiated<R>(dev: &mut MockDevice, client: impl FnOnce(&mut Client) -> R) -> R {
    serve(dev, |c| {
        c.negotiate(Client::qemu_capabilities()).expect("VERSION");
        client(c)
    })
}

fn errno<T>(r: Result<T, ProtocolError>) -> i32 {
    match r {
        Err(ProtocolError::Remote { errno }) => errno as i32,
        Err(e) => panic!("expected an error reply, got {e:?}"),
        Ok(_) => panic!("expected an error reply, got a reply"),
    }
}

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"mock-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on the fd we own.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(rc, 0);
    fd
}

// ---- VERSION --------------------------------------------------------------

#[test]
fn a_command_before_version_is_refused_and_version_still_works() {
    let mut dev = MockDevice::new();
    serve(&mut dev, |c| {
        assert_eq!(errno(c.device_info()), libc::EINVAL);
        c.negotiate(Client::qemu_capabilities())
            .expect("VERSION after a refusal");
        assert!(c.device_info().is_ok());
    });
}

#[test]
fn a_second_version_is_refused() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        assert_eq!(
            errno(c.negotiate(Client::qemu_capabilities())),
            libc::EINVAL
        );
    });
}

#[test]
fn version_offers_the_usable_ranges_around_the_windows_to_a_client_that_asks() {
    let mut dev = MockDevice::new();
    dev.windows = vec![window(0x800_0000, 0x80f_ffff)];
    let v = serve(&mut dev, |c| {
        let mut caps = Client::qemu_capabilities();
        caps.iova_ranges = Some(Vec::new());
        c.negotiate(caps).expect("VERSION")
    });
    let ranges = v
        .capabilities
        .and_then(|c| c.iova_ranges)
        .expect("iova_ranges");
    assert!(ranges
        .iter()
        .all(|r| r.end < 0x800_0000 || r.start > 0x80f_ffff));
    assert!(ranges.iter().any(|r| r.start == 0x810_0000));
}

fn window(start: u64, end: u64) -> DoorbellWindow {
    DoorbellWindow {
        range: IovaRange::new(start, end).expect("a range"),
        source: WindowSource::HostMsi,
        kind: "msi".into(),
    }
}

// ---- DMA_MAP / DMA_UNMAP ----------------------------------------------------

#[test]
fn dma_map_with_an_fd_reaches_the_device_with_its_file() {
    let mut dev = MockDevice::new();
    let ram = memfd(0x10000);
    negotiated(&mut dev, |c| {
        c.dma_map(0x10000, 0x10000, 0, RW, Some(ram.as_fd()))
            .expect("DMA_MAP");
        c.dma_map(0x40000, 0x1000, 0, RW, None)
            .expect("DMA_MAP without fd");
    });
    assert!(dev.called("dma_mapped 0x10000 0x10000 fd"));
    assert!(dev.called("dma_mapped 0x40000 0x1000 nofd"));
}

#[test]
fn dma_map_into_a_window_is_refused_and_the_device_never_sees_it() {
    let mut dev = MockDevice::new();
    dev.windows = vec![window(0x800_0000, 0x80f_ffff)];
    negotiated(&mut dev, |c| {
        // The last page below the window is fine; one byte into it is not.
        c.dma_map(0x7ff_f000, 0x1000, 0, RW, None)
            .expect("below the window");
        assert_eq!(
            errno(c.dma_map(0x7ff_f000, 0x1001, 0, RW, None)),
            libc::EINVAL
        );
        assert_eq!(
            errno(c.dma_map(0x80f_f000, 0x1000, 0, RW, None)),
            libc::EINVAL
        );
    });
    assert!(!dev.called("dma_mapped 0x80f"));
}

#[test]
fn a_map_the_device_refuses_is_undone() {
    let mut dev = MockDevice::new();
    dev.refuse_map_at = Some(0x20000);
    negotiated(&mut dev, |c| {
        assert_eq!(errno(c.dma_map(0x20000, 0x1000, 0, RW, None)), libc::EINVAL);
        // airlock holds no map there: unmapping it is an error, and the
        // same range can be mapped once the device accepts.
        assert!(c.dma_unmap(0x20000, 0x1000, 0).is_err());
    });
    assert!(!dev.called("dma_unmapped 0x20000"));
}

#[test]
fn dma_unmap_takes_one_exact_map_away_from_the_device_first() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        c.dma_map(0x10000, 0x2000, 0, RW, None).expect("DMA_MAP");
        let echo = c.dma_unmap(0x10000, 0x2000, 0).expect("DMA_UNMAP");
        assert_eq!((echo.iova, echo.size), (0x10000, 0x2000));
        // Not a map any more; nor is part of one.
        assert!(c.dma_unmap(0x10000, 0x2000, 0).is_err());
    });
    assert!(dev.called("dma_unmapped 0x10000 0x2000"));
}

/// A client that pipelines (QEMU's DMA_MAPs in one transaction) leaves
/// several requests in one read; the server holds their replies and sends
/// them together. Every reply still comes, in order, with its own outcome.
#[test]
fn pipelined_requests_in_one_write_get_every_reply_in_order() {
    use airlock_protocol::dma::{DmaMap, DmaUnmap, DMA_MAP_SIZE, DMA_UNMAP_SIZE};
    use airlock_protocol::header::Header;
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        let map = |iova| DmaMap {
            argsz: DMA_MAP_SIZE as u32,
            flags: RW,
            offset: 0,
            iova,
            size: 0x1000,
        };
        let unmap = |iova| DmaUnmap {
            argsz: DMA_UNMAP_SIZE as u32,
            flags: 0,
            iova,
            size: 0x1000,
        };
        // (id, command, payload, expected errno)
        let mut plan = Vec::new();
        for i in 0..8u16 {
            let iova = 0x10000 * (u64::from(i) + 1);
            plan.push((100 + 3 * i, Command::DmaMap, map(iova).encode(), 0));
            plan.push((101 + 3 * i, Command::DmaUnmap, unmap(iova).encode(), 0));
            // Unmapped just before: no such map.
            let gone = unmap(iova).encode();
            plan.push((102 + 3 * i, Command::DmaUnmap, gone, libc::ENOENT));
        }
        let mut burst = Vec::new();
        for (id, cmd, payload, _) in &plan {
            burst.extend(Header::command(*id, *cmd, payload.len(), false).encode());
            burst.extend(payload);
        }
        c.socket().send_raw(&burst, &[]).expect("one write");
        for (id, cmd, _, want) in plan {
            match c.reply_to(id, cmd) {
                Ok(_) => assert_eq!(want, 0, "reply {id}"),
                Err(e) => assert_eq!(errno::<()>(Err(e)), want, "reply {id}"),
            }
        }
    });
    assert!(dev.called("dma_unmapped 0x80000 0x1000"));
}

/// --poll-us: the session polls before each read; requests that come
/// within the poll and long after it are served alike.
#[test]
fn a_polling_session_serves_requests_that_come_soon_and_late() {
    let mut dev = MockDevice::new();
    let (server_end, client_end) = UnixStream::pair().expect("socketpair");
    let mut limits = crate::server_limits(1 << 20);
    limits.poll = std::time::Duration::from_millis(2);
    std::thread::scope(|s| {
        let dev = &mut dev;
        let server = s.spawn(move || Session::new(server_end, dev, limits).run());
        let mut c = Client::from_stream(client_end);
        c.negotiate(Client::qemu_capabilities()).expect("VERSION");
        for i in 0..6u64 {
            if i % 2 == 1 {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            c.dma_map(0x10000 * (i + 1), 0x1000, 0, RW, None)
                .expect("DMA_MAP");
        }
        drop(c);
        server.join().expect("the session panicked");
    });
    assert!(dev.called("dma_mapped 0x60000 0x1000 nofd"));
}

#[test]
fn dma_unmap_of_part_of_a_map_is_refused() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        c.dma_map(0x10000, 0x2000, 0, RW, None).expect("DMA_MAP");
        assert!(c.dma_unmap(0x10000, 0x1000, 0).is_err());
    });
    assert_eq!(
        dev.calls
            .iter()
            .filter(|c| c.starts_with("dma_unmapped"))
            .count(),
        1,
        "only the session's end unmaps it: {:?}",
        dev.calls
    );
}

#[test]
fn dma_unmap_all_drops_every_map_and_wants_iova_and_size_zero() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        c.dma_map(0x10000, 0x1000, 0, RW, None).expect("map 1");
        c.dma_map(0x20000, 0x1000, 0, RW, None).expect("map 2");
        assert_eq!(
            errno(c.dma_unmap(0x10000, 0, DMA_UNMAP_FLAG_ALL)),
            libc::EINVAL
        );
        c.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL).expect("FLAG_ALL");
        assert!(c.dma_unmap(0x20000, 0x1000, 0).is_err());
    });
    assert!(dev.called("dma_unmapped 0x10000 0x1000"));
    assert!(dev.called("dma_unmapped 0x20000 0x1000"));
    // Both leave the device in one step (a passthrough device joins
    // adjacent ones into one IOMMU unmap).
    assert!(dev.called("unmapped together 2"), "{:?}", dev.calls);
}

// ---- DEVICE_RESET, DEVICE_FEATURE, what airlock does not offer --------------------

#[test]
fn device_reset_reaches_the_device_and_its_failure_is_the_errno() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| c.reset().expect("DEVICE_RESET"));
    assert!(dev.called("reset"));
    let mut dev = MockDevice::new();
    dev.reset_fails = true;
    negotiated(&mut dev, |c| assert_eq!(errno(c.reset()), libc::ENOTTY));
}

#[test]
fn device_feature_and_dirty_pages_are_not_supported() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        let feature = airlock_protocol::feature::DeviceFeature {
            argsz: 16,
            flags: 1 << 17,
            data: Vec::new(),
        };
        assert_eq!(
            errno(c.request(Command::DeviceFeature, &feature.encode(), &[])),
            libc::ENOTSUP
        );
        let r = c.request(Command::DirtyPages, &[0; 16], &[]);
        assert!(matches!(errno(r), libc::ENOTSUP | libc::EINVAL));
        assert!(c.device_info().is_ok(), "the stream goes on");
    });
}

// ---- the session's life ---------------------------------------------------------------

#[test]
fn leaving_quiesces_the_device_before_its_maps_go() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        c.dma_map(0x10000, 0x1000, 0, RW, None).expect("DMA_MAP");
        c.device_info().expect("DEVICE_GET_INFO");
    });
    let quiesced = dev
        .calls
        .iter()
        .position(|c| c == "quiesce")
        .expect("quiesce");
    let unmapped = dev
        .calls
        .iter()
        .position(|c| c.starts_with("dma_unmapped 0x10000"))
        .expect("unmapped at the end");
    assert!(quiesced < unmapped, "{:?}", dev.calls);
}

#[test]
fn adoption_ends_at_the_first_command_past_the_replayed_maps() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        c.dma_map(0x10000, 0x1000, 0, RW, None).expect("DMA_MAP");
        c.dma_unmap(0x10000, 0x1000, 0).expect("DMA_UNMAP");
        c.dma_map(0x10000, 0x1000, 0, RW, None).expect("DMA_MAP");
        c.device_info().expect("DEVICE_GET_INFO");
        c.device_info().expect("DEVICE_GET_INFO");
    });
    let ended: Vec<usize> = (0..dev.calls.len())
        .filter(|&i| dev.calls[i] == "adoption_ended")
        .collect();
    assert_eq!(ended.len(), 1, "once: {:?}", dev.calls);
    let last_map = dev
        .calls
        .iter()
        .rposition(|c| c.starts_with("dma_mapped"))
        .expect("mapped");
    assert!(ended[0] > last_map, "{:?}", dev.calls);
}

// ---- device DMA over messages ---------------------------------------------------------

/// Client memory the client serves DMA_READ/DMA_WRITE from.
struct Ram(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl DmaMemory for Ram {
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), i32> {
        let m = self.0.lock().map_err(|_| libc::EIO)?;
        let at = iova as usize;
        buf.copy_from_slice(m.get(at..at + buf.len()).ok_or(libc::EFAULT)?);
        Ok(())
    }
    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), i32> {
        let mut m = self.0.lock().map_err(|_| libc::EIO)?;
        let at = iova as usize;
        m.get_mut(at..at + data.len())
            .ok_or(libc::EFAULT)?
            .copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn device_dma_without_an_fd_goes_by_messages_in_chunks_and_completes() {
    let mut dev = MockDevice::new();
    let len = (3 << 20) / 2; // 1.5 MiB: two DMA_READs at the 1 MiB max_data_xfer
    let ram: Vec<u8> = (0..0x20_0000u32).map(|i| (i % 251) as u8).collect();
    let ram = std::sync::Arc::new(std::sync::Mutex::new(ram));
    dev.dma_on_doorbell.push(DmaJob::Read { iova: 0x1000, len });
    dev.dma_on_doorbell.push(DmaJob::Write {
        iova: 0x10,
        data: vec![0xee; 8],
    });
    let served = negotiated(&mut dev, |c| {
        c.set_dma_memory(Box::new(Ram(ram.clone())));
        c.dma_map(0, 0x20_0000, 0, RW, None).expect("DMA_MAP");
        c.write32(0, DOORBELL, 1).expect("doorbell");
        // The jobs run between commands, one DMA message in flight at a
        // time: the client serves them while it waits for these replies.
        for _ in 0..4 {
            c.device_info().expect("DEVICE_GET_INFO");
        }
        c.dma_requests_served
    });
    assert_eq!(served, 3, "two DMA_READ chunks and one DMA_WRITE");
    assert_eq!(dev.dma_done.len(), 2);
    let (_, read) = &dev.dma_done[0];
    let read = read.as_ref().expect("the read completed");
    assert_eq!(read.len(), len);
    assert!(read
        .iter()
        .enumerate()
        .all(|(i, b)| *b == ((i + 0x1000) % 251) as u8));
    assert!(dev.dma_done[1].1.is_ok());
    assert_eq!(&ram.lock().expect("ram")[0x10..0x18], &[0xee; 8]);
}

#[test]
fn device_dma_outside_every_map_fails_without_a_message() {
    let mut dev = MockDevice::new();
    dev.dma_queue.push(DmaJob::Read {
        iova: 0x9000_0000,
        len: 4,
    });
    let served = negotiated(&mut dev, |c| {
        c.device_info().expect("DEVICE_GET_INFO");
        c.dma_requests_served
    });
    assert_eq!(served, 0);
    assert!(dev.dma_done[0].1.is_err());
}

mod dma_multi;
mod regions;
