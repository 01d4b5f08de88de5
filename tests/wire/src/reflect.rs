//! The far end of the wire: every test request that arrives goes back to
//! its source MAC as a reply with the same payload and a fresh CRC. It
//! counts, per source MAC, the requests and the ones whose CRC failed (those
//! are still answered, flagged, so the sender can tell which leg broke).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::frame::{
    build, mac_str, parse, payload, Header, Parsed, FLAG_BAD_REQUEST, KIND_REPLY, KIND_REQUEST,
};
use crate::packet::{RawSocket, Recv};

#[derive(Default, Clone, Copy, PartialEq)]
struct Counts {
    frames: u64,
    bad: u64,
}

/// Serves until killed; rewrites `stats` (atomically) whenever the counts
/// changed and the wire has been quiet for 100 ms, or every second.
pub fn run(iface: &str, stats: &str) -> Result<(), String> {
    let sock = RawSocket::open(iface)?;
    eprintln!(
        "airlock-wire reflect: on {iface} ({}), EtherType 0x88b5, stats in {stats}",
        mac_str(&sock.mac)
    );
    let mut per_src: BTreeMap<[u8; 6], Counts> = BTreeMap::new();
    let mut foreign = 0u64;
    let mut dirty = true;
    let mut last_write = Instant::now();
    let mut rx = vec![0u8; 2048];
    let mut tx = vec![0u8; 2048];
    loop {
        let quiet = match sock.recv(&mut rx, Duration::from_millis(100))? {
            Recv::Timeout => true,
            Recv::Frame(n) => {
                let f = &rx[..n];
                let (h, bad, body): (Header, bool, &[u8]) = match parse(f) {
                    Parsed::Good(h, _) if h.kind == KIND_REQUEST => (h, false, payload(f, &h)),
                    Parsed::Corrupt(Some(h)) if h.kind == KIND_REQUEST && h.len <= n => {
                        (h, true, &f[(14 + 16).min(n)..])
                    }
                    _ => {
                        foreign += 1;
                        dirty = true;
                        continue;
                    }
                };
                let c = per_src.entry(h.src).or_default();
                c.frames += 1;
                c.bad += bad as u64;
                dirty = true;
                let mut r = h;
                r.kind = KIND_REPLY;
                r.flags = if bad { FLAG_BAD_REQUEST } else { 0 };
                (r.dst, r.src) = (h.src, sock.mac);
                r.len = r.len.min(body.len());
                let m = build(&mut tx, &r, Some(body));
                sock.send(&tx[..m])?;
                false
            }
        };
        if dirty && (quiet || last_write.elapsed() >= Duration::from_secs(1)) {
            write_stats(stats, &per_src, foreign);
            dirty = false;
            last_write = Instant::now();
        }
    }
}

fn write_stats(path: &str, per_src: &BTreeMap<[u8; 6], Counts>, foreign: u64) {
    let mut s = String::new();
    for (mac, c) in per_src {
        s += &format!(
            "REFLECT {} frames={} bad={}\n",
            mac_str(mac),
            c.frames,
            c.bad
        );
    }
    s += &format!("REFLECT foreign frames={foreign}\n");
    let tmp = format!("{path}.tmp");
    if std::fs::write(&tmp, s).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}
