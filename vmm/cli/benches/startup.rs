//! Start-up benchmarks, printed rather than asserted:
//!
//! * time from spawning `hopvm run` to the guest's first serial byte (QEMU `-M microvm` needs
//!   about 43 ms on the reference machine);
//! * hopvm's own resident memory beyond the guest RAM the guest touched.
//!
//! Run with `cargo bench -p hopvm --bench startup`.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 30;

fn hopvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hopvm"))
}

/// A minimal Multiboot ELF32 image whose first instructions print "H" on COM1 and exit through
/// isa-debug-exit: the guest's own start-up costs nothing, so the time measured is hopvm's.
fn first_byte_image() -> std::path::PathBuf {
    const BASE: u32 = 0x10_0000;
    let mut body = Vec::new();
    for v in [0x1bad_b002u32, 0, 0u32.wrapping_sub(0x1bad_b002)] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'H', // mov al, 'H'
        0xee, // out dx, al
        0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
        0x31, 0xc0, // xor eax, eax
        0xef, // out dx, eax
        0xf4, // hlt
    ]);
    let mut elf = vec![0u8; 52];
    elf[..7].copy_from_slice(b"\x7fELF\x01\x01\x01");
    elf[16] = 2; // ET_EXEC
    elf[18] = 3; // EM_386
    elf[20] = 1; // EV_CURRENT
    elf[24..28].copy_from_slice(&(BASE + 12).to_le_bytes()); // entry: after the header
    elf[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
    elf[40..42].copy_from_slice(&52u16.to_le_bytes()); // ehsize
    elf[42..44].copy_from_slice(&32u16.to_le_bytes()); // phentsize
    elf[44..46].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let len = body.len() as u32;
    for v in [1u32, 84, BASE, BASE, len, len, 5, 4] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&body);
    let path = std::env::temp_dir().join(format!("hopvm-first-byte-{}.elf", std::process::id()));
    std::fs::write(&path, elf).expect("temp dir writable");
    path
}

fn first_byte_latency(image: &std::path::Path) -> Duration {
    let start = Instant::now();
    let mut child = hopvm()
        .args(["run", "--serial", "stdio", "--kernel"])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("hopvm starts");
    let mut byte = [0u8; 1];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut byte)
        .expect("the guest prints");
    let elapsed = start.elapsed();
    let _ = child.wait();
    elapsed
}

/// Resident memory in KiB, from /proc/PID/smaps.
#[derive(Default)]
struct Rss {
    total: u64,
    guest: u64,
    /// Anonymous (private) memory outside guest RAM: hopvm's heap, stacks, data.
    own_anon: u64,
}

fn rss_kib(pid: u32, guest_bytes: u64) -> Rss {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps readable");
    let mut r = Rss::default();
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let (key, kib) = match (words.next(), words.next()) {
            (Some(k), Some(v)) => (k, v.parse::<u64>().unwrap_or(0)),
            _ => continue,
        };
        match key {
            "Size:" => in_guest = kib * 1024 == guest_bytes,
            "Rss:" if in_guest => {
                r.total += kib;
                r.guest += kib;
            }
            "Rss:" => r.total += kib,
            "Anonymous:" if !in_guest => r.own_anon += kib,
            _ => {}
        }
    }
    r
}

fn main() {
    let image = first_byte_image();
    let mut runs: Vec<Duration> = (0..RUNS).map(|_| first_byte_latency(&image)).collect();
    let _ = std::fs::remove_file(&image);
    runs.sort();
    println!(
        "process start → first serial byte ({RUNS} runs): min {:.2} ms, median {:.2} ms, max {:.2} ms",
        runs[0].as_secs_f64() * 1e3,
        runs[RUNS / 2].as_secs_f64() * 1e3,
        runs[RUNS - 1].as_secs_f64() * 1e3
    );

    let memory: u64 = 256 << 20;
    let mut child = hopvm()
        .args(["run", "--memory", "256M", "--cmdline", "ws=4", "--kernel"])
        .arg(guest_tests::image_path("dirty"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("hopvm starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Measure once the guest has written its whole working set at least once.
    for line in lines.by_ref() {
        if line.expect("guest output").starts_with("pass ") {
            break;
        }
    }
    let r = rss_kib(child.id(), memory);
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "resident memory: {} KiB in all, {} KiB of it guest RAM the guest touched, {} KiB \
         hopvm's own: {} KiB private (heap, stacks, data) + {} KiB of shared program text",
        r.total,
        r.guest,
        r.total - r.guest,
        r.own_anon,
        r.total - r.guest - r.own_anon
    );
}
