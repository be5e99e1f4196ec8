//! Boots Debian's stock cloud kernel with an initramfs and waits for its
//! `Memory: …K available` line — on this machine's slow instruction emulator the kernel gets
//! there in about 20–30 s (on real hardware it boots fully).
//!
//! The kernel comes from `resources/fetch-kernel.sh` (run by `resources/test.sh` and CI); the
//! initramfs from `resources/make-initramfs.sh`. Both the bzImage (unpacked on the host by
//! hopvm) and the uncompressed vmlinux are booted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn resources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../resources")
}

fn kernel(name: &str) -> PathBuf {
    let path = resources().join("kernels").join(name);
    assert!(
        path.exists(),
        "{} is missing: run resources/fetch-kernel.sh first",
        path.display()
    );
    path
}

fn initramfs() -> PathBuf {
    let out = std::env::temp_dir().join(format!("hopvm-initramfs-{}.cpio", std::process::id()));
    let status = Command::new("bash")
        .arg(resources().join("make-initramfs.sh"))
        .arg(&out)
        .status()
        .expect("make-initramfs.sh runs");
    assert!(status.success(), "make-initramfs.sh failed");
    out
}

/// Boots `kernel` and returns the kernel's `Memory:` line, or panics with the console log.
fn boot_until_memory_line(kernel: &Path) -> String {
    let initrd = initramfs();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hopvm"))
        .args(["run", "--memory", "512M", "--no-reboot", "--cmdline"])
        .arg("console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 nokaslr")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(&initrd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hopvm starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut log = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains("Memory: ") && line.contains("K available");
                log.push(line);
                if hit {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let output = child.wait_with_output().expect("hopvm ends");
    let _ = std::fs::remove_file(&initrd);
    assert!(
        found,
        "no Memory: line from {}\nconsole:\n{}\nstderr:\n{}",
        kernel.display(),
        log.join("\n"),
        String::from_utf8_lossy(&output.stderr)
    );
    // The kernel saw the initrd hopvm placed and the E820 map it wrote.
    let console = log.join("\n");
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        "{console}"
    );
    assert!(console.contains("RAMDISK: [mem"), "{console}");
    log.pop().unwrap()
}

#[test]
fn debian_bzimage_boots_to_memory_line() {
    let line = boot_until_memory_line(&kernel("vmlinuz"));
    println!("{line}");
}

#[test]
fn debian_vmlinux_boots_to_memory_line() {
    let path = resources().join("kernels/vmlinux");
    if !path.exists() {
        // fetch-kernel.sh only extracts vmlinux when a decompressor for the payload is there;
        // make it here from the bzImage with hopvm's own decompression instead of skipping.
        let bz = std::fs::read(kernel("vmlinuz")).unwrap();
        let elf = vmm::loader::decompress_bzimage(&bz).expect("bzImage payload unpacks");
        std::fs::write(&path, elf).unwrap();
    }
    let line = boot_until_memory_line(&path);
    println!("{line}");
}
