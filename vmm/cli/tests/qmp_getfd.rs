//! `getfd` / `closefd` and `migrate fd:NAME` as libvirt uses them: descriptors passed to the
//! monitor with SCM_RIGHTS, and only those (or ones inherited at start-up) usable as `fd:`.
//! `migrate fd:N` naming one of hopvm's own descriptors (its KVM VM) is refused without
//! touching it, and the VM migrates normally afterwards.

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::passes;
use common::proc::{Hopvm, TempDir};
use common::tools::{dirty_args, free_tcp_port, strs};
use qmp::client::QmpClientError;
use serde_json::{json, Value};

const MEMORY: &str = "64M";
const LONG: Duration = Duration::from_secs(180);

/// Runs a command that must fail; returns its error text.
fn refused(vm: &mut Hopvm, command: &str, args: Value) -> String {
    match vm.qmp.execute(command, Some(args)) {
        Err(QmpClientError::Command { class, desc }) => {
            assert_eq!(class, "GenericError", "{command}: {desc}");
            desc
        }
        other => panic!("{command} should fail: {other:?}"),
    }
}

fn events_on(vm: &mut Hopvm) {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    vm.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
}

/// The descriptor number of hopvm's KVM VM (`anon_inode:kvm-vm`) in process `pid`.
fn kvm_vm_fd(pid: u32) -> i32 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            (target.to_str()? == "anon_inode:kvm-vm")
                .then(|| e.file_name().to_str()?.parse().ok())?
        })
        .next()
        .expect("hopvm has a KVM VM descriptor")
}

#[test]
fn getfd_closefd_errors_and_own_descriptors_refused() {
    let dir = TempDir::new("qmp-getfd-errors");
    let args = dirty_args(MEMORY, "64k");
    let mut vm = Hopvm::spawn(&dir.0, "vm", &strs(&args));
    vm.out.wait_for(LONG, "the first pass", |t| passes(t) >= 1);

    // QEMU's texts, with nothing passed.
    assert_eq!(
        refused(&mut vm, "getfd", json!({"fdname": "migrate"})),
        "No file descriptor supplied via SCM_RIGHTS"
    );
    assert_eq!(
        refused(&mut vm, "closefd", json!({"fdname": "migrate"})),
        "File descriptor named 'migrate' not found"
    );
    assert_eq!(
        refused(&mut vm, "migrate", json!({"uri": "fd:migrate"})),
        "File descriptor named 'migrate' has not been found"
    );
    let (mine, _peer) = UnixStream::pair().unwrap();
    let err = vm
        .qmp
        .execute_with_fd("getfd", Some(json!({"fdname": "9lives"})), mine.as_fd())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Parameter 'fdname' expects a name not starting with a digit"),
        "{err}"
    );
    // Passed and closed again: the name is gone.
    vm.qmp
        .execute_with_fd("getfd", Some(json!({"fdname": "spare"})), mine.as_fd())
        .unwrap();
    vm.cmd("closefd", json!({"fdname": "spare"}));
    assert_eq!(
        refused(&mut vm, "migrate", json!({"uri": "fd:spare"})),
        "File descriptor named 'spare' has not been found"
    );
    let commands = vm.cmd("query-commands", Value::Null);
    for name in ["getfd", "closefd"] {
        assert!(
            commands
                .as_array()
                .unwrap()
                .contains(&json!({"name": name})),
            "{commands}"
        );
    }

    // hopvm's own KVM VM descriptor is not a migration target, and stays open.
    let kvm = kvm_vm_fd(vm.child.id());
    assert_eq!(
        refused(&mut vm, "migrate", json!({"uri": format!("fd:{kvm}")})),
        format!("fd {kvm} was not handed to hopvm at start-up (pass it with the monitor's getfd)")
    );
    assert_eq!(kvm_vm_fd(vm.child.id()), kvm);
    assert_eq!(vm.status(), "running");

    // The VM still migrates: to a file, every page readable from KVM's memory slots.
    events_on(&mut vm);
    vm.save_to_file(&dir.join("snap"), LONG);
    assert_eq!(vm.status(), "postmigrate");
    vm.cmd("quit", Value::Null);
    vm.wait_exit(LONG);
}

#[test]
fn live_migration_over_descriptors_passed_with_getfd() {
    let dir = TempDir::new("qmp-getfd-live");
    let args = dirty_args(MEMORY, "1M");
    let mut src = Hopvm::spawn(&dir.0, "src", &strs(&args));
    src.out
        .wait_for(LONG, "the first pass on the source", |t| passes(t) >= 1);
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", MEMORY, "--incoming", "defer"]);
    events_on(&mut src);
    events_on(&mut dst);

    // As libvirt: one socket end to each monitor, by name; the test's copies close at once,
    // so the migration's channel lives in the two hopvm processes only.
    {
        let (a, b) = UnixStream::pair().unwrap();
        src.qmp
            .execute_with_fd("getfd", Some(json!({"fdname": "migrate"})), a.as_fd())
            .unwrap();
        dst.qmp
            .execute_with_fd("getfd", Some(json!({"fdname": "incoming"})), b.as_fd())
            .unwrap();
    }
    dst.cmd("migrate-incoming", json!({"uri": "fd:incoming"}));
    let before = passes(&src.out.text());
    src.cmd("migrate", json!({"uri": "fd:migrate"}));
    src.wait_migration("completed", LONG);
    dst.qmp
        .wait_event("RESUME", LONG, |_| true)
        .unwrap_or_else(|e| panic!("destination did not resume: {e}; {}", dst.err.text()));
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dst.status(), "running");
    // The guest goes on verifying on the destination.
    dst.out
        .wait_for(LONG, "two verified passes on the destination", |t| {
            passes(t) >= 2
        });
    let text = dst.out.text();
    assert!(!text.contains("CORRUPT"), "{text}");
    assert!(before >= 1);
    // The name was taken by the migration.
    assert_eq!(
        refused(&mut src, "closefd", json!({"fdname": "migrate"})),
        "File descriptor named 'migrate' not found"
    );

    // And the destination migrates on over tcp.
    let port = free_tcp_port();
    let third = Hopvm::spawn(
        &dir.0,
        "third",
        &[
            "--memory",
            MEMORY,
            "--incoming",
            &format!("tcp:127.0.0.1:{port}"),
        ],
    );
    dst.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    dst.wait_migration("completed", LONG);
    third
        .out
        .wait_for(LONG, "a verified pass on the third host", |t| {
            passes(t) >= 1
        });
    for mut vm in [src, dst, third] {
        vm.cmd("quit", Value::Null);
        vm.wait_exit(LONG);
    }
}
