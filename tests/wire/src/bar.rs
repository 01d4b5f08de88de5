//! A PCI BAR through sysfs: mmap `/sys/bus/pci/devices/<bdf>/resourceN`
//! (O_RDWR, MAP_SHARED), check the pages another party wrote and write
//! pages of our own. Each page is the text "airlock-<TAG>@0x<offset>\n"
//! repeated, so a page from the wrong offset or the wrong writer is told
//! apart from the right one.

use std::ffi::CString;
use std::io;

pub const PAGE: usize = 4096;

/// The page TAG writes at `off`.
pub fn page(tag: &str, off: u64) -> Vec<u8> {
    let line = format!("airlock-{tag}@0x{off:010x}\n");
    line.bytes().cycle().take(PAGE).collect()
}

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in map(); no reference outlives it.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

fn map(path: &str) -> Result<Mapping, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{path}: {e}"))?
        .len() as usize;
    let c = CString::new(path).map_err(|_| format!("bad path {path}"))?;
    // SAFETY: a NUL-terminated path that lives across the call.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open {path}: {}", io::Error::last_os_error()));
    }
    // SAFETY: a fresh shared mapping of the whole file with no address hint;
    // it aliases nothing of ours.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: fd is ours; the mapping keeps its own reference to the file.
    unsafe { libc::close(fd) };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {path} ({len} bytes): {err}"));
    }
    Ok(Mapping {
        ptr: p as *mut u8,
        len,
    })
}

impl Mapping {
    fn read(&self, off: u64) -> Vec<u8> {
        (0..PAGE)
            // SAFETY: check() keeps off + PAGE within len; volatile because
            // the memory is a device's and other parties write it.
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(off as usize + i)) })
            .collect()
    }

    fn write(&self, off: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: as in read(): inside the mapping, device memory.
            unsafe { std::ptr::write_volatile(self.ptr.add(off as usize + i), b) };
        }
    }

    fn sync(&self) -> io::Result<()> {
        // SAFETY: the whole mapping this Mapping owns.
        let r = unsafe { libc::msync(self.ptr as *mut libc::c_void, self.len, libc::MS_SYNC) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Checks `expect`'s pages at `check` and writes `write_tag`'s at `write`;
/// prints PASS/FAIL lines named after `name`; returns whether all passed.
pub fn run(path: &str, expect: &str, check: &[u64], write_tag: &str, write: &[u64]) -> bool {
    let m = match map(path) {
        Ok(m) => m,
        Err(e) => {
            println!("FAIL bar-mmap: {e}");
            return false;
        }
    };
    println!(
        "INFO bar: {path} mapped, {} MiB at {:p}",
        m.len >> 20,
        m.ptr
    );
    if let Some(&off) = check
        .iter()
        .chain(write)
        .find(|&&o| o as usize + PAGE > m.len)
    {
        println!(
            "FAIL bar-offsets: offset {off:#x} + one page is past the BAR's {} bytes",
            m.len
        );
        return false;
    }
    let mut ok = true;
    let mut bad = vec![];
    for &off in check {
        let got = m.read(off);
        if got != page(expect, off) {
            let text: String = got[..40]
                .iter()
                .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
                .collect();
            bad.push(format!("{off:#x} holds '{text}'"));
        }
    }
    if bad.is_empty() {
        println!(
            "PASS bar-read-{expect}: the host's pattern {expect} at {} page(s) ({}) reads back through the mmap",
            check.len(),
            offsets(check)
        );
    } else {
        ok = false;
        println!("FAIL bar-read-{expect}: {}", bad.join("; "));
    }
    for &off in write {
        m.write(off, &page(write_tag, off));
    }
    let synced = m.sync();
    let back: Vec<u64> = write
        .iter()
        .copied()
        .filter(|&o| m.read(o) != page(write_tag, o))
        .collect();
    match (synced, back.is_empty()) {
        (Ok(()), true) => println!(
            "PASS bar-write-{write_tag}: pattern {write_tag} written at {} page(s) ({}), msync, read back",
            write.len(),
            offsets(write)
        ),
        (s, _) => {
            ok = false;
            println!(
                "FAIL bar-write-{write_tag}: msync {s:?}; pages that did not read back: {}",
                offsets(&back)
            );
        }
    }
    ok
}

fn offsets(v: &[u64]) -> String {
    v.iter()
        .map(|o| format!("{o:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_names_its_tag_and_offset() {
        let p = page("P0", 0x1000_0000);
        assert_eq!(p.len(), PAGE);
        assert!(p.starts_with(b"airlock-P0@0x0010000000\nairlock-P0@"));
        assert_ne!(p, page("P1", 0x1000_0000));
        assert_ne!(p, page("P0", 0));
    }
}
