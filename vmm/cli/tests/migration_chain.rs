//! A guest migrated on and on (issue 13): the self-verifying busy guest travels a chain of fresh
//! hopvm processes, tcp and unix in turn. On every host that received it by migration,
//! `query-migrate`, the MIGRATION events and `x-query-migration-timeline` must describe the
//! *new* outgoing migration — polled until `completed` with its own total time, downtime and
//! RAM counters — and the parameters and capabilities set on a destination before its incoming
//! migration must apply to its next outgoing one. One hop is cancelled mid-way: the guest runs
//! on where it was and the chain continues.

mod common;

use std::time::{Duration, Instant};

use common::last_pass;
use common::proc::{Hopvm, TempDir};
use common::tools::{free_tcp_port, Tool};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(120);
const MEMORY: &str = "16M";
const HOPS: usize = 20;
/// The hop that is cancelled once before it is retried.
const CANCELLED_HOP: usize = 7;

/// A fresh destination listening on tcp (even hops) or unix (odd hops), with the events
/// capability and a bandwidth parameter set *before* the incoming migration arrives.
fn destination(dir: &TempDir, n: usize) -> (Hopvm, String) {
    let uri = if n % 2 == 0 {
        format!("tcp:127.0.0.1:{}", free_tcp_port())
    } else {
        format!("unix:{}", dir.join(&format!("mig{n}.sock")).display())
    };
    let mut vm = Hopvm::spawn(
        &dir.0,
        &format!("host{n}"),
        &["--memory", MEMORY, "--incoming", &uri],
    );
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    vm.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    (vm, uri)
}

/// Polls `query-migrate` until the migration has ended; returns the last reply.
fn poll_until_done(vm: &mut Hopvm) -> Value {
    let deadline = Instant::now() + LONG;
    loop {
        let info = vm.cmd("query-migrate", Value::Null);
        match info["status"].as_str() {
            Some("completed" | "failed" | "cancelled") => return info,
            Some("setup" | "active" | "cancelling") => {}
            other => panic!("unexpected status {other:?}: {info}"),
        }
        assert!(Instant::now() < deadline, "migration never ended: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the guest on `vm` has verified `more` passes beyond `after`.
fn wait_passes(vm: &Hopvm, after: u64, more: u64, what: &str) -> u64 {
    vm.out.wait_for(LONG, what, |t| {
        last_pass(t).is_some_and(|p| p >= after + more)
    });
    let text = vm.out.text();
    assert!(!text.contains("CORRUPT"), "{what}: {text}");
    last_pass(&text).unwrap()
}

fn event_statuses(vm: &mut Hopvm) -> Vec<String> {
    vm.qmp
        .take_events()
        .into_iter()
        .filter(|e| e.name == "MIGRATION")
        .map(|e| e.data["status"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn twenty_hops_tcp_and_unix_with_one_cancelled() {
    let dir = TempDir::new("chain");
    let dirty = guest_tests::image_path("dirty").display().to_string();
    let mut here = Hopvm::spawn(
        &dir.0,
        "host0",
        &["--kernel", &dirty, "--memory", MEMORY, "--cmdline", "ws=1M"],
    );
    here.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    here.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    let mut pass = wait_passes(&here, 0, 1, "the first pass on host 0");
    let mut cancelled_once = false;
    let mut hop = 1;
    while hop <= HOPS {
        let (mut next, uri) = destination(&dir, hop);
        assert_eq!(next.status(), "inmigrate");
        let cancel = hop == CANCELLED_HOP && !cancelled_once;
        if cancel {
            // Far too slow for the busy guest: the migration stays active until cancelled.
            here.cmd("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
        }
        let _ = event_statuses(&mut here);
        if hop == HOPS {
            // The last hop is driven by `hopvm migrate`, whose progress comes from
            // `query-migrate`: it must follow this host's own outgoing migration.
            let spec = format!("unix:{}", here.qmp_path.display());
            let mut tool = Tool::spawn(&["migrate", "--qmp", &spec, &uri]);
            assert_eq!(tool.wait(LONG), 0, "{}", tool.outputs());
            let err = tool.err.text();
            let last = err.lines().rfind(|l| l.starts_with("migrate: "));
            assert!(
                last.is_some_and(|l| l.starts_with("migrate: completed, pass ")),
                "{err}"
            );
        } else {
            here.cmd("migrate", json!({"uri": uri}));
        }
        if cancel {
            here.qmp
                .wait_event("MIGRATION_PASS", LONG, |d| d["pass"].as_u64() >= Some(2))
                .unwrap_or_else(|e| panic!("hop {hop}: no second pass: {e}"));
            let info = here.cmd("query-migrate", Value::Null);
            assert_eq!(info["status"], "active", "hop {hop}: {info}");
            here.cmd("migrate_cancel", Value::Null);
            let info = poll_until_done(&mut here);
            assert_eq!(info["status"], "cancelled", "hop {hop}: {info}");
            assert_eq!(here.status(), "running", "hop {hop}");
            pass = wait_passes(&here, pass, 2, "passes after the cancelled hop");
            assert_eq!(
                event_statuses(&mut here),
                ["setup", "active", "cancelling", "cancelled"],
                "hop {hop}"
            );
            // The destination saw a stream that stopped mid-way and gave up.
            assert_eq!(next.wait_exit(LONG), Some(1), "{}", next.err.text());
            here.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
            cancelled_once = true;
            continue;
        }
        let info = poll_until_done(&mut here);
        let num = |key: &str| -> u64 {
            info.pointer(key)
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("hop {hop}: no {key}: {info}"))
        };
        assert_eq!(info["status"], "completed", "hop {hop}: {info}");
        assert!(num("/downtime") <= num("/total-time"), "hop {hop}: {info}");
        assert_eq!(num("/ram/total"), 16 << 20, "hop {hop}: {info}");
        assert!(num("/ram/transferred") > 0, "hop {hop}: {info}");
        assert!(num("/ram/normal") >= 256, "hop {hop}: {info}");
        assert_eq!(num("/ram/remaining"), 0, "hop {hop}: {info}");
        assert_eq!(
            event_statuses(&mut here),
            ["setup", "active", "completed"],
            "hop {hop}"
        );
        let timeline = here.cmd("x-query-migration-timeline", Value::Null);
        assert!(
            timeline["end_ms"].as_f64().is_some() && timeline["stop_ms"].as_f64().is_some(),
            "hop {hop}: {timeline}"
        );
        assert_eq!(here.status(), "postmigrate", "hop {hop}");

        // The guest goes on where it was: its pass numbers continue.
        pass = wait_passes(&next, pass, 1, &format!("a pass on host {hop}"));
        assert_eq!(next.status(), "running", "hop {hop}");
        // Before its own outgoing migration, the new host reports the incoming one; the
        // parameters and capabilities set before it arrived still hold.
        assert_eq!(
            next.cmd("query-migrate", Value::Null)["status"],
            "completed"
        );
        assert_eq!(
            next.cmd("query-migrate-parameters", Value::Null)["max-bandwidth"],
            0
        );
        let caps = next.cmd("query-migrate-capabilities", Value::Null);
        assert!(
            caps.as_array()
                .unwrap()
                .iter()
                .any(|c| c["capability"] == "events" && c["state"] == true),
            "{caps}"
        );
        drop(std::mem::replace(&mut here, next));
        hop += 1;
    }
    assert!(cancelled_once);
}
