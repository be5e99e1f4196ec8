//! Issue 14: a migration never loses the guest and never runs it twice.
//!
//! * `migrate` to a destination that does not answer returns at once, in `setup`; the monitor
//!   answers other clients meanwhile and `migrate_cancel` ends it.
//! * With the return path (on by default for sockets) the source completes only once the
//!   destination has loaded the guest; a destination that refuses the stream makes the source
//!   resume, with the destination's own reason.
//! * The switchover handshake, driven through a proxy that cuts or holds the return path at
//!   each step: whatever is lost, at most one copy runs, and each side says why.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::passes;
use common::proc::{Hopvm, TempDir};
use common::proxy::{Policy, Proxy};
use common::tools::{dirty_args, strs};
use qmp::client::QmpClient;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(180);

fn events_on(vm: &mut Hopvm) {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
}

/// A busy source (32 MiB, 2 MiB working set), past its first verified pass, events on.
fn source(dir: &TempDir, name: &str, extra: &[&str]) -> Hopvm {
    let mut args = strs(&dirty_args("32M", "2"))
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut src = Hopvm::spawn(&dir.0, name, &strs(&args));
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    events_on(&mut src);
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src
}

/// A destination listening on a unix socket in `dir`.
fn destination(dir: &TempDir, name: &str, extra: &[&str]) -> (Hopvm, PathBuf) {
    let sock = dir.join(&format!("{name}-mig.sock"));
    let uri = format!("unix:{}", sock.display());
    let mut args = vec!["--memory", "32M", "--incoming", &uri];
    args.extend_from_slice(extra);
    let mut dst = Hopvm::spawn(&dir.0, name, &args);
    events_on(&mut dst);
    (dst, sock)
}

/// The guest runs on `vm` and keeps verifying its memory.
fn runs_on(vm: &mut Hopvm) {
    if vm.status() == "inmigrate" {
        // A one-way migration completes on the source before the destination has loaded.
        if let Err(e) = vm.qmp.wait_event("RESUME", LONG, |_| true) {
            panic!("no RESUME: {e}; stderr: {}", vm.err.text());
        }
    }
    vm.runs_intact(LONG);
}

fn migrate_info(vm: &mut Hopvm) -> Value {
    vm.cmd("query-migrate", Value::Null)
}

/// Waits for `vm`'s migration to fail and checks that its `error-desc` says each of `why`.
fn failed_saying(vm: &mut Hopvm, why: &[&str]) {
    vm.wait_migration("failed", LONG);
    let info = migrate_info(vm);
    let desc = info["error-desc"].as_str().unwrap_or_default();
    for w in why {
        assert!(desc.contains(w), "{w:?} not said: {info}");
    }
}

/// After a failed or cancelled migration the guest still migrates: to a fresh destination,
/// where it runs and verifies its memory.
fn follow_up_migration_completes(dir: &TempDir, src: &mut Hopvm) {
    let (mut dst, sock) = destination(dir, "again", &[]);
    src.cmd(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    src.wait_migration("completed", LONG);
    assert_eq!(src.status(), "postmigrate");
    runs_on(&mut dst);
}

/// A TCP listener whose accept queue is full: the kernel drops further SYNs, so a connect to
/// it waits as for a host that does not answer.
struct SilentListener {
    _listener: socket2::Socket,
    _filler: std::net::TcpStream,
    port: u16,
}

impl SilentListener {
    fn new() -> Self {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        // One connection, never accepted, fills a backlog of 0.
        let filler = std::net::TcpStream::connect(addr).unwrap();
        // A second connect now gets no answer: check that it really hangs.
        let probe = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(probe.is_err(), "the full listener answered a connect");
        Self {
            _listener: listener,
            _filler: filler,
            port: addr.port(),
        }
    }
}

#[test]
fn migrate_to_a_silent_destination_returns_at_once_and_cancels() {
    let dir = TempDir::new("rp-silent");
    let mut src = source(&dir, "src", &[]);
    let silent = SilentListener::new();
    let reply = src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", silent.port)}),
    );
    assert_eq!(reply, json!({}));
    assert_eq!(migrate_info(&mut src)["status"], "setup");
    // Another client is answered while the connect waits.
    let mut other = QmpClient::connect(&src.qmp_path).unwrap();
    let status = other.execute("query-status", None).unwrap();
    assert_eq!(status["status"], "running");
    assert_eq!(
        other.execute("query-migrate", None).unwrap()["status"],
        "setup"
    );
    src.cmd("migrate_cancel", Value::Null);
    src.wait_migration("cancelled", LONG);
    assert_eq!(migrate_info(&mut src)["status"], "cancelled");
    runs_on(&mut src);
    follow_up_migration_completes(&dir, &mut src);
}

#[test]
fn a_destination_that_refuses_the_stream_tells_the_source_why() {
    let dir = TempDir::new("rp-refused");
    let mut src = source(&dir, "src", &["--cpus", "2"]);
    let (mut dst, sock) = destination(&dir, "dst", &["--cpus", "1"]);
    src.cmd(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    failed_saying(
        &mut src,
        &[
            "the destination failed to load",
            "unknown section cpu (instance 1)",
        ],
    );
    assert_eq!(dst.wait_exit(LONG), Some(1), "{}", dst.err.text());
    assert!(
        dst.err.text().contains("unknown section cpu"),
        "{}",
        dst.err.text()
    );
    runs_on(&mut src);
    // The same guest still migrates where it fits.
    let (mut dst2, sock2) = destination(&dir, "dst2", &["--cpus", "2"]);
    src.cmd(
        "migrate",
        json!({"uri": format!("unix:{}", sock2.display())}),
    );
    src.wait_migration("completed", LONG);
    runs_on(&mut dst2);
}

#[test]
fn return_path_off_is_one_way() {
    let dir = TempDir::new("rp-off");
    let mut src = source(&dir, "src", &[]);
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "return-path", "state": false}]}),
    );
    let caps = src.cmd("query-migrate-capabilities", Value::Null);
    assert!(
        caps.as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == "return-path" && c["state"] == false),
        "{caps}"
    );
    let (mut dst, sock) = destination(&dir, "dst", &[]);
    let proxy = Proxy::start(&dir.join("proxy.sock"), &sock, Policy::Forward);
    src.cmd(
        "migrate",
        json!({"uri": format!("unix:{}", proxy.path.display())}),
    );
    src.wait_migration("completed", LONG);
    runs_on(&mut dst);
    assert_eq!(
        proxy.return_messages(),
        0,
        "a one-way migration got return-path messages"
    );
}

/// Migrates a busy source through a proxy with `policy` to a fresh destination.
fn through_proxy(dir: &TempDir, policy: Policy) -> (Hopvm, Hopvm, Proxy) {
    let mut src = source(dir, "src", &[]);
    let (dst, sock) = destination(dir, "dst", &[]);
    let proxy = Proxy::start(&dir.join("proxy.sock"), &sock, policy);
    src.cmd(
        "migrate",
        json!({"uri": format!("unix:{}", proxy.path.display())}),
    );
    (src, dst, proxy)
}

#[test]
fn verdict_lost_the_source_resumes_and_the_destination_stays_paused() {
    let dir = TempDir::new("rp-cut-verdict");
    let (mut src, mut dst, _proxy) = through_proxy(&dir, Policy::CutAtVerdict);
    failed_saying(&mut src, &["gave no verdict"]);
    runs_on(&mut src);
    // The destination loaded everything but was never told to go: it must not run.
    dst.err
        .wait_for_lines(LONG, "the destination's reason", |t| {
            t.contains("did not send its go-ahead")
        });
    assert_eq!(dst.status(), "paused");
    follow_up_migration_completes(&dir, &mut src);
}

#[test]
fn started_lost_the_destination_runs_and_the_source_stays_paused() {
    let dir = TempDir::new("rp-cut-started");
    let (mut src, mut dst, _proxy) = through_proxy(&dir, Policy::CutAtStarted);
    failed_saying(&mut src, &["may be running the guest"]);
    // The go-ahead reached the destination: it runs, and the source must not.
    runs_on(&mut dst);
    assert_eq!(src.status(), "postmigrate");
}

#[test]
fn go_ahead_lost_neither_side_runs_and_both_say_why() {
    let dir = TempDir::new("rp-lose-go");
    let (mut src, mut dst, proxy) = through_proxy(&dir, Policy::LoseGoAhead);
    // The destination sees its connection end without a go-ahead.
    dst.err
        .wait_for_lines(LONG, "the destination's reason", |t| {
            t.contains("did not send its go-ahead")
        });
    assert_eq!(dst.status(), "paused");
    // The source sent the go-ahead into a silent connection and cannot know.
    failed_saying(&mut src, &["may be running the guest"]);
    assert_eq!(src.status(), "postmigrate");
    drop(proxy);
    // An operator who knows the destination is stopped resumes the source, intact.
    src.cmd("cont", Value::Null);
    runs_on(&mut src);
}

#[test]
fn cancel_while_the_verdict_is_on_its_way_resumes_the_source_only() {
    let dir = TempDir::new("rp-hold");
    let (mut src, mut dst, proxy) = through_proxy(&dir, Policy::HoldVerdict);
    proxy
        .verdict_rx
        .recv_timeout(LONG)
        .expect("the destination's verdict");
    // The whole stream is at the destination, which waits for the go-ahead.
    assert_eq!(migrate_info(&mut src)["status"], "active");
    src.cmd("migrate_cancel", Value::Null);
    proxy.release_tx.send(()).unwrap();
    src.wait_migration("cancelled", LONG);
    runs_on(&mut src);
    assert_eq!(dst.wait_exit(LONG), Some(1), "{}", dst.err.text());
    assert!(dst.err.text().contains("cancelled"), "{}", dst.err.text());
}
