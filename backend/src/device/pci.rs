//! PCI config space of an emulated function: bytes, per-bit write masks,
//! BAR sizing, and a builder for a well-formed capability list.

pub const CONFIG_SPACE_SIZE: usize = 4096;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_PROG: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const ROM_ADDRESS: usize = 0x30;
pub const CAPABILITY_LIST: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_MASTER: u16 = 1 << 2;
pub const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_PARITY: u16 = 1 << 6;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAP_LIST: u16 = 1 << 4;
pub const STATUS_INTERRUPT: u16 = 1 << 3;

pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_EXP: u8 = 0x10;
pub const CAP_ID_MSIX: u8 = 0x11;

pub const MSI_FLAGS_ENABLE: u16 = 1 << 0;
pub const MSI_FLAGS_64BIT: u16 = 1 << 7;
pub const MSIX_FLAGS_ENABLE: u16 = 1 << 15;
pub const MSIX_FLAGS_MASKALL: u16 = 1 << 14;

/// A memory BAR of the function.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub index: usize,
    pub size: u64,
}

pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    /// 1 bits may be written by the client.
    writable: [u8; CONFIG_SPACE_SIZE],
    next_cap: usize,
    last_cap_next: usize,
}

impl ConfigSpace {
    /// A type-0 header for a function with one INTx pin.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            next_cap: 0x40,
            last_cap_next: CAPABILITY_LIST,
        };
        c.set16(VENDOR_ID, vendor);
        c.set16(DEVICE_ID, device);
        c.bytes[REVISION] = revision;
        c.bytes[CLASS_PROG..CLASS_PROG + 3].copy_from_slice(&class.to_le_bytes()[..3]);
        c.bytes[INTERRUPT_PIN] = 1;
        c.writable[INTERRUPT_LINE] = 0xff;
        let cmd = COMMAND_IO
            | COMMAND_MEMORY
            | COMMAND_MASTER
            | COMMAND_PARITY
            | COMMAND_SERR
            | COMMAND_INTX_DISABLE;
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&cmd.to_le_bytes());
        c
    }

    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.set16(SUBSYSTEM_VENDOR_ID, vendor);
        self.set16(SUBSYSTEM_ID, id);
    }

    /// A 32-bit non-prefetchable memory BAR; size is a power of two >= 16.
    pub fn add_mem_bar32(&mut self, bar: Bar) {
        let off = BAR0 + 4 * bar.index;
        let mask = !(bar.size as u32 - 1) & !0xf;
        self.set32(off, 0);
        self.writable[off..off + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Appends a capability with `body` (after the 2-byte id/next header)
    /// and the writable mask for the same bytes; returns its offset.
    pub fn add_cap(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let at = self.next_cap;
        self.bytes[self.last_cap_next] = at as u8;
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + 2 + body.len()].copy_from_slice(body);
        self.writable[at + 2..at + 2 + writable.len()].copy_from_slice(writable);
        self.last_cap_next = at + 1;
        self.next_cap = (at + 2 + body.len() + 3) & !3;
        let status = self.get16(STATUS) | STATUS_CAP_LIST;
        self.set16(STATUS, status);
        at
    }

    pub fn get8(&self, off: usize) -> u8 {
        self.bytes[off]
    }
    pub fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    pub fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[off],
            self.bytes[off + 1],
            self.bytes[off + 2],
            self.bytes[off + 3],
        ])
    }
    pub fn set16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn command(&self) -> u16 {
        self.get16(COMMAND)
    }

    /// Reads config space; the caller checked offset + len <= 4096.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.bytes[offset..offset + out.len()]);
    }

    /// Writes config space through the write mask. BAR sizing works by
    /// itself: the size bits are read-only, so writing all-ones reads back
    /// the size mask.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset + i;
            let m = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !m) | (b & m);
        }
    }

    /// Resets the writable state (command, BARs, capability control bits).
    pub fn reset_writable(&mut self) {
        for i in 0..CONFIG_SPACE_SIZE {
            self.bytes[i] &= !self.writable[i];
        }
    }
}
