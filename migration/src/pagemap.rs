//! Which pages of a mapping were ever populated, from `/proc/self/pagemap`.
//!
//! A page of a private anonymous mapping that is neither present nor swapped out has never
//! been written (or was dropped with `MADV_DONTNEED`): it reads as zero. Knowing that without
//! touching the page lets the first RAM pass send an idle guest's untouched gigabytes as ZERO
//! records without faulting a single page in, and lets the destination skip zero pages that
//! are already zero.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

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

/// Advises the kernel to back `[host, host + len)` with transparent huge pages
/// (`MADV_HUGEPAGE`; the host may refuse, e.g. with THP `never`): one fault then maps 2 MiB
/// instead of 4 KiB.
///
/// # Safety
///
/// The range must be (part of) a private anonymous mapping the caller owns.
pub unsafe fn advise_huge_pages(host: *mut u8, len: usize) {
    // SAFETY: the caller's range; MADV_HUGEPAGE changes how it is backed, never its contents.
    if unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) } != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How the `populate` thread goes on ([`populate`]); checked every 2 MiB.
#[derive(Debug, Default)]
pub struct PopulateControl(AtomicU8);

impl PopulateControl {
    const RUN: u8 = 0;
    const BACKGROUND: u8 = 1;
    const STOP: u8 = 2;

    /// The stream has started: from now on only spare CPU time (`SCHED_IDLE`), so the
    /// stream and the vCPUs come first; a page the stream reaches first is faulted in by the
    /// incoming thread anyway.
    pub fn background(&self) {
        let _ = self
            .0
            .compare_exchange(Self::RUN, Self::BACKGROUND, Relaxed, Relaxed);
    }

    /// Give up: the guest faults in the rest on demand.
    pub fn stop(&self) {
        self.0.store(Self::STOP, Relaxed);
    }
}

/// Faults every page of `ranges` (host address, length) in, front to back, on a helper
/// thread named `populate` that keeps `keep` (what owns the mappings) alive; returns at once.
/// It runs at normal priority until `control` says the stream has started, then only on
/// spare CPU; it gives up when told to.
///
/// Each page gets an atomic `lock or qword [page], 0`: a write fault that maps it (a huge
/// page where the range is advised so) without changing a byte, even while another thread
/// writes the same page: a locked read-modify-write is atomic against every other store, so
/// a concurrent write is never undone. `MADV_POPULATE_WRITE` would do the same from the
/// kernel, but on this kind of host it takes ~10x longer than touching for huge pages.
///
/// # Safety
///
/// Every range must lie inside a readable and writable mapping that `keep` keeps alive, and
/// may be written by other threads only with ordinary stores (never made read-only).
pub unsafe fn populate(
    ranges: Vec<(usize, usize)>,
    keep: impl Send + 'static,
    control: Arc<PopulateControl>,
) {
    let spawned = std::thread::Builder::new()
        .name(String::from("populate"))
        .spawn(move || {
            let _keep = keep;
            let mut background = false;
            for (host, len) in ranges {
                for off in (0..len).step_by(4096) {
                    if off % (2 << 20) == 0 {
                        match control.0.load(Relaxed) {
                            PopulateControl::STOP => return,
                            PopulateControl::BACKGROUND if !background => {
                                background = true;
                                let param = libc::sched_param { sched_priority: 0 };
                                // SAFETY: changes this thread's own policy; `param` is a
                                // valid sched_param.
                                if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) }
                                    != 0
                                {
                                    log::debug!("SCHED_IDLE: {}", std::io::Error::last_os_error());
                                }
                            }
                            _ => {}
                        }
                    }
                    // SAFETY: inside a live mapping (the caller's contract), 8-aligned (page
                    // aligned); `lock or [p], 0` stores back exactly what it read,
                    // atomically. Written as assembly because the compiler turns an
                    // `AtomicU64::fetch_or(0)` into a plain load, and a read fault maps the
                    // shared zero page instead of allocating the page.
                    unsafe {
                        std::arch::asm!(
                            "lock or qword ptr [{p}], 0",
                            p = in(reg) host + off,
                            options(nostack, preserves_flags)
                        );
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the populate thread: {e}");
    }
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
        // Populating maps every page and changes none.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // SAFETY: the mapping stays until the populate thread has dropped `tx`.
        unsafe { populate(vec![(p as usize, len)], tx, Arc::default()) };
        assert!(
            rx.recv().is_err(),
            "the thread ends by dropping its keep value"
        );
        let map = populated(p, 64).expect("pagemap readable");
        assert!((0..64).all(|i| is_set(&map, i)));
        // Allocated, not merely mapped to the shared zero page (which pagemap also shows
        // present, but which is not resident memory of the mapping).
        assert_eq!(resident_kib(addr as usize), len / 1024);
        // SAFETY: inside the mapping.
        unsafe {
            assert_eq!(p.add(3 * 4096).read_volatile(), 1);
            assert_eq!(p.add(40 * 4096 + 17).read_volatile(), 2);
            assert_eq!(p.add(41 * 4096).read_volatile(), 0);
        }
        // SAFETY: the mapping created above.
        unsafe { libc::munmap(addr, len) };
    }

    /// The `Rss:` of the mapping that starts at `start`, from /proc/self/smaps.
    fn resident_kib(start: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps readable");
        let head = format!("{start:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        lines.next().expect("mapping listed");
        let rss = lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .expect("Rss line");
        rss.trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .expect("a number")
    }
}
