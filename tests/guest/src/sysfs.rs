//! Finding the edu-compatible PCI device in sysfs and binding it to vfio-pci.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PCI_DEVICES: &str = "/sys/bus/pci/devices";

fn read_trimmed(p: &Path) -> Result<String, String> {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("read {}: {e}", p.display()))
}

fn write_str(p: &Path, s: &str) -> Result<(), String> {
    fs::write(p, s).map_err(|e| format!("write {s:?} to {}: {e}", p.display()))
}

fn dev_dir(bdf: &str) -> PathBuf {
    Path::new(PCI_DEVICES).join(bdf)
}

/// Last path component of a sysfs symlink (driver name, group number).
fn link_name(p: &Path) -> Option<String> {
    let t = fs::read_link(p).ok()?;
    Some(t.file_name()?.to_string_lossy().into_owned())
}

/// The first device with the given vendor:device id, by sorted BDF.
pub fn find_device(vendor: u16, device: u16) -> Result<String, String> {
    let mut bdfs: Vec<String> = fs::read_dir(PCI_DEVICES)
        .map_err(|e| format!("read_dir {PCI_DEVICES}: {e}"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    bdfs.sort();
    let want = (format!("{vendor:#06x}"), format!("{device:#06x}"));
    for bdf in bdfs {
        let d = dev_dir(&bdf);
        let v = read_trimmed(&d.join("vendor")).unwrap_or_default();
        let i = read_trimmed(&d.join("device")).unwrap_or_default();
        if v == want.0 && i == want.1 {
            return Ok(bdf);
        }
    }
    Err(format!(
        "no PCI device {vendor:04x}:{device:04x} in {PCI_DEVICES}"
    ))
}

pub fn driver(bdf: &str) -> Option<String> {
    link_name(&dev_dir(bdf).join("driver"))
}

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Makes vfio-pci the driver of `bdf` (unbinding any other driver first).
pub fn bind_vfio_pci(bdf: &str, timeout: Duration) -> Result<(), String> {
    let d = dev_dir(bdf);
    if !d.exists() {
        return Err(format!("{} does not exist", d.display()));
    }
    if driver(bdf).as_deref() == Some("vfio-pci") {
        return Ok(());
    }
    if !Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
        return Err("vfio-pci driver is not loaded (/sys/bus/pci/drivers/vfio-pci missing)".into());
    }
    write_str(&d.join("driver_override"), "vfio-pci")?;
    if let Some(old) = driver(bdf) {
        crate::report::info(&format!("unbinding {bdf} from {old}"));
        write_str(&d.join("driver").join("unbind"), bdf)?;
    }
    write_str(Path::new("/sys/bus/pci/drivers_probe"), bdf)?;
    match wait_for(timeout, || driver(bdf).filter(|d| d == "vfio-pci")) {
        Some(_) => Ok(()),
        None => Err(format!(
            "{bdf} not bound to vfio-pci after drivers_probe (driver: {:?})",
            driver(bdf)
        )),
    }
}

/// The IOMMU group number, waiting until /dev/vfio/N exists.
pub fn iommu_group(bdf: &str, timeout: Duration) -> Result<u32, String> {
    let link = dev_dir(bdf).join("iommu_group");
    let name = wait_for(timeout, || link_name(&link))
        .ok_or_else(|| format!("{} missing: device has no IOMMU group", link.display()))?;
    let n: u32 = name
        .parse()
        .map_err(|_| format!("iommu_group link points at {name:?}, not a number"))?;
    let dev = format!("/dev/vfio/{n}");
    wait_for(timeout, || Path::new(&dev).exists().then_some(()))
        .ok_or_else(|| format!("{dev} did not appear"))?;
    Ok(n)
}
