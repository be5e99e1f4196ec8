//! Live migration between two VMs in one process, over every transport: the dirty guest keeps
//! running on the destination without a single corrupted word.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{passes, Capture};
use migration::thread::MigrationStatus;
use vmm::config::{SerialConfig, VmConfig};
use vmm::instance::Instance;
use vmm::runstate::RunState;
use vmm::vm::SharedWriter;

fn config(kernel: bool) -> VmConfig {
    let mut c = VmConfig::new(guest_tests::image_path("dirty"));
    if !kernel {
        c.kernel = None;
    }
    c.cmdline = String::from("ws=4");
    c.memory = 64 << 20;
    c.serial = SerialConfig::Null;
    c
}

fn instance(kernel: bool) -> (Arc<Instance>, Capture) {
    let capture = Capture::default();
    let i = Instance::new(
        &config(kernel),
        SharedWriter::new(Box::new(capture.clone())),
    )
    .unwrap();
    (i, capture)
}

/// Migrates a running dirty guest to a fresh destination over `uri`; returns the source's
/// final migration info.
fn migrate_over(uri: &str, xbzrle: bool) -> migration::thread::MigrationInfo {
    let (src, src_out) = instance(true);
    let (dst, dst_out) = instance(false);
    src.cont().unwrap();
    src_out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);

    if xbzrle {
        src.migration.xbzrle.lock().unwrap().enabled = true;
    }
    src.migration.set_max_bandwidth(0);
    let status = common::migrate(&src, &dst, uri);
    let info = src.migration.info();
    assert_eq!(status, MigrationStatus::Completed, "{info:?}");
    assert_eq!(src.runstate(), RunState::Postmigrate);

    // The guest goes on on the destination: two more verified passes there.
    dst_out.wait_for(Duration::from_secs(120), "passes on the destination", |t| {
        passes(t) >= 2
    });
    assert_eq!(dst.runstate(), RunState::Running);
    for out in [&src_out, &dst_out] {
        assert!(!out.text().contains("CORRUPT"), "{}", out.text());
    }
    // The numbers add up.
    assert!(info.transferred >= info.normal_bytes, "{info:?}");
    assert!(
        info.duplicate + info.normal >= info.total / 4096,
        "{info:?}"
    );
    assert_eq!(info.remaining, 0);
    info
}

fn unix_uri(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("hopvm-mig-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    format!("unix:{}", dir.join("sock").display())
}

#[test]
fn over_unix() {
    migrate_over(&unix_uri("unix"), false);
}

#[test]
fn over_unix_with_xbzrle() {
    let info = migrate_over(&unix_uri("xbzrle"), true);
    assert!(info.xbzrle);
}
