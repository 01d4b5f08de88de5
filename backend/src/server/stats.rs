//! What one connection asked for, logged when it ends: it shows, e.g., that
//! BAR accesses went through the mmap fast path (no REGION_* for them).

use std::time::Instant;

/// REGION_READ handling times kept for the median.
pub(super) const READ_SAMPLES: usize = 1024;
/// Distinct BAR registers whose writes came by message.
const WRITE_SPOTS: usize = 8;

#[derive(Debug)]
pub(super) struct Stats {
    pub messages: u64,
    /// REGION_READ / REGION_WRITE (incl. WRITE_MULTI entries) per region
    /// index; the last slot counts indexes >= 9.
    pub reads: [u64; 10],
    pub writes: [u64; 10],
    pub dma_maps: u64,
    pub set_irqs: u64,
    /// Commands answered with an error (or posted ones that failed).
    pub errors: u64,
    /// The first distinct (region, offset) pairs written by message, and
    /// how often: which registers miss the mmap fast path.
    write_spots: [(u32, u64, u64); WRITE_SPOTS],
    /// Time spent on the last REGION_READs, arrival to reply sent (ns).
    read_ns: [u32; READ_SAMPLES],
    read_samples: usize,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            messages: 0,
            reads: [0; 10],
            writes: [0; 10],
            dma_maps: 0,
            set_irqs: 0,
            errors: 0,
            write_spots: [(0, 0, 0); WRITE_SPOTS],
            read_ns: [0; READ_SAMPLES],
            read_samples: 0,
        }
    }
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

    /// airlock's share of a guest's MMIO read: from the request's arrival
    /// to the reply's send (the last READ_SAMPLES kept, for a median that
    /// preemption cannot skew).
    pub fn timed_read(&mut self, arrived: Instant) {
        let ns = arrived.elapsed().as_nanos().min(u32::MAX as u128) as u32;
        self.read_ns[self.read_samples % READ_SAMPLES] = ns;
        self.read_samples += 1;
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

    /// Median REGION_READ handling time over the last samples (0: none).
    pub fn read_median_ns(&self) -> u32 {
        let n = self.read_samples.min(READ_SAMPLES);
        let mut v = self.read_ns[..n].to_vec();
        v.sort_unstable();
        v.get(n / 2).copied().unwrap_or(0)
    }

    /// How many REGION_READ times the median is taken over.
    pub fn read_samples(&self) -> usize {
        self.read_samples.min(READ_SAMPLES)
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
        assert_eq!((s.read_median_ns(), s.read_samples()), (0, 0));
    }
}
