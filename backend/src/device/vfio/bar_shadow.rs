//! Config-space virtualization for a passthrough function: the BAR and ROM
//! registers live here (sizing works, guest addresses never reach the
//! device); every other byte goes to the device through VFIO, whose
//! kernel driver already virtualizes the MSI/MSI-X capabilities.

/// First and one-past-last config offsets airlock shadows.
const BARS: std::ops::Range<usize> = 0x10..0x28;
const ROM: std::ops::Range<usize> = 0x30..0x34;

pub struct BarShadow {
    /// Register values for 0x10..0x34 (index = offset - 0x10).
    value: [u8; 0x24],
    /// Writable bits of the same bytes.
    mask: [u8; 0x24],
}

/// What the device reported about a BAR when airlock opened it.
#[derive(Clone, Copy, Debug)]
pub struct BarInfo {
    /// The BAR register as read through VFIO (its low bits give the type).
    pub register: u32,
    /// The VFIO region size (0: not implemented).
    pub size: u64,
}

impl BarShadow {
    pub fn new(bars: [BarInfo; 6], rom_size: u64) -> BarShadow {
        let mut value = [0u32; 9];
        let mut mask = [0u32; 9];
        let mut i = 0;
        while i < 6 {
            let BarInfo { register, size } = bars[i];
            if size == 0 || !size.is_power_of_two() {
                i += 1;
                continue;
            }
            let size_mask = !(size - 1);
            if register & 1 == 1 {
                value[i] = register & 0x3;
                mask[i] = size_mask as u32 & !0x3;
            } else {
                value[i] = register & 0xf;
                mask[i] = size_mask as u32 & !0xf;
                if (register >> 1) & 3 == 2 && i + 1 < 6 {
                    mask[i + 1] = (size_mask >> 32) as u32;
                    i += 1;
                }
            }
            i += 1;
        }
        // 0x28 (CardBus CIS) and 0x2c (subsystem ids) are not shadowed.
        if rom_size.is_power_of_two() && rom_size >= 2048 {
            mask[8] = (!(rom_size - 1) as u32 & 0xffff_f800) | 1;
        }
        let mut s = BarShadow {
            value: [0; 0x24],
            mask: [0; 0x24],
        };
        for r in 0..9 {
            s.value[r * 4..r * 4 + 4].copy_from_slice(&value[r].to_le_bytes());
            s.mask[r * 4..r * 4 + 4].copy_from_slice(&mask[r].to_le_bytes());
        }
        s
    }

    /// The shadow of the config space `read` reads, with `size(i)` the
    /// VFIO region size of BAR i (6: the ROM; 0: not implemented).
    pub fn read(
        read: impl Fn(usize, &mut [u8]) -> std::io::Result<()>,
        size: impl Fn(usize) -> u64,
    ) -> std::io::Result<BarShadow> {
        let mut bars = [BarInfo {
            register: 0,
            size: 0,
        }; 6];
        for (i, bar) in bars.iter_mut().enumerate() {
            let mut b = [0u8; 4];
            read(BARS.start + 4 * i, &mut b)?;
            *bar = BarInfo {
                register: u32::from_le_bytes(b),
                size: size(i),
            };
        }
        Ok(BarShadow::new(bars, size(6)))
    }

    pub fn shadows(offset: usize) -> bool {
        BARS.contains(&offset) || ROM.contains(&offset)
    }

    /// Replaces shadowed bytes of a config read at `offset`.
    pub fn overlay(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i;
            if Self::shadows(at) {
                *b = self.value[at - 0x10];
            }
        }
    }

    /// Takes the shadowed bytes of a config write; returns the runs
    /// (offset, bytes) that still go to the device.
    pub fn absorb<'a>(&mut self, offset: usize, data: &'a [u8]) -> Vec<(usize, &'a [u8])> {
        let mut runs = Vec::new();
        let mut run_start: Option<usize> = None;
        for (i, b) in data.iter().enumerate() {
            let at = offset + i;
            if Self::shadows(at) {
                let k = at - 0x10;
                self.value[k] = (self.value[k] & !self.mask[k]) | (b & self.mask[k]);
                if let Some(s) = run_start.take() {
                    runs.push((offset + s, &data[s..i]));
                }
            } else if run_start.is_none() {
                run_start = Some(i);
            }
        }
        if let Some(s) = run_start {
            runs.push((offset + s, &data[s..]));
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> BarInfo {
        BarInfo {
            register: 0,
            size: 0,
        }
    }

    fn read32(s: &BarShadow, off: usize) -> u32 {
        let mut b = [0u8; 4];
        s.overlay(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn sizing_a_32bit_bar_reads_back_its_size_mask_and_keeps_type_bits() {
        let mut s = BarShadow::new(
            [
                BarInfo {
                    register: 0xfebf_0008,
                    size: 0x1000,
                },
                none(),
                none(),
                none(),
                none(),
                none(),
            ],
            0,
        );
        assert_eq!(read32(&s, 0x10), 0x8, "the device's address never shows");
        assert!(s.absorb(0x10, &0xffff_ffffu32.to_le_bytes()).is_empty());
        assert_eq!(read32(&s, 0x10), 0xffff_f008);
        s.absorb(0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(read32(&s, 0x10), 0xc000_0008);
    }

    #[test]
    fn a_64bit_bar_sizes_across_both_registers() {
        let mut s = BarShadow::new(
            [
                BarInfo {
                    register: 0x4,
                    size: 1 << 33,
                },
                none(),
                none(),
                none(),
                none(),
                none(),
            ],
            0,
        );
        s.absorb(0x10, &[0xff; 8]);
        assert_eq!(read32(&s, 0x10), 0x4);
        assert_eq!(read32(&s, 0x14), 0xffff_fffe);
    }

    #[test]
    fn rom_bar_sizes_with_its_enable_bit_and_unimplemented_bars_read_zero() {
        let mut s = BarShadow::new([none(); 6], 0x10000);
        s.absorb(0x30, &[0xff; 4]);
        assert_eq!(read32(&s, 0x30), 0xffff_0001);
        s.absorb(0x18, &[0xff; 4]);
        assert_eq!(read32(&s, 0x18), 0);
    }

    #[test]
    fn a_write_spanning_command_and_bars_passes_only_the_unshadowed_bytes_on() {
        let mut s = BarShadow::new([none(); 6], 0);
        let data = [1u8; 0x30];
        let runs = s.absorb(0x04, &data);
        assert_eq!(
            runs.iter().map(|(o, d)| (*o, d.len())).collect::<Vec<_>>(),
            vec![(0x04, 0x0c), (0x28, 0x08)]
        );
    }
}
