//! `hopvm demo`: a whole live migration on one machine, in one command.
//!
//! The point is to *show* that live migration works, on a fresh machine, without the user
//! writing any JSON: the demo boots the bundled `dirty` guest — which rewrites a working set of
//! memory forever and verifies every word it wrote before rewriting it — in a source hopvm
//! process, starts a destination hopvm waiting for the stream, live-migrates the guest while it
//! runs (with `hopvm migrate`'s progress bar), and shows the guest's serial output continuing
//! on the destination. It then checks what a person would check: no `CORRUPT` line on either
//! side, the destination keeps passing its verification (at least two passes after the
//! switchover), and the serial output of both sides joins into one stream with consecutive pass
//! numbers — nothing lost, nothing repeated.
//!
//! Both VMs are ordinary `hopvm run` processes (the current executable) driven over their QMP
//! sockets, so the demo exercises exactly what a user would use. They run in their own process
//! group, so Ctrl-C reaches only the demo, which then cancels the migration and stops them;
//! they also get SIGKILL if the demo itself dies. With `--transport netns` the VMs run in two
//! network namespaces joined by a veth pair (192.0.2.1 ↔ 192.0.2.2, TEST-NET-1), which the demo
//! creates and deletes again on every path (namespaces left behind by a killed demo are removed
//! by the next one).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;
use vmm::config;

use super::migrate::MigrationParamArgs;
use super::migrate::{self, MigrateError, Outcome, ProgressView};
use super::netns::{self, NetnsError, NetnsPair, DST_ADDR, SRC_ADDR};
use super::report::{self, ReportTarget};
use qmp::client::QmpClient;

/// How `hopvm demo` carries the migration stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// TCP on the loopback interface.
    Tcp,
    /// A Unix socket.
    Unix,
    /// TCP between two network namespaces joined by a veth pair (needs root).
    Netns,
}

/// `hopvm demo` options.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Guest RAM of both VMs: a number with a K, M, G or T suffix.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = config::parse_memory)]
    pub memory: u64,
    /// The guest's working set: the memory it rewrites and verifies over and over.
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = config::parse_size)]
    pub ws: u64,
    /// Migration parameters.
    #[command(flatten)]
    pub params: MigrationParamArgs,
    /// How the migration stream travels: tcp (loopback), unix (a socket), or netns (TCP
    /// between two network namespaces joined by a veth pair; needs root).
    #[arg(long, value_enum, value_name = "tcp|unix|netns", default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// Write the migration timeline: an SVG picture or the JSON data, by the file's extension
    /// (repeatable).
    #[arg(long, value_name = "FILE.svg|FILE.json", value_parser = report::parse_target)]
    pub report: Vec<ReportTarget>,
    /// The guest image (default: the bundled memory-dirtying guest, built with hopvm).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
}

/// Exit status when the demo was interrupted (128 + SIGINT, as a shell reports it).
pub const EXIT_INTERRUPTED: i32 = 130;
/// Passes the guest must complete on the destination after the switchover.
const PASSES_AFTER: usize = 2;
/// The guest's memory besides its working set: image, page tables, the 2 MiB alignment.
const GUEST_OVERHEAD: u64 = 8 << 20;
/// The migration port inside the namespaces.
const NETNS_PORT: u16 = 4444;
/// Prefix of the demo's network namespaces: `hopvm-demo-<pid>-src|dst`.
const NETNS_PREFIX: &str = "hopvm-demo-";
/// How often the demo looks at its VMs while waiting.
const TICK: Duration = Duration::from_millis(20);

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// `--transport netns` needs root.
    #[error(
        "--transport netns needs root: it creates two network namespaces joined by a veth pair \
         (ip netns add, ip link add … type veth); run the demo as root, or use --transport tcp \
         or unix"
    )]
    NeedRoot,
    /// The options do not fit together.
    #[error("{0}")]
    Options(String),
    /// The guest image is missing.
    #[error(
        "the bundled dirty guest is missing ({0}); build it with `cargo build --workspace` \
         (guest-tests builds the test guests with gcc), or pass --kernel"
    )]
    GuestMissing(PathBuf),
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The network namespaces could not be made.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A VM process ended when it should not have.
    #[error("the {side} hopvm exited ({status}); its stderr: {stderr}")]
    Exited {
        /// `source` or `destination`.
        side: &'static str,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {} waiting for {what}", super::millis(timeout.as_millis() as u64))]
    Timeout {
        /// What.
        what: String,
        /// How long the demo waited.
        timeout: Duration,
    },
    /// A QMP command failed.
    #[error("{side} monitor: {source}")]
    Qmp {
        /// Which VM.
        side: &'static str,
        /// The error.
        source: qmp::client::QmpClientError,
    },
    /// Driving the migration failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// The migration did not complete.
    #[error("the migration {0}")]
    NotCompleted(String),
    /// The guest found corrupted memory.
    #[error("the guest reported memory corruption on the {side}: {line}")]
    Corrupt {
        /// Where.
        side: &'static str,
        /// The guest's line.
        line: String,
    },
    /// The serial output of the two sides does not join up.
    #[error("the guest's output is not continuous across the migration: {0}")]
    Discontinuous(String),
    /// The destination is not running the guest.
    #[error("the destination is {0}, not running")]
    NotRunning(String),
    /// Ctrl-C, SIGTERM or SIGHUP.
    #[error("interrupted")]
    Interrupted,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

/// Whether process `pid` exists.
fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks whether the process exists.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    found || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The pid in a name of the demo's, `hopvm-demo-<pid>` or `hopvm-demo-<pid>-<side>`.
fn demo_pid(name: &str) -> Option<libc::pid_t> {
    name.strip_prefix(NETNS_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

impl TempDir {
    fn new() -> Result<Self, DemoError> {
        // Directories of demos that were killed before they could clean up.
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if demo_pid(&name).is_some_and(|pid| !alive(pid)) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let p = std::env::temp_dir().join(format!("hopvm-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deletes namespaces of demos that were killed before they could clean up.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if demo_pid(&name).is_some_and(|pid| !alive(pid)) {
            let _ = netns::ip(&["netns", "delete", &name]);
        }
    }
}

/// The guest's serial output, complete and as lines not yet shown.
struct Output {
    text: Arc<Mutex<String>>,
    lines: Receiver<String>,
    pump: Option<JoinHandle<()>>,
}

impl Output {
    /// Collects what `from` produces.
    fn collect(mut from: impl Read + Send + 'static) -> Self {
        let text = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let sink = text.clone();
        let pump = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut partial = String::new();
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let chunk = String::from_utf8_lossy(&buf[..n]);
                vmm_sync::lock(&sink).push_str(&chunk);
                partial.push_str(&chunk);
                while let Some(i) = partial.find('\n') {
                    let line: String = partial.drain(..=i).collect();
                    let _ = tx.send(line.trim_end().to_string());
                }
            }
        });
        Self {
            text,
            lines,
            pump: Some(pump),
        }
    }

    fn text(&self) -> String {
        vmm_sync::lock(&self.text).clone()
    }

    /// Waits until the process's end of the pipe is closed and everything is collected.
    fn finish(&mut self) {
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
    }
}

/// One hopvm process with its monitor; killed on drop.
struct Vm {
    side: &'static str,
    tag: &'static str,
    child: Child,
    out: Output,
    err: Output,
    qmp: Option<QmpClient>,
}

impl Vm {
    fn spawn(
        side: &'static str,
        tag: &'static str,
        netns: Option<&str>,
        args: &[String],
    ) -> Result<Self, DemoError> {
        // This very executable, through /proc, so that the VMs run the demo's own binary even
        // if a rebuild has replaced the file meanwhile (`ip netns exec` needs a path that is
        // valid in its own process too, hence the pid rather than `self`).
        let exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
        let exe = if exe.exists() {
            exe
        } else {
            std::env::current_exe().map_err(io_err("finding the hopvm executable"))?
        };
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Ctrl-C in the terminal is the demo's to handle, not the VMs'.
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
        // which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // The VM dies with the demo even if the demo is killed outright.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(io_err(format!("starting the {side} hopvm")))?;
        let out = Output::collect(child.stdout.take().expect("stdout is piped"));
        let err = Output::collect(child.stderr.take().expect("stderr is piped"));
        Ok(Self {
            side,
            tag,
            child,
            out,
            err,
            qmp: None,
        })
    }

    /// Fails if the process has ended.
    fn check_alive(&mut self) -> Result<(), DemoError> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.err.finish();
                Err(DemoError::Exited {
                    side: self.side,
                    status: status.to_string(),
                    stderr: self.err.text().trim().to_string(),
                })
            }
            _ => Ok(()),
        }
    }

    fn qmp(&mut self) -> &mut QmpClient {
        self.qmp.as_mut().expect("connected before use")
    }

    fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, DemoError> {
        let side = self.side;
        self.qmp()
            .execute(command, args)
            .map_err(|source| DemoError::Qmp { side, source })
    }

    /// Fails on a CORRUPT line.
    fn check_corruption(&self) -> Result<(), DemoError> {
        match self.out.text().lines().find(|l| l.contains("CORRUPT")) {
            Some(line) => Err(DemoError::Corrupt {
                side: self.side,
                line: line.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Asks hopvm to quit, then makes sure it is gone.
    fn stop(&mut self) {
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.execute("quit", None);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(TICK);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.out.finish();
        self.err.finish();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Numbers of the guest's `pass N ok` lines.
fn pass_numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("pass ")?
                .strip_suffix(" ok")?
                .parse()
                .ok()
        })
        .collect()
}

/// Checks that the source's and the destination's output join into one stream whose passes
/// are numbered 1, 2, 3 … without a gap or a repeat.
fn check_continuity(src: &str, dst: &str) -> Result<(u64, u64), DemoError> {
    let joined = format!("{src}{dst}");
    let numbers = pass_numbers(&joined);
    for (i, n) in numbers.iter().enumerate() {
        if *n != i as u64 + 1 {
            return Err(DemoError::Discontinuous(format!(
                "pass {n} follows pass {}",
                i
            )));
        }
    }
    let on_src = pass_numbers(src).last().copied().unwrap_or(0);
    Ok((on_src, numbers.len() as u64))
}

/// The demo's state: its VMs and what it already showed.
struct Demo {
    vms: Vec<Vm>,
}

impl Demo {
    fn vm(&mut self, i: usize) -> &mut Vm {
        &mut self.vms[i]
    }

    /// Prints the VMs' new output lines.
    fn show_output(&mut self, view: Option<&ProgressView>) {
        for vm in &self.vms {
            while let Ok(line) = vm.out.lines.try_recv() {
                let line = format!("[{}] {line}", vm.tag);
                match view {
                    Some(v) => v.println(&line),
                    None => println!("{line}"),
                }
            }
        }
    }

    /// Polls `done` until it holds, showing output and failing on corruption, on a VM that
    /// exits, on Ctrl-C or after `timeout`.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&mut Self) -> Result<bool, DemoError>,
    ) -> Result<(), DemoError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.show_output(None);
            for vm in &self.vms {
                vm.check_corruption()?;
            }
            if done(self)? {
                return Ok(());
            }
            if super::interrupts() > 0 {
                return Err(DemoError::Interrupted);
            }
            for vm in &mut self.vms {
                vm.check_alive()?;
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what: what.to_string(),
                    timeout,
                });
            }
            std::thread::sleep(TICK);
        }
    }

    /// Connects to VM `i`'s monitor once its socket accepts.
    fn connect(&mut self, i: usize, socket: &Path) -> Result<(), DemoError> {
        let side = self.vms[i].side;
        self.wait_for(
            &format!("the {side} hopvm's monitor"),
            Duration::from_secs(30),
            |d| {
                if !socket.exists() {
                    return Ok(false);
                }
                match QmpClient::connect(socket) {
                    Ok(c) => {
                        d.vms[i].qmp = Some(c);
                        Ok(true)
                    }
                    Err(qmp::client::QmpClientError::Io(_)) => Ok(false),
                    Err(source) => Err(DemoError::Qmp { side, source }),
                }
            },
        )
    }
}

/// A free TCP port on the loopback interface.
fn free_port() -> Result<u16, DemoError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    Ok(l.local_addr()
        .map_err(io_err("finding a free port"))?
        .port())
}

/// Seconds the guest needs for `passes` passes over `ws` bytes on a slow (emulated) CPU, with
/// a wide margin: about 0.15 s per MiB per pass was measured under an instruction emulator.
fn pass_budget(ws: u64, passes: u64) -> Duration {
    Duration::from_secs(60 + (ws >> 20) * passes / 2)
}

/// Starts the migration, retrying for a moment while the destination has not begun to listen
/// yet (it binds its socket just after its monitor comes up).
fn start_migration(source: &mut Vm, uri: &str) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match migrate::start_migration(source.qmp(), uri) {
            Err(MigrateError::Start(e))
                if Instant::now() < deadline
                    && ["refused", "No such file"]
                        .iter()
                        .any(|m| e.to_string().contains(m)) =>
            {
                std::thread::sleep(TICK);
            }
            other => return Ok(other?),
        }
    }
}

fn run(args: &DemoArgs) -> Result<(), DemoError> {
    let kernel = args
        .kernel
        .clone()
        .unwrap_or_else(|| guest_tests::image_path("dirty"));
    if !kernel.is_file() {
        return Err(DemoError::GuestMissing(kernel));
    }
    let ws = args.ws.max(4096) & !4095;
    if ws + GUEST_OVERHEAD > args.memory {
        return Err(DemoError::Options(format!(
            "a working set of {} does not fit in {} of guest RAM (the guest needs about {} \
             besides it): lower --ws or raise --memory",
            super::bytes(ws),
            super::bytes(args.memory),
            super::bytes(GUEST_OVERHEAD)
        )));
    }
    let dir = TempDir::new()?;
    let netns = match args.transport {
        Transport::Netns => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err(DemoError::NeedRoot);
            }
            remove_stale_namespaces();
            Some(NetnsPair::create(NETNS_PREFIX)?)
        }
        _ => None,
    };
    // Where the destination listens and the source sends.
    let (target, how) = match (&args.transport, &netns) {
        (Transport::Netns, Some(ns)) => (
            format!("tcp:{DST_ADDR}:{NETNS_PORT}"),
            format!(
                "TCP between network namespaces {} ({SRC_ADDR}) and {} \
                 ({DST_ADDR}) over a veth pair",
                ns.src(),
                ns.dst()
            ),
        ),
        (Transport::Unix, _) => (
            format!("unix:{}", dir.0.join("migrate.sock").display()),
            String::from("a Unix socket"),
        ),
        _ => (
            format!("tcp:127.0.0.1:{}", free_port()?),
            String::from("TCP on the loopback interface"),
        ),
    };
    let memory = config::format_size(args.memory);
    let src_sock = dir.0.join("src.sock");
    let dst_sock = dir.0.join("dst.sock");
    let src_args = vec![
        String::from("--kernel"),
        kernel.display().to_string(),
        String::from("--memory"),
        memory.clone(),
        String::from("--cmdline"),
        format!("ws={}K", ws >> 10),
        String::from("--serial"),
        String::from("stdio"),
        String::from("--qmp"),
        format!("unix:{}", src_sock.display()),
    ];
    let dst_args = vec![
        String::from("--memory"),
        memory,
        String::from("--incoming"),
        target.clone(),
        String::from("--serial"),
        String::from("stdio"),
        String::from("--qmp"),
        format!("unix:{}", dst_sock.display()),
    ];
    println!(
        "hopvm demo: live migration of a guest that rewrites and verifies {} of its {} RAM, \
         over {how}",
        super::bytes(ws),
        super::bytes(args.memory)
    );
    println!("  source:      hopvm run {}", src_args.join(" "));
    println!("  destination: hopvm run {}", dst_args.join(" "));

    let mut demo = Demo { vms: Vec::new() };
    let (src, dst) = (0, 1);
    demo.vms.push(Vm::spawn(
        "source",
        "src",
        netns.as_ref().map(NetnsPair::src),
        &src_args,
    )?);
    demo.connect(src, &src_sock)?;
    let booted = Instant::now();
    demo.wait_for(
        "the guest's first verified pass on the source",
        pass_budget(ws, 2),
        |d| Ok(!pass_numbers(&d.vm(src).out.text()).is_empty()),
    )?;
    demo.vms.push(Vm::spawn(
        "destination",
        "dst",
        netns.as_ref().map(NetnsPair::dst),
        &dst_args,
    )?);
    demo.connect(dst, &dst_sock)?;
    demo.wait_for(
        "the destination to wait for the migration",
        Duration::from_secs(30),
        |d| Ok(d.vm(dst).execute("query-status", None)?["status"] == "inmigrate"),
    )?;

    let settings = args.params.settings();
    migrate::apply_settings(demo.vm(src).qmp(), &settings)?;
    let params = demo.vm(src).execute("query-migrate-parameters", None)?;
    let caps = demo.vm(src).execute("query-migrate-capabilities", None)?;
    let xbzrle_on = caps
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["capability"] == "xbzrle" && c["state"] == true);
    let bandwidth = params["max-bandwidth"].as_u64().unwrap_or(0);
    println!(
        "migrating to {target} after {} on the source (max-bandwidth {}, downtime-limit {} ms, \
         xbzrle {})",
        super::millis(booted.elapsed().as_millis() as u64),
        if bandwidth == 0 {
            String::from("unlimited")
        } else {
            super::rate(bandwidth as f64)
        },
        params["downtime-limit"],
        if xbzrle_on {
            format!(
                "on, cache {}",
                super::bytes(params["xbzrle-cache-size"].as_u64().unwrap_or(0))
            )
        } else {
            String::from("off")
        }
    );
    demo.show_output(None);
    let mut view = ProgressView::new(super::interactive());
    start_migration(demo.vm(src), &target)?;
    let finished = {
        // The source's monitor follows the migration; its output is shown above the bar.
        let source = &mut demo.vms[src];
        let out = &source.out.lines;
        let qmp = source.qmp.as_mut().expect("connected before use");
        migrate::follow_migration(qmp, &mut view, &mut |v| {
            while let Ok(line) = out.try_recv() {
                v.println(&format!("[src] {line}"));
            }
        })?
    };
    match &finished.outcome {
        Outcome::Completed => {}
        _ if finished.cancel_requested || super::interrupts() > 0 => {
            return Err(DemoError::Interrupted)
        }
        Outcome::Cancelled => return Err(DemoError::NotCompleted(String::from("was cancelled"))),
        Outcome::Failed(e) => {
            return Err(DemoError::NotCompleted(format!(
                "failed: {}",
                e.as_deref().unwrap_or("no reason given")
            )))
        }
    }
    println!(
        "Migration completed: the guest now runs on the destination\n{}",
        migrate::summary(&finished.info, finished.passes)
    );
    let migrated_at = Instant::now();
    demo.wait_for(
        &format!("{PASSES_AFTER} verified passes on the destination"),
        pass_budget(ws, PASSES_AFTER as u64 + 1),
        |d| Ok(pass_numbers(&d.vm(dst).out.text()).len() >= PASSES_AFTER),
    )?;
    let status = demo.vm(dst).execute("query-status", None)?;
    if status["status"] != "running" {
        return Err(DemoError::NotRunning(
            status["status"].as_str().unwrap_or("?").to_string(),
        ));
    }
    let incoming = demo.vm(dst).execute("query-migrate", None)?;
    if incoming["status"] != "completed" {
        return Err(DemoError::NotCompleted(format!(
            "is {} on the destination",
            incoming["status"]
        )));
    }
    migrate::write_reports(demo.vm(src).qmp(), &finished.info, &args.report)?;
    for target in &args.report {
        println!("timeline written to {}", target.path.display());
    }
    // Stop both VMs, so that every byte they printed is collected, then check the whole story.
    for vm in demo.vms.iter_mut().rev() {
        vm.stop();
    }
    demo.show_output(None);
    for vm in &demo.vms {
        vm.check_corruption()?;
    }
    let (last_on_src, total) =
        check_continuity(&demo.vms[src].out.text(), &demo.vms[dst].out.text())?;
    println!(
        "OK: the guest verified {last_on_src} pass{} on the source and {} more on the \
         destination ({} after the switchover); its output continues seamlessly and no \
         corruption was reported.",
        if last_on_src == 1 { "" } else { "es" },
        total - last_on_src,
        super::millis(migrated_at.elapsed().as_millis() as u64)
    );
    Ok(())
}

/// `hopvm demo`: returns the exit status.
pub fn command(args: &DemoArgs) -> i32 {
    super::catch_interrupts();
    match run(args) {
        Ok(()) => 0,
        Err(DemoError::Interrupted) => {
            eprintln!("hopvm demo: interrupted; the VMs were stopped and everything cleaned up");
            EXIT_INTERRUPTED
        }
        Err(DemoError::Migrate(MigrateError::Abandoned)) => {
            eprintln!("hopvm demo: interrupted; the VMs were stopped and everything cleaned up");
            EXIT_INTERRUPTED
        }
        Err(e) => {
            eprintln!("hopvm demo: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_join_across_the_switchover() {
        let src = "dirty: working set\nfill ok\npass 1 ok\npass 2 ok\npass 3 o";
        let dst = "k\npass 4 ok\npass 5 ok\n";
        assert_eq!(pass_numbers(src), vec![1, 2]);
        assert_eq!(check_continuity(src, dst).unwrap(), (2, 5));
        assert!(check_continuity("pass 1 ok\npass 2 ok\n", "pass 2 ok\npass 3 ok\n").is_err());
        assert!(check_continuity("pass 1 ok\n", "pass 3 ok\n").is_err());
        assert!(check_continuity("pass 1 ok\npass 2 ok\n", "pass 3 ok\npass 4 ok\n").is_ok());
    }

    #[test]
    fn names_of_other_demos() {
        assert_eq!(demo_pid("hopvm-demo-123"), Some(123));
        assert_eq!(demo_pid("hopvm-demo-123-src"), Some(123));
        assert_eq!(demo_pid("hopvm-demo-test-5"), None);
        assert_eq!(demo_pid("hopvm-other-1"), None);
        assert!(alive(std::process::id() as libc::pid_t));
    }

    #[test]
    fn budgets_grow_with_the_working_set() {
        assert_eq!(pass_budget(0, 3), Duration::from_secs(60));
        assert_eq!(pass_budget(32 << 20, 3), Duration::from_secs(108));
    }
}
