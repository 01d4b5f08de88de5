//! airlock's modes, from a parsed Config: print something and exit, serve
//! unconfined (--sandbox off), or serve supervised and sandboxed (the
//! default). main.rs parses and hands off here.

use std::error::Error;
use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;

use crate::config::{
    backend_json, capabilities_json, Args, Config, DeviceKind, EmulatedKind, Listen, SandboxConfig,
};
use crate::device::vfio::request::{self, RequestWatch, EXIT_WITHDRAWN};
use crate::device::vfio::{HandedVfio, VfioPci};
use crate::device::{emulated::edu::Edu, Device};
use crate::iova::DoorbellWindow;
use crate::lifecycle::predecessor::Predecessor;
use crate::lifecycle::successor::Successor;
use crate::lifecycle::upgrade::{self, Handed};
use crate::lifecycle::{self, Exit, ServerStart, Supervision};
use crate::negotiate::ServerLimits;
use crate::sandbox::{self, Policy, Profile};
use crate::server::{install_stop_signals, refuse_upgrade_signal, serve, Listener};
use crate::systemd::fdstore;

type AppResult<T> = Result<T, Box<dyn Error>>;

/// Runs `config`; `argv` is what a live upgrade execs again, `handed` what
/// a previous airlock handed over (a live upgrade's successor), `stored`
/// what systemd's fd store gave back (systemd/fdstore.rs).
pub fn run(
    config: Config,
    argv: Vec<OsString>,
    handed: Option<Handed>,
    stored: Vec<(String, RawFd)>,
) -> AppResult<ExitCode> {
    let Config::Serve {
        listen,
        access,
        device: kind,
        max_data_xfer,
        poll_us,
        sandbox: sandbox_config,
        windows,
    } = config
    else {
        return print(config);
    };
    // A live upgrade's successor: the airlock that started it serves until
    // this one says it can take over, and hears why if it cannot.
    let mut predecessor = match &handed {
        Some(h) => Some(Predecessor::new(upgrade::claim_ctl(h)?, h.owner)),
        None => None,
    };
    let served = (|| {
        // The socket first: with the sandbox its owner is the supervisor, so
        // the path stays in place while servers come and go (and, handed over
        // by a live upgrade, while binaries do).
        let restored = restored_device(&kind, handed.as_ref(), stored);
        let (listener, handed_vfio) =
            upgrade::claim_handed(handed.as_ref(), restored, &listen, &access)?;
        let mut limits = server_limits(&kind, max_data_xfer, windows);
        limits.poll = std::time::Duration::from_micros(poll_us.into());
        match sandbox_config {
            None => serve_unconfined(&listener, kind, limits),
            Some(sc) => {
                let fresh = handed_vfio.is_none();
                let held = open_held(&kind, handed_vfio, handed.is_some(), limits.max_dma_maps)?;
                if let (true, Some(dev)) = (fresh, &held) {
                    store_device(dev);
                }
                let upgrades = Upgrades {
                    argv,
                    handed: handed.as_ref(),
                    listen: &listen,
                    predecessor: &mut predecessor,
                };
                serve_supervised(listener, kind, held, sc, limits, upgrades)
            }
        }
    })();
    if let (Err(e), Some(p)) = (&served, &predecessor) {
        p.refuse(&e.to_string());
    }
    served
}

/// The device systemd's fd store gave back, for --vfio when no predecessor
/// hands one over; the entries that are not used are closed.
fn restored_device(
    kind: &DeviceKind,
    handed: Option<&Handed>,
    stored: Vec<(String, RawFd)>,
) -> Option<HandedVfio> {
    let wanted = handed.is_none() && matches!(kind, DeviceKind::Vfio { .. });
    let restored = fdstore::restored(&stored).filter(|_| wanted);
    if restored.is_none() {
        for (name, fd) in &stored {
            tracing::warn!("{kind}: closing fd {fd} ({name}) from systemd's fd store: it does not belong to this device's airlock");
            // SAFETY: systemd passed this fd to this process, and nothing
            // else here claimed it.
            drop(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    } else {
        tracing::info!("{kind}: systemd's fd store gave the device back: it is taken over as it was (no reset; the first server adopts its IOMMU mappings and interrupts)");
    }
    restored
}

/// Under a systemd whose fd store keeps the device (FileDescriptorStoreMax=
/// of at least 4), hands it duplicates of the device's fds: `systemctl
/// restart` and a crash of airlock itself then keep the device.
fn store_device(dev: &VfioPci) {
    if !fdstore::keeps_device() {
        return;
    }
    match fdstore::store(&dev.handed()) {
        Ok(()) => tracing::info!("{}: the device's fds are in systemd's fd store: systemctl restart, or a crash of airlock, keeps the device; systemctl stop releases it (vfio-pci then resets it)", dev.name()),
        Err(e) => tracing::warn!("{}: storing the device's fds in systemd's fd store failed ({e}); systemctl restart will reset the device", dev.name()),
    }
}

/// What a live upgrade needs: the arguments to start the successor with,
/// what this airlock was handed (if it is one), and its predecessor.
struct Upgrades<'a> {
    argv: Vec<OsString>,
    handed: Option<&'a Handed>,
    listen: &'a Listen,
    /// Taken by the supervisor; still here if this airlock fails before.
    predecessor: &'a mut Option<Predecessor>,
}

/// The modes that print and exit.
fn print(config: Config) -> AppResult<ExitCode> {
    match config {
        Config::PrintCapabilities => println!("{}", capabilities_json()),
        Config::PrintBackendJson(binary) => {
            let binary = match binary {
                Some(b) => b,
                None => std::env::current_exe()?.display().to_string(),
            };
            println!("{}", serde_json::to_string_pretty(&backend_json(&binary))?);
        }
        Config::PrintMan => clap_mangen::Man::new(<Args as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())?,
        Config::PrintCompletions(shell) => {
            let mut cmd = <Args as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "airlock", &mut std::io::stdout());
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
                crate::qemu_args::qemu_args_for(
                    &listen,
                    dev.name(),
                    &all,
                    guest_ram.as_deref(),
                    flavor
                )
            );
        }
        Config::Serve { .. } => unreachable!("run serves"),
    }
    Ok(ExitCode::SUCCESS)
}

/// What every server offers: `max_data_xfer`, the windows, and as many DMA
/// maps as the device kind can hold.
fn server_limits(
    kind: &DeviceKind,
    max_data_xfer: u64,
    windows: Vec<DoorbellWindow>,
) -> ServerLimits {
    let mut limits = crate::server_limits(max_data_xfer);
    limits.windows = windows;
    if matches!(kind, DeviceKind::Vfio { .. }) {
        limits.max_dma_maps = crate::vfio_max_dma_maps(limits.max_dma_maps);
    }
    limits
}

/// `max_maps`: the most DMA maps a server will offer (sizes --vfio's
/// table of IOMMU mappings).
fn open_device(kind: DeviceKind, max_maps: u64) -> AppResult<(Box<dyn Device>, Profile)> {
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

/// --sandbox off: one process serves with airlock's full privileges.
fn serve_unconfined(
    listener: &Listener,
    kind: DeviceKind,
    mut limits: ServerLimits,
) -> AppResult<ExitCode> {
    tracing::warn!("sandbox off: the server runs with airlock's full privileges");
    install_stop_signals()?;
    refuse_upgrade_signal()?;
    request::install_relay()?;
    crate::fit_dma_maps_to_nofile(&mut limits);
    let device: Box<dyn Device> = match open_held(&kind, None, false, limits.max_dma_maps)? {
        Some(vfio) => {
            if let Some(watch) = request_watch(Some(&vfio), true) {
                lifecycle::withdraw::watch_in_thread(vfio.name().to_string(), watch)?;
            }
            Box::new(vfio)
        }
        None => open_device(kind, limits.max_dma_maps)?.0,
    };
    crate::systemd::notify(&format!(
        "READY=1\nSTATUS=serving {} on {} (sandbox off)",
        device.name(),
        listener.describe()
    ));
    let device = serve(listener, device, limits)?;
    crate::systemd::notify("STOPPING=1");
    if device.withdrawn() {
        let name = device.name().to_string();
        drop(device);
        lifecycle::withdraw::released(&name);
        return Ok(ExitCode::from(EXIT_WITHDRAWN as u8));
    }
    Ok(ExitCode::SUCCESS)
}

/// With --vfio the supervisor opens the device once (or takes it from the
/// previous airlock) and every server inherits it (clone copies fds and
/// memory, like fork): the supervisor's copies of the container, group and
/// device fds keep the device open while no server runs, so a killed
/// server's IOMMU mappings and interrupts stay and the device is not reset.
fn open_held(
    kind: &DeviceKind,
    handed_vfio: Option<upgrade::HandedFds>,
    upgrading: bool,
    max_maps: u64,
) -> AppResult<Option<VfioPci>> {
    let DeviceKind::Vfio {
        bdf,
        mediate_bars,
        allow_unsafe_interrupts,
    } = kind
    else {
        // Handed VFIO fds an emulated device does not use close here.
        return Ok(None);
    };
    Ok(Some(match handed_vfio {
        Some((fds, table)) => VfioPci::resume(bdf, *mediate_bars, fds, table)?,
        None if upgrading => return Err(format!("{kind}: the previous airlock handed over no VFIO device; restart airlock instead of upgrading it (the arguments changed?)").into()),
        None => VfioPci::open(
            bdf,
            *mediate_bars,
            *allow_unsafe_interrupts,
            max_maps as usize,
        )?,
    }))
}

/// The default: a supervisor outside the sandbox starts sandboxed servers,
/// restarts them when they die and starts a successor on SIGUSR2.
fn serve_supervised(
    listener: Listener,
    kind: DeviceKind,
    mut held: Option<VfioPci>,
    sc: SandboxConfig,
    limits: ServerLimits,
    up: Upgrades<'_>,
) -> AppResult<ExitCode> {
    let name = kind.to_string();
    if let Some(h) = up.handed {
        tracing::info!(
            "live upgrade: airlock {} ({}) holds {}{} from pid {}; it serves once that airlock's server is stopped",
            env!("CARGO_PKG_VERSION"),
            h.exe.display(),
            listener.describe(),
            if held.is_some() {
                format!(" and {name} as it was (no reset; the first server adopts its IOMMU mappings and interrupts)")
            } else {
                String::new()
            },
            h.owner
        );
    }
    let successor = successor_for(&listener, held.as_ref(), &up);
    let socket = listener.describe();
    // A successor hears the device request once its predecessor let go.
    let request = request_watch(held.as_ref(), up.handed.is_none());
    let supervision = Supervision {
        device: &name,
        socket: &socket,
        listener: listener.raw_fd(),
        successor: successor.as_ref(),
        predecessor: up.predecessor.take(),
        device_kept: held.is_some() && fdstore::keeps_device(),
        request: request.as_ref(),
    };
    let supervised = lifecycle::supervise(supervision, |start| {
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
    });
    release(supervised, listener, held)
}

/// The kernel's device request for `held` (--vfio), armed now if `arm`.
/// Without it an unbind from vfio-pci waits until airlock stops.
fn request_watch(held: Option<&VfioPci>, arm: bool) -> Option<RequestWatch> {
    let dev = held?;
    let watch = match dev.request_watch() {
        Ok(w) => w?,
        Err(e) => {
            tracing::warn!("{}: no device request (VFIO REQ) watch: {e}; an unbind from vfio-pci then waits for airlock to stop", dev.name());
            return None;
        }
    };
    (!arm || lifecycle::withdraw::arm(dev.name(), &watch)).then_some(watch)
}

/// What SIGUSR2 starts: the binary at the path the first airlock was
/// started from, handed this socket and device.
fn successor_for(
    listener: &Listener,
    held: Option<&VfioPci>,
    up: &Upgrades<'_>,
) -> Option<Successor> {
    let socket_path = match up.listen {
        Listen::Path(p) => Some(p.clone()),
        Listen::Fd(_) => None,
    };
    let exe = up
        .handed
        .map(|h| h.exe.clone())
        .or_else(upgrade::started_from)?;
    Some(Successor::new(
        exe,
        up.argv.clone(),
        listener.raw_fd(),
        held.map(VfioPci::handed),
        socket_path,
    ))
}

/// Once supervision ends: who releases the device and the socket path.
fn release(
    supervised: Result<Exit, lifecycle::SupervisorError>,
    mut listener: Listener,
    held: Option<VfioPci>,
) -> AppResult<ExitCode> {
    let code = |c: i32| ExitCode::from(c.clamp(0, 255) as u8);
    match supervised {
        // Every server was reaped: dropping the device quiesces it (a
        // server that stopped gracefully did so already), and the socket
        // path goes.
        Ok(Exit::Stopped(c)) => {
            listener.own_path();
            let name = held.as_ref().map(|d| d.name().to_string());
            drop(held);
            if let (EXIT_WITHDRAWN, Some(name)) = (c, name) {
                lifecycle::withdraw::released(&name);
            }
            Ok(code(c))
        }
        // Handed to a successor, or never taken from a predecessor: the
        // device and the path stay as they are for the airlock that serves.
        Ok(Exit::LetGo(c)) => {
            listener.disown_path();
            std::mem::forget(held);
            Ok(code(c))
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
    sc: &SandboxConfig,
    mut limits: ServerLimits,
    start: &ServerStart<'_>,
) -> AppResult<()> {
    // Acquire everything first: signals, device.
    install_stop_signals()?;
    request::install_relay()?;
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
    let nofile = crate::fit_dma_maps_to_nofile(&mut limits);
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
    use crate::config::Fault;

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
