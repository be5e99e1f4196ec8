//! Live migration benchmark, hopvm against QEMU 7.2 in the same run, printed rather than
//! asserted.
//!
//! Every scenario boots the same Multiboot guest in two processes of one VMM (source and
//! `-incoming defer` destination, both with QEMU's command line: `-M pc -cpu qemu64
//! -accel kvm`), drives them with the same QMP commands (`events` capability, `max-bandwidth`
//! 10 GiB/s — no limit —, `downtime-limit` 30 ms, `migrate-incoming` / `migrate` on loopback
//! TCP) and reads the result from `query-migrate` and the events. Downtime is what the guest
//! sees: the source's STOP event to the destination's RESUME event (both QMP timestamps).
//! Scenarios:
//!
//! * busy 1 GiB / 256 MiB and busy 256 MiB / 64 MiB: the `stride` guest writes one word into
//!   every page of its working set, pass after pass, verifying the previous value;
//! * idle 1 GiB: the `idle` guest (halted);
//! * stopped 1 GiB: `stride ws=max` fills every page of RAM above the image, the source is
//!   `stop`ped, then migrated: the stream alone; the destination is `cont`inued afterwards;
//! * the busy ones again with the dirty-page source named on both VMMs (`-accel
//!   kvm,dirty-ring-size=N`): KVM's dirty bitmap (0) and KVM's dirty ring of 4096 entries
//!   (`busy-1g-bitmap`, `busy-1g-ring`, `busy-256m-bitmap`, `busy-256m-ring`);
//! * the `…-mfd2` / `…-mfd4` scenarios: the busy and stopped ones with the `multifd`
//!   capability and 2 or 4 `multifd-channels` set on both sides before `migrate-incoming`.
//!
//! Correctness first: after every stride run the destination must print two more verified
//! passes (each reads every page of the working set) and never `CORRUPT`; a run that does not
//! is reported as failed. The idle guest has nothing to verify; its destination must run.
//!
//! Each VMM also runs every scenario over TLS (rows `hopvm+tls`, `qemu-7.2+tls`): certificates
//! made for the run, `-object tls-creds-x509` on both sides (the destination verifies the
//! source's client certificate), `tls-creds` on both and `tls-hostname localhost` on the
//! source; `× QEMU` compares with QEMU's plain migration.
//!
//! Run with `cargo bench -p hopvm --bench migration`. Environment: `HOPVM_BENCH_RUNS` (default
//! 3) runs of every scenario, reported as median and range; `HOPVM_BENCH_ONLY=busy-1g,idle`
//! picks scenarios by key; `HOPVM_BENCH_TLS=0` skips the TLS rows, `HOPVM_BENCH_TLS=only` runs
//! them alone, `HOPVM_BENCH_TLS=hopvm` runs hopvm's but not QEMU's (which take minutes a run
//! here for the busy guests); `HOPVM_BENCH_QEMU=0` skips QEMU (it is skipped anyway when
//! `qemu-system-x86_64` is not installed); `HOPVM_MIGRATION_PROFILE=1` has hopvm print where
//! each side's time went (`migration::ram::RamProfile`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::proc::{pump, TempDir};
use common::Capture;
use qmp::client::QmpClient;
use serde_json::{json, Value};

/// How long a migration may take before it is called non-converging and cancelled.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// Which VMM runs a scenario.
#[derive(Clone)]
struct Vmm {
    name: &'static str,
    program: PathBuf,
    prefix: Vec<&'static str>,
    /// TLS credentials: a directory with `src/` (client) and `dst/` (server) inside.
    tls: Option<PathBuf>,
}

struct Scenario {
    key: &'static str,
    label: &'static str,
    image: &'static str,
    memory: &'static str,
    append: &'static str,
    /// `stop` the source before `migrate`.
    stopped: bool,
    /// The guest prints `pass N ok` lines to verify.
    verifying: bool,
    /// Serial line prefix that says the guest is ready to be migrated.
    ready: &'static str,
    /// `max-bandwidth`, bytes/s.
    bandwidth: u64,
    /// The `auto-converge` capability.
    auto_converge: bool,
    /// How long before the migration is called non-converging and cancelled.
    timeout: Duration,
    /// `-accel kvm,dirty-ring-size=N` on both sides: 0 KVM's dirty bitmap, N a ring of N
    /// entries per vCPU; `None` leaves each VMM's default.
    dirty_ring: Option<u32>,
    /// `multifd-channels` with the `multifd` capability on both sides (0: off).
    multifd: u8,
}

/// The dirty ring the ring rows use (hopvm's `auto`).
const RING: u32 = 4096;

/// No limit, as far as this machine goes.
const UNLIMITED: u64 = 10 << 30;

/// The busy guest: the self-verifying page-stride writer over a quarter of 1 GiB, migrated
/// unthrottled with each VMM's own dirty-page source and one channel.
const BUSY_1G: Scenario = Scenario {
    key: "busy-1g",
    label: "busy 1 GiB, 256 MiB page-stride",
    image: "stride",
    memory: "1G",
    append: "ws=256M",
    stopped: false,
    verifying: true,
    ready: "pass 1 ok",
    bandwidth: UNLIMITED,
    auto_converge: false,
    timeout: MIGRATION_TIMEOUT,
    dirty_ring: None,
    multifd: 0,
};

/// The same guest with a quarter of 256 MiB.
const BUSY_256M: Scenario = Scenario {
    key: "busy-256m",
    label: "busy 256 MiB, 64 MiB page-stride",
    memory: "256M",
    append: "ws=64M",
    ..BUSY_1G
};

/// Every page of 1 GiB written once, then the guest stopped before `migrate`.
const STOPPED: Scenario = Scenario {
    key: "stopped",
    label: "stopped 1 GiB, every page non-zero",
    append: "ws=max",
    stopped: true,
    ready: "fill ok",
    ..BUSY_1G
};

const SCENARIOS: &[Scenario] = &[
    BUSY_1G,
    BUSY_256M,
    Scenario {
        key: "idle",
        label: "idle 1 GiB",
        image: "idle",
        append: "",
        verifying: false,
        ready: "idle",
        ..BUSY_1G
    },
    STOPPED,
    // A link slower than the guest's dirtying (≈ 600 MiB/s here): without auto-converge no
    // pass ever gets small enough; with it, the vCPUs are throttled until one does.
    Scenario {
        key: "limited",
        label: "busy 1 GiB / 256 MiB, 256 MiB/s link, no auto-converge",
        bandwidth: 256 << 20,
        timeout: Duration::from_secs(30),
        ..BUSY_1G
    },
    Scenario {
        key: "converge",
        label: "busy 1 GiB / 256 MiB, 256 MiB/s link, auto-converge",
        bandwidth: 256 << 20,
        auto_converge: true,
        ..BUSY_1G
    },
    // The busy rows again with each dirty-page source named: KVM's dirty bitmap, and KVM's
    // dirty ring (hopvm's `--dirty-ring`, QEMU's `-accel kvm,dirty-ring-size=N`).
    Scenario {
        key: "busy-1g-bitmap",
        label: "busy 1 GiB, 256 MiB page-stride, dirty bitmap",
        dirty_ring: Some(0),
        ..BUSY_1G
    },
    Scenario {
        key: "busy-1g-ring",
        label: "busy 1 GiB, 256 MiB page-stride, dirty ring 4096",
        dirty_ring: Some(RING),
        ..BUSY_1G
    },
    Scenario {
        key: "busy-256m-bitmap",
        label: "busy 256 MiB, 64 MiB page-stride, dirty bitmap",
        dirty_ring: Some(0),
        ..BUSY_256M
    },
    Scenario {
        key: "busy-256m-ring",
        label: "busy 256 MiB, 64 MiB page-stride, dirty ring 4096",
        dirty_ring: Some(RING),
        ..BUSY_256M
    },
    // The same busy and stopped guests with the RAM over 2 and 4 multifd channels.
    Scenario {
        key: "busy-1g-mfd2",
        label: "busy 1 GiB, 256 MiB page-stride, multifd 2",
        multifd: 2,
        ..BUSY_1G
    },
    Scenario {
        key: "busy-1g-mfd4",
        label: "busy 1 GiB, 256 MiB page-stride, multifd 4",
        multifd: 4,
        ..BUSY_1G
    },
    Scenario {
        key: "stopped-mfd2",
        label: "stopped 1 GiB, every page non-zero, multifd 2",
        multifd: 2,
        ..STOPPED
    },
    Scenario {
        key: "stopped-mfd4",
        label: "stopped 1 GiB, every page non-zero, multifd 4",
        multifd: 4,
        ..STOPPED
    },
];

/// One VMM process with its monitor and serial output.
struct Proc {
    child: Child,
    qmp: QmpClient,
    out: Capture,
    err: Capture,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(vmm: &Vmm, dir: &Path, name: &str, s: &Scenario, incoming: bool) -> Self {
        let sock = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(&vmm.program);
        // One accelerator option only: QEMU takes the first of several that works.
        let accel = match s.dirty_ring {
            Some(n) => format!("kvm,dirty-ring-size={n}"),
            None => String::from("kvm"),
        };
        cmd.args(&vmm.prefix)
            .args([
                "-M",
                "pc",
                "-cpu",
                "qemu64",
                "-accel",
                &accel,
                "-nodefaults",
            ])
            .args(["-display", "none", "-serial", "stdio", "-m", s.memory])
            .arg("-kernel")
            .arg(guest_tests::image_path(s.image))
            .args(["-append", s.append])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        if let Some(certs) = &vmm.tls {
            let (sub, endpoint) = if incoming {
                ("dst", "server")
            } else {
                ("src", "client")
            };
            cmd.arg("-object").arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint={endpoint}",
                certs.join(sub).display()
            ));
        }
        let mut child = cmd.spawn().expect("the vmm starts");
        let (out, err) = (Capture::default(), Capture::default());
        pump(child.stdout.take().unwrap(), out.clone());
        pump(child.stderr.take().unwrap(), err.clone());
        // Connecting negotiates the capabilities (`qmp_capabilities`).
        let qmp = match QmpClient::connect_retry(&sock, Duration::from_secs(30)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                panic!("{}: no monitor: {e}; stderr: {}", vmm.name, err.text());
            }
        };
        let mut p = Proc {
            child,
            qmp,
            out,
            err,
        };
        p.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
        if vmm.tls.is_some() {
            let mut params = json!({"tls-creds": "tls0"});
            if !incoming {
                params["tls-hostname"] = json!("localhost");
            }
            p.cmd("migrate-set-parameters", params);
        }
        p
    }

    fn cmd(&mut self, command: &str, args: Value) -> Value {
        let args = if args.is_null() { None } else { Some(args) };
        self.qmp
            .execute(command, args)
            .unwrap_or_else(|e| panic!("{command}: {e}; stderr: {}", self.err.text()))
    }

    /// The QMP timestamp of the next `name` event.
    fn event_time(&mut self, name: &str, timeout: Duration) -> Option<f64> {
        self.qmp
            .wait_event(name, timeout, |_| true)
            .ok()
            .map(|e| e.timestamp)
    }
}

/// Highest `pass N ok` the guest printed.
fn last_pass(text: &str) -> u64 {
    common::pass_numbers(text).max().unwrap_or(0)
}

/// What one migration measured.
#[derive(Clone, Debug)]
struct Outcome {
    completed: bool,
    verified: Result<(), String>,
    total_ms: f64,
    downtime_ms: f64,
    reported_downtime_ms: f64,
    syncs: u64,
    bytes: u64,
    /// Highest `cpu-throttle-percentage` seen, and for how long the guest was throttled, s.
    throttle_max: u64,
    throttled_s: f64,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn run_one(vmm: &Vmm, s: &Scenario, run: usize) -> Outcome {
    let dir = TempDir::new(&format!("bench-{}-{}-{run}", vmm.name, s.key));
    let mut src = Proc::spawn(vmm, &dir.0, "src", s, false);
    let mut dst = Proc::spawn(vmm, &dir.0, "dst", s, true);
    src.out
        .wait_for(Duration::from_secs(300), s.ready, |t| t.contains(s.ready));
    let params = json!({"max-bandwidth": s.bandwidth, "downtime-limit": 30});
    src.cmd("migrate-set-parameters", params);
    if s.auto_converge {
        src.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
        );
    }
    if s.stopped {
        src.cmd("stop", Value::Null);
        src.event_time("STOP", Duration::from_secs(10));
    }
    if s.multifd > 0 {
        // Both sides, before the incoming migration starts (QEMU's rule).
        for p in [&mut src, &mut dst] {
            p.cmd(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "multifd", "state": true}]}),
            );
            p.cmd(
                "migrate-set-parameters",
                json!({"multifd-channels": s.multifd}),
            );
        }
    }
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    dst.cmd("migrate-incoming", json!({ "uri": uri }));
    src.cmd("migrate", json!({ "uri": uri }));
    // Every second without an end, query-migrate says how hard the guest is throttled.
    let started = Instant::now();
    let (mut throttle_max, mut throttled_since) = (0, None);
    let status = loop {
        let finished = src
            .qmp
            .wait_event("MIGRATION", Duration::from_secs(1), |d| {
                matches!(d["status"].as_str(), Some("completed" | "failed"))
            });
        if let Ok(e) = finished {
            break e.data["status"].as_str().unwrap_or("?").to_string();
        }
        if started.elapsed() > s.timeout {
            src.cmd("migrate_cancel", Value::Null);
            break String::from("not converged");
        }
        let pct = src.cmd("query-migrate", Value::Null)["cpu-throttle-percentage"]
            .as_u64()
            .unwrap_or(0);
        if pct > 0 {
            throttle_max = throttle_max.max(pct);
            throttled_since.get_or_insert_with(Instant::now);
        }
    };
    let throttled_s = throttled_since.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let stop = if s.stopped {
        None
    } else {
        src.event_time("STOP", Duration::from_secs(5))
    };
    // QEMU sends the completed event a moment before it records the total time.
    let mut info = src.cmd("query-migrate", Value::Null);
    let t0 = Instant::now();
    while info["total-time"].as_u64() == Some(0) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
        info = src.cmd("query-migrate", Value::Null);
    }
    let completed = status == "completed";
    let mut downtime_ms = f64::NAN;
    let mut verified = Err(format!("migration {status}"));
    if completed {
        if s.stopped {
            dst.qmp
                .wait_event("MIGRATION", Duration::from_secs(30), |d| {
                    d["status"] == "completed"
                })
                .ok();
            let st = dst.cmd("query-status", Value::Null);
            if st["running"] != json!(true) {
                dst.cmd("cont", Value::Null);
            }
        }
        let resume = dst.event_time("RESUME", Duration::from_secs(30));
        if let (Some(a), Some(b)) = (stop, resume) {
            downtime_ms = (b - a) * 1e3;
        }
        verified = if s.verifying {
            // The pass under way at the stop, then one whole pass on the destination alone.
            let want = last_pass(&src.out.text()) + 2;
            let t0 = Instant::now();
            loop {
                let text = dst.out.text();
                if let Some(l) = text
                    .lines()
                    .find(|l| l.starts_with("CORRUPT") || l.starts_with("FAIL"))
                {
                    break Err(l.to_string());
                }
                if last_pass(&text) >= want {
                    break Ok(());
                }
                if t0.elapsed() > Duration::from_secs(120) {
                    break Err(format!("destination did not reach pass {want}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            let st = dst.cmd("query-status", Value::Null);
            if st["status"] == "running" {
                Ok(())
            } else {
                Err(format!("destination {st}"))
            }
        };
    }
    if std::env::var_os("HOPVM_MIGRATION_PROFILE").is_some() {
        for line in [src.err.text(), dst.err.text()]
            .iter()
            .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| l.contains("migration profile"))
        {
            eprintln!("{} {}: {line}", s.key, vmm.name);
        }
    }
    Outcome {
        completed,
        verified,
        total_ms: info["total-time"].as_f64().unwrap_or(f64::NAN),
        downtime_ms,
        reported_downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        syncs: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
        throttle_max,
        throttled_s,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Median and range of a field over the completed runs.
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(runs: &[Outcome], f: impl Fn(&Outcome) -> f64) -> Stat {
    let mut v: Vec<f64> = runs.iter().filter(|o| o.completed).map(f).collect();
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Stat {
        median: median(&mut v),
        min,
        max,
    }
}

fn fmt_stat(s: &Stat, scale: f64, prec: usize) -> String {
    if s.median.is_nan() {
        return String::from("-");
    }
    if s.min == s.max {
        format!("{:.prec$}", s.median / scale)
    } else {
        format!(
            "{:.prec$} ({:.prec$}–{:.prec$})",
            s.median / scale,
            s.min / scale,
            s.max / scale
        )
    }
}

fn qemu_installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
}

fn main() {
    let runs: usize = std::env::var("HOPVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let only = std::env::var("HOPVM_BENCH_ONLY").ok();
    let tls_mode = std::env::var("HOPVM_BENCH_TLS").unwrap_or_default();
    let certs = TempDir::new("bench-tls-certs");
    let ca = migration::transport::tls::test_certs::Ca::new("hopvm bench CA");
    ca.server_dir(&certs.join("dst"), &["localhost"], false);
    ca.client_dir(&certs.join("src"), false);
    let mut plain = vec![Vmm {
        name: "hopvm",
        program: PathBuf::from(env!("CARGO_BIN_EXE_hopvm")),
        prefix: vec!["qemu"],
        tls: None,
    }];
    if std::env::var("HOPVM_BENCH_QEMU").as_deref() != Ok("0") && qemu_installed() {
        plain.push(Vmm {
            name: "qemu-7.2",
            program: PathBuf::from("qemu-system-x86_64"),
            prefix: vec![],
            tls: None,
        });
    } else {
        println!("(QEMU not run)");
    }
    let mut vmms = Vec::new();
    for v in plain {
        if tls_mode != "only" {
            vmms.push(v.clone());
        }
        if tls_mode != "0" && (tls_mode != "hopvm" || v.name == "hopvm") {
            vmms.push(Vmm {
                name: if v.name == "hopvm" {
                    "hopvm+tls"
                } else {
                    "qemu-7.2+tls"
                },
                tls: Some(certs.0.clone()),
                ..v
            });
        }
    }
    let mut rows = Vec::new();
    for s in SCENARIOS {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|k| k == s.key))
        {
            continue;
        }
        let mut per_vmm: Vec<(String, Vec<Outcome>)> = Vec::new();
        for vmm in &vmms {
            // hopvm refuses a dirty ring on a host whose KVM overruns it (kvm_pvm).
            if vmm.name == "hopvm" && s.dirty_ring.is_some_and(|n| n > 0) {
                if let Some(why) = vmm::dirty_ring::host_ring_unsafe() {
                    eprintln!(
                        "{} hopvm: not run, hopvm refuses the ring here: {why}",
                        s.key
                    );
                    per_vmm.push((String::from("hopvm (refuses the ring here)"), Vec::new()));
                    continue;
                }
            }
            let mut outs = Vec::new();
            for run in 0..runs {
                let o = run_one(vmm, s, run);
                eprintln!(
                    "{} {} run {}: {} total {:.0} ms, downtime {:.1} ms (reported {:.0}), \
                     {} syncs, {:.1} MiB, throttle max {} % for {:.1} s, {}",
                    s.key,
                    vmm.name,
                    run + 1,
                    if o.completed { "completed" } else { "FAILED" },
                    o.total_ms,
                    o.downtime_ms,
                    o.reported_downtime_ms,
                    o.syncs,
                    o.bytes as f64 / (1 << 20) as f64,
                    o.throttle_max,
                    o.throttled_s,
                    match &o.verified {
                        Ok(()) => String::from("verified"),
                        Err(e) => format!("NOT VERIFIED: {e}"),
                    }
                );
                outs.push(o);
            }
            per_vmm.push((vmm.name.to_string(), outs));
        }
        rows.push((s, per_vmm));
    }
    println!();
    println!(
        "| scenario | vmm | runs ok | total ms | × QEMU | downtime ms (STOP→RESUME) | syncs | MiB sent | GiB/s | throttle max % (s throttled) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (s, per_vmm) in &rows {
        let qemu_total = per_vmm
            .iter()
            .find(|(n, _)| n == "qemu-7.2")
            .map(|(_, o)| stat(o, |o| o.total_ms).median);
        for (name, outs) in per_vmm {
            let ok = outs
                .iter()
                .filter(|o| o.completed && o.verified.is_ok())
                .count();
            let total = stat(outs, |o| o.total_ms);
            let ratio = match qemu_total {
                Some(q) if name != "qemu-7.2" && q > 0.0 && !outs.is_empty() => {
                    format!("{:.2}", total.median / q)
                }
                _ => String::from("-"),
            };
            let downtime = if s.stopped {
                String::from("(stopped)")
            } else {
                fmt_stat(&stat(outs, |o| o.downtime_ms), 1.0, 1)
            };
            let gibs = stat(outs, |o| {
                o.bytes as f64 / (1u64 << 30) as f64 / (o.total_ms / 1e3)
            });
            let throttle = if outs.iter().any(|o| o.throttle_max > 0) {
                format!(
                    "{} ({})",
                    fmt_stat(&stat(outs, |o| o.throttle_max as f64), 1.0, 0),
                    fmt_stat(&stat(outs, |o| o.throttled_s), 1.0, 1)
                )
            } else {
                String::from("-")
            };
            println!(
                "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} |",
                s.label,
                name,
                ok,
                outs.len(),
                fmt_stat(&total, 1.0, 0),
                ratio,
                downtime,
                fmt_stat(&stat(outs, |o| o.syncs as f64), 1.0, 0),
                fmt_stat(&stat(outs, |o| o.bytes as f64), (1 << 20) as f64, 0),
                fmt_stat(&gibs, 1.0, 2),
                throttle,
            );
        }
    }
    let failures: usize = rows
        .iter()
        .flat_map(|(_, p)| p.iter().flat_map(|(_, o)| o.iter()))
        .filter(|o| o.verified.is_err())
        .count();
    if failures > 0 {
        println!("\n{failures} run(s) failed or were not verified (see above)");
    }
}
