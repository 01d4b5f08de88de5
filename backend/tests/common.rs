//! Shared test fixtures: the real `airlock` binary serving an emulated edu
//! on a temporary socket with its default settings (sandbox on: what users
//! run, so a syscall missing from the allowlist fails a test), memfd-backed
//! client memory, and eventfds.

#![allow(dead_code)]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use airlock_protocol::client::Client;

/// A running `airlock --emulate edu`; SIGTERM and reaped on drop.
pub struct Server {
    pub path: PathBuf,
    pub child: Child,
    /// airlock's stderr (its log).
    pub log: PathBuf,
    pub _dir: TempDir,
}

pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir(tag: &str) -> TempDir {
    let p = std::env::temp_dir().join(format!(
        "airlock-test-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// Starts `airlock --emulate edu` (sandbox on) on a fresh socket.
pub fn start_edu(tag: &str) -> Server {
    start_edu_args(tag, &[])
}

/// The same with more arguments (e.g. --reserve-iova windows).
pub fn start_edu_args(tag: &str, extra: &[&str]) -> Server {
    spawn_edu(
        tempdir(tag),
        Path::new(env!("CARGO_BIN_EXE_airlock")),
        extra,
        |_| {},
    )
}

/// Starts the airlock binary `exe` as start_edu_args does, its socket and log
/// in `dir`; `setup` adds to the command (e.g. environment) before it runs.
pub fn spawn_edu(
    dir: TempDir,
    exe: &Path,
    extra: &[&str],
    setup: impl FnOnce(&mut Command),
) -> Server {
    let path = dir.0.join("edu.sock");
    let log = dir.0.join("airlock.log");
    let mut cmd = Command::new(exe);
    cmd.args(["--socket-path", path.to_str().unwrap(), "--emulate", "edu"])
        .args(extra)
        .env(
            "AIRLOCK_LOG",
            std::env::var("AIRLOCK_LOG").unwrap_or("info".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if !is_root() {
        eprintln!("!!! not root: airlock runs with --sandbox off (the sandbox needs root); allowlist gaps go unseen");
        cmd.args(["--sandbox", "off"]);
    }
    setup(&mut cmd);
    let child = cmd.spawn().expect("airlock starts");
    let s = Server {
        path,
        child,
        log,
        _dir: dir,
    };
    wait_for("airlock's socket", || s.path.exists());
    s
}

impl Server {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sandboxed server process (the supervisor's child), host pid.
    pub fn server_pid(&self) -> u32 {
        server_pid(self.child.id())
    }

    /// Stops airlock with SIGTERM and returns how it exited.
    pub fn stop(&mut self) -> ExitStatus {
        // SAFETY: kill has no memory arguments.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        wait_exit(&mut self.child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill has no memory arguments.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn wait_exit(c: &mut Child) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "airlock did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sandboxed server: the supervisor's only child (waits for it).
pub fn server_pid(supervisor: u32) -> u32 {
    let mut pid = 0;
    wait_for("the server process", || {
        pid = server_pid_now(supervisor);
        pid != 0
    });
    pid
}

/// The supervisor's current child, or 0 (no waiting).
pub fn server_pid_now(supervisor: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

pub fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// Open fds of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or(0)
}

pub fn connect_path(path: &Path) -> Client {
    let mut c = Client::connect(path).unwrap();
    c.socket()
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    c.negotiate(Client::qemu_capabilities()).unwrap();
    c
}

pub fn connect(s: &Server) -> Client {
    connect_path(&s.path)
}

/// A memfd of `size` bytes, mapped into the test for checking.
pub struct Memfd {
    pub fd: OwnedFd,
    pub ptr: *mut u8,
    pub size: usize,
}

impl Memfd {
    pub fn new(size: usize) -> Memfd {
        // SAFETY: the name is a valid C string; result checked.
        let fd = unsafe { libc::memfd_create(c"airlock-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is new and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: valid fd; size fits off_t.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
        assert_eq!(rc, 0);
        // SAFETY: a fresh shared mapping of the whole memfd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Memfd {
            fd,
            ptr: ptr.cast(),
            size,
        }
    }

    pub fn slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr maps `size` bytes for the life of self; tests are
        // single-threaded on this memory.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.size) }
    }
}

impl Drop for Memfd {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

pub fn eventfd() -> OwnedFd {
    airlock::device::emulated::irq_table::eventfd().unwrap()
}

/// Reads an eventfd's count, waiting up to `ms` for it to become non-zero.
pub fn eventfd_wait(fd: &OwnedFd, ms: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_millis(ms);
    loop {
        let mut b = [0u8; 8];
        let mut f = std::fs::File::from(fd.try_clone().unwrap());
        if let Ok(8) = f.read(&mut b) {
            return u64::from_ne_bytes(b);
        }
        if std::time::Instant::now() >= deadline {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---- driving the emulated edu ------------------------------------------

pub const CFG: u32 = airlock_protocol::device::PCI_CONFIG_REGION_INDEX;
pub const RW: u32 =
    airlock_protocol::dma::DMA_MAP_FLAG_READ | airlock_protocol::dma::DMA_MAP_FLAG_WRITE;

pub fn enable_bus_master(c: &mut Client) {
    let cmd = c.region_read(CFG, 4, 2).unwrap();
    let v = u16::from_le_bytes([cmd[0], cmd[1]]) | 0x6;
    c.region_write(CFG, 4, &v.to_le_bytes()).unwrap();
}

/// Starts an edu DMA (cmd bit 1: device -> RAM) and waits until it ends.
pub fn run_dma(c: &mut Client, src: u64, dst: u64, count: u32, cmd: u32) {
    use airlock::device::emulated::edu::*;
    c.write32(0, REG_DMA_SRC, src as u32).unwrap();
    c.write32(0, 0x84, (src >> 32) as u32).unwrap();
    c.write32(0, REG_DMA_DST, dst as u32).unwrap();
    c.write32(0, 0x8c, (dst >> 32) as u32).unwrap();
    c.write32(0, REG_DMA_COUNT, count).unwrap();
    c.write32(0, REG_DMA_CMD, cmd).unwrap();
    for _ in 0..1000 {
        if c.read32(0, REG_DMA_CMD).unwrap() & 1 == 0 {
            return;
        }
    }
    panic!("DMA did not finish");
}
