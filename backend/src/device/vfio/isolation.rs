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

use std::os::fd::AsFd;

use tracing::warn;

use super::{ioctl, VfioError, VfioFds};

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

impl MsiIsolation {
    /// As recorded in the handover table (a successor cannot re-check:
    /// the group is attached already).
    pub fn to_u32(self) -> u32 {
        match self {
            MsiIsolation::Isolated => 1,
            MsiIsolation::Unsafe => 2,
            MsiIsolation::Unverified => 0,
        }
    }

    pub fn from_u32(v: u32) -> MsiIsolation {
        match v {
            1 => MsiIsolation::Isolated,
            2 => MsiIsolation::Unsafe,
            _ => MsiIsolation::Unverified,
        }
    }
}

fn read_param() -> Option<bool> {
    let v = std::fs::read_to_string(PARAM).ok()?;
    Some(v.trim() == "Y" || v.trim() == "1")
}

fn write_param(on: bool) -> bool {
    std::fs::write(PARAM, if on { "1" } else { "0" }).is_ok()
}

/// Opens the container and the group, attaches them, takes the device
/// fd. On an error every fd opened so far is closed (the group leaves the
/// container with its last fd).
fn attach(bdf: &str, group: &str) -> Result<VfioFds, VfioError> {
    let container = ioctl::open_container().map_err(|e| VfioError::Container {
        bdf: bdf.into(),
        why: e.to_string(),
    })?;
    let attach_err = |e: std::io::Error| VfioError::Attach {
        bdf: bdf.into(),
        group: group.into(),
        why: e.to_string(),
    };
    let group_fd = ioctl::open_group(group).map_err(attach_err)?;
    ioctl::attach_group(container.as_fd(), group_fd.as_fd()).map_err(attach_err)?;
    let device = ioctl::group_device(group_fd.as_fd(), bdf).map_err(attach_err)?;
    Ok(VfioFds {
        device,
        group: group_fd,
        container,
    })
}

pub fn attach_checked(
    bdf: &str,
    group: &str,
    allow_unsafe: bool,
) -> Result<(VfioFds, MsiIsolation), VfioError> {
    let Some(prev) = read_param() else {
        return Ok((attach(bdf, group)?, MsiIsolation::Unverified));
    };
    if prev && !write_param(false) {
        return Ok((attach(bdf, group)?, MsiIsolation::Unverified));
    }
    let strict = attach(bdf, group);
    let result = match strict {
        Ok(fds) => Ok((fds, MsiIsolation::Isolated)),
        Err(strict_err) => {
            if !write_param(true) {
                Err(strict_err)
            } else {
                match attach(bdf, group) {
                    Ok(fds) if allow_unsafe => {
                        warn!("vfio {bdf}: the host cannot isolate this device's MSIs; continuing because of --allow-unsafe-interrupts");
                        Ok((fds, MsiIsolation::Unsafe))
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
