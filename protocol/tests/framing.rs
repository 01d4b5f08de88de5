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

/// The bytes of one message, as a client writes it.
fn message(id: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Header::command(id, Command::RegionWrite, payload.len(), false)
        .encode()
        .to_vec();
    m.extend_from_slice(payload);
    m
}

/// Whatever `s` can read without blocking.
fn readable(s: &UnixStream) -> Vec<u8> {
    use std::io::Read;
    s.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = (&*s).read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    s.set_nonblocking(false).unwrap();
    got
}

#[test]
fn replies_wait_while_a_whole_request_is_buffered_and_go_together_after_the_last() {
    let (client, server) = UnixStream::pair().unwrap();
    let rx = MessageSocket::new(server);
    let mut burst = Vec::new();
    for id in 1..=3 {
        burst.extend(message(id, &[id as u8; 8]));
    }
    (&client).write_all(&burst).unwrap();
    let limits = Limits::new(1 << 20, 16);
    let mut p = Vec::new();
    for id in 1..=3u16 {
        let (h, _) = rx.recv(&limits, &mut p).unwrap();
        assert_eq!(h.id, id);
        rx.send_reply(&h.reply(1), &[&[id as u8]]).unwrap();
        let out = readable(&client);
        if id < 3 {
            assert!(out.is_empty(), "reply {id} was held: request 3 is buffered");
        } else {
            let replies: Vec<(u16, u8)> = out
                .chunks(17)
                .map(|r| (u16::from_le_bytes([r[0], r[1]]), r[16]))
                .collect();
            assert_eq!(replies, [(1, 1), (2, 2), (3, 3)], "all three, in order");
        }
    }
}

#[test]
fn a_held_reply_goes_before_a_read_that_blocks_and_when_the_socket_closes() {
    let (client, server) = UnixStream::pair().unwrap();
    let rx = MessageSocket::new(server);
    // Request 2 is posted (no reply wanted): nothing sends reply 1 along.
    let mut burst = message(1, &[1; 4]);
    let mut posted = Header::command(2, Command::RegionWrite, 4, true)
        .encode()
        .to_vec();
    posted.extend_from_slice(&[2; 4]);
    burst.extend(posted);
    (&client).write_all(&burst).unwrap();
    let limits = Limits::new(1 << 20, 16);
    let mut p = Vec::new();
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    rx.send_reply(&h.reply(0), &[]).unwrap();
    assert!(readable(&client).is_empty(), "held: request 2 is buffered");
    let (h2, _) = rx.recv(&limits, &mut p).unwrap();
    assert!(h2.no_reply());
    let reader = std::thread::spawn(move || {
        let mut p = Vec::new();
        rx.recv(&limits, &mut p).map(|(h, _)| h.id).map_err(|_| ())
    });
    let mut reply = [0u8; 16];
    {
        use std::io::Read;
        (&client).read_exact(&mut reply).unwrap();
    }
    assert_eq!(u16::from_le_bytes([reply[0], reply[1]]), 1);
    (&client).write_all(&message(3, &[3; 4])).unwrap();
    assert_eq!(reader.join().unwrap(), Ok(3));

    // Dropping the socket sends what it holds.
    let (client, server) = UnixStream::pair().unwrap();
    let rx = MessageSocket::new(server);
    let mut burst = message(7, &[]);
    burst.extend(message(8, &[]));
    (&client).write_all(&burst).unwrap();
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    rx.send_reply(&h.reply(0), &[]).unwrap();
    drop(rx);
    let out = readable(&client);
    assert_eq!((out.len(), out[0]), (16, 7));
}

/// A peer that reads `replies` bytes, then sends message `id`: it answers
/// only once it has them. Returns its socket when done.
fn answer_after(
    client: UnixStream,
    replies: usize,
    id: u16,
) -> std::thread::JoinHandle<UnixStream> {
    std::thread::spawn(move || {
        let mut got = vec![0u8; replies];
        std::io::Read::read_exact(&mut &client, &mut got).unwrap();
        (&client).write_all(&message(id, &[id as u8; 4])).unwrap();
        client
    })
}

/// A server's socket, and the client's end both raw (to see what it can
/// read) and as a MessageSocket (to send with fds); the limits to receive
/// with.
fn server_and_client() -> (UnixStream, MessageSocket, MessageSocket, Limits) {
    let (client, server) = UnixStream::pair().unwrap();
    let tx = MessageSocket::new(client.try_clone().unwrap());
    (
        client,
        MessageSocket::new(server),
        tx,
        Limits::new(1 << 20, 16),
    )
}

#[test]
fn replies_to_requests_with_fds_wait_while_more_are_queued_and_go_before_a_read_that_would_block() {
    // Each request carries an fd, so each read brings one: the replies are
    // held all the same while the next requests are queued in the socket.
    let (client, rx, tx, limits) = server_and_client();
    for id in 1..=3 {
        send(&tx, id, &[id as u8; 8], &[&eventfd()]);
    }
    let mut p = Vec::new();
    for id in 1..=3u16 {
        let (h, fds) = rx.recv(&limits, &mut p).unwrap();
        assert_eq!((h.id, fds.len()), (id, 1));
        rx.send_reply(&h.reply(1), &[&[id as u8]]).unwrap();
        assert!(readable(&client).is_empty(), "reply {id} was held");
    }
    // The next read finds nothing queued: it sends the three, then waits.
    let reader = std::thread::spawn(move || {
        let mut p = Vec::new();
        rx.recv(&limits, &mut p).map(|(h, _)| h.id).map_err(|_| ())
    });
    let mut out = [0u8; 3 * 17];
    std::io::Read::read_exact(&mut &client, &mut out).unwrap();
    let replies: Vec<(u16, u8)> = out
        .chunks(17)
        .map(|r| (u16::from_le_bytes([r[0], r[1]]), r[16]))
        .collect();
    assert_eq!(replies, [(1, 1), (2, 2), (3, 3)], "all three, in order");
    send(&tx, 4, &[4; 8], &[]);
    assert_eq!(reader.join().unwrap(), Ok(4));
}

#[test]
fn a_client_that_waits_for_each_reply_gets_it_at_once_but_for_one_look_in_eight() {
    // Each request carries an fd and is sent only once the previous reply
    // came: a look past a reply finds nothing, so replies are not held
    // again until eight more such requests passed.
    let (client, rx, tx, limits) = server_and_client();
    let mut p = Vec::new();
    let mut held = Vec::new();
    for id in 1..=17u16 {
        send(&tx, id, &[1; 4], &[&eventfd()]);
        let (h, _) = rx.recv(&limits, &mut p).unwrap();
        assert_eq!(h.id, id);
        rx.send_reply(&h.reply(0), &[]).unwrap();
        if readable(&client).len() == 16 {
            continue;
        }
        held.push(id);
        // The look: nothing is queued, so the reply goes before the read
        // waits; the next request then ends that wait.
        let reader = std::thread::spawn(move || {
            let mut p = Vec::new();
            rx.recv(&limits, &mut p).map(|(h, _)| (h.id, rx))
        });
        let mut reply = [0u8; 16];
        std::io::Read::read_exact(&mut &client, &mut reply).unwrap();
        assert_eq!(u16::from_le_bytes([reply[0], reply[1]]), id);
        send(&tx, 100 + id, &[], &[]);
        let Ok((got, back)) = reader.join().unwrap() else {
            panic!("recv after the look failed");
        };
        assert_eq!(got, 100 + id);
        back.send_reply(
            &Header::command(100 + id, Command::RegionWrite, 0, false).reply(0),
            &[],
        )
        .unwrap();
        assert_eq!(readable(&client).len(), 16);
        return check_looks(held, back, client, tx, id);
    }
    panic!("no reply was ever held: {held:?}");
}

/// The rest of the test above: after the look at request `first`, the next
/// LOOK_EVERY - 1 fd-carrying requests get their replies at once, and the
/// one after is held again.
fn check_looks(
    mut held: Vec<u16>,
    rx: MessageSocket,
    client: UnixStream,
    tx: MessageSocket,
    first: u16,
) {
    let limits = Limits::new(1 << 20, 16);
    let mut p = Vec::new();
    for id in first + 1..=first + 8 {
        send(&tx, id, &[1; 4], &[&eventfd()]);
        let (h, _) = rx.recv(&limits, &mut p).unwrap();
        rx.send_reply(&h.reply(0), &[]).unwrap();
        if readable(&client).len() != 16 {
            held.push(id);
        }
    }
    assert_eq!(held, [first, first + 8], "one look in eight");
}

#[test]
fn poll_sends_held_replies_then_sees_the_next_message_or_gives_up_at_its_limit() {
    use std::time::{Duration, Instant};
    let (client, server) = UnixStream::pair().unwrap();
    let rx = MessageSocket::new(server);
    let limits = Limits::new(1 << 20, 16);
    let mut p = Vec::new();
    // Nothing comes: poll gives up after its limit, having read nothing.
    let t = Instant::now();
    assert!(!rx.poll(Duration::from_millis(20)).unwrap());
    assert!(t.elapsed() >= Duration::from_millis(20));
    // That found the client not ahead: the reply to its next request with
    // an fd goes at once, not held for a look.
    let tx = MessageSocket::new(client.try_clone().unwrap());
    send(&tx, 9, &[9; 4], &[&eventfd()]);
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    rx.send_reply(&h.reply(0), &[]).unwrap();
    assert_eq!(readable(&client).len(), 16, "reply 9 went at once");
    drop(tx);
    // A buffered message: at once.
    let mut burst = message(1, &[1; 4]);
    burst.extend(message(2, &[2; 4]));
    (&client).write_all(&burst).unwrap();
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    rx.send_reply(&h.reply(0), &[]).unwrap();
    assert!(rx.poll(Duration::ZERO).unwrap(), "message 2 is buffered");
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    assert_eq!(h.id, 2);
    rx.send_reply(&h.reply(0), &[]).unwrap();
    // A message that comes while polling, after reply 1 and 2 went out
    // (the client answers only once it has them).
    let answerer = answer_after(client, 32, 3);
    assert!(rx.poll(Duration::from_secs(10)).unwrap());
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    assert_eq!(h.id, 3);
    // Peeking at a message that carries fds leaves them to recv.
    let client = answerer.join().unwrap();
    let tx = MessageSocket::new(client);
    send(&tx, 4, &[4; 4], &[&eventfd()]);
    assert!(rx.poll(Duration::from_secs(10)).unwrap());
    let (h, fds) = rx.recv(&limits, &mut p).unwrap();
    assert_eq!((h.id, fds.len()), (4, 1));
    // The peer's end: poll sees it, recv reports it.
    drop(tx);
    assert!(rx.poll(Duration::from_secs(10)).unwrap());
    assert!(matches!(rx.recv(&limits, &mut p), Err(RecvError::Closed)));
}

#[test]
fn wait_readable_sleeps_until_input_or_its_limit_and_sends_held_replies_first() {
    use std::time::{Duration, Instant};
    let (client, rx, tx, limits) = server_and_client();
    let mut p = Vec::new();
    let t = Instant::now();
    assert!(!rx.wait_readable(Duration::from_millis(20)).unwrap());
    assert!(t.elapsed() >= Duration::from_millis(20));
    // Buffered input: at once.
    (&client).write_all(&message(1, &[1; 4])).unwrap();
    assert!(rx.wait_readable(Duration::ZERO).unwrap());
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    rx.send_reply(&h.reply(0), &[]).unwrap();
    // A request with an fd: its reply is held (more may be queued), and
    // goes out before the wait sleeps; the peer sends request 3 only once
    // it has replies 1 and 2.
    send(&tx, 2, &[2; 4], &[&eventfd()]);
    let (h, fds) = rx.recv(&limits, &mut p).unwrap();
    assert_eq!((h.id, fds.len()), (2, 1));
    rx.send_reply(&h.reply(0), &[]).unwrap();
    let answerer = answer_after(client, 32, 3);
    assert!(rx.wait_readable(Duration::from_secs(10)).unwrap());
    let (h, _) = rx.recv(&limits, &mut p).unwrap();
    assert_eq!(h.id, 3);
    // The end of the stream is readable too.
    drop(answerer.join().unwrap());
    drop(tx);
    assert!(rx.wait_readable(Duration::from_secs(10)).unwrap());
    assert!(matches!(rx.recv(&limits, &mut p), Err(RecvError::Closed)));
}
