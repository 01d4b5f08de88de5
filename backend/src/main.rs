//! CLI -> Config -> run.

use std::process::ExitCode;

use airlock::config::{capabilities_json, Args, Config, DeviceKind, EmulatedKind};
use airlock::device::vfio::{VfioFds, VfioPci};
use airlock::device::{edu::Edu, Device};
use airlock::lifecycle::upgrade::{self, Handed, Successor};
use airlock::lifecycle::{self, ServerStart};
use airlock::sandbox::{self, Policy, Profile};
use airlock::server::{install_stop_signals, refuse_upgrade_signal, serve, Listener};
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
    if let Some(h) = &handed {
        if args.socket_path.is_none() {
            // Socket activation's variables went with the first airlock.
            args.fd = Some(h.listen);
        }
    } else if args.socket_path.is_none() && args.fd.is_none() {
        // Started by systemd socket activation: serve on the passed socket.
        match airlock::systemd::listen_fd() {
            Ok(fd) => args.fd = fd,
            Err(e) => {
                eprintln!("airlock: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock: {e}");
            return ExitCode::from(2);
        }
    };
    match run(config, argv, handed) {
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

/// `max_maps`: the most DMA maps a server will offer (sizes --vfio's
/// table of IOMMU mappings).
fn open_device(
    kind: DeviceKind,
    max_maps: u64,
) -> Result<(Box<dyn Device>, Profile), Box<dyn std::error::Error>> {
    Ok(match kind {
        DeviceKind::Emulated(EmulatedKind::Edu) => (Box::new(Edu::new()), Profile::Emulated),
        DeviceKind::Vfio {
            bdf,
            mediate_bars,
            allow_unsafe_interrupts,
        } => (
            Box::new(VfioPci::open(
                &bdf,
                mediate_bars,
                allow_unsafe_interrupts,
                max_maps as usize,
            )?),
            Profile::Vfio,
        ),
    })
}

fn run(
    config: Config,
    argv: Vec<std::ffi::OsString>,
    handed: Option<Handed>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (listen, kind, max_data_xfer, sandbox_config, windows) = match config {
        Config::PrintCapabilities => {
            println!("{}", capabilities_json());
            return Ok(ExitCode::SUCCESS);
        }
        Config::PrintMan => {
            clap_mangen::Man::new(<Args as clap::CommandFactory>::command())
                .render(&mut std::io::stdout())?;
            return Ok(ExitCode::SUCCESS);
        }
        Config::PrintCompletions(shell) => {
            let mut cmd = <Args as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "airlock", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Config::PrintQemuArgs {
            listen,
            device,
            mut windows,
            guest_ram,
            flavor,
        } => {
            let (dev, _) = open_device(device, 1)?;
            let mut all = dev.iova_windows();
            all.append(&mut windows);
            print!(
                "{}",
                airlock::qemu_args::qemu_args_for(
                    &listen,
                    dev.name(),
                    &all,
                    guest_ram.as_deref(),
                    flavor
                )
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
    // The socket first: with the sandbox its owner is the supervisor, so
    // the path stays in place while servers come and go (and, handed over
    // by a live upgrade, while binaries do).
    let listener = match &handed {
        Some(h) => Listener::resume(upgrade::claim(h.listen, "listening socket")?, &listen)?,
        None => Listener::open(&listen)?,
    };
    let handed_vfio = match handed.as_ref().and_then(|h| h.vfio) {
        Some(v) => Some((
            VfioFds {
                device: upgrade::claim(v.device, "VFIO device fd")?,
                group: upgrade::claim(v.group, "VFIO group fd")?,
                container: upgrade::claim(v.container, "VFIO container fd")?,
            },
            upgrade::claim(v.table, "table of IOMMU mappings")?,
        )),
        None => None,
    };
    let mut limits = airlock::server_limits(max_data_xfer);
    limits.windows = windows;
    if matches!(kind, DeviceKind::Vfio { .. }) {
        limits.max_dma_maps = airlock::vfio_max_dma_maps(limits.max_dma_maps);
    }
    let Some(sc) = sandbox_config else {
        tracing::warn!("sandbox off: the server runs with airlock's full privileges");
        install_stop_signals()?;
        refuse_upgrade_signal()?;
        airlock::fit_dma_maps_to_nofile(&mut limits);
        let (device, _) = open_device(kind, limits.max_dma_maps)?;
        airlock::systemd::notify(&format!(
            "READY=1\nSTATUS=serving {} on {} (sandbox off)",
            device.name(),
            listener.describe()
        ));
        serve(&listener, device, limits)?;
        airlock::systemd::notify("STOPPING=1");
        return Ok(ExitCode::SUCCESS);
    };
    let name = kind.to_string();
    // With --vfio the supervisor opens the device once and every server
    // inherits it (clone copies fds and memory, like fork): the
    // supervisor's copies of the container, group and device fds keep the
    // device open while no server runs, so a killed server's IOMMU
    // mappings and interrupts stay and the device is not reset.
    let mut held = match (&kind, handed_vfio) {
        (
            DeviceKind::Vfio {
                bdf, mediate_bars, ..
            },
            Some((fds, table)),
        ) => Some(VfioPci::resume(bdf, *mediate_bars, fds, table)?),
        (
            DeviceKind::Vfio {
                bdf,
                mediate_bars,
                allow_unsafe_interrupts,
            },
            None,
        ) => {
            if handed.is_some() {
                return Err(format!("{name}: the previous airlock handed over no VFIO device; restart airlock instead of upgrading it (the arguments changed?)").into());
            }
            Some(VfioPci::open(
                bdf,
                *mediate_bars,
                *allow_unsafe_interrupts,
                limits.max_dma_maps as usize,
            )?)
        }
        // Handed VFIO fds an emulated device does not use close here.
        (DeviceKind::Emulated(_), _) => None,
    };
    if let Some(h) = &handed {
        tracing::info!(
            "live upgrade: airlock {} ({}) took over {}{} from the previous binary; pid {} unchanged",
            env!("CARGO_PKG_VERSION"),
            h.exe.display(),
            listener.describe(),
            if held.is_some() {
                format!(" and {name} as it was (no reset; the first server adopts its IOMMU mappings and interrupts)")
            } else {
                String::new()
            },
            std::process::id()
        );
    }
    // What SIGUSR2 execs: the binary at the path the first airlock was
    // started from, handed this socket and device.
    let successor = handed
        .as_ref()
        .map(|h| h.exe.clone())
        .or_else(upgrade::started_from)
        .map(|exe| {
            Successor::new(
                argv,
                Handed {
                    listen: listener.raw_fd(),
                    vfio: held.as_ref().map(VfioPci::handed),
                    exe,
                },
            )
        });
    let supervised = lifecycle::supervise(
        &name,
        &listener.describe(),
        listener.raw_fd(),
        successor.as_ref(),
        |start| {
            // In the server: its own copy of the supervisor's device.
            let inherited = held.take();
            match serve_confined(
                &listener,
                kind.clone(),
                inherited,
                &sc,
                limits.clone(),
                start,
            ) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("airlock: {e}");
                    1
                }
            }
        },
    );
    match supervised {
        // Every server was reaped: dropping the device quiesces it (a
        // server that stopped gracefully did so already).
        Ok(code) => {
            drop(held);
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        // A server may still run until it dies with us (PDEATHSIG): no
        // quiesce under it; the kernel releases the device after both.
        Err(e) => {
            std::mem::forget(held);
            Err(e.into())
        }
    }
}

/// The sandboxed server: take the supervisor's device (--vfio) or make
/// one, confine, serve until stopped.
fn serve_confined(
    listener: &Listener,
    kind: DeviceKind,
    inherited: Option<VfioPci>,
    sc: &airlock::config::SandboxConfig,
    mut limits: airlock::negotiate::ServerLimits,
    start: &ServerStart<'_>,
) -> Result<(), Box<dyn std::error::Error>> {
    // Acquire everything first: signals, device.
    install_stop_signals()?;
    let (device, profile): (Box<dyn Device>, Profile) = match inherited {
        Some(mut vfio) => {
            // What a killed predecessor left in the kernel stays: no
            // quiesce, no reset; its mappings wait for the client's replay.
            vfio.adopt();
            (Box::new(vfio), Profile::Vfio)
        }
        None => open_device(kind, limits.max_dma_maps)?,
    };
    // Then confine.
    let nofile = airlock::fit_dma_maps_to_nofile(&mut limits);
    let memlock = match profile {
        Profile::Emulated => sc.memlock.unwrap_or(0),
        Profile::Vfio => sc.memlock.unwrap_or(u64::MAX),
    };
    sandbox::confine(
        &Policy {
            profile,
            user: sc.user,
            limits: sandbox::Limits { nofile, memlock },
        },
        start.record,
    )?;
    start.ready();
    #[cfg(feature = "fault-injection")]
    if let (Some(f), 0) = (sc.fault, start.generation) {
        fault::attempt(f);
    }
    // Then serve.
    serve(listener, device, limits)?;
    Ok(())
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
