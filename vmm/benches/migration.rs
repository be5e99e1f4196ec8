//! Live migration benchmark, printed rather than asserted: a 1 GiB guest migrated over
//! loopback TCP with no bandwidth limit and a 30 ms maximum downtime, once idle and once while
//! the dirty guest rewrites a 256 MiB working set.
//!
//! Run with `cargo bench -p vmm --bench migration`. Both VMs live in this process (the
//! transport is a real TCP connection over loopback).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Capture;

use migration::thread::{MigrationEvent, MigrationStatus};
use vmm::config::{SerialConfig, VmConfig};
use vmm::instance::Instance;
use vmm::vm::SharedWriter;

fn instance(image: &str, kernel: bool, cmdline: &str) -> (Arc<Instance>, Capture) {
    let mut c = VmConfig::new(guest_tests::image_path(image));
    if !kernel {
        c.kernel = None;
    }
    c.cmdline = cmdline.to_string();
    c.memory = 1 << 30;
    c.serial = SerialConfig::Null;
    let capture = Capture::default();
    let i = Instance::new(&c, SharedWriter::new(Box::new(capture.clone()))).unwrap();
    (i, capture)
}

fn run(label: &str, image: &str, cmdline: &str, ready: &str, port: u16) {
    let (src, out) = instance(image, true, cmdline);
    let (dst, _) = instance(image, false, cmdline);
    src.cont().unwrap();
    // Idle: the guest has booted. Busy: the working set has been written and verified once.
    out.wait_for(Duration::from_secs(600), ready, |t| {
        t.lines().any(|l| l.starts_with(ready))
    });
    src.migration.set_max_bandwidth(0);
    src.migration.set_downtime_limit_ms(30);
    let (tx, rx) = mpsc::channel();
    src.migration.add_notifier(move |e| {
        if let MigrationEvent::Status(s) = e {
            if !s.is_running() {
                let _ = tx.send(*s);
            }
        }
    });
    let uri = format!("tcp:127.0.0.1:{port}");
    dst.incoming(&uri).unwrap();
    let start = Instant::now();
    src.migrate(&uri).unwrap();
    let status = rx.recv_timeout(Duration::from_secs(600)).unwrap();
    let wall = start.elapsed();
    let i = src.migration.info();
    let t = src.migration.timeline();
    assert_eq!(status, MigrationStatus::Completed, "{i:?}");
    println!(
        "{label}: total {} ms (wall {:.1} ms), downtime {} ms, setup {} ms, {} passes, \
         {:.1} MiB sent, {} zero + {} full pages, throughput {:.2} GB/s",
        i.total_time_ms,
        wall.as_secs_f64() * 1e3,
        i.downtime_ms,
        i.setup_time_ms,
        i.dirty_sync_count,
        i.transferred as f64 / (1 << 20) as f64,
        i.duplicate,
        i.normal,
        i.transferred as f64 / wall.as_secs_f64() / 1e9
    );
    if let (Some(stop), Some(end)) = (t.stop_ms, t.end_ms) {
        println!(
            "{label}: stop-and-copy from {stop:.1} ms to {end:.1} ms; {} slots measured",
            t.slots.len()
        );
    }
}

fn main() {
    run("idle 1 GiB", "idle", "", "idle", 47_311);
    run(
        "busy 1 GiB, 256 MiB working set",
        "dirty",
        "ws=256",
        "pass ",
        47_312,
    );
}
