//! `airlock --print-qemu-args`: the QEMU arguments that connect a guest to
//! this airlock, one argument per line (no shell quoting needed: read them
//! into an argv with `mapfile`), comments starting with '#'.

use std::fmt::Write;

use crate::config::Listen;
use crate::iova::DoorbellWindow;

/// Which QEMU the arguments are for (`--qemu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QemuFlavor {
    /// Stock QEMU >= 10.1: `-device` with a JSON `socket` object.
    Stock,
    /// QEMU with airlock's qemu-patches/: `-chardev socket` + `chardev=`,
    /// and the guest's vIOMMU learns the IOVA windows from airlock.
    Patched,
}

/// How often the patched QEMU's chardev retries a lost connection.
pub const RECONNECT_MS: u32 = 100;

/// The chardev id the patched form uses: named after the socket, so the
/// arguments of several airlocks compose in one QEMU command line.
fn chardev_id(listen: &Listen) -> String {
    let stem = match listen {
        Listen::Path(p) => p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        Listen::Fd(_) => String::new(),
    };
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "airlock0".into()
    } else {
        format!("airlock-{clean}")
    }
}

/// Arguments for stock QEMU (with the patched QEMU's -chardev form as a comment).
pub fn qemu_args(
    listen: &Listen,
    device: &str,
    windows: &[DoorbellWindow],
    guest_ram: &str,
) -> String {
    qemu_args_for(listen, device, windows, Some(guest_ram), QemuFlavor::Stock)
}

/// `guest_ram` None: another device's arguments already set up the shared
/// guest RAM (--no-guest-ram), so only this device's arguments are printed.
pub fn qemu_args_for(
    listen: &Listen,
    device: &str,
    windows: &[DoorbellWindow],
    guest_ram: Option<&str>,
    flavor: QemuFlavor,
) -> String {
    let path = match listen {
        Listen::Path(p) => p.display().to_string(),
        Listen::Fd(fd) => format!("<the path of the socket passed as fd {fd}>"),
    };
    let mut o = String::new();
    let which = match flavor {
        QemuFlavor::Stock => "QEMU >= 10.1",
        QemuFlavor::Patched => "QEMU with airlock's qemu-patches/ (scripts/setup-qemu-patched.sh)",
    };
    let _ = writeln!(
        o,
        "# {which} arguments for airlock serving {device} on {path}; one argument per line."
    );
    let _ = writeln!(o, "# Guest RAM must be a shared memfd so airlock can map it for DMA (and pin it into the IOMMU with --vfio).");
    let _ = writeln!(
        o,
        "# Combine with your machine type (-M q35, -M virt,gic-version=3,its=on, ...)."
    );
    let mut args = Vec::new();
    match guest_ram {
        Some(ram) => args.extend([
            "-object".to_string(),
            format!("memory-backend-memfd,id=airlock-mem,size={ram},share=on"),
            "-m".to_string(),
            ram.to_string(),
            "-machine".to_string(),
            "memory-backend=airlock-mem".to_string(),
        ]),
        None => {
            let _ = writeln!(
                o,
                "# Guest RAM: set up once, by the first device's arguments (printed without --no-guest-ram)."
            );
        }
    }
    device_args(&mut o, &mut args, &chardev_id(listen), &path, flavor);
    window_comments(&mut o, windows, flavor);
    o
}

/// The device's arguments (appended to `args`, then everything written
/// to `o`), and for stock QEMU the patched form as a comment.
fn device_args(o: &mut String, args: &mut Vec<String>, id: &str, path: &str, flavor: QemuFlavor) {
    // QEMU's option parser splits on ',': a comma in the path is doubled.
    // reconnect-ms: the patched QEMU keeps the device across a restart of
    // airlock's server (or of airlock) and replays its state to the new one;
    // 100 ms bounds the outage without a busy retry loop.
    let chardev = format!(
        "socket,id={id},path={},reconnect-ms={RECONNECT_MS}",
        path.replace(',', ",,")
    );
    match flavor {
        QemuFlavor::Stock => args.extend([
            "-device".to_string(),
            serde_json::json!({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": path}})
                .to_string(),
        ]),
        QemuFlavor::Patched => args.extend([
            "-chardev".to_string(),
            chardev.clone(),
            "-device".to_string(),
            format!("vfio-user-pci,chardev={id}"),
        ]),
    }
    for a in args.iter() {
        let _ = writeln!(o, "{a}");
    }
    if flavor == QemuFlavor::Stock {
        let _ = writeln!(
            o,
            "# With the patched QEMU (qemu-patches/), instead of -device: -chardev {chardev} -device vfio-user-pci,chardev={id}"
        );
    }
}

/// The IOVA windows guest DMA must avoid, as comments, and how each QEMU
/// flavour keeps a vIOMMU's IOVAs out of them.
fn window_comments(o: &mut String, windows: &[DoorbellWindow], flavor: QemuFlavor) {
    if windows.is_empty() {
        let _ = writeln!(o, "# No IOVA windows to avoid.");
        return;
    }
    let _ = writeln!(
        o,
        "# IOVA windows guest DMA must avoid (airlock refuses a DMA_MAP that overlaps one):"
    );
    for w in windows {
        let _ = writeln!(o, "#   {w}: {}", w.meaning());
    }
    let _ = writeln!(o, "# Without a vIOMMU, guest-physical addresses are the IOVAs: keep guest RAM out of these windows.");
    let lines: &[&str] = match flavor {
        QemuFlavor::Patched => &[
            "# With a vIOMMU (-device virtio-iommu-pci), this QEMU learns the windows from airlock (iova_ranges)",
            "# and reports them to the guest as reserved regions of the device; it refuses DMA maps into them.",
        ],
        QemuFlavor::Stock => &[
            "# With a vIOMMU, stock QEMU cannot keep the guest's IOVAs out of them (the machine sets",
            "# virtio-iommu's reserved regions itself); a client proposing the iova_ranges capability",
            "# learns the usable ranges from airlock.",
        ],
    };
    for l in lines {
        let _ = writeln!(o, "{l}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_one_per_line_and_windows_are_comments() {
        let w = crate::iova::parse_reserve("0x8000000:0x100000").unwrap();
        let out = qemu_args(&Listen::Path("/run/a.sock".into()), "edu", &[w], "512M");
        let args: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            args,
            vec![
                "-object",
                "memory-backend-memfd,id=airlock-mem,size=512M,share=on",
                "-m",
                "512M",
                "-machine",
                "memory-backend=airlock-mem",
                "-device",
                r#"{"driver":"vfio-user-pci","socket":{"path":"/run/a.sock","type":"unix"}}"#
            ]
        );
        assert!(out.contains("#   0x8000000-0x80fffff (user (--reserve-iova), user)"));
        assert!(out.contains(
            "# With the patched QEMU (qemu-patches/), instead of -device: -chardev socket,id=airlock-a,path=/run/a.sock,reconnect-ms=100 -device vfio-user-pci,chardev=airlock-a"
        ));
    }

    #[test]
    fn the_patched_qemu_connects_through_a_chardev_and_learns_the_windows() {
        let w = crate::iova::parse_reserve("0x8000000:0x100000").unwrap();
        let listen = Listen::Path("/run/a,b.sock".into());
        let out = qemu_args_for(&listen, "edu", &[w], Some("1G"), QemuFlavor::Patched);
        let args: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            args,
            vec![
                "-object",
                "memory-backend-memfd,id=airlock-mem,size=1G,share=on",
                "-m",
                "1G",
                "-machine",
                "memory-backend=airlock-mem",
                "-chardev",
                "socket,id=airlock-a_b,path=/run/a,,b.sock,reconnect-ms=100",
                "-device",
                "vfio-user-pci,chardev=airlock-a_b"
            ]
        );
        assert!(out.contains("reserved regions of the device"));
        assert!(!out.contains("stock QEMU cannot"));
    }

    #[test]
    fn the_arguments_of_two_devices_compose_in_one_command_line() {
        let first = qemu_args_for(
            &Listen::Path("/run/airlock/edu1.sock".into()),
            "edu",
            &[],
            Some("1G"),
            QemuFlavor::Patched,
        );
        let second = qemu_args_for(
            &Listen::Path("/run/airlock/edu2.sock".into()),
            "edu",
            &[],
            None,
            QemuFlavor::Patched,
        );
        let all: Vec<&str> = first
            .lines()
            .chain(second.lines())
            .filter(|l| !l.starts_with('#'))
            .collect();
        assert_eq!(
            all.iter().filter(|a| **a == "-object").count(),
            1,
            "guest RAM once"
        );
        assert!(
            all.contains(&"socket,id=airlock-edu1,path=/run/airlock/edu1.sock,reconnect-ms=100")
        );
        assert!(all.contains(&"vfio-user-pci,chardev=airlock-edu2"));
    }
}
