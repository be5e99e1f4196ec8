//! Bandwidth limiting in 100 ms slots, and the buffer sections write into (QEMU's
//! `migration_rate_limit()` and `QEMUFile` buffering).
//!
//! A migration that sends as fast as it can starves the guest and everything else on the
//! host's network, so QEMU caps it at `max-bandwidth`. It does not pace individual writes:
//! time is cut into [`BUFFER_DELAY`] (100 ms) slots, each allowed `bandwidth / 10` bytes
//! ([`RateLimiter::xfer_limit`]); once a slot's allowance is used up the migration thread
//! sleeps until the slot ends. Checking only between batches keeps the hot path to one
//! comparison, and the slot boundary doubles as the point where QEMU measures the achieved
//! bandwidth ([`SlotSummary`]) to decide whether the rest fits in the downtime limit.
//!
//! The limiter takes explicit [`Instant`]s so that the migration thread decides when "now" is
//! and tests are deterministic.
//!
//! [`BufferedOutput`] is where sections write their records. The migration thread writes
//! them while holding the big VMM lock (the guest's state must not change under a section)
//! and flushes the buffer to the transport after releasing it, so a slow network never
//! stalls vCPUs or device emulation.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use crate::SectionOutput;

/// Length of a rate-limiting slot.
pub const BUFFER_DELAY: Duration = Duration::from_millis(100);
/// Slots per second: the per-slot allowance is `bandwidth / XFER_LIMIT_RATIO`.
pub const XFER_LIMIT_RATIO: u64 = 1000 / BUFFER_DELAY.as_millis() as u64;
/// QEMU's default `max-bandwidth`, 128 MiB/s.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

/// Errors of the rate limiter and output buffer.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// Writing the buffered bytes to the transport failed; the unsent bytes are still
    /// buffered.
    #[error("flush failed after {written} bytes: {source}")]
    Flush {
        /// Bytes written before the failure.
        written: u64,
        /// The transport's error.
        #[source]
        source: io::Error,
    },
}

/// What happened in a slot that just ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotSummary {
    /// Bytes recorded in the slot.
    pub bytes: u64,
    /// How long the slot lasted.
    pub elapsed: Duration,
}

impl SlotSummary {
    /// The bandwidth achieved in the slot, in bytes per second (0 for an empty slot).
    pub fn bandwidth(&self) -> u64 {
        let micros = self.elapsed.as_micros();
        if micros == 0 {
            return 0;
        }
        u64::try_from(u128::from(self.bytes) * 1_000_000 / micros).unwrap_or(u64::MAX)
    }
}

/// Per-slot byte allowance, QEMU style.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    bandwidth: u64,
    xfer_limit: u64,
    used: u64,
    slot_start: Instant,
}

impl RateLimiter {
    /// A limiter of `bandwidth` bytes per second (0: unlimited) whose first slot starts at
    /// `now`.
    pub fn new(bandwidth: u64, now: Instant) -> Self {
        let mut r = RateLimiter {
            bandwidth: 0,
            xfer_limit: 0,
            used: 0,
            slot_start: now,
        };
        r.set_bandwidth(bandwidth);
        r
    }

    /// Changes the limit, effective for the current slot already (as QEMU's
    /// `migrate-set-parameters max-bandwidth`). 0 means unlimited; any other value allows at
    /// least one byte per slot.
    pub fn set_bandwidth(&mut self, bandwidth: u64) {
        self.bandwidth = bandwidth;
        self.xfer_limit = if bandwidth == 0 {
            0
        } else {
            (bandwidth / XFER_LIMIT_RATIO).max(1)
        };
    }

    /// The limit in bytes per second (0: unlimited).
    pub fn bandwidth(&self) -> u64 {
        self.bandwidth
    }

    /// The allowance per slot (0: unlimited).
    pub fn xfer_limit(&self) -> u64 {
        self.xfer_limit
    }

    /// Counts `bytes` as sent in the current slot.
    pub fn record(&mut self, bytes: u64) {
        self.used = self.used.saturating_add(bytes);
    }

    /// Bytes recorded in the current slot.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Whether the current slot's allowance is used up: more than `xfer_limit` bytes were
    /// recorded (QEMU's strict comparison), and the limiter is not unlimited.
    pub fn exceeded(&self) -> bool {
        self.xfer_limit > 0 && self.used > self.xfer_limit
    }

    /// When the current slot started.
    pub fn slot_start(&self) -> Instant {
        self.slot_start
    }

    /// Time left until the current slot ends (zero once it has ended): how long to sleep
    /// when [`exceeded`](Self::exceeded).
    pub fn time_to_slot_end(&self, now: Instant) -> Duration {
        (self.slot_start + BUFFER_DELAY).saturating_duration_since(now)
    }

    /// Whether the current slot has ended at `now`.
    pub fn slot_over(&self, now: Instant) -> bool {
        now >= self.slot_start + BUFFER_DELAY
    }

    /// Starts a new slot at `now`, returning what the ended one did.
    pub fn new_slot(&mut self, now: Instant) -> SlotSummary {
        let summary = SlotSummary {
            bytes: self.used,
            elapsed: now.saturating_duration_since(self.slot_start),
        };
        self.used = 0;
        self.slot_start = now;
        summary
    }

    /// Starts a new slot if the current one has ended (QEMU's `migration_update_counters`).
    pub fn maybe_new_slot(&mut self, now: Instant) -> Option<SlotSummary> {
        self.slot_over(now).then(|| self.new_slot(now))
    }
}

/// An in-memory output buffer (QEMU's `QEMUFile` buffer): sections write into it with the
/// VMM lock held, and it is flushed to the transport without the lock.
///
/// Besides bytes it holds *guest pieces* ([`SectionOutput::write_guest`]): RAM pages
/// referenced in place, sent straight from guest memory by vectored writes (up to
/// [`MAX_IOV`] pieces per system call) instead of being copied into the buffer first.
#[derive(Debug, Default)]
pub struct BufferedOutput {
    buf: Vec<u8>,
    /// Guest pieces in stream order; each goes before `buf[at..]`.
    guest: Vec<GuestPiece>,
    guest_len: usize,
    flushed: u64,
}

#[derive(Debug, Clone, Copy)]
struct GuestPiece {
    at: usize,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the pieces point into guest memory mappings, which every thread of the VMM may
// read; `write_guest`'s contract keeps them mapped while the buffer holds them.
unsafe impl Send for BufferedOutput {}

/// Most pieces handed to one vectored write (Linux's `UIO_MAXIOV`).
pub const MAX_IOV: usize = 1024;

/// How far a flush got: bytes of `buf` consumed, whole guest pieces consumed, and bytes of
/// the next guest piece consumed.
#[derive(Debug, Clone, Copy, Default)]
struct FlushCursor {
    head: usize,
    piece: usize,
    piece_off: usize,
}

impl BufferedOutput {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes buffered and not yet flushed.
    pub fn pending(&self) -> usize {
        self.buf.len() + self.guest_len
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.pending() == 0
    }

    /// Bytes handed to the transport so far (by [`flush_to`](Self::flush_to)).
    pub fn flushed(&self) -> u64 {
        self.flushed
    }

    /// All bytes produced so far, flushed or not (QEMU's `qemu_file_transferred`, which is
    /// what the rate limit counts).
    pub fn transferred(&self) -> u64 {
        self.flushed + self.pending() as u64
    }

    /// A copy of everything buffered, in stream order.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.pending());
        self.segments(FlushCursor::default(), usize::MAX, usize::MAX)
            .iter()
            .for_each(|s| v.extend_from_slice(s));
        v
    }

    /// Up to `max` slices and `limit` bytes from `c` on, in stream order.
    fn segments(&self, c: FlushCursor, max: usize, mut limit: usize) -> Vec<io::IoSlice<'_>> {
        let mut out = Vec::new();
        // Adds what fits; false once nothing more may be added.
        fn push<'a>(
            out: &mut Vec<io::IoSlice<'a>>,
            piece: &'a [u8],
            limit: &mut usize,
            max: usize,
        ) -> bool {
            let piece = &piece[..piece.len().min(*limit)];
            *limit -= piece.len();
            out.push(io::IoSlice::new(piece));
            *limit > 0 && out.len() < max
        }
        let mut head = c.head;
        let mut off = c.piece_off;
        if limit == 0 || max == 0 {
            return out;
        }
        for g in &self.guest[c.piece..] {
            if head < g.at {
                if !push(&mut out, &self.buf[head..g.at], &mut limit, max) {
                    return out;
                }
                head = g.at;
            }
            // SAFETY: write_guest's contract keeps the piece mapped while it is buffered.
            let piece = unsafe { std::slice::from_raw_parts(g.ptr.add(off), g.len - off) };
            if !push(&mut out, piece, &mut limit, max) {
                return out;
            }
            off = 0;
        }
        if head < self.buf.len() {
            push(&mut out, &self.buf[head..], &mut limit, max);
        }
        out
    }

    /// Moves `c` past `n` more bytes.
    fn advance(&self, c: &mut FlushCursor, mut n: usize) {
        while n > 0 {
            let next_at = self.guest.get(c.piece).map_or(self.buf.len(), |g| g.at);
            if c.head < next_at {
                let k = n.min(next_at - c.head);
                c.head += k;
                n -= k;
                continue;
            }
            let g = &self.guest[c.piece];
            let k = n.min(g.len - c.piece_off);
            c.piece_off += k;
            n -= k;
            if c.piece_off == g.len {
                c.piece += 1;
                c.piece_off = 0;
            }
        }
    }

    /// Drops what a flush up to `c` sent.
    fn consume(&mut self, c: FlushCursor) {
        if c.head == self.buf.len() && c.piece == self.guest.len() {
            // Everything went: keep the allocations for the next batch.
            self.buf.clear();
            self.guest.clear();
            self.guest_len = 0;
            return;
        }
        self.buf.drain(..c.head);
        self.guest.drain(..c.piece);
        for g in &mut self.guest {
            g.at -= c.head;
        }
        if let Some(g) = self.guest.first_mut() {
            // SAFETY: c.piece_off < g.len, inside the piece.
            g.ptr = unsafe { g.ptr.add(c.piece_off) };
            g.len -= c.piece_off;
        }
        self.guest_len = self.guest.iter().map(|g| g.len).sum();
    }

    /// Writes everything buffered to `out` (vectored), returning the byte count. On error
    /// the bytes not written stay buffered and the error says how many were.
    pub fn flush_to(&mut self, out: &mut dyn Write) -> Result<u64, RateLimitError> {
        self.flush_keeping(out, 0)
    }

    /// [`flush_to`](Self::flush_to), but the last `keep` bytes stay buffered: the caller
    /// decides when they go (the end of a stream, once nothing may undo the migration).
    pub fn flush_keeping(
        &mut self,
        out: &mut dyn Write,
        keep: usize,
    ) -> Result<u64, RateLimitError> {
        let total = self.pending().saturating_sub(keep);
        let mut c = FlushCursor::default();
        let mut written = 0usize;
        let result = loop {
            if written == total {
                break out.flush();
            }
            let r = {
                let iov = self.segments(c, MAX_IOV, total - written);
                out.write_vectored(&iov)
            };
            match r {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.advance(&mut c, n);
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.consume(c);
        self.flushed += written as u64;
        match result {
            Ok(()) => Ok(written as u64),
            Err(source) => Err(RateLimitError::Flush {
                written: written as u64,
                source,
            }),
        }
    }
}

impl Write for BufferedOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Flushing is [`flush_to`](BufferedOutput::flush_to)'s job; this does nothing.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SectionOutput for BufferedOutput {
    unsafe fn write_guest(&mut self, data: *const u8, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let at = self.buf.len();
        // Adjacent guest memory (consecutive pages) becomes one piece.
        if let Some(last) = self.guest.last_mut() {
            // SAFETY: one past the end of the previous piece, for comparison only.
            if last.at == at && unsafe { last.ptr.add(last.len) } == data {
                last.len += len;
                self.guest_len += len;
                return Ok(());
            }
        }
        self.guest.push(GuestPiece { at, ptr: data, len });
        self.guest_len += len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_limits() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1000, t0);
        assert_eq!(r.xfer_limit(), 100);
        r.record(100);
        assert!(!r.exceeded(), "QEMU only stops past the limit");
        r.record(1);
        assert!(r.exceeded());
        assert_eq!(r.time_to_slot_end(t0), BUFFER_DELAY);
        assert_eq!(
            r.time_to_slot_end(t0 + Duration::from_millis(30)),
            Duration::from_millis(70)
        );
        assert_eq!(
            r.time_to_slot_end(t0 + Duration::from_millis(300)),
            Duration::ZERO
        );
        assert!(!r.slot_over(t0 + Duration::from_millis(99)));
        assert_eq!(r.maybe_new_slot(t0 + Duration::from_millis(99)), None);
        let t1 = t0 + Duration::from_millis(100);
        let s = r.maybe_new_slot(t1).unwrap();
        assert_eq!(s.bytes, 101);
        assert_eq!(s.elapsed, BUFFER_DELAY);
        assert_eq!(s.bandwidth(), 1010);
        assert_eq!(r.used(), 0);
        assert!(!r.exceeded());
        assert_eq!(r.slot_start(), t1);
        assert_eq!(r.time_to_slot_end(t1), BUFFER_DELAY);
    }

    #[test]
    fn unlimited_and_changes_take_effect_at_once() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(0, t0);
        assert_eq!(r.xfer_limit(), 0);
        r.record(u64::MAX);
        r.record(5);
        assert!(!r.exceeded());
        assert_eq!(r.used(), u64::MAX);
        r.new_slot(t0);
        r.record(500);
        r.set_bandwidth(1000);
        assert!(r.exceeded(), "new limit applies to the current slot");
        r.set_bandwidth(10_000);
        assert!(!r.exceeded());
        r.set_bandwidth(0);
        assert!(!r.exceeded());
        assert_eq!(r.bandwidth(), 0);
        // Tiny limits still limit.
        r.set_bandwidth(5);
        assert_eq!(r.xfer_limit(), 1);
        assert!(r.exceeded());
        assert_eq!(
            RateLimiter::new(DEFAULT_MAX_BANDWIDTH, t0).xfer_limit(),
            DEFAULT_MAX_BANDWIDTH / 10
        );
    }

    #[test]
    fn slot_summary_bandwidth() {
        let s = SlotSummary {
            bytes: 0,
            elapsed: Duration::ZERO,
        };
        assert_eq!(s.bandwidth(), 0);
        let s = SlotSummary {
            bytes: 1 << 20,
            elapsed: Duration::from_millis(250),
        };
        assert_eq!(s.bandwidth(), 4 << 20);
        // A clock that went backwards gives an empty slot, not a panic.
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10, t0 + Duration::from_secs(1));
        assert_eq!(r.new_slot(t0).elapsed, Duration::ZERO);
    }

    #[test]
    fn buffered_output_take_and_flush() {
        let mut b = BufferedOutput::new();
        b.write_all(b"hello ").unwrap();
        write!(b, "world").unwrap();
        b.flush().unwrap();
        assert_eq!(b.pending(), 11);
        assert_eq!(b.transferred(), 11);
        assert_eq!(b.flushed(), 0);
        assert_eq!(b.to_vec(), b"hello world");
        let mut sink = Vec::new();
        assert_eq!(b.flush_to(&mut sink).unwrap(), 11);
        assert_eq!(sink, b"hello world");
        assert!(b.is_empty());
        assert_eq!(b.flushed(), 11);
        b.write_all(b"abc").unwrap();
        assert_eq!(b.transferred(), 14);
        assert_eq!(b.flush_to(&mut sink).unwrap(), 3);
        assert_eq!(b.flushed(), 14);
        assert_eq!(b.flush_to(&mut sink).unwrap(), 0);
    }

    /// Accepts `room` bytes, a few at a time, then fails.
    struct Choking {
        got: Vec<u8>,
        room: usize,
        interrupted: bool,
    }

    impl Write for Choking {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.room == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(3).min(self.room);
            self.got.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_flush_keeps_the_rest() {
        let mut b = BufferedOutput::new();
        b.write_all(b"0123456789").unwrap();
        let mut out = Choking {
            got: Vec::new(),
            room: 7,
            interrupted: false,
        };
        match b.flush_to(&mut out) {
            Err(RateLimitError::Flush { written, source }) => {
                assert_eq!(written, 7);
                assert_eq!(source.kind(), io::ErrorKind::BrokenPipe);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(out.got, b"0123456");
        assert_eq!(b.to_vec(), b"789");
        assert_eq!(b.flushed(), 7);
        assert_eq!(b.transferred(), 10);
        let mut sink = Vec::new();
        assert_eq!(b.flush_to(&mut sink).unwrap(), 3);
        assert_eq!(sink, b"789");

        struct Zero;
        impl Write for Zero {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        b.write_all(b"x").unwrap();
        assert!(b.flush_to(&mut Zero).is_err());
        assert_eq!(b.pending(), 1);
    }
    /// Guest pieces go out in place, in order with the bytes around them, through partial
    /// and failing writes alike.
    #[test]
    fn guest_pieces_keep_their_place() {
        let pages: Vec<u8> = (0..=255u8).cycle().take(3 * 4096).collect();
        let mut b = BufferedOutput::new();
        b.write_all(b"hdr0").unwrap();
        // SAFETY: `pages` outlives `b`'s use of it.
        unsafe {
            b.write_guest(pages.as_ptr(), 4096).unwrap();
            b.write_guest(pages.as_ptr().add(4096), 4096).unwrap();
        }
        b.write_all(b"hdr2").unwrap();
        // SAFETY: as above.
        unsafe { b.write_guest(pages.as_ptr().add(8192), 4096).unwrap() };
        b.write_all(b"end").unwrap();
        let mut want = b"hdr0".to_vec();
        want.extend_from_slice(&pages[..8192]);
        want.extend_from_slice(b"hdr2");
        want.extend_from_slice(&pages[8192..]);
        want.extend_from_slice(b"end");
        assert_eq!(b.pending(), want.len());
        assert_eq!(b.to_vec(), want);

        // A writer that takes 5 bytes, then fails: the rest stays, guest pieces included.
        let mut out = Choking {
            got: Vec::new(),
            room: 5,
            interrupted: false,
        };
        assert!(b.flush_to(&mut out).is_err());
        assert_eq!(out.got, &want[..5]);
        assert_eq!(b.to_vec(), &want[5..]);
        let mut sink = Vec::new();
        assert_eq!(b.flush_to(&mut sink).unwrap() as usize, want.len() - 5);
        assert_eq!(sink, &want[5..]);
        assert!(b.is_empty());
        assert_eq!(b.flushed() as usize, want.len());
    }

    /// The kept tail stays until asked for, guest pieces or not.
    #[test]
    fn flush_keeping_holds_the_tail() {
        let page = [9u8; 100];
        let mut b = BufferedOutput::new();
        b.write_all(b"head").unwrap();
        // SAFETY: `page` outlives `b`'s use of it.
        unsafe { b.write_guest(page.as_ptr(), page.len()).unwrap() };
        b.write_all(b"tail").unwrap();
        let want = b.to_vec();
        let mut sink = Vec::new();
        assert_eq!(
            b.flush_keeping(&mut sink, 50).unwrap() as usize,
            want.len() - 50
        );
        assert_eq!(sink, &want[..want.len() - 50]);
        assert_eq!(b.pending(), 50);
        assert_eq!(b.flush_to(&mut sink).unwrap(), 50);
        assert_eq!(sink, want);
    }

    /// More pieces than one vectored write takes.
    #[test]
    fn many_pieces_are_split_across_writes() {
        let page = [7u8; 64];
        let mut b = BufferedOutput::new();
        for i in 0..(3 * MAX_IOV) {
            b.write_all(&[i as u8]).unwrap();
            // SAFETY: `page` outlives `b`'s use of it.
            unsafe { b.write_guest(page.as_ptr(), page.len()).unwrap() };
        }
        let want = b.to_vec();
        assert_eq!(want.len(), 3 * MAX_IOV * 65);
        let mut sink = Vec::new();
        assert_eq!(b.flush_to(&mut sink).unwrap() as usize, want.len());
        assert_eq!(sink, want);
    }
}
