//! Pausing and resuming every vCPU, reliably and quickly: the guest keeps running, without
//! corruption, across a thousand cycles (live migration pauses the guest the same way).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm::config::{SerialConfig, VmConfig};
use vmm::vm::{SharedWriter, Vm};

/// Serial output captured in memory, with a condition variable signalled on every write so a
/// test can wait for the guest to print something without sleeping.
#[derive(Clone, Default)]
struct Capture(Arc<(Mutex<Vec<u8>>, Condvar)>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 .0.lock().unwrap().extend_from_slice(buf);
        self.0 .1.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0 .0.lock().unwrap()).into_owned()
    }

    /// Waits until `pred` holds for the output, or panics after `timeout`.
    fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut out = self.0 .0.lock().unwrap();
        while !pred(&String::from_utf8_lossy(&out)) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}; output:\n{}", String::from_utf8_lossy(&out));
            out = self.0 .1.wait_timeout(out, left).unwrap().0;
        }
    }
}

fn passes(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("pass ")).count()
}

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
    capture.wait_for(Duration::from_secs(120), "the first pass", |t| passes(t) >= 1);

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
