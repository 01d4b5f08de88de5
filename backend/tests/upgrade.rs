//! Live upgrade (SIGUSR2) in two phases: the supervisor starts the binary
//! at the path airlock was started from beside itself, handing over the
//! listening socket; the socket path never stops accepting, and the new
//! airlock serves the next client. A successor that fails in any way (exits
//! at once, ignores the handover, hangs, crashes after it starts, speaks
//! another version) is killed and the old airlock serves on.

mod common;

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::device::emulated::edu::{IDENT, REG_IDENT};
use airlock_protocol::client::Client;
use common::*;

/// airlock "installed" at a temporary path (a copy of the built binary),
/// started from there, serving edu.
struct Installed {
    exe: PathBuf,
    server: Server,
    /// airlock's NOTIFY_SOCKET (sd_notify messages).
    notify: UnixDatagram,
}

impl Installed {
    /// The sd_notify messages received so far, the state names only.
    fn notified(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut b) {
            let m = String::from_utf8_lossy(&b[..n]).into_owned();
            out.extend(
                m.lines()
                    .filter(|l| !l.starts_with("STATUS=") && !l.starts_with("MONOTONIC_USEC="))
                    .map(str::to_string),
            );
        }
        out
    }
}

fn install_and_start(tag: &str) -> Installed {
    let dir = tempdir(tag);
    let exe = dir.0.join("bin/airlock");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_airlock"), &exe).unwrap();
    let notify_path = dir.0.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let server = spawn_edu(dir, &exe, &[], |cmd| {
        cmd.env("NOTIFY_SOCKET", &notify_path);
    });
    Installed {
        exe,
        server,
        notify,
    }
}

/// Replaces the installed binary as a package upgrade does (a new file
/// renamed over the old path; the running airlock keeps the old inode).
fn replace(exe: &Path, content: &[u8]) {
    let new = exe.with_extension("new");
    std::fs::write(&new, content).unwrap();
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&new, exe).unwrap();
}

fn sigusr2(pid: u32) {
    // SAFETY: kill has no memory arguments.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR2) }, 0);
}

fn wait_log(s: &Server, what: &str) {
    wait_for(what, || s.log().contains(what));
}

/// Connects in a loop until stopped; returns (connections, the errors
/// other than a full backlog).
fn hammer(path: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut n, mut errors) = (0, Vec::new());
        while !stop.load(Ordering::SeqCst) {
            match UnixStream::connect(&path) {
                Ok(_) => n += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => errors.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (n, errors)
    })
}

fn ident(path: &Path) -> u32 {
    let mut c = connect_path(path);
    c.read32(0, REG_IDENT).unwrap()
}

/// The identity register through a fresh connection, or None if that
/// fails (bounded: a server that never answers is a failure too).
fn try_ident(path: &Path) -> Option<u32> {
    let mut c = Client::connect(path).ok()?;
    let s = c.socket().stream();
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    c.negotiate(Client::qemu_capabilities()).ok()?;
    c.read32(0, REG_IDENT).ok()
}

/// The pid the old airlock handed over to, from its log.
fn successor_pid(log: &str) -> Option<u32> {
    let at = log.find("live upgrade: pid ")? + "live upgrade: pid ".len();
    log[at..].split(' ').next()?.parse().ok()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').unwrap_or(0)..].starts_with(") Z"))
}

/// Stops an airlock that is not this test's child (a successor).
fn stop_pid(pid: u32) {
    // SAFETY: kill has no memory arguments.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_for("the successor to stop", || !alive(pid));
}

/// How long the socket did not serve, measured by a client connecting and
/// reading ident over and over until `stop`: (longest gap in ms, reads).
fn prober(path: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u128, u32)> {
    std::thread::spawn(move || {
        let (mut last, mut longest, mut n) = (Instant::now(), 0, 0);
        while !stop.load(Ordering::SeqCst) {
            if try_ident(&path) == Some(IDENT) {
                longest = longest.max(last.elapsed().as_millis());
                last = Instant::now();
                n += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (longest, n)
    })
}

#[test]
fn a_good_upgrade_starts_the_new_binary_beside_the_old_and_hands_over_once_it_serves() {
    if !is_root() {
        eprintln!("skipped: the live upgrade needs the supervisor (sandbox on: root)");
        return;
    }
    let mut i = install_and_start("upgrade");
    let pid = i.server.child.id();
    wait_for("READY=1", || i.notified() == ["READY=1"]);

    // The upgrade puts a wrapper at the installed path that records it ran
    // and then execs the real binary (a different build, in effect).
    let mark = i.exe.with_file_name("wrapper-ran");
    replace(
        &i.exe,
        format!(
            "#!/bin/sh\necho \"$$ $AIRLOCK_UPGRADE\" >> '{}'\nexec '{}' \"$@\"\n",
            mark.display(),
            env!("CARGO_BIN_EXE_airlock")
        )
        .as_bytes(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let clients = hammer(i.server.path.clone(), stop.clone());
    let probe = prober(i.server.path.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    sigusr2(pid);
    // The old airlock exits once the successor has served through its
    // probation; it leaves the device and the path alone.
    assert!(wait_exit_within(&mut i.server.child, 20).success());
    let handed_after = t.elapsed().as_millis();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (connections, errors) = clients.join().unwrap();
    let (outage, reads) = probe.join().unwrap();
    assert!(
        errors.is_empty(),
        "connecting during the upgrade failed: {errors:?}"
    );
    assert!(connections > 10, "only {connections} connections");
    let log = i.server.log();
    let new = successor_pid(&log).unwrap_or_else(|| panic!("no successor pid: {log}"));
    assert!(alive(new), "the successor serves");
    let ran = std::fs::read_to_string(&mark).expect("the installed path was executed");
    assert!(
        ran.starts_with(&format!("{new} version=2,owner={pid},ctl=")),
        "{ran}"
    );
    let cmdline = std::fs::read(format!("/proc/{new}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("--emulate"),
        "same arguments"
    );
    assert_eq!(ident(&i.server.path), IDENT);
    eprintln!(
        "upgrade: handed over after {handed_after} ms; the socket did not serve for at most {outage} ms ({reads} reads, {connections} connections meanwhile)"
    );
    assert_eq!(log.matches("took over").count(), 1, "{log}");
    // systemd (Type=notify, ExecReload) hears the reload begin, the new
    // main pid, and the end of the reload, then the new airlock's READY.
    let mut said = Vec::new();
    wait_for("READY=1 after the upgrade", || {
        said.extend(i.notified());
        said.iter().filter(|m| *m == "READY=1").count() == 2
    });
    assert_eq!(
        said,
        [
            "RELOADING=1",
            &format!("MAINPID={new}"),
            "READY=1",
            "READY=1"
        ]
    );
    assert!(!log.contains("AIRLOCK_UPGRADE"), "no handover error: {log}");

    // A second upgrade, from the successor, starts the installed path
    // again (not what the wrapper exec'd); SIGTERM still stops airlock and
    // removes the socket.
    sigusr2(new);
    wait_for("the second upgrade", || {
        successor_pid(&i.server.log()[log.len()..]).is_some()
    });
    let newer = successor_pid(&i.server.log()[log.len()..]).unwrap();
    assert_eq!(
        std::fs::read_to_string(&mark).unwrap().lines().count(),
        2,
        "the installed path ran again"
    );
    wait_for("the second airlock to exit", || !alive(new));
    assert_eq!(ident(&i.server.path), IDENT);
    stop_pid(newer);
    assert!(
        !i.server.path.exists(),
        "the socket path is removed at stop"
    );
}

fn wait_exit_within(c: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "airlock did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Upgrades to `successor` (a script; REAL stands for the real airlock
/// binary) and checks that the upgrade fails with `why` in the log, that
/// the old airlock serves the next client within 10 s of the failure, and
/// that nothing of the successor is left. `stops_server`: whether the old
/// server is stopped first (the successor got that far).
fn a_failing_successor(tag: &str, successor: &str, why: &str, stops_server: bool) {
    if !is_root() {
        eprintln!("skipped: the live upgrade needs the supervisor (sandbox on: root)");
        return;
    }
    let mut i = install_and_start(tag);
    let pid = i.server.child.id();
    let server = i.server.server_pid();
    wait_for("READY=1", || i.notified() == ["READY=1"]);
    let script = successor.replace("REAL", env!("CARGO_BIN_EXE_airlock"));
    replace(&i.exe, format!("#!/bin/sh\n{script}\n").as_bytes());
    let stop = Arc::new(AtomicBool::new(false));
    let probe = prober(i.server.path.clone(), stop.clone());
    sigusr2(pid);
    let t = Instant::now();
    while !i.server.log().contains("live upgrade failed") {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", i.server.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let failed = Instant::now();
    while try_ident(&i.server.path) != Some(IDENT) {
        assert!(
            failed.elapsed() < Duration::from_secs(10),
            "not served again within 10 s"
        );
    }
    let served = failed.elapsed().as_millis();
    stop.store(true, Ordering::SeqCst);
    let (outage, reads) = probe.join().unwrap();
    let log = i.server.log();
    assert!(log.contains(why), "{why:?} not in: {log}");
    assert_eq!(
        i.server.child.try_wait().unwrap(),
        None,
        "airlock exited: {log}"
    );
    let now = server_pid(pid);
    if stops_server {
        assert_ne!(now, server, "a fresh server");
    } else {
        assert_eq!(now, server, "the server was never stopped");
        assert!(
            outage < 1000,
            "the old server served throughout: {outage} ms gap"
        );
    }
    // Only the server is left under the supervisor; nothing of the successor.
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    assert_eq!(children.split_whitespace().count(), 1, "{children}");
    assert!(i.server.path.exists());
    // systemd hears the reload end.
    let said = i.notified();
    assert_eq!(
        said.first().map(String::as_str),
        Some("RELOADING=1"),
        "{said:?}"
    );
    assert_eq!(said.last().map(String::as_str), Some("READY=1"), "{said:?}");
    eprintln!("{tag}: served again {served} ms after the failure was logged; longest gap {outage} ms ({reads} reads)");
}

#[test]
fn a_successor_that_exits_at_once_leaves_the_old_airlock_serving() {
    a_failing_successor(
        "up-exits",
        "exit 1",
        "it exited with status 1 before hello",
        false,
    );
}

#[test]
fn a_successor_that_cannot_be_executed_leaves_the_old_airlock_serving() {
    // Executable but not a program: the exec fails in the child.
    if !is_root() {
        return;
    }
    let i = install_and_start("up-noexec");
    let pid = i.server.child.id();
    let server = i.server.server_pid();
    replace(&i.exe, b"not a program\n");
    sigusr2(pid);
    wait_log(&i.server, "live upgrade failed");
    assert!(
        i.server.log().contains("Exec format error"),
        "{}",
        i.server.log()
    );
    assert_eq!(server_pid_now(pid), server, "nothing was stopped");
    assert_eq!(ident(&i.server.path), IDENT);
    // Missing: refused before anything starts.
    std::fs::remove_file(&i.exe).unwrap();
    sigusr2(pid);
    wait_log(&i.server, "live upgrade (SIGUSR2) refused");
    assert_eq!(server_pid_now(pid), server, "nothing was stopped");
    assert_eq!(ident(&i.server.path), IDENT);
}

#[test]
fn a_successor_that_ignores_the_handover_is_stopped_and_the_socket_path_put_back() {
    // An airlock that does not speak this handover (an older build, or one
    // run without it) binds the socket path anew and serves on its own.
    a_failing_successor(
        "up-ignores",
        "unset AIRLOCK_UPGRADE; exec REAL \"$@\"",
        "which is put back",
        false,
    );
}

#[test]
fn a_successor_that_hangs_before_serving_is_stopped() {
    a_failing_successor(
        "up-hangs",
        "exec sleep 600",
        "it did not say hello within 10 s",
        false,
    );
}

#[test]
fn a_successor_that_speaks_another_handover_version_refuses_and_is_stopped() {
    a_failing_successor(
        "up-version",
        "AIRLOCK_UPGRADE=$(echo \"$AIRLOCK_UPGRADE\" | sed s/version=2/version=3/) exec REAL \"$@\"",
        "speaks handover version 3",
        false,
    );
}

#[test]
fn a_successor_that_crashes_after_it_starts_serving_is_stopped_and_the_old_airlock_serves_again() {
    a_failing_successor(
        "up-crash",
        "REAL \"$@\" & p=$!; sleep 0.5; kill -ABRT $p; wait $p",
        "before its probation to end",
        true,
    );
}

#[test]
fn a_successor_that_says_hello_and_then_hangs_is_stopped_and_the_old_airlock_serves_again() {
    // It speaks the handover's first word and nothing more: the old server
    // is stopped for it, and comes back fresh when it does not serve.
    a_failing_successor(
        "up-hello-hang",
        "exec python3 -c \"import os,socket,time
env = dict(kv.split('=', 1) for kv in os.environ['AIRLOCK_UPGRADE'].split(',exe=')[0].split(','))
s = socket.socket(fileno=int(env['ctl']))
s.send(b'hello 2 %d' % os.getpid())
time.sleep(600)\"",
        "it did not say serving within 5 s",
        true,
    );
}

#[test]
fn a_socket_activated_airlock_upgrades_on_the_socket_systemd_passed() {
    // What `systemctl reload airlock@edu` does: ExecReload sends SIGUSR2.
    let Some(activate) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("systemd-socket-activate"))
            .find(|p| p.exists())
    }) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-socket-activate not found"
        );
        eprintln!("!!! SKIP: systemd-socket-activate not found (Debian package systemd)");
        return;
    };
    if !is_root() {
        eprintln!("skipped: the live upgrade needs the supervisor (sandbox on: root)");
        return;
    }
    let dir = tempdir("upgrade-activated");
    let sock = dir.0.join("edu.sock");
    let log = dir.0.join("airlock.log");
    let child = Command::new(activate)
        .arg("--listen")
        .arg(&sock)
        .arg("--fdname=airlock")
        .arg("--setenv=AIRLOCK_LOG=info")
        .arg("--setenv=NO_COLOR=1")
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .args(["--device", "edu"])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let s = Server {
        path: sock,
        child,
        log,
        _dir: dir,
    };
    // The path appears at bind(), before listen(): wait for an answer.
    wait_for("airlock on the activation socket", || {
        try_ident(&s.path) == Some(IDENT)
    });
    let pid = s.child.id();
    sigusr2(pid);
    wait_log(&s, "took over");
    assert_eq!(ident(&s.path), IDENT);
    let log = s.log();
    assert!(log.contains("holds fd 3"), "{log}");
    assert_eq!(log.matches("listening on fd 3").count(), 2, "{log}");
    let new = successor_pid(&log).unwrap();
    let mut s = s;
    wait_exit_within(&mut s.child, 20);
    stop_pid(new);
}
