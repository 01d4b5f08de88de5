//! `airlock --print-qemu-args`: the QEMU arguments that connect a guest to
//! this airlock, one argument per line (no shell quoting needed: read them
//! into an argv with `mapfile`), comments starting with '#'.

use std::fmt::Write;

use crate::config::Listen;
use crate::msi::DoorbellWindow;

/// Which QEMU the arguments are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuFlavor {
    /// Stock QEMU >= 10.1: `-device` with a JSON `socket` object.
    Stock,
    /// QEMU with airlock's qemu-patches/: `-chardev socket` + `chardev=`,
    /// and the guest's vIOMMU learns the IOVA windows from airlock.
    Patched,
}

/// The chardev id the patched form uses.
const CHARDEV_ID: &str = "airlock0";

/// Arguments for stock QEMU (with the patched QEMU's -chardev form as a comment).
pub fn qemu_args(
    listen: &Listen,
    device: &str,
    windows: &[DoorbellWindow],
    guest_ram: &str,
) -> String {
    qemu_args_for(listen, device, windows, guest_ram, QemuFlavor::Stock)
}

pub fn qemu_args_for(
    listen: &Listen,
    device: &str,
    windows: &[DoorbellWindow],
    guest_ram: &str,
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
    let mut args = vec![
        "-object".to_string(),
        format!("memory-backend-memfd,id=airlock-mem,size={guest_ram},share=on"),
        "-m".to_string(),
        guest_ram.to_string(),
        "-machine".to_string(),
        "memory-backend=airlock-mem".to_string(),
    ];
    // QEMU's option parser splits on ',': a comma in the path is doubled.
    let chardev = format!("socket,id={CHARDEV_ID},path={}", path.replace(',', ",,"));
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
            format!("vfio-user-pci,chardev={CHARDEV_ID}"),
        ]),
    }
    for a in args {
        let _ = writeln!(o, "{a}");
    }
    if flavor == QemuFlavor::Stock {
        let _ = writeln!(
            o,
            "# With the patched QEMU (qemu-patches/), instead of -device: -chardev {chardev} -device vfio-user-pci,chardev={CHARDEV_ID}"
        );
    }
    if windows.is_empty() {
        let _ = writeln!(o, "# No IOVA windows to avoid.");
        return o;
    }
    let _ = writeln!(
        o,
        "# IOVA windows guest DMA must avoid (airlock refuses a DMA_MAP that overlaps one):"
    );
    for w in windows {
        let _ = writeln!(o, "#   {w}: {}", w.meaning());
    }
    let _ = writeln!(o, "# Without a vIOMMU, guest-physical addresses are the IOVAs: keep guest RAM out of these windows.");
    if flavor == QemuFlavor::Patched {
        let _ = writeln!(
            o,
            "# With a vIOMMU (-device virtio-iommu-pci), this QEMU learns the windows from airlock (iova_ranges)"
        );
        let _ = writeln!(
            o,
            "# and reports them to the guest as reserved regions of the device; it refuses DMA maps into them."
        );
        return o;
    }
    let _ = writeln!(
        o,
        "# With a vIOMMU, stock QEMU cannot keep the guest's IOVAs out of them (the machine sets"
    );
    let _ = writeln!(
        o,
        "# virtio-iommu's reserved regions itself); a client proposing the iova_ranges capability"
    );
    let _ = writeln!(o, "# learns the usable ranges from airlock.");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_one_per_line_and_windows_are_comments() {
        let w = crate::msi::parse_reserve("0x8000000:0x100000").unwrap();
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
            "# With the patched QEMU (qemu-patches/), instead of -device: -chardev socket,id=airlock0,path=/run/a.sock -device vfio-user-pci,chardev=airlock0"
        ));
    }

    #[test]
    fn the_patched_qemu_connects_through_a_chardev_and_learns_the_windows() {
        let w = crate::msi::parse_reserve("0x8000000:0x100000").unwrap();
        let listen = Listen::Path("/run/a,b.sock".into());
        let out = qemu_args_for(&listen, "edu", &[w], "1G", QemuFlavor::Patched);
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
                "socket,id=airlock0,path=/run/a,,b.sock",
                "-device",
                "vfio-user-pci,chardev=airlock0"
            ]
        );
        assert!(out.contains("reserved regions of the device"));
        assert!(!out.contains("stock QEMU cannot"));
    }
}
