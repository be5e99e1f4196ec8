//! `hopvm demo` end to end, as the README runs it: over loopback TCP, a Unix socket and two
//! network namespaces; its checks, its report, and its cleanup — no VM process, temporary
//! directory or namespace is left behind, whether the demo succeeds or is interrupted.

mod common;

use std::path::Path;
use std::time::Duration;

use common::tools::Tool;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(300);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// Checks that demo `pid` left nothing behind.
fn assert_cleaned_up(pid: u32) {
    let tag = format!("hopvm-demo-{pid}");
    let leftovers = processes_mentioning(&tag);
    assert!(leftovers.is_empty(), "processes left: {leftovers:?}");
    let dir = std::env::temp_dir().join(&tag);
    assert!(!dir.exists(), "{} left", dir.display());
    if Path::new("/run/netns").exists() {
        let namespaces: Vec<String> = std::fs::read_dir("/run/netns")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{tag}-")))
            .collect();
        assert!(namespaces.is_empty(), "namespaces left: {namespaces:?}");
    }
}

/// Runs a demo to its successful end and checks what it printed.
fn demo(args: &[&str]) -> String {
    let mut all = vec!["demo"];
    all.extend_from_slice(args);
    let mut tool = Tool::spawn(&all);
    let status = tool.wait(LONG);
    assert_eq!(status, 0, "{}", tool.outputs());
    let out = tool.out.text();
    let mut rest = out.as_str();
    for want in [
        "hopvm demo: live migration of a guest",
        "[src] fill ok",
        "[src] pass 1 ok",
        "migrating to ",
        "Migration completed: the guest now runs on the destination",
        "  downtime     ",
        "  transferred  ",
        "zero pages",
        "  throughput   ",
        "  passes       ",
        "[dst] pass ",
        "[dst] pass ",
        "OK: the guest verified ",
        "its output continues seamlessly and no corruption was reported.",
    ] {
        let at = rest
            .find(want)
            .unwrap_or_else(|| panic!("{want:?} missing (in order):\n{}", tool.outputs()));
        rest = &rest[at + want.len()..];
    }
    assert!(!out.contains("CORRUPT"), "{out}");
    // Without a terminal, progress is a line per second on stderr, ending with the result.
    let err = tool.err.text();
    assert!(
        err.lines()
            .any(|l| l.starts_with("migrate: completed, pass ")),
        "{err}"
    );
    assert_cleaned_up(tool.child.id());
    out
}

#[test]
fn over_loopback_tcp_with_a_report() {
    let dir = std::env::temp_dir().join(format!("hopvm-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("timeline.json");
    let out = demo(&[
        "--memory",
        "64M",
        "--ws",
        "2M",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(out.contains("over TCP on the loopback interface"), "{out}");
    assert!(out.contains("--incoming tcp:127.0.0.1:"), "{out}");
    let data: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(data["query-migrate"]["status"], "completed");
    assert!(data["timeline"]["end_ms"].as_f64().unwrap() > 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn over_a_unix_socket_with_xbzrle() {
    let out = demo(&[
        "--memory",
        "64M",
        "--ws",
        "2M",
        "--transport",
        "unix",
        "--xbzrle=4M",
        "--max-bandwidth",
        "unlimited",
        "--downtime-limit",
        "100",
    ]);
    assert!(out.contains("over a Unix socket"), "{out}");
    assert!(
        out.contains("(max-bandwidth unlimited, downtime-limit 100 ms, xbzrle on, cache 4 MiB)"),
        "{out}"
    );
    assert!(out.contains("  xbzrle       "), "{out}");
}

#[test]
fn across_two_network_namespaces() {
    if !is_root() {
        eprintln!(
            "not root: --transport netns is covered by tools_cli's netns_transport_needs_root"
        );
        return;
    }
    let out = demo(&["--memory", "64M", "--ws", "2M", "--transport", "netns"]);
    assert!(
        out.contains("over TCP between network namespaces hopvm-demo-"),
        "{out}"
    );
    assert!(out.contains("(192.0.2.1) and hopvm-demo-"), "{out}");
    assert!(out.contains("--incoming tcp:192.0.2.2:4444"), "{out}");
}

#[test]
fn interrupted_demos_clean_up() {
    let transport = if is_root() { "netns" } else { "tcp" };
    // Ctrl-C in the middle of a slow migration: the migration is cancelled and everything
    // stopped.
    let mut tool = Tool::spawn(&[
        "demo",
        "--memory",
        "64M",
        "--ws",
        "2M",
        "--max-bandwidth",
        "256K",
        "--transport",
        transport,
    ]);
    tool.err.wait_for(LONG, "an active migration", |t| {
        t.contains("migrate: active")
    });
    tool.signal(libc::SIGINT);
    assert_eq!(tool.wait(LONG), 130, "{}", tool.outputs());
    let err = tool.err.text();
    assert!(err.contains("hopvm: cancelling the migration"), "{err}");
    assert!(err.contains("hopvm demo: interrupted"), "{err}");
    assert!(!tool.out.text().contains("Migration completed"));
    assert_cleaned_up(tool.child.id());

    // SIGTERM while waiting for the guest's first pass.
    let mut tool = Tool::spawn(&[
        "demo",
        "--memory",
        "128M",
        "--ws",
        "64M",
        "--transport",
        transport,
    ]);
    tool.out
        .wait_for(LONG, "the guest booting", |t| t.contains("[src] fill ok"));
    tool.signal(libc::SIGTERM);
    assert_eq!(tool.wait(LONG), 130, "{}", tool.outputs());
    assert!(
        !tool.out.text().contains("[src] pass 1 ok"),
        "{}",
        tool.outputs()
    );
    assert_cleaned_up(tool.child.id());
}
