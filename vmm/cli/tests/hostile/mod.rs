//! Hostile input, shared by the CI test (`tests/hostile_input.rs`, a few thousand cases) and
//! the long run (`benches/hostile_input.rs`): seeded, deterministic mutation loops over real
//! inputs, in-process, for
//!
//! - the stream loader: a stream captured from a real VM that ran the dirty guest (RAM with
//!   page, zero and XBZRLE records, every vCPU and device section), mutated and loaded into
//!   a second real VM, with and without `x-integrity`;
//! - the XBZRLE decoder: real deltas, mutated, and random bytes;
//! - every device-state restore: each section's JSON mutated in its structure (numbers to
//!   edge values, arrays grown and cut, fields dropped and added) and in its bytes; an
//!   accepted state must leave a device that still answers every port;
//! - the QMP input path: bytes to a real `QmpServer` socket (whatever parses them behind it).
//!
//! Every case must end without a panic, within a deadline (no hang), and without a heap
//! allocation larger than [`MAX_ALLOCATION`] (a hostile length field must not allocate
//! gigabytes): a counting global allocator records the largest request.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::BusDevice;
use migration::stream::StreamWriter;
use qmp::{Args, QmpBackend, QmpError, QmpServer};
use serde_json::{json, Map, Value};
use vmm::config::{SerialConfig, VmConfig};
use vmm::instance::Instance;
use vmm::vm::SharedWriter;

use super::common::{passes, Capture};

/// No single heap allocation of a case may be larger: the largest legitimate one is a
/// section's state (the RAM's page buffers and the 64 KiB pc-testdev window are far smaller).
pub const MAX_ALLOCATION: usize = 64 << 20;
/// A case that takes longer than this is a hang.
pub const CASE_DEADLINE: Duration = Duration::from_secs(20);

/// The global allocator: the system's, recording the largest single request.
pub struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is only a
// side effect.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` / `realloc` above, i.e. from the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as for `dealloc` and `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Resets the largest-allocation record.
pub fn reset_largest() {
    LARGEST.store(0, Ordering::Relaxed);
}

/// The largest allocation since [`reset_largest`].
pub fn largest() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

pub use super::common::rng::Rng;

/// One byte-level mutation of `data` (never empty for a non-empty input): bit flips, edge
/// values written over 1, 2, 4 or 8 bytes (length fields), cuts, deleted, repeated or inserted
/// runs. The result may equal the input.
pub fn mutate(data: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut d = data.to_vec();
    if d.is_empty() {
        return vec![rng.next() as u8];
    }
    let pos = rng.below(d.len());
    match rng.below(8) {
        0 | 1 => d[pos] ^= 1 << rng.below(8),
        2 => d[pos] = rng.next() as u8,
        3 => {
            let width = [1usize, 2, 4, 8][rng.below(4)];
            let v = rng.edge().to_be_bytes();
            for (i, b) in v[8 - width..].iter().enumerate() {
                if let Some(x) = d.get_mut(pos + i) {
                    *x = *b;
                }
            }
        }
        4 => d.truncate(pos),
        5 => {
            let len = rng.below(64.min(d.len() - pos)) + 1;
            d.drain(pos..pos + len);
        }
        6 => {
            let len = rng.below(256.min(d.len() - pos)) + 1;
            let run = d[pos..pos + len].to_vec();
            let at = rng.below(d.len());
            d.splice(at..at, run);
        }
        _ => {
            let n = rng.below(16) + 1;
            let at = rng.below(d.len() + 1);
            let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            d.splice(at..at, junk);
        }
    }
    d
}

/// Counts of one campaign.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Cases run.
    pub cases: u64,
    /// Cases whose input was refused with an error.
    pub rejected: u64,
    /// Cases whose input was accepted.
    pub accepted: u64,
    /// The slowest case.
    pub slowest: Duration,
    /// Its description (seed and case number, to replay it).
    pub slowest_case: String,
    /// The largest heap allocation of any case.
    pub largest_allocation: usize,
}

impl Counts {
    fn case(&mut self, start: Instant, accepted: bool, what: &str) {
        let took = start.elapsed();
        assert!(took < CASE_DEADLINE, "{what}: took {took:?}");
        let big = largest();
        assert!(
            big <= MAX_ALLOCATION,
            "{what}: a {big}-byte allocation (limit {MAX_ALLOCATION})"
        );
        self.cases += 1;
        if accepted {
            self.accepted += 1;
        } else {
            self.rejected += 1;
        }
        if took > self.slowest {
            self.slowest = took;
            self.slowest_case = what.to_string();
        }
        self.largest_allocation = self.largest_allocation.max(big);
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cases: {} rejected, {} accepted; slowest {:.1} ms ({}); largest allocation {} KiB",
            self.cases,
            self.rejected,
            self.accepted,
            self.slowest.as_secs_f64() * 1e3,
            self.slowest_case,
            self.largest_allocation >> 10
        )
    }
}

use vmm_sync::lock;

fn config(kernel: bool) -> VmConfig {
    let mut c = VmConfig::new(guest_tests::image_path("dirty"));
    if !kernel {
        c.kernel = None;
    }
    c.cmdline = String::from("ws=1");
    c.memory = 16 << 20;
    c.serial = SerialConfig::Null;
    c
}

/// Real streams and the VM to load them into.
pub struct Streams {
    /// QEMU's format.
    pub plain: Vec<u8>,
    /// The same VM state with `x-integrity`.
    pub integrity: Vec<u8>,
    /// The destination.
    pub dst: Arc<Instance>,
    _src: Arc<Instance>,
}

/// Writes `src`'s whole state as a stream: a first pass over RAM, then (with the guest run
/// between) passes of re-dirtied pages until some went as XBZRLE deltas (pages enter the cache
/// after the first pass, so from the third pass on), then the end.
fn capture(src: &Instance, out: &Capture, integrity: bool) -> Vec<u8> {
    let mut w = if integrity {
        StreamWriter::with_integrity(Vec::new())
    } else {
        StreamWriter::new(Vec::new())
    };
    lock(&src.migration.xbzrle).enabled = true;
    let xbzrle = || src.migration.ram.xbzrle_pages.load(Ordering::Relaxed);
    let before = xbzrle();
    {
        let mut reg = lock(&src.registry);
        reg.begin(&mut w).unwrap();
        while !reg.iterate(&mut w, u64::MAX).unwrap() {}
    }
    for round in 0.. {
        assert!(round < 20, "no XBZRLE records after {round} passes");
        let done = passes(&out.text());
        src.cont().unwrap();
        out.wait_for(Duration::from_secs(120), "another pass", |t| {
            passes(t) > done
        });
        src.stop();
        let mut reg = lock(&src.registry);
        reg.pending(u64::MAX);
        while !reg.iterate(&mut w, u64::MAX).unwrap() {}
        if round >= 1 && xbzrle() > before {
            break;
        }
    }
    let mut reg = lock(&src.registry);
    reg.complete(&mut w).unwrap();
    reg.cancel();
    w.into_inner()
}

impl Streams {
    /// Boots the dirty guest, captures its streams and builds the destination.
    pub fn new() -> Self {
        let out = Capture::default();
        let src = Instance::new(&config(true), SharedWriter::new(Box::new(out.clone()))).unwrap();
        src.cont().unwrap();
        out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);
        src.stop();
        let plain = capture(&src, &out, false);
        let integrity = capture(&src, &out, true);
        let dst = Instance::new(
            &config(false),
            SharedWriter::new(Box::new(Capture::default())),
        )
        .unwrap();
        // Both streams load as they are.
        for (stream, integrity) in [(&plain, false), (&integrity, true)] {
            dst.migration.set_integrity_enabled(integrity);
            dst.load(Box::new(std::io::Cursor::new(stream.clone())))
                .unwrap();
        }
        Self {
            plain,
            integrity,
            dst,
            _src: src,
        }
    }

    fn load(&self, bytes: Vec<u8>, integrity: bool) -> Result<(), vmm::instance::IncomingError> {
        self.dst.migration.set_integrity_enabled(integrity);
        self.dst.load(Box::new(std::io::Cursor::new(bytes)))
    }

    /// Loads `cases` mutations of the plain stream (each may load: a changed page byte is
    /// indistinguishable from a guest write).
    pub fn plain_campaign(&self, cases: u64, seed: u64) -> Counts {
        let mut counts = Counts::default();
        let mut rng = Rng::new(seed);
        for case in 0..cases {
            let bad = mutate(&self.plain, &mut rng);
            reset_largest();
            let start = Instant::now();
            let ok = self.load(bad, false).is_ok();
            let what = format!("plain stream, seed {seed} case {case}");
            if ok {
                // What loaded can be migrated on.
                if let Err(e) = lock(&self.dst.registry).save_snapshots() {
                    panic!("{what}: loaded, but cannot be saved again: {e}");
                }
            }
            counts.case(start, ok, &what);
        }
        counts
    }

    /// Loads `cases` mutations of the `x-integrity` stream: every one that differs from the
    /// stream (within its length: bytes after the final checksum are not read) is refused.
    pub fn integrity_campaign(&self, cases: u64, seed: u64) -> Counts {
        let mut counts = Counts::default();
        let mut rng = Rng::new(seed);
        let n = self.integrity.len();
        for case in 0..cases {
            let bad = mutate(&self.integrity, &mut rng);
            if bad.len() >= n && bad[..n] == self.integrity[..] {
                continue;
            }
            reset_largest();
            let start = Instant::now();
            let result = self.load(bad, true);
            let what = format!("x-integrity stream, seed {seed} case {case}");
            assert!(result.is_err(), "{what}: a changed stream loaded");
            counts.case(start, false, &what);
        }
        counts
    }

    /// Restores `cases` mutated device and vCPU states, one section at a time, through the
    /// registry; a rejected device state must leave the device as it was, an accepted one a
    /// device that still answers.
    pub fn device_campaign(&self, cases: u64, seed: u64) -> Counts {
        let mut counts = Counts::default();
        let mut rng = Rng::new(seed);
        // From the real state (an earlier campaign's last case may have left anything).
        self.load(self.plain.clone(), false).unwrap();
        let good = lock(&self.dst.registry).save_snapshots().unwrap();
        for case in 0..cases {
            let i = rng.below(good.len());
            let mut states = good.clone();
            states[i] = if rng.below(4) == 0 {
                mutate(&good[i], &mut rng)
            } else {
                mutate_json(&good[i], &mut rng)
            };
            let before = lock(&self.dst.registry).save_snapshots().unwrap();
            reset_largest();
            let start = Instant::now();
            let result = lock(&self.dst.registry).restore_snapshots(&states, &|_| true);
            let what = format!("device state {i}, seed {seed} case {case}");
            if result.is_err() {
                let after = lock(&self.dst.registry).save_snapshots().unwrap();
                // The vCPU and KVM sections may have been applied in part by KVM; the device
                // sections (JSON objects without KVM structs) must be unchanged.
                if is_device_state(&good[i]) && !is_clock(&good[i]) {
                    assert_eq!(after[i], before[i], "{what}: a refused state was applied");
                }
            }
            exercise_devices(&self.dst);
            if result.is_ok() {
                if let Err(e) = lock(&self.dst.registry).save_snapshots() {
                    panic!("{what}: restored, but cannot be saved again: {e}");
                }
            }
            counts.case(start, result.is_ok(), &what);
        }
        lock(&self.dst.registry)
            .restore_snapshots(&good, &|_| true)
            .unwrap();
        counts
    }
}

/// A device's state (not a vCPU's or the VM's KVM state).
fn is_device_state(state: &[u8]) -> bool {
    match serde_json::from_slice::<Value>(state) {
        Ok(Value::Object(m)) => !m.contains_key("regs") && !m.contains_key("pit"),
        _ => false,
    }
}

/// The PM timer's and the RTC's states change by themselves (they are clocks).
fn is_clock(state: &[u8]) -> bool {
    serde_json::from_slice::<Value>(state)
        .is_ok_and(|v| v.get("clock_ns").is_some() || v.get("offset_ns").is_some())
}

/// Changes one value somewhere in a JSON document, keeping it JSON.
pub fn mutate_json(data: &[u8], rng: &mut Rng) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
        return mutate(data, rng);
    };
    // Pick a node by walking down at random; `pointer` is its JSON pointer.
    let mut pointer = String::new();
    let mut at = &v;
    loop {
        let descend = rng.below(3) != 0;
        match at {
            Value::Object(m) if descend && !m.is_empty() => {
                let (k, next) = m.iter().nth(rng.below(m.len())).unwrap();
                pointer.push('/');
                pointer.push_str(&k.replace('~', "~0").replace('/', "~1"));
                at = next;
            }
            Value::Array(a) if descend && !a.is_empty() => {
                let k = rng.below(a.len());
                pointer.push_str(&format!("/{k}"));
                at = &a[k];
            }
            _ => break,
        }
    }
    let node = v.pointer_mut(&pointer).unwrap();
    match node {
        Value::Number(_) => {
            *node = match rng.below(4) {
                0 => json!(-(rng.edge() as i64)),
                1 => json!(rng.edge() as f64),
                _ => json!(rng.edge()),
            }
        }
        Value::Bool(b) => *b = !*b,
        Value::String(s) => match rng.below(3) {
            0 => s.clear(),
            1 => s.push_str(&"x".repeat(rng.below(300))),
            _ => *node = json!(rng.edge()),
        },
        Value::Array(a) => match rng.below(4) {
            0 => a.clear(),
            1 if !a.is_empty() => {
                let k = rng.below(a.len());
                a.truncate(k);
            }
            _ => {
                let fill = a.first().cloned().unwrap_or(json!(0));
                let n = [1, 16, 17, 129, 4097, 70_000][rng.below(6)];
                a.extend(std::iter::repeat_n(fill, n));
            }
        },
        Value::Object(m) => {
            if rng.below(2) == 0 && !m.is_empty() {
                let k = m.keys().nth(rng.below(m.len())).cloned().unwrap();
                m.remove(&k);
            } else {
                m.insert(String::from("unknown_field"), json!(1));
            }
        }
        Value::Null => *node = json!(rng.edge()),
    }
    serde_json::to_vec(&v).unwrap()
}

/// Every port of every device, read at each width, and a few writes: a restored state must
/// leave devices that work.
fn exercise_devices(vm: &Instance) {
    let d = &vm.vm.devices;
    fn poke(dev: &mut dyn BusDevice, len: u64) {
        for off in 0..len {
            for width in [1usize, 2, 4] {
                let mut b = vec![0u8; width];
                dev.read(off, &mut b);
            }
        }
    }
    poke(&mut *lock(&d.serial), 8);
    poke(&mut *lock(&d.i8042), 5);
    poke(&mut *lock(&d.cmos), 2);
    poke(&mut *lock(&d.pci_host), 8);
    poke(&mut *lock(&d.fw_cfg), 2);
    poke(&mut *lock(&d.testdev_ports), 12);
    poke(&mut *lock(&d.testdev_irq), 24);
    poke(&mut *lock(&d.testdev_mmio), 64);
    poke(&mut *lock(&d.acpi_pm), 6);
    poke(&mut *lock(&d.pm_timer), 4);
    poke(&mut *lock(&d.port92), 1);
    // Writes that move state along: serial THR and FCR, an i8042 command, a CMOS index.
    let _ = lock(&d.serial).write(0, b"x");
    let _ = lock(&d.serial).write(2, &[0xc7]);
    let _ = lock(&d.i8042).write(4, &[0x20]);
    let _ = lock(&d.cmos).write(0, &[0x0c]);
    let mut b = [0u8];
    lock(&d.cmos).read(1, &mut b);
}

/// `cases` mutated real XBZRLE deltas and random buffers through the decoder.
pub fn xbzrle_campaign(cases: u64, seed: u64) -> Counts {
    use migration::xbzrle::{decode, encode};
    let mut counts = Counts::default();
    let mut rng = Rng::new(seed);
    let page = 4096;
    let old: Vec<u8> = (0..page).map(|i| (i * 7 % 251) as u8).collect();
    let mut deltas = Vec::new();
    for k in 0..16 {
        let mut new = old.clone();
        for _ in 0..=k * 8 {
            let at = rng.below(page);
            new[at] = rng.next() as u8;
        }
        deltas.push(encode(&old, &new, page).expect("a small delta"));
    }
    for case in 0..cases {
        let input = match rng.below(3) {
            0 => (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
            _ => mutate(&deltas[rng.below(deltas.len())], &mut rng),
        };
        let mut target = old.clone();
        reset_largest();
        let start = Instant::now();
        let result = decode(&input, &mut target);
        if let Ok(n) = result {
            assert!(n <= page, "xbzrle case {case}: decoded {n} bytes");
        }
        counts.case(
            start,
            result.is_ok(),
            &format!("xbzrle seed {seed} case {case}"),
        );
    }
    counts
}

/// A backend with a handful of commands that parse their arguments as the real ones do.
struct Fake;

impl QmpBackend for Fake {
    fn execute(&self, command: &str, arguments: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(arguments);
        let reply = match command {
            "query-status" => json!({"status": "running", "running": true, "singlestep": false}),
            "migrate" => {
                json!({"uri": a.required_str("uri")?, "detach": a.optional_bool("detach")?})
            }
            "migrate-set-parameters" => {
                json!({"bw": a.optional_u64("max-bandwidth")?, "dl": a.optional_u64("downtime-limit")?})
            }
            "migrate-set-capabilities" => {
                let list = a.required_array("capabilities")?;
                for mut cap in list.objects()? {
                    cap.required_enum("capability", &["xbzrle", "events", "x-integrity"])?;
                    cap.required_bool("state")?;
                    cap.finish()?;
                }
                Value::Null
            }
            _ => return Err(QmpError::command_not_found(command)),
        };
        a.finish()?;
        Ok(reply)
    }

    fn has_command(&self, command: &str) -> bool {
        matches!(
            command,
            "query-status" | "migrate" | "migrate-set-parameters" | "migrate-set-capabilities"
        )
    }
}

/// Real requests, as management tools send them (QEMU 7.2 / libvirt 9.0 shapes).
const QMP_SEEDS: &[&str] = &[
    "{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-status\", \"id\": \"libvirt-1\"}\n",
    "{\"execute\":\"qmp_capabilities\",\"id\":1}\r\n{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":[{\"capability\":\"xbzrle\",\"state\":true},{\"capability\":\"events\",\"state\":false}]},\"id\":2}\r\n",
    "{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"migrate\", \"arguments\": {\"uri\": \"tcp:10.0.0.2:4444\", \"detach\": true}, \"id\": {\"n\": [1, 2.5e3, -0, null, true]}}\n",
    "{'execute': 'qmp_capabilities'}{'execute': 'migrate-set-parameters', 'arguments': {'max-bandwidth': 33554432, 'downtime-limit': 300}}\n{\"execute\": \"query-status\", \"arguments\": {}, \"id\": \"\\u00e9\\ud83d\\ude00\\n\"}",
];

/// Hostile inputs that random mutation would rarely produce.
fn qmp_special(k: usize) -> Vec<u8> {
    match k {
        0 => "[".repeat(1 << 20).into_bytes(),
        1 => "{\"a\":".repeat(200_000).into_bytes(),
        2 => {
            let mut v = b"{\"execute\":\"".to_vec();
            v.extend(std::iter::repeat_n(b'x', 20 << 20));
            v
        }
        3 => vec![0xff; 1 << 16],
        4 => "\"\\u".repeat(100_000).into_bytes(),
        5 => format!(
            "{{\"execute\":\"query-status\",\"id\":{}}}\n",
            "9".repeat(100_000)
        )
        .into_bytes(),
        _ => b"\x00{\"execute\":\"qmp_capabilities\"}\x00".to_vec(),
    }
}

/// Number of [`qmp_special`] inputs.
pub const QMP_SPECIALS: u64 = 7;

/// A QMP server on a socket in `dir`, for [`qmp_campaign`].
pub fn qmp_server(dir: &Path) -> QmpServer {
    QmpServer::listen(dir.join("hostile.sock"), Arc::new(Fake)).unwrap()
}

/// Sends `input` on a fresh connection, then ends it, and reads every reply to the end (the
/// server must close its side: no hang). Returns the replies.
fn qmp_send(path: &Path, input: &[u8]) -> std::io::Result<String> {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(CASE_DEADLINE)).unwrap();
    let reader = s.try_clone().unwrap();
    let writer_input = input.to_vec();
    let mut w = s.try_clone().unwrap();
    // Written on a thread: the server may stop reading (queue full) while replies wait.
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&writer_input);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut out = String::new();
    let mut r = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => out.push_str(&String::from_utf8_lossy(&buf)),
            Err(e) => return Err(e),
        }
    }
    writer.join().unwrap();
    drop(s);
    Ok(out)
}

/// `cases` mutated QMP conversations through the server; after each, a clean client is
/// answered at once.
pub fn qmp_campaign(server: &QmpServer, cases: u64, seed: u64) -> Counts {
    let path = server.socket_path().unwrap().to_path_buf();
    let mut counts = Counts::default();
    let mut rng = Rng::new(seed);
    for case in 0..cases {
        let input = if case < QMP_SPECIALS {
            qmp_special(case as usize)
        } else {
            let mut m = QMP_SEEDS[rng.below(QMP_SEEDS.len())].as_bytes().to_vec();
            for _ in 0..rng.below(4) + 1 {
                m = mutate(&m, &mut rng);
            }
            m
        };
        reset_largest();
        let start = Instant::now();
        let what = format!("qmp seed {seed} case {case}");
        let replies = qmp_send(&path, &input).unwrap_or_else(|e| {
            panic!(
                "{what}: {e}; input {:?}",
                String::from_utf8_lossy(&input[..input.len().min(300)])
            )
        });
        assert!(
            replies.starts_with("{\"QMP\":"),
            "{what}: no greeting: {replies}"
        );
        // Every reply line is JSON.
        for line in replies.lines() {
            assert!(
                serde_json::from_str::<Value>(line).is_ok(),
                "{what}: reply is not json: {line}"
            );
        }
        let accepted = !replies.contains("\"error\"");
        // The monitor still works.
        let check = qmp_send(
            &path,
            b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\",\"id\":7}\n",
        )
        .unwrap_or_else(|e| panic!("{what}: then a clean client: {e}"));
        let answered = check.lines().any(|l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["id"] == 7 && v["return"]["running"] == true)
        });
        assert!(answered, "{what}: then {check}");
        // Both connections are gone from the server (no client leaks).
        let deadline = Instant::now() + CASE_DEADLINE;
        while server.client_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "{what}: {} clients still connected; input {:?}",
                server.client_count(),
                String::from_utf8_lossy(&input[..input.len().min(300)])
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        counts.case(start, accepted, &what);
    }
    counts
}
