//! A QEMU that runs as another user (libvirt's libvirt-qemu, an
//! orchestrator's): the real binary, sandbox on, creates its socket 0600
//! and such a client gets EACCES; with --socket-group it gets in. The
//! unprivileged client is this test binary itself, copied next to the
//! socket and run as nobody (65534:65534), connecting as QEMU would
//! (VERSION, DEVICE_GET_INFO, a read of edu's ident register).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const NOBODY: u32 = 65534;

/// Copies `exe` into `dir`, executable by anyone.
fn runnable_copy(exe: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(exe, &to).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    to
}

/// Runs `unprivileged_client` (below) as nobody against `socket`; returns
/// (passed, its output).
fn connect_as_nobody(socket: &Path, dir: &Path) -> (bool, String) {
    let me = runnable_copy(&std::env::current_exe().unwrap(), dir, "client");
    // The copy was just written: a fork in a parallel test may still hold
    // its write fd (until that child's exec), and exec then fails with
    // ETXTBSY. That passes; try again.
    let mut tries = 0;
    let out = loop {
        let run = Command::new(&me)
            .args(["--exact", "unprivileged_client", "--ignored", "--nocapture"])
            .env("AIRLOCK_TEST_SOCKET", socket)
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::null())
            .output();
        match run {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => break other.unwrap(),
        }
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Not a test on its own: the client run as nobody by the tests below.
#[test]
#[ignore]
fn unprivileged_client() {
    let Ok(path) = std::env::var("AIRLOCK_TEST_SOCKET") else {
        return;
    };
    // SAFETY: getuid/getgid have no arguments.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut c = match airlock_protocol::client::Client::connect(&path) {
        Ok(c) => c,
        Err(e) => panic!("CONNECT-FAILED as {uid}:{gid}: {e}"),
    };
    c.negotiate(airlock_protocol::client::Client::qemu_capabilities())
        .unwrap();
    c.device_info().unwrap();
    let ident = c.read32(0, 0).unwrap();
    println!("CLIENT-OK as {uid}:{gid}: edu ident {ident:#010x}");
    assert_eq!(ident, 0x010000ed);
}

fn skip_unless_root() -> bool {
    if !is_root() {
        eprintln!("!!! SKIP socket_access: switching to the unprivileged client's user needs root");
    }
    !is_root()
}

#[test]
fn a_qemu_of_another_user_gets_eacces_by_default_and_gets_in_with_socket_group() {
    if skip_unless_root() {
        return;
    }
    let closed = start_edu("sock-closed");
    let (ok, out) = connect_as_nobody(&closed.path, &closed._dir.0);
    println!("default socket, client as nobody: {}", out.trim());
    assert!(!ok, "nobody must not get in by default: {out}");
    assert!(
        out.contains("CONNECT-FAILED") && out.contains("Permission denied"),
        "the client's connect fails with EACCES: {out}"
    );
    let log = closed.log();
    assert!(
        log.contains("gets EACCES") && log.contains("--socket-group GROUP"),
        "airlock's log says what lets another user in: {log}"
    );

    let open = start_edu_args("sock-group", &["--socket-group", "65534"]);
    let meta = std::fs::metadata(&open.path).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.gid(), meta.mode() & 0o777), (NOBODY, 0o660));
    let (ok, out) = connect_as_nobody(&open.path, &open._dir.0);
    println!("--socket-group 65534, client as nobody: {}", out.trim());
    assert!(ok && out.contains("CLIENT-OK as 65534:65534"), "{out}");
    assert!(open.log().contains("users in group 65534 may connect"));
}

#[test]
fn a_group_airlock_cannot_give_the_socket_to_stops_it_before_it_serves() {
    if skip_unless_root() {
        return;
    }
    // airlock as nobody (no CAP_CHOWN, so --sandbox off) may not give its
    // socket to root's group: the chown fails and nothing is served.
    let dir = tempdir("sock-chown");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let exe = runnable_copy(Path::new(env!("CARGO_BIN_EXE_airlock")), &dir.0, "airlock");
    let sock = dir.0.join("edu.sock");
    let out = Command::new(exe)
        .args(["--socket-path", sock.to_str().unwrap(), "--emulate", "edu"])
        .args(["--sandbox", "off", "--socket-group", "0"])
        .env("NO_COLOR", "1")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!(
        "airlock as nobody --socket-group 0 -> {:?}: {}",
        out.status.code(),
        err.trim()
    );
    assert!(!out.status.success());
    assert!(
        err.contains("group 0 (0)")
            && err.contains("Operation not permitted")
            && err.contains("CAP_CHOWN"),
        "the error names the group, the failure and the fix: {err}"
    );
    assert!(!sock.exists(), "no socket was left behind");
}
