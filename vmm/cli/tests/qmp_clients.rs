//! Real QMP clients against real hopvm processes.
//!
//! * QEMU's own Python library, `qemu.qmp` from PyPI (resources/qmp-clients-test.py): connect,
//!   query-status, stop/cont with their events, error classes, migrate_cancel of a
//!   rate-limited migration, and a full migration followed by query-migrate polling and the
//!   MIGRATION / MIGRATION_PASS events;
//! * `socat` with raw JSON for the protocol's edge cases: commands before
//!   `qmp_capabilities`, malformed JSON, unknown commands, wrong argument types and huge lines
//!   must each get a proper QMP error, and neither the connection nor the guest may suffer.
//!
//! Both tools come from resources/install-deps.sh (CI runs it); without them these tests fail
//! and say so rather than being skipped.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use common::passes;
use common::proc::{Hopvm, TempDir};
use common::tools::{dirty_args, free_tcp_port, strs};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(180);
const INSTALL: &str = "run `bash resources/install-deps.sh` as root (CI runs it)";

/// The virtual environment with `qemu.qmp`: $HOPVM_VENV or /opt/hopvm-venv.
fn venv_python() -> PathBuf {
    let venv = std::env::var_os("HOPVM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/hopvm-venv"));
    let python = venv.join("bin/python");
    let found = Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "the Python library qemu.qmp is not installed in {}: {INSTALL}",
        venv.display()
    );
    python
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../resources/qmp-clients-test.py")
}

#[test]
fn qemu_qmp_library_drives_hopvm() {
    let python = venv_python();
    let dir = TempDir::new("qmp-clients-py");
    let src = Hopvm::spawn(&dir.0, "src", &strs(&dirty_args("64M", "4M")));
    src.out
        .wait_for(LONG, "the first pass on the source", |t| passes(t) >= 1);
    let cancel_uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let _cancel_dst = Hopvm::spawn(
        &dir.0,
        "dst-cancel",
        &["--memory", "64M", "--incoming", &cancel_uri],
    );
    let full_uri = format!("unix:{}", dir.join("full.sock").display());
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", "64M", "--incoming", &full_uri]);

    let out = Command::new(&python)
        .arg(script())
        .arg(&src.qmp_path)
        .arg(&cancel_uri)
        .arg(&dst.qmp_path)
        .arg(&full_uri)
        .stdin(Stdio::null())
        .output()
        .expect("python runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "qmp-clients-test.py failed:\n{report}"
    );
    for want in [
        "query-status: running",
        "stop: STOP event, status paused",
        "cont: RESUME event, status running",
        "frobnicate -> CommandNotFound: The command frobnicate has not been found",
        "-> GenericError: Invalid parameter type for 'uri', expected: string",
        "send_fd_scm + getfd py",
        "closefd {'fdname': 'py'} -> GenericError: File descriptor named 'py' not found",
        "migrate_cancel: MIGRATION ",
        "MIGRATION events setup -> active -> completed, MIGRATION_PASS [1, ",
        "destination: running, query-migrate completed",
        "checks passed",
    ] {
        assert!(report.contains(want), "{want:?} missing:\n{report}");
    }
    println!("{report}");
    // The guest lives on at the destination, intact.
    dst.out
        .wait_for(LONG, "two passes on the destination", |t| passes(t) >= 2);
    assert_eq!(dst.status(), "running");
    for vm in [&src, &dst] {
        assert!(!vm.out.text().contains("CORRUPT"), "{}", vm.out.text());
    }
}

/// A raw connection through `socat - UNIX-CONNECT:PATH`.
struct Socat {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Socat {
    fn connect(path: &std::path::Path) -> Self {
        let mut child = match Command::new("socat")
            .arg("-")
            .arg(format!("UNIX-CONNECT:{}", path.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("cannot run socat ({e}): {INSTALL}"),
        };
        let stdin = child.stdin.take().unwrap();
        let reader = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next message (events are skipped).
    fn recv(&mut self) -> Value {
        loop {
            let line = self
                .lines
                .recv_timeout(LONG)
                .expect("a reply through socat");
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Sends one line and returns the reply.
    fn cmd(&mut self, line: &str) -> Value {
        self.send(format!("{line}\n").as_bytes());
        self.recv()
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

#[test]
fn socat_raw_json_edge_cases() {
    let dir = TempDir::new("qmp-clients-socat");
    let mut vm = Hopvm::spawn(&dir.0, "vm", &strs(&dirty_args("64M", "1M")));
    vm.out.wait_for(LONG, "the first pass", |t| passes(t) >= 1);
    let mut s = Socat::connect(&vm.qmp_path);
    let greeting = s.recv();
    assert!(greeting["QMP"]["version"]["qemu"].is_object(), "{greeting}");
    assert!(greeting["QMP"]["capabilities"].is_array(), "{greeting}");

    // Before capabilities negotiation only qmp_capabilities is accepted.
    let negotiate = error(
        "CommandNotFound",
        "Expecting capabilities negotiation with 'qmp_capabilities'",
    );
    assert_eq!(s.cmd(r#"{"execute": "query-status"}"#), negotiate);
    assert_eq!(s.cmd(r#"{"execute": "stop"}"#), negotiate);
    assert_eq!(vm.status(), "running");
    assert_eq!(
        s.cmd(r#"{"execute": "qmp_capabilities"}"#),
        json!({"return": {}})
    );
    let running = json!({"return": {"status": "running", "singlestep": false, "running": true}});
    assert_eq!(s.cmd(r#"{"execute": "query-status"}"#), running);

    let cases: &[(&str, Value)] = &[
        // Malformed JSON.
        (
            r#"{"execute": "query-status",}"#,
            error("GenericError", "JSON parse error, expecting value"),
        ),
        (
            r#"{"execute" "query-status"}"#,
            error("GenericError", "JSON parse error, missing : in object pair"),
        ),
        (
            "@#$ garbage",
            error("GenericError", "JSON parse error, stray '@'"),
        ),
        (
            "nonsense",
            error(
                "GenericError",
                "JSON parse error, invalid keyword 'nonsense'",
            ),
        ),
        // Not a command.
        (
            "[1, 2]",
            error("GenericError", "QMP input must be a JSON object"),
        ),
        (
            "{}",
            error("GenericError", "QMP input lacks member 'execute'"),
        ),
        // Unknown commands; the id comes back.
        (
            r#"{"execute": "frobnicate", "id": 7}"#,
            json!({"id": 7, "error": {"class": "CommandNotFound",
                                      "desc": "The command frobnicate has not been found"}}),
        ),
        // Wrong argument types.
        (
            r#"{"execute": "migrate", "arguments": {"uri": 5}}"#,
            error(
                "GenericError",
                "Invalid parameter type for 'uri', expected: string",
            ),
        ),
        (
            r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": {"capability": "events"}}}"#,
            error(
                "GenericError",
                "Invalid parameter type for 'capabilities', expected: array",
            ),
        ),
        (
            r#"{"execute": "stop", "arguments": [1]}"#,
            error(
                "GenericError",
                "QMP input member 'arguments' must be an object",
            ),
        ),
        (
            r#"{"execute": ["stop"]}"#,
            error(
                "GenericError",
                "QMP input member 'execute' must be a string",
            ),
        ),
    ];
    for (line, want) in cases {
        assert_eq!(&s.cmd(line), want, "{line}");
        assert_eq!(
            s.cmd(r#"{"execute": "query-status"}"#),
            running,
            "after {line}"
        );
    }

    // A 10 MiB line, and very deep nesting: refused in bounded memory.
    let mut huge = br#"{"execute": "migrate", "arguments": {"uri": ""#.to_vec();
    huge.resize(huge.len() + (10 << 20), b'x');
    huge.extend_from_slice(b"\"}}\n");
    s.send(&huge);
    assert_eq!(
        s.recv(),
        error("GenericError", "JSON token size limit exceeded")
    );
    assert_eq!(s.cmd(r#"{"execute": "query-status"}"#), running);
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    assert_eq!(
        s.cmd(&deep),
        error("GenericError", "JSON nesting depth limit exceeded")
    );

    // The same connection still works, and so does the guest: its output goes on.
    let before = passes(&vm.out.text());
    assert_eq!(
        s.cmd(r#"{"execute": "query-status", "id": "end"}"#)["id"],
        "end"
    );
    vm.out
        .wait_for(LONG, "the guest to go on", |t| passes(t) >= before + 2);
    assert_eq!(vm.status(), "running");
    assert!(!vm.out.text().contains("CORRUPT"));
}
