//! `--soak SECONDS`: the edu driven in rounds for a while, for the restart
//! tests (the host restarts airlock's server meanwhile and reads the rounds
//! to see what the guest saw). Each round: the liveness register with a
//! fresh value, a factorial, a DMA to the device and back with a fresh
//! pattern, and an MSI through an eventfd assigned once for the whole soak
//! (so the interrupt wiring must survive a restart, not be set up again).
//!
//! A round takes about a millisecond here, more than a serial console can
//! print, so a line `ROUND n ok|FAIL t_ms dur_ms[: why]` (t_ms from the
//! start of the soak, guest clock) goes out for every failed round, every
//! round of at least SLOW, every PROGRESS-th round, the first failed round
//! of a streak, and the round that ends one (`... after-failed K`); at the end
//! `SOAK rounds R failed F median-ms M longest-ms L longest-round N`.
//!
//! `--sentinel AT:HOLD` (seconds) proves the device kept its state across
//! a restart made meanwhile: before the first round that starts AT seconds
//! into the soak, a sentinel goes into the liveness register (line
//! `SENTINEL wrote V round n t_ms T`); the rounds then leave that register
//! alone until HOLD seconds later, when it is read back once (line
//! `SENTINEL kept|LOST V read R round n t_ms T held_ms H`, and a `sentinel`
//! result). A device reset or a new device in between loses it.

use crate::checks::Vfio;
use crate::edu::{self, Bar0};
use crate::os::{DmaBuf, EventFd};
use crate::report::{Outcome, Report};
use crate::vfio;
use std::io::Write;
use std::time::{Duration, Instant};

/// Each wait; longer than QEMU holds a request for a server that is away.
const TIMEOUT: Duration = Duration::from_secs(8);
const PAGE: u64 = 4096;
const IOVA_A: u64 = 0x10_0000;
const IOVA_B: u64 = 0x20_0000;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY_MASTER: u16 = (1 << 1) | (1 << 2);
/// Rounds at least this long are printed (an outage shows as one).
const SLOW: Duration = Duration::from_millis(20);
/// Every this many rounds a progress line is printed.
const PROGRESS: u32 = 500;
/// What `--sentinel` writes into the liveness register (which reads back
/// its complement).
const SENTINEL: u32 = 0xa171_0c4d;

struct Soak<'v> {
    v: &'v Vfio,
    bar: Bar0<'v>,
    a: DmaBuf,
    b: DmaBuf,
    msi: EventFd,
}

fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

impl<'v> Soak<'v> {
    fn new(v: &'v Vfio) -> Result<Soak<'v>, String> {
        let dev = &v.device;
        let ri = dev.region_info(vfio::PCI_CONFIG_REGION_INDEX)?;
        let mut c = [0u8; 2];
        dev.read_at(&mut c, ri.offset + PCI_COMMAND)?;
        let cmd = u16::from_le_bytes(c) | PCI_COMMAND_MEMORY_MASTER;
        dev.write_at(&cmd.to_le_bytes(), ri.offset + PCI_COMMAND)?;
        let bar = Bar0::open(dev)?;
        let a = DmaBuf::new(PAGE as usize)?;
        let b = DmaBuf::new(PAGE as usize)?;
        v.container.map_dma(a.addr(), IOVA_A, PAGE)?;
        v.container.map_dma(b.addr(), IOVA_B, PAGE)?;
        let msi = EventFd::new()?;
        bar.write32(edu::IRQ_ACK, !0);
        dev.irq_eventfds(vfio::PCI_MSI_IRQ_INDEX, 0, &[msi.fd()])?;
        Ok(Soak { v, bar, a, b, msi })
    }

    /// One round; `liveness` false leaves the liveness register alone
    /// (it holds the sentinel).
    fn round(&self, n: u32, liveness: bool) -> Result<(), String> {
        if liveness {
            let w = 0x5eed_0000 ^ n.wrapping_mul(0x9e37_79b9);
            self.bar.write32(edu::LIVENESS, w);
            let got = self.bar.read32(edu::LIVENESS);
            if got != !w {
                return Err(format!("liveness: wrote {w:#010x}, read {got:#010x}"));
            }
        }
        self.bar.write32(edu::FACTORIAL, 8);
        self.bar
            .wait_clear(edu::STATUS, edu::STATUS_COMPUTING, TIMEOUT)?;
        let f = self.bar.read32(edu::FACTORIAL);
        if f != 40_320 {
            return Err(format!("8! read as {f}"));
        }
        let seed = n as u8;
        self.a.fill(|i| (i as u8).wrapping_mul(7) ^ seed);
        self.b.fill(|_| 0);
        let size = edu::DEV_BUF_SIZE as u32;
        self.bar
            .dma(IOVA_A, edu::DEV_BUF, size, false, TIMEOUT)
            .map_err(|e| format!("DMA to the device: {e}"))?;
        self.bar
            .dma(edu::DEV_BUF, IOVA_B, size, true, TIMEOUT)
            .map_err(|e| format!("DMA from the device: {e}"))?;
        let (got, want) = (self.b.read(), self.a.read());
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            return Err(format!(
                "DMA round trip: byte {i:#x} is {:#04x}, want {:#04x}",
                got[i], want[i]
            ));
        }
        let _ = self.msi.take();
        self.bar.write32(edu::IRQ_RAISE, 1);
        self.msi
            .wait(TIMEOUT)
            .map_err(|e| format!("MSI after raise: {e}"))?;
        self.bar.write32(edu::IRQ_ACK, 1);
        Ok(())
    }
}

impl Drop for Soak<'_> {
    fn drop(&mut self) {
        let _ = self.v.device.irq_disable(vfio::PCI_MSI_IRQ_INDEX);
        let _ = self.v.container.unmap_dma(IOVA_A, PAGE);
        let _ = self.v.container.unmap_dma(IOVA_B, PAGE);
    }
}

/// The `--sentinel` check: where it is.
enum Sentinel {
    /// Not written yet: (at, hold).
    Due(Duration, Duration),
    /// Written at this time into the soak; read back at `until`.
    Held {
        at: Duration,
        until: Duration,
    },
    Done,
}

impl Sentinel {
    /// Before round `n`, `now` into the soak (or at the end, `last`):
    /// writes or reads back the sentinel when it is time. Returns whether
    /// the round may use the liveness register.
    fn step(&mut self, s: &Soak, report: &mut Report, n: u32, now: Duration, last: bool) -> bool {
        match *self {
            Sentinel::Due(at, hold) if now >= at && !last => {
                s.bar.write32(edu::LIVENESS, SENTINEL);
                let got = s.bar.read32(edu::LIVENESS);
                out(&format!(
                    "SENTINEL wrote {SENTINEL:#010x} read {got:#010x} round {n} t_ms {}",
                    now.as_millis()
                ));
                if got != !SENTINEL {
                    report.record(
                        "sentinel",
                        Outcome::Fail(format!(
                            "wrote {SENTINEL:#010x} into the liveness register, read {got:#010x} at once (want {:#010x})",
                            !SENTINEL
                        )),
                    );
                    *self = Sentinel::Done;
                    return true;
                }
                *self = Sentinel::Held {
                    at: now,
                    until: now + hold,
                };
                false
            }
            Sentinel::Held { at, until } if now >= until || last => {
                let got = s.bar.read32(edu::LIVENESS);
                let held = (now - at).as_millis();
                let kept = got == !SENTINEL;
                out(&format!(
                    "SENTINEL {} {SENTINEL:#010x} read {got:#010x} round {n} t_ms {} held_ms {held}",
                    if kept { "kept" } else { "LOST" },
                    now.as_millis()
                ));
                report.record(
                    "sentinel",
                    if kept {
                        Outcome::Pass
                    } else {
                        Outcome::Fail(format!(
                            "the liveness register reads {got:#010x} {held} ms after {SENTINEL:#010x} was written (want {:#010x}): the device lost its state",
                            !SENTINEL
                        ))
                    },
                );
                *self = Sentinel::Done;
                true
            }
            Sentinel::Held { .. } => false,
            _ => true,
        }
    }
}

/// Runs rounds for `secs` seconds. The guest's verdict is only that rounds
/// ran and the last ones passed (and, with `sentinel`, that the liveness
/// register kept the sentinel); the host judges the failed ones against
/// the restarts it made.
pub fn run(report: &mut Report, v: &Vfio, secs: u64, sentinel: Option<(u64, u64)>) {
    let s = match Soak::new(v) {
        Ok(s) => s,
        Err(e) => {
            report.record("soak-setup", Outcome::Fail(e));
            return;
        }
    };
    report.record("soak-setup", Outcome::Pass);
    let start = Instant::now();
    let mut times = Vec::new();
    let (mut failed, mut tail_failed, mut longest) = (0u32, 0u32, (0u128, 0u32));
    let mut n = 0u32;
    let mut sentinel = match sentinel {
        Some((at, hold)) => Sentinel::Due(Duration::from_secs(at), Duration::from_secs(hold)),
        None => Sentinel::Done,
    };
    while start.elapsed() < Duration::from_secs(secs) {
        let liveness = sentinel.step(&s, report, n, start.elapsed(), false);
        let t = Instant::now();
        let r = s.round(n, liveness);
        let took = t.elapsed();
        let ms = took.as_millis();
        let at = t.duration_since(start).as_millis();
        match &r {
            Ok(()) => {
                if tail_failed > 0 {
                    out(&format!(
                        "ROUND {n} ok {at} {ms} after-failed {tail_failed}"
                    ));
                } else if took >= SLOW || n.is_multiple_of(PROGRESS) {
                    out(&format!("ROUND {n} ok {at} {ms}"));
                }
                tail_failed = 0;
            }
            Err(e) => {
                if tail_failed == 0 || n.is_multiple_of(PROGRESS) {
                    out(&format!("ROUND {n} FAIL {at} {ms}: {e}"));
                }
                failed += 1;
                tail_failed += 1;
            }
        }
        if ms > longest.0 {
            longest = (ms, n);
        }
        times.push(ms);
        n += 1;
    }
    sentinel.step(&s, report, n, start.elapsed(), true);
    if let Sentinel::Due(..) = sentinel {
        report.record(
            "sentinel",
            Outcome::Fail("the soak ended before the sentinel was due".into()),
        );
    }
    times.sort_unstable();
    let median = times.get(times.len() / 2).copied().unwrap_or(0);
    out(&format!(
        "SOAK rounds {n} failed {failed} median-ms {median} longest-ms {} longest-round {}",
        longest.0, longest.1
    ));
    report.record(
        "soak",
        if n == 0 {
            Outcome::Fail("no round ran".into())
        } else if tail_failed > 0 {
            Outcome::Fail(format!("the last {tail_failed} rounds failed"))
        } else {
            Outcome::Pass
        },
    );
}
