//! REGION_READ / REGION_WRITE round trips through airlock, side by side
//! with the floor: a raw AF_UNIX request/reply of the same sizes against an
//! echo thread doing one blocking read and one write per request.
//!
//! Rounds are interleaved (floor, read, write, floor, ...) so machine noise
//! hits all three alike; figures are medians of per-round means. CPU time
//! per operation (getrusage of the whole process, client and server) is
//! printed too: it is steadier than latency on these machines.
//!
//! The airlock binary is measured too, REGION_READ with the sandbox off
//! and on (the sandbox needs root; without it that row is skipped).
//!
//! Everything (this process, its threads, the spawned binaries) is pinned
//! to CPU 0 unless `unpinned` is given: on these 2-vCPU VMs a wakeup of an
//! idle other vCPU sometimes costs ~40 us, and which process lands where
//! changes from run to run, swamping the differences being measured.
//!
//!     cargo bench -p airlock --bench roundtrip [-- ROUNDS OPS] [unpinned]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use airlock::device::emulated::edu::{Edu, REG_LIVENESS};
use airlock::server::{serve, Listener};
use airlock_protocol::client::Client;
use airlock_protocol::header::{Command, Header};
use airlock_protocol::region::RegionAccess;

fn cpu_us() -> f64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into `u`.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 * 1e6 + v.tv_usec as f64;
    t(u.ru_utime) + t(u.ru_stime)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One request/reply exchange on a raw stream: write `req`, read `reply_len`.
fn exchange(s: &mut UnixStream, req: &[u8], reply: &mut [u8]) {
    s.write_all(req).unwrap();
    s.read_exact(reply).unwrap();
}

struct Method {
    name: &'static str,
    stream: UnixStream,
    request: Vec<u8>,
    reply_len: usize,
    per_op_us: Vec<f64>,
    cpu_per_op_us: Vec<f64>,
}

impl Method {
    fn round(&mut self, ops: usize) {
        let mut reply = vec![0u8; self.reply_len];
        let c0 = cpu_us();
        let t0 = Instant::now();
        for _ in 0..ops {
            exchange(&mut self.stream, &self.request, &mut reply);
        }
        self.per_op_us
            .push(t0.elapsed().as_secs_f64() * 1e6 / ops as f64);
        self.cpu_per_op_us.push((cpu_us() - c0) / ops as f64);
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let pinned = !std::env::args().any(|a| a == "unpinned");
    if pinned {
        // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    let rounds = args.first().copied().unwrap_or(31);
    let ops = args.get(1).copied().unwrap_or(2000);

    let dir = std::env::temp_dir().join(format!("airlock-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("edu.sock");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let _ = serve(
            &Listener::local(l),
            Box::new(Edu::new()),
            airlock::server_limits(1 << 20),
        );
    });
    let mut c = Client::connect(&path).unwrap();
    c.negotiate(Client::qemu_capabilities()).unwrap();
    let stream = c.socket().stream().try_clone().unwrap();

    let read = RegionAccess {
        offset: REG_LIVENESS,
        region: 0,
        count: 4,
    };
    let read_req = {
        let p = read.encode(&[]);
        [
            &Header::command(1, Command::RegionRead, p.len(), false).encode()[..],
            &p,
        ]
        .concat()
    };
    let write_req = {
        let p = read.encode(&[1, 2, 3, 4]);
        [
            &Header::command(2, Command::RegionWrite, p.len(), false).encode()[..],
            &p,
        ]
        .concat()
    };
    let read_reply = 16 + 16 + 4;
    let write_reply = 16 + 16;

    // The floor: an echo thread that reads a request of the size airlock
    // gets and answers with a reply of the size airlock sends.
    let (mut floor_client, mut floor_server) = UnixStream::pair().unwrap();
    let (fl_req, fl_rep) = (read_req.len(), read_reply);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; fl_req];
        let out = vec![0u8; fl_rep];
        while floor_server.read_exact(&mut buf).is_ok() {
            if floor_server.write_all(&out).is_err() {
                break;
            }
        }
    });
    let mut warm = vec![0u8; fl_rep];
    for _ in 0..ops {
        exchange(&mut floor_client, &read_req, &mut warm);
    }

    // The real binary, sandbox off and on.
    let mut children = Vec::new();
    let mut binary = |tag: &str, sandbox: &str| -> Option<UnixStream> {
        let sock = dir.join(format!("{tag}.sock"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args([
                "--socket-path",
                sock.to_str().unwrap(),
                "--emulate",
                "edu",
                "--sandbox",
                sandbox,
            ])
            .env("AIRLOCK_LOG", "warn")
            .spawn()
            .ok()?;
        children.push(child);
        for _ in 0..500 {
            if let Ok(mut c) = Client::connect(&sock) {
                c.negotiate(Client::qemu_capabilities()).ok()?;
                return c.socket().stream().try_clone().ok();
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    };
    let bin_off = binary("off", "off");
    // SAFETY: geteuid has no arguments.
    let bin_on = if unsafe { libc::geteuid() } == 0 {
        binary("on", "on")
    } else {
        None
    };
    if bin_on.is_none() {
        println!("SKIP sandbox-on row: not root or the sandbox could not start");
    }

    let read_req_bin = read_req.clone();
    let mut methods = vec![
        Method {
            name: "raw AF_UNIX floor",
            stream: floor_client,
            request: read_req.clone(),
            reply_len: read_reply,
            per_op_us: vec![],
            cpu_per_op_us: vec![],
        },
        Method {
            name: "airlock REGION_READ",
            stream: stream.try_clone().unwrap(),
            request: read_req.clone(),
            reply_len: read_reply,
            per_op_us: vec![],
            cpu_per_op_us: vec![],
        },
        Method {
            name: "airlock REGION_WRITE",
            stream,
            request: write_req,
            reply_len: write_reply,
            per_op_us: vec![],
            cpu_per_op_us: vec![],
        },
    ];
    for (name, s) in [
        ("binary READ sandbox off", bin_off),
        ("binary READ sandbox on", bin_on),
    ] {
        if let Some(stream) = s {
            methods.push(Method {
                name,
                stream,
                request: read_req_bin.clone(),
                reply_len: read_reply,
                per_op_us: vec![],
                cpu_per_op_us: vec![],
            });
        }
    }
    for _ in 0..rounds {
        for m in methods.iter_mut() {
            m.round(ops);
        }
    }
    let floor = median(&mut methods[0].per_op_us.clone());
    let floor_cpu = median(&mut methods[0].cpu_per_op_us.clone());
    println!(
        "round trips: {rounds} interleaved rounds x {ops} ops; medians of per-round means; {}",
        if pinned { "all on CPU 0" } else { "unpinned" }
    );
    println!("(cpu us/op is this process's CPU: for the binary rows only the client's share)");
    println!(
        "{:<26} {:>12} {:>10} {:>14} {:>10}",
        "method", "median us", "x floor", "cpu us/op", "x floor"
    );
    for m in methods.iter_mut() {
        let lat = median(&mut m.per_op_us);
        let cpu = median(&mut m.cpu_per_op_us);
        println!(
            "{:<26} {:>12.2} {:>10.3} {:>14.2} {:>10.3}",
            m.name,
            lat,
            lat / floor,
            cpu,
            cpu / floor_cpu
        );
    }
    drop(methods);
    for mut c in children {
        // SAFETY: kill with a pid we spawned.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
