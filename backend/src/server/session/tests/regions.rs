//! The information, interrupt and region commands, against the mock device.

use super::*;

// ---- DEVICE_GET_INFO, GET_REGION_INFO, GET_REGION_IO_FDS, GET_IRQ_INFO --------------

#[test]
fn device_info_reports_the_devices_flags_regions_and_irqs() {
    let mut dev = MockDevice::new();
    let info = negotiated(&mut dev, |c| c.device_info().expect("DEVICE_GET_INFO"));
    assert_eq!(info.flags, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET);
    assert_eq!(info.num_regions, PCI_CONFIG_REGION_INDEX + 2);
    assert_eq!(info.num_irqs, NUM_IRQS);
}

#[test]
fn region_info_reports_size_and_flags_and_refuses_a_missing_region() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        let (info, fd) = c.region_info(0).expect("region 0");
        assert_eq!(info.size, BAR0_SIZE);
        assert_eq!(info.flags, REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE);
        assert!(fd.is_none(), "a region without FLAG_MMAP sends no fd");
        assert_eq!(errno(c.region_info(99)), libc::EINVAL);
        // A too-small argsz gets the fixed part, and the stream goes on.
        let q = RegionInfo::encode_request(16, 0);
        let r = c.request(Command::DeviceGetRegionInfo, &q, &[]);
        assert!(r.is_ok() || errno(r) == libc::EINVAL);
        assert!(c.device_info().is_ok());
    });
}

#[test]
fn region_io_fds_offers_none_and_refuses_a_missing_region() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        let q = |index| {
            RegionIoFds {
                argsz: RegionIoFds::SIZE as u32,
                flags: 0,
                index,
                count: 0,
            }
            .encode()
        };
        let r = c
            .request(Command::DeviceGetRegionIoFds, &q(0), &[])
            .expect("GET_REGION_IO_FDS");
        let reply = RegionIoFds::decode(&r.payload).expect("reply");
        assert_eq!((reply.index, reply.count), (0, 0));
        assert_eq!(
            errno(c.request(Command::DeviceGetRegionIoFds, &q(99), &[])),
            libc::EINVAL
        );
    });
}

#[test]
fn irq_info_reports_each_index_and_refuses_one_past_the_last() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        for i in 0..NUM_IRQS {
            assert_eq!(c.irq_info(i).expect("GET_IRQ_INFO").count, 1);
        }
        assert_eq!(errno(c.irq_info(NUM_IRQS)), libc::EINVAL);
    });
}

// ---- SET_IRQS -------------------------------------------------------------------

#[test]
fn set_irqs_reaches_the_device_as_sent() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        c.set_irqs(1, 0, 1, IrqAction::Mask, IrqData::None)
            .expect("SET_IRQS");
    });
    assert!(dev.called("set_irqs 1 0 1 mask"), "{:?}", dev.calls);
}

// ---- REGION_READ / REGION_WRITE / REGION_WRITE_MULTI --------------------------------

#[test]
fn region_write_then_read_round_trips_through_the_device() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        c.write32(0, 0x40, 0x1234_5678).expect("REGION_WRITE");
        assert_eq!(c.read32(0, 0x40).expect("REGION_READ"), 0x1234_5678);
        assert_eq!(
            c.region_read(1, 0, 2).expect("read-only region"),
            vec![0xab; 2]
        );
    });
    assert_eq!(&dev.bar0[0x40..0x44], &0x1234_5678u32.to_ne_bytes());
}

#[test]
fn accesses_outside_a_region_or_against_its_flags_are_refused() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        assert_eq!(errno(c.region_read(0, BAR0_SIZE - 2, 4)), libc::EINVAL);
        assert_eq!(errno(c.region_read(99, 0, 4)), libc::EINVAL);
        assert_eq!(errno(c.region_write(1, 0, &[1, 2, 3, 4])), libc::EINVAL);
        // Region 2 exists but allows nothing.
        assert_eq!(errno(c.region_read(2, 0, 4)), libc::EINVAL);
        assert_eq!(c.read32(0, BAR0_SIZE - 4).expect("last word"), 0);
    });
}

#[test]
fn a_posted_write_gets_no_reply_and_lands_before_the_next_read() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        c.region_write_posted(0, 8, &7u32.to_ne_bytes())
            .expect("posted");
        // A stray reply to the posted write would arrive first and carry
        // another id: the client would fail this read.
        assert_eq!(c.read32(0, 8).expect("REGION_READ"), 7);
    });
}

#[test]
fn write_multi_needs_the_capability() {
    let mut dev = MockDevice::new();
    serve(&mut dev, |c| {
        let caps = Capabilities {
            write_multiple: None,
            ..Client::qemu_capabilities()
        };
        c.negotiate(caps).expect("VERSION");
        assert_eq!(errno(c.write_multi(&[one(0, 1)])), libc::EINVAL);
    });
    assert_eq!(dev.bar0[0], 0);
}

#[test]
fn write_multi_applies_each_write_in_order_and_echoes_the_count() {
    let mut dev = MockDevice::new();
    negotiated(&mut dev, |c| {
        let n = c
            .write_multi(&[one(0, 1), one(4, 2), one(0, 3)])
            .expect("WRITE_MULTI");
        assert_eq!(n, 3);
        // One bad entry fails the message.
        assert_eq!(errno(c.write_multi(&[one(BAR0_SIZE, 9)])), libc::EINVAL);
    });
    assert_eq!((dev.bar0[0], dev.bar0[4]), (3, 2));
}

fn one(offset: u64, v: u8) -> WriteOne {
    let mut w = WriteOne {
        offset,
        region: 0,
        count: 1,
        data: Default::default(),
    };
    w.data[0] = v;
    w
}
