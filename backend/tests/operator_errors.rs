//! Given the common mistakes an operator makes, the real `airlock` binary
//! refuses to start with a sentence that names the fix (each one that can
//! be made on a machine without VFIO; the VFIO group and permission ones are
//! unit tests over a fake sysfs in device/vfio/preflight.rs, the memlock one
//! runs in the nested beds).

mod common;

use std::process::{Command, Stdio};

use common::*;

/// Runs airlock with `args`; returns (exit code, stderr).
fn airlock(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn refused_with(args: &[&str], fix: &[&str]) {
    let (code, err) = airlock(args);
    println!(
        "airlock {}\n  -> exit {code:?}: {}",
        args.join(" "),
        err.trim()
    );
    assert!(code.is_some_and(|c| c != 0), "airlock started: {err}");
    for f in fix {
        assert!(err.contains(f), "the message lacks {f:?}: {err}");
    }
}

#[test]
fn a_socket_in_a_missing_directory_says_to_create_it() {
    refused_with(
        &[
            "--socket-path",
            "/nonexistent-airlock-dir/edu.sock",
            "--emulate",
            "edu",
        ],
        &["mkdir -p /nonexistent-airlock-dir"],
    );
}

#[test]
fn a_socket_where_airlock_may_not_write_says_to_pick_a_writable_directory() {
    // sysfs refuses new files even to root.
    refused_with(
        &["--socket-path", "/sys/airlock-edu.sock", "--emulate", "edu"],
        &["may not create a socket in /sys", "--socket-path"],
    );
}

#[test]
fn a_socket_path_too_long_for_unix_sockets_says_so() {
    let long = format!("/tmp/{}.sock", "a".repeat(120));
    refused_with(
        &["--socket-path", &long, "--emulate", "edu"],
        &["shorter than 108 bytes"],
    );
}

#[test]
fn a_device_bound_to_another_driver_names_the_bind_commands() {
    // Any PCI device of this machine that is not bound to vfio-pci.
    let found = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| {
            let drv = std::fs::read_link(e.path().join("driver")).ok()?;
            let drv = drv.file_name()?.to_string_lossy().into_owned();
            (drv != "vfio-pci").then(|| (e.file_name().to_string_lossy().into_owned(), drv))
        });
    let Some((bdf, driver)) = found else {
        let msg = "no PCI device bound to a driver on this machine";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        println!("!!! SKIP: {msg}");
        return;
    };
    let sock = tempdir("unbound");
    let path = sock.0.join("dev.sock");
    refused_with(
        &["--socket-path", path.to_str().unwrap(), "--vfio", &bdf],
        &[
            &format!("bound to driver \"{driver}\", not vfio-pci"),
            &format!("echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override"),
            "drivers_probe",
        ],
    );
    assert!(!path.exists(), "no socket is left behind");
}

#[test]
fn a_pci_address_that_does_not_exist_points_at_lspci() {
    let sock = tempdir("nodev");
    let path = sock.0.join("dev.sock");
    refused_with(
        &[
            "--socket-path",
            path.to_str().unwrap(),
            "--vfio",
            "0000:7f:1f.7",
        ],
        &["no such PCI device", "lspci -D"],
    );
}

#[test]
fn no_device_or_no_socket_says_which_options_to_give() {
    refused_with(
        &["--socket-path", "/tmp/x.sock"],
        &["--emulate edu", "--device"],
    );
    refused_with(
        &["--emulate", "edu"],
        &["--socket-path PATH or --fd N", "LISTEN_FDS"],
    );
    refused_with(
        &["--socket-path", "/tmp/x.sock", "--vfio", "nic0"],
        &["not a PCI address", "0000:00:04.0"],
    );
}

#[test]
fn a_socket_group_or_mode_that_cannot_work_is_named_before_anything_is_served() {
    let dir = tempdir("socket-access-errors");
    let sock = dir.0.join("edu.sock");
    let s = sock.to_str().unwrap();
    refused_with(
        &[
            "--socket-path",
            s,
            "--emulate",
            "edu",
            "--socket-group",
            "no-such-group-airlock",
        ],
        &["no-such-group-airlock", "no such group"],
    );
    refused_with(
        &[
            "--socket-path",
            s,
            "--emulate",
            "edu",
            "--socket-mode",
            "rw-rw----",
        ],
        &["rw-rw----", "not an octal file mode"],
    );
    refused_with(
        &[
            "--socket-path",
            s,
            "--emulate",
            "edu",
            "--socket-mode",
            "0666",
        ],
        &["0666", "every user", "--socket-group"],
    );
    assert!(!sock.exists(), "nothing was served");
}
