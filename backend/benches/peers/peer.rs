//! The peer: rust-vmm's `vfio_user` crate server with a small backend that
//! stands in for airlock's edu where the benchmark touches it: BAR0 of
//! 1 MiB (ident at 0, a liveness register at 4 that reads back ~written,
//! a 4 KiB buffer at 0x40000), DMA maps kept with their fd until unmapped,
//! SET_IRQS eventfds kept per (index, vector).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::Path;

use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

const BUF: u64 = 0x40000;
const BUF_LEN: usize = 4096;
const REGION_FLAG_READ: u32 = 1;
const REGION_FLAG_WRITE: u32 = 2;
const IRQ_INFO_EVENTFD: u32 = 1;

pub struct PeerEdu {
    liveness: u32,
    buf: Vec<u8>,
    maps: BTreeMap<u64, (u64, Option<File>)>,
    /// [index][vector] -> the eventfd the client assigned.
    irqs: Vec<Vec<Option<File>>>,
}

impl PeerEdu {
    pub fn new() -> Self {
        PeerEdu {
            liveness: 0,
            buf: vec![0; BUF_LEN],
            maps: BTreeMap::new(),
            irqs: (0..3).map(|_| Vec::new()).collect(),
        }
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl ServerBackend for PeerEdu {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        if region != 0 {
            data.fill(0);
            return Ok(());
        }
        match offset {
            0 => data.copy_from_slice(&0x010000edu32.to_le_bytes()[..data.len().min(4)]),
            4 => data.copy_from_slice(&(!self.liveness).to_le_bytes()[..data.len().min(4)]),
            o if o >= BUF && o + data.len() as u64 <= BUF + BUF_LEN as u64 => {
                let at = (o - BUF) as usize;
                data.copy_from_slice(&self.buf[at..at + data.len()]);
            }
            _ => data.fill(0xff),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        if region != 0 {
            return Ok(());
        }
        match offset {
            4 if data.len() == 4 => {
                self.liveness = u32::from_le_bytes(data.try_into().expect("4 bytes"))
            }
            o if o >= BUF && o + data.len() as u64 <= BUF + BUF_LEN as u64 => {
                let at = (o - BUF) as usize;
                self.buf[at..at + data.len()].copy_from_slice(data);
            }
            _ => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        _offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        if self.maps.contains_key(&address) {
            return Err(einval());
        }
        self.maps.insert(address, (size, fd));
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        match self.maps.get(&address) {
            Some((s, _)) if *s == size => {
                self.maps.remove(&address);
                Ok(())
            }
            _ => Err(einval()),
        }
    }

    fn reset(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        let v = self.irqs.get_mut(index as usize).ok_or_else(einval)?;
        let end = (start + count) as usize;
        if v.len() < end {
            v.resize_with(end, || None);
        }
        let mut fds = fds.into_iter();
        for slot in &mut v[start as usize..end] {
            *slot = fds.next();
        }
        Ok(())
    }
}

/// rust-vmm's server for the peer device, listening on `path`: regions
/// 0..=8 as a PCI device has them (BAR0 1 MiB, config 4 KiB at index 7),
/// irqs INTx (1), MSI (1), MSI-X (4).
pub fn server(path: &Path) -> Server {
    let regions = (0..9u32)
        .map(|index| {
            let mut r = ServerRegion {
                region_info: Default::default(),
                sparse_areas: Vec::new(),
                mmap_fd: None,
            };
            r.region_info.argsz = 32;
            r.region_info.index = index;
            r.region_info.size = match index {
                0 => 1 << 20,
                7 => 4096,
                _ => 0,
            };
            if r.region_info.size != 0 {
                r.region_info.flags = REGION_FLAG_READ | REGION_FLAG_WRITE;
            }
            r
        })
        .collect();
    let irqs = [1, 1, 4]
        .iter()
        .enumerate()
        .map(|(i, &count)| IrqInfo {
            index: i as u32,
            flags: IRQ_INFO_EVENTFD,
            count,
        })
        .collect();
    Server::new(path, true, irqs, regions).expect("rust-vmm server listens")
}
