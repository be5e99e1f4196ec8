//! XBZRLE, QEMU's XOR-based zero run-length page delta (`migration/xbzrle.c`), and the cache
//! of previously sent pages it encodes against.
//!
//! A guest that keeps rewriting a few bytes of many pages (counters, timestamps, small
//! structures) makes pre-copy resend whole pages every round. XBZRLE instead sends the
//! difference between the page now and the copy the destination already has: the source
//! keeps those copies in an [`XbzrleCache`] and the destination applies the delta to its page
//! in place.
//!
//! # Encoding
//!
//! Exactly QEMU's `xbzrle_encode_buffer` format, so hopvm streams interoperate:
//!
//! ```text
//! encoding := { zrun nzrun }*       (a trailing unchanged run is not encoded)
//! zrun     := uleb128 count of unchanged bytes (0 allowed only for the first run)
//! nzrun    := uleb128 count (≥ 1) of changed bytes, then those bytes from the new page
//! ```
//!
//! The lengths are QEMU's "small" ULEB128: one byte below 128, else two bytes, so at most
//! 14 bits; pages are therefore limited to [`MAX_PAGE_LEN`] bytes. An unchanged page encodes
//! to nothing (`Some` empty vector) and is not sent at all; an encoding that does not fit in
//! `max_out` bytes is an *overflow* (`None`) and the page is sent whole instead. (QEMU's encoder
//! checks for overflow a little conservatively and may give up one or two bytes before the
//! limit; hopvm's gives up only when the encoding really does not fit, which produces the same
//! bytes whenever both succeed.)
//!
//! The encoder compares eight bytes at a time with `u64` loads: a XOR of zero skips eight
//! unchanged bytes, and the first changed (or first unchanged) byte inside a word is found
//! with `trailing_zeros` on the XOR (or on the classic has-zero-byte mask of the XOR).
//!
//! The decoder validates everything before touching the page — every length in range, no
//! empty runs after the first, no run past the page or past the input — so a corrupted
//! encoding leaves the page unchanged and returns an error.
//!
//! # The cache
//!
//! Like QEMU's `page_cache.c`, [`XbzrleCache`] is *direct-mapped*: a power-of-two number of
//! page slots (the byte size rounded down), indexed by page number modulo the slot count.
//! Lookup and insertion are O(1) with no per-access bookkeeping, which matters because the
//! cache is consulted for every dirty page. Each slot remembers the *generation* (QEMU's
//! dirty-bitmap sync count) at which it was last written; a page may not evict a different
//! page that was written within the last [`CACHED_PAGE_LIFETIME`] generations, so two hot
//! pages that collide do not keep evicting each other. The size can be changed at any time;
//! resizing keeps the cached pages that still fit (on a collision, the most recent one).

use crate::ram_format::PAGE_SIZE;

/// Largest page the 14-bit run lengths can describe.
pub const MAX_PAGE_LEN: usize = 0x3fff;
/// Default cache size, 64 MiB (QEMU's default `xbzrle-cache-size`).
pub const DEFAULT_CACHE_SIZE: u64 = 64 << 20;
/// Generations during which a cached page is protected from eviction by another page.
pub const CACHED_PAGE_LIFETIME: u64 = 2;

/// Errors of XBZRLE decoding and cache sizing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XbzrleError {
    /// The encoding ends inside a run.
    #[error("truncated xbzrle data")]
    Truncated,
    /// A run length that does not fit in two ULEB128 bytes.
    #[error("bad xbzrle run length")]
    BadLength,
    /// A zero-length run where QEMU's format forbids one.
    #[error("empty xbzrle run")]
    EmptyRun,
    /// The runs go past the end of the page.
    #[error("xbzrle runs exceed the page")]
    Overflow,
    /// A cache smaller than one page.
    #[error("cache size {0} is smaller than a page")]
    CacheTooSmall(u64),
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

#[inline]
fn load(s: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[i..i + 8]);
    u64::from_le_bytes(b)
}

/// First index ≥ `i` where the pages differ, or the length.
#[inline]
fn find_diff(old: &[u8], new: &[u8], mut i: usize) -> usize {
    let n = old.len();
    while i + 8 <= n {
        let x = load(old, i) ^ load(new, i);
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && old[i] == new[i] {
        i += 1;
    }
    i
}

/// First index ≥ `i` where the pages are equal, or the length.
#[inline]
fn find_same(old: &[u8], new: &[u8], mut i: usize) -> usize {
    let n = old.len();
    while i + 8 <= n {
        let x = load(old, i) ^ load(new, i);
        // Flags the zero bytes of x; the lowest flag is exact (borrows only propagate upwards
        // from a zero byte), which is the one we want with little-endian loads.
        let zero = x.wrapping_sub(LO) & !x & HI;
        if zero != 0 {
            return i + (zero.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && old[i] != new[i] {
        i += 1;
    }
    i
}

/// Appends a small ULEB128 (`v` ≤ [`MAX_PAGE_LEN`]) at `d`; None if it does not fit.
#[inline]
fn put_uleb(dst: &mut [u8], d: usize, v: usize) -> Option<usize> {
    if v < 0x80 {
        *dst.get_mut(d)? = v as u8;
        Some(d + 1)
    } else {
        let out = dst.get_mut(d..d + 2)?;
        out[0] = (v & 0x7f) as u8 | 0x80;
        out[1] = (v >> 7) as u8;
        Some(d + 2)
    }
}

/// Encodes the delta from `old` to `new` into `dst`, returning its length, or None when it
/// does not fit in `dst` (overflow) or the pages differ in length or exceed
/// [`MAX_PAGE_LEN`]. `Some(0)` means the pages are identical.
pub fn encode_into(old: &[u8], new: &[u8], dst: &mut [u8]) -> Option<usize> {
    let n = old.len();
    if new.len() != n || n > MAX_PAGE_LEN {
        return None;
    }
    let mut i = 0;
    let mut d = 0;
    while i < n {
        let nz_start = find_diff(old, new, i);
        if nz_start == n {
            // The trailing unchanged run is implied.
            break;
        }
        d = put_uleb(dst, d, nz_start - i)?;
        let nz_end = find_same(old, new, nz_start);
        d = put_uleb(dst, d, nz_end - nz_start)?;
        dst.get_mut(d..d + (nz_end - nz_start))?
            .copy_from_slice(&new[nz_start..nz_end]);
        d += nz_end - nz_start;
        i = nz_end;
    }
    Some(d)
}

/// Encodes the delta from `old` to `new` (see [`encode_into`]); None on overflow of
/// `max_out` bytes. An empty vector means the pages are identical.
pub fn encode(old: &[u8], new: &[u8], max_out: usize) -> Option<Vec<u8>> {
    let mut dst = vec![0u8; max_out.min(2 * MAX_PAGE_LEN + 2)];
    let len = encode_into(old, new, &mut dst)?;
    dst.truncate(len);
    Some(dst)
}

/// Reads a small ULEB128 at the start of `src`: (value, bytes used).
fn get_uleb(src: &[u8]) -> Result<(usize, usize), XbzrleError> {
    let b0 = *src.first().ok_or(XbzrleError::Truncated)?;
    if b0 & 0x80 == 0 {
        return Ok((usize::from(b0), 1));
    }
    let b1 = *src.get(1).ok_or(XbzrleError::Truncated)?;
    if b1 & 0x80 != 0 {
        return Err(XbzrleError::BadLength);
    }
    Ok((usize::from(b0 & 0x7f) | (usize::from(b1) << 7), 2))
}

/// Walks the runs of `src` for a page of `page_len` bytes, with QEMU's checks, calling
/// `apply(offset, bytes)` for each changed run. Returns the end of the last run.
fn walk(
    src: &[u8],
    page_len: usize,
    mut apply: impl FnMut(usize, &[u8]),
) -> Result<usize, XbzrleError> {
    let mut i = 0;
    let mut d = 0;
    while i < src.len() {
        // A zero run must be followed by a non-empty changed run: at least two more bytes.
        if src.len() - i < 2 {
            return Err(XbzrleError::Truncated);
        }
        let (zrun, used) = get_uleb(&src[i..])?;
        if i != 0 && zrun == 0 {
            return Err(XbzrleError::EmptyRun);
        }
        i += used;
        d += zrun;
        if d > page_len {
            return Err(XbzrleError::Overflow);
        }
        if src.len() - i < 2 {
            return Err(XbzrleError::Truncated);
        }
        let (nzrun, used) = get_uleb(&src[i..])?;
        if nzrun == 0 {
            return Err(XbzrleError::EmptyRun);
        }
        i += used;
        if d + nzrun > page_len {
            return Err(XbzrleError::Overflow);
        }
        let bytes = src.get(i..i + nzrun).ok_or(XbzrleError::Truncated)?;
        apply(d, bytes);
        d += nzrun;
        i += nzrun;
    }
    Ok(d)
}

/// Applies `encoded` to `page` in place. The whole encoding is validated first, so on error
/// the page is unchanged. Returns the offset just past the last changed byte.
pub fn decode(encoded: &[u8], page: &mut [u8]) -> Result<usize, XbzrleError> {
    walk(encoded, page.len(), |_, _| {})?;
    walk(encoded, page.len(), |d, bytes| {
        page[d..d + bytes.len()].copy_from_slice(bytes)
    })
}

/// What [`XbzrleCache::encode_page`] decided for a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XbzrleOutcome {
    /// The page was not cached: send it whole. (It has been cached for next time unless this
    /// is the last stage.)
    Miss,
    /// The page has not changed since it was last sent: send nothing.
    Unchanged,
    /// Send this delta in an XBZRLE record.
    Encoded(Vec<u8>),
    /// The delta would be larger than a page: send it whole.
    Overflow,
}

/// Counters of an [`XbzrleCache`], as in QEMU's `query-migrate` xbzrle statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XbzrleStats {
    /// Pages found in the cache.
    pub cache_hits: u64,
    /// Pages not found in the cache.
    pub cache_misses: u64,
    /// Pages sent as a delta.
    pub pages: u64,
    /// Bytes of deltas produced.
    pub bytes: u64,
    /// Cached pages whose delta did not fit.
    pub overflows: u64,
    /// Cached pages that had not changed.
    pub unchanged: u64,
}

#[derive(Debug)]
struct Slot {
    addr: u64,
    age: u64,
    data: Box<[u8]>,
}

/// Direct-mapped cache of the pages last sent, keyed by page address (see the module docs).
#[derive(Debug)]
pub struct XbzrleCache {
    size: u64,
    slots: Vec<Option<Slot>>,
    stats: XbzrleStats,
    scratch: Vec<u8>,
}

impl Default for XbzrleCache {
    /// A [`DEFAULT_CACHE_SIZE`] cache.
    fn default() -> Self {
        let mut c = XbzrleCache {
            size: 0,
            slots: Vec::new(),
            stats: XbzrleStats::default(),
            scratch: vec![0u8; PAGE_SIZE],
        };
        c.resize_slots(DEFAULT_CACHE_SIZE);
        c
    }
}

fn slot_count(bytes: u64) -> usize {
    let pages = usize::try_from(bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX);
    // Round down to a power of two (pages ≥ 1 here).
    1usize << (usize::BITS - 1 - pages.leading_zeros())
}

impl XbzrleCache {
    /// A cache of `size` bytes (rounded down to a power-of-two number of pages).
    pub fn new(size: u64) -> Result<Self, XbzrleError> {
        let mut c = XbzrleCache::default();
        c.set_size(size)?;
        Ok(c)
    }

    /// The size asked for, in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many pages the cache can hold.
    pub fn capacity_pages(&self) -> usize {
        self.slots.len()
    }

    /// How many pages are cached.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Whether no page is cached.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// The counters so far.
    pub fn stats(&self) -> XbzrleStats {
        self.stats
    }

    /// Changes the size, effective at once. Cached pages are kept where they still fit; when
    /// shrinking makes two collide, the more recently written one stays.
    pub fn set_size(&mut self, size: u64) -> Result<(), XbzrleError> {
        if size < PAGE_SIZE as u64 {
            return Err(XbzrleError::CacheTooSmall(size));
        }
        self.resize_slots(size);
        Ok(())
    }

    fn resize_slots(&mut self, size: u64) {
        let count = slot_count(size.max(PAGE_SIZE as u64));
        self.size = size;
        if count == self.slots.len() {
            return;
        }
        let old = std::mem::take(&mut self.slots);
        self.slots.resize_with(count, || None);
        for slot in old.into_iter().flatten() {
            let idx = self.index(slot.addr);
            match &self.slots[idx] {
                Some(cur) if cur.age >= slot.age => {}
                _ => self.slots[idx] = Some(slot),
            }
        }
    }

    /// Drops every cached page (the counters are kept).
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = None);
    }

    fn index(&self, addr: u64) -> usize {
        // slots.len() is a power of two.
        ((addr / PAGE_SIZE as u64) as usize) & (self.slots.len() - 1)
    }

    /// Whether the page at `addr` is cached.
    pub fn is_cached(&self, addr: u64) -> bool {
        self.get(addr).is_some()
    }

    /// The cached copy of the page at `addr`.
    pub fn get(&self, addr: u64) -> Option<&[u8]> {
        match &self.slots[self.index(addr)] {
            Some(s) if s.addr == addr => Some(&s.data),
            _ => None,
        }
    }

    /// Caches `data` (one page) for `addr` at `generation`. Returns false, caching nothing,
    /// when the slot holds a different page written less than [`CACHED_PAGE_LIFETIME`]
    /// generations ago, or when `data` is not one page long.
    pub fn insert(&mut self, addr: u64, data: &[u8], generation: u64) -> bool {
        if data.len() != PAGE_SIZE {
            return false;
        }
        let idx = self.index(addr);
        match &mut self.slots[idx] {
            Some(s)
                if s.addr != addr && s.age.saturating_add(CACHED_PAGE_LIFETIME) > generation =>
            {
                false
            }
            Some(s) => {
                s.addr = addr;
                s.age = generation;
                s.data.copy_from_slice(data);
                true
            }
            empty @ None => {
                *empty = Some(Slot {
                    addr,
                    age: generation,
                    data: data.into(),
                });
                true
            }
        }
    }

    /// Records that the page at `addr` was sent as a zero page (QEMU's
    /// `xbzrle_cache_zero_page`), so a later delta is computed against zeros.
    pub fn insert_zero(&mut self, addr: u64, generation: u64) -> bool {
        self.scratch.fill(0);
        let zero = std::mem::take(&mut self.scratch);
        let ok = self.insert(addr, &zero, generation);
        self.scratch = zero;
        ok
    }

    /// Decides how to send the page at `addr` whose current contents are `new_page` (a stable
    /// copy: the cache stores exactly these bytes, which must be what is sent), as QEMU's
    /// `save_xbzrle_page` does. Outside the last stage the cache is updated to `new_page`, so
    /// it keeps matching the destination. Pages that are not [`PAGE_SIZE`] long are a miss
    /// and are never cached.
    pub fn encode_page(
        &mut self,
        addr: u64,
        new_page: &[u8],
        generation: u64,
        last_stage: bool,
    ) -> XbzrleOutcome {
        let idx = self.index(addr);
        let slot = match &mut self.slots[idx] {
            Some(s) if s.addr == addr && new_page.len() == PAGE_SIZE => s,
            _ => {
                self.stats.cache_misses += 1;
                if !last_stage {
                    self.insert(addr, new_page, generation);
                }
                return XbzrleOutcome::Miss;
            }
        };
        self.stats.cache_hits += 1;
        slot.age = generation;
        let out = &mut self.scratch[..crate::ram_format::MAX_XBZRLE_LEN];
        match encode_into(&slot.data, new_page, out) {
            Some(0) => {
                self.stats.unchanged += 1;
                XbzrleOutcome::Unchanged
            }
            Some(len) => {
                if !last_stage {
                    slot.data.copy_from_slice(new_page);
                }
                self.stats.pages += 1;
                self.stats.bytes += len as u64;
                XbzrleOutcome::Encoded(out[..len].to_vec())
            }
            None => {
                if !last_stage {
                    slot.data.copy_from_slice(new_page);
                }
                self.stats.overflows += 1;
                XbzrleOutcome::Overflow
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64: deterministic randomness without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Straightforward byte-at-a-time transcription of the format, as a reference.
    fn reference_encode(old: &[u8], new: &[u8]) -> Vec<u8> {
        fn uleb(out: &mut Vec<u8>, v: usize) {
            if v < 0x80 {
                out.push(v as u8);
            } else {
                out.push((v & 0x7f) as u8 | 0x80);
                out.push((v >> 7) as u8);
            }
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < old.len() {
            let z = i;
            while i < old.len() && old[i] == new[i] {
                i += 1;
            }
            if i == old.len() {
                break;
            }
            uleb(&mut out, i - z);
            let nz = i;
            while i < old.len() && old[i] != new[i] {
                i += 1;
            }
            uleb(&mut out, i - nz);
            out.extend_from_slice(&new[nz..i]);
        }
        out
    }

    fn random_page(rng: &mut Rng) -> Vec<u8> {
        (0..PAGE_SIZE).map(|_| rng.next() as u8).collect()
    }

    fn modify(rng: &mut Rng, page: &[u8]) -> Vec<u8> {
        let mut new = page.to_vec();
        let mode = rng.below(5);
        let edits = match mode {
            0 => 0,
            1 => 1 + rng.below(4),
            2 => 1 + rng.below(64),
            3 => 1 + rng.below(1024),
            _ => PAGE_SIZE,
        };
        for _ in 0..edits {
            let at = rng.below(PAGE_SIZE);
            let len = 1 + rng.below(if mode == 4 { 1 } else { 40 });
            for b in new.iter_mut().skip(at).take(len) {
                // Sometimes write the same value: an "edit" that changes nothing.
                *b = if rng.below(8) == 0 {
                    *b
                } else {
                    rng.next() as u8
                };
            }
        }
        new
    }

    #[test]
    fn known_encodings() {
        let old = [0u8; 16];
        let mut new = old;
        assert_eq!(encode(&old, &new, 100).unwrap(), Vec::<u8>::new());
        new[0] = 1;
        assert_eq!(encode(&old, &new, 100).unwrap(), vec![0, 1, 1]);
        new[5] = 2;
        new[6] = 3;
        assert_eq!(encode(&old, &new, 100).unwrap(), vec![0, 1, 1, 4, 2, 2, 3]);
        new[15] = 9;
        assert_eq!(
            encode(&old, &new, 100).unwrap(),
            vec![0, 1, 1, 4, 2, 2, 3, 8, 1, 9]
        );
        // Two-byte lengths: 200 unchanged bytes then 130 changed.
        let old = vec![0u8; 400];
        let mut new = old.clone();
        new[200..330].fill(5);
        let enc = encode(&old, &new, 1000).unwrap();
        assert_eq!(&enc[..4], &[0xc8, 0x01, 0x82, 0x01]);
        assert_eq!(enc.len(), 4 + 130);
        let mut page = old.clone();
        assert_eq!(decode(&enc, &mut page).unwrap(), 330);
        assert_eq!(page, new);
    }

    #[test]
    fn random_round_trips_match_reference() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for _ in 0..3000 {
            let old = random_page(&mut rng);
            let new = modify(&mut rng, &old);
            let reference = reference_encode(&old, &new);
            let enc = encode(&old, &new, usize::MAX).unwrap();
            assert_eq!(enc, reference);
            let mut page = old.clone();
            decode(&enc, &mut page).unwrap();
            assert_eq!(page, new);
            // Overflow: None exactly when the encoding is longer than the limit.
            let limit = rng.below(reference.len() + 2);
            match encode(&old, &new, limit) {
                Some(e) => {
                    assert!(reference.len() <= limit);
                    assert_eq!(e, reference);
                }
                None => assert!(reference.len() > limit),
            }
            let mut dst = vec![0u8; PAGE_SIZE];
            match encode_into(&old, &new, &mut dst) {
                Some(n) => assert_eq!(&dst[..n], &reference[..]),
                None => assert!(reference.len() > PAGE_SIZE),
            }
        }
    }

    #[test]
    fn unaligned_lengths_and_edges() {
        let mut rng = Rng(42);
        for len in [0usize, 1, 7, 8, 9, 15, 17, 100, 4095] {
            for _ in 0..50 {
                let old: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let mut new = old.clone();
                for _ in 0..rng.below(4) {
                    if len > 0 {
                        let at = rng.below(len);
                        new[at] = new[at].wrapping_add(1);
                    }
                }
                let enc = encode(&old, &new, usize::MAX).unwrap();
                assert_eq!(enc, reference_encode(&old, &new));
                let mut page = old.clone();
                decode(&enc, &mut page).unwrap();
                assert_eq!(page, new);
            }
        }
        // Everything changed: worst case is larger than a page, so it overflows a page.
        let old = vec![0u8; PAGE_SIZE];
        let new: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 2) as u8).collect();
        assert_eq!(encode(&old, &new, PAGE_SIZE), None);
        assert!(encode(&old, &new, usize::MAX).unwrap().len() > PAGE_SIZE);
        // Mismatched and oversized pages are not encodable.
        assert_eq!(encode(&old, &old[..100], PAGE_SIZE), None);
        let big = vec![0u8; MAX_PAGE_LEN + 1];
        assert_eq!(encode(&big, &big, usize::MAX), None);
    }

    #[test]
    fn decode_rejects_malformed() {
        let mut page = [0u8; 16];
        let cases: &[(&[u8], XbzrleError)] = &[
            (&[0], XbzrleError::Truncated),
            (&[0, 1], XbzrleError::Truncated),
            (&[0, 2, 1], XbzrleError::Truncated),
            (&[0, 0], XbzrleError::Truncated),
            (&[0, 0, 5], XbzrleError::EmptyRun),
            (&[0, 1, 1, 0, 1, 1], XbzrleError::EmptyRun),
            (&[17, 1, 1], XbzrleError::Overflow),
            (&[15, 2, 1, 1], XbzrleError::Overflow),
            (&[0x80, 0x80, 0x01, 1, 1], XbzrleError::BadLength),
            (&[0, 0x81, 0x80, 1], XbzrleError::BadLength),
            (&[16, 1, 1], XbzrleError::Overflow),
        ];
        for (enc, err) in cases {
            let before = page;
            assert_eq!(decode(enc, &mut page), Err(err.clone()), "{enc:?}");
            assert_eq!(page, before, "page changed on error");
        }
        // An error late in the encoding leaves the page untouched.
        assert_eq!(
            decode(&[0, 1, 9, 20, 1, 1], &mut page),
            Err(XbzrleError::Overflow)
        );
        assert_eq!(page, [0u8; 16]);
        // Empty encoding: nothing changes.
        assert_eq!(decode(&[], &mut page), Ok(0));
        // A non-canonical two-byte length is accepted, as QEMU does.
        assert_eq!(decode(&[0x81, 0x00, 1, 7], &mut page), Ok(2));
        assert_eq!(page[1], 7);
    }

    #[test]
    fn corrupted_encodings_never_panic() {
        let mut rng = Rng(7);
        for _ in 0..3000 {
            let old = random_page(&mut rng);
            let new = modify(&mut rng, &old);
            let Some(mut enc) = encode(&old, &new, PAGE_SIZE) else {
                continue;
            };
            match rng.below(3) {
                0 if !enc.is_empty() => {
                    let at = rng.below(enc.len());
                    enc[at] ^= 1 << rng.below(8);
                }
                1 => enc.truncate(rng.below(enc.len() + 1)),
                _ => {
                    let at = rng.below(enc.len() + 1);
                    enc.insert(at, rng.next() as u8);
                }
            }
            let mut page = old.clone();
            if decode(&enc, &mut page).is_err() {
                assert_eq!(page, old);
            }
            // Smaller destination pages too.
            let mut small = vec![0u8; rng.below(64)];
            let _ = decode(&enc, &mut small);
        }
        // Pure garbage.
        for _ in 0..3000 {
            let len = rng.below(64);
            let enc: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut page = vec![0u8; PAGE_SIZE];
            let _ = decode(&enc, &mut page);
        }
    }

    #[test]
    fn cache_hits_misses_and_updates() {
        let mut cache = XbzrleCache::new(16 * PAGE_SIZE as u64).unwrap();
        assert_eq!(cache.capacity_pages(), 16);
        let mut rng = Rng(99);
        let p0 = random_page(&mut rng);
        assert_eq!(
            cache.encode_page(0x1000, &p0, 1, false),
            XbzrleOutcome::Miss
        );
        assert_eq!(cache.get(0x1000), Some(&p0[..]));
        assert_eq!(
            cache.encode_page(0x1000, &p0, 1, false),
            XbzrleOutcome::Unchanged
        );
        let mut p1 = p0.clone();
        p1[10] ^= 0xff;
        let XbzrleOutcome::Encoded(enc) = cache.encode_page(0x1000, &p1, 2, false) else {
            panic!("expected a delta");
        };
        let mut dest = p0.clone();
        decode(&enc, &mut dest).unwrap();
        assert_eq!(dest, p1);
        assert_eq!(cache.get(0x1000), Some(&p1[..]), "cache not updated");
        // Overflow: the cache still follows the page.
        let p2 = random_page(&mut rng);
        assert_eq!(
            cache.encode_page(0x1000, &p2, 3, false),
            XbzrleOutcome::Overflow
        );
        assert_eq!(cache.get(0x1000), Some(&p2[..]));
        // Last stage: no cache updates.
        let mut p3 = p2.clone();
        p3[0] ^= 1;
        assert!(matches!(
            cache.encode_page(0x1000, &p3, 4, true),
            XbzrleOutcome::Encoded(_)
        ));
        assert_eq!(cache.get(0x1000), Some(&p2[..]));
        assert_eq!(cache.encode_page(0x5000, &p3, 4, true), XbzrleOutcome::Miss);
        assert!(!cache.is_cached(0x5000));
        // Wrong length: a miss, never cached.
        assert_eq!(
            cache.encode_page(0x6000, &p3[..100], 4, false),
            XbzrleOutcome::Miss
        );
        assert!(!cache.is_cached(0x6000));
        let s = cache.stats();
        assert_eq!(s.cache_hits, 4);
        assert_eq!(s.cache_misses, 3);
        assert_eq!(s.unchanged, 1);
        assert_eq!(s.overflows, 1);
        assert_eq!(s.pages, 2);
        assert!(s.bytes > 0);
    }

    #[test]
    fn cache_replacement_respects_lifetime() {
        let mut cache = XbzrleCache::new(4 * PAGE_SIZE as u64).unwrap();
        let a = vec![1u8; PAGE_SIZE];
        let b = vec![2u8; PAGE_SIZE];
        // 0x0 and 0x4000 share slot 0.
        assert!(cache.insert(0x0, &a, 10));
        assert!(!cache.insert(0x4000, &b, 11), "fresh page evicted");
        assert!(cache.is_cached(0x0));
        assert!(cache.insert(0x4000, &b, 12));
        assert!(!cache.is_cached(0x0));
        assert_eq!(cache.get(0x4000), Some(&b[..]));
        // The same page can always be refreshed.
        assert!(cache.insert(0x4000, &a, 12));
        // A hit refreshes the age.
        cache.encode_page(0x4000, &a, 20, false);
        assert!(!cache.insert(0x0, &b, 21));
        assert!(cache.insert_zero(0x4000, 21));
        assert_eq!(cache.get(0x4000), Some(&[0u8; PAGE_SIZE][..]));
        assert!(!cache.insert(0x1000, &[0u8; 10], 0));
        assert_eq!(cache.len(), 1);
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn cache_resize() {
        assert_eq!(
            XbzrleCache::new(100).unwrap_err(),
            XbzrleError::CacheTooSmall(100)
        );
        let mut cache = XbzrleCache::default();
        assert_eq!(cache.size(), DEFAULT_CACHE_SIZE);
        assert_eq!(cache.capacity_pages(), 16384);
        cache.set_size(5 * PAGE_SIZE as u64 + 7).unwrap();
        assert_eq!(cache.capacity_pages(), 4);
        for page in 0..4u64 {
            assert!(cache.insert(page * 0x1000, &[page as u8; PAGE_SIZE], page));
        }
        // Growing keeps everything.
        cache.set_size(64 * PAGE_SIZE as u64).unwrap();
        assert_eq!(cache.len(), 4);
        assert!(cache.insert(0x10000, &[9u8; PAGE_SIZE], 100));
        // Shrinking to 2 slots: 0x0, 0x2000 and 0x10000 collide in slot 0; the newest wins.
        cache.set_size(2 * PAGE_SIZE as u64).unwrap();
        assert_eq!(cache.capacity_pages(), 2);
        assert_eq!(cache.get(0x10000), Some(&[9u8; PAGE_SIZE][..]));
        assert_eq!(cache.get(0x3000), Some(&[3u8; PAGE_SIZE][..]));
        assert!(!cache.is_cached(0x0));
        assert!(!cache.is_cached(0x1000));
        assert_eq!(cache.len(), 2);
        assert!(cache.set_size(PAGE_SIZE as u64 - 1).is_err());
        assert_eq!(cache.capacity_pages(), 2, "failed resize changed the cache");
        cache.set_size(PAGE_SIZE as u64).unwrap();
        assert_eq!(cache.len(), 1);
    }
}
