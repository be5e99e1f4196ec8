//! Pausing and resuming every vCPU, reliably and quickly: the guest keeps running, without
//! corruption, across a thousand cycles (live migration pauses the guest the same way).

mod common;

use std::time::{Duration, Instant};

use common::{passes, Capture};

use vmm::config::{SerialConfig, VmConfig};
use vmm::vm::{SharedWriter, Vm};

#[test]
fn guest_keeps_running_across_1000_pause_resume_cycles() {
    let capture = Capture::default();
    let mut config = VmConfig::new(guest_tests::image_path("dirty"));
    config.cmdline = String::from("ws=1");
    config.memory = 64 << 20;
    // A second vCPU sits in INIT-wait inside KVM_RUN: pausing must kick it out too.
    config.cpus = 2;
    config.serial = SerialConfig::Null;
    let vm = Vm::build(&config, SharedWriter::new(Box::new(capture.clone()))).unwrap();
    vm.resume();
    capture.wait_for(Duration::from_secs(120), "the first pass", |t| {
        passes(t) >= 1
    });

    let mut worst = Duration::ZERO;
    let start = Instant::now();
    for _ in 0..1000 {
        let t = Instant::now();
        vm.pause();
        worst = worst.max(t.elapsed());
        assert!(!vm.is_running());
        vm.resume();
        assert!(vm.is_running());
    }
    println!(
        "1000 pause/resume cycles in {:?} (worst pause {:?})",
        start.elapsed(),
        worst
    );
    let before = passes(&capture.text());
    capture.wait_for(Duration::from_secs(120), "two more passes", |t| {
        passes(t) >= before + 2
    });
    let text = capture.text();
    assert!(!text.contains("CORRUPT"), "{text}");
}
