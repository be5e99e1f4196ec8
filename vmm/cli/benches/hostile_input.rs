//! The long hostile-input run: the campaigns of `tests/hostile/mod.rs` with many more cases.
//!
//! `cargo bench -p hopvm --bench hostile_input [-- CASES [SEED]]` (default 20 000 cases per
//! campaign, seed 1). Prints the counts; panics (and names the seed and case) on a panic,
//! a hang, a huge allocation or an `x-integrity` stream that loaded.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/hostile/mod.rs"]
mod hostile;

use std::time::Instant;

use hostile::{Counting, Streams};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let cases: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let seed: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    let t = Instant::now();
    let streams = Streams::new();
    println!(
        "captured streams: {} bytes plain, {} bytes with x-integrity",
        streams.plain.len(),
        streams.integrity.len()
    );
    let mut total = 0;
    let mut report = |what: &str, c: hostile::Counts| {
        total += c.cases;
        println!("{what:28} {c}");
    };
    report("stream loader", streams.plain_campaign(cases, seed));
    report(
        "stream loader, x-integrity",
        streams.integrity_campaign(cases, seed + 1),
    );
    report("device restore", streams.device_campaign(cases, seed + 2));
    report(
        "xbzrle decoder",
        hostile::xbzrle_campaign(cases * 4, seed + 3),
    );
    let dir = common::proc::TempDir::new("hostile-bench");
    let server = hostile::qmp_server(&dir.0);
    report(
        "qmp input",
        hostile::qmp_campaign(&server, cases / 4, seed + 4),
    );
    server.shutdown();
    println!(
        "total {total} cases in {:.0} s: no panic, no hang, no allocation over {} MiB",
        t.elapsed().as_secs_f64(),
        hostile::MAX_ALLOCATION >> 20
    );
}
