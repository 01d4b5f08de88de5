//! systemd's file-descriptor store (FDSTORE=1, FDNAME=; the unit's
//! FileDescriptorStoreMax=): with --vfio, airlock hands systemd duplicates of
//! the device's VFIO container, group and device fds and the table of its
//! IOMMU mappings. systemd keeps them while the service restarts (`systemctl
//! restart`, Restart= after a crash or kill -9 of airlock) and passes them
//! back in LISTEN_FDS/LISTEN_FDNAMES, so the next airlock adopts the device
//! as after a server crash: no reset, mappings kept. `systemctl stop`
//! releases the store, and the kernel's release of the last fd quiesces and
//! resets the device (vfio-pci), so a stopped service leaves nothing open.

use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

use crate::device::vfio::HandedVfio;

/// The FDNAME of each stored fd, in the order VfioFds and the table use.
pub const NAMES: [&str; 4] = ["vfio-container", "vfio-group", "vfio-device", "vfio-table"];

/// How many fds systemd keeps for this service ($FDSTORE, systemd >= 254:
/// FileDescriptorStoreMax=); None when not under such a systemd.
pub fn capacity() -> Option<usize> {
    std::env::var_os("NOTIFY_SOCKET")?;
    std::env::var("FDSTORE").ok()?.trim().parse().ok()
}

/// Whether systemd will keep the device's fds across a restart.
pub fn keeps_device() -> bool {
    capacity().is_some_and(|n| n >= NAMES.len())
}

/// The stored fds by name, as HandedVfio numbers; None unless all four are
/// there.
pub fn restored(stored: &[(String, RawFd)]) -> Option<HandedVfio> {
    let fd = |name: &str| stored.iter().find(|(n, _)| n == name).map(|(_, f)| *f);
    Some(HandedVfio {
        container: fd(NAMES[0])?,
        group: fd(NAMES[1])?,
        device: fd(NAMES[2])?,
        table: fd(NAMES[3])?,
    })
}

/// Stores the device's fds, one message per fd (an FDNAME names every fd
/// of its message).
pub fn store(v: &HandedVfio) -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Err(io::Error::other("NOTIFY_SOCKET is not set"));
    };
    for (name, fd) in NAMES.iter().zip([v.container, v.group, v.device, v.table]) {
        send_with_fd(
            path.as_encoded_bytes(),
            &format!("FDSTORE=1\nFDNAME={name}"),
            fd,
        )?;
    }
    Ok(())
}

/// Takes the device's fds out of the store (the host took the device back:
/// systemd must not hold it open, or vfio-pci's unbind waits forever).
pub fn remove_device() {
    for name in NAMES {
        super::notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
    }
}

/// One datagram to the notify socket at `path` ('@': abstract) carrying `fd`.
fn send_with_fd(path: &[u8], state: &str, fd: RawFd) -> io::Result<()> {
    // SAFETY: zeroed sockaddr_un is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if path.is_empty() || path.len() >= addr.sun_path.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (i, b) in path.iter().enumerate() {
        addr.sun_path[i] = *b as libc::c_char;
    }
    if path[0] == b'@' {
        addr.sun_path[0] = 0;
    }
    let addr_len = (size_of::<libc::sa_family_t>() + path.len()) as libc::socklen_t;
    // SAFETY: socket takes integer arguments; the result is checked.
    let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sock is a new fd nobody else owns; OwnedFd closes it.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
    let mut iov = libc::iovec {
        iov_base: state.as_ptr() as *mut libc::c_void,
        iov_len: state.len(),
    };
    // SAFETY: CMSG_SPACE computes a size from a constant.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; every pointer set below points into
    // live locals (addr, iov, control) that outlive the sendmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_un).cast();
    msg.msg_namelen = addr_len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg has room for one cmsg carrying one fd (CMSG_SPACE above).
    let sent = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        libc::sendmsg(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            &msg,
            libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn all_four_names_make_a_device_and_fewer_do_not() {
        let all: Vec<(String, RawFd)> = NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), 10 + i as RawFd))
            .collect();
        let v = restored(&all).unwrap();
        assert_eq!((v.container, v.group, v.device, v.table), (10, 11, 12, 13));
        assert_eq!(restored(&all[1..]), None);
    }

    #[test]
    fn a_stored_fd_arrives_with_its_name() {
        let dir = std::env::temp_dir().join(format!("airlock-fdstore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        send_with_fd(
            path.as_os_str().as_encoded_bytes(),
            "FDSTORE=1\nFDNAME=vfio-table",
            f.as_raw_fd(),
        )
        .unwrap();
        let mut b = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        };
        let mut control = [0u8; 64];
        // SAFETY: a zeroed msghdr pointing at live locals.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        // SAFETY: recvmsg fills the buffers msg points at.
        let n = unsafe { libc::recvmsg(rx.as_raw_fd(), &mut msg, 0) };
        assert_eq!(&b[..n as usize], b"FDSTORE=1\nFDNAME=vfio-table");
        // SAFETY: the kernel wrote one SCM_RIGHTS cmsg with one fd.
        let got = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            assert_eq!((*c).cmsg_type, libc::SCM_RIGHTS);
            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>())
        };
        let same = |fd: RawFd| {
            let m = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
            std::os::unix::fs::MetadataExt::ino(&m)
        };
        assert_eq!(same(got), same(f.as_raw_fd()), "the same file arrived");
        // SAFETY: the received fd is ours to close.
        unsafe { libc::close(got) };
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
