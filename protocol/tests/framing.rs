//! Given messages sent back to back, some with fds, some larger than the
//! read-ahead buffer, some split across writes, MessageSocket frames each
//! one whole and hands every fd to the message it was sent with.

use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use airlock_protocol::header::{Command, Header};
use airlock_protocol::{Limits, MessageSocket, RecvError};

fn eventfd() -> OwnedFd {
    // SAFETY: no pointers; result checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn pair() -> (MessageSocket, MessageSocket) {
    let (a, b) = UnixStream::pair().unwrap();
    (MessageSocket::new(a), MessageSocket::new(b))
}

fn send(s: &MessageSocket, id: u16, payload: &[u8], fds: &[&OwnedFd]) {
    let h = Header::command(id, Command::RegionWrite, payload.len(), false);
    let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    s.send(&h, &[payload], &fds).unwrap();
}

#[test]
fn fds_go_with_their_own_message_when_several_arrive_in_one_read() {
    let (tx, rx) = pair();
    let (e1, e2) = (eventfd(), eventfd());
    send(&tx, 1, &[1; 8], &[]);
    send(&tx, 2, &[2; 8], &[&e1, &e2]);
    send(&tx, 3, &[3; 8], &[]);
    send(&tx, 4, &[4; 8], &[&e1]);
    let limits = Limits::new(1 << 20, 16);
    let mut p = Vec::new();
    let want = [(1u16, 0usize), (2, 2), (3, 0), (4, 1)];
    for (id, nfds) in want {
        let (h, fds) = rx.recv(&limits, &mut p).unwrap();
        assert_eq!((h.id, fds.len()), (id, nfds), "message {id}");
        assert_eq!(p, vec![id as u8; 8]);
    }
}

#[test]
fn a_payload_larger_than_the_read_ahead_and_one_split_across_writes_arrive_whole() {
    let (tx, rx) = pair();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let writer = std::thread::spawn(move || {
        send(&tx, 1, &big, &[]);
        // A message whose bytes come in three writes.
        let body = [9u8; 40];
        let h = Header::command(2, Command::RegionWrite, body.len(), false).encode();
        let mut all = h.to_vec();
        all.extend_from_slice(&body);
        let mut st = tx.stream();
        for part in [&all[..5], &all[5..30], &all[30..]] {
            st.write_all(part).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        send(&tx, 3, &[3; 4], &[]);
        drop(tx);
        big
    });
    let limits = Limits::new(1 << 20, 16);
    let mut p = Vec::new();
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    let big = writer.join().unwrap();
    assert_eq!((h.id, p.len()), (1, big.len()));
    assert!(p == big, "the large payload arrives intact");
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    assert_eq!((h.id, p.as_slice()), (2, &[9u8; 40][..]));
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    assert_eq!(h.id, 3);
    assert!(matches!(rx.recv(&limits, &mut p), Err(RecvError::Closed)));
}

#[test]
fn an_oversized_message_is_drained_and_the_next_one_is_framed() {
    let (tx, rx) = pair();
    let limits = Limits::new(4096, 16);
    let writer = std::thread::spawn(move || {
        send(&tx, 1, &vec![1u8; 100_000], &[&eventfd()]);
        send(&tx, 2, &[2; 4], &[]);
    });
    let mut p = Vec::new();
    match rx.recv(&limits, &mut p) {
        Err(RecvError::Rejected(h, _)) => assert_eq!(h.id, 1),
        other => panic!("expected a rejection: {other:?}"),
    }
    let (h, fds) = rx.recv(&limits, &mut p).unwrap();
    assert_eq!((h.id, fds.len(), p.as_slice()), (2, 0, &[2u8; 4][..]));
    writer.join().unwrap();
}
