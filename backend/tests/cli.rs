//! Given `airlock --help`, `--print-man` and `--print-completions`, an
//! operator gets examples, a man page and shell completions generated from
//! the same option definitions the daemon parses.

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "airlock {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

const OPTIONS: &[&str] = &[
    "--socket-path",
    "--fd",
    "--emulate",
    "--vfio",
    "--device",
    "--mediate-bars",
    "--reserve-iova",
    "--print-qemu-args",
    "--sandbox",
    "--user",
    "--memlock",
    "--socket-group",
    "--socket-mode",
    "--print-backend-json",
];

#[test]
fn help_ends_with_examples_and_the_environment() {
    let h = run(&["--help"]);
    assert!(h.contains("Examples:"), "{h}");
    assert!(
        h.contains("airlock --socket-path /run/airlock/edu.sock --emulate edu"),
        "{h}"
    );
    assert!(h.contains("AIRLOCK_LOG"), "{h}");
}

#[test]
fn the_man_page_is_roff_and_names_every_option() {
    let m = run(&["--print-man"]);
    assert!(
        m.starts_with(".ie") || m.contains(".TH airlock"),
        "{}",
        &m[..200.min(m.len())]
    );
    for o in OPTIONS {
        let roff = o.replace('-', "\\-");
        assert!(m.contains(&roff), "the man page lacks {o}");
    }
    assert!(m.contains("Examples:"), "the examples reach the man page");
}

#[test]
fn bash_completion_parses_and_completes_every_option() {
    let c = run(&["--print-completions", "bash"]);
    for o in OPTIONS {
        assert!(c.contains(o), "the completion lacks {o}");
    }
    let dir = std::env::temp_dir().join(format!("airlock-completion-{}", std::process::id()));
    std::fs::write(&dir, &c).unwrap();
    let st = Command::new("bash").arg("-n").arg(&dir).status().unwrap();
    let _ = std::fs::remove_file(&dir);
    assert!(st.success(), "bash -n rejects the completion script");
    for shell in ["zsh", "fish"] {
        assert!(run(&["--print-completions", shell]).contains("socket-path"));
    }
}

#[test]
fn the_shipped_backend_description_is_what_the_flag_prints() {
    // docs/interop/vfio-user.rst: a backend comes with a JSON file under
    // /usr/share/vfio-user (README, Installing, installs this one).
    let printed = run(&["--print-backend-json", "/usr/local/bin/airlock"]);
    let shipped = include_str!("../vfio-user/50-airlock.json");
    assert_eq!(
        printed, shipped,
        "regenerate backend/vfio-user/50-airlock.json with the flag"
    );
    let v: serde_json::Value = serde_json::from_str(shipped).unwrap();
    assert_eq!(v["type"], "vfio-user-pci");
    assert_eq!(v["binary"], "/usr/local/bin/airlock");
    let own = run(&["--print-backend-json"]);
    let v: serde_json::Value = serde_json::from_str(&own).unwrap();
    assert_eq!(
        v["binary"],
        env!("CARGO_BIN_EXE_airlock"),
        "without BINARY: this airlock"
    );
}
