//! airlock's footprint, sandbox off and on: time from exec to the socket
//! answering VERSION, and the idle RSS of the supervisor and the server
//! (after that first client left). Medians of N starts (default 10).
//!
//!     cargo bench -p airlock --bench footprint [-- N]

use std::time::{Duration, Instant};

use airlock_protocol::client::Client;

fn rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn child_of(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// One start: (ms to a VERSION reply, supervisor RSS KiB, server RSS KiB).
fn start(dir: &std::path::Path, sandbox: &str, i: usize) -> Result<(f64, u64, u64), String> {
    let sock = dir.join(format!("{sandbox}-{i}.sock"));
    let t0 = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["--socket-path", sock.to_str().ok_or("path")?])
        .args(["--emulate", "edu", "--sandbox", sandbox])
        .env("AIRLOCK_LOG", "error")
        .spawn()
        .map_err(|e| e.to_string())?;
    let pid = child.id() as i32;
    let mut out = Err("no VERSION reply within 10 s".to_string());
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(mut c) = Client::connect(&sock) {
            if c.negotiate(Client::qemu_capabilities()).is_ok() {
                out = Ok(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    // Idle: the client is gone and the server waits for the next one.
    std::thread::sleep(Duration::from_millis(200));
    let server = if sandbox == "on" {
        child_of(pid)
    } else {
        Some(pid)
    };
    let sup = if sandbox == "on" {
        rss_kib(pid)
    } else {
        Some(0)
    };
    let srv = server.and_then(rss_kib);
    // SAFETY: kill with the pid of a child we spawned.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = child.wait();
    let ms = out?;
    Ok((ms, sup.ok_or("no supervisor")?, srv.ok_or("no server")?))
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let dir = std::env::temp_dir().join(format!("airlock-footprint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // SAFETY: geteuid has no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    println!(
        "footprint: medians of {n} starts (exec -> VERSION answered; RSS idle after one client)"
    );
    println!(
        "{:<12} {:>16} {:>20} {:>16}",
        "sandbox", "start ms", "supervisor RSS KiB", "server RSS KiB"
    );
    for sandbox in ["off", "on"] {
        if sandbox == "on" && !root {
            println!("{:<12} SKIP: the sandbox needs root", sandbox);
            continue;
        }
        let (mut ms, mut sup, mut srv) = (vec![], vec![], vec![]);
        for i in 0..n {
            match start(&dir, sandbox, i) {
                Ok((m, a, b)) => {
                    ms.push(m);
                    sup.push(a as f64);
                    srv.push(b as f64);
                }
                Err(e) => println!("{sandbox} start {i}: {e}"),
            }
        }
        if ms.is_empty() {
            continue;
        }
        let sup = if sandbox == "on" {
            format!("{:.0}", median(sup))
        } else {
            "(none: one process)".into()
        };
        println!(
            "{:<12} {:>16.1} {:>20} {:>16.0}",
            sandbox,
            median(ms),
            sup,
            median(srv)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
