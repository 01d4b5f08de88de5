//! Command-line arguments, validated into a Config before anything starts.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EmulatedKind {
    /// Register-compatible with QEMU's edu device, plus MSI-X.
    Edu,
}

/// At most this many --reserve-iova windows.
const MAX_RESERVED_WINDOWS: usize = 64;

/// `airlock --help`'s closing text: what people run.
const EXAMPLES: &str = "\
Examples:
  airlock --socket-path /run/airlock/edu.sock --emulate edu
      serve the emulated edu (no hardware needed)
  airlock --socket-path /run/airlock/nic0.sock --vfio 0000:03:00.0 --memlock 4294967296
      pass a PCI device bound to vfio-pci through to a 4 GiB guest
  airlock --print-qemu-args --socket-path /run/airlock/edu.sock --emulate edu
      print the QEMU arguments that connect a guest to it
  systemctl enable --now airlock@edu.socket
      the same under systemd (backend/systemd/airlock@.socket, airlock@.service)

QEMU side (guest RAM must be a shared memfd so DMA can reach it):
  -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem
  -device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"/run/airlock/edu.sock\"}}'

Signals, and what each keeps:
  SIGTERM, SIGINT   stop: the device is quiesced, the socket path removed. Under a systemd
                    whose fd store keeps the device (--vfio, FileDescriptorStoreMax=4 or more):
                    the device stays open in the store; systemctl restart (or Restart= after
                    a crash) hands it to the next airlock as it was, systemctl stop releases
                    it and vfio-pci quiesces and resets it
  SIGUSR2           live upgrade (systemctl reload): start the airlock binary at the path this
                    one was started from beside it (same arguments), hand it the listening
                    socket and, with --vfio, the open device with its IOMMU mappings (no reset),
                    and exit once it serves (systemd hears MAINPID=). If it fails in any way
                    (exits, hangs, crashes within 2 s of serving, ignores the handover, speaks
                    another version), airlock kills it and serves on. Needs the sandbox
  kill -9 of the sandboxed server: the supervisor starts a fresh one; the device is kept

Environment:
  AIRLOCK_LOG   log filter in tracing's syntax (default info; e.g. debug, airlock::server=debug)
  LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES, NOTIFY_SOCKET, FDSTORE   systemd socket activation,
                notification and fd store
  AIRLOCK_UPGRADE   set by airlock for its successor on SIGUSR2 (the fds handed over); not for users";

#[derive(Parser, Debug)]
#[command(
    name = "airlock",
    version,
    about = "Out-of-process PCI device backend for QEMU, served over vfio-user",
    after_help = EXAMPLES)]
pub struct Args {
    /// Create a unix socket at PATH (a stale socket there is removed) and serve on it.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Serve on an already-listening unix socket inherited as fd N (launcher convention).
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,
    /// Serve an emulated device.
    #[arg(long, value_enum, value_name = "KIND", conflicts_with = "vfio")]
    pub emulate: Option<EmulatedKind>,
    /// Pass through the PCI device at this address (bound to vfio-pci), e.g. 0000:00:04.0.
    #[arg(long, value_name = "BDF")]
    pub vfio: Option<String>,
    /// The device as one word: `edu` (emulated) or a PCI address
    /// (passthrough). What the airlock@.service template passes from its
    /// instance name (airlock@edu, airlock@0000:03:00.0).
    #[arg(long, value_name = "edu|BDF", conflicts_with_all = ["emulate", "vfio"])]
    pub device: Option<String>,
    /// Never hand QEMU the device fd: every BAR access goes through airlock (no mmap fast path).
    #[arg(long, requires = "vfio")]
    pub mediate_bars: bool,
    /// Run even if the host cannot isolate the device's MSIs (no interrupt
    /// remapping, GICv2m): unsafe, the device can forge other devices' interrupts.
    #[arg(long, requires = "vfio")]
    pub allow_unsafe_interrupts: bool,
    /// Keep guest DMA out of this IOVA window too (e.g. the guest's own MSI
    /// doorbell); repeatable. START and SIZE in hex (0x...) or decimal.
    #[arg(long, value_name = "START:SIZE")]
    pub reserve_iova: Vec<String>,
    /// Print the QEMU arguments for this device and socket (one per line,
    /// comments start with #), then exit.
    #[arg(long)]
    pub print_qemu_args: bool,
    /// Guest RAM size for --print-qemu-args.
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    pub guest_ram: String,
    /// --print-qemu-args without the guest RAM arguments: for the second and
    /// later airlock of one VM (the first one's arguments set RAM up).
    #[arg(long, requires = "print_qemu_args", conflicts_with = "guest_ram")]
    pub no_guest_ram: bool,
    /// Which QEMU --print-qemu-args is for: stock (>= 10.1, -device with a
    /// JSON socket) or patched (qemu-patches/: -chardev socket + chardev=).
    #[arg(
        long,
        value_enum,
        value_name = "stock|patched",
        default_value = "stock"
    )]
    pub qemu: crate::qemu_args::QemuFlavor,
    /// Print a JSON description of device kinds and features, then exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Print airlock's man page (roff, generated from these options), then exit.
    #[arg(long)]
    pub print_man: bool,
    /// Print a shell completion script for SHELL, then exit.
    #[arg(long, value_enum, value_name = "SHELL")]
    pub print_completions: Option<clap_complete::Shell>,
    /// Confine the serving process (namespaces, empty root, no capabilities, seccomp).
    #[arg(long, value_enum, default_value_t = SandboxMode::On, value_name = "on|off")]
    pub sandbox: SandboxMode,
    /// Serve as this user and group instead of root (sandbox on only).
    #[arg(long, value_name = "UID:GID")]
    pub user: Option<String>,
    /// RLIMIT_MEMLOCK for the server: at least the guest RAM VFIO must pin
    /// (default: unlimited with --vfio, 0 with --emulate).
    #[arg(long, value_name = "BYTES")]
    pub memlock: Option<u64>,
    /// Test only: after confinement, attempt a forbidden operation.
    #[cfg(feature = "fault-injection")]
    #[arg(long, value_enum, value_name = "FAULT")]
    pub inject_fault: Option<Fault>,
    /// Largest data transfer per REGION/DMA message, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    pub max_data_xfer: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SandboxMode {
    On,
    Off,
}

/// Forbidden operations the fault-injection build can attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    OpenPasswd,
    SocketInet,
    Execve,
    Ptrace,
}

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
    PrintMan,
    PrintCompletions(clap_complete::Shell),
    Serve {
        listen: Listen,
        device: DeviceKind,
        max_data_xfer: u64,
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

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Config, ConfigError> {
        if a.print_capabilities {
            return Ok(Config::PrintCapabilities);
        }
        if a.print_man {
            return Ok(Config::PrintMan);
        }
        if let Some(shell) = a.print_completions {
            return Ok(Config::PrintCompletions(shell));
        }
        let listen = match (a.socket_path, a.fd) {
            (Some(p), None) => Listen::Path(p),
            (None, Some(fd)) if fd >= 3 => Listen::Fd(fd),
            (None, Some(fd)) => return Err(ConfigError::BadFd(fd)),
            _ => return Err(ConfigError::Listen),
        };
        let (emulate, vfio) = match a.device.as_deref() {
            Some("edu") => (Some(EmulatedKind::Edu), None),
            Some(bdf) => (None, Some(bdf.to_string())),
            None => (a.emulate, a.vfio),
        };
        let device = match (emulate, vfio) {
            (Some(kind), None) => DeviceKind::Emulated(kind),
            (None, Some(bdf)) => DeviceKind::Vfio {
                bdf: parse_bdf(&bdf)?,
                mediate_bars: a.mediate_bars,
                allow_unsafe_interrupts: a.allow_unsafe_interrupts,
            },
            _ => return Err(ConfigError::NoDevice),
        };
        if !(4096..=64 << 20).contains(&a.max_data_xfer) {
            return Err(ConfigError::BadXfer(a.max_data_xfer));
        }
        #[cfg(feature = "fault-injection")]
        let fault = a.inject_fault;
        #[cfg(not(feature = "fault-injection"))]
        let fault = None;
        let user = a.user.as_deref().map(parse_user).transpose()?;
        let sandbox = match a.sandbox {
            SandboxMode::On => Some(SandboxConfig {
                user,
                memlock: a.memlock,
                fault,
            }),
            SandboxMode::Off if user.is_some() => return Err(ConfigError::UserWithoutSandbox),
            SandboxMode::Off => None,
        };
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
            device,
            max_data_xfer: a.max_data_xfer,
            sandbox,
            windows,
        })
    }
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
                     "reserve-iova", "iova-ranges", "msi-isolation-check", "print-qemu-args"]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::try_from(
            Args::try_parse_from(std::iter::once("airlock").chain(args.iter().copied())).unwrap(),
        )
    }

    #[test]
    fn socket_path_and_edu_make_a_serve_config() {
        assert_eq!(
            parse(&["--socket-path", "/tmp/a.sock", "--emulate", "edu"]),
            Ok(Config::Serve {
                listen: Listen::Path("/tmp/a.sock".into()),
                device: DeviceKind::Emulated(EmulatedKind::Edu),
                max_data_xfer: 1 << 20,
                sandbox: Some(SandboxConfig {
                    user: None,
                    memlock: None,
                    fault: None
                }),
                windows: vec![],
            })
        );
    }

    #[test]
    fn device_names_edu_or_a_pci_address() {
        let dev = |d: &str| match parse(&["--fd", "3", "--device", d]) {
            Ok(Config::Serve { device, .. }) => Ok(device),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(dev("edu"), Ok(DeviceKind::Emulated(EmulatedKind::Edu)));
        assert!(
            matches!(dev("03:00.0"), Ok(DeviceKind::Vfio { bdf, .. }) if bdf == "0000:03:00.0")
        );
        assert!(matches!(dev("nic0"), Err(ConfigError::BadAddress(_))));
    }

    #[test]
    fn both_or_neither_listen_option_is_refused() {
        assert_eq!(parse(&["--emulate", "edu"]), Err(ConfigError::Listen));
        assert_eq!(
            parse(&["--socket-path", "/x", "--fd", "3", "--emulate", "edu"]),
            Err(ConfigError::Listen)
        );
    }

    #[test]
    fn stdio_fds_are_refused() {
        assert_eq!(
            parse(&["--fd", "1", "--emulate", "edu"]),
            Err(ConfigError::BadFd(1))
        );
    }

    #[test]
    fn a_device_is_required() {
        assert_eq!(parse(&["--socket-path", "/x"]), Err(ConfigError::NoDevice));
    }

    #[test]
    fn vfio_takes_a_pci_address_with_or_without_domain() {
        assert_eq!(
            parse(&["--socket-path", "/x", "--vfio", "00:04.0", "--mediate-bars"]),
            Ok(Config::Serve {
                listen: Listen::Path("/x".into()),
                device: DeviceKind::Vfio {
                    bdf: "0000:00:04.0".into(),
                    mediate_bars: true,
                    allow_unsafe_interrupts: false,
                },
                max_data_xfer: 1 << 20,
                sandbox: Some(SandboxConfig {
                    user: None,
                    memlock: None,
                    fault: None
                }),
                windows: vec![],
            })
        );
        assert_eq!(
            parse(&["--socket-path", "/x", "--vfio", "0000:00:04"]),
            Err(ConfigError::BadAddress("0000:00:04".into()))
        );
        assert_eq!(
            parse(&["--socket-path", "/x", "--vfio", "0000:0g:04.0"]),
            Err(ConfigError::BadAddress("0000:0g:04.0".into()))
        );
    }

    #[test]
    fn sandbox_is_on_by_default_and_user_needs_it() {
        let Ok(Config::Serve { sandbox, .. }) = parse(&[
            "--socket-path",
            "/x",
            "--emulate",
            "edu",
            "--user",
            "1000:100",
        ]) else {
            panic!("serve config expected")
        };
        assert_eq!(sandbox.unwrap().user, Some((1000, 100)));
        assert_eq!(
            parse(&[
                "--socket-path",
                "/x",
                "--emulate",
                "edu",
                "--sandbox",
                "off",
                "--user",
                "1:1"
            ]),
            Err(ConfigError::UserWithoutSandbox)
        );
        assert_eq!(
            parse(&["--socket-path", "/x", "--emulate", "edu", "--user", "bob"]),
            Err(ConfigError::BadUser("bob".into()))
        );
        let Ok(Config::Serve { sandbox, .. }) = parse(&[
            "--socket-path",
            "/x",
            "--emulate",
            "edu",
            "--sandbox",
            "off",
        ]) else {
            panic!("serve config expected")
        };
        assert!(sandbox.is_none());
    }

    #[test]
    fn print_capabilities_needs_nothing_else() {
        assert_eq!(
            parse(&["--print-capabilities"]),
            Ok(Config::PrintCapabilities)
        );
    }
}
