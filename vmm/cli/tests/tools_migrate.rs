//! `hopvm migrate` driving real two-process migrations: parameters applied, progress lines
//! without a terminal, the summary or the final `query-migrate` as JSON, the timeline reports,
//! exit status 0 / 1 / 2 for completed / failed / cancelled, and Ctrl-C cancelling while the
//! source keeps running.

mod common;

use std::time::Duration;

use common::passes;
use common::proc::{Hopvm, TempDir};
use common::tools::{dirty_args, free_tcp_port, strs, Tool};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(180);

/// A source running the dirty guest (first pass done) and a destination waiting on TCP.
fn pair(dir: &TempDir, ws: &str) -> (Hopvm, Hopvm, String) {
    let src = Hopvm::spawn(&dir.0, "src", &strs(&dirty_args("64M", ws)));
    src.out
        .wait_for(LONG, "the first pass on the source", |t| passes(t) >= 1);
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", "64M", "--incoming", &uri]);
    assert_eq!(dst.status(), "inmigrate");
    (src, dst, uri)
}

/// Waits (polling, with a deadline) until `vm` runs.
fn wait_running(vm: &mut Hopvm) {
    let deadline = std::time::Instant::now() + LONG;
    while vm.status() != "running" {
        assert!(std::time::Instant::now() < deadline, "{}", vm.err.text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn migrate(src: &Hopvm, args: &[&str]) -> Tool {
    let spec = format!("unix:{}", src.qmp_path.display());
    let mut all = vec!["migrate", "--qmp", spec.as_str()];
    all.extend_from_slice(args);
    Tool::spawn(&all)
}

#[test]
fn completes_with_progress_summary_and_reports() {
    let dir = TempDir::new("tools-migrate-ok");
    let (mut src, mut dst, uri) = pair(&dir, "4M");
    let svg = dir.join("timeline.svg");
    let json = dir.join("timeline.json");
    let (svg_s, json_s) = (svg.display().to_string(), json.display().to_string());
    let mut tool = migrate(
        &src,
        &[
            "--max-bandwidth",
            "4M",
            "--downtime-limit",
            "2000",
            "--xbzrle=8M",
            "--report",
            &svg_s,
            "--report",
            &json_s,
            &uri,
        ],
    );
    assert_eq!(tool.wait(LONG), 0, "{}", tool.outputs());
    // The parameters were set before the migration.
    let params = src.cmd("query-migrate-parameters", Value::Null);
    assert_eq!(params["max-bandwidth"], 4 << 20);
    assert_eq!(params["downtime-limit"], 2000);
    assert_eq!(params["xbzrle-cache-size"], 8 << 20);

    // Without a terminal: progress lines on stderr, no bar, the summary on stdout.
    let err = tool.err.text();
    let progress: Vec<&str> = err.lines().filter(|l| l.starts_with("migrate: ")).collect();
    assert!(
        progress
            .last()
            .unwrap()
            .starts_with("migrate: completed, pass "),
        "{err}"
    );
    assert!(!err.contains('\r') && !err.contains('\u{1b}'), "{err:?}");
    let out = tool.out.text();
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["status"], "completed");
    for want in [
        "Migration completed".to_string(),
        "  status       completed".to_string(),
        format!("  downtime     {} ms", info["downtime"]),
        "  transferred  ".to_string(),
        "zero pages".to_string(),
        "  throughput   ".to_string(),
        "  xbzrle       ".to_string(),
        format!("  passes       {}", info["ram"]["dirty-sync-count"]),
    ] {
        assert!(out.contains(&want), "{want:?} not in\n{out}");
    }

    // The reports: the picture and the data.
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg"), "{picture:.200}");
    assert!(picture.contains("hopvm live migration timeline"));
    assert!(picture.contains("completed: "));
    assert!(picture.contains(&format!("downtime: {} ms", info["downtime"])));
    let data: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(data["query-migrate"], info);
    let timeline = &data["timeline"];
    assert!(!timeline["slots"].as_array().unwrap().is_empty(), "{data}");
    assert_eq!(timeline["passes"][0][0], 1, "{data}");
    let (stop, end) = (
        timeline["stop_ms"].as_f64().unwrap(),
        timeline["end_ms"].as_f64().unwrap(),
    );
    assert!(stop <= end, "{data}");
    assert!(
        err.contains(&format!("timeline written to {svg_s}")),
        "{err}"
    );

    // And the guest runs on.
    dst.out
        .wait_for(LONG, "two passes on the destination", |t| passes(t) >= 2);
    assert_eq!(dst.status(), "running");
    assert_eq!(src.status(), "postmigrate");
    for vm in [&src, &dst] {
        assert!(!vm.out.text().contains("CORRUPT"), "{}", vm.out.text());
    }
}

#[test]
fn json_prints_the_final_query_migrate() {
    let dir = TempDir::new("tools-migrate-json");
    let idle = guest_tests::image_path("idle").display().to_string();
    let mut src = Hopvm::spawn(&dir.0, "src", &["--kernel", &idle, "--memory", "32M"]);
    src.out
        .wait_for(LONG, "the idle guest", |t| t.contains("idle"));
    let p = dir.join("mig.sock");
    let uri = format!("unix:{}", p.display());
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", "32M", "--incoming", &uri]);
    let mut tool = migrate(&src, &["--json", "--max-bandwidth", "unlimited", &uri]);
    assert_eq!(tool.wait(LONG), 0, "{}", tool.outputs());
    let printed: Value = serde_json::from_str(&tool.out.text()).expect("stdout is JSON");
    assert_eq!(printed, src.cmd("query-migrate", Value::Null));
    assert_eq!(printed["status"], "completed");
    assert_eq!(
        src.cmd("query-migrate-parameters", Value::Null)["max-bandwidth"],
        0
    );
    // The idle guest printed its line on the source; on the destination it just runs, once
    // the destination has loaded what the source sent.
    wait_running(&mut dst);
}

#[test]
fn ctrl_c_cancels_and_the_source_runs_on() {
    let dir = TempDir::new("tools-migrate-cancel");
    let (mut src, _dst, uri) = pair(&dir, "4M");
    let mut tool = migrate(&src, &["--max-bandwidth", "1M", &uri]);
    tool.err.wait_for(LONG, "an active migration", |t| {
        t.contains("migrate: active")
    });
    tool.signal(libc::SIGINT);
    assert_eq!(tool.wait(LONG), 2, "{}", tool.outputs());
    let err = tool.err.text();
    assert!(
        err.contains("hopvm: cancelling the migration")
            || tool.out.text().contains("hopvm: cancelling the migration"),
        "{}",
        tool.outputs()
    );
    assert!(
        err.contains("hopvm: migration cancelled; the source VM is running"),
        "{err}"
    );
    assert_eq!(src.cmd("query-migrate", Value::Null)["status"], "cancelled");
    assert_eq!(src.status(), "running");
    let before = passes(&src.out.text());
    src.out
        .wait_for(LONG, "another pass on the source", |t| passes(t) > before);
    assert!(!src.out.text().contains("CORRUPT"));
}

#[test]
fn a_failed_migration_exits_1_and_the_source_runs_on() {
    let dir = TempDir::new("tools-migrate-fail");
    let (mut src, mut dst, uri) = pair(&dir, "4M");
    let mut tool = migrate(&src, &["--max-bandwidth", "1M", &uri]);
    tool.err.wait_for(LONG, "an active migration", |t| {
        t.contains("migrate: active")
    });
    // The destination dies mid-stream.
    dst.child.kill().unwrap();
    assert_eq!(tool.wait(LONG), 1, "{}", tool.outputs());
    let err = tool.err.text();
    assert!(err.contains("hopvm: migration failed: "), "{err}");
    assert!(err.contains("the source keeps running"), "{err}");
    assert_eq!(src.cmd("query-migrate", Value::Null)["status"], "failed");
    assert_eq!(src.status(), "running");

    // Nobody listening at all: as QEMU, the connect fails in `setup`, after `migrate`
    // returned.
    let nowhere = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut tool = migrate(&src, &[&nowhere]);
    assert_eq!(tool.wait(LONG), 1, "{}", tool.outputs());
    let err = tool.err.text();
    assert!(
        err.contains("hopvm: migration failed: cannot connect to 127.0.0.1:")
            && err.contains("Connection refused"),
        "{}",
        tool.outputs()
    );
    assert_eq!(src.status(), "running");
}
