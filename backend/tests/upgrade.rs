//! Live upgrade (SIGUSR2): the supervisor execs the binary at the path
//! airlock was started from, in place (same pid), handing over the
//! listening socket; the socket path never stops accepting, and the new
//! airlock serves the next client.

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

#[test]
fn sigusr2_execs_the_installed_binary_in_place_and_the_socket_never_stops_accepting() {
    if !is_root() {
        eprintln!("skipped: the live upgrade needs the supervisor (sandbox on: root)");
        return;
    }
    let mut i = install_and_start("upgrade");
    let pid = i.server.child.id();
    let first_server = i.server.server_pid();
    wait_for("READY=1", || i.notified() == ["READY=1"]);
    // A client is being served when the signal arrives.
    let mut held = connect(&i.server);
    assert_eq!(held.read32(0, REG_IDENT).unwrap(), IDENT);

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
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    sigusr2(pid);
    wait_log(&i.server, "live upgrade: airlock");
    let second_server = i.server.server_pid();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (connections, errors) = clients.join().unwrap();
    assert!(
        errors.is_empty(),
        "connecting during the upgrade failed: {errors:?}"
    );
    assert!(connections > 10, "only {connections} connections");

    // Same process, new image: the wrapper ran as this pid and exec'd airlock.
    assert_eq!(i.server.child.try_wait().unwrap(), None, "airlock exited");
    let ran = std::fs::read_to_string(&mark).expect("the installed path was executed");
    assert!(
        ran.starts_with(&format!("{pid} pid={pid},listen=")),
        "{ran}"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("--emulate"),
        "same arguments"
    );
    assert_ne!(first_server, second_server, "a new server serves");
    // The connection to the killed server is gone; the next client is served.
    assert!(held.read32(0, REG_IDENT).is_err());
    assert_eq!(ident(&i.server.path), IDENT);
    eprintln!(
        "upgrade: {} ms to the new airlock's log line, {connections} connections meanwhile",
        t.elapsed().as_millis()
    );
    let log = i.server.log();
    assert_eq!(log.matches("live upgrade: airlock").count(), 1, "{log}");
    // systemd (Type=notify, ExecReload) hears the reload begin and end.
    let mut said = Vec::new();
    wait_for("READY=1 after the upgrade", || {
        said.extend(i.notified());
        said.iter().any(|m| m == "READY=1")
    });
    assert_eq!(said, ["RELOADING=1", "READY=1"]);
    assert!(!log.contains("AIRLOCK_UPGRADE"), "no handover error: {log}");

    // A second upgrade execs the installed path again (not what the
    // wrapper exec'd), and SIGTERM still stops airlock and removes the socket.
    sigusr2(pid);
    wait_for("the second upgrade", || {
        std::fs::read_to_string(&mark)
            .unwrap_or_default()
            .lines()
            .count()
            == 2
    });
    wait_for("the second upgrade's log line", || {
        i.server.log().matches("live upgrade: airlock").count() == 2
    });
    assert_eq!(ident(&i.server.path), IDENT);
    assert!(i.server.stop().success());
    assert!(
        !i.server.path.exists(),
        "the socket path is removed at stop"
    );
}

#[test]
fn an_upgrade_to_a_binary_that_cannot_run_leaves_airlock_serving() {
    if !is_root() {
        eprintln!("skipped: the live upgrade needs the supervisor (sandbox on: root)");
        return;
    }
    let mut i = install_and_start("upgrade-fail");
    let pid = i.server.child.id();
    let server = i.server.server_pid();

    // Missing: refused before anything stops; the same server serves on.
    std::fs::remove_file(&i.exe).unwrap();
    sigusr2(pid);
    wait_log(&i.server, "live upgrade (SIGUSR2) refused");
    assert_eq!(server_pid_now(pid), server, "nothing was stopped");
    assert_eq!(ident(&i.server.path), IDENT);

    // Executable but not a program: execve fails after the server was
    // stopped; this airlock starts a fresh server of its own.
    replace(&i.exe, b"not a program\n");
    sigusr2(pid);
    wait_log(&i.server, "live upgrade failed");
    assert_eq!(i.server.child.try_wait().unwrap(), None, "airlock exited");
    assert_eq!(ident(&i.server.path), IDENT);
    assert_ne!(i.server.server_pid(), server, "a fresh server");
    let log = i.server.log();
    assert!(log.contains("Exec format error"), "{log}");
    assert!(!log.contains("live upgrade: airlock"), "{log}");
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
    wait_for("the activation socket", || s.path.exists());
    assert_eq!(ident(&s.path), IDENT);
    let pid = s.child.id();
    sigusr2(pid);
    wait_log(&s, "live upgrade: airlock");
    assert_eq!(ident(&s.path), IDENT);
    let log = s.log();
    assert!(log.contains("took over fd 3"), "{log}");
    assert_eq!(log.matches("listening on fd 3").count(), 2, "{log}");
}
