//! Shared test fixtures: an in-process airlock serving an emulated edu on a
//! temporary socket, memfd-backed client memory, and eventfds.

#![allow(dead_code)]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use airlock::device::edu::Edu;
use airlock::server::{serve, Listener};
use airlock_protocol::client::Client;

pub struct Server {
    pub path: PathBuf,
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

/// Starts airlock --emulate edu in-process on a fresh socket.
pub fn start_edu(tag: &str) -> Server {
    start_edu_with(tag, airlock::server_limits(1 << 20))
}

/// The same with chosen limits (e.g. --reserve-iova windows).
pub fn start_edu_with(tag: &str, limits: airlock::negotiate::ServerLimits) -> Server {
    let dir = tempdir(tag);
    let path = dir.0.join("edu.sock");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let listener = Listener::local(l);
        let _ = serve(&listener, Box::new(Edu::new()), limits);
    });
    Server { path, _dir: dir }
}

pub fn connect(s: &Server) -> Client {
    let mut c = Client::connect(&s.path).unwrap();
    c.socket()
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    c.negotiate(Client::qemu_capabilities()).unwrap();
    c
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
        assert_eq!(
            unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) },
            0
        );
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

    pub fn slice(&self) -> &mut [u8] {
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
    airlock::irq::eventfd().unwrap()
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
