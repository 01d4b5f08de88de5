//! A client with several requests outstanding (send_command, then
//! reply_to for each id in the order sent) gets each reply matched to its
//! own request, and an error reply to one of them fails only that one.

use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use airlock_protocol::client::Client;
use airlock_protocol::{Command, Limits, MessageSocket, ProtocolError};

/// A server that reads `n` commands before answering any (so the client
/// really has them all outstanding), then replies in order: with the
/// command's payload echoed back, or with `errno` for the `fail`-th one.
fn server(n: usize, fail: Option<(usize, i32)>) -> (Client, JoinHandle<Vec<u16>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let handle = std::thread::spawn(move || {
        let sock = MessageSocket::new(b);
        let limits = Limits::default();
        let mut got = Vec::new();
        for _ in 0..n {
            let mut p = Vec::new();
            let (h, _fds) = sock.recv(&limits, &mut p).unwrap();
            assert!(!h.is_reply() && !h.no_reply());
            got.push((h, p));
        }
        for (i, (h, p)) in got.iter().enumerate() {
            match fail {
                Some((at, errno)) if at == i => sock.send(&h.error_reply(errno), &[], &[]),
                _ => sock.send(&h.reply(p.len()), &[p], &[]),
            }
            .unwrap();
        }
        got.iter().map(|(h, _)| h.id).collect()
    });
    (Client::from_stream(a), handle)
}

const CMDS: [Command; 3] = [Command::DmaMap, Command::DmaUnmap, Command::RegionRead];

fn send_all(c: &mut Client) -> Vec<u16> {
    CMDS.iter()
        .enumerate()
        .map(|(i, &cmd)| c.send_command(cmd, &[i as u8; 8], &[]).unwrap())
        .collect()
}

#[test]
fn replies_to_outstanding_commands_are_collected_in_order() {
    let (mut c, srv) = server(3, None);
    let ids = send_all(&mut c);
    for (i, (&id, &cmd)) in ids.iter().zip(CMDS.iter()).enumerate() {
        let r = c.reply_to(id, cmd).unwrap();
        assert_eq!((r.header.id, r.header.cmd), (id, cmd as u16));
        assert_eq!(r.payload, vec![i as u8; 8], "reply {i} is its own");
    }
    assert_eq!(srv.join().unwrap(), ids, "the server saw the ids sent");
}

#[test]
fn an_error_reply_fails_only_its_own_command() {
    let (mut c, srv) = server(3, Some((1, libc::EINVAL)));
    let ids = send_all(&mut c);
    assert!(c.reply_to(ids[0], CMDS[0]).is_ok());
    match c.reply_to(ids[1], CMDS[1]) {
        Err(ProtocolError::Remote { errno }) => assert_eq!(errno, libc::EINVAL as u32),
        other => panic!(
            "expected the server's EINVAL: {:?}",
            other.map(|r| r.header)
        ),
    }
    let r = c.reply_to(ids[2], CMDS[2]).unwrap();
    assert_eq!(r.payload, vec![2u8; 8]);
    srv.join().unwrap();
}

#[test]
fn collecting_out_of_order_is_a_bad_reply() {
    let (mut c, srv) = server(2, None);
    c.send_command(Command::DmaMap, &[0; 8], &[]).unwrap();
    let b = c.send_command(Command::DmaUnmap, &[1; 8], &[]).unwrap();
    assert!(matches!(
        c.reply_to(b, Command::DmaUnmap),
        Err(ProtocolError::BadReply { id, .. }) if id == b
    ));
    srv.join().unwrap();
}
