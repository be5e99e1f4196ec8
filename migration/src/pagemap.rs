//! Which pages of a mapping were ever populated, from `/proc/self/pagemap`.
//!
//! A page of a private anonymous mapping that is neither present nor swapped out has never
//! been written (or was dropped with `MADV_DONTNEED`): it reads as zero. Knowing that without
//! touching the page lets the first RAM pass send an idle guest's untouched gigabytes as ZERO
//! records without faulting a single page in, and lets the destination skip zero pages that
//! are already zero.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// pagemap entry: page present in RAM.
const PRESENT: u64 = 1 << 63;
/// pagemap entry: page swapped out.
const SWAPPED: u64 = 1 << 62;
/// Entries read per `pread`.
const CHUNK: usize = 8192;

/// A bitmap (one bit per 4 KiB page, LSB first) of the pages of `[host, host + pages * 4096)`
/// that may hold data: present or swapped. `None` when pagemap cannot be read (then every
/// page must be assumed to hold data).
pub fn populated(host: *const u8, pages: usize) -> Option<Vec<u64>> {
    let file = File::open("/proc/self/pagemap").ok()?;
    let first = host as u64 / 4096;
    let mut bitmap = vec![0u64; pages.div_ceil(64)];
    let mut buf = vec![0u8; CHUNK * 8];
    let mut done = 0usize;
    while done < pages {
        let n = CHUNK.min(pages - done);
        let bytes = &mut buf[..n * 8];
        file.read_exact_at(bytes, (first + done as u64) * 8).ok()?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if entry & (PRESENT | SWAPPED) != 0 {
                let page = done + i;
                bitmap[page / 64] |= 1 << (page % 64);
            }
        }
        done += n;
    }
    Some(bitmap)
}

/// Whether `page` is set in a [`populated`] bitmap.
pub fn is_set(bitmap: &[u64], page: usize) -> bool {
    bitmap
        .get(page / 64)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_pages_are_not_populated() {
        let len = 64 * 4096;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let p = addr.cast::<u8>();
        // SAFETY: both offsets are inside the mapping.
        unsafe {
            p.add(3 * 4096).write_volatile(1);
            p.add(40 * 4096 + 17).write_volatile(2);
        }
        let map = populated(p, 64).expect("pagemap readable");
        let set: Vec<usize> = (0..64).filter(|&i| is_set(&map, i)).collect();
        assert_eq!(set, vec![3, 40]);
        // SAFETY: the mapping created above.
        unsafe { libc::munmap(addr, len) };
    }
}
