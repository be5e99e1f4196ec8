//! virtio-blk request latency, hopvm and QEMU 7.2 side by side, printed rather than asserted.
//!
//! The `virtio-blk` test guest (its own polled driver, one request in flight) times 4 KiB reads,
//! 64 KiB writes and a flush with the ACPI PM timer, under `hopvm run --disk` and, when
//! installed, `qemu-system-x86_64 -M pc -enable-kvm -drive if=virtio` on the same raw image
//! (a tmpfs file). Each VMM runs RUNS times; the medians are printed with the ratio.
//!
//! Run with `cargo bench -p hopvm --bench virtio_blk`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::tools::qemu_guest_args;

const RUNS: usize = 5;
const REQUESTS: u32 = 200;
const DISK: u64 = 1 << 20;

/// Runs one VMM command line; returns "what" → ns/request.
fn run(program: &str, args: &[String]) -> BTreeMap<String, u64> {
    let out = Command::new("timeout")
        .arg("300")
        .arg(program)
        .args(args)
        .output()
        .expect("the VMM runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(", 0 failures"), "{program}: {text}");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("BENCH: ")?;
            let (what, ns) = rest.split_once(": ")?;
            Some((
                what.to_string(),
                ns.strip_suffix(" ns/request")?.parse().ok()?,
            ))
        })
        .collect()
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let image = guest_tests::image_path("virtio-blk").display().to_string();
    let dir = std::path::Path::new("/dev/shm");
    let disk = dir.join(format!("hopvm-bench-disk-{}.img", std::process::id()));
    std::fs::File::create(&disk).unwrap().set_len(DISK).unwrap();
    let disk_s = disk.display().to_string();
    let cmdline = format!("seed=1 disk={DISK} bench={REQUESTS}");
    let hopvm_args: Vec<String> = [
        "run",
        "--kernel",
        &image,
        "--memory",
        "64M",
        "--no-reboot",
        "--serial",
        "stdio",
        "--cmdline",
        &cmdline,
        "--disk",
        &disk_s,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut qemu_args = qemu_guest_args(&image, &cmdline);
    qemu_args.extend([
        String::from("-drive"),
        format!("file={disk_s},if=virtio,format=raw"),
    ]);
    let qemu = Command::new("qemu-system-x86_64")
        .arg("-version")
        .output()
        .is_ok();
    let collect = |program: &str, args: &[String]| {
        let mut all: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for _ in 0..RUNS {
            for (k, v) in run(program, args) {
                all.entry(k).or_default().push(v);
            }
        }
        all.into_iter()
            .map(|(k, v)| (k, median(v)))
            .collect::<BTreeMap<_, _>>()
    };
    let h = collect(env!("CARGO_BIN_EXE_hopvm"), &hopvm_args);
    let q = if qemu {
        collect("qemu-system-x86_64", &qemu_args)
    } else {
        BTreeMap::new()
    };
    let _ = std::fs::remove_file(&disk);
    println!("virtio-blk, one request in flight, {REQUESTS} requests, median of {RUNS} runs (µs/request):");
    println!(
        "{:<14} {:>10} {:>10} {:>8}",
        "request", "hopvm", "qemu-7.2", "ratio"
    );
    for (what, ns) in &h {
        match q.get(what) {
            Some(qns) => println!(
                "{what:<14} {:>10.1} {:>10.1} {:>7.2}×",
                *ns as f64 / 1000.0,
                *qns as f64 / 1000.0,
                *ns as f64 / *qns as f64
            ),
            None => println!(
                "{what:<14} {:>10.1} {:>10} {:>8}",
                *ns as f64 / 1000.0,
                "-",
                "-"
            ),
        }
    }
}
