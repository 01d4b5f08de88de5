//! The command line as clap parses it; config/mod.rs validates it.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use super::EmulatedKind;

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
    /// Create a unix socket at PATH (a stale socket there is removed) and
    /// serve on it. It is created mode 0600, owned by airlock's user: a QEMU
    /// running as another user gets EACCES (Permission denied) until
    /// --socket-group lets it in.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Give the --socket-path socket to this group (a name or a number),
    /// mode 0660: a QEMU running in that group (e.g. libvirt-qemu) may connect.
    #[arg(long, value_name = "GROUP", requires = "socket_path")]
    pub socket_group: Option<String>,
    /// The --socket-path socket's mode, octal (default 0600, with
    /// --socket-group 0660); never writable by others.
    #[arg(long, value_name = "MODE", requires = "socket_path")]
    pub socket_mode: Option<String>,
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
    /// Print the backend description a management layer (libvirt) looks for
    /// under /usr/share/vfio-user/ (QEMU's vfio-user backend program
    /// conventions, shaped as docs/interop/vhost-user.json), naming BINARY
    /// (default: this airlock), then exit.
    #[arg(long, value_name = "BINARY", num_args = 0..=1, default_missing_value = "")]
    pub print_backend_json: Option<String>,
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
    /// After each message, poll the socket up to this many microseconds
    /// for the next one before sleeping (0: never). Spends up to that much
    /// CPU per message to save the wake-up a sleeping server pays, as QEMU's
    /// iothread poll-max-ns does: worth it for a guest behind a vIOMMU whose
    /// DMA_MAP/UNMAP messages follow each other closely.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub poll_us: u32,
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
