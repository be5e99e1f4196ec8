//! `auto-converge`: a busy guest migrated over a link slower than its dirtying gets its vCPUs
//! throttled (QEMU's `cpu-throttle-percentage`, rising from `cpu-throttle-initial`), runs at
//! full speed again the moment the migration is cancelled, and, throttled, still migrates
//! intact once the link allows it.

mod common;

use std::time::Duration;

use common::passes;
use common::proc::{Hopvm, TempDir};
use common::tools::free_tcp_port;
use serde_json::{json, Value};

const MEMORY: &str = "64M";
const LONG: Duration = Duration::from_secs(180);

/// Starts a migration of `src` to a new destination at 4 MiB/s — far below what the busy
/// guest dirties — with `auto-converge` on, and returns the destination once query-migrate
/// reports the vCPUs throttled.
fn throttled_migration(dir: &TempDir, src: &mut Hopvm, name: &str) -> Hopvm {
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Hopvm::spawn(&dir.0, name, &["--memory", MEMORY, "--incoming", &uri]);
    for vm in [&mut *src, &mut dst] {
        vm.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
    }
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
    );
    src.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 4 << 20, "downtime-limit": 1, "cpu-throttle-initial": 30}),
    );
    src.cmd("migrate", json!({"uri": uri}));
    // The throttle is decided at dirty syncs, each of which is a MIGRATION_PASS.
    loop {
        if let Err(e) = src.qmp.wait_event("MIGRATION_PASS", LONG, |_| true) {
            panic!("no throttle before the passes stopped: {e}");
        }
        let info = src.cmd("query-migrate", Value::Null);
        // Pass 1 is announced during setup.
        assert!(
            info["status"] == "active" || info["status"] == "setup",
            "{info}"
        );
        if let Some(pct) = info["cpu-throttle-percentage"].as_u64() {
            assert!((30..=99).contains(&pct), "{info}");
            break;
        }
    }
    dst
}

#[test]
fn throttles_while_behind_and_lets_go_on_cancel_and_completion() {
    let dir = TempDir::new("auto-converge");
    // The page-stride guest: one word into every page of 8 MiB per pass, verified.
    let stride = guest_tests::image_path("stride").display().to_string();
    let mut src = Hopvm::spawn(
        &dir.0,
        "src",
        &[
            "--kernel",
            &stride,
            "--memory",
            MEMORY,
            "--cmdline",
            "ws=8M",
        ],
    );
    src.out
        .wait_for(LONG, "the first pass on the source", |t| passes(t) >= 1);
    assert_eq!(
        src.cmd("query-migrate-parameters", Value::Null)["cpu-throttle-initial"],
        20,
        "QEMU's default"
    );

    // Cancelled while throttled: no throttle any more, and the guest runs on, intact.
    let _first = throttled_migration(&dir, &mut src, "dst1");
    src.cmd("migrate_cancel", Value::Null);
    src.wait_migration("cancelled", LONG);
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info, json!({"status": "cancelled"}));
    assert_eq!(src.status(), "running");
    let before = passes(&src.out.text());
    src.out
        .wait_for(LONG, "two more passes after the cancel", |t| {
            passes(t) >= before + 2
        });

    // Throttled again, then the link opens up: it completes, and the guest lives on there.
    let mut dst = throttled_migration(&dir, &mut src, "dst2");
    src.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 0, "downtime-limit": 300}),
    );
    src.wait_migration("completed", LONG);
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(info.get("cpu-throttle-percentage").is_none(), "{info}");
    let ram = &info["ram"];
    assert_eq!(
        ram["precopy-bytes"].as_u64().unwrap() + ram["downtime-bytes"].as_u64().unwrap(),
        ram["transferred"].as_u64().unwrap(),
        "{info}"
    );
    assert_eq!(src.status(), "postmigrate");
    dst.out
        .wait_for(LONG, "two passes on the destination", |t| passes(t) >= 2);
    assert_eq!(dst.status(), "running");
    for vm in [&src, &dst] {
        assert!(!vm.out.text().contains("CORRUPT"), "{}", vm.out.text());
    }
}
