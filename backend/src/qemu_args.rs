//! `airlock --print-qemu-args`: the QEMU arguments that connect a guest to
//! this airlock, one argument per line (no shell quoting needed: read them
//! into an argv with `mapfile`), comments starting with '#'.

use std::fmt::Write;

use crate::config::Listen;
use crate::msi::DoorbellWindow;

pub fn qemu_args(
    listen: &Listen,
    device: &str,
    windows: &[DoorbellWindow],
    guest_ram: &str,
) -> String {
    let path = match listen {
        Listen::Path(p) => p.display().to_string(),
        Listen::Fd(fd) => format!("<the path of the socket passed as fd {fd}>"),
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# QEMU >= 10.1 arguments for airlock serving {device} on {path}; one argument per line."
    );
    let _ = writeln!(o, "# Guest RAM must be a shared memfd so airlock can map it for DMA (and pin it into the IOMMU with --vfio).");
    let _ = writeln!(
        o,
        "# Combine with your machine type (-M q35, -M virt,gic-version=3,its=on, ...)."
    );
    for a in [
        "-object".to_string(),
        format!("memory-backend-memfd,id=airlock-mem,size={guest_ram},share=on"),
        "-m".to_string(),
        guest_ram.to_string(),
        "-machine".to_string(),
        "memory-backend=airlock-mem".to_string(),
        "-device".to_string(),
        serde_json::json!({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": path}})
            .to_string(),
    ] {
        let _ = writeln!(o, "{a}");
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
    }
}
