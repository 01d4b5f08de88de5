//! CLI -> Config -> run.

use std::process::ExitCode;

use airlock::config::{capabilities_json, Args, Config, DeviceKind, EmulatedKind, Listen};
use airlock::device::{edu::Edu, vfio::VfioPci, Device};
use airlock::sandbox::{self, Policy, Profile, Role};
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
        Ok(code) => code,
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

fn open_device(kind: DeviceKind) -> Result<(Box<dyn Device>, Profile), Box<dyn std::error::Error>> {
    Ok(match kind {
        DeviceKind::Emulated(EmulatedKind::Edu) => (Box::new(Edu::new()), Profile::Emulated),
        DeviceKind::Vfio {
            bdf,
            mediate_bars,
            allow_unsafe_interrupts,
        } => (
            Box::new(VfioPci::open(&bdf, mediate_bars, allow_unsafe_interrupts)?),
            Profile::Vfio,
        ),
    })
}

fn run(config: Config) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (listen, kind, max_data_xfer, sandbox_config, windows) = match config {
        Config::PrintCapabilities => {
            println!("{}", capabilities_json());
            return Ok(ExitCode::SUCCESS);
        }
        Config::PrintQemuArgs {
            listen,
            device,
            mut windows,
            guest_ram,
        } => {
            let (dev, _) = open_device(device)?;
            let mut all = dev.iova_windows();
            all.append(&mut windows);
            print!(
                "{}",
                airlock::qemu_args::qemu_args(&listen, dev.name(), &all, &guest_ram)
            );
            return Ok(ExitCode::SUCCESS);
        }
        Config::Serve {
            listen,
            device,
            max_data_xfer,
            sandbox,
            windows,
        } => (listen, device, max_data_xfer, sandbox, windows),
    };
    if sandbox_config.is_some() {
        let path = match &listen {
            Listen::Path(p) => Some(p.clone()),
            Listen::Fd(_) => None,
        };
        if let Role::Supervisor(code) = sandbox::enter_pid_namespace(|| path)? {
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
    }
    // Acquire everything first: signals, socket, device.
    install_stop_signals()?;
    let mut listener = Listener::open(&listen)?;
    let (device, profile) = open_device(kind)?;
    // Then confine.
    if let Some(sc) = sandbox_config {
        // The supervisor, outside the empty root, removes the socket path.
        listener.disown_path();
        let (nofile, memlock) = match profile {
            Profile::Emulated => (256, sc.memlock.unwrap_or(0)),
            Profile::Vfio => (4096, sc.memlock.unwrap_or(u64::MAX)),
        };
        sandbox::confine(&Policy {
            profile,
            user: sc.user,
            limits: sandbox::Limits { nofile, memlock },
        })?;
        #[cfg(feature = "fault-injection")]
        if let Some(f) = sc.fault {
            fault::attempt(f);
        }
    } else {
        tracing::warn!("sandbox off: the server runs with airlock's full privileges");
    }
    // Then serve.
    let mut limits = airlock::server_limits(max_data_xfer);
    limits.windows = windows;
    serve(&listener, device, limits)?;
    Ok(ExitCode::SUCCESS)
}

/// Test-only attempts at what the sandbox forbids.
#[cfg(feature = "fault-injection")]
mod fault {
    use airlock::config::Fault;

    /// Tries `f`; if the process survives, reports the error and exits 3.
    pub fn attempt(f: Fault) -> ! {
        eprintln!("fault injection: attempting {f:?}");
        // SAFETY: each call gets valid NUL-terminated strings or null
        // pointers; this is a test build meant to be killed here.
        let r = unsafe {
            match f {
                Fault::OpenPasswd => libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) as i64,
                Fault::SocketInet => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64,
                Fault::Execve => {
                    let argv = [c"/bin/sh".as_ptr(), std::ptr::null()];
                    libc::execve(c"/bin/sh".as_ptr(), argv.as_ptr(), std::ptr::null()) as i64
                }
                Fault::Ptrace => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) as i64,
            }
        };
        let e = std::io::Error::last_os_error();
        eprintln!("fault injection: {f:?} survived: returned {r}, {e}");
        std::process::exit(3)
    }
}
