//! virtio-blk end to end: the `virtio-blk` test guest drives hopvm's virtio-blk-pci with a
//! driver of its own (PCI enumeration, virtio 1.x negotiation, one queue, MSI-X), writing a
//! pattern over the whole disk and reading it back; the host then checks the image file. The
//! same guest runs under QEMU 7.2 when it is installed, to hold the device to QEMU's.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::proc::{spawn_plain, TempDir};
use common::tools::qemu_guest_args;

const DISK: usize = 1 << 20;

/// The guest's pattern word at disk byte offset `off`.
fn pattern(off: usize, seed: u32) -> u32 {
    (off as u32).wrapping_mul(2_654_435_761) ^ seed
}

fn pattern_image(seed: u32) -> Vec<u8> {
    (0..DISK)
        .step_by(4)
        .flat_map(|o| pattern(o, seed).to_le_bytes())
        .collect()
}

fn seed() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.subsec_nanos() ^ std::process::id()
}

fn image() -> String {
    guest_tests::image_path("virtio-blk").display().to_string()
}

/// Runs the guest under hopvm with `disk_arg`; returns (exit code, stdout).
fn run_guest(cmdline: &str, disk_arg: &str) -> (Option<i32>, String) {
    let kernel = image();
    let (mut child, out, err) = spawn_plain(&[
        "--kernel",
        &kernel,
        "--memory",
        "64M",
        "--no-reboot",
        "--cmdline",
        cmdline,
        "--disk",
        disk_arg,
    ]);
    out.wait_for(Duration::from_secs(120), "the guest's summary", |t| {
        t.contains("SUMMARY:")
    });
    let status = child.wait().unwrap();
    let text = out.text();
    assert!(!err.text().contains("panicked"), "{}", err.text());
    (status.code(), text)
}

fn assert_passed(text: &str) {
    assert!(
        text.contains(", 0 failures") && !text.contains("FAIL"),
        "guest failed:\n{text}"
    );
}

#[test]
fn guest_writes_the_whole_disk_and_the_host_reads_it() {
    let dir = TempDir::new("virtio-blk-rw");
    let disk = dir.join("disk.img");
    // Garbage first, so a device that writes nothing cannot pass.
    std::fs::write(&disk, vec![0xa5u8; DISK]).unwrap();
    let seed = seed();
    let (code, text) = run_guest(
        &format!("seed={seed} disk={DISK}"),
        &format!("{},serial=hopvm-test", disk.display()),
    );
    assert_passed(&text);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("PASS: get-id: 'hopvm-test'"), "{text}");
    assert!(text.contains("PASS: MSI-X: "), "{text}");
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(data.len(), DISK);
    let want = pattern_image(seed);
    let first_bad = data.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "image differs from the guest's pattern");
}

#[test]
fn read_only_disk_is_read_but_never_written() {
    let dir = TempDir::new("virtio-blk-ro");
    let disk = dir.join("disk.img");
    let seed = seed();
    let content = pattern_image(seed);
    std::fs::write(&disk, &content).unwrap();
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o444)).unwrap();
    let (code, text) = run_guest(
        &format!("seed={seed} disk={DISK} readonly"),
        &format!("{},readonly=on", disk.display()),
    );
    assert_passed(&text);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("PASS: write to a read-only disk: IOERR"),
        "{text}"
    );
    assert!(
        text.contains("PASS: read back and verified 1024 KiB"),
        "{text}"
    );
    assert!(std::fs::read(&disk).unwrap() == content, "image changed");
}

fn hopvm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hopvm"))
        .args(args)
        .output()
        .expect("hopvm runs")
}

#[test]
fn bad_disks_are_clear_errors() {
    let dir = TempDir::new("virtio-blk-bad");
    let kernel = image();
    let ro = dir.join("ro.img");
    std::fs::write(&ro, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let tiny = dir.join("tiny.img");
    std::fs::write(&tiny, [0u8; 100]).unwrap();
    let missing = dir.join("missing.img");
    let check = |disk: &Path, code: i32, words: &str| {
        let arg = disk.display().to_string();
        let o = hopvm(&[
            "run", "--kernel", &kernel, "--serial", "null", "--disk", &arg,
        ]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(code), "{arg}: {err}");
        assert_eq!(err.lines().count(), 1, "{arg}: {err}");
        assert!(err.contains(words), "{arg}: {err}");
    };
    check(&missing, 1, "cannot open disk image");
    check(&ro, 1, "is read-only: add readonly=on");
    check(&tiny, 1, "smaller than one sector");
    check(&dir.0, 1, "not a regular file");
    for bad in [
        format!("{},readonly=maybe", ro.display()),
        format!("{},cache=none", ro.display()),
        String::from(",readonly=on"),
    ] {
        let o = hopvm(&["run", "--kernel", &kernel, "--disk", &bad]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert_eq!(err.lines().count(), 1, "{bad}: {err}");
    }
    // The QEMU front end: a drive on another interface is refused (status 1, as QEMU's).
    let o = hopvm(&[
        "qemu",
        "-kernel",
        &kernel,
        "-drive",
        &format!("file={},if=ide", ro.display()),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("if=ide"), "{err}");
}

/// The same guest under QEMU 7.2's virtio-blk-pci (`-drive if=virtio`), as the reference for
/// the device's behaviour. Does nothing when qemu-system-x86_64 is not installed.
#[test]
fn same_guest_under_qemu() {
    if !common::tools::qemu_installed() {
        eprintln!("qemu-system-x86_64 not installed: skipped");
        return;
    }
    let dir = TempDir::new("virtio-blk-qemu");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0xa5u8; DISK]).unwrap();
    let seed = seed();
    let o = Command::new("timeout")
        .args([
            "300",
            "qemu-system-x86_64",
            "-M",
            "pc",
            "-cpu",
            "qemu64",
            "-enable-kvm",
        ])
        .args([
            "-m",
            "64",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel",
            &image(),
        ])
        .args(["-append", &format!("seed={seed} disk={DISK}")])
        .args([
            "-drive",
            &format!("file={},if=virtio,format=raw", disk.display()),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_passed(&text);
    assert_eq!(o.status.code(), Some(1), "{text}");
    let data = std::fs::read(&disk).unwrap();
    assert!(
        data == pattern_image(seed),
        "qemu's image differs from the pattern"
    );
}

/// QEMU's `-blockdev` + `-device virtio-blk-pci,drive=…,addr=…` (libvirt's form), through
/// hopvm's QEMU front end and, when installed, QEMU 7.2 itself with the same options.
#[test]
fn blockdev_and_device_as_libvirt_writes_them() {
    let dir = TempDir::new("virtio-blk-blockdev");
    let disk = dir.join("disk.img");
    let seed = seed();
    let blockdev = format!(
        r#"{{"driver":"file","filename":"{}","node-name":"s0","auto-read-only":true,"discard":"unmap"}}"#,
        disk.display()
    );
    let args = |kernel: &str| -> Vec<String> {
        let mut args = qemu_guest_args(kernel, &format!("seed={seed} disk={DISK}"));
        args.extend(
            [
                "-blockdev",
                &blockdev,
                "-blockdev",
                r#"{"node-name":"f0","read-only":false,"driver":"raw","file":"s0"}"#,
                "-device",
                r#"{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x5","drive":"f0","id":"virtio-disk0"}"#,
            ]
            .map(String::from),
        );
        args
    };
    let mut vmms = vec![(
        env!("CARGO_BIN_EXE_hopvm").to_string(),
        vec![String::from("qemu")],
    )];
    if common::tools::qemu_installed() {
        vmms.push((String::from("qemu-system-x86_64"), Vec::new()));
    }
    for (program, prefix) in vmms {
        std::fs::write(&disk, vec![0xa5u8; DISK]).unwrap();
        let o = Command::new("timeout")
            .arg("300")
            .arg(&program)
            .args(&prefix)
            .args(args(&image()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_passed(&text);
        assert!(
            text.contains(" at 00.5, interrupt line 10"),
            "{program}: {text}"
        );
        assert_eq!(o.status.code(), Some(1), "{program}: {text}");
        assert!(
            std::fs::read(&disk).unwrap() == pattern_image(seed),
            "{program}: image"
        );
    }
}

/// A destination built without the source's disk refuses the stream's `virtio-blk` section:
/// the migration fails and the source's guest goes on, as it was.
#[test]
fn migration_to_a_destination_without_the_disk_fails_cleanly() {
    use common::proc::Hopvm;
    use serde_json::json;
    let long = Duration::from_secs(60);
    let dir = TempDir::new("virtio-blk-nodisk");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; DISK]).unwrap();
    let kernel = image();
    let disk_arg = disk.display().to_string();
    let cmdline = format!("seed=7 disk={DISK} migrate");
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
            &disk_arg,
        ],
    );
    src.out.wait_for(long, "the write phase", |t| {
        t.contains("Now migrate the VM")
    });
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", "64M", "--incoming", &uri]);
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    src.cmd("migrate", json!({"uri": uri}));
    src.wait_migration("failed", long);
    assert_eq!(src.status(), "running");
    let code = dst.wait_exit(long);
    assert_eq!(code, Some(1), "destination: {}", dst.err.text());
    assert!(dst.err.text().contains("virtio-blk"), "{}", dst.err.text());
    assert!(!src.out.text().contains("FAIL"), "{}", src.out.text());
}
