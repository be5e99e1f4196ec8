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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP tcp_between_two_network_namespaces (needs root to create namespaces)");
        return;
    }
    let hosts = match NetnsPair::create("hopvm-test-") {
        Ok(h) => h,
        Err(e) => panic!("cannot create the two hosts: {e}"),
    };
    let dir = TempDir::new("netns");
    let dirty = guest_tests::image_path("dirty").display().to_string();
    let mut src = Hopvm::spawn_with(
        &dir.0,
        "src",
        &["--kernel", &dirty, "--memory", "64M", "--cmdline", "ws=4"],
        in_netns(hosts.src()),
    );
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    let mut dst = Hopvm::spawn_with(
        &dir.0,
        "dst",
        &["--memory", "64M", "--incoming", "tcp:0:4444"],
        in_netns(hosts.dst()),
    );
    for vm in [&mut src, &mut dst] {
        vm.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
    }
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.cmd("migrate", json!({"uri": format!("tcp:{DST_ADDR}:4444")}));
    src.wait_migration("completed", LONG);
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

/// The same two hosts with the RAM over 4 multifd channels besides the main connection.
#[test]
fn multifd_between_two_network_namespaces() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP multifd_between_two_network_namespaces (needs root to create namespaces)");
        return;
    }
    let hosts = match NetnsPair::create("hopvm-mfd-") {
        Ok(h) => h,
        Err(e) => panic!("cannot create the two hosts: {e}"),
    };
    let dir = TempDir::new("netns-multifd");
    let dirty = guest_tests::image_path("dirty").display().to_string();
    let mut src = Hopvm::spawn_with(
        &dir.0,
        "src",
        &["--kernel", &dirty, "--memory", "64M", "--cmdline", "ws=4"],
        in_netns(hosts.src()),
    );
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    let mut dst = Hopvm::spawn_with(
        &dir.0,
        "dst",
        &["--memory", "64M", "--incoming", "defer"],
        in_netns(hosts.dst()),
    );
    for vm in [&mut src, &mut dst] {
        vm.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "events", "state": true},
                {"capability": "multifd", "state": true},
            ]}),
        );
        vm.cmd("migrate-set-parameters", json!({"multifd-channels": 4}));
    }
    dst.cmd("migrate-incoming", json!({"uri": "tcp:0:4444"}));
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.cmd("migrate", json!({"uri": format!("tcp:{DST_ADDR}:4444")}));
    src.wait_migration("completed", LONG);
    let info = src.cmd("query-migrate", serde_json::Value::Null);
    assert!(
        info["ram"]["multifd-bytes"].as_u64().unwrap() >= 4 << 20,
        "{info}"
    );
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
