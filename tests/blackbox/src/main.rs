//! airlock-blackbox-fuzz: mutated vfio-user conversations against the real
//! airlock binary with its default settings (sandbox on), over its socket.
//!
//! Each connection negotiates (mostly), then sends valid messages of every
//! command, many of them mutated (see gen.rs), checking the conversation:
//! every command that wants a reply gets exactly one, with its id and
//! command, in order (else a desync); nothing answers a posted command or
//! a reply; no read waits past the timeout (else a hang). A message that
//! lies about its size ends its connection: the server may answer it once,
//! then must close. After each connection a fresh client must negotiate
//! and read BAR0 offset 0 = 0x010000ed, and the server process must be the
//! same one (else a server death). Bounded by message count and time.
//!
//!   airlock-blackbox-fuzz --airlock target/release/airlock \
//!       [--messages 1000000] [--seconds 1800] [--seed N]
//!
//! Ends with a line "blackbox: N passed, M failed" (N = connections).

mod gen;

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use airlock_protocol::{Header, Limits, MessageSocket, RecvError};
use gen::*;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counts {
    connections: u64,
    messages: u64,
    mutated: u64,
    replies: u64,
    error_replies: u64,
    server_dma: u64,
    framing_lies: u64,
    deaths: u64,
    desyncs: u64,
    hangs: u64,
    unexpected_closes: u64,
    health_failures: u64,
}

struct Args {
    airlock: PathBuf,
    messages: u64,
    seconds: u64,
    seed: u64,
    verbose: bool,
}

fn args() -> Args {
    let mut a = Args {
        airlock: PathBuf::from("target/release/airlock"),
        messages: 1_000_000,
        seconds: 1800,
        seed: 0x5eed_a1b0,
        verbose: false,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = || v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--airlock" => a.airlock = PathBuf::from(val()),
            "--messages" => a.messages = val().parse().expect("--messages N"),
            "--seconds" => a.seconds = val().parse().expect("--seconds N"),
            "--seed" => a.seed = val().parse().expect("--seed N"),
            "--verbose" => {
                a.verbose = true;
                i += 1;
                continue;
            }
            other => {
                eprintln!(
                    "unknown argument {other}; see the doc comment in tests/blackbox/src/main.rs"
                );
                std::process::exit(2);
            }
        }
        i += 2;
    }
    a
}

/// The airlock under test, with its log.
struct Airlock {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Airlock {
    fn start(bin: &Path, dir: &Path, n: u32) -> Airlock {
        let sock = dir.join(format!("edu{n}.sock"));
        let log = dir.join(format!("airlock{n}.log"));
        let child = Command::new(bin)
            .args(["--socket-path", sock.to_str().unwrap(), "--emulate", "edu"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let t = Instant::now();
        while !sock.exists() {
            assert!(t.elapsed() < TIMEOUT, "airlock did not create its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        let a = Airlock { child, sock, log };
        // The supervisor binds the socket before it starts the sandboxed
        // server: without this wait the first connection could see the
        // server's pid go from 0 (not started yet) to its pid, and count a
        // death that never happened (seen once in a nested L1).
        while a.server_pid() == 0 {
            assert!(
                t.elapsed() < TIMEOUT,
                "airlock's supervisor started no server"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        a
    }

    /// The sandboxed server (the supervisor's child), 0 if none.
    fn server_pid(&self) -> u32 {
        let sup = self.child.id();
        std::fs::read_to_string(format!("/proc/{sup}/task/{sup}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Airlock {
    fn drop(&mut self) {
        // SAFETY: kill with our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn connect(path: &Path) -> std::io::Result<MessageSocket> {
    let s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok(MessageSocket::new(s))
}

/// What waiting for a reply found.
enum Outcome {
    Ok,
    Desync(String),
    Hang,
    Closed,
}

/// Answers a server-to-client command (device DMA) so the conversation
/// goes on: DMA_READ gets zeros in QEMU's layout, DMA_WRITE an empty reply.
fn answer(sock: &MessageSocket, h: &Header, payload: &[u8], c: &mut Counts) {
    c.server_dma += 1;
    if h.no_reply() {
        return;
    }
    if h.cmd == DMA_READ && payload.len() >= 12 {
        let count = u32::from_le_bytes(payload[8..12].try_into().unwrap()).min(1 << 20);
        let mut body = payload[..12].to_vec();
        body.resize(12 + count as usize + 4, 0);
        let _ = sock.send(&h.reply(body.len()), &[&body], &[]);
    } else if h.cmd == DMA_WRITE {
        let _ = sock.send(&h.reply(0), &[], &[]);
    } else {
        let _ = sock.send(&h.error_reply(libc::ENOSYS), &[], &[]);
    }
}

fn is_timeout(e: &airlock_protocol::ProtocolError) -> bool {
    matches!(e, airlock_protocol::ProtocolError::Io(io)
        if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

/// Reads until the reply to (id, cmd) arrives.
fn await_reply(sock: &MessageSocket, id: u16, cmd: u16, c: &mut Counts) -> Outcome {
    let limits = Limits::new(64 << 20, 64);
    let mut p = Vec::new();
    loop {
        match sock.recv(&limits, &mut p) {
            Ok((h, _fds)) if !h.is_reply() => answer(sock, &h, &p, c),
            Ok((h, _)) if h.id == id && h.cmd == cmd => {
                c.replies += 1;
                if h.is_error() {
                    c.error_replies += 1;
                }
                return Outcome::Ok;
            }
            Ok((h, _)) => {
                return Outcome::Desync(format!(
                    "awaited the reply to id {id} cmd {cmd}, got id {} cmd {} flags {:#x}",
                    h.id, h.cmd, h.flags
                ))
            }
            Err(RecvError::Closed) => return Outcome::Closed,
            Err(RecvError::Fatal(e)) if is_timeout(&e) => return Outcome::Hang,
            Err(e) => return Outcome::Desync(format!("unreadable message from the server: {e:?}")),
        }
    }
}

/// The (id, cmd) pairs a server may answer once it has `bytes` and then
/// EOF: it frames them by their size fields as it must; a header with a
/// size below 16 or above what it drains is answered and ends the stream,
/// an incomplete last message is never answered.
fn framed(bytes: &[u8]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 16 <= bytes.len() {
        let h = Header::decode(bytes[pos..pos + 16].try_into().unwrap());
        let size = h.size as usize;
        if !(16..=16 + (64 << 20)).contains(&size) {
            out.push((h.id, h.cmd));
            break;
        }
        if pos + size > bytes.len() {
            break;
        }
        out.push((h.id, h.cmd));
        pos += size;
    }
    out
}

/// After a framing lie: the server answers at most the messages it could
/// frame (in order, each once), then closes once the client has.
fn await_close(sock: &MessageSocket, allowed: &[(u16, u16)], c: &mut Counts) -> Outcome {
    let _ = sock.stream().shutdown(std::net::Shutdown::Write);
    let limits = Limits::new(64 << 20, 64);
    let mut p = Vec::new();
    let mut next = 0;
    loop {
        match sock.recv(&limits, &mut p) {
            Ok((h, _)) if !h.is_reply() => answer(sock, &h, &p, c),
            Ok((h, _)) => match allowed[next..].iter().position(|a| *a == (h.id, h.cmd)) {
                Some(i) => next += i + 1,
                None => {
                    return Outcome::Desync(format!(
                        "after a size lie, a reply to id {} cmd {} (flags {:#x}), not one of the framed messages {allowed:?}",
                        h.id, h.cmd, h.flags
                    ))
                }
            },
            Err(RecvError::Closed) => return Outcome::Ok,
            Err(RecvError::Fatal(e)) if is_timeout(&e) => return Outcome::Hang,
            // A reset or a truncated last message is a close too.
            Err(RecvError::Fatal(_)) => return Outcome::Ok,
            Err(e) => return Outcome::Desync(format!("unreadable message: {e:?}")),
        }
    }
}

/// One fuzzed connection of up to `budget` messages; returns how many
/// were sent and the first failure.
fn conversation(
    path: &Path,
    r: &mut Rng,
    budget: u64,
    c: &mut Counts,
) -> (u64, Option<(Outcome, String)>) {
    let sock = match connect(path) {
        Ok(s) => s,
        Err(e) => {
            return (
                0,
                Some((Outcome::Desync(format!("connect: {e}")), "connect".into())),
            )
        }
    };
    let mut id: u16 = 0;
    let mut sent = 0;
    if r.chance(90) {
        id += 1;
        let m = Message {
            cmd: VERSION,
            flags: 0,
            payload: version_payload(CAPS),
            size_lie: None,
            fds: Vec::new(),
            what: "VERSION".into(),
        };
        sent += 1;
        if let Some(f) = exchange(&sock, id, &m, c) {
            return (sent, Some((f, m.what)));
        }
    }
    let n = (1 + r.below(200)).min(budget.saturating_sub(sent).max(1));
    let mut recipe = if r.chance(30) {
        dma_recipe(r)
    } else {
        Vec::new()
    };
    recipe.reverse();
    for _ in 0..n {
        id = id.wrapping_add(1);
        let mut m = recipe.pop().unwrap_or_else(|| valid(r));
        if r.chance(if recipe.is_empty() { 50 } else { 10 }) {
            mutate(r, &mut m);
            c.mutated += 1;
        }
        sent += 1;
        if m.size_lie.is_some() {
            c.framing_lies += 1;
            c.messages += 1;
            let fds: Vec<BorrowedFd> = m.fds.iter().map(|f| f.as_fd()).collect();
            let h = Header::decode(&m.header(id));
            if sock.send(&h, &[&m.payload], &fds).is_err() {
                return (sent, None);
            }
            let mut bytes = m.header(id).to_vec();
            bytes.extend_from_slice(&m.payload);
            let o = await_close(&sock, &framed(&bytes), c);
            return (sent, (!matches!(o, Outcome::Ok)).then_some((o, m.what)));
        }
        if let Some(f) = exchange(&sock, id, &m, c) {
            return (sent, Some((f, m.what)));
        }
    }
    (sent, None)
}

/// Sends one well-framed message and checks the answer; None when fine.
fn exchange(sock: &MessageSocket, id: u16, m: &Message, c: &mut Counts) -> Option<Outcome> {
    c.messages += 1;
    let fds: Vec<BorrowedFd> = m.fds.iter().map(|f| f.as_fd()).collect();
    let h = Header::decode(&m.header(id));
    if let Err(e) = sock.send(&h, &[&m.payload], &fds) {
        return Some(Outcome::Desync(format!("send failed: {e}")));
    }
    if !m.wants_reply() {
        return None;
    }
    match await_reply(sock, id, m.cmd, c) {
        Outcome::Ok => None,
        o => Some(o),
    }
}

/// A fresh client: VERSION, then BAR0 offset 0 must read 0x010000ed.
fn healthy(path: &Path, c: &mut Counts) -> Result<(), String> {
    let sock = connect(path).map_err(|e| format!("connect: {e}"))?;
    let v = version_payload(CAPS);
    sock.send(
        &Header::decode(
            &Message {
                cmd: VERSION,
                flags: 0,
                payload: v.clone(),
                size_lie: None,
                fds: vec![],
                what: String::new(),
            }
            .header(1),
        ),
        &[&v],
        &[],
    )
    .map_err(|e| e.to_string())?;
    match await_reply(&sock, 1, VERSION, c) {
        Outcome::Ok => {}
        _ => return Err("no VERSION reply".into()),
    }
    let mut q = Vec::new();
    q.extend_from_slice(&0u64.to_le_bytes());
    q.extend_from_slice(&0u32.to_le_bytes());
    q.extend_from_slice(&4u32.to_le_bytes());
    let h = Header::decode(
        &Message {
            cmd: REGION_READ,
            flags: 0,
            payload: q.clone(),
            size_lie: None,
            fds: vec![],
            what: String::new(),
        }
        .header(2),
    );
    sock.send(&h, &[&q], &[]).map_err(|e| e.to_string())?;
    let mut p = Vec::new();
    let (h, _) = sock
        .recv(&Limits::default(), &mut p)
        .map_err(|e| format!("BAR0 read: {e:?}"))?;
    if h.id != 2 || h.is_error() || p.len() != 20 {
        return Err(format!("BAR0 read reply {h:?}"));
    }
    let v = u32::from_le_bytes(p[16..20].try_into().unwrap());
    if v != 0x010000ed {
        return Err(format!("BAR0[0] = {v:#x}"));
    }
    Ok(())
}

fn main() {
    let a = args();
    let dir = std::env::temp_dir().join(format!("airlock-blackbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut generation = 0;
    let mut airlock = Airlock::start(&a.airlock, &dir, generation);
    let mut r = Rng::new(a.seed);
    let mut c = Counts::default();
    let (mut passed, mut failed) = (0u64, 0u64);
    let t = Instant::now();
    println!(
        "blackbox: fuzzing {} (sandbox on) with up to {} messages / {} s, seed {}",
        a.airlock.display(),
        a.messages,
        a.seconds,
        a.seed
    );
    let mut next_report = 100_000;
    while c.messages < a.messages && t.elapsed().as_secs() < a.seconds {
        let pid = airlock.server_pid();
        let (_, failure) = conversation(&airlock.sock, &mut r, a.messages - c.messages, &mut c);
        c.connections += 1;
        let mut ok = true;
        if let Some((o, what)) = failure {
            let kind = match o {
                Outcome::Desync(why) => {
                    c.desyncs += 1;
                    format!("desync: {why}")
                }
                Outcome::Hang => {
                    c.hangs += 1;
                    "hang".to_string()
                }
                Outcome::Closed => {
                    c.unexpected_closes += 1;
                    "closed".to_string()
                }
                Outcome::Ok => unreachable!(),
            };
            // An unexpected close is only a failure if the server died.
            if !kind.starts_with("closed") {
                ok = false;
                println!("FAIL connection {}: {kind} after {what}", c.connections);
            } else if a.verbose {
                println!(
                    "note: connection {} closed by the server after {what}",
                    c.connections
                );
            }
        }
        if let Err(why) = healthy(&airlock.sock, &mut c) {
            c.health_failures += 1;
            ok = false;
            println!(
                "FAIL connection {}: next client not served: {why}",
                c.connections
            );
        }
        let now = airlock.server_pid();
        if now != pid || !airlock.alive() {
            c.deaths += 1;
            ok = false;
            println!(
                "FAIL connection {}: the server died (pid {pid} -> {now}); log {}",
                c.connections,
                airlock.log.display()
            );
            if !airlock.alive() {
                generation += 1;
                airlock = Airlock::start(&a.airlock, &dir, generation);
            }
        }
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        if c.messages >= next_report {
            println!(
                "  {} messages, {} connections, {:.0} s",
                c.messages,
                c.connections,
                t.elapsed().as_secs_f64()
            );
            next_report += 100_000;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(&airlock.log).unwrap_or_default();
    let supervisor_reports = log
        .lines()
        .filter(|l| l.contains("the sandboxed server (pid"))
        .count();
    println!(
        "blackbox: {} messages ({} mutated, {} size lies) over {} connections in {secs:.0} s: {} replies ({} errors), {} device DMA requests answered",
        c.messages, c.mutated, c.framing_lies, c.connections, c.replies, c.error_replies, c.server_dma
    );
    println!(
        "blackbox: server deaths {}, desyncs {}, hangs {}, next-client failures {}, closes by the server {}, supervisor death reports {}",
        c.deaths, c.desyncs, c.hangs, c.health_failures, c.unexpected_closes, supervisor_reports
    );
    drop(airlock);
    if failed == 0 && supervisor_reports == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("blackbox: logs kept in {}", dir.display());
    }
    println!("blackbox: {passed} passed, {failed} failed");
    std::process::exit(if failed == 0 && supervisor_reports == 0 {
        0
    } else {
        1
    });
}
