//! Attaching the device's IOMMU group, with the host's MSI isolation
//! checked by the kernel's own rule.
//!
//! VFIO refuses a group whose MSIs the host cannot isolate (no interrupt
//! remapping on x86, a GICv2m-style frame on ARM) unless the module
//! parameter vfio_iommu_type1.allow_unsafe_interrupts is set. airlock
//! attaches with the parameter off: success proves isolation. If that
//! fails and a retry with it on succeeds, the host cannot isolate MSIs:
//! airlock refuses unless --allow-unsafe-interrupts. The parameter is
//! restored right after (it is only read at attach time).

use std::path::Path;
use std::sync::Arc;

use tracing::warn;
use vfio_ioctls::{VfioContainer, VfioDevice};

use super::VfioError;

const PARAM: &str = "/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts";

/// Whether MSIs from the device are isolated from other devices'.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiIsolation {
    Isolated,
    /// Running anyway because of --allow-unsafe-interrupts.
    Unsafe,
    /// The parameter could not be read or written: not checked.
    Unverified,
}

fn read_param() -> Option<bool> {
    let v = std::fs::read_to_string(PARAM).ok()?;
    Some(v.trim() == "Y" || v.trim() == "1")
}

fn write_param(on: bool) -> bool {
    std::fs::write(PARAM, if on { "1" } else { "0" }).is_ok()
}

fn attach(
    bdf: &str,
    path: &Path,
    group: &str,
) -> Result<(Arc<VfioContainer>, VfioDevice), VfioError> {
    let container = Arc::new(VfioContainer::new(None).map_err(|e| VfioError::Container {
        bdf: bdf.into(),
        why: format!("{e}"),
    })?);
    let device = VfioDevice::new(path, container.clone()).map_err(|e| VfioError::Attach {
        bdf: bdf.into(),
        group: group.into(),
        why: format!("{e}"),
    })?;
    Ok((container, device))
}

pub fn attach_checked(
    bdf: &str,
    path: &Path,
    group: &str,
    allow_unsafe: bool,
) -> Result<(Arc<VfioContainer>, VfioDevice, MsiIsolation), VfioError> {
    let Some(prev) = read_param() else {
        let (c, d) = attach(bdf, path, group)?;
        return Ok((c, d, MsiIsolation::Unverified));
    };
    if prev && !write_param(false) {
        let (c, d) = attach(bdf, path, group)?;
        return Ok((c, d, MsiIsolation::Unverified));
    }
    let strict = attach(bdf, path, group);
    let result = match strict {
        Ok((c, d)) => Ok((c, d, MsiIsolation::Isolated)),
        Err(strict_err) => {
            if !write_param(true) {
                Err(strict_err)
            } else {
                match attach(bdf, path, group) {
                    Ok((c, d)) if allow_unsafe => {
                        warn!("vfio {bdf}: the host cannot isolate this device's MSIs; continuing because of --allow-unsafe-interrupts");
                        Ok((c, d, MsiIsolation::Unsafe))
                    }
                    Ok(_) => Err(VfioError::UnsafeInterrupts { bdf: bdf.into() }),
                    Err(_) => Err(strict_err),
                }
            }
        }
    };
    write_param(prev);
    result
}
