//! The sender: checksummed test frames to the reflector and back, through
//! several interfaces in the same run. Each round measures, per interface,
//! a frame rate (a window of frames in flight) and round-trip times (one
//! frame at a time); interfaces take turns inside a round and the order
//! flips every round, so a slow patch of the host hits both sides alike.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::frame::{
    build, mac_str, parse, payload_len, Header, Mac, Parsed, FLAG_BAD_REQUEST, KIND_REPLY,
    KIND_REQUEST,
};
use crate::packet::{RawSocket, Recv};

pub struct Plan {
    pub peer: Mac,
    pub rounds: u32,
    /// Frames per rate phase.
    pub frames: u32,
    pub window: u32,
    /// Frames per round-trip phase.
    pub rtt: u32,
    /// A frame not back after this long leaves its phase (it counts as
    /// lost unless its reply still comes in a later phase: late).
    pub timeout: Duration,
    /// No round starts after this long once two rounds are done (a slow
    /// machine gets fewer rounds instead of a harness timeout).
    pub budget: Option<Duration>,
}

/// What went wrong with frames, over any span.
#[derive(Default, Clone, Copy)]
struct Tally {
    sent: u64,
    received: u64,
    /// CRC or pattern failures on the way back, and requests the reflector
    /// flagged as corrupted on the way there.
    bad: u64,
    bad_there: u64,
    dup: u64,
    /// Replies to frames of an earlier phase (arrived after their timeout):
    /// late, not lost.
    stale: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.received += o.received;
        self.bad += o.bad;
        self.bad_there += o.bad_there;
        self.dup += o.dup;
        self.stale += o.stale;
    }
    /// Frames never seen back: a late reply (stale) counts in the phase
    /// it arrives in, so over a whole run this is exact.
    fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received + self.stale)
    }
    fn line(&self) -> String {
        format!(
            "sent={} received={} lost={} corrupted={} (back {} there {}) dup={} stale={}",
            self.sent,
            self.received,
            self.lost(),
            self.bad + self.bad_there,
            self.bad,
            self.bad_there,
            self.dup,
            self.stale
        )
    }
}

struct Stream {
    name: String,
    sock: RawSocket,
    id: u16,
    next_seq: u32,
    total: Tally,
    rates: Vec<f64>,
    rtts_us: Vec<f64>,
}

#[derive(PartialEq, Clone, Copy)]
enum State {
    InFlight,
    Back,
    Expired,
}

/// One phase's frames: seqs base..base+n.
struct Phase {
    base: u32,
    state: Vec<State>,
    tally: Tally,
}

impl Phase {
    fn new(base: u32, n: u32) -> Phase {
        Phase {
            base,
            state: vec![State::InFlight; n as usize],
            tally: Tally::default(),
        }
    }

    /// Accounts for one received frame; returns its seq and its state
    /// before, when it is one of this phase's frames coming back for the
    /// first time.
    fn take(&mut self, s: &Stream, frame: &[u8]) -> Option<(u32, State)> {
        match parse(frame) {
            Parsed::Foreign => None,
            Parsed::Corrupt(_) => {
                self.tally.bad += 1;
                None
            }
            Parsed::Good(h, pattern_ok) => {
                if h.kind != KIND_REPLY {
                    return None;
                }
                if h.stream != s.id || h.dst != s.sock.mac || !pattern_ok {
                    self.tally.bad += 1;
                    return None;
                }
                if h.flags & FLAG_BAD_REQUEST != 0 {
                    self.tally.bad_there += 1;
                    return None;
                }
                let i = h.seq.wrapping_sub(self.base) as usize;
                match self.state.get(i) {
                    None => {
                        self.tally.stale += 1;
                        None
                    }
                    Some(State::Back) => {
                        self.tally.dup += 1;
                        None
                    }
                    Some(&was) => {
                        self.state[i] = State::Back;
                        self.tally.received += 1;
                        Some((h.seq, was))
                    }
                }
            }
        }
    }
}

fn send_one(s: &Stream, peer: Mac, seq: u32, buf: &mut [u8]) -> Result<(), String> {
    let h = Header {
        dst: peer,
        src: s.sock.mac,
        kind: KIND_REQUEST,
        flags: 0,
        stream: s.id,
        seq,
        len: payload_len(seq),
    };
    let n = build(buf, &h, None);
    s.sock.send(&buf[..n])
}

/// A window of frames in flight: returns frames back per second.
fn rate_phase(s: &mut Stream, plan: &Plan) -> Result<(f64, Tally), String> {
    let n = plan.frames;
    let mut ph = Phase::new(s.next_seq, n);
    s.next_seq = s.next_seq.wrapping_add(n);
    let mut tx = vec![0u8; 2048];
    let mut rx = vec![0u8; 2048];
    let mut flight: VecDeque<(u32, Instant)> = VecDeque::new();
    let start = Instant::now();
    let mut last_back = start;
    let mut sent = 0u32;
    // Frames out and neither back nor expired.
    let mut in_flight = 0u32;
    loop {
        // Frames out long enough are lost; they leave the window.
        while let Some(&(seq, at)) = flight.front() {
            let i = seq.wrapping_sub(ph.base) as usize;
            if ph.state[i] == State::Back {
                flight.pop_front();
            } else if at.elapsed() >= plan.timeout {
                ph.state[i] = State::Expired;
                in_flight -= 1;
                flight.pop_front();
            } else {
                break;
            }
        }
        while sent < n && in_flight < plan.window {
            let seq = ph.base.wrapping_add(sent);
            send_one(s, plan.peer, seq, &mut tx)?;
            flight.push_back((seq, Instant::now()));
            sent += 1;
            in_flight += 1;
            ph.tally.sent += 1;
        }
        if sent == n && in_flight == 0 {
            break;
        }
        let wait = flight
            .front()
            .map(|&(_, at)| plan.timeout.saturating_sub(at.elapsed()))
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(1));
        if let Recv::Frame(len) = s.sock.recv(&mut rx, wait)? {
            if let Some((_, was)) = ph.take(s, &rx[..len]) {
                // An expired frame coming back late had already left the window.
                if was == State::InFlight {
                    in_flight -= 1;
                }
                last_back = Instant::now();
            }
        }
    }
    let secs = last_back.duration_since(start).as_secs_f64();
    let rate = if secs > 0.0 {
        ph.tally.received as f64 / secs
    } else {
        0.0
    };
    Ok((rate, ph.tally))
}

/// One frame at a time: returns each round trip in microseconds.
fn rtt_phase(s: &mut Stream, plan: &Plan, count: u32) -> Result<(Vec<f64>, Tally), String> {
    let mut ph = Phase::new(s.next_seq, count);
    s.next_seq = s.next_seq.wrapping_add(count);
    let mut tx = vec![0u8; 2048];
    let mut rx = vec![0u8; 2048];
    let mut rtts = Vec::new();
    for k in 0..count {
        let seq = ph.base.wrapping_add(k);
        let t0 = Instant::now();
        send_one(s, plan.peer, seq, &mut tx)?;
        ph.tally.sent += 1;
        while t0.elapsed() < plan.timeout {
            let left = plan.timeout.saturating_sub(t0.elapsed());
            if let Recv::Frame(len) = s.sock.recv(&mut rx, left)? {
                if ph.take(s, &rx[..len]).map(|(q, _)| q) == Some(seq) {
                    rtts.push(t0.elapsed().as_secs_f64() * 1e6);
                    break;
                }
            }
        }
    }
    Ok((rtts, ph.tally))
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Runs the plan over `devs` (NAME, IFACE); prints ROUND, BENCH and one
/// PASS/FAIL line per interface; returns whether all passed.
pub fn run(plan: &Plan, devs: &[(String, String)]) -> Result<bool, String> {
    let mut streams = Vec::new();
    for (i, (name, iface)) in devs.iter().enumerate() {
        let sock = RawSocket::open(iface)?;
        println!(
            "INFO traffic: {name} on {iface} ({}) -> peer {}",
            mac_str(&sock.mac),
            mac_str(&plan.peer)
        );
        streams.push(Stream {
            name: name.clone(),
            sock,
            id: i as u16 + 1,
            next_seq: 0,
            total: Tally::default(),
            rates: vec![],
            rtts_us: vec![],
        });
    }
    // Warm-up: a few single frames each (counted in the totals, not in the figures).
    for s in streams.iter_mut() {
        let (_, t) = rtt_phase(s, plan, 8)?;
        s.total.add(&t);
    }
    let t_all = Instant::now();
    for r in 1..=plan.rounds {
        if let Some(b) = plan.budget.filter(|&b| r > 2 && t_all.elapsed() >= b) {
            println!(
                "INFO traffic: the {} s budget is spent after {} of {} rounds",
                b.as_secs(),
                r - 1,
                plan.rounds
            );
            break;
        }
        let mut order: Vec<usize> = (0..streams.len()).collect();
        if r % 2 == 0 {
            order.reverse();
        }
        for &i in &order {
            let s = &mut streams[i];
            let (rate, mut t) = rate_phase(s, plan)?;
            let (rtts, t2) = rtt_phase(s, plan, plan.rtt)?;
            t.add(&t2);
            s.total.add(&t);
            s.rates.push(rate);
            let m = median(&rtts);
            s.rtts_us.extend_from_slice(&rtts);
            println!(
                "ROUND {r} {} rate={rate:.1} rtt_us={m:.0} {}",
                s.name,
                t.line()
            );
        }
    }
    // Every stream runs in every round.
    println!(
        "INFO traffic: {} rounds in {:.1} s",
        streams[0].rates.len(),
        t_all.elapsed().as_secs_f64()
    );
    let mut ok = true;
    for s in &streams {
        let rtt = median(&s.rtts_us);
        println!(
            "BENCH {} rate={:.1} rtt_us={:.0} rtt_p10_us={:.0} rtt_p90_us={:.0} rounds={} {}",
            s.name,
            median(&s.rates),
            rtt,
            percentile(&s.rtts_us, 0.1),
            percentile(&s.rtts_us, 0.9),
            s.rates.len(),
            s.total.line()
        );
        let t = &s.total;
        if t.lost() == 0 && t.bad == 0 && t.bad_there == 0 && t.dup == 0 && t.received > 0 {
            println!(
                "PASS traffic-{}: {} frames out and back through {}, 0 lost, 0 corrupted",
                s.name, t.sent, s.sock.iface
            );
        } else {
            ok = false;
            println!("FAIL traffic-{}: {}", s.name, t.line());
        }
    }
    Ok(ok)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// A frame every `interval` through `iface` until the interface goes away
/// (hot-unplug), a send fails, or `max` passes; prints one summary line.
pub fn trickle(iface: &str, peer: Mac, interval: Duration, max: Duration) -> Result<(), String> {
    let sock = RawSocket::open(iface)?;
    let mut s = Stream {
        name: iface.to_string(),
        sock,
        id: 99,
        next_seq: 0,
        total: Tally::default(),
        rates: vec![],
        rtts_us: vec![],
    };
    let start = Instant::now();
    let frames = (max.as_millis() / interval.as_millis().max(1)) as u32 + 2;
    let mut ph = Phase::new(0, frames);
    let mut tx = vec![0u8; 2048];
    let mut rx = vec![0u8; 2048];
    let gone = Path::new("/sys/class/net").join(iface);
    let why = loop {
        if start.elapsed() >= max || s.next_seq >= frames {
            break format!("stopped after {max:?}");
        }
        if !gone.exists() {
            break format!("{iface} vanished from /sys/class/net");
        }
        if let Err(e) = send_one(&s, peer, s.next_seq, &mut tx) {
            break e;
        }
        s.next_seq += 1;
        ph.tally.sent += 1;
        let until = Instant::now() + interval;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match s.sock.recv(&mut rx, left) {
                Ok(Recv::Frame(len)) => {
                    ph.take(&s, &rx[..len]);
                }
                Ok(Recv::Timeout) => {}
                Err(e) => {
                    println!("INFO trickle {iface}: {e}");
                    break;
                }
            }
        }
    };
    s.total = ph.tally;
    println!(
        "INFO trickle {iface}: {} in {:.1} s; ended: {why}",
        s.total.line(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn a_late_reply_is_not_a_lost_frame_but_a_missing_one_is() {
        let mut run = Tally::default();
        // Round 1: 10 out, 8 back in time; round 2: 10 out, 10 back, and
        // the 2 late ones of round 1 arrive during it.
        run.add(&Tally {
            sent: 10,
            received: 8,
            ..Tally::default()
        });
        run.add(&Tally {
            sent: 10,
            received: 10,
            stale: 2,
            ..Tally::default()
        });
        assert_eq!(run.lost(), 0);
        run.add(&Tally {
            sent: 10,
            received: 9,
            ..Tally::default()
        });
        assert_eq!(run.lost(), 1, "one never came back");
    }
}
