//! Before VFIO is asked anything: the common mistakes, each caught with a
//! sentence that names the fix. The device exists, is bound to vfio-pci,
//! has an IOMMU group whose every device is safe to hand to VFIO (the
//! kernel's "viable" rule), and /dev/vfio/<group> exists and can be opened.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::VfioError;

/// Drivers a group's other devices may have without making the group
/// unviable: VFIO's own, pci-stub, and PCIe port/bridge drivers (the
/// kernel's vfio_dev_driver_allowed), or none.
const HARMLESS_DRIVERS: &[&str] = &["vfio-pci", "pci-stub", "pcieport", "none"];

/// Where sysfs and /dev are (the real roots; tests use a fake tree).
pub struct Roots {
    pub sys: PathBuf,
    pub dev: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            sys: "/sys".into(),
            dev: "/dev".into(),
        }
    }
}

fn driver_of(dev: &Path) -> String {
    std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "none".into())
}

/// Runs the checks; returns the device's sysfs path and its IOMMU group.
pub fn check(roots: &Roots, bdf: &str) -> Result<(PathBuf, String), VfioError> {
    let path = roots.sys.join("bus/pci/devices").join(bdf);
    if !path.exists() {
        return Err(VfioError::NoDevice { bdf: bdf.into() });
    }
    let driver = driver_of(&path);
    if driver != "vfio-pci" {
        return Err(VfioError::NotVfioPci {
            bdf: bdf.into(),
            driver,
        });
    }
    let group = std::fs::read_link(path.join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or(VfioError::NoIommuGroup { bdf: bdf.into() })?;
    let members = roots
        .sys
        .join("kernel/iommu_groups")
        .join(&group)
        .join("devices");
    if let Ok(dir) = std::fs::read_dir(&members) {
        let mut bad: Vec<String> = dir
            .filter_map(|e| e.ok())
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let drv = driver_of(&e.path());
                (name, drv)
            })
            .filter(|(_, drv)| !HARMLESS_DRIVERS.contains(&drv.as_str()))
            .map(|(name, drv)| format!("{name} (bound to {drv})"))
            .collect();
        if !bad.is_empty() {
            bad.sort();
            return Err(VfioError::GroupNotViable {
                bdf: bdf.into(),
                group,
                others: bad.join(", "),
            });
        }
    }
    let node = roots.dev.join("vfio").join(&group);
    if !node.exists() {
        return Err(VfioError::NoGroupNode {
            bdf: bdf.into(),
            node,
        });
    }
    let c = CString::new(node.as_os_str().as_bytes()).map_err(|_| VfioError::NoGroupNode {
        bdf: bdf.into(),
        node: node.clone(),
    })?;
    // SAFETY: access reads a NUL-terminated path we own.
    if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        return Err(VfioError::GroupPermission {
            bdf: bdf.into(),
            node,
            // SAFETY: geteuid has no arguments.
            uid: unsafe { libc::geteuid() },
        });
    }
    Ok((path, group))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs + /dev under a temporary directory, removed on drop.
    struct Fake {
        roots: Roots,
        dir: std::path::PathBuf,
    }

    impl std::ops::Deref for Fake {
        type Target = Roots;
        fn deref(&self) -> &Roots {
            &self.roots
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A fake sysfs + /dev: `devices` as (bdf, driver or "", group).
    fn tree(tag: &str, devices: &[(&str, &str, &str)], nodes: &[&str]) -> Fake {
        let root =
            std::env::temp_dir().join(format!("airlock-preflight-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        for (bdf, driver, group) in devices {
            let d = sys.join("bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&d).unwrap();
            if !driver.is_empty() {
                let drv = sys.join("bus/pci/drivers").join(driver);
                std::fs::create_dir_all(&drv).unwrap();
                std::os::unix::fs::symlink(&drv, d.join("driver")).unwrap();
            }
            let g = sys.join("kernel/iommu_groups").join(group);
            std::fs::create_dir_all(g.join("devices")).unwrap();
            std::os::unix::fs::symlink(&g, d.join("iommu_group")).unwrap();
            let _ = std::os::unix::fs::symlink(&d, g.join("devices").join(bdf));
        }
        std::fs::create_dir_all(dev.join("vfio")).unwrap();
        for n in nodes {
            std::fs::write(dev.join("vfio").join(n), b"").unwrap();
        }
        Fake {
            roots: Roots { sys, dev },
            dir: root,
        }
    }

    #[test]
    fn a_missing_device_names_lspci() {
        let r = tree("missing", &[], &[]);
        let e = check(&r, "0000:03:00.0").unwrap_err().to_string();
        assert!(
            e.contains("no such PCI device") && e.contains("lspci -D"),
            "{e}"
        );
    }

    #[test]
    fn a_device_bound_elsewhere_names_the_driver_and_the_bind_commands() {
        let r = tree("unbound", &[("0000:03:00.0", "e1000e", "7")], &["7"]);
        let e = check(&r, "0000:03:00.0").unwrap_err().to_string();
        assert!(e.contains("\"e1000e\", not vfio-pci"), "{e}");
        assert!(
            e.contains("driver_override") && e.contains("drivers_probe"),
            "{e}"
        );
    }

    #[test]
    fn a_group_with_a_device_bound_elsewhere_is_not_viable_and_says_which() {
        let r = tree(
            "viable",
            &[
                ("0000:03:00.0", "vfio-pci", "7"),
                ("0000:03:00.1", "snd_hda_intel", "7"),
                ("0000:00:1c.0", "pcieport", "7"),
            ],
            &["7"],
        );
        let e = check(&r, "0000:03:00.0").unwrap_err().to_string();
        assert!(e.contains("IOMMU group 7 is not viable"), "{e}");
        assert!(e.contains("0000:03:00.1 (bound to snd_hda_intel)"), "{e}");
        assert!(!e.contains("pcieport"), "bridges are harmless: {e}");
    }

    #[test]
    fn a_missing_group_node_says_to_load_vfio() {
        let r = tree("node", &[("0000:03:00.0", "vfio-pci", "7")], &[]);
        let e = check(&r, "0000:03:00.0").unwrap_err().to_string();
        assert!(
            e.contains("/vfio/7") && e.contains("modprobe vfio-pci"),
            "{e}"
        );
    }

    #[test]
    fn a_group_node_we_cannot_open_names_the_permission_fix() {
        let r = tree("perm", &[("0000:03:00.0", "vfio-pci", "7")], &["7"]);
        let node = r.dev.join("vfio/7");
        std::fs::set_permissions(&node, std::os::unix::fs::PermissionsExt::from_mode(0o000))
            .unwrap();
        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } == 0 {
            // root passes access(2) on any file: the check itself is what
            // can be made here; the message is pinned through the error.
            let e = VfioError::GroupPermission {
                bdf: "0000:03:00.0".into(),
                node,
                uid: 1000,
            }
            .to_string();
            assert!(e.contains("no permission") && e.contains("chown"), "{e}");
            return;
        }
        let e = check(&r, "0000:03:00.0").unwrap_err().to_string();
        assert!(e.contains("no permission") && e.contains("chown"), "{e}");
    }

    #[test]
    fn a_bound_device_in_a_clean_group_passes() {
        let r = tree("ok", &[("0000:03:00.0", "vfio-pci", "7")], &["7"]);
        let (_, group) = check(&r, "0000:03:00.0").unwrap();
        assert_eq!(group, "7");
    }
}
