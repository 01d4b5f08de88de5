//! Given a client speaking vfio-user to `airlock --emulate edu`, the device
//! behaves as QEMU's edu (plus MSI-X) through the protocol alone.

mod common;

use std::sync::{Arc, Mutex};

use airlock::device::emulated::edu::*;
use airlock_protocol::client::DmaMemory;
use airlock_protocol::device::*;
use airlock_protocol::irqs::{IrqAction, IrqData};
use common::*;

#[test]
fn version_reply_is_0_0_with_fd_and_xfer_limits_and_no_unproposed_keys() {
    let s = start_edu("version");
    let mut c = airlock_protocol::client::Client::connect(&s.path).unwrap();
    let v = c
        .negotiate(airlock_protocol::client::Client::qemu_capabilities())
        .unwrap();
    assert_eq!((v.major, v.minor), (0, 0));
    let caps = v.capabilities.unwrap();
    assert_eq!(caps.max_msg_fds, Some(16));
    assert_eq!(caps.max_data_xfer_size, Some(1 << 20));
    assert!(
        caps.other.is_empty(),
        "migration must not be echoed: {:?}",
        caps.other
    );
    assert!(caps.iova_ranges.is_none());
}

#[test]
fn device_info_describes_a_resettable_pci_device() {
    let s = start_edu("info");
    let mut c = connect(&s);
    let i = c.device_info().unwrap();
    assert_eq!(i.flags, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET);
    assert_eq!((i.num_regions, i.num_irqs), (9, 5));
    let (bar0, fd) = c.region_info(0).unwrap();
    assert_eq!(bar0.size, 1 << 20);
    assert!(fd.is_none());
    assert_eq!(c.region_info(7).unwrap().0.size, 4096);
    assert_eq!(c.irq_info(PCI_MSIX_IRQ_INDEX).unwrap().count, MSIX_VECTORS);
    assert_eq!(c.irq_info(PCI_MSI_IRQ_INDEX).unwrap().count, 1);
    assert_ne!(
        c.irq_info(PCI_INTX_IRQ_INDEX).unwrap().flags & IRQ_INFO_AUTOMASKED,
        0
    );
}

#[test]
fn ident_liveness_and_factorial_match_qemu_edu() {
    let s = start_edu("regs");
    let mut c = connect(&s);
    assert_eq!(c.read32(0, REG_IDENT).unwrap(), 0x010000ed);
    c.write32(0, REG_LIVENESS, 0x12345678).unwrap();
    assert_eq!(c.read32(0, REG_LIVENESS).unwrap(), !0x12345678);
    c.write32(0, REG_FACTORIAL, 10).unwrap();
    assert_eq!(c.read32(0, REG_STATUS).unwrap() & 1, 0);
    assert_eq!(c.read32(0, REG_FACTORIAL).unwrap(), 3628800);
    c.write32(0, REG_FACTORIAL, 40).unwrap();
    assert_eq!(c.read32(0, REG_FACTORIAL).unwrap(), 0);
}

#[test]
fn config_space_has_ids_sizable_bars_and_a_capability_chain() {
    let s = start_edu("config");
    let mut c = connect(&s);
    assert_eq!(c.read32(CFG, 0).unwrap(), 0x11e8_1234);
    c.write32(CFG, 0x10, 0xffff_ffff).unwrap();
    assert_eq!(c.read32(CFG, 0x10).unwrap(), !(BAR0_SIZE as u32 - 1));
    c.write32(CFG, 0x14, 0xffff_ffff).unwrap();
    assert_eq!(c.read32(CFG, 0x14).unwrap(), !(BAR1_SIZE as u32 - 1));
    c.write32(CFG, 0x10, 0xfe00_0000).unwrap();
    assert_eq!(c.read32(CFG, 0x10).unwrap(), 0xfe00_0000);
    let status = c.read32(CFG, 4).unwrap() >> 16;
    assert_ne!(status & 0x10, 0, "capability list bit");
    let mut ids = vec![];
    let mut at = c.region_read(CFG, 0x34, 1).unwrap()[0] as u64;
    while at != 0 && ids.len() < 8 {
        let h = c.region_read(CFG, at, 2).unwrap();
        ids.push(h[0]);
        at = h[1] as u64;
    }
    assert_eq!(ids, vec![0x05, 0x10, 0x11]);
}

#[test]
fn dma_both_ways_through_a_memfd_backed_map() {
    let s = start_edu("dma-memfd");
    let mut c = connect(&s);
    let mut mem = Memfd::new(1 << 20);
    c.dma_map(
        0x100000,
        1 << 20,
        0,
        RW,
        Some(std::os::fd::AsFd::as_fd(&mem.fd)),
    )
    .unwrap();
    enable_bus_master(&mut c);
    for (i, b) in mem.slice()[..4096].iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    run_dma(&mut c, 0x100000, DMA_BUFFER, 4096, 1);
    run_dma(&mut c, DMA_BUFFER, 0x100000 + 0x8000, 4096, 1 | 2);
    assert_eq!(c.read32(0, REG_DMA_ERROR).unwrap(), 0);
    let m = mem.slice();
    assert_eq!(&m[0x8000..0x9000], &m[..4096]);
}

/// DMA_MAP_MULTI: two maps into one memfd sent once, at other offsets,
/// each reached by the device's DMA (pread/pwrite on the shared file);
/// DMA_UNMAP_MULTI takes both, and a DMA there then fails.
#[test]
fn dma_through_maps_made_and_taken_in_one_message_each() {
    use airlock_protocol::client::Client;
    use airlock_protocol::dma_multi::{DmaMapEntry, DmaUnmapEntry};
    let s = start_edu("dma-multi");
    let mut c = Client::connect(&s.path).unwrap();
    let mut caps = Client::qemu_capabilities();
    caps.dma_multiple = Some(true);
    c.negotiate(caps).unwrap();
    let mut mem = Memfd::new(1 << 16);
    let map = |iova, offset| DmaMapEntry {
        flags: RW,
        fd_index: 0,
        offset,
        iova,
        size: 0x4000,
    };
    let maps = [map(0x100000, 0x8000), map(0x300000, 0)];
    let fd = std::os::fd::AsFd::as_fd(&mem.fd);
    assert_eq!(c.dma_map_multi(&maps, &[fd]).unwrap(), [0, 0]);
    enable_bus_master(&mut c);
    for (i, b) in mem.slice()[0x8000..0x9000].iter_mut().enumerate() {
        *b = (i * 5 + 1) as u8;
    }
    // IOVA 0x100000 is file offset 0x8000; 0x301000 is file offset 0x1000.
    run_dma(&mut c, 0x100000, DMA_BUFFER, 4096, 1);
    run_dma(&mut c, DMA_BUFFER, 0x301000, 4096, 1 | 2);
    assert_eq!(c.read32(0, REG_DMA_ERROR).unwrap(), 0);
    let m = mem.slice();
    assert_eq!(&m[0x1000..0x2000], &m[0x8000..0x9000]);
    let unmaps = maps.map(|m| DmaUnmapEntry {
        flags: 0,
        iova: m.iova,
        size: m.size,
    });
    assert_eq!(c.dma_unmap_multi(&unmaps).unwrap(), [0, 0]);
    run_dma(&mut c, DMA_BUFFER, 0x100000, 64, 3);
    assert_eq!(
        c.read32(0, REG_DMA_ERROR).unwrap() & DMA_ERR_UNMAPPED,
        DMA_ERR_UNMAPPED
    );
}

#[test]
fn dma_without_bus_mastering_sets_the_error_bit_and_moves_nothing() {
    let s = start_edu("dma-nomaster");
    let mut c = connect(&s);
    let mem = Memfd::new(1 << 16);
    c.dma_map(
        0x100000,
        1 << 16,
        0,
        RW,
        Some(std::os::fd::AsFd::as_fd(&mem.fd)),
    )
    .unwrap();
    run_dma(&mut c, DMA_BUFFER, 0x100000, 64, 3);
    assert_eq!(c.read32(0, REG_DMA_ERROR).unwrap(), DMA_ERR_NO_MASTER);
}

#[test]
fn dma_to_an_unmapped_iova_sets_the_error_bit_and_the_server_goes_on() {
    let s = start_edu("dma-unmapped");
    let mut c = connect(&s);
    let mem = Memfd::new(1 << 16);
    c.dma_map(
        0x100000,
        1 << 16,
        0,
        RW,
        Some(std::os::fd::AsFd::as_fd(&mem.fd)),
    )
    .unwrap();
    enable_bus_master(&mut c);
    c.dma_unmap(0x100000, 1 << 16, 0).unwrap();
    run_dma(&mut c, DMA_BUFFER, 0x100000, 64, 3);
    assert_eq!(
        c.read32(0, REG_DMA_ERROR).unwrap() & DMA_ERR_UNMAPPED,
        DMA_ERR_UNMAPPED
    );
    c.write32(0, REG_DMA_ERROR, 0).unwrap();
    assert_eq!(c.read32(0, REG_DMA_ERROR).unwrap(), 0);
    assert_eq!(c.read32(0, REG_IDENT).unwrap(), IDENT);
}

/// Client memory reached only through DMA_READ / DMA_WRITE messages.
struct VecMemory {
    base: u64,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl DmaMemory for VecMemory {
    fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), i32> {
        let m = self.bytes.lock().unwrap();
        let at = (iova - self.base) as usize;
        buf.copy_from_slice(m.get(at..at + buf.len()).ok_or(libc::EFAULT)?);
        Ok(())
    }
    fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), i32> {
        let mut m = self.bytes.lock().unwrap();
        let at = (iova - self.base) as usize;
        m.get_mut(at..at + data.len())
            .ok_or(libc::EFAULT)?
            .copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn dma_both_ways_through_dma_read_and_dma_write_messages_when_the_map_has_no_fd() {
    let s = start_edu("dma-msg");
    let mut c = connect(&s);
    let bytes = Arc::new(Mutex::new(
        (0..65536u32)
            .map(|i| (i * 13 + 1) as u8)
            .collect::<Vec<u8>>(),
    ));
    c.set_dma_memory(Box::new(VecMemory {
        base: 0x200000,
        bytes: bytes.clone(),
    }));
    c.dma_map(0x200000, 65536, 0, RW, None).unwrap();
    enable_bus_master(&mut c);
    run_dma(&mut c, 0x200000, DMA_BUFFER, 4096, 1);
    run_dma(&mut c, DMA_BUFFER, 0x200000 + 0x4000, 4096, 3);
    assert_eq!(c.read32(0, REG_DMA_ERROR).unwrap(), 0);
    let m = bytes.lock().unwrap();
    assert_eq!(&m[0x4000..0x5000], &m[..4096]);
    assert!(c.dma_requests_served >= 2);
}

#[test]
fn msi_is_signalled_on_the_clients_eventfd() {
    let s = start_edu("msi");
    let mut c = connect(&s);
    let e = eventfd();
    c.set_irqs(
        PCI_MSI_IRQ_INDEX,
        0,
        1,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![e.try_clone().unwrap()]),
    )
    .unwrap();
    c.write32(0, REG_IRQ_RAISE, 1).unwrap();
    assert_eq!(eventfd_wait(&e, 2000), 1);
    c.write32(0, REG_IRQ_ACK, 1).unwrap();
    assert_eq!(c.read32(0, REG_IRQ_STATUS).unwrap(), 0);
}

#[test]
fn each_msix_vector_reaches_only_its_own_eventfd_and_masked_ones_show_in_the_pba() {
    let s = start_edu("msix");
    let mut c = connect(&s);
    let fds: Vec<_> = (0..MSIX_VECTORS).map(|_| eventfd()).collect();
    let dup = fds.iter().map(|f| f.try_clone().unwrap()).collect();
    c.set_irqs(
        PCI_MSIX_IRQ_INDEX,
        0,
        MSIX_VECTORS,
        IrqAction::Trigger,
        IrqData::Eventfds(dup),
    )
    .unwrap();
    for v in 0..MSIX_VECTORS {
        c.write32(0, REG_MSIX_RAISE, v).unwrap();
        assert_eq!(eventfd_wait(&fds[v as usize], 2000), 1, "vector {v}");
        for (o, f) in fds.iter().enumerate() {
            if o as u32 != v {
                assert_eq!(eventfd_wait(f, 0), 0, "vector {o} fired for {v}");
            }
        }
    }
    c.set_irqs(PCI_MSIX_IRQ_INDEX, 2, 1, IrqAction::Mask, IrqData::None)
        .unwrap();
    c.write32(0, REG_MSIX_RAISE, 2).unwrap();
    assert_eq!(eventfd_wait(&fds[2], 50), 0);
    assert_eq!(c.region_read(1, MSIX_PBA_OFFSET, 1).unwrap()[0], 1 << 2);
    c.set_irqs(PCI_MSIX_IRQ_INDEX, 2, 1, IrqAction::Unmask, IrqData::None)
        .unwrap();
    assert_eq!(eventfd_wait(&fds[2], 2000), 1);
    assert_eq!(c.region_read(1, MSIX_PBA_OFFSET, 1).unwrap()[0], 0);
}

#[test]
fn intx_is_level_triggered_automasked_and_redelivered_after_unmask() {
    let s = start_edu("intx");
    let mut c = connect(&s);
    let e = eventfd();
    c.set_irqs(
        PCI_INTX_IRQ_INDEX,
        0,
        1,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![e.try_clone().unwrap()]),
    )
    .unwrap();
    c.write32(0, REG_IRQ_RAISE, 1).unwrap();
    assert_eq!(eventfd_wait(&e, 2000), 1);
    // Still asserted and automasked: an unmask delivers it again.
    c.set_irqs(PCI_INTX_IRQ_INDEX, 0, 1, IrqAction::Unmask, IrqData::None)
        .unwrap();
    assert_eq!(eventfd_wait(&e, 2000), 1);
    c.write32(0, REG_IRQ_ACK, 1).unwrap();
    c.set_irqs(PCI_INTX_IRQ_INDEX, 0, 1, IrqAction::Unmask, IrqData::None)
        .unwrap();
    assert_eq!(eventfd_wait(&e, 50), 0);
    c.write32(0, REG_IRQ_RAISE, 1).unwrap();
    assert_eq!(eventfd_wait(&e, 2000), 1);
}

#[test]
fn after_a_client_leaves_the_device_is_quiesced_and_the_next_client_is_served() {
    let s = start_edu("reconnect");
    {
        let mut c = connect(&s);
        c.write32(0, REG_LIVENESS, 5).unwrap();
        enable_bus_master(&mut c);
    }
    let mut c = connect(&s);
    assert_eq!(c.read32(0, REG_LIVENESS).unwrap(), 0);
    assert_eq!(
        c.read32(CFG, 4).unwrap() & 0x4,
        0,
        "bus mastering off after the last client"
    );
}
