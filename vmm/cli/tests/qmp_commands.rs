//! hopvm's QMP commands against real hopvm processes: run-state control, reset, quit, the
//! migration parameters (modern and 2013 spellings) and their errors, and deferred incoming.

mod common;

use std::time::Duration;

use common::passes;
use common::proc::{Hopvm, TempDir};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(120);

fn dirty_vm(dir: &TempDir, name: &str) -> Hopvm {
    let image = guest_tests::image_path("dirty").display().to_string();
    Hopvm::spawn(
        &dir.0,
        name,
        &["--kernel", &image, "--memory", "32M", "--cmdline", "ws=1"],
    )
}

fn error_of(vm: &mut Hopvm, command: &str, args: Value) -> String {
    vm.qmp
        .execute(command, Some(args))
        .expect_err("the command must fail")
        .to_string()
}

#[test]
fn run_state_reset_and_quit() {
    let dir = TempDir::new("qmp-runstate");
    let mut vm = dirty_vm(&dir, "vm");
    let version = vm.cmd("query-version", Value::Null);
    assert_eq!(version["qemu"]["major"], 7);
    assert!(version["package"].as_str().unwrap().starts_with("hopvm"));
    let commands = vm.cmd("query-commands", Value::Null);
    for c in [
        "migrate",
        "query-migrate",
        "migrate_set_speed",
        "query-migrate-cache-size",
    ] {
        assert!(
            commands.as_array().unwrap().contains(&json!({"name": c})),
            "{c}"
        );
    }
    vm.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    assert_eq!(vm.status(), "running");

    vm.cmd("stop", Value::Null);
    vm.qmp.wait_event("STOP", LONG, |_| true).unwrap();
    assert_eq!(
        vm.cmd("query-status", Value::Null),
        json!({"status": "paused", "singlestep": false, "running": false})
    );
    vm.cmd("cont", Value::Null);
    vm.qmp.wait_event("RESUME", LONG, |_| true).unwrap();
    assert_eq!(vm.status(), "running");

    // A reset reboots the guest from scratch: it prints its banner and fills again.
    let banners = |t: &str| t.matches("dirty: working set").count();
    assert_eq!(banners(&vm.out.text()), 1);
    vm.cmd("system_reset", Value::Null);
    let reset = vm.qmp.wait_event("RESET", LONG, |_| true).unwrap();
    assert_eq!(reset.data["guest"], false);
    vm.out
        .wait_for(LONG, "the guest booting again", |t| banners(t) == 2);
    let after = vm.out.text().rfind("dirty: working set").unwrap();
    vm.out
        .wait_for(LONG, "a pass after the reset", |t| passes(&t[after..]) >= 1);
    assert!(!vm.out.text().contains("CORRUPT"));

    vm.cmd("quit", Value::Null);
    let shutdown = vm.qmp.wait_event("SHUTDOWN", LONG, |_| true).unwrap();
    assert_eq!(
        shutdown.data,
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(vm.wait_exit(LONG), Some(0));
}

#[test]
fn migration_parameters_and_errors() {
    let dir = TempDir::new("qmp-params");
    let mut vm = dirty_vm(&dir, "vm");
    // Defaults as in the 2013 code: 32 MiB/s, 30 ms, 64 MiB.
    assert_eq!(
        vm.cmd("query-migrate-parameters", Value::Null),
        json!({"max-bandwidth": 32 << 20, "downtime-limit": 30, "xbzrle-cache-size": 64 << 20,
            "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "cpu-throttle-tailslow": false, "max-cpu-throttle": 99,
            "multifd-channels": 2, "tls-creds": "", "tls-hostname": "", "tls-authz": "",
            "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
            "block-incremental": false})
    );
    assert_eq!(vm.cmd("query-migrate", Value::Null), json!({}));
    assert_eq!(
        vm.cmd("query-migrate-capabilities", Value::Null),
        json!([
            {"state": false, "capability": "xbzrle"},
            {"state": false, "capability": "events"},
            {"state": false, "capability": "x-integrity"},
            {"state": true, "capability": "return-path"},
            {"state": false, "capability": "auto-converge"},
            {"state": false, "capability": "pause-before-switchover"},
            {"state": false, "capability": "late-block-activate"},
            {"state": false, "capability": "multifd"},
            {"state": false, "capability": "block"}
        ])
    );
    // The 2013 commands and the modern one change the same settings.
    vm.cmd("migrate_set_speed", json!({"value": 1000}));
    vm.cmd("migrate_set_downtime", json!({"value": 0.25}));
    vm.cmd("migrate-set-cache-size", json!({"value": 1 << 20}));
    assert_eq!(
        vm.cmd("query-migrate-cache-size", Value::Null),
        json!(1 << 20)
    );
    assert_eq!(
        vm.cmd("query-migrate-parameters", Value::Null),
        json!({"max-bandwidth": 1000, "downtime-limit": 250, "xbzrle-cache-size": 1 << 20,
            "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "cpu-throttle-tailslow": false, "max-cpu-throttle": 99,
            "multifd-channels": 2, "tls-creds": "", "tls-hostname": "", "tls-authz": "",
            "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
            "block-incremental": false})
    );
    vm.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 0, "downtime-limit": 30, "xbzrle-cache-size": 4 << 20}),
    );
    assert_eq!(
        vm.cmd("query-migrate-parameters", Value::Null)["xbzrle-cache-size"],
        4 << 20
    );
    // The TLS parameters are QEMU's StrOrNull: ids taken as they are (looked up when a
    // channel opens), null resets them to "", anything else is the wrong type.
    vm.cmd(
        "migrate-set-parameters",
        json!({"tls-authz": "auth0", "tls-hostname": "hostB"}),
    );
    let p = vm.cmd("query-migrate-parameters", Value::Null);
    assert_eq!(
        (&p["tls-authz"], &p["tls-hostname"]),
        (&json!("auth0"), &json!("hostB"))
    );
    vm.cmd(
        "migrate-set-parameters",
        json!({"tls-authz": null, "tls-hostname": null}),
    );
    let p = vm.cmd("query-migrate-parameters", Value::Null);
    assert_eq!(
        (&p["tls-authz"], &p["tls-hostname"]),
        (&json!(""), &json!(""))
    );
    let err = vm
        .qmp
        .execute("migrate-set-parameters", Some(json!({"tls-authz": 5})))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls-authz"), "{err}");
    // auto-converge's parameters, with QEMU's bounds and texts.
    vm.cmd(
        "migrate-set-parameters",
        json!({"cpu-throttle-initial": 30, "cpu-throttle-increment": 5,
               "cpu-throttle-tailslow": true, "max-cpu-throttle": 80,
               "throttle-trigger-threshold": 70}),
    );
    let p = vm.cmd("query-migrate-parameters", Value::Null);
    assert_eq!(
        (
            &p["cpu-throttle-initial"],
            &p["cpu-throttle-increment"],
            &p["cpu-throttle-tailslow"]
        ),
        (&json!(30), &json!(5), &json!(true))
    );
    assert_eq!(
        (&p["max-cpu-throttle"], &p["throttle-trigger-threshold"]),
        (&json!(80), &json!(70))
    );
    for (args, want) in [
        (json!({"cpu-throttle-initial": 0}), "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
        (json!({"cpu-throttle-increment": 100}), "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
        (json!({"throttle-trigger-threshold": 101}), "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
        (json!({"max-cpu-throttle": 20}), "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ] {
        assert_eq!(error_of(&mut vm, "migrate-set-parameters", args), format!("GenericError: {want}"));
    }
    // A refused set changes nothing.
    assert_eq!(
        vm.cmd("query-migrate-parameters", Value::Null)["max-cpu-throttle"],
        80
    );

    assert_eq!(
        error_of(&mut vm, "migrate-set-cache-size", json!({"value": 5000})),
        "GenericError: Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"
    );
    assert_eq!(
        error_of(&mut vm, "migrate-set-parameters", json!({"downtime-limit": 3_000_000})),
        "GenericError: Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 milliseconds"
    );
    assert_eq!(
        error_of(
            &mut vm,
            "migrate-set-parameters",
            json!({"multifd-channels": 0})
        ),
        "GenericError: Parameter 'multifd_channels' expects a value between 1 and 255"
    );
    assert_eq!(
        error_of(
            &mut vm,
            "migrate-set-parameters",
            json!({"multifd-channels": 256})
        ),
        "GenericError: Parameter 'multifd_channels' expects a value between 1 and 255"
    );
    assert_eq!(
        error_of(
            &mut vm,
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]})
        ),
        "GenericError: hopvm does not support the migration capability 'postcopy-ram'"
    );
    assert_eq!(
        error_of(
            &mut vm,
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "warp-drive", "state": true}]})
        ),
        "GenericError: Parameter 'capability' does not accept value 'warp-drive'"
    );
    assert_eq!(
        error_of(
            &mut vm,
            "migrate",
            json!({"uri": "tcp:127.0.0.1:1", "blk": "yes"})
        ),
        "GenericError: Invalid parameter type for 'blk', expected: boolean"
    );
    assert_eq!(
        error_of(&mut vm, "migrate", json!({"uri": "bogus:x"})),
        "GenericError: unknown migration protocol: bogus:x"
    );
    assert_eq!(
        error_of(&mut vm, "migrate", json!({})),
        "GenericError: Parameter 'uri' is missing"
    );
    assert_eq!(
        error_of(&mut vm, "migrate-incoming", json!({"uri": "tcp:0:1"})),
        "GenericError: '-incoming' was not specified on the command line"
    );
    assert_eq!(
        error_of(&mut vm, "system_wakeup", json!({})),
        "GenericError: Unable to wake up: guest is not in suspended state"
    );
    // None of this disturbed the guest.
    let before = passes(&vm.out.text());
    vm.out.wait_for(LONG, "more passes", |t| passes(t) > before);
    assert_eq!(vm.status(), "running");
}

#[test]
fn deferred_incoming() {
    let dir = TempDir::new("qmp-defer");
    let mut src = dirty_vm(&dir, "src");
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", "32M", "--incoming", "defer"]);
    assert_eq!(dst.status(), "inmigrate");
    assert_eq!(dst.cmd("query-migrate", Value::Null), json!({}));
    let sock = dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    dst.cmd("migrate-incoming", json!({"uri": uri}));
    assert_eq!(
        error_of(&mut dst, "migrate-incoming", json!({"uri": uri})),
        "GenericError: The incoming migration has already been started"
    );
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", LONG);
    dst.qmp.wait_event("RESUME", LONG, |_| true).unwrap();
    dst.out
        .wait_for(LONG, "passes on the destination", |t| passes(t) >= 2);
    assert!(!dst.out.text().contains("CORRUPT"));
    // cont on the stopped source restarts it (e.g. after a snapshot).
    assert_eq!(src.status(), "postmigrate");
}
