//! What the kernel holds for the device, written down where the next
//! server can read it: every IOMMU mapping (range, flags, the memory
//! behind it) and, per interrupt index, whether it is enabled and which
//! vectors have a trigger eventfd.
//!
//! The supervisor opens the device once and keeps its VFIO fds, so a
//! killed server's mappings and interrupts stay in the kernel; this table
//! tells the next server what they are. It is a memfd mapped MAP_SHARED
//! (in VfioPci::open) before the first server is cloned, so every server
//! writes the same memory; a live upgrade hands the memfd across execve
//! with the VFIO fds, and the successor maps the same pages
//! (`from_memfd`). Only one server runs at a time and
//! the supervisor reaps it before it starts the next, so a reader never
//! races a writer; the fields are atomics because the memory is shared.
//!
//! A server can die between an ioctl and the table write that records it.
//! A map is therefore recorded as Pending before VFIO_IOMMU_MAP_DMA and
//! Mapped after; an unmap marks it Unmapping before VFIO_IOMMU_UNMAP_DMA
//! and frees it after. The next server unmaps a Pending or Unmapping range
//! (unmapping an exact range nobody mapped is a no-op) and drops it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::adopt::MapRecord;
use crate::dma::FileId;

/// Interrupt indexes recorded (vfio-pci has 5: INTx, MSI, MSI-X, ERR, REQ).
pub const IRQ_INDEXES: usize = 8;
/// Vectors recorded per index (MSI-X allows 2048).
pub const IRQ_VECTORS: usize = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Free = 0,
    /// VFIO_IOMMU_MAP_DMA may or may not have happened.
    Pending = 1,
    Mapped = 2,
    /// VFIO_IOMMU_UNMAP_DMA may or may not have happened.
    Unmapping = 3,
}

impl SlotState {
    fn from_u32(v: u32) -> SlotState {
        match v {
            1 => SlotState::Pending,
            2 => SlotState::Mapped,
            3 => SlotState::Unmapping,
            _ => SlotState::Free,
        }
    }
}

#[repr(C)]
struct Slot {
    state: AtomicU32,
    flags: AtomicU32,
    iova: AtomicU64,
    size: AtomicU64,
    dev: AtomicU64,
    ino: AtomicU64,
    offset: AtomicU64,
}

#[repr(C)]
struct IrqSlot {
    enabled: AtomicU32,
    /// An UNMASK eventfd (INTx resample) is set.
    resample: AtomicU32,
    vectors: [AtomicU64; IRQ_VECTORS / 64],
}

/// Names the table's layout; a successor built with another layout
/// refuses the table instead of misreading it. Bump on any change.
const MAGIC: u64 = u64::from_be_bytes(*b"airlkHO1");

#[repr(C)]
struct Head {
    magic: AtomicU64,
    /// The MSI isolation the first airlock checked (MsiIsolation::to_u32).
    isolation: AtomicU32,
    _pad: AtomicU32,
    irqs: [IrqSlot; IRQ_INDEXES],
}

/// An interrupt index the kernel has enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IrqRecord {
    pub index: u32,
    /// Vectors with a trigger eventfd.
    pub vectors: Vec<u32>,
    pub resample: bool,
}

/// The shared table; the mapping is unmapped and the memfd closed on
/// drop (each process drops its own view).
pub struct Handover {
    base: *mut u8,
    len: usize,
    capacity: usize,
    /// Free slots as this process knows them (rebuilt by `scan`).
    free: Vec<usize>,
    /// The memory itself, handed to a successor on a live upgrade.
    memfd: OwnedFd,
}

// SAFETY: the shared memory is only accessed through atomics.
unsafe impl Send for Handover {}

const HEAD: usize = std::mem::size_of::<Head>();
const SLOT: usize = std::mem::size_of::<Slot>();

impl Handover {
    /// A zeroed table for `capacity` mappings (no mapping, no interrupt).
    pub fn new(capacity: usize) -> io::Result<Handover> {
        let len = HEAD + capacity * SLOT;
        // SAFETY: the name is NUL-terminated; the result is checked.
        let fd =
            unsafe { libc::memfd_create(c"airlock-vfio-handover".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new fd nobody else owns.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our memfd; a new memfd reads as zeroes, a
        // valid Free/disabled state for every field.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let h = Self::map(memfd, len)?;
        h.head().magic.store(MAGIC, Ordering::Release);
        Ok(h)
    }

    /// The table a previous airlock handed over across execve: the same
    /// memory, with what its servers recorded.
    pub fn from_memfd(memfd: OwnedFd) -> io::Result<Handover> {
        // SAFETY: fstat writes into a zeroed stat we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the fd is ours.
        if unsafe { libc::fstat(memfd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = st.st_size as usize;
        if len < HEAD || !(len - HEAD).is_multiple_of(SLOT) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the handed-over table is {len} bytes, not a table of this airlock's layout"
                ),
            ));
        }
        let h = Self::map(memfd, len)?;
        let magic = h.head().magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the handed-over table has layout {magic:#x}, this airlock reads {MAGIC:#x} (an upgrade across incompatible versions: restart airlock instead, which resets the device)"),
            ));
        }
        Ok(h)
    }

    fn map(memfd: OwnedFd, len: usize) -> io::Result<Handover> {
        // SAFETY: a shared mapping of the whole memfd with no address
        // hint; checked below and owned (unmapped on drop) by Handover.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let capacity = (len - HEAD) / SLOT;
        Ok(Handover {
            base: p.cast(),
            len,
            capacity,
            free: (0..capacity).rev().collect(),
            memfd,
        })
    }

    /// The memfd, for a live upgrade's handover.
    pub fn raw_fd(&self) -> RawFd {
        self.memfd.as_raw_fd()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn set_isolation(&self, v: u32) {
        self.head().isolation.store(v, Ordering::Release);
    }

    pub fn isolation(&self) -> u32 {
        self.head().isolation.load(Ordering::Acquire)
    }

    fn head(&self) -> &Head {
        // SAFETY: the mapping starts with a Head, is page-aligned and
        // lives as long as self; all its fields are atomics.
        unsafe { &*(self.base as *const Head) }
    }

    fn slot(&self, i: usize) -> &Slot {
        assert!(i < self.capacity, "slot {i} of {}", self.capacity);
        // SAFETY: i < capacity, so the Slot lies inside the mapping, after
        // the Head, 8-byte aligned (Head and Slot sizes are multiples of 8).
        unsafe { &*(self.base.add(HEAD + i * SLOT) as *const Slot) }
    }

    fn read(&self, i: usize) -> MapRecord {
        let s = self.slot(i);
        MapRecord {
            iova: s.iova.load(Ordering::Acquire),
            size: s.size.load(Ordering::Acquire),
            flags: s.flags.load(Ordering::Acquire),
            file: FileId {
                dev: s.dev.load(Ordering::Acquire),
                ino: s.ino.load(Ordering::Acquire),
                offset: s.offset.load(Ordering::Acquire),
            },
        }
    }

    /// Every used slot as (slot, state, record); rebuilds the free list.
    pub fn scan(&mut self) -> Vec<(usize, SlotState, MapRecord)> {
        let mut used = Vec::new();
        self.free.clear();
        for i in (0..self.capacity).rev() {
            match SlotState::from_u32(self.slot(i).state.load(Ordering::Acquire)) {
                SlotState::Free => self.free.push(i),
                st => used.push((i, st, self.read(i))),
            }
        }
        used.reverse();
        used
    }

    /// Records a map about to be made (Pending); None when the table is full.
    pub fn begin_map(&mut self, r: &MapRecord) -> Option<usize> {
        let i = self.free.pop()?;
        let s = self.slot(i);
        s.iova.store(r.iova, Ordering::Release);
        s.size.store(r.size, Ordering::Release);
        s.flags.store(r.flags, Ordering::Release);
        s.dev.store(r.file.dev, Ordering::Release);
        s.ino.store(r.file.ino, Ordering::Release);
        s.offset.store(r.file.offset, Ordering::Release);
        s.state.store(SlotState::Pending as u32, Ordering::Release);
        Some(i)
    }

    pub fn mark(&self, i: usize, st: SlotState) {
        self.slot(i).state.store(st as u32, Ordering::Release);
    }

    pub fn free(&mut self, i: usize) {
        self.mark(i, SlotState::Free);
        self.free.push(i);
    }

    fn irq(&self, index: u32) -> Option<&IrqSlot> {
        self.head().irqs.get(index as usize)
    }

    /// The index is enabled in the kernel (a TRIGGER with eventfds passed).
    pub fn irq_enabled(&self, index: u32) {
        if let Some(s) = self.irq(index) {
            s.enabled.store(1, Ordering::Release);
        }
    }

    pub fn irq_vector(&self, index: u32, vector: u32, on: bool) {
        let Some(s) = self.irq(index) else { return };
        let Some(word) = s.vectors.get(vector as usize / 64) else {
            return;
        };
        let bit = 1u64 << (vector % 64);
        if on {
            word.fetch_or(bit, Ordering::AcqRel);
        } else {
            word.fetch_and(!bit, Ordering::AcqRel);
        }
    }

    pub fn irq_resample(&self, index: u32, on: bool) {
        if let Some(s) = self.irq(index) {
            s.resample.store(on as u32, Ordering::Release);
        }
    }

    /// The index is disabled in the kernel: no vectors, no resample.
    pub fn irq_disabled(&self, index: u32) {
        let Some(s) = self.irq(index) else { return };
        s.enabled.store(0, Ordering::Release);
        s.resample.store(0, Ordering::Release);
        for w in &s.vectors {
            w.store(0, Ordering::Release);
        }
    }

    /// The enabled indexes.
    pub fn irqs(&self) -> Vec<IrqRecord> {
        let mut out = Vec::new();
        for (index, s) in self.head().irqs.iter().enumerate() {
            if s.enabled.load(Ordering::Acquire) == 0 {
                continue;
            }
            let mut vectors = Vec::new();
            for (w, word) in s.vectors.iter().enumerate() {
                let bits = word.load(Ordering::Acquire);
                for b in 0..64 {
                    if bits & (1 << b) != 0 {
                        vectors.push((w * 64 + b) as u32);
                    }
                }
            }
            out.push(IrqRecord {
                index: index as u32,
                vectors,
                resample: s.resample.load(Ordering::Acquire) != 0,
            });
        }
        out
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        // SAFETY: exactly the range new() mapped; no reference into it
        // outlives self.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(iova: u64, ino: u64) -> MapRecord {
        MapRecord {
            iova,
            size: 0x1000,
            flags: 3,
            file: FileId {
                dev: 1,
                ino,
                offset: 0,
            },
        }
    }

    #[test]
    fn the_next_server_sees_what_the_previous_one_recorded() {
        let mut h = Handover::new(4).unwrap();
        let a = h.begin_map(&rec(0x1000, 5)).unwrap();
        h.mark(a, SlotState::Mapped);
        let b = h.begin_map(&rec(0x2000, 6)).unwrap();
        h.irq_enabled(2);
        h.irq_vector(2, 0, true);
        h.irq_vector(2, 65, true);
        h.set_isolation(2);
        // The next server (or, after a live upgrade, the next airlock)
        // maps the same memory from the memfd.
        let mut next = Handover::from_memfd(h.memfd.try_clone().unwrap()).unwrap();
        assert_eq!(next.capacity(), 4);
        assert_eq!(next.isolation(), 2);
        let used = next.scan();
        let irqs = next.irqs();
        let free = next.free.clone();
        assert_eq!(
            used,
            vec![
                (a, SlotState::Mapped, rec(0x1000, 5)),
                (b, SlotState::Pending, rec(0x2000, 6)),
            ]
        );
        assert_eq!(
            irqs,
            vec![IrqRecord {
                index: 2,
                vectors: vec![0, 65],
                resample: false,
            }]
        );
        assert_eq!(free, vec![3, 2]);
    }

    #[test]
    fn a_memfd_that_is_not_a_table_is_refused() {
        let other = Handover::new(1).unwrap();
        other.head().magic.store(7, Ordering::Release);
        let e = Handover::from_memfd(other.memfd.try_clone().unwrap())
            .err()
            .unwrap();
        assert!(e.to_string().contains("layout 0x7"), "{e}");
    }

    #[test]
    fn freed_slots_are_reused_and_a_full_table_says_so() {
        let mut h = Handover::new(2).unwrap();
        let a = h.begin_map(&rec(0, 1)).unwrap();
        let _b = h.begin_map(&rec(0x1000, 1)).unwrap();
        assert_eq!(h.begin_map(&rec(0x2000, 1)), None);
        h.free(a);
        assert_eq!(h.begin_map(&rec(0x2000, 1)), Some(a));
    }

    #[test]
    fn disabling_an_index_forgets_its_vectors() {
        let h = Handover::new(1).unwrap();
        h.irq_enabled(0);
        h.irq_vector(0, 0, true);
        h.irq_resample(0, true);
        assert!(h.irqs()[0].resample);
        h.irq_disabled(0);
        assert!(h.irqs().is_empty());
        h.irq_vector(9, 0, true);
        h.irq_vector(1, 4096, true);
        assert!(h.irqs().is_empty(), "out of range is ignored");
    }
}
