//! Message generation: a valid vfio-user message of every command, built
//! from the spec's layouts by hand (not with airlock's encoders), then
//! mutated: bit flips, truncation, extension, lying argsz/count/size
//! fields, odd flags, and fds of every kind attached.

use std::os::fd::{FromRawFd, OwnedFd};

/// xorshift64*: deterministic from the seed, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

pub const VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const DMA_UNMAP: u16 = 3;
pub const GET_INFO: u16 = 4;
pub const REGION_INFO: u16 = 5;
pub const REGION_IO_FDS: u16 = 6;
pub const IRQ_INFO: u16 = 7;
pub const SET_IRQS: u16 = 8;
pub const REGION_READ: u16 = 9;
pub const REGION_WRITE: u16 = 10;
pub const DMA_READ: u16 = 11;
pub const DMA_WRITE: u16 = 12;
pub const RESET: u16 = 13;
pub const WRITE_MULTI: u16 = 15;
pub const FEATURE: u16 = 16;

pub const TYPE_REPLY: u32 = 1;
pub const NO_REPLY: u32 = 0x10;
pub const ERROR: u32 = 0x20;

/// One message to send.
pub struct Message {
    pub cmd: u16,
    pub flags: u32,
    pub payload: Vec<u8>,
    /// What the header's size field says; None: the true size.
    pub size_lie: Option<u32>,
    pub fds: Vec<OwnedFd>,
    /// A human label for reports.
    pub what: String,
}

impl Message {
    pub fn header(&self, id: u16) -> [u8; 16] {
        let size = self.size_lie.unwrap_or((16 + self.payload.len()) as u32);
        let mut h = [0u8; 16];
        h[0..2].copy_from_slice(&id.to_le_bytes());
        h[2..4].copy_from_slice(&self.cmd.to_le_bytes());
        h[4..8].copy_from_slice(&size.to_le_bytes());
        h[8..12].copy_from_slice(&self.flags.to_le_bytes());
        h
    }
    /// Whether a correct server answers it: commands (any type but reply)
    /// without NO_REPLY.
    pub fn wants_reply(&self) -> bool {
        self.flags & 0xf != TYPE_REPLY && self.flags & NO_REPLY == 0
    }
}

struct W(Vec<u8>);
impl W {
    fn u16(&mut self, v: u16) -> &mut W {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut W {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut W {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

pub const CAPS: &str = r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;

pub fn version_payload(json: &str) -> Vec<u8> {
    let mut w = W(Vec::new());
    w.u16(0).u16(0);
    w.0.extend_from_slice(json.as_bytes());
    w.0.push(0);
    w.0
}

fn memfd(size: u64) -> Option<OwnedFd> {
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"blackbox".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own memfd.
    unsafe { libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&fd), size as libc::off_t) };
    Some(fd)
}

/// An fd of a random kind: memfd (any size, also 0), /dev/null, a socket,
/// an eventfd, a pipe end.
pub fn any_fd(r: &mut Rng) -> Option<OwnedFd> {
    match r.below(5) {
        0 => memfd(r.pick(&[0, 4096, 65536, 2 << 20, 12345])),
        1 => std::fs::File::open("/dev/null").ok().map(OwnedFd::from),
        2 => std::os::unix::net::UnixStream::pair()
            .ok()
            .map(|(a, _)| OwnedFd::from(a)),
        3 => {
            // SAFETY: eventfd with integer arguments; checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            // SAFETY: a new fd nobody else owns.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        }
        _ => {
            let mut p = [0; 2];
            // SAFETY: pipe2 writes two fds into p.
            if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return None;
            }
            // SAFETY: both are new fds nobody else owns; one is kept.
            let (a, _b) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
            Some(a)
        }
    }
}

fn eventfd() -> Option<OwnedFd> {
    // SAFETY: eventfd with integer arguments; checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    // SAFETY: a new fd nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn iova(r: &mut Rng) -> u64 {
    match r.below(6) {
        0 => 0,
        1 => 0x8000000,
        2 => r.below(1 << 20) * 4096,
        3 => 0xfee00000,
        4 => r.next(),
        _ => 0x100000 * r.below(64),
    }
}

/// edu BAR0 registers worth writing (DMA, irqs, factorial) and config.
fn region_target(r: &mut Rng) -> (u32, u64) {
    match r.below(8) {
        0..=3 => (
            0,
            r.pick(&[
                0, 4, 8, 0x20, 0x24, 0x60, 0x64, 0x68, 0x80, 0x84, 0x88, 0x8c, 0x90, 0x98, 0xa0,
                0x40000, 0x40ffc, 0xffffc,
            ]),
        ),
        4 => (1, r.pick(&[0, 0x10, 0x800, 0xffc])),
        5 => (
            7,
            r.pick(&[0, 4, 0x10, 0x14, 0x30, 0x34, 0x40, 0x50, 0x60, 0xffc]),
        ),
        _ => (r.below(12) as u32, r.below(1 << 21)),
    }
}

/// A valid message of a random command.
pub fn valid(r: &mut Rng) -> Message {
    let mut fds = Vec::new();
    let (cmd, payload, what): (u16, Vec<u8>, &str) = match r.below(15) {
        0 => (VERSION, version_payload(CAPS), "VERSION"),
        1 | 2 => {
            let size = r.pick(&[4096u64, 65536, 2 << 20]);
            let with_fd = r.chance(85);
            if with_fd {
                if let Some(fd) = memfd(size) {
                    fds.push(fd);
                }
            }
            let mut w = W(Vec::new());
            w.u32(32)
                .u32(r.pick(&[1, 2, 3]))
                .u64(0)
                .u64(iova(r) & !0xfff)
                .u64(size);
            (DMA_MAP, w.0, "DMA_MAP")
        }
        3 => {
            let all = r.chance(20);
            let mut w = W(Vec::new());
            if all {
                w.u32(24).u32(2).u64(0).u64(0);
            } else {
                w.u32(24)
                    .u32(0)
                    .u64(iova(r) & !0xfff)
                    .u64(r.pick(&[4096u64, 65536, 2 << 20]));
            }
            (DMA_UNMAP, w.0, "DMA_UNMAP")
        }
        4 => {
            let mut w = W(Vec::new());
            w.u32(16).u32(0).u32(0).u32(0);
            (GET_INFO, w.0, "DEVICE_GET_INFO")
        }
        5 => {
            let mut w = W(Vec::new());
            w.u32(r.pick(&[32, 64, 256]))
                .u32(0)
                .u32(r.below(10) as u32)
                .u32(0)
                .u64(0)
                .u64(0);
            (REGION_INFO, w.0, "GET_REGION_INFO")
        }
        6 => {
            let mut w = W(Vec::new());
            w.u32(16).u32(0).u32(r.below(10) as u32).u32(0);
            (REGION_IO_FDS, w.0, "GET_REGION_IO_FDS")
        }
        7 => {
            let mut w = W(Vec::new());
            w.u32(16).u32(0).u32(r.below(6) as u32).u32(0);
            (IRQ_INFO, w.0, "GET_IRQ_INFO")
        }
        8 => {
            let index = r.below(4) as u32;
            let start = r.below(4) as u32;
            let count = r.below(4) as u32;
            let action = r.pick(&[1u32 << 3, 1 << 4, 1 << 5]);
            let mut data = Vec::new();
            let kind = match r.below(3) {
                0 => 1u32,
                1 => {
                    data.extend((0..count).map(|_| r.below(2) as u8));
                    2
                }
                _ => {
                    for _ in 0..count {
                        if let Some(e) = eventfd() {
                            fds.push(e);
                        }
                    }
                    4
                }
            };
            let mut w = W(Vec::new());
            w.u32(20 + data.len() as u32)
                .u32(kind | action)
                .u32(index)
                .u32(start)
                .u32(count);
            w.0.extend_from_slice(&data);
            (SET_IRQS, w.0, "SET_IRQS")
        }
        9 | 10 => {
            let (region, offset) = region_target(r);
            let count = r.pick(&[1u32, 2, 4, 8, 4, 4, 64, 4096]);
            let mut w = W(Vec::new());
            w.u64(offset).u32(region).u32(count);
            (REGION_READ, w.0, "REGION_READ")
        }
        11 | 12 => {
            let (region, offset) = region_target(r);
            let count = r.pick(&[1u32, 2, 4, 4, 4, 8]);
            let mut w = W(Vec::new());
            w.u64(offset).u32(region).u32(count);
            let v = match offset {
                0x98 => r.pick(&[1u64, 3, 5, 7]),
                0x80 | 0x88 => {
                    let any = r.next();
                    r.pick(&[0x100000u64, 0x40000, 0x8000000, any])
                }
                0x90 => {
                    let any = r.next();
                    r.pick(&[64u64, 4096, 8, any])
                }
                4 if region == 7 => 0x6,
                _ => r.next(),
            };
            w.0.extend_from_slice(&v.to_le_bytes()[..count as usize]);
            (REGION_WRITE, w.0, "REGION_WRITE")
        }
        13 => {
            let n = r.below(4);
            let mut w = W(Vec::new());
            w.u64(n);
            for _ in 0..n {
                let (region, offset) = region_target(r);
                w.u64(offset).u32(region).u32(4).u64(r.next());
            }
            (WRITE_MULTI, w.0, "REGION_WRITE_MULTI")
        }
        _ => match r.below(4) {
            0 => (RESET, Vec::new(), "DEVICE_RESET"),
            1 => {
                let mut w = W(Vec::new());
                w.u32(16).u32(r.next() as u32).u64(0);
                (FEATURE, w.0, "DEVICE_FEATURE")
            }
            2 => {
                let mut w = W(Vec::new());
                w.u64(0x100000).u32(8).u32(0);
                (
                    r.pick(&[DMA_READ, DMA_WRITE]),
                    w.0,
                    "DMA_READ/WRITE from the client",
                )
            }
            _ => (
                r.pick(&[0u16, 14, 17, 18, 19, 40, 0xffff]),
                vec![0; r.below(32) as usize],
                "unknown command",
            ),
        },
    };
    Message {
        cmd,
        flags: 0,
        payload,
        size_lie: None,
        fds,
        what: what.to_string(),
    }
}

/// A REGION_WRITE of `v` (`count` bytes) at (region, offset).
fn region_write(region: u32, offset: u64, count: u32, v: u64) -> Message {
    let mut w = W(Vec::new());
    w.u64(offset).u32(region).u32(count);
    w.0.extend_from_slice(&v.to_le_bytes()[..count as usize]);
    Message {
        cmd: REGION_WRITE,
        flags: 0,
        payload: w.0,
        size_lie: None,
        fds: Vec::new(),
        what: "REGION_WRITE (DMA recipe)".into(),
    }
}

/// Messages that make the edu device DMA: a map (with an fd, so DMA is
/// direct, or without, so it travels as DMA_READ/DMA_WRITE messages the
/// client answers), bus mastering on, the DMA registers, go.
pub fn dma_recipe(r: &mut Rng) -> Vec<Message> {
    let size = 65536u64;
    let mut fds = Vec::new();
    if r.chance(50) {
        if let Some(fd) = memfd(r.pick(&[size, size, 4096])) {
            fds.push(fd);
        }
    }
    let mut w = W(Vec::new());
    w.u32(32).u32(3).u64(0).u64(0x100000).u64(size);
    let map = Message {
        cmd: DMA_MAP,
        flags: 0,
        payload: w.0,
        size_lie: None,
        fds,
        what: "DMA_MAP (DMA recipe)".into(),
    };
    let to_ram = r.chance(50);
    let ram = 0x100000 + r.below(size / 64) * 64;
    let (src, dst) = if to_ram {
        (0x40000, ram)
    } else {
        (ram, 0x40000)
    };
    vec![
        map,
        region_write(7, 4, 2, 0x6),
        region_write(0, 0x80, 4, src),
        region_write(0, 0x88, 4, dst),
        region_write(0, 0x90, 4, r.pick(&[4u64, 64, 4096, 8192])),
        region_write(0, 0x98, 4, if to_ram { 3 } else { 1 } | r.pick(&[0u64, 4])),
    ]
}

/// Mutates a valid message. A framing-breaking lie about the size is
/// rare (it ends the connection).
pub fn mutate(r: &mut Rng, m: &mut Message) {
    let n = 1 + r.below(3);
    for _ in 0..n {
        match r.below(10) {
            0 | 1 if !m.payload.is_empty() => {
                for _ in 0..1 + r.below(4) {
                    let i = r.below(m.payload.len() as u64) as usize;
                    m.payload[i] ^= 1 << r.below(8);
                }
                m.what += " +bitflip";
            }
            2 if !m.payload.is_empty() => {
                let to = r.below(m.payload.len() as u64) as usize;
                m.payload.truncate(to);
                m.what += " +truncated";
            }
            3 => {
                let more = r.pick(&[1usize, 4, 8, 16, 100, 4096]);
                m.payload.extend((0..more).map(|_| r.next() as u8));
                m.what += " +extended";
            }
            4 | 5 if m.payload.len() >= 4 => {
                // A lying argsz / count / index / offset field.
                let at = r.below((m.payload.len() / 4) as u64) as usize * 4;
                let any = r.next() as u32;
                let v = r.pick(&[0u32, 1, 0xffff_ffff, 0x8000_0000, 0x7fff_ffff, 4096, any]);
                m.payload[at..at + 4].copy_from_slice(&v.to_le_bytes());
                m.what += " +field";
            }
            6 => {
                let any = r.next() as u32;
                m.flags = r.pick(&[
                    TYPE_REPLY,
                    NO_REPLY,
                    ERROR,
                    TYPE_REPLY | ERROR,
                    2,
                    0xf,
                    NO_REPLY | TYPE_REPLY,
                    any,
                ]);
                m.what += " +flags";
            }
            7 | 8 => {
                for _ in 0..r.pick(&[1u64, 1, 2, 8, 17, 20]) {
                    if let Some(fd) = any_fd(r) {
                        m.fds.push(fd);
                    }
                }
                m.what += " +fds";
            }
            _ => {
                if r.chance(15) {
                    let true_size = 16 + m.payload.len() as u32;
                    m.size_lie = Some(r.pick(&[
                        0,
                        8,
                        15,
                        true_size.wrapping_sub(1),
                        true_size + 1,
                        true_size + 4096,
                        0xffff_ffff,
                        16 + (64 << 20) + 1,
                        16 + (1 << 20) + 8192,
                    ]));
                    m.what += " +size-lie";
                }
            }
        }
    }
}
