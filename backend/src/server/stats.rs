//! What one connection asked for, logged when it ends: it shows, e.g., that
//! BAR accesses went through the mmap fast path (no REGION_* for them).

use std::time::Instant;

/// Handling times kept per command for its median.
pub(super) const SAMPLES: usize = 1024;
/// Distinct BAR registers whose writes came by message.
const WRITE_SPOTS: usize = 8;

/// The last SAMPLES handling times of one command, arrival to reply sent
/// (ns): a median that preemption cannot skew.
#[derive(Debug)]
pub(super) struct Samples {
    ns: [u32; SAMPLES],
    taken: usize,
}

impl Default for Samples {
    fn default() -> Self {
        Samples {
            ns: [0; SAMPLES],
            taken: 0,
        }
    }
}

impl Samples {
    pub fn take(&mut self, arrived: Instant) {
        let ns = arrived.elapsed().as_nanos().min(u32::MAX as u128) as u32;
        self.ns[self.taken % SAMPLES] = ns;
        self.taken += 1;
    }

    /// Median over the kept samples (0: none).
    pub fn median_ns(&self) -> u32 {
        let n = self.count();
        let mut v = self.ns[..n].to_vec();
        v.sort_unstable();
        v.get(n / 2).copied().unwrap_or(0)
    }

    /// How many samples the median is taken over.
    pub fn count(&self) -> usize {
        self.taken.min(SAMPLES)
    }
}

/// The commands whose handling is timed: a clock is read for no other.
#[derive(Debug, Clone, Copy)]
pub(super) enum Timed {
    Read,
    Map,
    Unmap,
    /// DMA_MAP_MULTI / DMA_UNMAP_MULTI: per message, whatever its entries.
    MapMulti,
    UnmapMulti,
}

impl Timed {
    pub fn of(cmd: u16) -> Option<Timed> {
        use airlock_protocol::header::Command;
        match cmd {
            c if c == Command::RegionRead as u16 => Some(Timed::Read),
            c if c == Command::DmaMap as u16 => Some(Timed::Map),
            c if c == Command::DmaUnmap as u16 => Some(Timed::Unmap),
            c if c == Command::DmaMapMulti as u16 => Some(Timed::MapMulti),
            c if c == Command::DmaUnmapMulti as u16 => Some(Timed::UnmapMulti),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Stats {
    pub messages: u64,
    /// REGION_READ / REGION_WRITE (incl. WRITE_MULTI entries) per region
    /// index; the last slot counts indexes >= 9.
    pub reads: [u64; 10],
    pub writes: [u64; 10],
    pub dma_maps: u64,
    pub dma_unmaps: u64,
    /// DMA_MAP_MULTI / DMA_UNMAP_MULTI messages, and the maps and unmaps
    /// they carried (counted in dma_maps / dma_unmaps too).
    pub dma_batches: u64,
    pub dma_batched: u64,
    pub set_irqs: u64,
    /// Commands answered with an error (or posted ones that failed).
    pub errors: u64,
    /// The first distinct (region, offset) pairs written by message, and
    /// how often: which registers miss the mmap fast path.
    write_spots: [(u32, u64, u64); WRITE_SPOTS],
    /// airlock's share of a guest's MMIO read, and of a vIOMMU guest's DMA
    /// map and unmap (one each per I/O in strict mode).
    pub read_ns: Samples,
    pub map_ns: Samples,
    pub unmap_ns: Samples,
    pub map_multi_ns: Samples,
    pub unmap_multi_ns: Samples,
}

impl Stats {
    fn slot(region: u32) -> usize {
        (region as usize).min(9)
    }

    pub fn count_read(&mut self, region: u32) {
        self.reads[Stats::slot(region)] += 1;
    }

    pub fn count_write(&mut self, region: u32, offset: u64) {
        self.writes[Stats::slot(region)] += 1;
        // Config space always goes by message: only BAR registers count.
        if region == airlock_protocol::device::PCI_CONFIG_REGION_INDEX {
            return;
        }
        if let Some(spot) = self
            .write_spots
            .iter_mut()
            .find(|s| s.2 == 0 || (s.0, s.1) == (region, offset))
        {
            *spot = (region, offset, spot.2 + 1);
        }
    }

    /// Records a timed command's handling time.
    pub fn take(&mut self, cmd: Timed, arrived: Instant) {
        match cmd {
            Timed::Read => &mut self.read_ns,
            Timed::Map => &mut self.map_ns,
            Timed::Unmap => &mut self.unmap_ns,
            Timed::MapMulti => &mut self.map_multi_ns,
            Timed::UnmapMulti => &mut self.unmap_multi_ns,
        }
        .take(arrived);
    }

    /// "region:offset xcount" of the BAR registers written by message.
    pub fn write_spots(&self) -> String {
        let spots: Vec<String> = self
            .write_spots
            .iter()
            .filter(|s| s.2 > 0)
            .map(|(r, o, n)| format!("{r}:{o:#x} x{n}"))
            .collect();
        spots.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_past_nine_share_the_last_slot() {
        let mut s = Stats::default();
        s.count_read(3);
        s.count_read(9);
        s.count_read(42);
        assert_eq!(s.reads[3], 1);
        assert_eq!(s.reads[9], 2);
    }

    #[test]
    fn config_writes_are_counted_but_are_no_write_spot() {
        let mut s = Stats::default();
        s.count_write(airlock_protocol::device::PCI_CONFIG_REGION_INDEX, 4);
        s.count_write(0, 0x98);
        s.count_write(0, 0x98);
        assert_eq!(s.write_spots(), "0:0x98 x2");
        assert_eq!(s.writes[7] + s.writes[0], 3);
    }

    #[test]
    fn write_spots_keep_the_first_eight_registers() {
        let mut s = Stats::default();
        for off in 0..10u64 {
            s.count_write(0, off * 4);
        }
        assert_eq!(s.write_spots().matches(" x1").count(), WRITE_SPOTS);
        assert!(!s.write_spots().contains("0:0x24"));
    }

    #[test]
    fn no_reads_means_a_zero_median() {
        let s = Stats::default();
        assert_eq!((s.read_ns.median_ns(), s.read_ns.count()), (0, 0));
    }

    #[test]
    fn reads_maps_and_unmaps_are_timed_apart_and_nothing_else() {
        use airlock_protocol::header::Command;
        let mut s = Stats::default();
        let t = Instant::now();
        for cmd in [Command::RegionRead, Command::DmaMap, Command::DmaMap] {
            s.take(Timed::of(cmd as u16).expect("timed"), t);
        }
        s.take(Timed::of(Command::DmaMapMulti as u16).expect("timed"), t);
        assert!(Timed::of(Command::RegionWrite as u16).is_none());
        assert_eq!(s.read_ns.count(), 1);
        assert_eq!(s.map_ns.count(), 2);
        assert_eq!(s.unmap_ns.count(), 0);
        assert_eq!((s.map_multi_ns.count(), s.unmap_multi_ns.count()), (1, 0));
    }

    #[test]
    fn the_median_is_over_the_last_samples_only() {
        let mut s = Samples::default();
        let long_ago = Instant::now() - std::time::Duration::from_secs(1);
        s.take(long_ago);
        for _ in 0..SAMPLES {
            s.take(Instant::now());
        }
        assert_eq!(s.count(), SAMPLES);
        assert!(s.median_ns() < 1_000_000_000);
    }
}
