//! CLI -> Config -> run.

use std::process::ExitCode;

use airlock::config::{capabilities_json, Args, Config, DeviceKind, EmulatedKind};
use airlock::device::{edu::Edu, vfio::VfioPci, Device};
use airlock::server::{install_stop_signals, serve, Listener};
use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock: {e}");
            return ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock: {e}");
            ExitCode::FAILURE
        }
    }
}

/// AIRLOCK_LOG (tracing's filter syntax), info by default. vfio-ioctls
/// warns about absent optional IRQ indexes on every open, so it is held at
/// error unless the filter names it.
fn log_filter() -> EnvFilter {
    let spec = std::env::var("AIRLOCK_LOG").unwrap_or_else(|_| "info".into());
    let spec = if spec.contains("vfio_ioctls") {
        spec
    } else {
        format!("{spec},vfio_ioctls=error")
    };
    EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info,vfio_ioctls=error"))
}

fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let (listen, kind, max_data_xfer) = match config {
        Config::PrintCapabilities => {
            println!("{}", capabilities_json());
            return Ok(());
        }
        Config::Serve {
            listen,
            device,
            max_data_xfer,
        } => (listen, device, max_data_xfer),
    };
    // Acquire everything first: signals, socket, device.
    install_stop_signals()?;
    let listener = Listener::open(&listen)?;
    let device: Box<dyn Device> = match kind {
        DeviceKind::Emulated(EmulatedKind::Edu) => Box::new(Edu::new()),
        DeviceKind::Vfio { bdf, mediate_bars } => Box::new(VfioPci::open(&bdf, mediate_bars)?),
    };
    serve(&listener, device, airlock::server_limits(max_data_xfer))?;
    Ok(())
}
