//! CLI -> Config -> airlock::app::run.

use std::process::ExitCode;

use airlock::config::{Args, Config};
use airlock::lifecycle::upgrade;
use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    // Saved before anything: a live upgrade execs the same arguments.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // A live upgrade's predecessor handed over its socket and device.
    let handed = match upgrade::take_from_env() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("airlock: {e}");
            return ExitCode::from(2);
        }
    };
    let mut args = Args::parse();
    // What systemd passed: the activation socket, the fd store's entries.
    let passed = match airlock::systemd::passed() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("airlock: {e}");
            return ExitCode::from(2);
        }
    };
    if args.socket_path.is_none() && args.fd.is_none() {
        // A live upgrade's predecessor hands its socket over (socket
        // activation's variables went with the first airlock).
        args.fd = handed.as_ref().map(|h| h.listen).or(passed.listen);
    }
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock: {e}");
            return ExitCode::from(2);
        }
    };
    match airlock::app::run(config, argv, handed, passed.stored) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("airlock: {e}");
            ExitCode::FAILURE
        }
    }
}

/// AIRLOCK_LOG (tracing's filter syntax), info by default.
fn log_filter() -> EnvFilter {
    let spec = std::env::var("AIRLOCK_LOG").unwrap_or_else(|_| "info".into());
    EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"))
}
