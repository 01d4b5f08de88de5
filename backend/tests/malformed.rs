//! Given a client that sends a malformed message, airlock answers it with
//! an error reply carrying a real errno (and the same connection keeps
//! working), or closes the connection cleanly when the stream cannot be
//! resynchronized (and the next client is served).

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use airlock_protocol::client::Client;
use airlock_protocol::header::{Header, FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_REPLY};
use airlock_protocol::{Limits, RecvError};
use common::*;
use libc::{E2BIG, EEXIST, EINVAL, EMFILE, ENOENT, ENOSYS, ENOTSUP, EOVERFLOW};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// An error reply with this errno; the connection then still serves.
    Errno(i32),
    /// No reply at all (a posted command); the connection still serves.
    Silent,
    /// The connection is closed (an error reply may come first).
    Close,
}

struct Case {
    name: &'static str,
    /// Negotiate VERSION before sending.
    negotiated: bool,
    setup: fn(&mut Client, &Memfd),
    message: fn(&Memfd) -> (Vec<u8>, Vec<OwnedFd>),
    /// Half-close our side after sending (truncated-stream cases).
    then_shutdown: bool,
    expect: Expect,
}

const ID: u16 = 0x4242;

fn msg(cmd: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    raw(cmd, flags, (16 + payload.len()) as u32, payload)
}

fn raw(cmd: u16, flags: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        id: ID,
        cmd,
        size,
        flags,
        error: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

fn words(ws: &[u64], sizes: &[usize]) -> Vec<u8> {
    let mut v = Vec::new();
    for (w, s) in ws.iter().zip(sizes) {
        v.extend_from_slice(&w.to_ne_bytes()[..*s]);
    }
    v
}

fn region_rw(offset: u64, region: u32, count: u32) -> Vec<u8> {
    words(&[offset, region as u64, count as u64], &[8, 4, 4])
}

fn irq_set(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut v = words(
        &[
            (20 + data.len()) as u64,
            flags as u64,
            index as u64,
            start as u64,
            count as u64,
        ],
        &[4; 5],
    );
    v.extend_from_slice(data);
    v
}

fn dma_map(flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
    words(&[32, flags as u64, offset, iova, size], &[4, 4, 8, 8, 8])
}

fn none(_: &mut Client, _: &Memfd) {}
fn map_one(c: &mut Client, m: &Memfd) {
    c.dma_map(0x100000, 0x10000, 0, 3, Some(m.fd.as_fd()))
        .unwrap();
}
fn no_fds(b: Vec<u8>) -> (Vec<u8>, Vec<OwnedFd>) {
    (b, Vec::new())
}

const GET_INFO: u16 = 4;
const TRIGGER_EVENTFD: u32 = (1 << 5) | (1 << 2);

fn cases() -> Vec<Case> {
    let c = |name, message, expect| Case {
        name,
        negotiated: true,
        setup: none,
        message,
        then_shutdown: false,
        expect,
    };
    vec![
        Case {
            then_shutdown: true,
            ..c(
                "truncated header, then EOF",
                |_| no_fds(vec![1, 0, 4, 0, 32]),
                Expect::Close,
            )
        },
        c(
            "size below the 16-byte header",
            |_| no_fds(raw(GET_INFO, 0, 8, &[])),
            Expect::Close,
        ),
        c(
            "DMA_MAP granting neither read nor write (kernel VFIO: EINVAL)",
            |_| no_fds(msg(2, 0, &dma_map(0, 0, 0x100000, 0x1000))),
            Expect::Errno(EINVAL),
        ),
        c(
            "size 0",
            |_| no_fds(raw(GET_INFO, 0, 0, &[])),
            Expect::Close,
        ),
        c(
            "size 0xffffffff",
            |_| no_fds(raw(GET_INFO, 0, u32::MAX, &[0u8; 64])),
            Expect::Close,
        ),
        c(
            "size just above what airlock drains (16 + 64 MiB + 1)",
            |_| no_fds(raw(10, 0, 16 + (64 << 20) + 1, &[0u8; 4096])),
            Expect::Close,
        ),
        c(
            "SET_IRQS count 0 with start past the index (kernel VFIO: EINVAL)",
            |_| no_fds(msg(8, 0, &irq_set((1 << 5) | 1, 2, 1000, 0, &[]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "SET_IRQS count 0 with eventfd data",
            |_| no_fds(msg(8, 0, &irq_set((1 << 2) | (1 << 5), 2, 0, 0, &[]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "size above the limit, payload sent (drained)",
            |_| no_fds(msg(10, 0, &vec![0u8; (1 << 20) + 8192])),
            Expect::Errno(E2BIG),
        ),
        c(
            "size of 4 GiB announced",
            |_| no_fds(raw(GET_INFO, 0, u32::MAX, &[])),
            Expect::Close,
        ),
        Case {
            then_shutdown: true,
            ..c(
                "EOF in the middle of the payload",
                |_| no_fds(raw(GET_INFO, 0, 32, &[16, 0, 0, 0])),
                Expect::Close,
            )
        },
        c(
            "unknown command 99",
            |_| no_fds(msg(99, 0, &[])),
            Expect::Errno(ENOSYS),
        ),
        c(
            "command number 0",
            |_| no_fds(msg(0, 0, &[])),
            Expect::Errno(ENOSYS),
        ),
        c(
            "reply flag on a request (a reply nobody awaits: dropped, never answered)",
            |_| no_fds(msg(GET_INFO, FLAG_TYPE_REPLY, &[0u8; 16])),
            Expect::Silent,
        ),
        c(
            "message type 2",
            |_| no_fds(msg(GET_INFO, 2, &[0u8; 16])),
            Expect::Errno(EINVAL),
        ),
        c(
            "DMA_READ sent by the client",
            |_| no_fds(msg(11, 0, &[0u8; 16])),
            Expect::Errno(ENOSYS),
        ),
        c(
            "GET_INFO argsz below 16",
            |_| no_fds(msg(GET_INFO, 0, &words(&[8, 0, 0, 0], &[4; 4]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "GET_INFO payload truncated",
            |_| no_fds(msg(GET_INFO, 0, &[16, 0, 0, 0])),
            Expect::Errno(EINVAL),
        ),
        c(
            "GET_INFO carrying an fd",
            |m| {
                (
                    msg(GET_INFO, 0, &words(&[16, 0, 0, 0], &[4; 4])),
                    vec![m.fd.try_clone().unwrap()],
                )
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "GET_REGION_INFO of region 99",
            |_| {
                no_fds(msg(
                    5,
                    0,
                    &words(&[32, 0, 99, 0, 0, 0], &[4, 4, 4, 4, 8, 8]),
                ))
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "GET_IRQ_INFO of index 7",
            |_| no_fds(msg(7, 0, &words(&[16, 0, 7, 0], &[4; 4]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "REGION_READ of region 42",
            |_| no_fds(msg(9, 0, &region_rw(0, 42, 4))),
            Expect::Errno(EINVAL),
        ),
        c(
            "REGION_READ offset + count overflows",
            |_| no_fds(msg(9, 0, &region_rw(u64::MAX - 1, 0, 4))),
            Expect::Errno(EOVERFLOW),
        ),
        c(
            "REGION_READ count above max_data_xfer_size",
            |_| no_fds(msg(9, 0, &region_rw(0, 0, 2 << 20))),
            Expect::Errno(E2BIG),
        ),
        c(
            "REGION_READ past the end of BAR0",
            |_| no_fds(msg(9, 0, &region_rw((1 << 20) - 2, 0, 4))),
            Expect::Errno(EINVAL),
        ),
        c(
            "REGION_READ with trailing data",
            |_| no_fds(msg(9, 0, &[region_rw(0, 0, 4), vec![1, 2, 3, 4]].concat())),
            Expect::Errno(EINVAL),
        ),
        c(
            "REGION_WRITE count larger than its data",
            |_| no_fds(msg(10, 0, &[region_rw(0, 0, 8), vec![1, 2, 3, 4]].concat())),
            Expect::Errno(EINVAL),
        ),
        c(
            "REGION_WRITE to an empty region (BAR5)",
            |_| no_fds(msg(10, 0, &[region_rw(0, 5, 4), vec![0; 4]].concat())),
            Expect::Errno(EINVAL),
        ),
        c(
            "posted REGION_WRITE to region 42 gets no reply",
            |_| {
                no_fds(msg(
                    10,
                    FLAG_NO_REPLY,
                    &[region_rw(0, 42, 4), vec![0; 4]].concat(),
                ))
            },
            Expect::Silent,
        ),
        c(
            "REGION_WRITE_MULTI count disagrees with its size",
            |_| no_fds(msg(15, 0, &words(&[3], &[8]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "SET_IRQS start + count overflows",
            |_| no_fds(msg(8, 0, &irq_set((1 << 5) | 1, 2, u32::MAX, 2, &[]))),
            Expect::Errno(EOVERFLOW),
        ),
        c(
            "SET_IRQS DATA_BOOL of the wrong length",
            |_| no_fds(msg(8, 0, &irq_set((1 << 5) | 2, 2, 0, 4, &[1, 1]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "SET_IRQS with two data flags",
            |_| no_fds(msg(8, 0, &irq_set((1 << 5) | 3, 2, 0, 1, &[]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "SET_IRQS with no action flag",
            |_| no_fds(msg(8, 0, &irq_set(1, 2, 0, 1, &[]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "SET_IRQS argsz disagrees with the payload",
            |_| {
                no_fds(msg(
                    8,
                    0,
                    &[irq_set((1 << 5) | 1, 2, 0, 1, &[]), vec![0; 4]].concat(),
                ))
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "SET_IRQS too few eventfds",
            |_| {
                (
                    msg(8, 0, &irq_set(TRIGGER_EVENTFD, 2, 0, 2, &[])),
                    vec![eventfd()],
                )
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "SET_IRQS eventfds without DATA_EVENTFD",
            |_| {
                (
                    msg(8, 0, &irq_set((1 << 5) | 1, 2, 0, 1, &[])),
                    vec![eventfd()],
                )
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "SET_IRQS of irq index 9",
            |_| no_fds(msg(8, 0, &irq_set((1 << 5) | 1, 9, 0, 1, &[]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "SET_IRQS past the last MSI-X vector",
            |_| {
                (
                    msg(8, 0, &irq_set(TRIGGER_EVENTFD, 2, 3, 2, &[])),
                    vec![eventfd(), eventfd()],
                )
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "SET_IRQS mask on MSI (not maskable)",
            |_| no_fds(msg(8, 0, &irq_set((1 << 3) | 1, 1, 0, 1, &[]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "more fds than max_msg_fds",
            |_| {
                (
                    msg(8, 0, &irq_set(TRIGGER_EVENTFD, 2, 0, 4, &[])),
                    (0..20).map(|_| eventfd()).collect(),
                )
            },
            Expect::Errno(EMFILE),
        ),
        Case {
            setup: map_one,
            ..c(
                "DMA_MAP overlapping an existing map",
                |m| {
                    (
                        msg(2, 0, &dma_map(3, 0, 0x108000, 0x10000)),
                        vec![m.fd.try_clone().unwrap()],
                    )
                },
                Expect::Errno(EEXIST),
            )
        },
        c(
            "DMA_UNMAP of an unknown range",
            |_| no_fds(msg(3, 0, &words(&[24, 0, 0x500000, 0x1000], &[4, 4, 8, 8]))),
            Expect::Errno(ENOENT),
        ),
        Case {
            setup: map_one,
            ..c(
                "DMA_UNMAP of part of a map",
                |_| no_fds(msg(3, 0, &words(&[24, 0, 0x100000, 0x1000], &[4, 4, 8, 8]))),
                Expect::Errno(ENOENT),
            )
        },
        c(
            "DMA_UNMAP asking for a dirty bitmap",
            |_| no_fds(msg(3, 0, &words(&[24, 1, 0x100000, 0x1000], &[4, 4, 8, 8]))),
            Expect::Errno(EINVAL),
        ),
        c(
            "DMA_MAP with unsupported flag bit 2",
            |m| {
                (
                    msg(2, 0, &dma_map(7, 0, 0x100000, 0x1000)),
                    vec![m.fd.try_clone().unwrap()],
                )
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "DMA_MAP with argsz 24",
            |m| {
                (
                    msg(
                        2,
                        0,
                        &[
                            &24u32.to_ne_bytes()[..],
                            &dma_map(3, 0, 0x100000, 0x1000)[4..],
                        ]
                        .concat(),
                    ),
                    vec![m.fd.try_clone().unwrap()],
                )
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "DMA_MAP of an unaligned IOVA",
            |m| {
                (
                    msg(2, 0, &dma_map(3, 0, 0x100800, 0x1000)),
                    vec![m.fd.try_clone().unwrap()],
                )
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "DMA_MAP address + size overflows",
            |m| {
                (
                    msg(2, 0, &dma_map(3, 0, u64::MAX - 0xfff, 0x2000)),
                    vec![m.fd.try_clone().unwrap()],
                )
            },
            Expect::Errno(EOVERFLOW),
        ),
        c(
            "DMA_MAP larger than its memfd",
            |m| {
                (
                    msg(2, 0, &dma_map(3, 0, 0x100000, 0x1000_0000)),
                    vec![m.fd.try_clone().unwrap()],
                )
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "DMA_MAP of size 0",
            |m| {
                (
                    msg(2, 0, &dma_map(3, 0, 0x100000, 0)),
                    vec![m.fd.try_clone().unwrap()],
                )
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "DMA_MAP with two fds",
            |m| {
                (
                    msg(2, 0, &dma_map(3, 0, 0x100000, 0x1000)),
                    vec![m.fd.try_clone().unwrap(), m.fd.try_clone().unwrap()],
                )
            },
            Expect::Errno(EINVAL),
        ),
        c(
            "DMA_MAP of an eventfd (not memory)",
            |_| (msg(2, 0, &dma_map(3, 0, 0x100000, 0x1000)), vec![eventfd()]),
            Expect::Errno(EINVAL),
        ),
        c(
            "DEVICE_RESET with a payload",
            |_| no_fds(msg(13, 0, &[0; 4])),
            Expect::Errno(EINVAL),
        ),
        c(
            "DEVICE_FEATURE (none offered)",
            |_| no_fds(msg(16, 0, &words(&[8, (1 << 16) | 1], &[4, 4]))),
            Expect::Errno(ENOTSUP),
        ),
        c(
            "MIG_DATA_READ (no migration)",
            |_| no_fds(msg(17, 0, &words(&[8, 64], &[4, 4]))),
            Expect::Errno(ENOTSUP),
        ),
        c(
            "second VERSION",
            |_| no_fds(msg(1, 0, &[0, 0, 0, 0])),
            Expect::Errno(EINVAL),
        ),
        Case {
            negotiated: false,
            ..c(
                "command before VERSION",
                |_| no_fds(msg(GET_INFO, 0, &words(&[16, 0, 0, 0], &[4; 4]))),
                Expect::Errno(EINVAL),
            )
        },
        Case {
            negotiated: false,
            ..c(
                "VERSION with broken JSON",
                |_| no_fds(msg(1, 0, b"\0\0\0\0{\"capabilities\":\0")),
                Expect::Errno(EINVAL),
            )
        },
        Case {
            negotiated: false,
            ..c(
                "VERSION with a wrongly typed capability",
                |_| {
                    no_fds(msg(
                        1,
                        0,
                        b"\0\0\0\0{\"capabilities\":{\"max_msg_fds\":\"many\"}}\0",
                    ))
                },
                Expect::Errno(EINVAL),
            )
        },
        Case {
            negotiated: false,
            ..c(
                "VERSION major 1",
                |_| no_fds(msg(1, 0, &[1, 0, 0, 0])),
                Expect::Errno(ENOTSUP),
            )
        },
        Case {
            negotiated: false,
            ..c(
                "VERSION truncated to 2 bytes",
                |_| no_fds(msg(1, 0, &[0, 0])),
                Expect::Errno(EINVAL),
            )
        },
    ]
}

/// After an error reply, the same connection must still answer GET_INFO.
fn still_serves(c: &mut Client, negotiated: bool) {
    if !negotiated {
        c.negotiate(Client::qemu_capabilities()).unwrap();
    }
    let info = c
        .device_info()
        .expect("the connection serves after the bad message");
    assert_eq!(info.num_regions, 9);
}

fn run(case: &Case, s: &Server) -> Result<(), String> {
    let mut c = Client::connect(&s.path).map_err(|e| e.to_string())?;
    c.socket()
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    if case.negotiated {
        c.negotiate(Client::qemu_capabilities())
            .map_err(|e| e.to_string())?;
    }
    let mem = Memfd::new(0x20000);
    (case.setup)(&mut c, &mem);
    let (bytes, fds) = (case.message)(&mem);
    let borrowed: Vec<BorrowedFd> = fds.iter().map(|f| f.as_fd()).collect();
    c.socket()
        .send_raw(&bytes, &borrowed)
        .map_err(|e| format!("send: {e}"))?;
    if case.then_shutdown {
        c.socket()
            .stream()
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
    }
    match case.expect {
        Expect::Silent => still_serves(&mut c, case.negotiated),
        Expect::Errno(errno) => {
            let mut payload = Vec::new();
            let (h, _) = c
                .socket()
                .recv(&Limits::default(), &mut payload)
                .map_err(|e| format!("no reply: {e:?}"))?;
            if h.id != ID
                || h.flags != FLAG_TYPE_REPLY | FLAG_ERROR
                || h.error != errno as u32
                || h.size != 16
            {
                return Err(format!("expected error reply errno {errno}, got {h:?}"));
            }
            still_serves(&mut c, case.negotiated);
        }
        Expect::Close => {
            let mut payload = Vec::new();
            loop {
                match c.socket().recv(&Limits::default(), &mut payload) {
                    Err(RecvError::Closed) => break,
                    Ok((h, _)) if h.is_error() => continue,
                    other => return Err(format!("expected a close, got {other:?}")),
                }
            }
            // The next client is served once this one has gone.
            drop(c);
            let mut next = connect(s);
            still_serves(&mut next, true);
        }
    }
    Ok(())
}

#[test]
fn every_malformed_message_gets_an_errno_or_a_clean_close_and_service_goes_on() {
    let s = start_edu("malformed");
    let cases = cases();
    assert!(cases.len() >= 25, "the table keeps at least 25 cases");
    let mut failed = Vec::new();
    for case in &cases {
        match run(case, &s) {
            Ok(()) => println!("ok   {}", case.name),
            Err(e) => {
                println!("FAIL {}: {e}", case.name);
                failed.push(case.name);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed: {failed:?}",
        failed.len(),
        cases.len()
    );
    println!("{} malformed-input cases passed", cases.len());
}
