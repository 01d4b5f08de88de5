//! Given `airlock --emulate edu` started with the sandbox on (the default),
//! the serving process is confined before it serves anyone: seccomp on,
//! no_new_privs, no capabilities, its own mnt/pid/net/ipc/uts namespaces,
//! an empty root; it still serves a client and stops cleanly on SIGTERM.
//! Built with `--features fault-injection`, each forbidden operation it
//! attempts is denied or kills it, and the test says which.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use common::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments.
    unsafe { libc::geteuid() == 0 }
}

fn airlock(sock: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["--socket-path", sock.to_str().unwrap(), "--emulate", "edu"])
        .args(extra)
        .env("AIRLOCK_LOG", "info")
        .spawn()
        .expect("airlock starts")
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(c: &mut Child) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "airlock did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sandboxed server: the supervisor's only child.
fn server_pid(supervisor: u32) -> u32 {
    let mut pid = 0;
    wait_for("the server process", || {
        let kids =
            std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                .unwrap_or_default();
        pid = kids
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pid != 0
    });
    pid
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

fn ns(pid: u32, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn a_running_airlock_is_confined_and_still_serves() {
    if !is_root() {
        println!("SKIP sandbox test: needs root for namespaces (CI runs as root)");
        return;
    }
    let dir = tempdir("sandbox");
    let sock = dir.0.join("edu.sock");
    let mut sup = airlock(&sock, &[]);
    wait_for("the socket", || sock.exists());
    let srv = server_pid(sup.id());
    let mut c = connect(&Server {
        path: sock.clone(),
        _dir: tempdir("sandbox-unused"),
    });
    assert_eq!(
        c.read32(0, 0).unwrap(),
        0x010000ed,
        "the confined server serves"
    );
    println!("server pid {srv} (supervisor {})", sup.id());
    for key in ["Seccomp", "NoNewPrivs", "CapEff", "CapPrm", "CapBnd"] {
        println!("{key}: {}", status_field(srv, key));
    }
    assert_eq!(status_field(srv, "Seccomp"), "2");
    assert_eq!(status_field(srv, "NoNewPrivs"), "1");
    assert_eq!(status_field(srv, "CapEff"), "0000000000000000");
    assert_eq!(status_field(srv, "CapBnd"), "0000000000000000");
    for kind in ["mnt", "pid", "net", "ipc", "uts"] {
        let (a, b) = (ns(sup.id(), kind), ns(srv, kind));
        println!("{kind}: supervisor {} server {}", a.display(), b.display());
        assert_ne!(a, b, "{kind} namespace is the parent's");
    }
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{srv}/root/"))
        .unwrap()
        .collect();
    println!("entries in the server's root: {}", root.len());
    assert!(
        root.is_empty(),
        "the server's root has host entries: {root:?}"
    );
    drop(c);
    // SAFETY: kill with a pid we spawned.
    unsafe { libc::kill(sup.id() as i32, libc::SIGTERM) };
    assert!(wait_exit(&mut sup).success());
    assert!(!sock.exists(), "the supervisor removes the socket");
}

#[cfg(feature = "fault-injection")]
#[test]
fn every_forbidden_operation_is_denied_or_kills_the_server() {
    if !is_root() {
        println!("SKIP fault injection: needs root for namespaces (CI runs as root)");
        return;
    }
    let mut outcomes = Vec::new();
    for fault in ["open-passwd", "socket-inet", "execve", "ptrace"] {
        let dir = tempdir(&format!("fault-{fault}"));
        let sock = dir.0.join("edu.sock");
        let mut sup = airlock(&sock, &["--inject-fault", fault]);
        let st = wait_exit(&mut sup);
        let outcome = match st.code() {
            Some(159) => "killed by seccomp (SIGSYS)".to_string(),
            Some(3) => "denied (the call failed, the server lived)".to_string(),
            other => {
                panic!("{fault}: unexpected outcome {other:?}: the operation may have succeeded")
            }
        };
        println!("fault {fault}: {outcome}");
        outcomes.push((fault, outcome));
    }
    assert_eq!(outcomes.len(), 4);
}
