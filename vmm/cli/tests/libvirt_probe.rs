//! libvirt's capability probe of a QEMU binary, against hopvm's `qemu-system-x86_64` link: the
//! command line of `probe-short.log` (`-machine none`, `-daemonize`, `-pidfile`) and the 18
//! commands libvirt 9.0 sends, answered for what hopvm implements.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::libvirt::{ok, qemu_link};
use common::proc::TempDir;
use qmp::client::{QmpClient, QmpClientError};
use serde_json::{json, Value};

fn probe_args(dir: &TempDir, accel: &str) -> Vec<String> {
    let monitor = dir.join("qmp.monitor");
    let pid = dir.join("qmp.pid");
    [
        "-S",
        "-no-user-config",
        "-nodefaults",
        "-nographic",
        "-machine",
        &format!("none,accel={accel}"),
        "-qmp",
        &format!("unix:{},server=on,wait=off", monitor.display()),
        "-pidfile",
        &pid.display().to_string(),
        "-daemonize",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the probe as libvirt does: the command returns once the monitor listens.
fn start_probe(dir: &TempDir, accel: &str) -> (QmpClient, i32) {
    let link = qemu_link(dir);
    let status = Command::new(&link)
        .args(probe_args(dir, accel))
        .status()
        .unwrap();
    assert!(status.success(), "-daemonize parent: {status}");
    // The parent exited only after the monitor listened and the pid file was written.
    let pid: i32 = std::fs::read_to_string(dir.join("qmp.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid_alive(pid));
    let qmp = QmpClient::connect(&dir.join("qmp.monitor")).unwrap();
    (qmp, pid)
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn libvirt_probe_is_answered() {
    let dir = TempDir::new("libvirt-probe");
    let (mut qmp, pid) = start_probe(&dir, "kvm:tcg");

    let version = ok(&mut qmp, "query-version", Value::Null);
    // libvirt 9.0 needs QEMU >= 4.2.0.
    assert_eq!(version["qemu"]["major"], 7);
    assert_eq!(version["qemu"]["minor"], 2);
    assert!(version["package"].as_str().unwrap().starts_with("hopvm-"));
    assert_eq!(
        ok(&mut qmp, "query-target", Value::Null),
        json!({"arch": "x86_64"})
    );
    assert_eq!(
        ok(&mut qmp, "query-kvm", Value::Null),
        json!({"enabled": true, "present": true})
    );

    // The schema is hopvm's: every command it lists is in query-commands and vice versa.
    let schema = ok(&mut qmp, "query-qmp-schema", Value::Null);
    let commands = names(&ok(&mut qmp, "query-commands", Value::Null));
    let schema_commands: Vec<String> = schema
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    for c in &commands {
        assert!(schema_commands.contains(c), "{c} missing from the schema");
    }
    assert!(commands.contains(&"query-cpu-model-expansion".to_string()));
    assert!(!commands.contains(&"device_add".to_string()));
    assert!(!commands.contains(&"query-tpm-models".to_string()));

    let types = names(&ok(&mut qmp, "qom-list-types", Value::Null));
    for t in [
        "pc-i440fx-7.2-machine",
        "qemu64-x86_64-cpu",
        "isa-serial",
        "memory-backend-ram",
        "virtio-blk-pci",
        "virtio-net-pci",
        "virtio-rng-pci",
    ] {
        assert!(types.contains(&t.to_string()), "{t}");
    }
    // Devices hopvm does not have are answered as a QEMU built without them.
    for t in ["e1000", "virtio-net-ccw", "VGA", "kvm-pit"] {
        match qmp.execute("device-list-properties", Some(json!({"typename": t}))) {
            Err(QmpClientError::Command { class, desc }) => {
                assert_eq!(class, "DeviceNotFound");
                assert_eq!(desc, format!("Device '{t}' not found"));
            }
            other => panic!("{t}: {other:?}"),
        }
    }
    let serial = names(&ok(
        &mut qmp,
        "device-list-properties",
        json!({"typename": "isa-serial"}),
    ));
    assert!(serial.contains(&"chardev".to_string()));
    match qmp.execute(
        "qom-list-properties",
        Some(json!({"typename": "memory-backend-epc"})),
    ) {
        Err(QmpClientError::Command { class, .. }) => assert_eq!(class, "DeviceNotFound"),
        other => panic!("{other:?}"),
    }
    let ram = names(&ok(
        &mut qmp,
        "qom-list-properties",
        json!({"typename": "memory-backend-ram"}),
    ));
    assert!(ram.contains(&"size".to_string()));
    let cpu = names(&ok(
        &mut qmp,
        "qom-list-properties",
        json!({"typename": "max-x86_64-cpu"}),
    ));
    assert!(cpu.contains(&"svm".to_string()) && cpu.contains(&"lm".to_string()));
    let machine = names(&ok(
        &mut qmp,
        "qom-list-properties",
        json!({"typename": "none-machine"}),
    ));
    assert!(machine.contains(&"memory-backend".to_string()));

    let machines = ok(&mut qmp, "query-machines", Value::Null);
    let pc = &machines.as_array().unwrap()[0];
    assert_eq!(pc["name"], "pc-i440fx-7.2");
    assert_eq!(pc["alias"], "pc");
    assert_eq!(pc["is-default"], true);
    assert_eq!(pc["default-cpu-type"], "qemu64-x86_64-cpu");

    let cpus = ok(&mut qmp, "query-cpu-definitions", Value::Null);
    let models = names(&cpus);
    for m in ["qemu64", "kvm64", "max", "host"] {
        assert!(models.contains(&m.to_string()), "{m}");
    }
    let host = cpus
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "host")
        .unwrap();
    assert_eq!(host["unavailable-features"], json!([]));

    let options = ok(&mut qmp, "query-command-line-options", Value::Null);
    let options: Vec<&str> = options
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["option"].as_str().unwrap())
        .collect();
    assert!(options.contains(&"boot-opts") && options.contains(&"msg"));

    let caps = ok(&mut qmp, "query-migrate-capabilities", Value::Null);
    assert!(caps
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["capability"] == "events"));

    let expansion = ok(
        &mut qmp,
        "query-cpu-model-expansion",
        json!({"type": "static", "model": {"name": "host"}}),
    );
    assert_eq!(expansion["model"]["name"], "base");
    assert_eq!(expansion["model"]["props"]["lm"], true);
    let full = ok(
        &mut qmp,
        "query-cpu-model-expansion",
        json!({"type": "full", "model": {"name": "host",
            "props": {"migratable": false, "hv-passthrough": true}}}),
    );
    assert_eq!(full["model"]["name"], "host");
    let no_svm = ok(
        &mut qmp,
        "query-cpu-model-expansion",
        json!({"type": "full", "model": {"name": "qemu64", "props": {"svm": false}}}),
    );
    assert_eq!(no_svm["model"]["props"]["svm"], false);
    match qmp.execute(
        "query-cpu-model-expansion",
        Some(json!({"type": "full", "model": {"name": "486"}})),
    ) {
        Err(QmpClientError::Command { class, .. }) => assert_eq!(class, "GenericError"),
        other => panic!("{other:?}"),
    }

    assert_eq!(
        ok(&mut qmp, "query-status", Value::Null)["status"],
        "prelaunch"
    );
    // Lines end in CRLF as QEMU's: libvirt reads nothing else.
    let mut raw = std::os::unix::net::UnixStream::connect(dir.join("qmp.monitor")).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = Vec::new();
    let mut byte = [0u8; 1];
    while !greeting.ends_with(b"\n") {
        std::io::Read::read_exact(&mut raw, &mut byte).unwrap();
        greeting.push(byte[0]);
    }
    assert!(greeting.ends_with(b"}\r\n"), "{greeting:?}");
    drop(raw);
    ok(&mut qmp, "quit", Value::Null);
    wait_gone(pid);
    assert!(!dir.join("qmp.pid").exists(), "pid file removed at exit");
}

#[test]
fn tcg_probe_offers_no_machine() {
    let dir = TempDir::new("libvirt-probe-tcg");
    let (mut qmp, pid) = start_probe(&dir, "tcg");
    assert_eq!(ok(&mut qmp, "query-machines", Value::Null), json!([]));
    assert_eq!(
        ok(&mut qmp, "query-cpu-definitions", Value::Null),
        json!([])
    );
    assert_eq!(
        ok(&mut qmp, "query-kvm", Value::Null),
        json!({"enabled": false, "present": true})
    );
    // SIGTERM ends it as it ends QEMU (libvirt kills the probe that way).
    // SAFETY: sending a signal to the child we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid);
}

#[test]
fn daemonize_reports_start_up_errors() {
    let dir = TempDir::new("libvirt-probe-err");
    let link = qemu_link(&dir);
    let out = Command::new(&link)
        .args([
            "-machine",
            "none",
            "-qmp",
            "unix:/nonexistent-dir/qmp.monitor,server=on,wait=off",
            "-daemonize",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("qmp"), "{err}");
    // A pid file another process holds is refused.
    let pidfile = dir.join("held.pid");
    let held = std::fs::File::create(&pidfile).unwrap();
    // SAFETY: flock on a file we own.
    let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) };
    assert_eq!(locked, 0);
    let out = Command::new(&link)
        .args(["-machine", "none", "-pidfile"])
        .arg(Path::new(&pidfile))
        .args(["-daemonize"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot create PID file"));
}
