//! The live RAM section (`ram`, version 4): pre-copy of guest memory with dirty tracking.
//!
//! The first pass sends every page; later passes send the pages written since the previous
//! *dirty sync*. A sync takes KVM's dirty log (pages the guest wrote) and vm-memory's bitmap
//! (pages the VMM wrote through `Bytes`, e.g. a device model) and ORs both into the migration
//! bitmap. Both sources are fetch-and-cleared atomically and a bit leaves the migration bitmap
//! only when its page is copied into the output, so no write is ever lost; pages whose bytes
//! were buffered but never reached the destination are put back as dirty
//! ([`LiveSection::flush_failed`]).
//!
//! All-zero pages go as ZERO records; with XBZRLE on, a re-dirtied page found in the cache goes
//! as a delta against the copy last sent.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::pagemap;
use crate::ram_format::{
    RamBlockInfo, RamItem, RamRecord, RamRecordReader, RamRecordWriter, RAM_SECTION_VERSION,
};
use crate::xbzrle::{self, XbzrleCache, XbzrleOutcome};
use crate::{LiveSection, SectionError, SectionOutput};

/// Guest memory as hopvm maps it: with vm-memory's bitmap of the VMM's own writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub use crate::stream::PAGE_SIZE;
/// Longest time one iteration may hold the big lock, as QEMU's `MAX_WAIT` (50 ms).
const MAX_ITERATE_TIME: Duration = Duration::from_millis(50);

/// Access to KVM's dirty page log for every RAM region (one memory slot per region).
pub trait DirtyLog: Send {
    /// Switches dirty logging on or off for every slot.
    fn set_logging(&mut self, on: bool) -> std::io::Result<()>;

    /// Fetches the dirty bitmap of region `index`: one bit per page, LSB first. It is also
    /// cleared, unless manual protection is on ([`enable_manual_protect`](Self::enable_manual_protect)).
    fn take_dirty(&mut self, index: usize) -> std::io::Result<Vec<u64>>;

    /// Switches to manual protection if the host offers it (KVM's
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `KVM_DIRTY_LOG_INITIALLY_SET`): `take_dirty`
    /// then only reads the log, a region that starts logging starts all dirty, and
    /// [`clear_dirty`](Self::clear_dirty) clears pages just before they are sent. Called
    /// before logging is first switched on; returns whether manual protection is on.
    fn enable_manual_protect(&mut self) -> bool {
        false
    }

    /// Manual protection: clears the bits set in `bitmap` (bit i = page `first_page + i`,
    /// `first_page` a multiple of 64, `pages` long) of region `index` and write-protects
    /// those pages, so the guest's next write to each is logged again.
    fn clear_dirty(
        &mut self,
        _index: usize,
        _first_page: usize,
        _pages: usize,
        _bitmap: &[u64],
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// Pages per `clear_dirty` call with manual protection: 16 MiB, cleared just before the
/// first of its pages is sent.
const CLEAR_CHUNK_PAGES: usize = 4096;

/// RAM counters, readable without any lock (for `query-migrate`).
#[derive(Debug, Default)]
pub struct RamCounters {
    /// Bytes of RAM records written (headers included).
    pub transferred: AtomicU64,
    /// Zero pages sent (QEMU's `duplicate`).
    pub duplicate: AtomicU64,
    /// Full pages sent.
    pub normal: AtomicU64,
    /// Pages still dirty.
    pub remaining_pages: AtomicU64,
    /// Guest RAM size in bytes.
    pub total: AtomicU64,
    /// Dirty syncs done.
    pub dirty_sync_count: AtomicU64,
    /// Pages found dirty by the last sync.
    pub last_sync_dirty: AtomicU64,
    /// Dirty pages per second over the last sync interval.
    pub dirty_pages_rate: AtomicU64,
    /// XBZRLE: pages sent as deltas.
    pub xbzrle_pages: AtomicU64,
    /// XBZRLE: bytes of deltas sent.
    pub xbzrle_bytes: AtomicU64,
    /// XBZRLE: pages not in the cache.
    pub xbzrle_cache_miss: AtomicU64,
    /// XBZRLE: deltas that would not fit.
    pub xbzrle_overflow: AtomicU64,
    /// Where the time went (with [`PROFILE_ENV`] set).
    pub profile: RamProfile,
}

/// Set this environment variable to have each side print where one migration's time went.
pub const PROFILE_ENV: &str = "HOPVM_MIGRATION_PROFILE";

/// Where a migration's time went (with [`PROFILE_ENV`] set), nanoseconds unless named
/// otherwise. Source: dirty syncs, bitmap scan, zero checks, copies into the output buffer
/// (all under the big lock) and sends (outside it). Destination: reading record headers,
/// reading page data into guest memory, zero-record handling.
#[derive(Debug, Default)]
pub struct RamProfile {
    /// Source: time in dirty syncs (KVM log fetch + OR into the migration bitmap).
    pub sync_ns: AtomicU64,
    /// Source: time in `iterate`/`complete` not spent in zero checks or copies: the bitmap
    /// scan and record bookkeeping.
    pub scan_ns: AtomicU64,
    /// Source: time in zero checks.
    pub zero_check_ns: AtomicU64,
    /// Source: time encoding records into the output buffer (the page copy).
    pub copy_ns: AtomicU64,
    /// Source: time writing the buffer to the transport (outside the lock).
    pub send_ns: AtomicU64,
    /// Source: time waiting for the big lock, or sleeping for the rate limit.
    pub wait_ns: AtomicU64,
    /// Destination: time reading record headers (includes waiting for the network).
    pub recv_header_ns: AtomicU64,
    /// Destination: time reading page data into guest memory (includes page faults).
    pub recv_page_ns: AtomicU64,
    /// Destination: time handling zero records.
    pub recv_zero_ns: AtomicU64,
    /// Minor page faults of the thread that sent or loaded.
    pub faults: AtomicU64,
    /// Source: of `sync_ns`, the time fetching KVM's dirty pages (the bitmap, or reaping
    /// the dirty rings), as the [`DirtyLog`] reports it.
    pub harvest_ns: AtomicU64,
    /// Source, dirty ring: vCPU exits on a full ring (`KVM_EXIT_DIRTY_RING_FULL`).
    pub ring_full_exits: AtomicU64,
    /// Source, dirty ring: time the vCPU threads spent reaping on those exits.
    pub ring_full_ns: AtomicU64,
    /// Source, dirty ring: 1 if KVM was found to have overrun a ring (the migration fails).
    pub ring_overruns: AtomicU64,
}

impl RamProfile {
    fn add(&self, field: &AtomicU64, d: Duration) {
        field.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Adds the time since `t`.
    pub fn add_since(&self, field: &AtomicU64, t: Instant) {
        self.add(field, t.elapsed());
    }

    /// Clears every figure.
    pub fn reset(&self) {
        for f in [
            &self.sync_ns,
            &self.scan_ns,
            &self.zero_check_ns,
            &self.copy_ns,
            &self.send_ns,
            &self.wait_ns,
            &self.recv_header_ns,
            &self.recv_page_ns,
            &self.recv_zero_ns,
            &self.faults,
            &self.harvest_ns,
            &self.ring_full_exits,
            &self.ring_full_ns,
            &self.ring_overruns,
        ] {
            f.store(0, Ordering::Relaxed);
        }
    }

    /// One line of the source side's figures, ms.
    pub fn source_summary(&self) -> String {
        let ms = |f: &AtomicU64| f.load(Ordering::Relaxed) as f64 / 1e6;
        format!(
            "dirty sync {:.1} ms (kvm harvest {:.1} ms), bitmap scan+bookkeeping {:.1} ms, \
             zero check {:.1} ms, copy {:.1} ms, send {:.1} ms, lock/rate wait {:.1} ms, \
             {} page faults, {} dirty-ring-full exits ({:.1} ms reaping in vcpus), \
             dirty-ring overrun {}",
            ms(&self.sync_ns),
            ms(&self.harvest_ns),
            ms(&self.scan_ns),
            ms(&self.zero_check_ns),
            ms(&self.copy_ns),
            ms(&self.send_ns),
            ms(&self.wait_ns),
            self.faults.load(Ordering::Relaxed),
            self.ring_full_exits.load(Ordering::Relaxed),
            ms(&self.ring_full_ns),
            self.ring_overruns.load(Ordering::Relaxed)
        )
    }

    /// One line of the destination side's figures, ms.
    pub fn destination_summary(&self) -> String {
        let ms = |f: &AtomicU64| f.load(Ordering::Relaxed) as f64 / 1e6;
        format!(
            "receive headers {:.1} ms, receive pages into guest memory {:.1} ms, \
             zero records {:.1} ms, {} page faults",
            ms(&self.recv_header_ns),
            ms(&self.recv_page_ns),
            ms(&self.recv_zero_ns),
            self.faults.load(Ordering::Relaxed)
        )
    }
}

/// Minor page faults the calling thread has taken.
pub fn thread_faults() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut u) == 0 {
            u.ru_minflt as u64
        } else {
            0
        }
    }
}

/// XBZRLE settings, changeable while a migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XbzrleSettings {
    /// Whether the capability is on (read when a migration begins).
    pub enabled: bool,
    /// Cache size in bytes (applies at once).
    pub cache_size: u64,
}

impl Default for XbzrleSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            cache_size: xbzrle::DEFAULT_CACHE_SIZE,
        }
    }
}

/// One RAM region: a block in the stream.
struct Block {
    id: String,
    start: u64,
    /// Host address of the block's first byte (its mapping lives as long as `memory`).
    host: usize,
    pages: usize,
    /// The migration bitmap: pages to send.
    dirty: Vec<u64>,
    /// Where the next search for a dirty page starts.
    cursor: usize,
    /// Manual protection: dirty bits fetched from the log but not yet cleared in it.
    uncleared: Vec<u64>,
    /// Manual protection: chunks of [`CLEAR_CHUNK_PAGES`] with bits in `uncleared`.
    clear_pending: Vec<bool>,
    /// Pages that may hold data ([`pagemap::populated`]); `None` means all may. On the source
    /// it is taken when a migration begins and kept up to date with the guest's writes; on
    /// the destination it also records every page the load wrote.
    populated: Option<Vec<u64>>,
    /// Destination: pages some record of this load covered.
    received: Vec<u64>,
}

impl Block {
    fn may_hold_data(&self, page: usize) -> bool {
        self.populated
            .as_ref()
            .is_none_or(|p| pagemap::is_set(p, page))
    }

    fn mark_populated(&mut self, page: usize) {
        if let Some(p) = self.populated.as_mut() {
            p[page / 64] |= 1 << (page % 64);
        }
    }

    fn mark_received(&mut self, page: usize) {
        if let Some(w) = self.received.get_mut(page / 64) {
            *w |= 1 << (page % 64);
        }
    }
}

impl Block {
    fn take_next_dirty(&mut self) -> Option<usize> {
        let words = self.dirty.len();
        let mut w = self.cursor / 64;
        let mut first = true;
        for _ in 0..=words {
            if w >= words {
                w = 0;
            }
            let mut word = self.dirty[w];
            if first {
                word &= !0u64 << (self.cursor % 64);
                first = false;
            }
            if word != 0 {
                let page = w * 64 + word.trailing_zeros() as usize;
                if page < self.pages {
                    self.dirty[w] &= !(1u64 << (page % 64));
                    self.cursor = page + 1;
                    return Some(page);
                }
            }
            w += 1;
        }
        // The loop visits the cursor's word twice: masked first, whole on the way round.
        None
    }

    fn count_dirty(&self) -> u64 {
        self.dirty.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// The live RAM section.
pub struct RamSection {
    memory: GuestMemoryMmap,
    blocks: Vec<Block>,
    dirty_log: Box<dyn DirtyLog>,
    writer: RamRecordWriter,
    reader: RamRecordReader,
    settings: Arc<Mutex<XbzrleSettings>>,
    cache: Option<XbzrleCache>,
    counters: Arc<RamCounters>,
    /// Pages copied into the output since the last confirmed flush: (block, page).
    in_flight: Vec<(usize, usize)>,
    bulk_stage: bool,
    logging: bool,
    loading: bool,
    /// Destination: steers the populate thread (background once the stream starts, stop at
    /// [`LiveSection::load_end`]).
    populate: Arc<pagemap::PopulateControl>,
    /// Destination: the lowest and highest guest-physical page the last load part touched.
    last_load: Option<(u64, u64)>,
    last_sync: Option<Instant>,
    page: Vec<u8>,
    /// `HOPVM_MIGRATION_PROFILE` is set: time each step into [`RamCounters::profile`].
    profiling: bool,
    /// Whether the dirty log uses manual protection (asked once, at the first `begin`).
    manual_protect: Option<bool>,
}

/// What a never-populated page reads as.
static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// Whether a page is all zeros: OR-folds 256-byte runs (which the compiler vectorises) and
/// stops at the first run that is not zero.
fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned middle.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0)
        && tail.iter().all(|b| *b == 0)
        && words
            .chunks(32)
            .all(|run| run.iter().fold(0, |acc, w| acc | w) == 0)
}

/// The host address and length of a RAM region.
fn host_range(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> Option<(*const u8, u64)> {
    region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .ok()
        .map(|h| (h.cast_const(), region.len()))
}

/// The stream id of RAM region `index`: QEMU's main RAM block is `pc.ram`.
fn block_id(index: usize) -> String {
    match index {
        0 => String::from("pc.ram"),
        n => format!("pc.ram.{n}"),
    }
}

impl RamSection {
    /// A RAM section over `memory`, using `dirty_log` for KVM's dirty pages.
    pub fn new(
        memory: GuestMemoryMmap,
        dirty_log: Box<dyn DirtyLog>,
        settings: Arc<Mutex<XbzrleSettings>>,
        counters: Arc<RamCounters>,
    ) -> Self {
        let blocks = memory
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let pages = (r.len() / PAGE_SIZE) as usize;
                Block {
                    id: block_id(i),
                    start: r.start_addr().0,
                    host: host_range(r).map_or(0, |(h, _)| h as usize),
                    pages,
                    dirty: vec![0; pages.div_ceil(64)],
                    cursor: 0,
                    uncleared: Vec::new(),
                    clear_pending: Vec::new(),
                    populated: None,
                    received: Vec::new(),
                }
            })
            .collect();
        Self {
            memory,
            blocks,
            dirty_log,
            writer: RamRecordWriter::new(),
            reader: RamRecordReader::new(),
            settings,
            cache: None,
            counters,
            in_flight: Vec::new(),
            bulk_stage: true,
            logging: false,
            loading: false,
            populate: Arc::default(),
            last_load: None,
            last_sync: None,
            page: vec![0; PAGE_SIZE as usize],
            profiling: std::env::var_os(PROFILE_ENV).is_some(),
            manual_protect: None,
        }
    }

    fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.pages as u64 * PAGE_SIZE).sum()
    }

    fn remaining_pages(&self) -> u64 {
        self.blocks.iter().map(Block::count_dirty).sum()
    }

    fn update_remaining(&self) {
        self.counters
            .remaining_pages
            .store(self.remaining_pages(), Ordering::Relaxed);
    }

    /// Dirty sync: ORs KVM's log and the VMM's bitmap into the migration bitmap.
    fn sync(&mut self) -> Result<(), SectionError> {
        let t0 = Instant::now();
        let mut found = 0u64;
        for (i, region) in self.memory.iter().enumerate() {
            let kvm = self.dirty_log.take_dirty(i)?;
            let mmap: &MmapRegion<AtomicBitmap> = region;
            let vmm = mmap.bitmap().get_and_reset();
            let block = &mut self.blocks[i];
            // A page written since `begin` may hold data whatever pagemap said then. With
            // manual protection KVM's bits include the initially-set ones, so those pages
            // are learnt from pagemap when their chunk is cleared instead.
            let manual = self.manual_protect == Some(true);
            for (w, word) in block.dirty.iter_mut().enumerate() {
                let (k, v) = (
                    kvm.get(w).copied().unwrap_or(0),
                    vmm.get(w).copied().unwrap_or(0),
                );
                let new = k | v;
                found += u64::from((new & !*word).count_ones());
                *word |= new;
                if let Some(p) = block.populated.as_mut() {
                    p[w] |= if manual { v } else { new };
                }
            }
            if self.manual_protect == Some(true) {
                for (w, bits) in kvm.iter().enumerate().take(block.uncleared.len()) {
                    if *bits != 0 {
                        block.uncleared[w] |= bits;
                        block.clear_pending[w * 64 / CLEAR_CHUNK_PAGES] = true;
                    }
                }
            }
        }
        let now = Instant::now();
        let c = &self.counters;
        c.dirty_sync_count.fetch_add(1, Ordering::Relaxed);
        c.last_sync_dirty.store(found, Ordering::Relaxed);
        if let Some(prev) = self.last_sync {
            let secs = now.duration_since(prev).as_secs_f64();
            if secs > 0.0 {
                c.dirty_pages_rate
                    .store((found as f64 / secs) as u64, Ordering::Relaxed);
            }
        }
        self.last_sync = Some(now);
        self.update_remaining();
        if self.profiling {
            c.profile.add_since(&c.profile.sync_ns, t0);
        }
        Ok(())
    }

    /// Copies one page into the output as a ZERO, XBZRLE or PAGE record; returns bytes written.
    ///
    /// The page is read in place from guest memory: its dirty bit was taken before, so a guest
    /// write racing the read dirties it again and it is sent again. Only XBZRLE, whose cache
    /// must hold exactly what the destination got, works on a private copy.
    fn send_page(
        &mut self,
        out: &mut dyn SectionOutput,
        block: usize,
        page: usize,
        last_stage: bool,
    ) -> Result<u64, SectionError> {
        if !last_stage {
            self.clear_before_send(block, page);
        }
        let t0 = self.profiling.then(Instant::now);
        let b = &self.blocks[block];
        let offset = page as u64 * PAGE_SIZE;
        let addr = b.start + offset;
        let known_zero = !b.may_hold_data(page);
        if known_zero && self.bulk_stage {
            // Never populated: no record at all. The destination's copy reads as zero too —
            // fresh pages do, and `load_end` zeroes any page it held data in and got no
            // record for. (QEMU sends a ZERO record per page: ~9 bytes and a record to
            // decode for each page of an idle guest.)
            // And so are the other never-populated pages of its 64-page word: one step for
            // them all (the word lies in the chunk just cleared and re-read above).
            let b = &mut self.blocks[block];
            let w = page / 64;
            let populated = b.populated.as_ref().map_or(!0, |p| p[w]);
            let rest = b.dirty[w] & !populated;
            b.dirty[w] &= !rest;
            self.counters
                .duplicate
                .fetch_add(1 + u64::from(rest.count_ones()), Ordering::Relaxed);
            return Ok(0);
        }
        let data: &[u8] = if !known_zero {
            // SAFETY: the page lies inside the block's mapping (page < pages), which `memory`
            // keeps mapped; the guest may write it meanwhile (see above), never unmap it.
            unsafe {
                std::slice::from_raw_parts(
                    (b.host as *const u8).add(offset as usize),
                    PAGE_SIZE as usize,
                )
            }
        } else {
            // Never populated: zero, and left untouched rather than faulted in.
            &ZERO_PAGE
        };
        self.in_flight.push((block, page));
        let c = &self.counters;
        // A never-populated page needs no scan.
        let zero = known_zero || is_zero(data);
        let t1 = self.profiling.then(Instant::now);
        let id = self.blocks[block].id.as_str();
        let written = if zero {
            if let Some(cache) = self.cache.as_mut() {
                if !self.bulk_stage && !last_stage {
                    cache.insert_zero(addr, c.dirty_sync_count.load(Ordering::Relaxed));
                }
            }
            c.duplicate.fetch_add(1, Ordering::Relaxed);
            self.writer.zero_page(out, id, offset, 0)
        } else {
            let outcome = match self.cache.as_mut() {
                Some(cache) if !self.bulk_stage => {
                    self.page.copy_from_slice(data);
                    cache.encode_page(
                        addr,
                        &self.page,
                        c.dirty_sync_count.load(Ordering::Relaxed),
                        last_stage,
                    )
                }
                _ => XbzrleOutcome::Miss,
            };
            match outcome {
                XbzrleOutcome::Unchanged => return Ok(0),
                XbzrleOutcome::Encoded(delta) => {
                    c.xbzrle_pages.fetch_add(1, Ordering::Relaxed);
                    c.xbzrle_bytes
                        .fetch_add(delta.len() as u64, Ordering::Relaxed);
                    self.writer.xbzrle_page(out, id, offset, &delta)
                }
                other => {
                    if self.cache.is_some() && !self.bulk_stage {
                        match other {
                            XbzrleOutcome::Overflow => {
                                c.xbzrle_overflow.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => c.xbzrle_cache_miss.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    c.normal.fetch_add(1, Ordering::Relaxed);
                    if self.cache.is_some() && !self.bulk_stage {
                        self.writer.page(out, id, offset, &self.page)
                    } else {
                        // SAFETY: `data` is the guest page (a zero page never gets here),
                        // which `memory` keeps mapped for as long as this section exists,
                        // longer than any output it writes to.
                        unsafe { self.writer.page_in_place(out, id, offset, data.as_ptr()) }
                    }
                }
            }
        }
        .map_err(format_err)? as u64;
        c.transferred.fetch_add(written, Ordering::Relaxed);
        if let (Some(t0), Some(t1)) = (t0, t1) {
            let p = &c.profile;
            p.add(&p.zero_check_ns, t1 - t0);
            p.add(&p.copy_ns, t1.elapsed());
        }
        Ok(written)
    }

    /// Manual protection: before the first page of a chunk is read, clears the chunk's
    /// fetched dirty bits in KVM (and write-protects those pages), so a write from now on is
    /// logged and one made since the fetch is in what is read, not sent twice.
    fn clear_before_send(&mut self, block: usize, page: usize) {
        let chunk = page / CLEAR_CHUNK_PAGES;
        let b = &mut self.blocks[block];
        if !b.clear_pending.get(chunk).copied().unwrap_or(false) {
            return;
        }
        b.clear_pending[chunk] = false;
        let first = chunk * CLEAR_CHUNK_PAGES;
        let pages = CLEAR_CHUNK_PAGES.min(b.pages - first);
        let words = first / 64..(first + pages).div_ceil(64);
        let t0 = self.profiling.then(Instant::now);
        if let Err(e) = self
            .dirty_log
            .clear_dirty(block, first, pages, &b.uncleared[words.clone()])
        {
            // The bits stay set in KVM: those pages are sent once more, nothing is lost.
            log::warn!("cannot clear the dirty log: {e}");
        }
        b.uncleared[words.clone()].fill(0);
        // A never-populated page the guest wrote since `begin` is not logged anew (its bit
        // was set from the start, and the clear just wiped it): learn which pages hold data
        // now, after the clear, so such a page is read, never sent as zero. A write from
        // here on is logged again.
        if let Some(populated) = b.populated.as_mut() {
            let host = (b.host + first * PAGE_SIZE as usize) as *const u8;
            match pagemap::populated(host, pages) {
                Some(now) => populated[words].copy_from_slice(&now),
                None => b.populated = None,
            }
        }
        if let Some(t0) = t0 {
            let p = &self.counters.profile;
            p.add_since(&p.sync_ns, t0);
        }
    }

    /// Zero-check plus copy time so far (to split an iteration's time).
    fn profile_split(&self) -> u64 {
        let p = &self.counters.profile;
        p.zero_check_ns.load(Ordering::Relaxed) + p.copy_ns.load(Ordering::Relaxed)
    }

    /// Books an iteration's time that went neither to zero checks nor copies as scan time.
    fn profile_scan(&self, before: u64, start: Instant) {
        let p = &self.counters.profile;
        let spent = start.elapsed().as_nanos() as u64;
        let split = self.profile_split() - before;
        p.scan_ns
            .fetch_add(spent.saturating_sub(split), Ordering::Relaxed);
    }

    /// Ends a chunk of the section with EOS.
    fn end_chunk(&mut self, out: &mut dyn Write) -> Result<(), SectionError> {
        let n = self.writer.eos(out).map_err(format_err)?;
        self.counters
            .transferred
            .fetch_add(n as u64, Ordering::Relaxed);
        self.update_remaining();
        Ok(())
    }

    /// The next dirty page in block order, starting where the last search ended.
    fn next_dirty(&mut self) -> Option<(usize, usize)> {
        for i in 0..self.blocks.len() {
            if let Some(page) = self.blocks[i].take_next_dirty() {
                return Some((i, page));
            }
        }
        None
    }

    fn apply_cache_size(&mut self) {
        let want = vmm_sync::lock(&self.settings).cache_size;
        if let Some(cache) = self.cache.as_mut() {
            if cache.size() != want {
                if let Err(e) = cache.set_size(want) {
                    log::warn!("cannot resize the xbzrle cache: {e}");
                }
            }
        }
    }

    fn stop_logging(&mut self) {
        if self.logging {
            if let Err(e) = self.dirty_log.set_logging(false) {
                log::warn!("cannot switch dirty logging off: {e}");
            }
            self.logging = false;
        }
    }

    /// Source: which pages may hold data, read again from pagemap.
    fn refresh_populated(&mut self) {
        for (i, region) in self.memory.iter().enumerate() {
            let b = &mut self.blocks[i];
            if b.populated.is_some() {
                b.populated = host_range(region)
                    .and_then(|(host, len)| pagemap::populated(host, (len / PAGE_SIZE) as usize));
            }
        }
    }

    /// Destination: learns which pages already hold data, once per load.
    fn load_populated(&mut self) {
        if self.loading {
            return;
        }
        self.loading = true;
        for (i, region) in self.memory.iter().enumerate() {
            let b = &mut self.blocks[i];
            b.populated = host_range(region)
                .and_then(|(host, len)| pagemap::populated(host, (len / PAGE_SIZE) as usize));
            b.received = vec![0; b.pages.div_ceil(64)];
        }
    }

    fn check_offset(&mut self, block: &str, offset: u64) -> Result<(usize, u64), SectionError> {
        let (i, b) = self
            .blocks
            .iter()
            .enumerate()
            .find(|(_, b)| b.id == block)
            .ok_or_else(|| invalid(format!("unknown ram block {block}")))?;
        if offset % PAGE_SIZE != 0 || offset / PAGE_SIZE >= b.pages as u64 {
            return Err(invalid(format!(
                "offset {offset:#x} outside ram block {block}"
            )));
        }
        let addr = b.start + offset;
        self.blocks[i].mark_received((offset / PAGE_SIZE) as usize);
        self.last_load = Some(match self.last_load {
            Some((lo, hi)) => (lo.min(addr), hi.max(addr)),
            None => (addr, addr),
        });
        Ok((i, addr))
    }
}

/// A record could not be written.
fn format_err(e: crate::ram_format::RamFormatError) -> SectionError {
    SectionError::Io(std::io::Error::other(e))
}

fn invalid(reason: String) -> SectionError {
    SectionError::Invalid {
        section: String::from("ram"),
        reason,
    }
}

impl LiveSection for RamSection {
    fn begin(&mut self, out: &mut dyn SectionOutput) -> Result<(), SectionError> {
        let settings = *vmm_sync::lock(&self.settings);
        self.cache = if settings.enabled {
            Some(
                XbzrleCache::new(settings.cache_size)
                    .map_err(|e| SectionError::Unsupported(e.to_string()))?,
            )
        } else {
            None
        };
        if self.manual_protect.is_none() {
            let on = self.dirty_log.enable_manual_protect();
            log::info!(
                "dirty log: {}",
                if on {
                    "manual protection, cleared in 16 MiB chunks before sending"
                } else {
                    "cleared at every fetch"
                }
            );
            self.manual_protect = Some(on);
        }
        // Log first, then mark everything dirty: a write between the two is covered by both.
        // With manual protection the log starts all set and nothing write-protected; each
        // chunk is cleared (protected) just before its first page is sent.
        self.dirty_log.set_logging(true)?;
        self.logging = true;
        for (i, region) in self.memory.iter().enumerate() {
            let mmap: &MmapRegion<AtomicBitmap> = region;
            mmap.bitmap().reset();
            let b = &mut self.blocks[i];
            b.dirty.fill(!0);
            if b.pages % 64 != 0 {
                if let Some(last) = b.dirty.last_mut() {
                    *last = (1u64 << (b.pages % 64)) - 1;
                }
            }
            b.cursor = 0;
            if self.manual_protect == Some(true) {
                b.uncleared = b.dirty.clone();
                b.clear_pending = vec![true; b.pages.div_ceil(CLEAR_CHUNK_PAGES)];
            }
            b.populated = host_range(region)
                .and_then(|(host, len)| pagemap::populated(host, (len / PAGE_SIZE) as usize));
        }
        self.bulk_stage = true;
        self.in_flight.clear();
        self.writer.reset();
        let c = &self.counters;
        c.total.store(self.total_bytes(), Ordering::Relaxed);
        c.dirty_sync_count.store(1, Ordering::Relaxed);
        self.last_sync = Some(Instant::now());
        self.update_remaining();
        let blocks: Vec<RamBlockInfo> = self
            .blocks
            .iter()
            .map(|b| RamBlockInfo {
                id: b.id.clone(),
                size: b.pages as u64 * PAGE_SIZE,
            })
            .collect();
        let n = self
            .writer
            .mem_size(out, &blocks)
            .and_then(|n| Ok(n + self.writer.eos(out)?))
            .map_err(format_err)?;
        c.transferred.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    fn pending(&mut self, max_size: u64) -> u64 {
        let mut remaining = self.remaining_pages() * PAGE_SIZE;
        if remaining < max_size {
            if let Err(e) = self.sync() {
                log::warn!("dirty sync failed: {e}");
            }
            remaining = self.remaining_pages() * PAGE_SIZE;
        }
        remaining
    }

    fn iterate(&mut self, out: &mut dyn SectionOutput, budget: u64) -> Result<bool, SectionError> {
        self.apply_cache_size();
        let start = Instant::now();
        let before = self.profiling.then(|| self.profile_split());
        let mut sent = 0u64;
        let mut pages = 0u64;
        let done = loop {
            if sent >= budget.max(1) {
                break false;
            }
            // Check the clock every 64 pages, as QEMU does.
            pages += 1;
            if pages % 64 == 0 && start.elapsed() > MAX_ITERATE_TIME {
                break false;
            }
            match self.next_dirty() {
                Some((block, page)) => sent += self.send_page(out, block, page, false)?,
                None => {
                    // The first full pass is over: from now on XBZRLE applies, and every
                    // page read again was dirtied, so populated or not no longer matters.
                    self.bulk_stage = false;
                    self.blocks.iter_mut().for_each(|b| b.populated = None);
                    break true;
                }
            }
        };
        self.end_chunk(out)?;
        if let Some(before) = before {
            self.profile_scan(before, start);
        }
        Ok(done)
    }

    fn complete(&mut self, out: &mut dyn SectionOutput) -> Result<(), SectionError> {
        self.sync()?;
        if self.bulk_stage {
            // Still in the first pass: chunks not cleared yet may hold pages the guest
            // first wrote since `begin`; the guest is stopped now, so pagemap is final.
            self.refresh_populated();
        }
        let start = Instant::now();
        let before = self.profiling.then(|| self.profile_split());
        while let Some((block, page)) = self.next_dirty() {
            self.send_page(out, block, page, true)?;
        }
        self.end_chunk(out)?;
        if let Some(before) = before {
            self.profile_scan(before, start);
        }
        self.stop_logging();
        Ok(())
    }

    fn flushed(&mut self) {
        self.in_flight.clear();
    }

    fn flush_failed(&mut self) {
        for (block, page) in self.in_flight.drain(..) {
            self.blocks[block].dirty[page / 64] |= 1 << (page % 64);
        }
        self.update_remaining();
    }

    fn cancel(&mut self) {
        self.flush_failed();
        self.stop_logging();
        self.cache = None;
    }

    fn last_load(&self) -> Option<String> {
        let (lo, hi) = self.last_load?;
        Some(format!(
            "guest-physical pages {lo:#x}-{:#x}",
            hi + (PAGE_SIZE - 1)
        ))
    }

    fn prepare_load(&mut self) {
        if self.loading {
            return;
        }
        // Which pages hold data *before* the populate thread maps the rest as zeros: those
        // need no ZERO record written (see `load`).
        self.load_populated();
        let ranges: Vec<(usize, usize)> = self
            .memory
            .iter()
            .filter_map(host_range)
            .map(|(h, l)| (h as usize, l as usize))
            .collect();
        for &(host, len) in &ranges {
            // SAFETY: one private anonymous mapping of guest RAM, owned by `memory`.
            unsafe { pagemap::advise_huge_pages(host as *mut u8, len) };
        }
        self.populate = Arc::default();
        // SAFETY: the ranges are guest RAM mappings, kept alive by the `memory` handle the
        // thread holds; nothing makes guest RAM read-only.
        unsafe { pagemap::populate(ranges, self.memory.clone(), self.populate.clone()) };
    }

    fn load_end(&mut self) {
        // What the populate thread has not reached yet the guest faults in on demand: it
        // must not keep a core busy while the guest resumes.
        self.populate.stop();
        // The source sends no record for a page it never populated (see `send_page`): such
        // a page must read as zero here too. A fresh destination's pages are; one that held
        // data before this load (an earlier, failed load) is zeroed now.
        for i in 0..self.blocks.len() {
            let b = &self.blocks[i];
            let stale: Vec<usize> = (0..b.pages)
                .filter(|&p| b.may_hold_data(p) && !pagemap::is_set(&b.received, p))
                .collect();
            for page in stale {
                // SAFETY: page < pages, inside block i's mapping, which `memory` keeps
                // mapped; the vCPUs do not run while a stream loads.
                unsafe {
                    std::slice::from_raw_parts_mut(
                        self.host_page(i, page as u64 * PAGE_SIZE),
                        PAGE_SIZE as usize,
                    )
                }
                .fill(0);
            }
        }
    }

    fn load(&mut self, input: &mut dyn Read, version: u32) -> Result<(), SectionError> {
        if version != RAM_SECTION_VERSION {
            return Err(invalid(format!(
                "unsupported ram section version {version}"
            )));
        }
        self.load_populated();
        // The stream is here: populating goes on only on spare CPU.
        self.populate.background();
        self.last_load = None;
        let profiling = self.profiling;
        let faults0 = if profiling { thread_faults() } else { 0 };
        let result = self.load_records(input, profiling);
        if profiling {
            let p = &self.counters.profile;
            p.faults
                .fetch_add(thread_faults() - faults0, Ordering::Relaxed);
        }
        result
    }
}

impl RamSection {
    /// The host address of page `offset` of block `block` (checked by `check_offset`).
    fn host_page(&self, block: usize, offset: u64) -> *mut u8 {
        (self.blocks[block].host + offset as usize) as *mut u8
    }

    fn load_records(&mut self, input: &mut dyn Read, profiling: bool) -> Result<(), SectionError> {
        let counters = self.counters.clone();
        let p = &counters.profile;
        loop {
            let t0 = profiling.then(Instant::now);
            let item = self
                .reader
                .read_next(input)
                .map_err(|e| invalid(e.to_string()))?;
            if let Some(t0) = t0 {
                p.add_since(&p.recv_header_ns, t0);
            }
            let record = match item {
                RamItem::PageHeader { block, offset } => {
                    let t0 = profiling.then(Instant::now);
                    let (i, _) = self.check_offset(&block, offset)?;
                    // SAFETY: check_offset put the page inside block i's mapping, which
                    // `memory` keeps mapped. The destination's vCPUs do not run while a
                    // stream loads; the populate thread only does atomic writes that keep
                    // every byte (pagemap::populate).
                    let page = unsafe {
                        std::slice::from_raw_parts_mut(
                            self.host_page(i, offset),
                            PAGE_SIZE as usize,
                        )
                    };
                    input
                        .read_exact(page)
                        .map_err(|e| invalid(format!("truncated page: {e}")))?;
                    self.blocks[i].mark_populated((offset / PAGE_SIZE) as usize);
                    if let Some(t0) = t0 {
                        p.add_since(&p.recv_page_ns, t0);
                    }
                    continue;
                }
                RamItem::Record(r) => r,
            };
            match record {
                RamRecord::Eos => return Ok(()),
                RamRecord::MemSize { blocks } => {
                    let ours: Vec<(String, u64)> = self
                        .blocks
                        .iter()
                        .map(|b| (b.id.clone(), b.pages as u64 * PAGE_SIZE))
                        .collect();
                    let theirs: Vec<(String, u64)> =
                        blocks.into_iter().map(|b| (b.id, b.size)).collect();
                    if ours != theirs {
                        return Err(invalid(format!(
                            "ram layout differs: source {theirs:?}, destination {ours:?} \
                             (start the destination with the same --memory)"
                        )));
                    }
                }
                RamRecord::Zero {
                    block,
                    offset,
                    fill,
                } => {
                    let t0 = profiling.then(Instant::now);
                    let (i, _) = self.check_offset(&block, offset)?;
                    let index = (offset / PAGE_SIZE) as usize;
                    // SAFETY: as for PAGE records above.
                    let page = unsafe {
                        std::slice::from_raw_parts_mut(
                            self.host_page(i, offset),
                            PAGE_SIZE as usize,
                        )
                    };
                    // A page that never held data is zero already: writing zeros would only
                    // allocate it.
                    let zero_already = !self.blocks[i].may_hold_data(index) || is_zero(page);
                    if fill != 0 || !zero_already {
                        page.fill(fill);
                        self.blocks[i].mark_populated(index);
                    }
                    if let Some(t0) = t0 {
                        p.add_since(&p.recv_zero_ns, t0);
                    }
                }
                RamRecord::Page {
                    block,
                    offset,
                    data,
                } => {
                    // read_next returns pages as headers; kept for completeness.
                    let (i, _) = self.check_offset(&block, offset)?;
                    // SAFETY: as above.
                    unsafe {
                        std::slice::from_raw_parts_mut(
                            self.host_page(i, offset),
                            PAGE_SIZE as usize,
                        )
                    }
                    .copy_from_slice(&data);
                    self.blocks[i].mark_populated((offset / PAGE_SIZE) as usize);
                }
                RamRecord::Xbzrle {
                    block,
                    offset,
                    data,
                } => {
                    let (i, _) = self.check_offset(&block, offset)?;
                    // SAFETY: as above.
                    let page = unsafe {
                        std::slice::from_raw_parts_mut(
                            self.host_page(i, offset),
                            PAGE_SIZE as usize,
                        )
                    };
                    // Decoded on a copy: a bad delta must not leave the page half-patched.
                    self.page.copy_from_slice(page);
                    xbzrle::decode(&data, &mut self.page).map_err(|e| invalid(e.to_string()))?;
                    page.copy_from_slice(&self.page);
                    self.blocks[i].mark_populated((offset / PAGE_SIZE) as usize);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram_format::RamRecordReader;
    use vm_memory::{Bytes, GuestAddress};

    /// A dirty log whose bits the test sets by hand.
    struct FakeLog(Arc<Mutex<Vec<Vec<u64>>>>);

    impl DirtyLog for FakeLog {
        fn set_logging(&mut self, _on: bool) -> std::io::Result<()> {
            Ok(())
        }
        fn take_dirty(&mut self, index: usize) -> std::io::Result<Vec<u64>> {
            let mut l = self.0.lock().unwrap();
            Ok(std::mem::take(&mut l[index]))
        }
    }

    /// A dirty log with manual protection: fetching does not clear; `clear_dirty` does, and
    /// logging starts with every page dirty.
    struct ManualLog(Arc<Mutex<Vec<u64>>>, Arc<Mutex<u64>>);

    impl DirtyLog for ManualLog {
        fn set_logging(&mut self, on: bool) -> std::io::Result<()> {
            if on {
                self.0.lock().unwrap().fill(!0);
            }
            Ok(())
        }
        fn take_dirty(&mut self, _index: usize) -> std::io::Result<Vec<u64>> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn enable_manual_protect(&mut self) -> bool {
            true
        }
        fn clear_dirty(
            &mut self,
            _index: usize,
            first: usize,
            pages: usize,
            bitmap: &[u64],
        ) -> std::io::Result<()> {
            assert_eq!(first % 64, 0);
            *self.1.lock().unwrap() += 1;
            let mut l = self.0.lock().unwrap();
            for (i, b) in bitmap.iter().enumerate().take(pages.div_ceil(64)) {
                l[first / 64 + i] &= !b;
            }
            Ok(())
        }
    }

    #[test]
    fn manual_protect_clears_before_sending_and_loses_nothing() {
        let size = 64 << 20; // 4 chunks of CLEAR_CHUNK_PAGES
        let src = mem(size);
        let dst = mem(size);
        let pages = size / PAGE_SIZE as usize;
        let log = Arc::new(Mutex::new(vec![0u64; pages / 64]));
        let clears = Arc::new(Mutex::new(0u64));
        let mut s = RamSection::new(
            src.clone(),
            Box::new(ManualLog(log.clone(), clears.clone())),
            Arc::new(Mutex::new(XbzrleSettings::default())),
            Arc::new(RamCounters::default()),
        );
        let (mut d, _) = section(&dst, false);
        let mut out = Vec::new();
        s.begin(&mut out).unwrap();
        while !s.iterate(&mut out, u64::MAX).unwrap() {}
        // The first pass cleared every chunk: nothing is dirty in the log any more.
        assert_eq!(*clears.lock().unwrap(), 4);
        assert!(log.lock().unwrap().iter().all(|w| *w == 0));
        assert_eq!(
            s.pending(u64::MAX),
            0,
            "initially-set bits are not sent twice"
        );
        // A guest write after the pass is logged and sent.
        src.write_obj(0x1234_5678u32, GuestAddress(5 * PAGE_SIZE + 12))
            .unwrap();
        log.lock().unwrap()[0] |= 1 << 5;
        assert_eq!(s.pending(u64::MAX), PAGE_SIZE);
        s.complete(&mut out).unwrap();
        let mut input = &out[..];
        while !input.is_empty() {
            d.load(&mut input, RAM_SECTION_VERSION).unwrap();
        }
        same(&src, &dst, size);
    }

    /// A page the guest first writes during the first pass, before its chunk is cleared,
    /// is not logged again (its bit was set from the start): it must still be sent with its
    /// data, not as the zero page it was when the migration began.
    #[test]
    fn page_first_written_during_the_bulk_pass_is_sent() {
        let size = 64 << 20;
        let src = mem(size);
        let dst = mem(size);
        let log = Arc::new(Mutex::new(vec![0u64; size / PAGE_SIZE as usize / 64]));
        let mut s = RamSection::new(
            src.clone(),
            Box::new(ManualLog(log.clone(), Arc::default())),
            Arc::new(Mutex::new(XbzrleSettings::default())),
            Arc::new(RamCounters::default()),
        );
        let (mut d, _) = section(&dst, false);
        let mut out = Vec::new();
        s.begin(&mut out).unwrap();
        // As the guest writes: straight into the mapping, past vm-memory's bitmap, into the
        // third chunk (not reached yet) — a page never populated at `begin`.
        let page = 2 * CLEAR_CHUNK_PAGES as u64 + 17;
        let host = src
            .get_host_address(GuestAddress(page * PAGE_SIZE))
            .unwrap();
        // SAFETY: inside the 64 MiB mapping `src` owns.
        unsafe { host.cast::<u64>().write_volatile(0x5eed_0fda_7a00) };
        while !s.iterate(&mut out, u64::MAX).unwrap() {}
        s.complete(&mut out).unwrap();
        let mut input = &out[..];
        while !input.is_empty() {
            d.load(&mut input, RAM_SECTION_VERSION).unwrap();
        }
        assert_eq!(
            dst.read_obj::<u64>(GuestAddress(page * PAGE_SIZE)).unwrap(),
            0x5eed_0fda_7a00
        );
        same(&src, &dst, size);
    }

    /// Never-populated source pages travel as no record at all; a destination page that
    /// held data before the load (an earlier, failed one) still ends up zero, and the idle
    /// gigabytes cost next to no bytes.
    #[test]
    fn unpopulated_pages_need_no_records_and_end_zero() {
        let size = 16 << 20;
        let src = mem(size);
        let dst = mem(size);
        src.write_obj(0x1111u64, GuestAddress(3 * PAGE_SIZE))
            .unwrap();
        // Left over on the destination where the source has nothing.
        dst.write_obj(0xdeadu64, GuestAddress(100 * PAGE_SIZE))
            .unwrap();
        dst.write_obj(0xbeefu64, GuestAddress(3 * PAGE_SIZE + 8))
            .unwrap();
        let (mut s, _) = section(&src, false);
        let (mut d, _) = section(&dst, false);
        d.prepare_load();
        let mut out = Vec::new();
        s.begin(&mut out).unwrap();
        while !s.iterate(&mut out, u64::MAX).unwrap() {}
        s.complete(&mut out).unwrap();
        assert!(
            out.len() < 16 << 10,
            "{} bytes for one page of data",
            out.len()
        );
        assert_eq!(
            s.counters.duplicate.load(Ordering::Relaxed)
                + s.counters.normal.load(Ordering::Relaxed),
            (size / PAGE_SIZE as usize) as u64
        );
        let mut input = &out[..];
        while !input.is_empty() {
            d.load(&mut input, RAM_SECTION_VERSION).unwrap();
        }
        d.load_end();
        same(&src, &dst, size);
    }

    fn section(mem: &GuestMemoryMmap, xbzrle: bool) -> (RamSection, Arc<Mutex<Vec<Vec<u64>>>>) {
        let log = Arc::new(Mutex::new(vec![Vec::new(); mem.num_regions()]));
        let settings = Arc::new(Mutex::new(XbzrleSettings {
            enabled: xbzrle,
            cache_size: 1 << 20,
        }));
        let s = RamSection::new(
            mem.clone(),
            Box::new(FakeLog(log.clone())),
            settings,
            Arc::new(RamCounters::default()),
        );
        (s, log)
    }

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// Runs a whole migration of `src` into `dst` with `rounds` of guest writes in between.
    fn migrate(
        src: &GuestMemoryMmap,
        dst: &GuestMemoryMmap,
        xbzrle: bool,
        rounds: u64,
    ) -> Arc<RamCounters> {
        let (mut s, log) = section(src, xbzrle);
        let (mut d, _) = section(dst, xbzrle);
        // The destination populates its RAM while it loads, as a real one does.
        d.prepare_load();
        let mut out = Vec::new();
        s.begin(&mut out).unwrap();
        for round in 0..rounds {
            while !s.iterate(&mut out, 64 << 10).unwrap() {}
            // The guest writes a few pages (KVM log) and the VMM one (vm-memory bitmap).
            for p in [3u64, 7, 8] {
                src.write_obj(round * 1000 + p, GuestAddress(p * PAGE_SIZE + 8))
                    .unwrap();
                log.lock().unwrap()[0] = vec![(1 << 3) | (1 << 7) | (1 << 8)];
            }
            src.write_obj(0xabcdu64 + round, GuestAddress(20 * PAGE_SIZE))
                .unwrap();
            assert!(s.pending(u64::MAX) >= 4 * PAGE_SIZE);
        }
        s.complete(&mut out).unwrap();
        let mut input = &out[..];
        while !input.is_empty() {
            d.load(&mut input, RAM_SECTION_VERSION).unwrap();
        }
        s.counters.clone()
    }

    fn same(a: &GuestMemoryMmap, b: &GuestMemoryMmap, len: usize) {
        let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
        a.read_slice(&mut x, GuestAddress(0)).unwrap();
        b.read_slice(&mut y, GuestAddress(0)).unwrap();
        assert!(x == y, "memory differs");
    }

    #[test]
    fn pre_copy_transfers_every_write() {
        for xbzrle in [false, true] {
            let src = mem(1 << 20);
            let dst = mem(1 << 20);
            src.write_slice(&[0x5a; 4096], GuestAddress(0x3000))
                .unwrap();
            let c = migrate(&src, &dst, xbzrle, 3);
            same(&src, &dst, 1 << 20);
            let total = c.total.load(Ordering::Relaxed) / PAGE_SIZE;
            let sent = c.duplicate.load(Ordering::Relaxed) + c.normal.load(Ordering::Relaxed);
            assert!(sent >= total, "{sent} < {total}");
            assert_eq!(c.remaining_pages.load(Ordering::Relaxed), 0);
            if xbzrle {
                assert!(c.xbzrle_pages.load(Ordering::Relaxed) > 0);
            }
        }
    }

    #[test]
    fn failed_flush_puts_pages_back() {
        let src = mem(64 << 10);
        // Pages with data (never-populated ones go without any record to put back).
        for p in 0..16u64 {
            src.write_obj(p + 1, GuestAddress(p * PAGE_SIZE)).unwrap();
        }
        let (mut s, _) = section(&src, false);
        let mut out = Vec::new();
        s.begin(&mut out).unwrap();
        assert!(s.iterate(&mut out, u64::MAX).unwrap());
        assert_eq!(s.remaining_pages(), 0);
        s.flush_failed();
        assert_eq!(s.remaining_pages(), 16);
        s.flushed();
        assert!(s.iterate(&mut out, u64::MAX).unwrap());
        s.flushed();
        s.flush_failed();
        assert_eq!(s.remaining_pages(), 0);
    }

    #[test]
    fn cursor_wraps_and_finds_every_page() {
        let mut b = Block {
            id: String::from("x"),
            start: 0,
            host: 0,
            pages: 130,
            dirty: vec![0; 3],
            cursor: 70,
            uncleared: Vec::new(),
            clear_pending: Vec::new(),
            populated: None,
            received: Vec::new(),
        };
        for p in [1usize, 64, 69, 70, 129] {
            b.dirty[p / 64] |= 1 << (p % 64);
        }
        let mut got = Vec::new();
        while let Some(p) = b.take_next_dirty() {
            got.push(p);
        }
        assert_eq!(got, vec![70, 129, 1, 64, 69]);
    }

    #[test]
    fn load_rejects_bad_input() {
        let dst = mem(64 << 10);
        let (mut d, _) = section(&dst, false);
        // A page beyond the block.
        let mut w = RamRecordWriter::new();
        let mut bad = Vec::new();
        w.page(&mut bad, "pc.ram", 64 << 10, &[1; 4096]).unwrap();
        assert!(d.load(&mut &bad[..], RAM_SECTION_VERSION).is_err());
        // A different memory size.
        let mut w = RamRecordWriter::new();
        let mut bad = Vec::new();
        w.mem_size(
            &mut bad,
            &[RamBlockInfo {
                id: String::from("pc.ram"),
                size: 128 << 10,
            }],
        )
        .unwrap();
        assert!(d.load(&mut &bad[..], RAM_SECTION_VERSION).is_err());
        // Truncated.
        let mut w = RamRecordWriter::new();
        let mut ok = Vec::new();
        w.page(&mut ok, "pc.ram", 0, &[1; 4096]).unwrap();
        assert!(d.load(&mut &ok[..100], RAM_SECTION_VERSION).is_err());
        assert!(d.load(&mut &ok[..], 3).is_err());
        let _ = RamRecordReader::new();
    }
}
