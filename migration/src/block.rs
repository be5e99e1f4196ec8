//! Block migration, after QEMU's `migration/block.c`: the `block` section copies every disk's
//! image in the stream alongside RAM, for a destination without shared storage.
//!
//! Source: at [`begin`](LiveSection::begin) every disk starts tracking writes in a
//! [`DirtyBitmap`] (one bit per 1 MiB chunk, set by the virtio-blk back-end after each write,
//! write-zeroes or discard); the *bulk* pass then sends the whole image chunk by chunk (with
//! `block-incremental` / `inc`, only chunks holding allocated data — `SEEK_DATA` /
//! `SEEK_HOLE` — the destination's fresh image reading zeros elsewhere), then the chunks
//! written meanwhile, round after round; with the guest stopped (every request completed:
//! the back-end serves them whole and is paused with the vCPUs) the last of them go in
//! [`complete`](LiveSection::complete). A chunk's dirty bit is cleared *before* the chunk is
//! read, so a write that lands during the read sets it again and the chunk goes again.
//!
//! Wire format, as QEMU's: records of a big-endian u64 `sector << 9 | flags`;
//! [`FLAG_DEVICE_BLOCK`]: a u8 name length, the name, then [`CHUNK_SIZE`] bytes (the last
//! chunk of a disk padded with zeros) unless [`FLAG_ZERO_BLOCK`] says the chunk is all zeros;
//! [`FLAG_PROGRESS`]: the bulk pass's percentage in the sector field; [`FLAG_EOS`] ends the
//! part. hopvm adds [`FLAG_X_HOPVM_SIZE`] in the START part: a disk's name and its size in
//! sectors, so that a destination whose image differs in size refuses the stream before
//! anything is written.
//!
//! Destination: every chunk is written into the disk of that name (opened for writing by its
//! path — read-only disks included, they are copied too); an all-zero chunk is punched out
//! (the image stays sparse) or, where the file system cannot, written as zeros.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{LiveSection, SectionError, SectionOutput};

/// The section's id string (QEMU's).
pub const SECTION: &str = "block";
/// The section's version (QEMU's).
pub const SECTION_VERSION: u32 = 1;
/// Bytes per chunk on the wire and per dirty bit (QEMU's `BLK_MIG_BLOCK_SIZE`).
pub const CHUNK_SIZE: u64 = 1 << 20;
/// Sector size of the wire's addresses.
pub const SECTOR_SIZE: u64 = 512;
const SECTOR_BITS: u32 = 9;
const CHUNK_SECTORS: u64 = CHUNK_SIZE / SECTOR_SIZE;

/// A chunk of a disk follows.
pub const FLAG_DEVICE_BLOCK: u64 = 0x01;
/// End of this part of the section.
pub const FLAG_EOS: u64 = 0x02;
/// The bulk pass's progress, in percent.
pub const FLAG_PROGRESS: u64 = 0x04;
/// With [`FLAG_DEVICE_BLOCK`]: the chunk is all zeros and its bytes are not sent.
pub const FLAG_ZERO_BLOCK: u64 = 0x08;
/// hopvm's: a disk's name and size (in the sector field), sent first.
pub const FLAG_X_HOPVM_SIZE: u64 = 0x80;
const FLAGS_MASK: u64 = SECTOR_SIZE - 1;

/// Longest a batch of [`LiveSection::iterate`] may read the disks under the big lock.
const BATCH_TIME: Duration = Duration::from_millis(40);

/// Writes tracked per chunk of a disk: the back-end marks, the migration takes. Lock-free
/// (one atomic word per 64 chunks), so the `virtio-io` thread never waits for the
/// migration. A bit set is only ever cleared by [`take`](Self::take), which returns it: no
/// write is forgotten between two looks.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    chunks: u64,
    tracking: AtomicBool,
}

impl DirtyBitmap {
    /// A bitmap for a disk of `size` bytes, not tracking.
    pub fn new(size: u64) -> Self {
        let chunks = size.div_ceil(CHUNK_SIZE);
        Self {
            words: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            chunks,
            tracking: AtomicBool::new(false),
        }
    }

    /// Chunks covered.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Starts tracking, with every bit clear.
    pub fn start(&self) {
        self.words
            .iter()
            .for_each(|w| w.store(0, Ordering::Relaxed));
        self.tracking.store(true, Ordering::SeqCst);
    }

    /// Stops tracking.
    pub fn stop(&self) {
        self.tracking.store(false, Ordering::SeqCst);
    }

    /// Whether writes are being tracked.
    pub fn tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// Records a write of `len` bytes at byte `offset` (after the write reached the image),
    /// if tracking.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.tracking() {
            return;
        }
        let first = offset / CHUNK_SIZE;
        let last = (offset.saturating_add(len - 1) / CHUNK_SIZE).min(self.chunks.saturating_sub(1));
        for c in first..=last {
            self.set(c);
        }
    }

    /// Sets chunk `chunk`'s bit (also to put back a chunk that never arrived).
    pub fn set(&self, chunk: u64) {
        if let Some(w) = self.words.get((chunk / 64) as usize) {
            w.fetch_or(1 << (chunk % 64), Ordering::SeqCst);
        }
    }

    /// Clears chunk `chunk`'s bit; true if it was set.
    pub fn take(&self, chunk: u64) -> bool {
        let bit = 1u64 << (chunk % 64);
        self.words
            .get((chunk / 64) as usize)
            .is_some_and(|w| w.fetch_and(!bit, Ordering::SeqCst) & bit != 0)
    }

    /// The first set chunk at or after `from`, if any (its bit stays set).
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut c = from;
        while c < self.chunks {
            let w = self.words[(c / 64) as usize].load(Ordering::SeqCst) >> (c % 64);
            if w != 0 {
                let found = c + u64::from(w.trailing_zeros());
                return (found < self.chunks).then_some(found);
            }
            c = (c / 64 + 1) * 64;
        }
        None
    }

    /// Chunks set now.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// One disk as the block section sees it.
pub struct BlockDisk {
    /// The name on the wire (hopvm's: `virtio0`, `virtio1`, … in `--disk` order, the default
    /// ids of QEMU's `-drive if=virtio`).
    pub name: String,
    /// The image file.
    pub path: PathBuf,
    /// A descriptor of the image, for reading (source).
    pub file: File,
    /// Image size in bytes (whole sectors).
    pub size: u64,
    /// The writes the back-end makes.
    pub dirty: Arc<DirtyBitmap>,
}

/// Errors of the block section's destination side, and of its stream.
#[derive(Debug, thiserror::Error)]
pub enum BlockMigrationError {
    /// The stream names a disk this side does not have.
    #[error("the stream carries disk '{name}', but this VM has {}", have_disks(.have))]
    UnknownDisk {
        /// The stream's disk.
        name: String,
        /// This side's disks.
        have: Vec<String>,
    },
    /// The images differ in size.
    #[error("disk '{name}': the source's image is {source_size} bytes, this one ({path}) is {size}: block migration needs images of the same size")]
    SizeMismatch {
        /// The disk.
        name: String,
        /// This side's image.
        path: String,
        /// The source's size.
        source_size: u64,
        /// This side's size.
        size: u64,
    },
    /// A chunk past the end of the disk.
    #[error("disk '{name}': chunk at sector {sector} is past the end ({sectors} sectors)")]
    OutOfRange {
        /// The disk.
        name: String,
        /// The chunk's first sector.
        sector: u64,
        /// The disk's size in sectors.
        sectors: u64,
    },
    /// Flags this side does not know.
    #[error("unknown block migration flags {0:#x}")]
    UnknownFlags(u64),
    /// The disk's image cannot be written here.
    #[error("disk '{name}': cannot write the image {path} (block migration copies every disk, read-only ones included): {source}")]
    Write {
        /// The disk.
        name: String,
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the source's image failed.
    #[error("disk '{name}': cannot read the image {path}: {source}")]
    Read {
        /// The disk.
        name: String,
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn have_disks(have: &[String]) -> String {
    if have.is_empty() {
        String::from("no disk (start the destination with the same --disk options, on an empty image of the same size)")
    } else {
        format!("disks {}", have.join(", "))
    }
}

/// `block` capability, `block-incremental` parameter, and what `migrate`'s `blk` / `inc`
/// asked for the current migration.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockSettings {
    /// The `block` capability.
    pub capability: bool,
    /// The `block-incremental` parameter.
    pub incremental: bool,
    /// `migrate`'s `blk` for the migration being started.
    pub blk: bool,
    /// `migrate`'s `inc` for the migration being started.
    pub inc: bool,
}

impl BlockSettings {
    /// Whether the next migration copies the disks.
    pub fn enabled(&self) -> bool {
        self.capability || self.blk || self.inc
    }

    /// Whether it copies only the allocated extents.
    pub fn incremental(&self) -> bool {
        self.incremental || self.inc
    }
}

/// Block migration's counters, for `query-migrate`'s `disk`.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// The current (or last) migration copied disks.
    pub active: AtomicBool,
    /// Bytes of disk sent (bulk chunks, skipped holes, resent chunks).
    pub transferred: AtomicU64,
    /// Bytes left: the rest of the bulk pass plus the chunks dirty now.
    pub remaining: AtomicU64,
    /// Every disk's size.
    pub total: AtomicU64,
}

/// The shared settings and counters, owned by [`crate::thread::Migration`].
#[derive(Debug, Default)]
pub struct BlockMigration {
    /// Capability and parameters.
    pub settings: Mutex<BlockSettings>,
    /// Counters.
    pub counters: BlockCounters,
}

/// A disk's progress on the source.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    /// Next chunk of the bulk pass.
    bulk: u64,
    /// Next chunk to look at for dirty bits.
    dirty: u64,
}

/// The `block` section.
pub struct BlockSection {
    disks: Vec<BlockDisk>,
    shared: Arc<BlockMigration>,
    /// Source: this migration copies the disks (set at begin).
    running: bool,
    incremental: bool,
    cursors: Vec<Cursor>,
    /// Chunks written since the last flush (disk, chunk), put back dirty if it fails.
    unflushed: Vec<(usize, u64)>,
    last_progress: Option<u64>,
    buf: Vec<u8>,
    /// Destination: images opened for writing, per disk.
    writers: Vec<Option<File>>,
}

impl BlockSection {
    /// The section over `disks`.
    pub fn new(disks: Vec<BlockDisk>, shared: Arc<BlockMigration>) -> Self {
        let n = disks.len();
        Self {
            disks,
            shared,
            running: false,
            incremental: false,
            cursors: vec![Cursor::default(); n],
            unflushed: Vec::new(),
            last_progress: None,
            buf: Vec::new(),
            writers: (0..n).map(|_| None).collect(),
        }
    }

    fn total(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }

    fn chunks(d: &BlockDisk) -> u64 {
        d.size.div_ceil(CHUNK_SIZE)
    }

    /// Bytes of the bulk pass done (skipped holes included).
    fn bulk_done_bytes(&self) -> u64 {
        self.disks
            .iter()
            .zip(&self.cursors)
            .map(|(d, c)| (c.bulk * CHUNK_SIZE).min(d.size))
            .sum()
    }

    fn bulk_complete(&self) -> bool {
        self.disks
            .iter()
            .zip(&self.cursors)
            .all(|(d, c)| c.bulk >= Self::chunks(d))
    }

    fn remaining(&self) -> u64 {
        let bulk = self.total() - self.bulk_done_bytes();
        let dirty: u64 = self.disks.iter().map(|d| d.dirty.count()).sum();
        bulk + dirty * CHUNK_SIZE
    }

    fn update_remaining(&self) {
        self.shared
            .counters
            .remaining
            .store(self.remaining(), Ordering::Relaxed);
    }

    fn read_err(d: &BlockDisk, source: io::Error) -> SectionError {
        SectionError::state(
            SECTION,
            BlockMigrationError::Read {
                name: d.name.clone(),
                path: d.path.display().to_string(),
                source,
            },
        )
    }

    /// Reads chunk `chunk` of disk `i` and writes its record.
    fn send_chunk(
        &mut self,
        out: &mut dyn SectionOutput,
        i: usize,
        chunk: u64,
    ) -> Result<u64, SectionError> {
        let d = &self.disks[i];
        let start = chunk * CHUNK_SIZE;
        let len = (d.size - start).min(CHUNK_SIZE) as usize;
        self.buf.resize(CHUNK_SIZE as usize, 0);
        self.buf[len..].fill(0);
        d.file
            .read_exact_at(&mut self.buf[..len], start)
            .map_err(|e| Self::read_err(d, e))?;
        let zero = self.buf.iter().all(|&b| b == 0);
        let flags = FLAG_DEVICE_BLOCK | if zero { FLAG_ZERO_BLOCK } else { 0 };
        out.write_all(&((start / SECTOR_SIZE) << SECTOR_BITS | flags).to_be_bytes())?;
        write_name(out, &d.name)?;
        let mut sent = 8 + 1 + d.name.len() as u64;
        if !zero {
            out.write_all(&self.buf)?;
            sent += CHUNK_SIZE;
        }
        self.unflushed.push((i, chunk));
        self.shared
            .counters
            .transferred
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(sent)
    }

    /// The next chunk of the bulk pass to send (disk, chunk), skipping unallocated ones
    /// with `inc`; advances the cursors over what is skipped.
    fn next_bulk(&mut self) -> Option<(usize, u64)> {
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let chunks = Self::chunks(d);
            let c = &mut self.cursors[i];
            while c.bulk < chunks {
                let chunk = c.bulk;
                if !self.incremental {
                    c.bulk += 1;
                    return Some((i, chunk));
                }
                match next_data(&d.file, chunk * CHUNK_SIZE, d.size) {
                    // Allocated data in this chunk, or the file system cannot say: send it.
                    Some(off) if off < (chunk + 1) * CHUNK_SIZE => {
                        c.bulk += 1;
                        return Some((i, chunk));
                    }
                    Some(off) => {
                        // A hole up to `off`: skip the chunks it covers whole.
                        let skip_to = off / CHUNK_SIZE;
                        self.shared.counters.transferred.fetch_add(
                            ((skip_to.min(chunks) - chunk) * CHUNK_SIZE)
                                .min(d.size - chunk * CHUNK_SIZE),
                            Ordering::Relaxed,
                        );
                        c.bulk = skip_to;
                    }
                    None => {
                        self.shared
                            .counters
                            .transferred
                            .fetch_add(d.size - chunk * CHUNK_SIZE, Ordering::Relaxed);
                        c.bulk = chunks;
                    }
                }
            }
        }
        None
    }

    /// The next dirty chunk (disk, chunk), its bit taken.
    fn next_dirty(&mut self) -> Option<(usize, u64)> {
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let c = &mut self.cursors[i];
            let found = d.dirty.next_set(c.dirty).or_else(|| d.dirty.next_set(0));
            if let Some(chunk) = found {
                c.dirty = chunk + 1;
                if d.dirty.take(chunk) {
                    return Some((i, chunk));
                }
            }
        }
        None
    }

    fn progress(&mut self, out: &mut dyn SectionOutput) -> io::Result<()> {
        let total = self.total();
        let pct = (self.bulk_done_bytes() * 100)
            .checked_div(total)
            .unwrap_or(100);
        if self.last_progress != Some(pct) {
            self.last_progress = Some(pct);
            out.write_all(&(pct << SECTOR_BITS | FLAG_PROGRESS).to_be_bytes())?;
        }
        Ok(())
    }

    /// The migration ended: stop tracking, and forget `migrate`'s `blk` / `inc` (they last
    /// one migration, as QEMU's).
    fn stop_tracking(&mut self) {
        for d in &self.disks {
            d.dirty.stop();
        }
        self.running = false;
        let mut s = vmm_sync::lock(&self.shared.settings);
        s.blk = false;
        s.inc = false;
    }

    fn find_disk(&self, name: &str) -> Result<usize, SectionError> {
        self.disks
            .iter()
            .position(|d| d.name == name)
            .ok_or_else(|| {
                SectionError::state(
                    SECTION,
                    BlockMigrationError::UnknownDisk {
                        name: name.to_string(),
                        have: self.disks.iter().map(|d| d.name.clone()).collect(),
                    },
                )
            })
    }

    /// Destination: the image of disk `i`, opened for writing.
    fn open_writer(&mut self, i: usize) -> Result<(), SectionError> {
        if self.writers[i].is_none() {
            let d = &self.disks[i];
            let err = |source| {
                SectionError::state(
                    SECTION,
                    BlockMigrationError::Write {
                        name: d.name.clone(),
                        path: d.path.display().to_string(),
                        source,
                    },
                )
            };
            // Root could open a read-only file for writing anyway: refuse as for anyone else.
            let meta = std::fs::metadata(&d.path).map_err(err)?;
            if meta.permissions().readonly() {
                return Err(err(io::Error::from_raw_os_error(libc::EACCES)));
            }
            let f = OpenOptions::new().write(true).open(&d.path).map_err(err)?;
            self.writers[i] = Some(f);
        }
        Ok(())
    }

    fn invalid(e: BlockMigrationError) -> SectionError {
        SectionError::state(SECTION, e)
    }
}

fn write_name(out: &mut dyn SectionOutput, name: &str) -> io::Result<()> {
    let bytes = &name.as_bytes()[..name.len().min(255)];
    out.write_all(&[bytes.len() as u8])?;
    out.write_all(bytes)
}

fn read_name(input: &mut dyn Read) -> io::Result<String> {
    let mut len = [0u8];
    input.read_exact(&mut len)?;
    let mut name = vec![0u8; usize::from(len[0])];
    input.read_exact(&mut name)?;
    Ok(String::from_utf8_lossy(&name).into_owned())
}

/// The first offset at or after `from` holding data (`SEEK_DATA`); `None` when only a hole
/// follows up to `size`. A file system that cannot say reports `from` (everything is data).
pub fn next_data(file: &File, from: u64, size: u64) -> Option<u64> {
    let Ok(off) = libc::off_t::try_from(from) else {
        return Some(from);
    };
    // SAFETY: lseek on a descriptor `file` owns; it moves only that open file's offset,
    // which nothing else here uses (all I/O is positioned: pread / pwrite).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r < 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => None,
            _ => Some(from),
        };
    }
    let r = r as u64;
    (r < size).then_some(r)
}

fn punch_or_zero(file: &File, start: u64, len: u64) -> io::Result<()> {
    if let (Ok(off), Ok(n)) = (libc::off_t::try_from(start), libc::off_t::try_from(len)) {
        // SAFETY: fallocate on a descriptor `file` owns; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    let zeros = vec![0u8; len as usize];
    file.write_all_at(&zeros, start)
}

impl LiveSection for BlockSection {
    fn is_active(&self) -> bool {
        vmm_sync::lock(&self.shared.settings).enabled()
    }

    fn required_on_load(&self) -> bool {
        false
    }

    fn begin(&mut self, out: &mut dyn SectionOutput) -> Result<(), SectionError> {
        let settings = *vmm_sync::lock(&self.shared.settings);
        self.incremental = settings.incremental();
        self.running = true;
        self.cursors = vec![Cursor::default(); self.disks.len()];
        self.unflushed.clear();
        self.last_progress = None;
        let c = &self.shared.counters;
        c.active.store(true, Ordering::Relaxed);
        c.transferred.store(0, Ordering::Relaxed);
        c.total.store(self.total(), Ordering::Relaxed);
        for d in &self.disks {
            d.dirty.start();
            out.write_all(
                &((d.size / SECTOR_SIZE) << SECTOR_BITS | FLAG_X_HOPVM_SIZE).to_be_bytes(),
            )?;
            write_name(out, &d.name)?;
        }
        self.update_remaining();
        out.write_all(&FLAG_EOS.to_be_bytes())?;
        Ok(())
    }

    fn pending(&mut self, max_size: u64) -> u64 {
        if !self.running {
            return 0;
        }
        self.update_remaining();
        let remaining = self.remaining();
        if self.bulk_complete() {
            remaining
        } else {
            // As QEMU: never converge during the bulk pass (the stop-and-copy would carry
            // the rest of it), only once the dirty chunks left fit in the downtime.
            remaining.max(max_size.saturating_add(CHUNK_SIZE))
        }
    }

    fn iterate(&mut self, out: &mut dyn SectionOutput, budget: u64) -> Result<bool, SectionError> {
        let t0 = Instant::now();
        let mut sent = 0u64;
        let mut done = false;
        // At least one chunk; then up to the budget and the batch's time.
        while sent == 0 || (sent < budget && t0.elapsed() < BATCH_TIME) {
            let next = match self.next_bulk() {
                Some(n) => Some(n),
                None => self.next_dirty(),
            };
            let Some((i, chunk)) = next else {
                done = true;
                break;
            };
            sent += self.send_chunk(out, i, chunk)?;
            self.progress(out)?;
        }
        self.progress(out)?;
        self.update_remaining();
        out.write_all(&FLAG_EOS.to_be_bytes())?;
        Ok(done)
    }

    fn complete(&mut self, out: &mut dyn SectionOutput) -> Result<(), SectionError> {
        while let Some((i, chunk)) = self.next_bulk() {
            self.send_chunk(out, i, chunk)?;
            self.progress(out)?;
        }
        while let Some((i, chunk)) = self.next_dirty() {
            self.send_chunk(out, i, chunk)?;
        }
        self.last_progress = None;
        out.write_all(&(100 << SECTOR_BITS | FLAG_PROGRESS).to_be_bytes())?;
        out.write_all(&FLAG_EOS.to_be_bytes())?;
        self.update_remaining();
        // Tracking goes on until the migration ends: a failed switchover resumes the guest
        // here, and a later migration starts afresh anyway.
        Ok(())
    }

    fn flushed(&mut self) {
        self.unflushed.clear();
    }

    fn flush_failed(&mut self) {
        for (i, chunk) in self.unflushed.drain(..) {
            self.disks[i].dirty.set(chunk);
        }
    }

    fn cancel(&mut self) {
        self.stop_tracking();
    }

    fn finished(&mut self) {
        self.stop_tracking();
    }

    fn load(&mut self, input: &mut dyn Read, _version: u32) -> Result<(), SectionError> {
        let mut word = [0u8; 8];
        loop {
            input.read_exact(&mut word)?;
            let v = u64::from_be_bytes(word);
            let flags = v & FLAGS_MASK;
            let sector = v >> SECTOR_BITS;
            if flags & FLAG_X_HOPVM_SIZE != 0 {
                let name = read_name(input)?;
                let i = self.find_disk(&name)?;
                let d = &self.disks[i];
                let source_size = sector.saturating_mul(SECTOR_SIZE);
                if source_size != d.size {
                    return Err(Self::invalid(BlockMigrationError::SizeMismatch {
                        name,
                        path: d.path.display().to_string(),
                        source_size,
                        size: d.size,
                    }));
                }
                // Checked now, before any RAM or chunk arrives.
                self.open_writer(i)?;
            } else if flags & FLAG_DEVICE_BLOCK != 0 {
                let name = read_name(input)?;
                let i = self.find_disk(&name)?;
                let size = self.disks[i].size;
                let sectors = size / SECTOR_SIZE;
                if sector >= sectors {
                    return Err(Self::invalid(BlockMigrationError::OutOfRange {
                        name,
                        sector,
                        sectors,
                    }));
                }
                let len = (sectors - sector).min(CHUNK_SECTORS) * SECTOR_SIZE;
                let start = sector * SECTOR_SIZE;
                let zero = if flags & FLAG_ZERO_BLOCK != 0 {
                    true
                } else {
                    self.buf.resize(CHUNK_SIZE as usize, 0);
                    input.read_exact(&mut self.buf)?;
                    self.buf[..len as usize].iter().all(|&b| b == 0)
                };
                self.open_writer(i)?;
                let f = self.writers[i].as_ref().expect("opened above");
                let written = if zero {
                    punch_or_zero(f, start, len)
                } else {
                    f.write_all_at(&self.buf[..len as usize], start)
                };
                written.map_err(|source| {
                    Self::invalid(BlockMigrationError::Write {
                        name,
                        path: self.disks[i].path.display().to_string(),
                        source,
                    })
                })?;
            } else if flags & FLAG_PROGRESS != 0 {
                log::debug!("block migration: {sector} %");
            } else if flags & FLAG_EOS != 0 {
                return Ok(());
            } else {
                return Err(Self::invalid(BlockMigrationError::UnknownFlags(flags)));
            }
            if flags & FLAG_EOS != 0 {
                return Ok(());
            }
        }
    }

    fn load_end(&mut self) {
        for (d, w) in self.disks.iter().zip(self.writers.iter_mut()) {
            if let Some(f) = w.take() {
                if let Err(e) = f.sync_data() {
                    log::warn!("block migration: syncing {}: {e}", d.path.display());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    struct Tmp(PathBuf);

    impl Tmp {
        fn new(name: &str, size: u64) -> Self {
            let p = std::env::temp_dir().join(format!(
                "hopvm-blockmig-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let f = File::create(&p).unwrap();
            f.set_len(size).unwrap();
            Self(p)
        }

        fn disk(&self, name: &str) -> BlockDisk {
            let file = File::open(&self.0).unwrap();
            let size = file.metadata().unwrap().len();
            BlockDisk {
                name: name.to_string(),
                path: self.0.clone(),
                file,
                size,
                dirty: Arc::new(DirtyBitmap::new(size)),
            }
        }

        fn write(&self, off: u64, data: &[u8]) {
            OpenOptions::new()
                .write(true)
                .open(&self.0)
                .unwrap()
                .write_all_at(data, off)
                .unwrap();
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn section(disks: Vec<BlockDisk>, blk: bool, inc: bool) -> BlockSection {
        let shared = Arc::new(BlockMigration::default());
        *vmm_sync::lock(&shared.settings) = BlockSettings {
            blk,
            inc,
            ..Default::default()
        };
        BlockSection::new(disks, shared)
    }

    #[test]
    fn dirty_bitmap_never_drops_a_bit() {
        let map = Arc::new(DirtyBitmap::new(300 * CHUNK_SIZE));
        map.start();
        let marker = {
            let map = map.clone();
            std::thread::spawn(move || {
                let mut marked = BTreeSet::new();
                let mut x = 12345u64;
                for _ in 0..20000 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let c = (x >> 33) % 300;
                    map.mark(c * CHUNK_SIZE + 7, 1);
                    marked.insert(c);
                }
                marked
            })
        };
        // Take bits as the migration does while the writer marks them.
        let mut taken = BTreeSet::new();
        let mut cursor = 0;
        while !marker.is_finished() {
            if let Some(c) = map.next_set(cursor).or_else(|| map.next_set(0)) {
                cursor = c + 1;
                if map.take(c) {
                    taken.insert(c);
                }
            }
        }
        let marked = marker.join().unwrap();
        while let Some(c) = map.next_set(0) {
            assert!(map.take(c));
            taken.insert(c);
        }
        assert_eq!(taken, marked);
        assert_eq!(map.count(), 0);
        // A range marks every chunk it touches; nothing past the end; nothing when off.
        map.mark(CHUNK_SIZE - 1, 2);
        assert_eq!(map.next_set(0), Some(0));
        assert_eq!(map.next_set(1), Some(1));
        assert_eq!(map.count(), 2);
        map.mark(299 * CHUNK_SIZE, 10 * CHUNK_SIZE);
        assert_eq!(map.count(), 3);
        map.stop();
        map.mark(5 * CHUNK_SIZE, 1);
        assert_eq!(map.count(), 3);
    }

    /// Runs a whole migration of `src` into `dst` through a byte stream, calling `during`
    /// between the iterations (to write to the source).
    fn migrate(
        src: &mut BlockSection,
        dst: &mut BlockSection,
        mut during: impl FnMut(usize, &BlockSection),
    ) -> Result<(), SectionError> {
        assert!(src.is_active());
        let mut part = Vec::new();
        src.begin(&mut part).unwrap();
        dst.load(&mut &part[..], 1)?;
        for round in 0.. {
            let mut part = Vec::new();
            let done = src.iterate(&mut part, 2 * CHUNK_SIZE).unwrap();
            src.flushed();
            dst.load(&mut &part[..], 1)?;
            during(round, src);
            if done && round > 6 {
                break;
            }
        }
        let mut part = Vec::new();
        src.complete(&mut part).unwrap();
        dst.load(&mut &part[..], 1)?;
        dst.load_end();
        src.finished();
        assert!(!src.is_active(), "blk lasts one migration");
        Ok(())
    }

    #[test]
    fn full_copy_with_writes_during_the_migration() {
        let size = 5 * CHUNK_SIZE + 3 * SECTOR_SIZE;
        let (a, b) = (Tmp::new("full-src", size), Tmp::new("full-dst", size));
        a.write(0, &[1u8; 4096]);
        a.write(3 * CHUNK_SIZE + 512, &[2u8; 100_000]);
        a.write(size - 512, &[3u8; 512]);
        let writes = Tmp::new("full-writer", 0);
        drop(writes);
        let mut src = section(vec![a.disk("virtio0")], true, false);
        let mut dst = section(vec![b.disk("virtio0")], false, false);
        let writer = OpenOptions::new().write(true).open(&a.0).unwrap();
        migrate(&mut src, &mut dst, |round, s| {
            // The guest writes (then the back-end marks), chunks already sent included.
            let off = (round as u64 * 777_777) % (size - 4096);
            writer
                .write_all_at(&[(round % 200) as u8 + 10; 4096], off)
                .unwrap();
            s.disks[0].dirty.mark(off, 4096);
        })
        .unwrap();
        assert!(std::fs::read(&a.0).unwrap() == std::fs::read(&b.0).unwrap());
        let c = &src.shared.counters;
        assert_eq!(c.total.load(Ordering::Relaxed), size);
        assert!(
            c.transferred.load(Ordering::Relaxed) > size,
            "resent chunks count"
        );
        assert_eq!(c.remaining.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn two_disks_each_into_its_own_image() {
        let (a0, a1) = (Tmp::new("two-a0", 3 * CHUNK_SIZE), Tmp::new("two-a1", 4096));
        let (b0, b1) = (Tmp::new("two-b0", 3 * CHUNK_SIZE), Tmp::new("two-b1", 4096));
        a0.write(2 * CHUNK_SIZE + 17 * 512, &[0xabu8; 9000]);
        a1.write(512, &[0xcdu8; 1024]);
        let mut src = section(vec![a0.disk("virtio0"), a1.disk("virtio1")], true, false);
        // The destination lists them the other way round: matched by name.
        let mut dst = section(vec![b1.disk("virtio1"), b0.disk("virtio0")], false, false);
        migrate(&mut src, &mut dst, |_, _| {}).unwrap();
        assert!(std::fs::read(&a0.0).unwrap() == std::fs::read(&b0.0).unwrap());
        assert!(std::fs::read(&a1.0).unwrap() == std::fs::read(&b1.0).unwrap());
    }

    /// Through the registry, with `x-integrity`: the section is in the stream when `blk` is
    /// on, its chunks checksummed, and a destination loads it.
    #[test]
    fn through_the_registry_with_integrity() {
        use crate::registry::Registry;
        use crate::stream::{StreamReader, StreamWriter};
        let size = 2 * CHUNK_SIZE;
        let (a, b) = (Tmp::new("reg-src", size), Tmp::new("reg-dst", size));
        a.write(CHUNK_SIZE - 100, &[9u8; 300]);
        let mut src = Registry::new();
        src.register_live(
            SECTION,
            0,
            SECTION_VERSION,
            Box::new(section(vec![a.disk("virtio0")], true, false)),
        );
        let mut w = StreamWriter::with_integrity(Vec::new());
        src.begin(&mut w).unwrap();
        while !src.iterate(&mut w, CHUNK_SIZE).unwrap() {}
        src.complete(&mut w).unwrap();
        src.finished();
        let bytes = w.into_inner();
        let mut dst = Registry::new();
        dst.register_live(
            SECTION,
            0,
            SECTION_VERSION,
            Box::new(section(vec![b.disk("virtio0")], false, false)),
        );
        dst.load(&mut StreamReader::with_integrity(&bytes[..]))
            .unwrap();
        assert!(std::fs::read(&a.0).unwrap() == std::fs::read(&b.0).unwrap());
        // One bit flipped in a chunk's data: the load fails (at the part's checksum).
        let c = Tmp::new("reg-dst2", size);
        let pos = bytes.windows(100).position(|w| w == [9u8; 100]).unwrap();
        let mut bad = bytes.clone();
        bad[pos + 10] ^= 1;
        let mut dst = Registry::new();
        dst.register_live(
            SECTION,
            0,
            SECTION_VERSION,
            Box::new(section(vec![c.disk("virtio0")], false, false)),
        );
        let e = dst
            .load(&mut StreamReader::with_integrity(&bad[..]))
            .unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn incremental_sends_only_allocated_chunks_and_leaves_holes() {
        let size = 8 * CHUNK_SIZE;
        let (a, b) = (Tmp::new("inc-src", size), Tmp::new("inc-dst", size));
        a.write(CHUNK_SIZE + 4096, &[7u8; 8192]);
        a.write(6 * CHUNK_SIZE, &[9u8; 512]);
        let mut src = section(vec![a.disk("virtio0")], false, true);
        let mut dst = section(vec![b.disk("virtio0")], false, false);
        let mut stream_bytes = 0;
        let mut part = Vec::new();
        src.begin(&mut part).unwrap();
        dst.load(&mut &part[..], 1).unwrap();
        loop {
            let mut part = Vec::new();
            let done = src.iterate(&mut part, u64::MAX).unwrap();
            stream_bytes += part.len();
            dst.load(&mut &part[..], 1).unwrap();
            if done {
                break;
            }
        }
        let mut part = Vec::new();
        src.complete(&mut part).unwrap();
        dst.load(&mut &part[..], 1).unwrap();
        dst.load_end();
        assert!(std::fs::read(&a.0).unwrap() == std::fs::read(&b.0).unwrap());
        // Two chunks' data, not eight (where the file system keeps holes).
        let dst_file = File::open(&b.0).unwrap();
        if next_data(&File::open(&a.0).unwrap(), 0, size) == Some(CHUNK_SIZE) {
            assert!(stream_bytes < 3 * CHUNK_SIZE as usize, "{stream_bytes}");
            assert_eq!(
                next_data(&dst_file, 0, size).map(|o| o / CHUNK_SIZE),
                Some(1)
            );
            assert_eq!(
                next_data(&dst_file, 2 * CHUNK_SIZE, size).map(|o| o / CHUNK_SIZE),
                Some(6)
            );
            assert_eq!(next_data(&dst_file, 7 * CHUNK_SIZE, size), None);
        }
    }

    #[test]
    fn bad_streams_are_clear_errors() {
        let size = 2 * CHUNK_SIZE;
        let a = Tmp::new("bad-src", size);
        let b = Tmp::new("bad-dst", size);
        let small = Tmp::new("bad-small", CHUNK_SIZE);
        let mut src = section(vec![a.disk("virtio0")], true, false);
        let mut start = Vec::new();
        src.begin(&mut start).unwrap();
        let load = |disks: Vec<BlockDisk>, bytes: &[u8]| {
            section(disks, false, false)
                .load(&mut &bytes[..], 1)
                .map_err(|e| e.to_string())
        };
        // Size mismatch, no such disk, no disk at all.
        let e = load(vec![small.disk("virtio0")], &start).unwrap_err();
        assert!(e.contains("needs images of the same size"), "{e}");
        let e = load(vec![b.disk("virtio1")], &start).unwrap_err();
        assert!(
            e.contains("carries disk 'virtio0', but this VM has disks virtio1"),
            "{e}"
        );
        let e = load(vec![], &start).unwrap_err();
        assert!(e.contains("but this VM has no disk"), "{e}");
        assert!(load(vec![b.disk("virtio0")], &start).is_ok());
        // A read-only destination image.
        let ro = Tmp::new("bad-ro", size);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro.0, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = load(vec![ro.disk("virtio0")], &start).unwrap_err();
        assert!(e.contains("cannot write the image"), "{e}");
        // A chunk past the end, unknown flags, a cut-off chunk.
        let mut chunk = Vec::new();
        chunk.extend_from_slice(&((4096u64) << 9 | FLAG_DEVICE_BLOCK).to_be_bytes());
        chunk.extend_from_slice(&[7, b'v', b'i', b'r', b't', b'i', b'o', b'0']);
        chunk.extend_from_slice(&vec![1u8; CHUNK_SIZE as usize]);
        chunk.extend_from_slice(&FLAG_EOS.to_be_bytes());
        let e = load(vec![b.disk("virtio0")], &chunk).unwrap_err();
        assert!(e.contains("past the end"), "{e}");
        let e = load(vec![b.disk("virtio0")], &(0x40u64).to_be_bytes()).unwrap_err();
        assert!(e.contains("unknown block migration flags 0x40"), "{e}");
        let mut cut = chunk.clone();
        cut[..8].copy_from_slice(&(FLAG_DEVICE_BLOCK).to_be_bytes());
        for len in [3, 8, 12, 16, 1000] {
            assert!(load(vec![b.disk("virtio0")], &cut[..len]).is_err(), "{len}");
        }
        // Every single-byte corruption of a real part: an error or a load, never a panic.
        let mut part = Vec::new();
        src.iterate(&mut part, 1).unwrap();
        for i in (0..part.len()).step_by(part.len() / 300 + 1).chain(0..32) {
            let mut bad = part.clone();
            bad[i] ^= 0xa5;
            let _ = load(vec![b.disk("virtio0")], &bad);
        }
    }
}
