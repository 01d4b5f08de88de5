//! What airlock makes of the devices people pass through, on fakes of the
//! kernel's answers: config space as vfio-pci presents it and the region
//! sizes VFIO reports. An 82576 VF (QEMU's igbvf: two 64-bit prefetchable
//! BARs, MSI-X only, its table and PBA in BAR3, no INTx, no ROM) and an
//! ivshmem-plain (a 1 GiB 64-bit prefetchable BAR2 placed above 4 GiB).

use airlock_protocol::device::SparseArea;

use super::bar_shadow::BarShadow;
use super::kernel::msix_holes;
use super::sparse::{mmap_areas, Hole};

/// A config space and the reader VFIO's config region would be.
struct FakeConfig([u8; 256]);

impl FakeConfig {
    fn new(vendor: u16, device: u16) -> FakeConfig {
        let mut c = [0u8; 256];
        c[0..2].copy_from_slice(&vendor.to_le_bytes());
        c[2..4].copy_from_slice(&device.to_le_bytes());
        FakeConfig(c)
    }

    fn put32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn reader(&self) -> impl Fn(usize, &mut [u8]) -> std::io::Result<()> + '_ {
        |at, out| {
            let end = at + out.len();
            if end > self.0.len() {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            out.copy_from_slice(&self.0[at..end]);
            Ok(())
        }
    }
}

/// QEMU's igbvf (hw/net/igbvf.c) as vfio-pci shows it in the host.
fn igb_vf() -> (FakeConfig, [u64; 7]) {
    let mut c = FakeConfig::new(0x8086, 0x10ca);
    c.0[0x06] = 0x10; // status: capability list
    c.put32(0x10, 0xfe00_000c); // BAR0: 64-bit prefetchable, at its host address
    c.put32(0x1c, 0xfe00_400c); // BAR3: the same kind
    c.0[0x34] = 0x70;
    c.0[0x3d] = 0; // no INTx pin: a VF has MSI-X only
                   // MSI-X at 0x70: 3 vectors, table at BAR3 + 0, PBA at BAR3 + 0x2000.
    c.0[0x70] = crate::device::pci::CAP_ID_MSIX;
    c.0[0x71] = 0xa0;
    c.0[0x72] = 2;
    c.put32(0x74, 3);
    c.put32(0x78, 0x2000 | 3);
    // PCI Express at 0xa0, last.
    c.0[0xa0] = 0x10;
    (c, [16 << 10, 0, 0, 16 << 10, 0, 0, 0])
}

/// ivshmem-plain with a 1 GiB memory backend, BAR2 placed at 4 GiB.
fn ivshmem_1g() -> (FakeConfig, [u64; 7]) {
    let mut c = FakeConfig::new(0x1af4, 0x1110);
    c.put32(0x10, 0xfeb0_0000); // BAR0: 256 bytes of registers, 32-bit
    c.put32(0x18, 0x0000_000c); // BAR2: 64-bit prefetchable, low half
    c.put32(0x1c, 0x0000_0001); // high half: 4 GiB
    (c, [256, 0, 1 << 30, 0, 0, 0, 0])
}

fn shadow(c: &FakeConfig, sizes: [u64; 7]) -> BarShadow {
    BarShadow::read(c.reader(), |i| sizes[i]).expect("config reads")
}

fn read32(s: &BarShadow, c: &FakeConfig, at: usize) -> u32 {
    let mut b = [0u8; 4];
    c.reader()(at, &mut b).unwrap();
    s.overlay(at, &mut b);
    u32::from_le_bytes(b)
}

fn write32(s: &mut BarShadow, at: usize, v: u32) {
    let bytes = v.to_le_bytes();
    assert!(
        s.absorb(at, &bytes).is_empty(),
        "BAR and ROM writes never reach the device"
    );
}

#[test]
fn an_igb_vf_sizes_its_two_64bit_bars_and_has_no_rom() {
    let (c, sizes) = igb_vf();
    let mut s = shadow(&c, sizes);
    assert_eq!(read32(&s, &c, 0x10), 0xc, "the host address never shows");
    assert_eq!(read32(&s, &c, 0x1c), 0xc);
    for bar in [0x10, 0x1c] {
        write32(&mut s, bar, u32::MAX);
        write32(&mut s, bar + 4, u32::MAX);
        assert_eq!(
            read32(&s, &c, bar),
            0xffff_c00c,
            "16 KiB, 64-bit, prefetchable"
        );
        assert_eq!(read32(&s, &c, bar + 4), u32::MAX);
    }
    // BAR2 and BAR5 are not implemented; neither is a ROM.
    for unused in [0x18, 0x24, 0x30] {
        write32(&mut s, unused, u32::MAX);
        assert_eq!(
            read32(&s, &c, unused),
            0,
            "{unused:#x} reads 0 after sizing"
        );
    }
    // The guest places BAR3 above 4 GiB: both halves keep its address.
    write32(&mut s, 0x1c, 0x4000_0000);
    write32(&mut s, 0x20, 0x2);
    assert_eq!(read32(&s, &c, 0x1c), 0x4000_000c);
    assert_eq!(read32(&s, &c, 0x20), 0x2);
}

#[test]
fn an_igb_vf_offers_bar0_whole_and_bar3_around_its_msix_table_and_pba() {
    let (c, sizes) = igb_vf();
    let holes = msix_holes(c.reader()).unwrap();
    assert_eq!(
        holes,
        vec![
            (3, Hole { start: 0, end: 48 }),
            (
                3,
                Hole {
                    start: 0x2000,
                    end: 0x2008
                }
            )
        ]
    );
    let whole = |size| vec![SparseArea { offset: 0, size }];
    let bar3: Vec<Hole> = holes.iter().map(|(_, h)| *h).collect();
    assert_eq!(
        mmap_areas(&whole(sizes[3]), &bar3),
        vec![
            SparseArea {
                offset: 0x1000,
                size: 0x1000
            },
            SparseArea {
                offset: 0x3000,
                size: 0x1000
            }
        ],
        "QEMU emulates the table; the PBA page goes through airlock"
    );
    assert_eq!(mmap_areas(&whole(sizes[0]), &[]), whole(sizes[0]));
}

#[test]
fn a_1gib_bar_above_4gib_sizes_across_both_halves_and_is_mapped_whole() {
    let (c, sizes) = ivshmem_1g();
    let mut s = shadow(&c, sizes);
    assert_eq!(read32(&s, &c, 0x18), 0xc);
    assert_eq!(
        read32(&s, &c, 0x1c),
        0,
        "the host's 4 GiB placement never shows"
    );
    write32(&mut s, 0x18, u32::MAX);
    write32(&mut s, 0x1c, u32::MAX);
    assert_eq!(
        read32(&s, &c, 0x18),
        0xc000_000c,
        "1 GiB, 64-bit, prefetchable"
    );
    assert_eq!(read32(&s, &c, 0x1c), u32::MAX);
    // The guest puts it at 0x8_4000_0000.
    write32(&mut s, 0x18, 0x4000_0000);
    write32(&mut s, 0x1c, 0x8);
    assert_eq!(read32(&s, &c, 0x18), 0x4000_000c);
    assert_eq!(read32(&s, &c, 0x1c), 0x8);
    // BAR0 (registers) still sizes as a 32-bit BAR.
    write32(&mut s, 0x10, u32::MAX);
    assert_eq!(read32(&s, &c, 0x10), 0xffff_ff00);
    assert!(msix_holes(c.reader()).unwrap().is_empty());
    let all = vec![SparseArea {
        offset: 0,
        size: sizes[2],
    }];
    assert_eq!(
        mmap_areas(&all, &[]),
        all,
        "no MSI-X: the client maps all of it"
    );
}
