//! Command-line arguments, validated into a Config before anything starts.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::ValueEnum;
use thiserror::Error;

mod args;
pub mod socket;
#[cfg(test)]
mod tests;

pub use args::{Args, Fault, SandboxMode};
pub use socket::SocketAccess;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EmulatedKind {
    /// Register-compatible with QEMU's edu device, plus MSI-X.
    Edu,
}

/// At most this many --reserve-iova windows.
const MAX_RESERVED_WINDOWS: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--user {0:?} is not UID:GID (numbers, e.g. 1000:1000)")]
    BadUser(String),
    #[error("--user needs the sandbox (drop --sandbox off)")]
    UserWithoutSandbox,
    #[error("give exactly one of --socket-path PATH or --fd N (or start airlock by systemd socket activation: LISTEN_FDS)")]
    Listen,
    #[error(
        "name a device to serve: --emulate edu, --vfio <PCI address> or --device edu|<PCI address>"
    )]
    NoDevice,
    #[error("--vfio {0:?} is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:00:04.0)")]
    BadAddress(String),
    #[error("--fd {0} is not a valid descriptor number (must be >= 3: 0-2 are stdio)")]
    BadFd(RawFd),
    #[error("{0}")]
    Window(#[from] crate::iova::WindowError),
    #[error("--max-data-xfer {0} must be between 4096 and 64 MiB (QEMU's ceiling)")]
    BadXfer(u64),
    #[error("{0} --reserve-iova windows: at most 64 (merge adjacent windows into one)")]
    TooManyWindows(usize),
    #[error("{0}")]
    Socket(#[from] socket::SocketError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Path(PathBuf),
    Fd(RawFd),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    Emulated(EmulatedKind),
    Vfio {
        bdf: String,
        mediate_bars: bool,
        allow_unsafe_interrupts: bool,
    },
}

impl std::fmt::Display for DeviceKind {
    /// The name the device goes by in logs (as `Device::name`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceKind::Emulated(EmulatedKind::Edu) => write!(f, "edu"),
            DeviceKind::Vfio { bdf, .. } => write!(f, "vfio {bdf}"),
        }
    }
}

/// Normalizes a PCI address to DDDD:BB:DD.F (a missing domain is 0000).
pub fn parse_bdf(s: &str) -> Result<String, ConfigError> {
    let bad = || ConfigError::BadAddress(s.to_string());
    let full = if s.matches(':').count() == 1 {
        format!("0000:{s}")
    } else {
        s.to_string()
    };
    let (head, func) = full.rsplit_once('.').ok_or_else(bad)?;
    let parts: Vec<&str> = head.split(':').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    if parts.len() != 3
        || !hex(parts[0], 4)
        || !hex(parts[1], 2)
        || !hex(parts[2], 2)
        || !matches!(func, "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7")
    {
        return Err(bad());
    }
    Ok(full.to_ascii_lowercase())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Config {
    PrintCapabilities,
    /// The backend description naming this binary (None: the running one).
    PrintBackendJson(Option<String>),
    PrintMan,
    PrintCompletions(clap_complete::Shell),
    Serve {
        listen: Listen,
        /// Who may connect to a socket airlock creates.
        access: SocketAccess,
        device: DeviceKind,
        max_data_xfer: u64,
        /// --poll-us.
        poll_us: u32,
        /// None: --sandbox off.
        sandbox: Option<SandboxConfig>,
        /// --reserve-iova windows.
        windows: Vec<crate::iova::DoorbellWindow>,
    },
    PrintQemuArgs {
        listen: Listen,
        device: DeviceKind,
        windows: Vec<crate::iova::DoorbellWindow>,
        /// None with --no-guest-ram.
        guest_ram: Option<String>,
        flavor: crate::qemu_args::QemuFlavor,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    pub user: Option<(u32, u32)>,
    pub memlock: Option<u64>,
    pub fault: Option<Fault>,
}

fn parse_user(s: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || ConfigError::BadUser(s.to_string());
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

/// The device to serve: --emulate, --vfio, or --device's one word.
fn device_kind(a: &Args) -> Result<DeviceKind, ConfigError> {
    let (emulate, vfio) = match a.device.as_deref() {
        Some("edu") => (Some(EmulatedKind::Edu), None),
        Some(bdf) => (None, Some(bdf.to_string())),
        None => (a.emulate, a.vfio.clone()),
    };
    match (emulate, vfio) {
        (Some(kind), None) => Ok(DeviceKind::Emulated(kind)),
        (None, Some(bdf)) => Ok(DeviceKind::Vfio {
            bdf: parse_bdf(&bdf)?,
            mediate_bars: a.mediate_bars,
            allow_unsafe_interrupts: a.allow_unsafe_interrupts,
        }),
        _ => Err(ConfigError::NoDevice),
    }
}

/// The sandbox's settings (None: --sandbox off).
fn sandbox_config(a: &Args) -> Result<Option<SandboxConfig>, ConfigError> {
    #[cfg(feature = "fault-injection")]
    let fault = a.inject_fault;
    #[cfg(not(feature = "fault-injection"))]
    let fault = None;
    let user = a.user.as_deref().map(parse_user).transpose()?;
    match a.sandbox {
        SandboxMode::On => Ok(Some(SandboxConfig {
            user,
            memlock: a.memlock,
            fault,
        })),
        SandboxMode::Off if user.is_some() => Err(ConfigError::UserWithoutSandbox),
        SandboxMode::Off => Ok(None),
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Config, ConfigError> {
        if a.print_capabilities {
            return Ok(Config::PrintCapabilities);
        }
        if let Some(b) = a.print_backend_json {
            return Ok(Config::PrintBackendJson((!b.is_empty()).then_some(b)));
        }
        if a.print_man {
            return Ok(Config::PrintMan);
        }
        if let Some(shell) = a.print_completions {
            return Ok(Config::PrintCompletions(shell));
        }
        let listen = match (a.socket_path.clone(), a.fd) {
            (Some(p), None) => Listen::Path(p),
            (None, Some(fd)) if fd >= 3 => Listen::Fd(fd),
            (None, Some(fd)) => return Err(ConfigError::BadFd(fd)),
            _ => return Err(ConfigError::Listen),
        };
        let access = SocketAccess::parse(
            a.socket_group.as_deref(),
            a.socket_mode.as_deref(),
            matches!(listen, Listen::Path(_)),
        )?;
        let device = device_kind(&a)?;
        if !(4096..=64 << 20).contains(&a.max_data_xfer) {
            return Err(ConfigError::BadXfer(a.max_data_xfer));
        }
        let sandbox = sandbox_config(&a)?;
        // Each window can split a usable range; patched QEMU takes at most
        // 256 ranges in a VERSION reply.
        if a.reserve_iova.len() > MAX_RESERVED_WINDOWS {
            return Err(ConfigError::TooManyWindows(a.reserve_iova.len()));
        }
        let windows = a
            .reserve_iova
            .iter()
            .map(|w| crate::iova::parse_reserve(w))
            .collect::<Result<Vec<_>, _>>()?;
        if a.print_qemu_args {
            return Ok(Config::PrintQemuArgs {
                listen,
                device,
                windows,
                guest_ram: (!a.no_guest_ram).then_some(a.guest_ram),
                flavor: a.qemu,
            });
        }
        Ok(Config::Serve {
            listen,
            access,
            device,
            max_data_xfer: a.max_data_xfer,
            poll_us: a.poll_us,
            sandbox,
            windows,
        })
    }
}

/// Where the backend description is installed (docs/interop/vfio-user.rst,
/// Backend Program Conventions), and its name there.
pub const BACKEND_JSON_PATH: &str = "/usr/share/vfio-user/50-airlock.json";

/// The backend description: docs/interop/vhost-user.json's VhostUserBackend
/// shape (the vfio-user conventions mirror it; their schema is a TODO), with
/// the device type QEMU's -device takes.
pub fn backend_json(binary: &str) -> serde_json::Value {
    serde_json::json!({
        "description": "airlock: sandboxed vfio-user PCI device backend (VFIO passthrough, emulated edu)",
        "type": "vfio-user-pci",
        "binary": binary,
        "tags": ["airlock", "vfio-passthrough", "emulated-edu", "sandbox"]
    })
}

/// The --print-capabilities JSON (vhost-user backend program convention).
pub fn capabilities_json() -> serde_json::Value {
    serde_json::json!({
        "type": "vfio-user-pci",
        "protocol": "0.0",
        "version": env!("CARGO_PKG_VERSION"),
        "devices": { "emulate": ["edu"], "vfio": true },
        "features": ["socket-path", "fd", "dma-map-fd", "dma-messages", "intx", "msi", "msix",
                     "reset", "write-multiple", "posted-writes", "vfio-mmap-fast-path",
                     "mediate-bars", "irqfd-passthrough", "sandbox",
                     "reserve-iova", "iova-ranges", "msi-isolation-check", "print-qemu-args",
                     "socket-group", "device-request"]
    })
}
