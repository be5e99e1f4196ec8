//! Issue 14's fault campaign, bounded for CI (see `tests/faults/mod.rs`): 30 migrations of the
//! busy self-verifying guest, each with one random fault at a random moment, then a ping-pong
//! of 20 clean hops between the two hosts. The soak (`cargo bench -p hopvm --bench fault_soak`)
//! runs the same with more iterations and prints the counts.

mod common;
mod faults;

use faults::Campaign;

/// The seed: `HOPVM_FAULT_SEED` replays a run.
fn seed() -> u64 {
    std::env::var("HOPVM_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0014)
}

#[test]
fn thirty_random_faults_lose_no_guest_and_run_no_second_copy() {
    let seed = seed();
    let mut c = Campaign::new("fault-campaign", seed);
    for _ in 0..30 {
        c.iteration(true);
    }
    // A follow-up migration without a fault completes.
    c.iteration(false);
    println!(
        "seed {seed:#x}, two namespaces: {}\n{}",
        c.two_namespaces(),
        c.counts.report()
    );
    assert_eq!(c.counts.lost, 0);
    assert_eq!(c.counts.split_brains, 0);
    assert!(c.counts.outcomes.get("completed").copied().unwrap_or(0) >= 1);
    // Every kind of fault was drawn.
    assert_eq!(c.counts.faults.len(), 7, "{:?}", c.counts.faults);
}

#[test]
fn ping_pong_twenty_hops() {
    let mut c = Campaign::new("ping-pong", seed());
    for _ in 0..20 {
        c.iteration(false);
    }
    println!("{}", c.counts.report());
    assert_eq!(
        c.counts.outcomes.get("completed"),
        Some(&20),
        "{:?}",
        c.counts.outcomes
    );
    assert_eq!(c.counts.downtimes_ms.len(), 20);
}
