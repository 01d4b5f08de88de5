//! Given `airlock --emulate edu` started with the sandbox on (the default),
//! the serving process is confined before it serves anyone: seccomp on,
//! no_new_privs, no capabilities, its own mnt/pid/net/ipc/uts namespaces,
//! an empty root; it still serves a client and stops cleanly on SIGTERM.
//! Built with `--features fault-injection`, each forbidden operation it
//! attempts is trapped: the log names the system call and the device, the
//! supervisor starts a fresh server, and the next client is served.

mod common;

use std::path::PathBuf;

use common::*;

fn ns(pid: u32, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn a_running_airlock_is_confined_and_still_serves() {
    if !is_root() {
        println!("SKIP sandbox test: needs root for namespaces (CI runs as root)");
        return;
    }
    let mut s = start_edu("sandbox");
    let srv = s.server_pid();
    let sup = s.child.id();
    let mut c = connect(&s);
    assert_eq!(
        c.read32(0, 0).unwrap(),
        0x010000ed,
        "the confined server serves"
    );
    println!("server pid {srv} (supervisor {sup})");
    for key in ["Seccomp", "NoNewPrivs", "CapEff", "CapPrm", "CapBnd"] {
        println!("{key}: {}", status_field(srv, key));
    }
    assert_eq!(status_field(srv, "Seccomp"), "2");
    assert_eq!(status_field(srv, "NoNewPrivs"), "1");
    assert_eq!(status_field(srv, "CapEff"), "0000000000000000");
    assert_eq!(status_field(srv, "CapBnd"), "0000000000000000");
    for kind in ["mnt", "pid", "net", "ipc", "uts"] {
        let (a, b) = (ns(sup, kind), ns(srv, kind));
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
    let st = s.stop();
    assert!(
        st.success(),
        "airlock exited with {st:?}; its log:\n{}",
        s.log()
    );
    assert!(!s.path.exists(), "the supervisor removes the socket");
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_forbidden_call_is_named_and_the_next_client_is_served() {
    if !is_root() {
        println!("SKIP fault injection: needs root for namespaces (CI runs as root)");
        return;
    }
    // (fault, the system call glibc makes for it)
    let faults = [
        ("open-passwd", "openat"),
        ("socket-inet", "socket"),
        ("execve", "execve"),
        ("ptrace", "ptrace"),
    ];
    for (fault, call) in faults {
        let s = start_edu_args(&format!("fault-{fault}"), &["--inject-fault", fault]);
        // The first server attempts the call right after confinement; the
        // supervisor reports it and starts a second one, which serves.
        let mut c = connect(&s);
        assert_eq!(
            c.read32(0, 0).unwrap(),
            0x010000ed,
            "{fault}: next client served"
        );
        let log = s.log();
        let line = log
            .lines()
            .find(|l| l.contains("outside its seccomp allowlist"))
            .unwrap_or_else(|| panic!("{fault}: no seccomp report in the log:\n{log}"));
        println!("fault {fault}: {line}");
        assert!(
            line.contains(&format!("({call})")),
            "{fault}: the line names {call}"
        );
        assert!(line.contains("edu:"), "{fault}: the line names the device");
        assert!(log.contains("restart 1 of at most 5"), "{fault}: restarted");
        assert!(
            log.contains("forbidden system call"),
            "{fault}: the server's own line"
        );
    }
}
