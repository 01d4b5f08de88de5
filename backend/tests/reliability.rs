//! Given the real `airlock --emulate edu` (sandbox on), no client input,
//! fault or crash takes the device away: odd but well-framed conversations
//! keep the stream in sync, a client's memory shrinking under a map is an
//! error and not a crash, a waiting client is told about in the log and
//! served later, and a killed server is replaced on the same socket.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use airlock::device::emulated::edu::*;
use airlock_protocol::client::Client;
use airlock_protocol::dma::DmaAccess;
use airlock_protocol::header::Command;
use airlock_protocol::region::RegionAccess;
use airlock_protocol::{Header, Limits, ProtocolError};
use common::*;

/// Receives the next message the server sends.
fn next(c: &Client) -> (Header, Vec<u8>) {
    let mut p = Vec::new();
    let (h, _) = c
        .socket()
        .recv(&Limits::default(), &mut p)
        .expect("a message from the server");
    (h, p)
}

/// Sends a command with a chosen id.
fn send(c: &Client, id: u16, cmd: Command, payload: &[u8]) {
    c.socket()
        .send(
            &Header::command(id, cmd, payload.len(), false),
            &[payload],
            &[],
        )
        .unwrap();
}

/// A client with a 64 KiB map at 0x200000 that has no fd (so the device's
/// DMA travels as DMA_READ/DMA_WRITE messages) and bus mastering on; then
/// an edu DMA of 64 bytes RAM -> device started. Returns the DMA_READ the
/// server sent.
fn client_with_a_pending_dma_read(s: &Server) -> (Client, Header, DmaAccess) {
    let mut c = connect(s);
    c.dma_map(0x200000, 65536, 0, RW, None).unwrap();
    enable_bus_master(&mut c);
    c.write32(0, REG_DMA_SRC, 0x200000).unwrap();
    c.write32(0, REG_DMA_DST, DMA_BUFFER as u32).unwrap();
    c.write32(0, REG_DMA_COUNT, 64).unwrap();
    c.write32(0, REG_DMA_CMD, 1).unwrap();
    let (h, p) = next(&c);
    assert_eq!(
        h.cmd,
        Command::DmaRead as u16,
        "the server asks for the data"
    );
    let (a, _) = DmaAccess::decode(&p, "DMA_READ").unwrap();
    assert_eq!((a.iova, a.count), (0x200000, 64));
    (c, h, a)
}

#[test]
fn a_reply_to_a_dma_read_that_a_reset_abandoned_is_dropped_and_the_stream_stays_in_sync() {
    let s = start_edu("reset-dma");
    let (c, dma_read, a) = client_with_a_pending_dma_read(&s);
    send(&c, 500, Command::DeviceReset, &[]);
    let (h, _) = next(&c);
    assert_eq!(
        (h.id, h.cmd, h.is_error()),
        (500, Command::DeviceReset as u16, false)
    );
    // Now the late answer to the abandoned DMA_READ.
    let body = a.encode_read_reply(&[0x5a; 64]);
    c.socket()
        .send(&dma_read.reply(body.len()), &[&body], &[])
        .unwrap();
    let q = RegionAccess {
        offset: REG_IDENT,
        region: 0,
        count: 4,
    };
    send(&c, 501, Command::RegionRead, &q.encode_fixed());
    let (h, p) = next(&c);
    assert_eq!(
        (h.id, h.cmd, h.is_error()),
        (501, Command::RegionRead as u16, false),
        "the next message is the reply to what the client asked, nothing else"
    );
    assert_eq!(u32::from_le_bytes(p[16..20].try_into().unwrap()), IDENT);
}

#[test]
fn a_dma_read_reply_in_the_spec_texts_layout_is_an_error_never_shifted_data() {
    let s = start_edu("spec-layout");
    let (mut c, dma_read, a) = client_with_a_pending_dma_read(&s);
    // docs/interop/vfio-user.rst: address u64, count u64, data at 16.
    let mut body = Vec::new();
    body.extend_from_slice(&a.iova.to_le_bytes());
    body.extend_from_slice(&(a.count as u64).to_le_bytes());
    body.extend((0..64u8).map(|i| i + 1));
    c.socket()
        .send(&dma_read.reply(body.len()), &[&body], &[])
        .unwrap();
    assert_eq!(
        c.read32(0, REG_DMA_ERROR).unwrap() & DMA_ERR_UNMAPPED,
        DMA_ERR_UNMAPPED,
        "the DMA failed"
    );
    let buf = c.region_read(0, DMA_BUFFER, 64).unwrap();
    assert!(
        buf.iter().all(|b| !(1..=64).contains(b)),
        "none of the reply's data (shifted or not) reached the device: {buf:?}"
    );
    assert_eq!(c.read32(0, REG_IDENT).unwrap(), IDENT);
}

#[test]
fn a_memfd_shrunk_under_a_map_makes_the_dma_fail_and_the_server_lives() {
    let s = start_edu("shrink");
    let pid = s.server_pid();
    let mut c = connect(&s);
    let mem = Memfd::new(2 << 20);
    c.dma_map(0x400000, 2 << 20, 0, RW, Some(mem.fd.as_fd()))
        .unwrap();
    enable_bus_master(&mut c);
    // SAFETY: ftruncate on our own memfd.
    assert_eq!(unsafe { libc::ftruncate(mem.fd.as_raw_fd(), 0) }, 0);
    run_dma(&mut c, 0x400000 + 0x1000, DMA_BUFFER, 64, 1);
    assert_eq!(
        c.read32(0, REG_DMA_ERROR).unwrap() & DMA_ERR_UNMAPPED,
        DMA_ERR_UNMAPPED
    );
    c.write32(0, REG_DMA_ERROR, 0).unwrap();
    run_dma(&mut c, DMA_BUFFER, 0x400000 + 0x1000, 64, 3);
    assert_eq!(
        c.read32(0, REG_DMA_ERROR).unwrap() & DMA_ERR_UNMAPPED,
        DMA_ERR_UNMAPPED,
        "a write past the shrunk end fails too (and does not grow the file)"
    );
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into the stat we own.
    let rc = unsafe { libc::fstat(mem.fd.as_raw_fd(), &mut st) };
    assert_eq!(rc, 0);
    assert_eq!(st.st_size, 0);
    assert_eq!(c.read32(0, REG_IDENT).unwrap(), IDENT);
    assert_eq!(s.server_pid(), pid, "the same server: it never died");
}

#[test]
fn region_write_multi_is_refused_unless_the_client_proposed_write_multiple() {
    let s = start_edu("write-multi");
    let mut c = Client::connect(&s.path).unwrap();
    let mut caps = Client::qemu_capabilities();
    caps.write_multiple = None;
    c.negotiate(caps).unwrap();
    let mut data = [0u8; airlock_protocol::region::WRITE_MULTI_DATA];
    data[..4].copy_from_slice(&[1, 2, 3, 4]);
    let w = airlock_protocol::region::WriteOne {
        offset: REG_LIVENESS,
        region: 0,
        count: 4,
        data,
    };
    match c.write_multi(&[w]) {
        Err(ProtocolError::Remote { errno }) => assert_eq!(errno as i32, libc::EINVAL),
        other => panic!("WRITE_MULTI without the capability: {other:?}"),
    }
    assert_eq!(c.read32(0, REG_IDENT).unwrap(), IDENT);
}

#[test]
fn as_many_dma_maps_as_version_advertises_can_be_held_at_once() {
    let s = start_edu("max-maps");
    let mut c = Client::connect(&s.path).unwrap();
    let v = c.negotiate(Client::qemu_capabilities()).unwrap();
    let max = v
        .capabilities
        .unwrap()
        .max_dma_maps
        .expect("proposed, so advertised");
    println!("VERSION advertises max_dma_maps {max}");
    assert!(max >= 1024, "a useful number of maps: {max}");
    let mem = Memfd::new(4096);
    for i in 0..max {
        c.dma_map(0x1_0000_0000 + i * 4096, 4096, 0, RW, Some(mem.fd.as_fd()))
            .unwrap_or_else(|e| panic!("map {} of {max}: {e}", i + 1));
    }
    match c.dma_map(
        0x1_0000_0000 + max * 4096,
        4096,
        0,
        RW,
        Some(mem.fd.as_fd()),
    ) {
        Err(ProtocolError::Remote { errno }) => assert_eq!(errno as i32, libc::ENOSPC),
        other => panic!("map {} past the advertised limit: {other:?}", max + 1),
    }
    c.dma_unmap(0, 0, airlock_protocol::dma::DMA_UNMAP_FLAG_ALL)
        .unwrap();
    c.dma_map(0x1000_0000, 4096, 0, RW, Some(mem.fd.as_fd()))
        .expect("room again after unmapping all");
}

#[test]
fn a_second_client_is_logged_while_it_waits_and_served_when_the_first_leaves() {
    let s = start_edu("second-client");
    let mut first = connect(&s);
    assert_eq!(first.read32(0, REG_IDENT).unwrap(), IDENT);
    let path = s.path.clone();
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let mut c = connect_path(&path);
        let waited = t.elapsed();
        (c.read32(0, REG_IDENT).unwrap(), waited)
    });
    wait_for("the log line about the waiting client", || {
        s.log().contains("a client has waited")
    });
    let line = s
        .log()
        .lines()
        .find(|l| l.contains("a client has waited"))
        .unwrap()
        .to_string();
    println!("{line}");
    assert!(line.contains("edu"), "names the device");
    drop(first);
    let (ident, waited) = waiter.join().unwrap();
    assert_eq!(ident, IDENT, "served once the first client left");
    assert!(waited >= Duration::from_secs(1));
}

#[test]
fn a_killed_server_is_replaced_on_the_same_socket_and_a_storm_is_bounded() {
    let mut s = start_edu("kill-9");
    let mut c = connect(&s);
    assert_eq!(c.read32(0, REG_IDENT).unwrap(), IDENT);
    let mut pid = s.server_pid();
    for round in 1..=6u32 {
        // SAFETY: kill with a pid of our own child's child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        if round == 6 {
            break;
        }
        wait_for("a fresh server", || {
            let p = server_pid_now(s.child.id());
            p != 0 && p != pid
        });
        pid = s.server_pid();
        assert!(s.path.exists(), "the socket stays in place");
        let mut next = connect(&s);
        assert_eq!(next.read32(0, REG_IDENT).unwrap(), IDENT, "round {round}");
    }
    let st = wait_exit(&mut s.child);
    let log = s.log();
    assert!(log.contains("killed by signal 9"), "{log}");
    assert!(log.contains("restart 5 of at most 5"), "{log}");
    assert!(log.contains("giving up"), "{log}");
    assert!(!st.success(), "a storm ends airlock with a failure: {st:?}");
    assert!(!s.path.exists(), "and removes the socket");
    drop(c);
}

#[test]
fn a_silent_client_is_dropped_after_10_s_and_the_waiting_one_is_served() {
    let s = start_edu("silent");
    // Connects and never sends VERSION (a reconnecting chardev does this).
    let silent = std::os::unix::net::UnixStream::connect(&s.path).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let path = s.path.clone();
    let t = Instant::now();
    let waiter = std::thread::spawn(move || {
        // Longer than the server's 10 s VERSION limit for the silent one.
        let mut c = Client::connect(&path).unwrap();
        c.socket()
            .stream()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        c.negotiate(Client::qemu_capabilities()).unwrap();
        c.read32(0, REG_IDENT).unwrap()
    });
    wait_for("the waiting-client log line", || {
        s.log().contains("a client has waited")
    });
    assert_eq!(
        waiter.join().unwrap(),
        IDENT,
        "served once the silent one was dropped"
    );
    let waited = t.elapsed();
    println!("the waiting client was served after {waited:?}");
    assert!(waited < Duration::from_secs(15), "{waited:?}");
    let log = s.log();
    assert!(log.contains("sent no VERSION within 10 s"), "{log}");
    drop(silent);
}
