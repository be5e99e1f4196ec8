//! Live migration with KVM's dirty ring (`--dirty-ring N`) instead of the dirty bitmap: a
//! busy self-verifying guest (the `dirty` guest checks every word it wrote before rewriting
//! it) migrated with a ring so small that the vCPUs stop on a full ring
//! (`KVM_EXIT_DIRTY_RING_FULL`) — asserted from the migration profile — and must run on at
//! the destination without printing CORRUPT. Also: a cancelled migration and a second try, a
//! second hop, two vCPUs with XBZRLE, and bad option values.
//!
//! On a host whose KVM is known to overrun rings (kvm_pvm's batch emulation,
//! `vmm::dirty_ring::host_ring_unsafe`) hopvm refuses the ring: the migration tests are
//! skipped there, and the refusal is tested instead.

mod common;

use std::time::Duration;

use common::passes;
use common::proc::{Hopvm, TempDir};
use serde_json::{json, Value};

const MEMORY: &str = "64M";
const LONG: Duration = Duration::from_secs(180);
/// The smallest ring KVM takes here: 256 entries, of which KVM keeps 64 in reserve, so a
/// vCPU that writes 192 new pages between two reaps stops on a full ring.
const SMALL_RING: &str = "256";

/// Whether this host gives hopvm a dirty ring (it has one, and is not known to overrun it).
fn host_has_ring() -> bool {
    vmm::dirty_ring::host_offers_ring() && vmm::dirty_ring::host_ring_unsafe().is_none()
}

/// Starts a hopvm with the migration profile on (it reports the ring-full exits).
fn spawn(dir: &TempDir, name: &str, args: &[&str]) -> Hopvm {
    Hopvm::spawn_with(&dir.0, name, args, |c| {
        c.env("HOPVM_MIGRATION_PROFILE", "1");
    })
}

/// MIGRATION events on, just before `vm` migrates out (on earlier, a destination's own
/// `completed` would still wait in the monitor's queue).
fn events_on(vm: &mut Hopvm) {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
}

/// The dirty guest on `cpus` vCPUs with the small ring, once it has verified a first pass;
/// `None` (the test is skipped) where this host has no ring hopvm can trust.
fn ring_source(dir: &TempDir, cpus: &str) -> Option<Hopvm> {
    if !host_has_ring() {
        eprintln!("skipped: this host's kvm has no dirty ring hopvm can trust");
        return None;
    }
    let kernel = guest_tests::image_path("dirty").display().to_string();
    let args = [
        "--kernel",
        &kernel,
        "--memory",
        MEMORY,
        "--cmdline",
        "ws=8",
        "--cpus",
        cpus,
        "--dirty-ring",
        SMALL_RING,
    ];
    let src = spawn(dir, "src", &args);
    src.out
        .wait_for(LONG, "the first pass on the source", |t| passes(t) >= 1);
    Some(src)
}

fn destination(dir: &TempDir, name: &str, cpus: &str) -> (Hopvm, String) {
    let sock = dir.join(&format!("{name}.mig"));
    let uri = format!("unix:{}", sock.display());
    let vm = spawn(
        dir,
        name,
        &[
            "--memory",
            MEMORY,
            "--cpus",
            cpus,
            "--dirty-ring",
            SMALL_RING,
            "--incoming",
            &uri,
        ],
    );
    (vm, uri)
}

/// The dirty-ring-full exits the last source profile line reports.
fn ring_full_exits(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains("migration profile (source"))
        .unwrap_or_else(|| panic!("no source profile: {stderr}"));
    let before = line
        .split(" dirty-ring-full exits")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no ring-full count: {line}"));
    before.parse().unwrap_or_else(|_| panic!("{line}"))
}

/// Migrates `src` to `dst` at full speed and checks the guest lives on intact there, the
/// ring having filled at least once on the source.
fn migrate_and_verify(src: &mut Hopvm, dst: &mut Hopvm, uri: &str) {
    events_on(src);
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", LONG);
    assert_eq!(src.status(), "postmigrate");
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["ram"]["remaining"], 0, "{info}");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap() >= 2,
        "{info}"
    );
    src.err.wait_for_lines(LONG, "the source's profile", |t| {
        t.contains("migration profile (source")
    });
    let full = ring_full_exits(&src.err.text());
    assert!(full > 0, "the ring never filled: {}", src.err.text());
    let before = passes(&dst.out.text());
    dst.out
        .wait_for(LONG, "two passes on the destination", |t| {
            passes(t) >= before + 2
        });
    assert_eq!(dst.status(), "running");
    for vm in [&*src, &*dst] {
        assert!(!vm.out.text().contains("CORRUPT"), "{}", vm.out.text());
    }
}

/// One vCPU: a migration cancelled mid-way (the guest runs on, intact), a second try that
/// completes, then a second hop from the destination (whose own ring starts logging then).
#[test]
fn small_ring_cancel_remigrate_and_second_hop() {
    let dir = TempDir::new("dirty-ring-hops");
    let Some(mut src) = ring_source(&dir, "1") else {
        return;
    };

    // Throttled so that it cannot finish, then cancelled.
    let (dst0, uri0) = destination(&dir, "dst0", "1");
    events_on(&mut src);
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 4 << 20}));
    src.cmd("migrate", json!({"uri": uri0}));
    src.wait_migration("active", LONG);
    src.cmd("migrate_cancel", Value::Null);
    src.wait_migration("cancelled", LONG);
    assert_eq!(src.status(), "running");
    drop(dst0);
    let before = passes(&src.out.text());
    src.out
        .wait_for(LONG, "two more passes after the cancel", |t| {
            passes(t) >= before + 2 || t.contains("CORRUPT")
        });
    assert!(
        passes(&src.out.text()) >= before + 2,
        "{}\nstderr: {}",
        src.out.text(),
        src.err.text()
    );

    let (mut dst1, uri1) = destination(&dir, "dst1", "1");
    migrate_and_verify(&mut src, &mut dst1, &uri1);
    let (mut dst2, uri2) = destination(&dir, "dst2", "1");
    migrate_and_verify(&mut dst1, &mut dst2, &uri2);
}

/// Two vCPUs (each with its own ring) and XBZRLE.
#[test]
fn small_ring_two_vcpus_xbzrle() {
    let dir = TempDir::new("dirty-ring-smp");
    let Some(mut src) = ring_source(&dir, "2") else {
        return;
    };
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "xbzrle", "state": true}]}),
    );
    let (mut dst, uri) = destination(&dir, "dst", "2");
    migrate_and_verify(&mut src, &mut dst, &uri);
    let info = src.cmd("query-migrate", Value::Null);
    assert!(info.get("xbzrle-cache").is_some(), "{info}");
}

/// Paused, the vCPUs write nothing: the ring stays empty, and the migration still carries
/// every page; resumed on the destination, the guest verifies them.
#[test]
fn small_ring_paused_source() {
    let dir = TempDir::new("dirty-ring-paused");
    let Some(mut src) = ring_source(&dir, "1") else {
        return;
    };
    src.cmd("stop", Value::Null);
    src.cmd("cont", Value::Null);
    let before = passes(&src.out.text());
    src.out
        .wait_for(LONG, "a pass after cont", |t| passes(t) > before);
    src.cmd("stop", Value::Null);
    let (mut dst, uri) = destination(&dir, "dst", "1");
    events_on(&mut src);
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("completed", LONG);
    if dst.status() != "running" {
        dst.cmd("cont", Value::Null);
    }
    let before = passes(&dst.out.text());
    dst.out
        .wait_for(LONG, "two passes on the destination", |t| {
            passes(t) >= before + 2
        });
    assert!(!dst.out.text().contains("CORRUPT"), "{}", dst.out.text());
}

/// Bad sizes are usage errors (exit status 2) naming the value and the rule.
#[test]
fn bad_ring_sizes_are_usage_errors() {
    let kernel = guest_tests::image_path("hello").display().to_string();
    for bad in ["1000", "0", "128", "131072", "big", ""] {
        let (code, _, err) = common::tools::run(
            &["run", "--kernel", &kernel, "--dirty-ring", bad],
            Duration::from_secs(30),
        );
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(
            err.contains(&format!("invalid dirty ring size '{bad}'"))
                && err.contains("power of two"),
            "{bad}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // QEMU's spelling, through the QEMU front end: QEMU's exit status 1.
    let (code, _, err) = common::tools::run(
        &[
            "qemu",
            "-kernel",
            &kernel,
            "-accel",
            "kvm,dirty-ring-size=1000",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("invalid dirty ring size '1000'"), "{err}");
}

/// On a host whose KVM is known to overrun rings, asking for one is refused before anything
/// starts (exit status 2), naming the reason; `auto` quietly takes the bitmap there.
#[test]
fn ring_refused_where_kvm_overruns_it() {
    let Some(why) = vmm::dirty_ring::host_ring_unsafe() else {
        eprintln!("skipped: this host's kvm keeps the ring's limit");
        return;
    };
    if !vmm::dirty_ring::host_offers_ring() {
        eprintln!("skipped: this host's kvm has no dirty ring");
        return;
    }
    let kernel = guest_tests::image_path("hello").display().to_string();
    let (code, _, err) = common::tools::run(
        &["run", "--kernel", &kernel, "--dirty-ring", "4096"],
        Duration::from_secs(30),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("can overrun it and lose dirty pages") && err.contains(&why),
        "{err}"
    );
    // `auto` runs the guest, with the bitmap.
    let (code, out, err) = common::tools::run(
        &[
            "run",
            "--kernel",
            &kernel,
            "--dirty-ring",
            "auto",
            "--serial",
            "stdio",
        ],
        Duration::from_secs(60),
    );
    assert!(
        out.contains("Hello from a hopvm test guest"),
        "{code} {out} {err}"
    );
}
