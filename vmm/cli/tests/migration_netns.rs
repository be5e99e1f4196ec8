//! "Two hosts": live migration over TCP between two network namespaces joined by a veth pair,
//! each hopvm in its own namespace. Needs root (to create the namespaces); otherwise the test
//! prints a SKIP line and passes.

mod common;

use std::time::Duration;

use common::passes;
use common::proc::{in_netns, Hopvm, TempDir};
use hopvm::tools::netns::{NetnsPair, DST_ADDR};
use serde_json::json;

const LONG: Duration = Duration::from_secs(180);

#[test]
fn tcp_between_two_network_namespaces() {
    between_two_hosts("tcp_between_two_network_namespaces", "hopvm-test-", None);
}

/// The same two hosts with the RAM over 4 multifd channels besides the main connection.
#[test]
fn multifd_between_two_network_namespaces() {
    between_two_hosts(
        "multifd_between_two_network_namespaces",
        "hopvm-mfd-",
        Some(4),
    );
}

/// A busy guest migrated from host A's namespace to host B's and checked there; with
/// `multifd`, over that many channels (set on both sides before B listens, QEMU's rule), else
/// to a destination given `--incoming` on its command line.
fn between_two_hosts(test: &str, prefix: &str, multifd: Option<u8>) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP {test} (needs root to create namespaces)");
        return;
    }
    let hosts = match NetnsPair::create(prefix) {
        Ok(h) => h,
        Err(e) => panic!("cannot create the two hosts: {e}"),
    };
    let dir = TempDir::new(test);
    let dirty = guest_tests::image_path("dirty").display().to_string();
    let mut src = Hopvm::spawn_with(
        &dir.0,
        "src",
        &["--kernel", &dirty, "--memory", "64M", "--cmdline", "ws=4"],
        in_netns(hosts.src()),
    );
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    let incoming = if multifd.is_some() {
        "defer"
    } else {
        "tcp:0:4444"
    };
    let mut dst = Hopvm::spawn_with(
        &dir.0,
        "dst",
        &["--memory", "64M", "--incoming", incoming],
        in_netns(hosts.dst()),
    );
    for vm in [&mut src, &mut dst] {
        vm.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "events", "state": true},
                {"capability": "multifd", "state": multifd.is_some()},
            ]}),
        );
        if let Some(channels) = multifd {
            vm.cmd(
                "migrate-set-parameters",
                json!({"multifd-channels": channels}),
            );
        }
    }
    if multifd.is_some() {
        dst.cmd("migrate-incoming", json!({"uri": "tcp:0:4444"}));
    }
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.cmd("migrate", json!({"uri": format!("tcp:{DST_ADDR}:4444")}));
    src.wait_migration("completed", LONG);
    if multifd.is_some() {
        let info = src.cmd("query-migrate", serde_json::Value::Null);
        assert!(
            info["ram"]["multifd-bytes"].as_u64().unwrap() >= 4 << 20,
            "{info}"
        );
    }
    dst.out
        .wait_for(LONG, "passes on host B", |t| passes(t) >= 2);
    assert_eq!(dst.status(), "running");
    assert_eq!(src.status(), "postmigrate");
    for vm in [&src, &dst] {
        assert!(!vm.out.text().contains("CORRUPT"), "{}", vm.out.text());
    }
    drop((src, dst));
    drop(hosts);
}
