//! The tools' command lines: usage mistakes are one line with exit status 2, an unreachable
//! monitor or an impossible demo is a clear error with status 1, and `--help` documents every
//! option.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::tools::run;

const QUICK: Duration = Duration::from_secs(30);

#[test]
fn bad_arguments_exit_2_with_one_line() {
    for args in [
        &["migrate"][..],
        &["migrate", "--qmp", "unix:/nonexistent"],
        &[
            "migrate",
            "--qmp",
            "unix:/x",
            "--max-bandwidth",
            "fast",
            "tcp:h:1",
        ],
        &["migrate", "--qmp", "unix:/x", "--xbzrle=3M", "tcp:h:1"],
        &["migrate", "--qmp", "unix:/x", "--xbzrle", "64M", "tcp:h:1"],
        &[
            "migrate", "--qmp", "unix:/x", "--report", "t.png", "tcp:h:1",
        ],
        &[
            "migrate",
            "--qmp",
            "unix:/x",
            "--downtime-limit",
            "-5",
            "tcp:h:1",
        ],
        &["demo", "--transport", "carrier-pigeon"],
        &["demo", "--ws", "lots"],
        &["demo", "--memory", "512K"],
        &["demo", "--report", "timeline.pdf"],
        &["qmp"],
        &["qmp", "--qmp"],
    ] {
        let (status, _, err) = run(args, QUICK);
        assert_eq!(status, 2, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("hopvm: "), "{args:?}: {err}");
    }
}

#[test]
fn help_documents_the_tools() {
    let (status, out, _) = run(&["--help"], QUICK);
    assert_eq!(status, 0);
    for cmd in ["run", "demo", "migrate", "qmp"] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(cmd)),
            "{cmd} missing:\n{out}"
        );
    }
    let (status, out, _) = run(&["migrate", "--help"], QUICK);
    assert_eq!(status, 0);
    for want in [
        "--qmp <unix:PATH>",
        "--max-bandwidth <BYTES/s|unlimited>",
        "--downtime-limit <MS>",
        "--xbzrle[=<CACHE>]",
        "--json",
        "--report <FILE.svg|FILE.json>",
        "<URI>",
        "2 cancelled",
    ] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
    let (_, out, _) = run(&["demo", "--help"], QUICK);
    for want in [
        "--memory <SIZE>",
        "--ws <SIZE>",
        "--transport <tcp|unix|netns>",
        "[default: 256M]",
        "[default: 32M]",
        "--report",
    ] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
    let (_, out, _) = run(&["qmp", "--help"], QUICK);
    for want in ["[COMMAND]", "[ARGS]...", "interactive shell", "key=value"] {
        assert!(out.contains(want), "{want} missing:\n{out}");
    }
}

#[test]
fn an_unreachable_monitor_is_a_clear_error() {
    let missing = "unix:/nonexistent/hopvm.sock";
    for args in [
        &["qmp", "--qmp", missing, "query-status"][..],
        &["qmp", "--qmp", missing],
        &["migrate", "--qmp", missing, "tcp:127.0.0.1:1"],
    ] {
        let (status, out, err) = run(args, QUICK);
        assert_eq!(status, 1, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("/nonexistent/hopvm.sock"), "{args:?}: {err}");
    }
}

#[test]
fn impossible_demos_are_refused_before_starting_anything() {
    let (status, out, err) = run(&["demo", "--memory", "64M", "--ws", "60M"], QUICK);
    assert_eq!(status, 1, "{out}{err}");
    assert!(err.contains("does not fit in 64 MiB"), "{err}");
    assert!(out.is_empty(), "{out}");

    let (status, _, err) = run(&["demo", "--kernel", "/nonexistent.elf"], QUICK);
    assert_eq!(status, 1, "{err}");
    assert!(err.contains("/nonexistent.elf"), "{err}");
}

#[test]
fn netns_transport_needs_root() {
    // As an unprivileged user (when the test runs as root, it drops to nobody for the demo).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hopvm"));
    cmd.args([
        "demo",
        "--memory",
        "64M",
        "--ws",
        "1M",
        "--transport",
        "netns",
    ]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().expect("hopvm runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--transport netns needs root"), "{err}");
    assert!(err.contains("--transport tcp"), "{err}");
}
