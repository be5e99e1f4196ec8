//! A domain as libvirt 9.0 starts it (`qemu-cmdline-src.txt`): the monitor and the serial
//! port's file handed over as descriptors (`-chardev socket,fd=N`, `-add-fd` +
//! `/dev/fdset/N`), objects and devices in JSON, and the QMP start sequence of
//! `domain-start-compact.log`; then stop / cont and SIGTERM → SHUTDOWN (`host-signal`).

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::libvirt::{self, ok, MONITOR_FD, SERIAL_FD};
use common::proc::TempDir;
use qmp::client::QmpClient;
use serde_json::{json, Value};

/// Starts hopvm through a `qemu-system-x86_64` link with the monitor socket and the serial
/// file as descriptors 30 and 31, as libvirt does.
fn start(dir: &TempDir, args: &[String]) -> (Child, std::path::PathBuf) {
    let link = libvirt::qemu_link(dir);
    let monitor = dir.join("monitor.sock");
    let listener = UnixListener::bind(&monitor).unwrap();
    let serial = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("guest.serial"))
        .unwrap();
    let mut cmd = Command::new(&link);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = libvirt::spawn_with_fds(
        &mut cmd,
        &[
            (listener.as_raw_fd(), MONITOR_FD),
            (serial.as_raw_fd(), SERIAL_FD),
        ],
    );
    drop(listener);
    drop(serial);
    (child, monitor)
}

fn wait_exit(child: &mut Child) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "hopvm did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn libvirt_domain_starts_and_ends_on_sigterm() {
    let dir = TempDir::new("libvirt-domain");
    let key = dir.join("master-key.aes");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::write(dir.join("guest.serial"), b"earlier boot\n").unwrap();
    let kernel = guest_tests::image_path("dirty");
    let args = libvirt::domain_args(&kernel, &key, "ws=1", false);
    let (mut child, monitor) = start(&dir, &args);
    let mut qmp = QmpClient::connect_retry(&monitor, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("monitor: {e}"));

    // domain-start-compact.log
    let caps = ok(&mut qmp, "query-migrate-capabilities", Value::Null);
    assert!(caps
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["capability"] == "events"));
    ok(
        &mut qmp,
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    let chardevs = ok(&mut qmp, "query-chardev", Value::Null);
    let labels: Vec<&str> = chardevs
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert!(labels.contains(&"charmonitor") && labels.contains(&"charserial0"));
    let cpus = ok(&mut qmp, "query-cpus-fast", Value::Null);
    let cpu0 = &cpus[0];
    assert_eq!(cpu0["qom-path"], "/machine/unattached/device[0]");
    assert!(cpu0["thread-id"].as_i64().unwrap() > 0, "{cpu0}");
    let props = ok(
        &mut qmp,
        "qom-list",
        json!({"path": "/machine/unattached/device[0]"}),
    );
    let mut bools = 0;
    for p in props.as_array().unwrap() {
        if p["type"] == "bool" {
            let v = ok(
                &mut qmp,
                "qom-get",
                json!({"path": "/machine/unattached/device[0]", "property": p["name"]}),
            );
            assert!(v.is_boolean(), "{p}: {v}");
            bools += 1;
        }
    }
    assert!(bools > 50);
    let svm = ok(
        &mut qmp,
        "qom-get",
        json!({"path": "/machine/unattached/device[0]", "property": "svm"}),
    );
    assert_eq!(svm, json!(false));
    assert_eq!(ok(&mut qmp, "query-iothreads", Value::Null), json!([]));
    assert_eq!(
        ok(&mut qmp, "query-named-block-nodes", json!({"flat": true})),
        json!([])
    );
    let peripheral = ok(&mut qmp, "qom-list", json!({"path": "/machine/peripheral"}));
    assert!(peripheral
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "serial0" && p["type"] == "child<isa-serial>"));
    assert_eq!(ok(&mut qmp, "query-block", Value::Null), json!([]));
    // What libvirt asks when it reconnects after a restart.
    assert_eq!(ok(&mut qmp, "query-jobs", Value::Null), json!([]));
    assert_eq!(
        ok(&mut qmp, "query-status", Value::Null)["status"],
        "prelaunch"
    );
    ok(&mut qmp, "cont", Value::Null);
    qmp.wait_event("RESUME", Duration::from_secs(10), |_| true)
        .unwrap();

    // The guest runs and writes through descriptor 31, after what was there.
    let serial = dir.join("guest.serial");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&serial).unwrap();
        if text.contains("pass 1 ok") {
            assert!(text.starts_with("earlier boot\n"), "append=on: {text}");
            break;
        }
        assert!(Instant::now() < deadline, "no guest output: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // -no-acpi: as in QEMU, only the event.
    ok(&mut qmp, "system_powerdown", Value::Null);
    qmp.wait_event("POWERDOWN", Duration::from_secs(10), |_| true)
        .unwrap();
    ok(&mut qmp, "stop", Value::Null);
    assert_eq!(
        ok(&mut qmp, "query-status", Value::Null)["status"],
        "paused"
    );
    ok(&mut qmp, "cont", Value::Null);

    // virsh destroy: SIGTERM.
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let event = qmp
        .wait_event("SHUTDOWN", Duration::from_secs(10), |_| true)
        .unwrap();
    assert_eq!(event.data, json!({"guest": false, "reason": "host-signal"}));
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn domain_command_line_errors_are_clear() {
    let dir = TempDir::new("libvirt-domain-errors");
    let link = libvirt::qemu_link(&dir);
    let kernel = guest_tests::image_path("dirty").display().to_string();
    for (args, expect) in [
        (
            vec![
                "-object",
                r#"{"qom-type":"memory-backend-file","id":"m","size":1}"#,
            ],
            "qom-type=memory-backend-file",
        ),
        (
            vec!["-smp", "2,sockets=1,cores=1,threads=1"],
            "Invalid CPU topology",
        ),
        (
            vec!["-sandbox", "on,obsolete=maybe"],
            "invalid argument for obsolete",
        ),
        (
            vec!["-machine", "pc,memory-backend=nope"],
            "memory-backend=nope",
        ),
        (
            vec![
                "-chardev",
                "socket,id=m,fd=200,server=on",
                "-mon",
                "chardev=m,mode=control",
            ],
            "fd 200 was not passed to hopvm",
        ),
        (
            vec!["-device", r#"{"driver":"virtio-blk-pci"}"#],
            "Parameter 'drive' is missing",
        ),
        (vec!["-device", r#"{"driver":"e1000"}"#], "e1000"),
        (vec!["-device", "{\"driver\":"], "JSON"),
        (vec!["-uuid", "not-a-uuid"], "UUID"),
    ] {
        let out = Command::new(&link)
            .args(["-kernel", &kernel, "-m", "16"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}
