//! Who may connect to the socket airlock creates (--socket-path): its group
//! and mode, set before the socket accepts anyone (server/mod.rs binds it
//! under a temporary name, sets both, then renames it into place). With
//! --fd or systemd socket activation the launcher creates the socket and
//! decides (systemd: SocketUser=, SocketGroup=, SocketMode=).
//!
//! The default stays 0600, owned by airlock's user: only that user (root,
//! usually) can connect. A QEMU running as another user (libvirt's
//! libvirt-qemu, an orchestrator's) gets EACCES until it is let in with
//! --socket-group (mode 0660 then).

use std::ffi::CString;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SocketError {
    #[error("--socket-group {0:?}: no such group on this host (getent group {0} finds none): name the group QEMU runs in (e.g. libvirt-qemu, kvm) or a number")]
    NoSuchGroup(String),
    #[error("--socket-mode {0:?} is not an octal file mode (e.g. 0660)")]
    BadMode(String),
    #[error("--socket-mode {0:04o} lets every user on the host connect and drive the device (others may write): use 0660 with --socket-group GROUP")]
    OthersWrite(u32),
    #[error("--socket-mode {mode:04o} keeps --socket-group {group} out: connecting needs read and write, use 0660")]
    GroupCannotConnect { mode: u32, group: String },
    #[error("--socket-group and --socket-mode apply to --socket-path only: with --fd or systemd socket activation the launcher creates the socket (systemd: SocketGroup= and SocketMode= in airlock@.socket)")]
    NotOurSocket,
}

/// The group and mode of a socket airlock creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAccess {
    /// --socket-group: (gid, as the user named it).
    pub group: Option<(u32, String)>,
    pub mode: u32,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            group: None,
            mode: 0o600,
        }
    }
}

impl SocketAccess {
    /// From --socket-group and --socket-mode; `own_socket`: airlock creates
    /// the socket (--socket-path). The mode defaults to 0600, or 0660 with a
    /// group.
    pub fn parse(
        group: Option<&str>,
        mode: Option<&str>,
        own_socket: bool,
    ) -> Result<SocketAccess, SocketError> {
        if !own_socket && (group.is_some() || mode.is_some()) {
            return Err(SocketError::NotOurSocket);
        }
        let group = group.map(|g| Ok((gid_of(g)?, g.to_string()))).transpose()?;
        let mode = match mode {
            Some(m) => parse_mode(m)?,
            None if group.is_some() => 0o660,
            None => 0o600,
        };
        if mode & 0o002 != 0 {
            return Err(SocketError::OthersWrite(mode));
        }
        if let Some((_, name)) = &group {
            if mode & 0o060 != 0o060 {
                return Err(SocketError::GroupCannotConnect {
                    mode,
                    group: name.clone(),
                });
            }
        }
        Ok(SocketAccess { group, mode })
    }

    /// "mode 0600, group root" for logs.
    pub fn describe(&self) -> String {
        match &self.group {
            Some((gid, name)) => format!("mode {:04o}, group {name} ({gid})", self.mode),
            None => format!("mode {:04o}, airlock's own group", self.mode),
        }
    }
}

fn parse_mode(m: &str) -> Result<u32, SocketError> {
    let digits = m.strip_prefix("0o").unwrap_or(m);
    match u32::from_str_radix(digits, 8) {
        Ok(v) if !digits.is_empty() && v <= 0o777 => Ok(v),
        _ => Err(SocketError::BadMode(m.to_string())),
    }
}

/// A group name's gid (a number is taken as it is).
fn gid_of(g: &str) -> Result<u32, SocketError> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    let none = || SocketError::NoSuchGroup(g.to_string());
    let name = CString::new(g).map_err(|_| none())?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: an all-zero struct group is a valid out-parameter.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes into grp and buf (of the length given) and
    // sets found to &grp or null; nothing is kept past this call.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 || found.is_null() {
        return Err(none());
    }
    Ok(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(g: Option<&str>, m: Option<&str>) -> Result<SocketAccess, SocketError> {
        SocketAccess::parse(g, m, true)
    }

    #[test]
    fn the_default_is_0600_and_a_group_makes_it_0660() {
        assert_eq!(p(None, None).unwrap(), SocketAccess::default());
        let a = p(Some("root"), None).unwrap();
        assert_eq!((a.group, a.mode), (Some((0, "root".into())), 0o660));
        assert_eq!(
            p(Some("65534"), Some("0o640")),
            Err(SocketError::GroupCannotConnect {
                mode: 0o640,
                group: "65534".into()
            })
        );
        assert_eq!(p(Some("65534"), Some("770")).unwrap().mode, 0o770);
    }

    #[test]
    fn bad_groups_and_modes_name_the_problem() {
        assert_eq!(
            p(Some("no-such-group-airlock"), None),
            Err(SocketError::NoSuchGroup("no-such-group-airlock".into()))
        );
        for m in ["", "0x660", "rw", "1777", "08"] {
            assert_eq!(
                p(None, Some(m)),
                Err(SocketError::BadMode(m.into())),
                "{m:?}"
            );
        }
        assert_eq!(p(None, Some("0666")), Err(SocketError::OthersWrite(0o666)));
        assert_eq!(
            p(Some("root"), Some("0662")),
            Err(SocketError::OthersWrite(0o662))
        );
        assert_eq!(
            SocketAccess::parse(Some("root"), None, false),
            Err(SocketError::NotOurSocket)
        );
        assert!(SocketError::OthersWrite(0o666).to_string().contains("0666"));
    }
}
