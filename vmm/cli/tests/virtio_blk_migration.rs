//! Live migration of a guest whose disk writes are in flight, with shared storage and with
//! block migration (`blk`, `inc`): the `virtio-blk` guest in `writer` mode keeps writing
//! whole blocks in a pseudo-random order, each naming its block and generation, while the
//! migration runs; after the switchover (a key on the destination's COM1) it reads back every
//! block it wrote, so a lost or repeated request shows. With block migration the destination
//! starts on an empty image and both images are compared byte for byte afterwards.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::proc::{Hopvm, TempDir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(120);

fn image() -> String {
    guest_tests::image_path("virtio-blk").display().to_string()
}

/// The source: the writer guest on `disk` (`size` bytes), waiting for the migration.
fn source(dir: &TempDir, disk: &Path, size: u64, span: u64) -> Hopvm {
    let cmdline = format!("seed=0x5eed disk={size} writer span={span}");
    let disk = disk.display().to_string();
    let kernel = image();
    let mut src = Hopvm::spawn(
        &dir.0,
        "src",
        &[
            "--kernel",
            &kernel,
            "--memory",
            "64M",
            "--cmdline",
            &cmdline,
            "--disk",
            &disk,
        ],
    );
    src.out
        .wait_for(LONG, "the writer", |t| t.contains("Now migrate the VM"));
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    src
}

/// A destination listening on `uri`, with `disk_args` (`--disk …`), its stdin a pipe for
/// the key; it stays paused once loaded (`--paused`, QEMU's `-S`), so that its image can be
/// compared with the source's before the guest writes again.
fn destination(dir: &TempDir, name: &str, uri: &str, disk_args: &[&str]) -> Hopvm {
    let mut args = vec!["--memory", "64M", "--paused", "--incoming", uri];
    args.extend_from_slice(disk_args);
    let mut dst = Hopvm::spawn_with(&dir.0, name, &args, |c| {
        c.stdin(Stdio::piped());
    });
    // Its MIGRATION events (the stream starts only when the source is told to migrate).
    dst.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    dst
}

fn writes(text: &str) -> usize {
    text.matches("writer: ").count()
}

/// Migrates `src` to `uri` with `args` (`blk` / `inc`) while the guest writes: the migration
/// cannot converge (64 KiB/s, 1 ms downtime limit: any page the running guest dirties is too
/// much) until the guest has written at least 32 more blocks after it became active; then
/// it may. Returns `query-migrate`'s reply from while it was held (QEMU, and hopvm, show
/// `disk` only while the migration runs).
fn migrate_while_writing(src: &mut Hopvm, uri: &str, extra: Value) -> Value {
    src.cmd(
        "migrate-set-parameters",
        json!({"downtime-limit": 1, "max-bandwidth": 65536}),
    );
    let mut args = json!({"uri": uri});
    if let (Value::Object(a), Value::Object(e)) = (&mut args, extra) {
        a.extend(e);
    }
    src.cmd("migrate", args);
    src.wait_migration("active", LONG);
    let before = writes(&src.out.text());
    src.out.wait_for(LONG, "writes during the migration", |t| {
        writes(t) >= before + 2
    });
    let during = src.cmd("query-migrate", Value::Null);
    assert_eq!(during["status"], "active", "{during}");
    src.cmd(
        "migrate-set-parameters",
        json!({"downtime-limit": 10_000, "max-bandwidth": 0}),
    );
    src.wait_migration("completed", LONG);
    let after = src.cmd("query-migrate", Value::Null);
    assert!(after["disk"].is_null(), "no disk once completed: {after}");
    during
}

/// Waits until the destination has loaded the stream (its images written): it stays paused.
fn loaded(dst: &mut Hopvm) {
    dst.wait_migration("completed", LONG);
    assert_eq!(dst.status(), "paused");
}

/// Resumes the loaded destination's guest, sends it the key and checks its verdict.
fn verify_on(dst: &mut Hopvm) -> String {
    dst.cmd("cont", Value::Null);
    let mut stdin = dst.child.stdin.take().expect("piped stdin");
    stdin.write_all(b"\n").unwrap();
    dst.out.wait_for(LONG, "the guest's summary", |t| {
        t.split_once("SUMMARY:")
            .is_some_and(|(_, rest)| rest.contains('\n'))
    });
    let text = dst.out.text();
    eprintln!("destination's guest:\n{text}");
    assert!(
        text.contains(", 0 failures") && !text.contains("FAIL"),
        "guest failed on the destination:\n{text}\nstderr: {}",
        dst.err.text()
    );
    assert!(text.contains("PASS: writer: verified "), "{text}");
    text
}

fn sparse(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

#[test]
fn shared_storage_live_migration_with_writes_in_flight() {
    let dir = TempDir::new("blkmig-shared");
    let disk = dir.join("disk.img");
    sparse(&disk, 4 * MIB);
    let mut src = source(&dir, &disk, 4 * MIB, 4 * MIB);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let d = disk.display().to_string();
    let mut dst = destination(&dir, "dst", &uri, &["--disk", &d]);
    let during = migrate_while_writing(&mut src, &uri, json!({}));
    loaded(&mut dst);
    // Shared storage: no `disk` statistics, no block section.
    assert!(during["disk"].is_null(), "{during}");
    verify_on(&mut dst);
}

#[test]
fn block_migration_into_an_empty_image() {
    let dir = TempDir::new("blkmig-blk");
    let (a, b) = (dir.join("src.img"), dir.join("dst.img"));
    let size = 4 * MIB;
    // Data the guest never writes over (its span is the first 3 MiB) must arrive too.
    sparse(&a, size);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        f.write_all_at(&vec![0x5au8; 300_000], 3 * MIB + 4096)
            .unwrap();
    }
    sparse(&b, size);
    let mut src = source(&dir, &a, size, 3 * MIB);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let d = b.display().to_string();
    let mut dst = destination(&dir, "dst", &uri, &["--disk", &d]);
    let info = migrate_while_writing(&mut src, &uri, json!({"blk": true}));
    loaded(&mut dst);
    let disk = &info["disk"];
    assert_eq!(disk["total"], json!(size), "{info}");
    assert!(
        disk["transferred"].as_u64().unwrap() + disk["remaining"].as_u64().unwrap() >= size,
        "{info}"
    );
    eprintln!("block migration, while held: {disk}");
    // The source's guest is stopped for good: both images are final.
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "the images differ"
    );
    verify_on(&mut dst);
    // `blk` lasted one migration.
    let caps = src.cmd("query-migrate-capabilities", Value::Null);
    assert!(
        caps.as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == "block" && c["state"] == false),
        "{caps}"
    );
}

/// Offsets of `path` holding data, per MiB (`SEEK_DATA`).
fn allocated_mib(path: &Path, size: u64) -> Vec<u64> {
    let f = std::fs::File::open(path).unwrap();
    (0..size / MIB)
        .filter(|m| {
            migration::block::next_data(&f, m * MIB, size).is_some_and(|o| o < (m + 1) * MIB)
        })
        .collect()
}

#[test]
fn incremental_block_migration_keeps_holes() {
    let dir = TempDir::new("blkmig-inc");
    let (a, b) = (dir.join("src.img"), dir.join("dst.img"));
    let size = 8 * MIB;
    sparse(&a, size);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        f.write_all_at(&vec![0x77u8; 100_000], 5 * MIB + 512)
            .unwrap();
    }
    sparse(&b, size);
    let holes_before = allocated_mib(&a, size);
    let mut src = source(&dir, &a, size, 2 * MIB);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    // The `block` capability and the `block-incremental` parameter, QEMU 7.2's other way to
    // ask for `inc`.
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "block", "state": true}]}),
    );
    src.cmd("migrate-set-parameters", json!({"block-incremental": true}));
    let d = b.display().to_string();
    let mut dst = destination(&dir, "dst", &uri, &["--disk", &d]);
    let info = migrate_while_writing(&mut src, &uri, json!({}));
    loaded(&mut dst);
    eprintln!("incremental block migration, while held: {}", info["disk"]);
    assert_eq!(info["disk"]["total"], json!(size), "{info}");
    let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let diff: Vec<usize> = (0..x.len()).filter(|&i| x[i] != y[i]).collect();
    assert!(
        diff.is_empty(),
        "the images differ at {} bytes, from {:?} to {:?}",
        diff.len(),
        diff.first(),
        diff.last()
    );
    let (src_alloc, dst_alloc) = (allocated_mib(&a, size), allocated_mib(&b, size));
    if !holes_before.is_empty() && !holes_before.contains(&0) {
        // The file system keeps holes: whatever the source has as a hole the destination
        // has too (the guest wrote only the first 2 MiB, the host 5 MiB on).
        assert!(
            dst_alloc.iter().all(|m| src_alloc.contains(m)),
            "destination allocated {dst_alloc:?}, source {src_alloc:?}"
        );
        for m in [3, 4, 6, 7] {
            assert!(
                !dst_alloc.contains(&m),
                "MiB {m} of the destination is allocated"
            );
        }
        assert!(dst_alloc.contains(&5), "{dst_alloc:?}");
    }
    verify_on(&mut dst);
}

#[test]
fn bad_block_migrations_fail_cleanly_and_the_source_runs_on() {
    let dir = TempDir::new("blkmig-bad");
    let a = dir.join("src.img");
    let size = 2 * MIB;
    sparse(&a, size);
    let mut src = source(&dir, &a, size, size);
    let small = dir.join("small.img");
    sparse(&small, MIB);
    let ro = dir.join("ro.img");
    sparse(&ro, size);
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let small_arg = small.display().to_string();
    let ro_arg = format!("{},readonly=on", ro.display());
    let cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "small",
            vec!["--disk", &small_arg],
            "needs images of the same size",
        ),
        ("nodisk", vec![], "but this VM has no disk"),
        ("ro", vec!["--disk", &ro_arg], "cannot write the image"),
    ];
    for (name, disk_args, words) in cases {
        let uri = format!("unix:{}", dir.join(&format!("{name}-mig.sock")).display());
        let mut dst = destination(&dir, name, &uri, &disk_args);
        let before = writes(&src.out.text());
        src.cmd("migrate", json!({"uri": uri, "blk": true}));
        src.wait_migration("failed", LONG);
        let info = src.cmd("query-migrate", Value::Null);
        let desc = info["error-desc"].as_str().unwrap_or_default().to_string();
        assert!(desc.contains(words), "{name}: {info}");
        assert_eq!(src.status(), "running", "{name}");
        assert_eq!(dst.wait_exit(LONG), Some(1), "{name}: {}", dst.err.text());
        let err = dst.err.text();
        assert!(err.contains(words), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        // The source's guest goes on writing.
        src.out
            .wait_for(LONG, "more writes", |t| writes(t) > before + 1);
    }
    // Bad arguments.
    let e = src
        .qmp
        .execute(
            "migrate",
            Some(json!({"uri": "unix:/nonexistent", "blk": "yes"})),
        )
        .unwrap_err();
    assert!(e.to_string().contains("blk"), "{e}");
    assert!(!src.out.text().contains("FAIL"), "{}", src.out.text());
    assert!(!src.err.text().contains("panicked"), "{}", src.err.text());
}

/// `hopvm migrate -i`: the tool asks for `inc`, shows the disks, and the copy is whole.
#[test]
fn the_migrate_tool_copies_the_disks_with_i() {
    let dir = TempDir::new("blkmig-tool");
    let (a, b) = (dir.join("src.img"), dir.join("dst.img"));
    let size = 4 * MIB;
    sparse(&a, size);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        f.write_all_at(&vec![0x33u8; 70_000], MIB + 512).unwrap();
    }
    sparse(&b, size);
    // An idle guest (span=0 writes nothing).
    let _src = source(&dir, &a, size, 0);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let d = b.display().to_string();
    let mut dst = destination(&dir, "dst", &uri, &["--disk", &d]);
    let qmp = format!("unix:{}", dir.join("src.sock").display());
    let (code, out, err) = common::tools::run(&["migrate", "--qmp", &qmp, "-i", &uri], LONG);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Migration completed"), "{out}");
    loaded(&mut dst);
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "the images differ"
    );
    verify_on(&mut dst);
}
