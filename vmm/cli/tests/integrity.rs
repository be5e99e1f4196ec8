//! The `x-integrity` capability with real VMs: a snapshot to a file (`exec:`) with checksums
//! loads and runs; the same file with one changed byte — in a page of guest code, in the
//! serial port's state — is refused with a message naming the section (and, for RAM, the
//! pages), and the destination never runs the guest. A live migration with the capability
//! on both ends completes with the guest intact.

mod common;

use std::path::Path;
use std::time::Duration;

use common::passes;
use common::proc::{Hopvm, TempDir};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(180);

fn integrity_on(vm: &mut Hopvm) {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "events", "state": true},
            {"capability": "x-integrity", "state": true}
        ]}),
    );
}

/// A destination that loads `file` with x-integrity on (or off), QEMU's way: `-incoming
/// defer`, capabilities, then `migrate-incoming`.
fn load(dir: &TempDir, name: &str, file: &Path, integrity: bool) -> Hopvm {
    let mut dst = Hopvm::spawn(&dir.0, name, &["--memory", "32M", "--incoming", "defer"]);
    if integrity {
        integrity_on(&mut dst);
    }
    let caps = dst.cmd("query-migrate-capabilities", Value::Null);
    assert!(
        caps.as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == "x-integrity" && c["state"] == integrity),
        "{caps}"
    );
    dst.cmd(
        "migrate-incoming",
        json!({"uri": format!("exec:cat {}", file.display())}),
    );
    dst
}

/// The destination refuses the stream: exits with status 1 and says why on stderr, and the
/// guest never ran (no line of its output).
fn assert_refused(mut dst: Hopvm, what: &str, want: &[&str]) -> String {
    let code = dst.wait_exit(LONG);
    // The process has ended; its last stderr line may still be in the pipe.
    dst.err.wait_for(LONG, "the reason on stderr", |t| {
        t.contains("incoming migration failed")
    });
    let err = dst.err.text();
    assert_eq!(code, Some(1), "{what}: stderr {err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    for w in want {
        assert!(err.contains(w), "{what}: {w:?} not in {err}");
    }
    assert!(dst.out.text().is_empty(), "{what}: the guest ran");
    err
}

/// The self-verifying dirty guest, 32 MiB, working set `ws` MiB, after its first pass.
fn dirty_source(dir: &TempDir, ws: &str) -> Hopvm {
    let kernel = guest_tests::image_path("dirty").display().to_string();
    let ws = format!("ws={ws}");
    let args = ["--kernel", &kernel, "--memory", "32M", "--cmdline", &ws];
    let src = Hopvm::spawn(&dir.0, "src", &args);
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    src
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn snapshot_with_integrity_loads_and_every_change_is_refused() {
    let dir = TempDir::new("integrity");
    let mut src = dirty_source(&dir, "1");
    integrity_on(&mut src);
    let file = dir.join("vm.img");
    src.save_to_file(&file, LONG);
    let stream = std::fs::read(&file).unwrap();
    assert_eq!(&stream[..8], b"QEVM\0\0\0\x03");

    // Intact: loads and runs on.
    let mut good = load(&dir, "good", &file, true);
    good.out
        .wait_for(LONG, "passes after loading", |t| passes(t) >= 2);
    assert_eq!(good.status(), "running");
    assert!(!good.out.text().contains("CORRUPT"), "{}", good.out.text());
    drop(good);

    // The same stream to a destination without the capability: refused, and told why.
    assert_refused(
        load(&dir, "nocap", &file, false),
        "capability off",
        &["enable the x-integrity capability on this side too"],
    );

    // A byte of guest code (a page the guest never writes) changed.
    let image = std::fs::read(guest_tests::image_path("dirty")).unwrap();
    let code = &image[0x1000..0x1040];
    let at = find(&stream, code).expect("guest code in the stream") + 0x20;
    let mut bad = stream.clone();
    bad[at] ^= 0x01;
    let path = dir.join("code.img");
    std::fs::write(&path, &bad).unwrap();
    assert_refused(
        load(&dir, "code", &path, true),
        "guest code",
        &["x-integrity checksum mismatch in section ram (instance 0), guest-physical pages 0x"],
    );

    // The serial port's scratch register: a state the device accepts, so without the
    // capability this would load silently.
    let serial = find(&stream, b"\x06serial").expect("serial section");
    let scr = serial + find(&stream[serial..], b"\"scr\":").unwrap() + 6;
    let mut bad = stream.clone();
    bad[scr] = if bad[scr] == b'7' { b'6' } else { b'7' };
    let path = dir.join("serial.img");
    std::fs::write(&path, &bad).unwrap();
    assert_refused(
        load(&dir, "serial", &path, true),
        "serial state",
        &["x-integrity checksum mismatch in section serial (instance 0)"],
    );

    // Cut before the final checksum.
    let path = dir.join("cut.img");
    std::fs::write(&path, &stream[..stream.len() - 5]).unwrap();
    assert_refused(
        load(&dir, "cut", &path, true),
        "truncated",
        &["truncated stream"],
    );
}

#[test]
fn live_migration_with_integrity() {
    let dir = TempDir::new("integrity-live");
    let mut src = dirty_source(&dir, "2");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", "32M", "--incoming", "defer"]);
    integrity_on(&mut dst);
    dst.cmd("migrate-incoming", json!({ "uri": uri }));
    integrity_on(&mut src);
    // Unthrottled, with room to converge on a loaded machine; the RAM still goes in many
    // parts (one per ~50 ms batch) over several passes.
    src.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 0, "downtime-limit": 300}),
    );
    src.cmd("migrate", json!({ "uri": uri }));
    // Polled, so that a failure shows query-migrate's reason rather than a timeout.
    let deadline = std::time::Instant::now() + LONG;
    let info = loop {
        let info = src.cmd("query-migrate", Value::Null);
        if !matches!(info["status"].as_str(), Some("setup" | "active" | "device")) {
            break info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no end: {info}; stderr {}",
            src.err.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        info["status"],
        "completed",
        "{info}; dst stderr {}",
        dst.err.text()
    );
    dst.out
        .wait_for(LONG, "passes on the destination", |t| passes(t) >= 2);
    assert_eq!(dst.status(), "running");
    assert!(!dst.out.text().contains("CORRUPT"), "{}", dst.out.text());
}
