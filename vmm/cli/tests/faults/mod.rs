//! The fault campaign (issue 14): the busy, self-verifying guest migrated again and again, each
//! migration hit by one random fault at a random moment, and after each the check that exactly
//! one copy runs, that it still verifies every word of its working set, and that the next
//! migration (the next iteration) completes. Shared by the bounded test
//! (`tests/fault_campaign.rs`) and the soak (`benches/fault_soak.rs`), and by the ping-pong run.
//!
//! Every guest lives on one of two "hosts": two network namespaces joined by a veth pair when
//! the machine allows it (root), else the host's own network. A migration goes to the other
//! host over TCP, or over a unix socket (a file-system socket reaches across namespaces), or
//! through a proxy that can cut the connection; the faults are:
//!
//! * the destination killed (SIGKILL), or frozen (SIGSTOP) and killed later;
//! * the connection shut down (by the proxy, both ways);
//! * `migrate_cancel` at a random moment, or within 0–3 ms of the switchover (the source's STOP);
//! * `max-bandwidth` changed mid-run (no fault: the migration must complete).
//!
//! A copy that is neither running nor the sole survivor is a lost guest, two running copies a
//! split brain; both fail the campaign. One outcome is counted apart: the destination had the
//! go-ahead and was then killed (the fault landed at or after the switchover). The source
//! stays paused — completed, or failed saying the destination may be running — and the
//! campaign, knowing that the destination is gone, resumes it as an operator would.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use super::common::passes;
use super::common::proc::{Hopvm, TempDir};
use super::common::proxy::{Policy, Proxy};
use super::common::rng::Rng;
use super::common::tools::{dirty_args, free_tcp_port, strs};
use hopvm::tools::netns::{NetnsPair, DST_ADDR, SRC_ADDR};

const LONG: Duration = Duration::from_secs(180);
/// Guest RAM.
const MEMORY: &str = "32M";
/// The migration's bandwidth limit.
const BANDWIDTH: u64 = 32 << 20;
/// Where the random moment of a fault falls at first: in [0, this) ms after `migrate`. Then
/// the window follows the migrations: 1.5 times the last completed one's total time, so that
/// faults land before, during and just after the switchover alike.
const FIRST_WINDOW_MS: usize = 800;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The destination is killed.
    KillDestination,
    /// The destination is frozen, then killed.
    FreezeDestination,
    /// The connection is shut down both ways.
    CutConnection,
    /// `migrate_cancel` at a random moment.
    Cancel,
    /// `migrate_cancel` within 3 ms of the switchover.
    CancelAtSwitchover,
    /// `max-bandwidth` changes mid-run.
    Bandwidth,
}

const FAULTS: [Fault; 6] = [
    Fault::KillDestination,
    Fault::FreezeDestination,
    Fault::CutConnection,
    Fault::Cancel,
    Fault::CancelAtSwitchover,
    Fault::Bandwidth,
];

/// How the migration travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    /// TCP to the other host.
    Tcp,
    /// A unix socket.
    Unix,
    /// A unix socket through the cutting proxy.
    Proxy,
}

/// What the campaign counted.
#[derive(Debug, Default)]
pub struct Counts {
    /// Migrations run.
    pub iterations: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Migrations by transport.
    pub transports: BTreeMap<String, u64>,
    /// How the source's migrations ended (`completed`, `failed`, `cancelled`).
    pub outcomes: BTreeMap<String, u64>,
    /// The destination had the go-ahead and was killed before it said it started: the
    /// source stayed paused saying the destination may be running, and was resumed by the
    /// campaign as an operator who knows the destination is gone would.
    pub undecidable: u64,
    /// The migration completed and the fault then killed the destination (it landed after
    /// the switchover): the source, paused with the guest as it was handed over, was resumed
    /// the same way.
    pub killed_after_switchover: u64,
    /// Guests lost (no copy runs): must stay 0.
    pub lost: u64,
    /// Two running copies: must stay 0.
    pub split_brains: u64,
    /// Downtime of each completed hop, ms (source STOP → destination RESUME).
    pub downtimes_ms: Vec<f64>,
}

impl Counts {
    /// One line per counter, for the README.
    pub fn report(&self) -> String {
        let map = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut d = self.downtimes_ms.clone();
        d.sort_by(f64::total_cmp);
        let downtime = match d.len() {
            0 => String::from("-"),
            n => format!(
                "median {:.1} ms, max {:.1} ms over {n} hops",
                d[n / 2],
                d[n - 1]
            ),
        };
        format!(
            "iterations: {}\nfaults: {}\ntransports: {}\noutcomes: {}\nundecidable, resumed by the operator: {}\ndestination killed after the switchover, source resumed by the operator: {}\nguests lost: {}\nsplit brains: {}\ndowntime: {}",
            self.iterations,
            map(&self.faults),
            map(&self.transports),
            map(&self.outcomes),
            self.undecidable,
            self.killed_after_switchover,
            self.lost,
            self.split_brains,
            downtime
        )
    }
}

/// The two hosts a guest moves between.
struct Hosts {
    netns: Option<NetnsPair>,
}

impl Hosts {
    fn new() -> Self {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let netns = if root {
            match NetnsPair::create("hopvm-fault-") {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!("fault campaign: no network namespaces ({e}); one host only");
                    None
                }
            }
        } else {
            None
        };
        Self { netns }
    }

    /// Makes `cmd` run on host `side` (0 or 1).
    fn place(&self, side: usize) -> impl FnOnce(&mut Command) + '_ {
        let ns = self
            .netns
            .as_ref()
            .map(|p| if side == 0 { p.src() } else { p.dst() });
        move |cmd: &mut Command| {
            if let Some(ns) = ns {
                let program = cmd.get_program().to_owned();
                let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
                let mut wrapped = Command::new("ip");
                // `ip netns exec` execs the program: the child is hopvm itself.
                wrapped.args(["netns", "exec", ns]).arg(program).args(args);
                wrapped
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                *cmd = wrapped;
            }
        }
    }

    /// The address host `side` is reached at over TCP.
    fn addr(&self, side: usize) -> &'static str {
        match (&self.netns, side) {
            (None, _) => "127.0.0.1",
            (Some(_), 0) => SRC_ADDR,
            (Some(_), _) => DST_ADDR,
        }
    }
}

/// A guest and the host it is on.
struct Copy {
    vm: Hopvm,
    side: usize,
}

/// The campaign's state: the guest's current copy and what happened so far.
pub struct Campaign {
    dir: TempDir,
    hosts: Hosts,
    rng: Rng,
    current: Copy,
    seq: u64,
    round: Vec<Fault>,
    window_ms: usize,
    /// The counts.
    pub counts: Counts,
}

fn events_on(vm: &mut Hopvm) {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
}

fn signal(vm: &Hopvm, sig: i32) {
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(vm.child.id() as i32, sig) };
}

fn alive(vm: &mut Hopvm) -> bool {
    matches!(vm.child.try_wait(), Ok(None))
}

/// The MIGRATION status that ends a migration on the source.
fn final_status(d: &Value) -> bool {
    matches!(
        d["status"].as_str(),
        Some("completed" | "failed" | "cancelled")
    )
}

/// The QMP timestamp of an event, in seconds.
fn stamp(e: &qmp::client::QmpEvent) -> f64 {
    e.timestamp
}

impl Campaign {
    /// Boots the busy guest on host 0. `seed` makes the run replayable.
    pub fn new(name: &str, seed: u64) -> Self {
        let dir = TempDir::new(name);
        let hosts = Hosts::new();
        let args = dirty_args(MEMORY, "1");
        let mut vm = Hopvm::spawn_with(&dir.0, "guest-0", &strs(&args), hosts.place(0));
        vm.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
        events_on(&mut vm);
        Self {
            dir,
            hosts,
            rng: Rng::new(seed),
            current: Copy { vm, side: 0 },
            seq: 0,
            round: Vec::new(),
            window_ms: FIRST_WINDOW_MS,
            counts: Counts::default(),
        }
    }

    /// The next fault: every kind once per round of six, in a random order.
    fn next_fault(&mut self) -> Fault {
        if self.round.is_empty() {
            self.round = FAULTS.to_vec();
            for i in (1..self.round.len()).rev() {
                let j = self.rng.below(i + 1);
                self.round.swap(i, j);
            }
        }
        self.round.pop().expect("a round is never empty here")
    }

    /// Whether the hosts are two network namespaces.
    pub fn two_namespaces(&self) -> bool {
        self.hosts.netns.is_some()
    }

    /// One migration with a random fault (or none, with `fault` false); panics on a lost
    /// guest, a split brain or corruption, with what happened.
    pub fn iteration(&mut self, fault: bool) {
        self.seq += 1;
        let n = self.seq;
        let fault = fault.then(|| self.next_fault());
        let transport = match fault {
            Some(Fault::CutConnection) => Transport::Proxy,
            _ if self.rng.below(2) == 0 => Transport::Tcp,
            _ => Transport::Unix,
        };
        let delay = Duration::from_millis(self.rng.below(self.window_ms) as u64);
        let what = format!("iteration {n}: {fault:?} over {transport:?} after {delay:?}");

        let side = 1 - self.current.side;
        let (incoming, uri, proxy) = match transport {
            Transport::Tcp => {
                let port = free_tcp_port();
                (
                    format!("tcp:0:{port}"),
                    format!("tcp:{}:{port}", self.hosts.addr(side)),
                    None,
                )
            }
            Transport::Unix | Transport::Proxy => {
                let sock = self.dir.join(&format!("mig-{n}.sock"));
                let incoming = format!("unix:{}", sock.display());
                if transport == Transport::Proxy {
                    let front = self.dir.join(&format!("proxy-{n}.sock"));
                    let proxy = Proxy::start(&front, &sock, Policy::CutAfter(delay));
                    (incoming, format!("unix:{}", front.display()), Some(proxy))
                } else {
                    (incoming.clone(), incoming, None)
                }
            }
        };
        let mut dst = Hopvm::spawn_with(
            &self.dir.0,
            &format!("guest-{n}"),
            &["--memory", MEMORY, "--incoming", &incoming],
            self.hosts.place(side),
        );
        events_on(&mut dst);
        let src = &mut self.current.vm;
        src.qmp.take_events();
        src.cmd(
            "migrate-set-parameters",
            json!({"max-bandwidth": BANDWIDTH, "downtime-limit": 30}),
        );
        src.cmd("migrate", json!({ "uri": uri }));

        match fault {
            None | Some(Fault::CutConnection) => {}
            Some(Fault::KillDestination) => {
                std::thread::sleep(delay);
                let _ = dst.child.kill();
                let _ = dst.child.wait();
            }
            Some(Fault::FreezeDestination) => {
                std::thread::sleep(delay);
                signal(&dst, libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(self.rng.below(500) as u64));
                let _ = dst.child.kill();
                let _ = dst.child.wait();
            }
            Some(Fault::Cancel) => {
                std::thread::sleep(delay);
                let _ = src.qmp.execute("migrate_cancel", None);
            }
            Some(Fault::CancelAtSwitchover) => {
                // The STOP of the switchover, unless the migration ended without one.
                let _ = src.qmp.wait_event("STOP", LONG, |_| true);
                std::thread::sleep(Duration::from_micros(self.rng.below(3000) as u64));
                let _ = src.qmp.execute("migrate_cancel", None);
            }
            Some(Fault::Bandwidth) => {
                std::thread::sleep(delay);
                let bw = [0u64, 8 << 20, 32 << 20, 256 << 20][self.rng.below(4)];
                src.cmd("migrate-set-parameters", json!({ "max-bandwidth": bw }));
            }
        }
        let end = src
            .qmp
            .wait_event("MIGRATION", LONG, final_status)
            .unwrap_or_else(|e| panic!("{what}: the source's migration never ended: {e}"));
        let outcome = end.data["status"].as_str().unwrap_or("?").to_string();
        drop(proxy);

        // Who runs now? The source has decided (its migration ended). The destination can
        // run only if the source sent it the go-ahead: then the source completed (on the
        // destination's STARTED) or failed saying the destination may be running. Otherwise
        // the destination never runs, whatever it is doing, and one look suffices.
        let src_status = src.status();
        let info = src.cmd("query-migrate", Value::Null);
        if outcome == "completed" {
            if let Some(t) = info["total-time"].as_u64() {
                self.window_ms = (t as usize * 3 / 2).max(20);
            }
        }
        let go_sent = outcome == "completed"
            || info["error-desc"]
                .as_str()
                .is_some_and(|e| e.contains("may be running the guest"));
        let mut downtime = None;
        let dst_running = if outcome == "completed" && alive(&mut dst) {
            // Completed means the destination said it started; RESUME tells when.
            match dst.qmp.wait_event("RESUME", LONG, |_| true) {
                Ok(resume) => {
                    if let Ok(stop) = src.qmp.wait_event("STOP", Duration::from_secs(2), |_| true) {
                        downtime = Some((stamp(&resume) - stamp(&stop)) * 1e3);
                    }
                    true
                }
                // Killed by the fault after it had started the guest.
                Err(_) => false,
            }
        } else {
            alive(&mut dst)
                && dst
                    .qmp
                    .execute("query-status", None)
                    .is_ok_and(|s| s["status"] == "running")
        };
        let src_running = src_status == "running";
        eprintln!("{what}: {outcome}; source {src_status}, destination running: {dst_running}");
        *self.counts.faults.entry(format!("{fault:?}")).or_default() += 1;
        *self
            .counts
            .transports
            .entry(format!("{transport:?}"))
            .or_default() += 1;
        *self.counts.outcomes.entry(outcome.clone()).or_default() += 1;
        self.counts.iterations += 1;
        let dst_alive = alive(&mut dst);
        let context = || {
            format!(
                "{what}: outcome {outcome}, source {src_status}, destination running {dst_running}; {info}\nsource stderr: {}\ndestination stderr: {}",
                self.current.vm.err.text(),
                dst.err.text()
            )
        };
        match (src_running, dst_running) {
            (true, true) => {
                self.counts.split_brains += 1;
                panic!("split brain: {}", context());
            }
            (false, false) => {
                // Lost, unless the destination had the go-ahead and died: then the source,
                // paused with the whole guest, is resumed by an operator who knows that the
                // destination is gone.
                if !(go_sent && !dst_alive && src_status == "postmigrate") {
                    self.counts.lost += 1;
                    panic!("guest lost: {}", context());
                }
                if outcome == "completed" {
                    self.counts.killed_after_switchover += 1;
                } else {
                    self.counts.undecidable += 1;
                }
                self.current.vm.cmd("cont", Value::Null);
            }
            (false, true) => {
                self.counts.downtimes_ms.extend(downtime);
                let old = std::mem::replace(&mut self.current, Copy { vm: dst, side });
                drop(old);
            }
            // The destination never runs now (no go-ahead): a paused or waiting copy goes.
            (true, false) => drop(dst),
        }
        // The surviving copy verifies its whole working set again, twice.
        let vm = &mut self.current.vm;
        assert_eq!(vm.status(), "running", "{what}");
        let before = passes(&vm.out.text());
        vm.out
            .wait_for(LONG, "verified passes after the fault", |t| {
                passes(t) >= before + 2
            });
        assert!(
            !vm.out.text().contains("CORRUPT"),
            "{what}: {}",
            vm.out.text()
        );
        events_on(vm);
    }
}
