//! Given the shipped systemd units and systemd's own tools: airlock started
//! by `systemd-socket-activate` at the first connection (LISTEN_FDS, no
//! --socket-path) serves that client on the passed socket with `--device edu` (what airlock@edu.service runs),
//! tells NOTIFY_SOCKET READY=1 once its sandboxed server serves and
//! STOPPING=1 on SIGTERM; and `systemd-analyze verify` accepts the units.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use airlock::device::emulated::edu::{IDENT, REG_IDENT};
use common::*;

/// The path of a systemd tool, or a loud SKIP (a failure under CI=true).
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.exists());
    if found.is_none() {
        let msg = format!("{name} not found (Debian package systemd); scripts/test installs it");
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        println!("!!! SKIP: {msg}");
    }
    found
}

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

fn recv_state(n: &UnixDatagram) -> String {
    let mut b = [0u8; 512];
    let len = n.recv(&mut b).expect("a notification within the timeout");
    String::from_utf8_lossy(&b[..len]).into_owned()
}

#[test]
fn socket_activated_airlock_serves_and_notifies_ready_and_stopping() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    let dir = tempdir("systemd");
    let sock = dir.0.join("edu.sock");
    let notify_path = dir.0.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let log = dir.0.join("airlock.log");
    let mut cmd = Command::new(activate);
    cmd.arg("--listen")
        .arg(&sock)
        .arg("--fdname=airlock")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg("--setenv=AIRLOCK_LOG=info")
        .arg("--setenv=NO_COLOR=1")
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .args(["--device", "edu"])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if !is_root() {
        cmd.args(["--sandbox", "off"]);
    }
    let mut child = cmd.spawn().unwrap();
    wait_for("the activation socket", || sock.exists());
    // systemd-socket-activate starts airlock at the first connection, as
    // systemd does for a .socket unit whose service is not running yet.
    let mut c = connect_path(&sock);
    assert_eq!(c.read32(0, REG_IDENT).unwrap(), IDENT);
    let ready = recv_state(&notify);
    println!("NOTIFY_SOCKET got: {ready:?}");
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("STATUS=serving edu on fd 3"), "{ready}");
    drop(c);
    // SAFETY: kill with our own child's pid (systemd-socket-activate execs airlock).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = recv_state(&notify);
    println!("NOTIFY_SOCKET got: {stopping:?}");
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    let st = wait_exit(&mut child);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(st.success(), "airlock exited {st:?}:\n{text}");
    assert!(text.contains("listening on fd 3"), "{text}");
}

#[test]
fn systemd_analyze_verify_accepts_the_shipped_units() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    // Instances of the templates, with ExecStart pointing at the airlock
    // this test built instead of /usr/local/bin (verify checks it exists).
    let dir = tempdir("units");
    for (template, instance) in [
        ("airlock@.socket", "airlock@edu.socket"),
        ("airlock@.service", "airlock@edu.service"),
    ] {
        let text = std::fs::read_to_string(units_dir().join(template)).unwrap();
        assert!(
            template.ends_with(".socket") || text.contains("ExecStart=/usr/local/bin/airlock "),
            "the shipped service runs /usr/local/bin/airlock (cargo install --root /usr/local)"
        );
        let text = text.replace("/usr/local/bin/airlock", env!("CARGO_BIN_EXE_airlock"));
        std::fs::write(dir.0.join(template), &text).unwrap();
        std::fs::write(dir.0.join(instance), &text).unwrap();
    }
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(dir.0.join("airlock@edu.socket"))
        .arg(dir.0.join("airlock@edu.service"))
        .arg(dir.0.join("airlock@.service"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "systemd-analyze verify: exit {:?} {said}",
        out.status.code()
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn fd_store_entries_that_are_not_this_devices_are_closed_and_the_socket_served() {
    // What systemd passes an airlock@edu after its unit once served a
    // --vfio device: the socket, and a stored fd named as airlock names the
    // table of IOMMU mappings. edu has no use for it: it is closed, with a
    // warning, and the socket served.
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempdir("systemd-fdstore");
    let sock = dir.0.join("edu.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let stray = std::fs::File::open("/proc/self/status").unwrap();
    let (l, s) = (listener.as_raw_fd(), stray.as_raw_fd());
    let log = dir.0.join("airlock.log");
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .args(["--device", "edu"])
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "airlock:vfio-table")
        .env("AIRLOCK_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if !is_root() {
        cmd.args(["--sandbox", "off"]);
    }
    // SAFETY: dup2 and fcntl only, between fork and exec: fd 3 is the
    // socket and fd 4 the stray file, as systemd numbers passed fds.
    unsafe {
        cmd.pre_exec(move || {
            // Out of the way first: either may already sit at 3 or 4.
            for (from, to) in [(l, 103), (s, 104), (103, 3), (104, 4)] {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::fcntl(3, libc::F_SETFD, 0);
            libc::fcntl(4, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut c = connect_path(&sock);
    assert_eq!(c.read32(0, REG_IDENT).unwrap(), IDENT);
    drop(c);
    // SAFETY: kill with our own child's pid (sh execs airlock).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = wait_exit(&mut child);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(st.success(), "airlock exited {st:?}:\n{text}");
    assert!(text.contains("closing fd 4 (vfio-table)"), "{text}");
    assert!(text.contains("listening on fd 3"), "{text}");
}
