//! airlock-wire: a static program for the nested device bed
//! (tests/e2e/nested-devices-*.sh).
//!
//!   airlock-wire reflect IFACE STATS
//!       the far end: answers every test frame to its source MAC; counts per
//!       source MAC in STATS ("REFLECT <mac> frames=N bad=M")
//!   airlock-wire traffic --peer MAC [--rounds 4] [--frames 500] [--window 16]
//!                        [--rtt 100] [--timeout-ms 2000] [--budget-s N] NAME=IFACE...
//!       rounds of a frame-rate phase and a round-trip phase per interface,
//!       interleaved; prints ROUND, BENCH and PASS/FAIL traffic-NAME lines.
//!       With --budget-s N (0: none), no round starts after N s once two
//!       are done. A
//!       reply that comes after its frame's timeout is late, not lost.
//!   airlock-wire trickle --peer MAC [--interval-ms 50] [--max-s 600] IFACE
//!       a frame every interval until IFACE goes away; one INFO line
//!   airlock-wire bar PATH TAG OFF[,OFF...] TAG2 OFF[,OFF...]
//!       mmaps the sysfs resource PATH, checks TAG's pages, writes TAG2's
//!
//! Frames are raw Ethernet, EtherType 0x88b5, with a sequence number and a
//! CRC-32 (see frame.rs). Exit 0 iff everything passed, 2 on bad usage.

mod bar;
mod frame;
mod packet;
mod reflect;
mod traffic;

use std::time::Duration;

const USAGE: &str = "usage: airlock-wire reflect IFACE STATS
       airlock-wire traffic --peer MAC [--rounds N] [--frames N] [--window N] [--rtt N] [--timeout-ms N] [--budget-s N] NAME=IFACE...
       airlock-wire trickle --peer MAC [--interval-ms N] [--max-s N] IFACE
       airlock-wire bar PATH TAG OFF[,OFF...] TAG2 OFF[,OFF...]";

fn usage(e: &str) -> ! {
    eprintln!("airlock-wire: {e}\n{USAGE}");
    std::process::exit(2);
}

/// Splits `--key value` options from positional words.
fn options(args: &[String]) -> (Vec<(String, String)>, Vec<String>) {
    let (mut opts, mut words) = (vec![], vec![]);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.strip_prefix("--") {
            Some(k) => match it.next() {
                Some(v) => opts.push((k.to_string(), v.clone())),
                None => usage(&format!("--{k} needs a value")),
            },
            None => words.push(a.clone()),
        }
    }
    (opts, words)
}

fn num<T: std::str::FromStr>(opts: &[(String, String)], key: &str, default: T) -> T {
    match opts.iter().rev().find(|(k, _)| k == key) {
        Some((_, v)) => v
            .parse()
            .unwrap_or_else(|_| usage(&format!("--{key} {v}: not a number"))),
        None => default,
    }
}

fn peer(opts: &[(String, String)]) -> frame::Mac {
    let v = opts
        .iter()
        .find(|(k, _)| k == "peer")
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| usage("--peer MAC is required"));
    frame::parse_mac(v).unwrap_or_else(|e| usage(&e))
}

fn offsets(s: &str) -> Vec<u64> {
    s.split(',')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let w = w.trim();
            match w.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => w.parse(),
            }
            .unwrap_or_else(|_| usage(&format!("'{w}' is not an offset")))
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        usage("no command")
    };
    let (opts, words) = options(&args[1..]);
    let code = match cmd.as_str() {
        "reflect" => {
            let [iface, stats] = &words[..] else {
                usage("reflect takes IFACE STATS")
            };
            match reflect::run(iface, stats) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("airlock-wire reflect: {e}");
                    1
                }
            }
        }
        "traffic" => {
            let plan = traffic::Plan {
                peer: peer(&opts),
                rounds: num(&opts, "rounds", 4),
                frames: num(&opts, "frames", 500),
                window: num(&opts, "window", 16u32).max(1),
                rtt: num(&opts, "rtt", 100),
                timeout: Duration::from_millis(num(&opts, "timeout-ms", 2000)),
                budget: Some(num(&opts, "budget-s", 0u64))
                    .filter(|&s| s > 0)
                    .map(Duration::from_secs),
            };
            let devs: Vec<(String, String)> = words
                .iter()
                .map(|w| match w.split_once('=') {
                    Some((n, i)) => (n.to_string(), i.to_string()),
                    None => usage(&format!("'{w}': want NAME=IFACE")),
                })
                .collect();
            if devs.is_empty() {
                usage("traffic needs at least one NAME=IFACE");
            }
            match traffic::run(&plan, &devs) {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(e) => {
                    println!("FAIL traffic: {e}");
                    1
                }
            }
        }
        "trickle" => {
            let [iface] = &words[..] else {
                usage("trickle takes one IFACE")
            };
            let interval = Duration::from_millis(num(&opts, "interval-ms", 50));
            let max = Duration::from_secs(num(&opts, "max-s", 600));
            match traffic::trickle(iface, peer(&opts), interval, max) {
                Ok(()) => 0,
                Err(e) => {
                    println!("INFO trickle {iface}: {e}");
                    1
                }
            }
        }
        "bar" => {
            let [path, tag, check, tag2, write] = &words[..] else {
                usage("bar takes PATH TAG OFFS TAG2 OFFS")
            };
            if bar::run(path, tag, &offsets(check), tag2, &offsets(write)) {
                0
            } else {
                1
            }
        }
        c => usage(&format!("unknown command '{c}'")),
    };
    std::process::exit(code);
}
