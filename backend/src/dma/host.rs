//! airlock's mappings of client files, for a device that needs host
//! addresses (VFIO pins them into the IOMMU): one mapping of the whole file
//! per file and protection, shared by every DMA map into it, and kept for a
//! while after the last of them goes. Guest RAM is one memfd, and a guest
//! behind a vIOMMU maps and unmaps pieces of it per I/O: an mmap and a
//! munmap per DMA map cost two system calls and a TLB shootdown each time.
//!
//! airlock's CPU never touches these mappings; a kept one pins nothing (the
//! IOMMU unmap comes first, see dma/mod.rs) and only holds a reference to
//! the client's file. They all go when the session ends.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::FileId;

/// Unused whole-file mappings kept for the next map into the same file.
const KEEP_IDLE: usize = 4;

/// Files at most this large are mapped whole; a larger one (a sparse file a
/// client made huge) is mapped piece by piece, as each DMA map needs.
const WHOLE_FILE_MAX: u64 = 1 << 40;

struct FileMapping {
    /// (st_dev, st_ino, prot); None: one DMA map's own piece, never shared.
    key: Option<(u64, u64, i32)>,
    ptr: *mut libc::c_void,
    len: usize,
    /// File offset of `ptr`.
    start: u64,
    users: usize,
    /// When it was last handed out (a counter), for eviction.
    used: u64,
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing else
        // unmaps it, and no DMA map uses it any more (users == 0, or the
        // whole cache goes with its session).
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[derive(Default)]
pub(super) struct HostFiles {
    maps: Vec<FileMapping>,
    clock: u64,
}

impl HostFiles {
    /// A host address for [id.offset, + size) of `file` (`file_len` bytes
    /// long, as the caller's fstat found it) with `prot`, counted as one
    /// more user of its mapping until `release`.
    pub fn acquire(
        &mut self,
        file: &File,
        id: &FileId,
        file_len: u64,
        size: u64,
        prot: i32,
    ) -> io::Result<u64> {
        self.clock += 1;
        let (key, offset) = ((id.dev, id.ino, prot), id.offset);
        let end = offset + size;
        if let Some(m) = self
            .maps
            .iter_mut()
            .find(|m| m.key == Some(key) && m.start == 0 && m.len as u64 >= end)
        {
            m.users += 1;
            m.used = self.clock;
            return Ok(m.ptr as u64 + offset);
        }
        let whole = file_len <= WHOLE_FILE_MAX;
        let (start, len, key) = if whole {
            (0, file_len, Some(key))
        } else {
            (offset, size, None)
        };
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let off =
            libc::off_t::try_from(start).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a new shared mapping chosen by the kernel; file is a valid
        // fd for the call. The result is checked and owned by FileMapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.maps.push(FileMapping {
            key,
            ptr,
            len,
            start,
            users: 1,
            used: self.clock,
        });
        Ok(ptr as u64 + offset - start)
    }

    /// One user fewer of the mapping that holds `host`; a piece goes at
    /// once, a whole-file mapping is kept while few enough are idle.
    pub fn release(&mut self, host: u64) {
        let Some(i) = self
            .maps
            .iter()
            .position(|m| (m.ptr as u64..m.ptr as u64 + m.len as u64).contains(&host))
        else {
            return;
        };
        let m = &mut self.maps[i];
        m.users = m.users.saturating_sub(1);
        if m.users == 0 && m.key.is_none() {
            self.maps.swap_remove(i);
        }
        self.trim(KEEP_IDLE);
    }

    /// Unmaps idle mappings, least recently used first, until at most
    /// `keep` are left.
    fn trim(&mut self, keep: usize) {
        loop {
            let idle = self.maps.iter().filter(|m| m.users == 0).count();
            if idle <= keep {
                return;
            }
            let oldest = self
                .maps
                .iter()
                .enumerate()
                .filter(|(_, m)| m.users == 0)
                .min_by_key(|(_, m)| m.used)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => drop(self.maps.swap_remove(i)),
                None => return,
            }
        }
    }

    /// How many mappings exist (tests: what is kept).
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.maps.len()
    }

    /// DMA maps using the mappings, all counted (tests: who holds them).
    #[cfg(test)]
    pub fn users(&self) -> usize {
        self.maps.iter().map(|m| m.users).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    fn memfd(size: u64) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"host-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd nobody else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

    /// acquire as DmaSpace calls it, with the file's fstat.
    fn acquire(h: &mut HostFiles, f: &File, offset: u64, size: u64, prot: i32) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata()?;
        let id = FileId {
            dev: m.dev(),
            ino: m.ino(),
            offset,
        };
        h.acquire(f, &id, m.len(), size, prot)
    }

    #[test]
    fn maps_into_one_file_share_one_mapping_kept_after_the_last_goes() {
        let ram = memfd(1 << 20);
        let mut h = HostFiles::default();
        let a = acquire(&mut h, &ram, 0x1000, 0x1000, RW).unwrap();
        let b = acquire(&mut h, &ram, 0x8000, 0x2000, RW).unwrap();
        assert_eq!(b - a, 0x7000, "one mapping of the whole file");
        assert_eq!(h.count(), 1);
        let ro = acquire(&mut h, &ram, 0x1000, 0x1000, libc::PROT_READ).unwrap();
        assert_eq!(h.count(), 2, "another protection is another mapping");
        h.release(a);
        h.release(b);
        h.release(ro);
        assert_eq!(h.count(), 2, "idle mappings are kept for the next map");
        let again = acquire(&mut h, &ram, 0x1000, 0x1000, RW).unwrap();
        assert_eq!(again, a, "and reused");
        h.release(again);
    }

    #[test]
    fn idle_mappings_are_bounded_and_a_huge_file_is_mapped_piecewise() {
        let mut h = HostFiles::default();
        let files: Vec<File> = (0..KEEP_IDLE + 3).map(|_| memfd(1 << 16)).collect();
        for f in &files {
            let p = acquire(&mut h, f, 0, 0x1000, RW).unwrap();
            h.release(p);
        }
        assert_eq!(h.count(), KEEP_IDLE, "the least recently used go first");
        let huge = memfd(WHOLE_FILE_MAX + (1 << 20));
        let p = acquire(&mut h, &huge, WHOLE_FILE_MAX, 0x1000, RW).unwrap();
        assert_eq!(h.count(), KEEP_IDLE + 1);
        h.release(p);
        assert_eq!(h.count(), KEEP_IDLE, "a piece goes with its map");
    }
}
