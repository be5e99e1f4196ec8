//! Live migration as libvirt 9.0 drives it (`migrate-src.log`, `migrate-dst-compact.log`,
//! `migrate-tunnelled-*.log` of the reference): two hopvm processes started through the
//! `qemu-system-x86_64` link with libvirt's command lines (the destination with `-S` and
//! `-incoming defer`), then libvirt's QMP sequence on each side, command for command —
//! capabilities filtered by what `query-migrate-capabilities` reports, `pause-before-switchover`
//! with the `pre-switchover` state and `migrate-continue`, `late-block-activate`, the TLS
//! parameters set empty, `getfd` + `migrate fd:migrate`, `migrate-incoming tcp:[::]:PORT` (or an
//! inherited pipe `fd:N` when tunnelled), the destination's MIGRATION events, `cont`, and the
//! reset of capabilities and parameters afterwards. The dirty guest verifies every word it
//! wrote: it must go on, intact, on each destination.

mod common;

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::libvirt::{self, MONITOR_FD, SERIAL_FD};
use common::passes;
use common::proc::TempDir;
use common::tools;
use qmp::client::{QmpClient, QmpClientError};
use serde_json::{json, Value};

/// Where libvirt's tunnelled destination finds the stream (`migrate-incoming fd:26`).
const TUNNEL_FD: RawFd = 26;
const LONG: Duration = Duration::from_secs(120);

/// The capabilities libvirt 9.0 sets for a migration, in its order.
const LIBVIRT_CAPS: &[&str] = &[
    "xbzrle",
    "auto-converge",
    "rdma-pin-all",
    "postcopy-ram",
    "compress",
    "pause-before-switchover",
    "late-block-activate",
    "multifd",
    "dirty-bitmaps",
    "return-path",
    "zero-copy-send",
];

/// A hopvm started as libvirt starts QEMU: monitor socket and serial file as descriptors 30
/// and 31, and for a tunnelled destination the stream's pipe as descriptor 26.
struct Domain {
    child: Child,
    qmp: QmpClient,
    serial: PathBuf,
    monitor: PathBuf,
    name: &'static str,
}

impl Domain {
    fn start(dir: &TempDir, name: &'static str, incoming: bool, tunnel: Option<OwnedFd>) -> Self {
        let link = libvirt::qemu_link(dir);
        let key = dir.join("master-key.aes");
        std::fs::write(&key, [7u8; 32]).unwrap();
        let kernel = guest_tests::image_path("dirty");
        let monitor = dir.join(&format!("{name}.monitor"));
        let listener = UnixListener::bind(&monitor).unwrap();
        let serial = dir.join(&format!("{name}.serial"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&serial)
            .unwrap();
        let mut fds = vec![
            (listener.as_raw_fd(), MONITOR_FD),
            (file.as_raw_fd(), SERIAL_FD),
        ];
        if let Some(t) = &tunnel {
            fds.push((t.as_raw_fd(), TUNNEL_FD));
        }
        let mut cmd = Command::new(&link);
        cmd.args(libvirt::domain_args(&kernel, &key, "ws=2M", incoming))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut child = libvirt::spawn_with_fds(&mut cmd, &fds);
        drop((listener, file, tunnel));
        let qmp = match QmpClient::connect_retry(&monitor, Duration::from_secs(20)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                panic!("{name}: monitor: {e}");
            }
        };
        let mut d = Self {
            child,
            qmp,
            serial,
            monitor,
            name,
        };
        // domain-start-compact.log, the migration part: events on.
        let caps = d.ok("query-migrate-capabilities", Value::Null);
        let names: Vec<&str> = caps
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["capability"].as_str().unwrap())
            .collect();
        for want in [
            "events",
            "return-path",
            "pause-before-switchover",
            "late-block-activate",
        ] {
            assert!(names.contains(&want), "{name}: no {want} in {caps}");
        }
        d.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
        d
    }

    fn ok(&mut self, command: &str, args: Value) -> Value {
        libvirt::ok(&mut self.qmp, command, args)
    }

    fn refused(&mut self, command: &str, args: Value) -> String {
        match self.qmp.execute(command, Some(args)) {
            Err(QmpClientError::Command { desc, .. }) => desc,
            other => panic!("{}: {command} should fail: {other:?}", self.name),
        }
    }

    fn event(&mut self, name: &str, status: Option<&str>) {
        let want = status.map(|s| json!(s));
        self.qmp
            .wait_event(name, LONG, |d| {
                want.as_ref().is_none_or(|w| d["status"] == *w)
            })
            .unwrap_or_else(|e| {
                let now = self.qmp.execute("query-status", None);
                let mig = self.qmp.execute("query-migrate", None);
                let late: Vec<String> = self
                    .qmp
                    .take_events()
                    .iter()
                    .map(|e| format!("{} {} {}", e.name, e.data, e.timestamp))
                    .collect();
                panic!(
                    "{}: no {name} {status:?}: {e}; now {now:?}, {mig:?}; events since: \
                     {late:?}; serial: {}",
                    self.name,
                    self.serial_text()
                )
            });
    }

    fn status(&mut self) -> String {
        self.ok("query-status", Value::Null)["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// As libvirt: the capabilities of [`LIBVIRT_CAPS`] this hopvm reports, all off but the
    /// ones named.
    fn set_libvirt_caps(&mut self, on: &[&str]) {
        let reported = self.ok("query-migrate-capabilities", Value::Null);
        let has = |c: &str| {
            reported
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["capability"] == c)
        };
        let list: Vec<Value> = LIBVIRT_CAPS
            .iter()
            .filter(|c| has(c))
            .map(|c| json!({"capability": c, "state": on.contains(c)}))
            .collect();
        self.ok("migrate-set-capabilities", json!({ "capabilities": list }));
    }

    fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the guest has printed `n` more verified passes than `since`.
    fn wait_passes(&self, since: usize, n: usize) {
        let deadline = Instant::now() + LONG;
        loop {
            let text = self.serial_text();
            assert!(!text.contains("CORRUPT"), "{}: {text}", self.name);
            if passes(&text) >= since + n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no verified pass: {text}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// libvirt's destroy of a migrated-away source: SIGTERM.
    fn terminate(mut self) {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert_eq!(s.code(), Some(0), "{}", self.name);
                return;
            }
            assert!(Instant::now() < deadline, "{} did not end", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the stream goes, as `virsh migrate --live` decides.
enum Mode {
    /// Native (and `--p2p`, which says the same to QEMU): `tcp:[::]:PORT` on the destination,
    /// the source's libvirtd connects and hands the socket over with `getfd`.
    Native,
    /// `--p2p --tunnelled`: pipes through the two libvirtds (here: one pipe), no return path.
    Tunnelled,
}

/// The destination's side before the source starts (migrate-dst-compact.log up to
/// `migrate-incoming`); returns the domain and, for native mode, the port.
fn prepare_destination(dir: &TempDir, name: &'static str, mode: &Mode) -> (Domain, OwnedFd) {
    let (tunnel_read, tunnel_write) = match mode {
        Mode::Tunnelled => {
            let (r, w) = nix_pipe();
            (Some(r), Some(w))
        }
        Mode::Native => (None, None),
    };
    let mut dst = Domain::start(dir, name, true, tunnel_read);
    assert_eq!(dst.status(), "inmigrate");
    let params = dst.ok("query-migrate-parameters", Value::Null);
    assert_eq!(params["tls-creds"], "", "{params}");
    let rp = matches!(mode, Mode::Native);
    dst.set_libvirt_caps(if rp {
        &["late-block-activate", "return-path"]
    } else {
        &["late-block-activate"]
    });
    dst.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "", "tls-hostname": ""}),
    );
    let channel = match mode {
        Mode::Native => {
            let port = tools::free_tcp_port();
            dst.ok(
                "migrate-incoming",
                json!({"uri": format!("tcp:[::]:{port}")}),
            );
            dst.event("MIGRATION", Some("setup"));
            // The source's libvirtd connects and passes the socket to its QEMU.
            let s = connect_retry(port);
            OwnedFd::from(s)
        }
        Mode::Tunnelled => {
            dst.ok(
                "migrate-incoming",
                json!({"uri": format!("fd:{TUNNEL_FD}")}),
            );
            dst.event("MIGRATION", Some("setup"));
            tunnel_write.unwrap()
        }
    };
    (dst, channel)
}

fn nix_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two descriptors for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
    unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    }
}

fn connect_retry(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect to {port}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// One `virsh migrate --live` from `src` to a new destination; returns the destination,
/// running the guest.
fn migrate(dir: &TempDir, mut src: Domain, name: &'static str, mode: Mode) -> Domain {
    let (mut dst, channel) = prepare_destination(dir, name, &mode);
    let rp = matches!(mode, Mode::Native);

    // migrate-src.log
    assert_eq!(src.ok("query-block", Value::Null), json!([]));
    let before = src.ok("query-migrate", Value::Null);
    assert!(
        before == json!({})
            || ["completed", "cancelled"].contains(&before["status"].as_str().unwrap_or("")),
        "{before}"
    );
    let params = src.ok("query-migrate-parameters", Value::Null);
    for p in [
        "tls-creds",
        "tls-hostname",
        "max-bandwidth",
        "downtime-limit",
    ] {
        assert!(params.get(p).is_some(), "no {p}: {params}");
    }
    src.set_libvirt_caps(if rp {
        &["pause-before-switchover", "return-path"]
    } else {
        &["pause-before-switchover"]
    });
    src.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "", "tls-hostname": "", "max-bandwidth": 9223372036853727232u64}),
    );
    src.qmp
        .execute_with_fd("getfd", Some(json!({"fdname": "migrate"})), channel.as_fd())
        .unwrap();
    drop(channel);
    let serial_before = passes(&src.serial_text());
    // A second monitor client sees the source's events in order.
    let mut observer = QmpClient::connect_retry(&src.monitor, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("second monitor client: {e}"));
    observer.execute("query-status", None).unwrap();
    src.ok(
        "migrate",
        json!({"detach": true, "resume": false, "uri": "fd:migrate"}),
    );
    src.event("MIGRATION", Some("setup"));
    src.event("MIGRATION_PASS", None);
    src.event("MIGRATION", Some("active"));
    dst.event("MIGRATION", Some("active"));
    src.event("STOP", None);
    src.event("MIGRATION", Some("pre-switchover"));
    let info = src.ok("query-migrate", Value::Null);
    assert_eq!(info["status"], "pre-switchover", "{info}");
    for f in ["expected-downtime", "setup-time", "total-time"] {
        assert!(info[f].is_u64(), "no {f}: {info}");
    }
    for f in [
        "total",
        "transferred",
        "remaining",
        "duplicate",
        "normal",
        "mbps",
    ] {
        assert!(info["ram"].get(f).is_some(), "no ram.{f}: {info}");
    }
    assert_eq!(src.status(), "finish-migrate");
    // Paused: the guest stays stopped, the state is checked as QEMU does.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(passes(&dst.serial_text()), 0);
    assert_eq!(
        src.refused("migrate-continue", json!({"state": "active"})),
        "Migration not in expected state: pre-switchover"
    );
    assert_eq!(
        src.refused("migrate-continue", json!({"state": "paused"})),
        "Parameter 'state' does not accept value 'paused'"
    );
    assert_eq!(dst.status(), "inmigrate");
    src.ok("migrate-continue", json!({"state": "pre-switchover"}));
    src.event("MIGRATION", Some("device"));
    src.event("MIGRATION", Some("completed"));
    let info = src.ok("query-migrate", Value::Null);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(info["downtime"].is_u64(), "{info}");
    assert_eq!(src.status(), "postmigrate");
    assert!(serial_before >= 1);
    // QEMU's order (migrate-src.log): setup, MIGRATION_PASS 1, active, (more passes), STOP,
    // pre-switchover, device, the last pass, completed.
    observer
        .wait_event("MIGRATION", LONG, |d| d["status"] == "completed")
        .unwrap();
    let seen: Vec<String> = observer
        .take_events()
        .iter()
        .map(|e| match e.name.as_str() {
            "MIGRATION" => e.data["status"].as_str().unwrap_or("?").to_string(),
            other => other.to_string(),
        })
        .collect();
    assert_eq!(
        seen.get(..3),
        Some(&["setup", "MIGRATION_PASS", "active"].map(String::from)[..]),
        "{seen:?}"
    );
    let states: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .filter(|e| *e != "MIGRATION_PASS")
        .collect();
    assert_eq!(
        states,
        ["setup", "active", "STOP", "pre-switchover", "device"],
        "{seen:?}"
    );

    // migrate-dst-compact.log, after the stream.
    dst.event("MIGRATION", Some("completed"));
    let chardevs = dst.ok("query-chardev", Value::Null);
    assert!(chardevs.to_string().contains("charserial0"), "{chardevs}");
    dst.ok("qom-list", json!({"path": "/machine/peripheral"}));
    assert_eq!(dst.ok("query-block", Value::Null), json!([]));
    assert_eq!(dst.status(), "paused");
    dst.ok("cont", Value::Null);
    dst.event("RESUME", None);
    dst.set_libvirt_caps(&[]);
    dst.ok(
        "migrate-set-parameters",
        json!({"cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "tls-creds": "",
               "tls-hostname": "", "max-bandwidth": 134217728, "downtime-limit": 300,
               "xbzrle-cache-size": 67108864}),
    );
    let caps = dst.ok("query-migrate-capabilities", Value::Null);
    assert!(
        caps.as_array()
            .unwrap()
            .iter()
            .all(|c| c["state"] == false || c["capability"] == "events"),
        "{caps}"
    );
    // The source is gone (libvirt ends it); the guest goes on verifying here.
    src.terminate();
    dst.wait_passes(0, 2);
    assert_eq!(dst.status(), "running");
    dst
}

#[test]
fn libvirt_live_migration_native_there_tunnelled_back() {
    let dir = TempDir::new("libvirt-migration");
    let mut src = Domain::start(&dir, "src", false, None);
    // Not in a migration: QEMU's check and text.
    assert_eq!(
        src.refused("migrate-continue", json!({"state": "pre-switchover"})),
        "Migration not in expected state: none"
    );
    // tls-authz names an authorization object, looked up when a TLS source's certificate
    // is checked (QEMU's rule): any id is taken here, and reported back.
    src.ok("migrate-set-parameters", json!({"tls-authz": "authz0"}));
    assert_eq!(
        src.ok("query-migrate-parameters", Value::Null)["tls-authz"],
        "authz0"
    );
    src.ok("migrate-set-parameters", json!({"tls-authz": ""}));
    src.ok("cont", Value::Null);
    src.event("RESUME", None);
    src.wait_passes(0, 1);

    let dst = migrate(&dir, src, "dst", Mode::Native);
    let back = migrate(&dir, dst, "back", Mode::Tunnelled);
    let mut again = migrate(&dir, back, "again", Mode::Native);
    again.ok("quit", Value::Null);
}

/// `migrate_cancel` in `pre-switchover` resumes the source, as QEMU's cancel of a paused
/// migration; the destination fails and ends.
#[test]
fn libvirt_cancel_in_pre_switchover_resumes_the_source() {
    let dir = TempDir::new("libvirt-migration-cancel");
    let mut src = Domain::start(&dir, "src", false, None);
    src.ok("cont", Value::Null);
    src.event("RESUME", None);
    src.wait_passes(0, 1);
    let (mut dst, channel) = prepare_destination(&dir, "dst", &Mode::Native);
    src.set_libvirt_caps(&["pause-before-switchover", "return-path"]);
    src.qmp
        .execute_with_fd("getfd", Some(json!({"fdname": "migrate"})), channel.as_fd())
        .unwrap();
    drop(channel);
    src.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 9223372036853727232u64}),
    );
    src.ok("migrate", json!({"uri": "fd:migrate"}));
    src.event("MIGRATION", Some("pre-switchover"));
    src.ok("migrate_cancel", Value::Null);
    src.event("MIGRATION", Some("cancelled"));
    src.event("RESUME", None);
    assert_eq!(src.status(), "running");
    let n = passes(&src.serial_text());
    src.wait_passes(n, 1);
    dst.event("MIGRATION", Some("failed"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while dst.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the destination did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The source can migrate again afterwards.
    let dst = migrate(&dir, src, "dst2", Mode::Native);
    drop(dst);
}
