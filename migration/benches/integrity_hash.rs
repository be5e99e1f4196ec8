//! The cost of `x-integrity`: XXH3-64 throughput on page-sized and large buffers, and the
//! stream writer / reader with and without the checksums on 256 MiB of page data.
//!
//! `cargo bench -p migration --bench integrity_hash` — prints GiB/s; nothing is asserted.

use std::io::{Read, Write};
use std::time::Instant;

use migration::integrity::Digest;
use migration::stream::{StreamReader, StreamWriter};

const PAGE: usize = 4096;
const TOTAL: usize = 256 << 20;

fn gibs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / f64::from(1u32 << 30)
}

/// Page data that is not trivially compressible: an xorshift sequence.
fn data() -> Vec<u8> {
    let mut v = vec![0u8; TOTAL];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// Writes `data` as one live section of 4 KiB-page parts of 64 pages each.
fn write(data: &[u8], integrity: bool) -> (Vec<u8>, f64) {
    let out = Vec::with_capacity(data.len() + (data.len() >> 8));
    let mut w = if integrity {
        StreamWriter::with_integrity(out)
    } else {
        StreamWriter::new(out)
    };
    let t = Instant::now();
    w.header().unwrap();
    w.section_start(2, "ram", 0, 4).unwrap();
    w.footer(2).unwrap();
    for part in data.chunks(64 * PAGE) {
        w.section_part(2).unwrap();
        for page in part.chunks(PAGE) {
            w.write_all(page).unwrap();
        }
        w.footer(2).unwrap();
    }
    w.eof_with_description().unwrap();
    let secs = t.elapsed().as_secs_f64();
    (w.into_inner(), secs)
}

fn read(stream: &[u8], integrity: bool) -> f64 {
    let mut r = if integrity {
        StreamReader::with_integrity(stream)
    } else {
        StreamReader::new(stream)
    };
    let mut page = vec![0u8; PAGE];
    let t = Instant::now();
    r.next_record().unwrap();
    r.next_record().unwrap();
    r.expect_footer(2).unwrap();
    for _ in 0..TOTAL / (64 * PAGE) {
        r.next_record().unwrap();
        for _ in 0..64 {
            r.read_exact(&mut page).unwrap();
        }
        r.expect_footer(2).unwrap();
    }
    while r.next_record().unwrap().is_some() {}
    t.elapsed().as_secs_f64()
}

fn main() {
    let data = data();
    // The hash alone, fed a page at a time (how the stream feeds it) and in one call.
    let mut best_page = f64::MAX;
    let mut best_bulk = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut d = Digest::new();
        for page in data.chunks(PAGE) {
            d.update(page);
        }
        std::hint::black_box(d.value());
        best_page = best_page.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut d = Digest::new();
        d.update(&data);
        std::hint::black_box(d.value());
        best_bulk = best_bulk.min(t.elapsed().as_secs_f64());
    }
    println!(
        "xxh3-64, 4 KiB updates : {:6.2} GiB/s",
        gibs(TOTAL, best_page)
    );
    println!(
        "xxh3-64, one 256 MiB update: {:6.2} GiB/s",
        gibs(TOTAL, best_bulk)
    );
    for (what, integrity) in [("plain", false), ("x-integrity", true)] {
        let mut best_w = f64::MAX;
        let mut best_r = f64::MAX;
        for _ in 0..3 {
            let (stream, w) = write(&data, integrity);
            best_w = best_w.min(w);
            best_r = best_r.min(read(&stream, integrity));
        }
        println!(
            "stream {what:12} write {:6.2} GiB/s  read {:6.2} GiB/s",
            gibs(TOTAL, best_w),
            gibs(TOTAL, best_r)
        );
    }
}
