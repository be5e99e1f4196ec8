//! `hopvm qmp` against a running hopvm: one-shot commands with pretty output and QEMU's error
//! classes, and the shell (scripted through a pipe) with `command key=value` syntax, raw JSON
//! and events shown as they arrive.

mod common;

use std::time::Duration;

use common::proc::{Hopvm, TempDir};
use common::tools::{run, Tool};
use serde_json::{json, Value};

const QUICK: Duration = Duration::from_secs(60);

fn idle_vm(dir: &TempDir) -> Hopvm {
    let idle = guest_tests::image_path("idle").display().to_string();
    let vm = Hopvm::spawn(&dir.0, "vm", &["--kernel", &idle, "--memory", "32M"]);
    vm.out
        .wait_for(QUICK, "the idle guest", |t| t.contains("idle"));
    vm
}

fn qmp(vm: &Hopvm, args: &[&str]) -> (i32, String, String) {
    let spec = format!("unix:{}", vm.qmp_path.display());
    let mut all = vec!["qmp", "--qmp", spec.as_str()];
    all.extend_from_slice(args);
    run(&all, QUICK)
}

#[test]
fn one_shot_commands_print_pretty_replies() {
    let dir = TempDir::new("tools-qmp-oneshot");
    let mut vm = idle_vm(&dir);

    let (status, out, err) = qmp(&vm, &["query-status"]);
    assert_eq!(status, 0, "{err}");
    assert_eq!(
        out,
        "{\n  \"running\": true,\n  \"singlestep\": false,\n  \"status\": \"running\"\n}\n"
    );

    // key=value arguments are typed as JSON, a JSON object is taken as it is.
    let (status, out, err) = qmp(&vm, &["migrate-set-parameters", "max-bandwidth=1048576"]);
    assert_eq!((status, out.as_str()), (0, "{}\n"), "{err}");
    let (status, _, err) = qmp(
        &vm,
        &["migrate-set-parameters", r#"{"downtime-limit": 300}"#],
    );
    assert_eq!(status, 0, "{err}");
    let params = vm.cmd("query-migrate-parameters", Value::Null);
    assert_eq!(params["max-bandwidth"], 1048576);
    assert_eq!(params["downtime-limit"], 300);
    let (status, out, _) = qmp(
        &vm,
        &[
            "migrate-set-capabilities",
            r#"capabilities=[{"capability": "events", "state": true}]"#,
        ],
    );
    assert_eq!(status, 0, "{out}");
    assert_eq!(
        vm.cmd("query-migrate-capabilities", Value::Null),
        json!([
            {"state": false, "capability": "xbzrle"},
            {"state": true, "capability": "events"},
            {"state": false, "capability": "x-integrity"},
            {"state": true, "capability": "return-path"},
            {"state": false, "capability": "auto-converge"},
            {"state": false, "capability": "pause-before-switchover"},
            {"state": false, "capability": "late-block-activate"},
            {"state": false, "capability": "multifd"},
            {"state": false, "capability": "block"}
        ])
    );

    // Error replies: exit status 1, QEMU's class and description, nothing on stdout.
    for (args, want) in [
        (
            &["frobnicate"][..],
            "hopvm: frobnicate: CommandNotFound: The command frobnicate has not been found\n",
        ),
        (
            &["migrate-set-parameters", "downtime-limit=soon"],
            "hopvm: migrate-set-parameters: GenericError: Parameter 'downtime-limit' expects \
             uint64\n",
        ),
        (
            &["stop", "now=true"],
            "hopvm: stop: GenericError: Parameter 'now' is unexpected\n",
        ),
    ] {
        let (status, out, err) = qmp(&vm, args);
        assert_eq!(status, 1, "{args:?}");
        assert_eq!(err, want, "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    // Arguments the tool itself cannot parse are refused before anything is sent.
    for (args, want) in [
        (&["stop", "{not json"][..], "invalid JSON arguments"),
        (&["stop", "[1]"], "expected key=value, not '[1]'"),
        (&["x", "a=1", "a=2"], "'a' is given twice"),
    ] {
        let (status, _, err) = qmp(&vm, args);
        assert_eq!(status, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(vm.status(), "running");
}

#[test]
fn the_shell_reads_commands_and_shows_events() {
    let dir = TempDir::new("tools-qmp-shell");
    let mut vm = idle_vm(&dir);
    let spec = format!("unix:{}", vm.qmp_path.display());
    let script = "query-status\n\
                  stop\n\
                  query-status\n\
                  # raw JSON, with QEMU's single quotes\n\
                  {'execute': 'cont'}\n\
                  frobnicate\n\
                  migrate-set-parameters downtime-limit=\"300\"\n\
                  migrate-set-parameters downtime-limit=250 max-bandwidth=2M\n\
                  query-status\n";
    let mut shell = Tool::spawn_with_input(&["qmp", "--qmp", &spec], Some(script));
    assert_eq!(shell.wait(QUICK), 0, "{}", shell.outputs());
    let out = shell.out.text();
    let expected_in_order = [
        "\"status\": \"running\"",
        "event STOP (at ",
        "{}",
        "\"status\": \"paused\"",
        "event RESUME (at ",
        "{}",
        "error: CommandNotFound: The command frobnicate has not been found",
        "error: GenericError: Parameter 'downtime-limit' expects uint64",
        "error: GenericError: Parameter 'max-bandwidth' expects uint64",
        "\"status\": \"running\"",
    ];
    let mut rest = out.as_str();
    for want in expected_in_order {
        let at = rest
            .find(want)
            .unwrap_or_else(|| panic!("{want:?} missing (in order) from:\n{out}"));
        rest = &rest[at + want.len()..];
    }
    assert_eq!(vm.status(), "running");
    // The last valid assignment of downtime-limit never ran: max-bandwidth=2M is a string.
    assert_eq!(
        vm.cmd("query-migrate-parameters", Value::Null)["downtime-limit"],
        30
    );
}
