//! Issue 9, multifd: the busy self-verifying guest migrated with its RAM spread over 2 and 4
//! extra channels (QEMU's `multifd` capability and `multifd-channels` parameter) over tcp and
//! unix, and the refusals: multifd on one side only, multifd over `exec:`, with `x-integrity`,
//! and a channel cut mid-way — each a clear error with the source's guest running on, intact.
//! (The two-namespace run is in `migration_netns.rs`.)

mod common;

use std::time::Duration;

use common::passes;
use common::proc::{Hopvm, TempDir};
use common::proxy::MultiProxy;
use common::tools::{dirty_args, free_tcp_port, strs};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(180);

fn caps(vm: &mut Hopvm, multifd: bool, channels: u8) {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "multifd", "state": multifd},
        ]}),
    );
    vm.cmd(
        "migrate-set-parameters",
        json!({"multifd-channels": channels}),
    );
}

/// A busy source (64 MiB, 4 MiB working set) after its first verified pass.
fn source(dir: &TempDir, name: &str, multifd: bool, channels: u8) -> Hopvm {
    let args = dirty_args("64M", "4");
    let mut src = Hopvm::spawn(&dir.0, name, &strs(&args));
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    caps(&mut src, multifd, channels);
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src
}

/// A destination waiting with `--incoming defer`; its capabilities are set, then
/// `migrate-incoming uri` (QEMU's order: capabilities before the incoming migration starts).
fn destination(dir: &TempDir, name: &str, uri: &str, multifd: bool, channels: u8) -> Hopvm {
    let mut dst = Hopvm::spawn(&dir.0, name, &["--memory", "64M", "--incoming", "defer"]);
    caps(&mut dst, multifd, channels);
    dst.cmd("migrate-incoming", json!({"uri": uri}));
    dst
}

fn runs_on(vm: &mut Hopvm) {
    vm.runs_intact(LONG);
}

fn migrate_info(vm: &mut Hopvm) -> Value {
    vm.cmd("query-migrate", Value::Null)
}

fn migrate_completes(dir: &TempDir, uri_dst: &str, uri_src: &str, channels: u8) {
    let mut src = source(dir, "src", true, channels);
    let mut dst = destination(dir, "dst", uri_dst, true, channels);
    src.cmd("migrate", json!({"uri": uri_src}));
    src.wait_migration("completed", LONG);
    let info = migrate_info(&mut src);
    assert_eq!(info["status"], "completed", "{info}");
    let multifd = info["ram"]["multifd-bytes"].as_u64().unwrap();
    let transferred = info["ram"]["transferred"].as_u64().unwrap();
    // The working set alone is 4 MiB of non-zero pages, all of them on the channels.
    assert!(multifd >= 4 << 20, "{info}");
    assert!(transferred > multifd, "{info}");
    assert_eq!(src.status(), "postmigrate");
    runs_on(&mut dst);
    assert!(!src.out.text().contains("CORRUPT"), "{}", src.out.text());
}

#[test]
fn multifd_over_tcp_with_2_and_4_channels() {
    for channels in [2, 4] {
        let dir = TempDir::new(&format!("multifd-tcp-{channels}"));
        let port = free_tcp_port();
        migrate_completes(
            &dir,
            &format!("tcp:127.0.0.1:{port}"),
            &format!("tcp:127.0.0.1:{port}"),
            channels,
        );
    }
}

#[test]
fn multifd_over_unix_with_2_and_4_channels() {
    for channels in [2, 4] {
        let dir = TempDir::new(&format!("multifd-unix-{channels}"));
        let uri = format!("unix:{}", dir.join("mig.sock").display());
        migrate_completes(&dir, &uri, &uri, channels);
    }
}

#[test]
fn multifd_on_one_side_only_is_refused_and_the_source_runs_on() {
    // Source with multifd, destination without: the destination names the capability. A
    // destination without multifd stops listening once the main channel is in (as QEMU's), so
    // when it accepts that channel before the source opens its first multifd channel the
    // source fails at that connect instead, before it has written anything; either way the
    // migration fails with the reason named and the source runs on.
    let dir = TempDir::new("multifd-src-only");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut src = source(&dir, "src", true, 2);
    let mut dst = destination(&dir, "dst", &uri, false, 2);
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("failed", LONG);
    let info = migrate_info(&mut src);
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(
        why.contains("the multifd capability is off here")
            || why.contains("cannot open multifd channel 0: "),
        "{info}"
    );
    assert_eq!(dst.wait_exit(LONG), Some(1), "{}", dst.err.text());
    runs_on(&mut src);

    // Destination with multifd, source without.
    let uri = format!("unix:{}", dir.join("mig2.sock").display());
    let mut dst = destination(&dir, "dst2", &uri, true, 2);
    caps(&mut src, false, 2);
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("failed", LONG);
    let info = migrate_info(&mut src);
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(why.contains("the source does not use multifd"), "{info}");
    assert_eq!(dst.wait_exit(LONG), Some(1), "{}", dst.err.text());
    runs_on(&mut src);

    // Different channel counts.
    let uri = format!("unix:{}", dir.join("mig3.sock").display());
    let mut dst = destination(&dir, "dst3", &uri, true, 2);
    caps(&mut src, true, 3);
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("failed", LONG);
    let info = migrate_info(&mut src);
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(
        why.contains("the source uses 3 multifd channel(s), this side expects 2"),
        "{info}"
    );
    assert_eq!(dst.wait_exit(LONG), Some(1), "{}", dst.err.text());
    runs_on(&mut src);

    // Set alike, the same guest migrates.
    let uri = format!("unix:{}", dir.join("mig4.sock").display());
    let mut dst = destination(&dir, "dst4", &uri, true, 3);
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", LONG);
    runs_on(&mut dst);
}

#[test]
fn multifd_refuses_exec_fd_and_x_integrity() {
    let dir = TempDir::new("multifd-refusals");
    let mut src = source(&dir, "src", true, 2);
    let file = dir.join("vm.img");
    for uri in [format!("exec:cat > {}", file.display()), "fd:3".to_string()] {
        let err = src
            .qmp
            .execute("migrate", Some(json!({"uri": uri})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("multifd is not supported by current protocol"),
            "{uri}: {err}"
        );
    }
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-integrity", "state": true}]}),
    );
    let err = src
        .qmp
        .execute("migrate", Some(json!({"uri": "unix:/nonexistent"})))
        .unwrap_err()
        .to_string();
    assert!(err.contains("x-integrity does not cover"), "{err}");
    runs_on(&mut src);

    // The destination refuses exec: with multifd too, and can still take a socket.
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", "64M", "--incoming", "defer"]);
    caps(&mut dst, true, 2);
    let err = dst
        .qmp
        .execute(
            "migrate-incoming",
            Some(json!({"uri": format!("exec:cat {}", file.display())})),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("multifd is not supported by current protocol"),
        "{err}"
    );
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    dst.cmd("migrate-incoming", json!({"uri": uri}));
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-integrity", "state": false}]}),
    );
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", LONG);
    runs_on(&mut dst);
}

#[test]
fn a_multifd_channel_cut_mid_way_fails_and_the_source_runs_on() {
    let dir = TempDir::new("multifd-cut");
    let real = dir.join("real.sock");
    let via = dir.join("proxy.sock");
    let mut src = source(&dir, "src", true, 2);
    let mut dst = destination(&dir, "dst", &format!("unix:{}", real.display()), true, 2);
    // Past the handshake and the first SYNC packet, inside the first page packet.
    let _proxy = MultiProxy::start(&via, real, Some(64 * 1024));
    src.cmd("migrate", json!({"uri": format!("unix:{}", via.display())}));
    src.wait_migration("failed", LONG);
    let info = migrate_info(&mut src);
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(why.contains("multifd channel"), "{info}");
    assert_eq!(dst.wait_exit(LONG), Some(1), "{}", dst.err.text());
    assert!(
        dst.err.text().contains("multifd channel"),
        "{}",
        dst.err.text()
    );
    runs_on(&mut src);
    // Nothing was lost: the same guest migrates on without the proxy.
    let uri = format!("unix:{}", dir.join("again-mig.sock").display());
    let mut dst = destination(&dir, "again", &uri, true, 2);
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", LONG);
    runs_on(&mut dst);
}

#[test]
fn migrate_cancel_mid_way_with_multifd_leaves_the_source_running() {
    let dir = TempDir::new("multifd-cancel");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut src = source(&dir, "src", true, 4);
    // 1 MiB/s for all channels together: the 4 MiB working set alone takes seconds.
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    let mut dst = destination(&dir, "dst", &uri, true, 4);
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("active", LONG);
    // Some pages went over the channels before the cancel.
    let deadline = std::time::Instant::now() + LONG;
    while migrate_info(&mut src)["ram"]["multifd-bytes"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "no multifd bytes");
        std::thread::sleep(Duration::from_millis(20));
    }
    src.cmd("migrate_cancel", Value::Null);
    src.wait_migration("cancelled", LONG);
    assert_eq!(migrate_info(&mut src)["status"], "cancelled");
    assert_eq!(dst.wait_exit(LONG), Some(1), "{}", dst.err.text());
    runs_on(&mut src);
    // Nothing was lost: the same guest migrates on at full speed.
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    let uri = format!("unix:{}", dir.join("again-mig.sock").display());
    let mut dst = destination(&dir, "again", &uri, true, 4);
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", LONG);
    runs_on(&mut dst);
}
