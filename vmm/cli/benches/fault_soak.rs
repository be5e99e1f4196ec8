//! The fault soak (issue 14): the campaign of `tests/faults/mod.rs` with many iterations,
//! printed rather than asserted per iteration (a lost guest or split brain still stops it
//! with the details). `HOPVM_FAULT_ITERATIONS` (default 200), `HOPVM_FAULT_SEED`.
//!
//! Run with `cargo bench -p hopvm --bench fault_soak`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/faults/mod.rs"]
mod faults;

fn main() {
    let n: u64 = std::env::var("HOPVM_FAULT_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("HOPVM_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    let start = std::time::Instant::now();
    let mut c = faults::Campaign::new("fault-soak", seed);
    for i in 0..n {
        c.iteration(true);
        if (i + 1) % 25 == 0 {
            eprintln!(
                "{} iterations, {:.0} s",
                i + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    c.iteration(false);
    println!(
        "fault soak: seed {seed}, two namespaces: {}, {:.0} s\n{}",
        c.two_namespaces(),
        start.elapsed().as_secs_f64(),
        c.counts.report()
    );
}
