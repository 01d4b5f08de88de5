//! Syscalls per message on each server's hot path: `strace -c` attached to
//! the server thread (in-process servers) or process (`-f`, the binaries)
//! while the client sends N messages of one operation.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::ops::{exchange, Op};
use crate::servers::Target;

/// (syscalls per message, the busiest calls per message) or why not.
pub fn count(t: &Target, op_index: usize, op: &Op, n: usize) -> Result<(f64, String), String> {
    let out = std::env::temp_dir().join(format!("airlock-strace-{}", std::process::id()));
    let mut cmd = Command::new("strace");
    cmd.arg("-c").arg("-o").arg(&out);
    if t.process.is_some() {
        cmd.arg("-f");
    }
    for tid in &t.trace {
        cmd.arg("-p").arg(tid.to_string());
    }
    let mut child = cmd
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("strace: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !t.trace.iter().all(|tid| traced(*tid)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("strace did not attach".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sock = &t.socks[op_index];
    let mut reply = vec![0u8; 8192];
    for _ in 0..n {
        for s in &op.steps {
            exchange(sock, s, &mut reply);
        }
    }
    // SAFETY: kill with the pid of a child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&out);
    let msgs = (n * op.steps.len()) as f64;
    let mut calls: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n: f64 = f.get(3)?.parse().ok()?;
            Some((f.last()?.to_string(), n))
        })
        .collect();
    let total = calls
        .iter()
        .find(|(name, _)| name == "total")
        .map(|c| c.1)
        .ok_or("no strace summary")?;
    calls.retain(|(name, n)| name != "total" && *n / msgs >= 0.05);
    calls.sort_by(|a, b| b.1.partial_cmp(&a.1).expect("no NaN"));
    let top = calls
        .iter()
        .map(|(name, c)| format!("{name} {:.2}", c / msgs))
        .collect::<Vec<_>>()
        .join(", ");
    Ok((total / msgs, top))
}

fn traced(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("TracerPid:"))
                .map(|l| l.split_whitespace().nth(1) != Some("0"))
        })
        .unwrap_or(false)
}
