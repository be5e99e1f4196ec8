//! Block migration (`migrate` with `blk: true`), hopvm and QEMU 7.2 side by side, printed rather
//! than asserted.
//!
//! An idle `virtio-blk` test guest (writer mode with `span=0`: it writes nothing) with a DISK-byte
//! raw image of non-zero data on tmpfs is migrated over a Unix socket into a destination started
//! on an empty image of the same size, with QEMU's command line for both VMMs (`-drive
//! if=virtio`), `max-bandwidth` 128 MiB/s (QEMU's default) then 10 GiB/s (no limit) and
//! `downtime-limit` 300 ms; the images are compared afterwards and the MiB that differ printed
//! (QEMU 7.2 completes with most of the image missing at 10 GiB/s). Each VMM runs RUNS times;
//! the medians of `total-time` and `downtime` from `query-migrate` are printed, with the ratio
//! where both copied the image whole. QEMU's part is skipped when qemu-system-x86_64 is not
//! installed.
//!
//! Run with `cargo bench -p hopvm --bench block_migration`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::tools::qemu_guest_args;
use qmp::client::QmpClient;
use serde_json::{json, Value};

const RUNS: usize = 3;
const DISK: u64 = 256 << 20;
const LONG: Duration = Duration::from_secs(300);

struct Vm {
    child: Child,
    qmp: QmpClient,
    out: common::Capture,
}

impl Vm {
    fn spawn(program: &str, prefix: &[&str], args: &[String], sock: &Path) -> Self {
        let mut child = Command::new(program)
            .args(prefix)
            .args(args)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the VMM starts");
        let out = common::Capture::default();
        common::proc::pump(child.stdout.take().unwrap(), out.clone());
        let qmp = match QmpClient::connect_retry(sock, Duration::from_secs(30)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                panic!("{program}: no monitor: {e}");
            }
        };
        Self { child, qmp, out }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.qmp
            .execute(name, (!args.is_null()).then_some(args))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..DISK >> 20 {
        for w in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
}

/// One migration at `bandwidth` bytes/s; returns total-time and downtime in ms, and how many
/// MiB of the destination's image differ from the source's.
fn once(
    program: &str,
    prefix: &[&str],
    dir: &Path,
    run: usize,
    bandwidth: u64,
) -> (u64, u64, usize) {
    let image = guest_tests::image_path("virtio-blk").display().to_string();
    let (a, b): (PathBuf, PathBuf) = (dir.join("src.img"), dir.join("dst.img"));
    fill(&a);
    std::fs::File::create(&b).unwrap().set_len(DISK).unwrap();
    let drive = |p: &Path| format!("file={},if=virtio,format=raw", p.display());
    let append = format!("disk={DISK} writer span=0");
    let mut src_args = qemu_guest_args(&image, &append);
    src_args.extend(["-drive".to_string(), drive(&a)]);
    let mut dst_args = qemu_guest_args(&image, &append);
    dst_args.extend([
        "-drive".to_string(),
        drive(&b),
        "-incoming".into(),
        "defer".into(),
    ]);
    let mut src = Vm::spawn(
        program,
        prefix,
        &src_args,
        &dir.join(format!("src{run}.qmp")),
    );
    let mut dst = Vm::spawn(
        program,
        prefix,
        &dst_args,
        &dir.join(format!("dst{run}.qmp")),
    );
    let uri = format!("unix:{}", dir.join(format!("mig{run}.sock")).display());
    for vm in [&mut src, &mut dst] {
        vm.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
        vm.cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": bandwidth, "downtime-limit": 300}),
        );
    }
    dst.cmd("migrate-incoming", json!({ "uri": uri }));
    // Booted (QEMU's option ROM reads the command line from fw_cfg while it boots).
    src.out
        .wait_for(LONG, "the idle guest", |t| t.contains("Now migrate"));
    src.cmd("migrate", json!({"uri": uri, "blk": true}));
    let want = json!("completed");
    if let Err(e) = src.qmp.wait_event("MIGRATION", LONG, |d| {
        d["status"] == want || d["status"] == "failed"
    }) {
        panic!("{program}: {e}");
    }
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["status"], "completed", "{program}: {info}");
    // QEMU's source completes once its stream is sent: the destination may still be loading.
    if let Err(e) = dst
        .qmp
        .wait_event("MIGRATION", LONG, |d| d["status"] == want)
    {
        panic!("{program}: destination: {e}");
    }
    let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let differ = x
        .chunks(1 << 20)
        .zip(y.chunks(1 << 20))
        .filter(|(p, q)| p != q)
        .count();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    // QEMU computes the times just after it announces `completed`: ask again.
    let info = src.cmd("query-migrate", Value::Null);
    (
        info["total-time"].as_u64().unwrap_or(0),
        info["downtime"].as_u64().unwrap_or(0),
        differ,
    )
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let dir = PathBuf::from(format!(
        "/dev/shm/hopvm-bench-blkmig-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut vmms: Vec<(&str, String, Vec<&str>)> = vec![(
        "hopvm",
        env!("CARGO_BIN_EXE_hopvm").to_string(),
        vec!["qemu"],
    )];
    if Command::new("qemu-system-x86_64")
        .arg("-version")
        .output()
        .is_ok()
    {
        vmms.push(("QEMU 7.2", "qemu-system-x86_64".to_string(), Vec::new()));
    } else {
        eprintln!("qemu-system-x86_64 not installed: hopvm only");
    }
    println!(
        "block migration of an idle guest with a {} MiB disk (blk: true, unix socket, medians of {RUNS}):",
        DISK >> 20
    );
    println!("| max-bandwidth | VMM | total time | downtime | image MiB differing |");
    println!("|---|---|---|---|---|");
    for (label, bandwidth) in [
        ("128 MiB/s (QEMU's default)", 128u64 << 20),
        ("10 GiB/s", 10 << 30),
    ] {
        let mut results = Vec::new();
        for (name, program, prefix) in &vmms {
            let runs: Vec<(u64, u64, usize)> = (0..RUNS)
                .map(|r| once(program, prefix, &dir, r, bandwidth))
                .collect();
            eprintln!("{name} at {label}: runs {runs:?}");
            let total = median(runs.iter().map(|r| r.0).collect());
            let down = median(runs.iter().map(|r| r.1).collect());
            let differ = runs.iter().map(|r| r.2).max().unwrap_or(0);
            assert!(*name != "hopvm" || differ == 0, "hopvm: the images differ");
            println!("| {label} | {name} | {total} ms | {down} ms | {differ} |");
            results.push((total, down, differ));
        }
        if let [(ht, hd, 0), (qt, qd, 0)] = results[..] {
            println!(
                "ratio hopvm / QEMU at {label}: total {:.2}×, downtime {:.2}×",
                ht as f64 / qt.max(1) as f64,
                hd as f64 / qd.max(1) as f64
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
