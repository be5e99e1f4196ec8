//! Migrations that do not complete must leave the source running and lose nothing: a
//! bandwidth too low to converge (then `migrate_cancel`), a destination killed mid-stream, a
//! second `migrate` or a capability change while one runs, and truncated or corrupted streams,
//! which the destination must refuse with a clear error.

mod common;

use std::time::Duration;

use common::passes;
use common::proc::{spawn_plain, Hopvm, TempDir};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(180);

fn dirty(ws: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        guest_tests::image_path("dirty").display().to_string(),
        "--memory".into(),
        "32M".into(),
        "--cmdline".into(),
        format!("ws={ws}"),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn events_on(vm: &mut Hopvm) {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
}

/// A busy source migrating at 1 MiB/s to a live destination over unix.
fn slow_migration(dir: &TempDir) -> (Hopvm, Hopvm) {
    let mut src = Hopvm::spawn(&dir.0, "src", &strs(&dirty("2")));
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    let sock = dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let dst = Hopvm::spawn(&dir.0, "dst", &["--memory", "32M", "--incoming", &uri]);
    events_on(&mut src);
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("active", LONG);
    (src, dst)
}

/// The source's guest is running and still verifying passes.
fn source_runs_on(src: &mut Hopvm) {
    src.runs_intact(LONG);
}

#[test]
fn non_convergence_then_cancel() {
    let dir = TempDir::new("nonconv");
    let (mut src, mut dst) = slow_migration(&dir);
    // Two more dirty syncs go by and the migration is still active: 1 MiB/s cannot keep up
    // with the guest.
    let now = src.cmd("query-migrate", Value::Null)["ram"]["dirty-sync-count"]
        .as_u64()
        .unwrap();
    src.qmp
        .wait_event("MIGRATION_PASS", LONG, |d| {
            d["pass"].as_u64() >= Some(now + 2)
        })
        .unwrap();
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["status"], "active", "{info}");
    assert!(info["expected-downtime"].as_u64().is_some(), "{info}");

    // While it runs: a second migrate and a capability change are refused, as in QEMU.
    let err = src
        .qmp
        .execute("migrate", Some(json!({"uri": "unix:/nonexistent"})))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "GenericError: There's a migration process in progress");
    let err = src
        .qmp
        .execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "xbzrle", "state": true}]})),
        )
        .unwrap_err()
        .to_string();
    assert_eq!(err, "GenericError: There's a migration process in progress");
    // A new speed applies at once (still far too slow to converge).
    src.cmd("migrate_set_speed", json!({"value": 2 << 20}));
    assert_eq!(
        src.cmd("query-migrate-parameters", Value::Null)["max-bandwidth"],
        2 << 20
    );

    src.cmd("migrate_cancel", Value::Null);
    src.wait_migration("cancelled", LONG);
    assert_eq!(src.cmd("query-migrate", Value::Null)["status"], "cancelled");
    source_runs_on(&mut src);
    // The destination saw a stream that stopped mid-way: it ends with a clear error.
    assert_eq!(dst.wait_exit(LONG), Some(1), "{}", dst.err.text());
    assert!(
        dst.err.text().contains("incoming migration failed"),
        "{}",
        dst.err.text()
    );
    assert!(!dst.err.text().contains("panicked"), "{}", dst.err.text());
}

#[test]
fn destination_killed_mid_stream() {
    let dir = TempDir::new("killdst");
    let (mut src, mut dst) = slow_migration(&dir);
    dst.child.kill().unwrap();
    dst.child.wait().unwrap();
    src.wait_migration("failed", LONG);
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["status"], "failed", "{info}");
    assert!(info["error-desc"].as_str().is_some(), "{info}");
    source_runs_on(&mut src);
    // A second attempt starts from scratch and completes: nothing was lost with the first.
    let sock = dir.join("mig2.sock");
    let uri = format!("unix:{}", sock.display());
    let dst = Hopvm::spawn(&dir.0, "dst2", &["--memory", "32M", "--incoming", &uri]);
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", LONG);
    dst.out
        .wait_for(LONG, "passes on the new destination", |t| passes(t) >= 2);
    assert!(!dst.out.text().contains("CORRUPT"), "{}", dst.out.text());
}

/// Saves a running guest to a file with `exec:cat > file`.
fn snapshot(dir: &TempDir) -> (Hopvm, std::path::PathBuf) {
    let mut src = Hopvm::spawn(&dir.0, "src", &strs(&dirty("1")));
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    events_on(&mut src);
    let file = dir.join("vm.img");
    src.save_to_file(&file, LONG);
    assert_eq!(src.status(), "postmigrate");
    (src, file)
}

#[test]
fn snapshot_to_file_and_resume() {
    let dir = TempDir::new("snapshot");
    let (_src, file) = snapshot(&dir);
    let stream = std::fs::read(&file).unwrap();
    assert_eq!(&stream[..8], b"QEVM\0\0\0\x03");
    let mut resumed = Hopvm::spawn(
        &dir.0,
        "resumed",
        &[
            "--memory",
            "32M",
            "--incoming",
            &format!("exec:cat {}", file.display()),
        ],
    );
    resumed
        .out
        .wait_for(LONG, "passes after resuming", |t| passes(t) >= 2);
    assert_eq!(resumed.status(), "running");
    assert!(
        !resumed.out.text().contains("CORRUPT"),
        "{}",
        resumed.out.text()
    );
}

#[test]
fn truncated_and_corrupted_streams_are_refused() {
    let dir = TempDir::new("badstream");
    let (_src, file) = snapshot(&dir);
    let stream = std::fs::read(&file).unwrap();
    let n = stream.len();
    // (what, bytes, memory, must the destination refuse it?)
    let mut variants: Vec<(String, Vec<u8>, &str, bool)> = Vec::new();
    for cut in [0, 4, 8, 9, 30, n / 3, n / 2, n - 200] {
        variants.push((
            format!("truncated at {cut}"),
            stream[..cut].to_vec(),
            "32M",
            true,
        ));
    }
    // The magic, the version, the first section's header: refused. A byte in the middle may
    // land in a page's data, which is indistinguishable from a guest write: it may load.
    for (at, must) in [
        (0, true),
        (5, true),
        (8, true),
        (12, true),
        (n / 2, false),
        (n - 300, false),
    ] {
        let mut bad = stream.clone();
        bad[at] ^= 0x5a;
        variants.push((format!("byte {at} flipped"), bad, "32M", must));
    }
    variants.push((
        String::from("memory size differs"),
        stream.clone(),
        "64M",
        true,
    ));
    for (i, (what, bytes, memory, must_refuse)) in variants.iter().enumerate() {
        let path = dir.join(&format!("bad{i}.img"));
        std::fs::write(&path, bytes).unwrap();
        let (mut child, out, err) = spawn_plain(&[
            "--memory",
            memory,
            "--incoming",
            &format!("exec:cat {}", path.display()),
        ]);
        // Either the load fails and hopvm ends, or it loaded and the guest runs on.
        let deadline = std::time::Instant::now() + LONG;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s.code();
            }
            if passes(&out.text()) >= 1 {
                child.kill().unwrap();
                child.wait().unwrap();
                break None;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: neither failed nor loaded"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = err.text();
        assert!(!err.contains("panicked"), "{what}: {err}");
        match status {
            Some(1) => {
                assert!(
                    err.contains("hopvm: incoming migration failed: "),
                    "{what}: {err}"
                );
            }
            // The flipped byte was in the dirty guest's working set: it loaded, and the
            // guest's own verification caught it (exit code 1 → status 3).
            Some(3) if !must_refuse => assert!(out.text().contains("CORRUPT"), "{what}"),
            None if !must_refuse => {}
            other => panic!("{what}: status {other:?}; stderr: {err}"),
        }
    }
}
