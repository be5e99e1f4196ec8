//! `hopvm migrate`: drives a running hopvm's live migration over QMP, as a person would want to
//! watch one.
//!
//! QEMU leaves migrations to be driven by hand-written JSON and `query-migrate` polling; this
//! tool does that polling for the user. It sets the parameters first (bandwidth, downtime limit,
//! XBZRLE, and the `events` capability so MIGRATION / MIGRATION_PASS events arrive), starts
//! `migrate`, then polls `query-migrate` every 100 ms — the events that arrive meanwhile give
//! the pass number — and shows a live progress bar (a line per second without a terminal). Ctrl-C sends
//! `migrate_cancel`, so an interrupted migration leaves the source running rather than stranded.
//! It ends with a summary table (or the final `query-migrate` reply with `--json`) and an exit
//! status scripts can test: 0 completed, 1 failed, 2 cancelled.
//!
//! The driving loop ([`run_migration`]) is shared with `hopvm demo`.

use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use super::report::{self, ReportError, ReportTarget};
use qmp::client::{QmpClient, QmpClientError};

/// `hopvm migrate` options.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The source VM's QMP monitor (`hopvm run --qmp unix:PATH`, or QEMU's -qmp).
    #[arg(long, value_name = "unix:PATH")]
    pub qmp: String,
    /// Migration parameters.
    #[command(flatten)]
    pub params: MigrationParamArgs,
    /// Print the final query-migrate reply as JSON instead of the summary table.
    #[arg(long)]
    pub json: bool,
    /// Write the migration timeline: an SVG picture or the JSON data, by the file's extension
    /// (repeatable).
    #[arg(long, value_name = "FILE.svg|FILE.json", value_parser = report::parse_target)]
    pub report: Vec<ReportTarget>,
    /// Block migration: copy every disk's whole image in the stream (QMP `migrate`'s `blk`,
    /// HMP's `migrate -b`), for a destination without shared storage started on empty images
    /// of the same size.
    #[arg(short = 'b', long)]
    pub blk: bool,
    /// Incremental block migration: copy only the allocated extents of sparse images (`inc`,
    /// HMP's `migrate -i`); the destination's images must read as zeros.
    #[arg(short = 'i', long)]
    pub inc: bool,
    /// Where to send the VM: tcp:HOST:PORT, unix:PATH, exec:COMMAND or fd:N; the destination
    /// must be waiting (`hopvm run --incoming URI`).
    #[arg(value_name = "URI")]
    pub uri: String,
}

/// Migration parameters shared by `hopvm migrate` and `hopvm demo`; each is set over QMP
/// before `migrate` (an option left out keeps the VM's setting).
#[derive(Debug, Clone, Default, Args)]
pub struct MigrationParamArgs {
    /// Bandwidth limit in bytes per second, with an optional K, M or G suffix (1024-based), or
    /// `unlimited`; a VM starts with 32M (QEMU's classic MAX_THROTTLE).
    #[arg(long, value_name = "BYTES/s|unlimited", value_parser = parse_bandwidth)]
    pub max_bandwidth: Option<u64>,
    /// Longest acceptable downtime in ms: the guest is stopped for the final copy once what is
    /// left can be sent in this time (default 30).
    #[arg(long, value_name = "MS")]
    pub downtime_limit: Option<u64>,
    /// Compress re-sent pages with XBZRLE; `--xbzrle=64M` also sets the cache size (a power of
    /// two), `--xbzrle=off` turns it off.
    #[arg(
        long,
        value_name = "CACHE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "on",
        value_parser = parse_xbzrle
    )]
    pub xbzrle: Option<Xbzrle>,
}

impl MigrationParamArgs {
    /// The settings to apply.
    pub fn settings(&self) -> MigrationSettings {
        MigrationSettings {
            max_bandwidth: self.max_bandwidth,
            downtime_limit_ms: self.downtime_limit,
            xbzrle: self.xbzrle,
        }
    }
}

/// How often `query-migrate` is polled (QEMU's migration thread measures every 100 ms too).
pub const POLL: Duration = Duration::from_millis(100);
/// How long to wait for the monitor socket to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Exit status: the migration completed.
pub const EXIT_COMPLETED: i32 = 0;
/// Exit status: the migration failed (or could not be started or watched).
pub const EXIT_FAILED: i32 = 1;
/// Exit status: the migration was cancelled.
pub const EXIT_CANCELLED: i32 = 2;

/// Errors driving a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The monitor could not be reached.
    #[error("cannot connect to the QMP monitor {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// Why.
        source: QmpClientError,
    },
    /// A QMP command failed.
    #[error("{command}: {source}")]
    Command {
        /// The command.
        command: &'static str,
        /// Its error.
        source: QmpClientError,
    },
    /// `migrate` itself was refused.
    #[error("cannot start the migration: {0}")]
    Start(QmpClientError),
    /// The user pressed Ctrl-C twice: the tool stopped waiting for the cancellation.
    #[error("interrupted again: not waiting for the cancellation to finish")]
    Abandoned,
    /// `--xbzrle` with a cache size that is not a power of two of at least 4 KiB.
    #[error("invalid XBZRLE cache size '{0}': a power of two of at least 4K")]
    BadXbzrleCache(String),
    /// `--max-bandwidth` that is neither a size nor `unlimited`.
    #[error("invalid bandwidth '{0}': bytes per second (e.g. 32M) or unlimited")]
    BadBandwidth(String),
    /// The report could not be written.
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// What to do with XBZRLE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xbzrle {
    /// Turn it off.
    Off,
    /// Turn it on, keeping the VM's cache size.
    On,
    /// Turn it on with this cache size in bytes.
    Cache(u64),
}

/// Parses `--xbzrle[=off|on|CACHE]`; the cache size must be a power of two of at least 4 KiB.
pub fn parse_xbzrle(s: &str) -> Result<Xbzrle, MigrateError> {
    match s {
        "on" | "" => Ok(Xbzrle::On),
        "off" => Ok(Xbzrle::Off),
        size => match vmm::config::parse_size(size) {
            Ok(n) if n >= 4096 && n.is_power_of_two() => Ok(Xbzrle::Cache(n)),
            _ => Err(MigrateError::BadXbzrleCache(size.to_string())),
        },
    }
}

/// Parses `--max-bandwidth`: bytes per second with an optional K/M/G suffix (1024-based), or
/// `unlimited` (0, as QEMU's `max-bandwidth`).
pub fn parse_bandwidth(s: &str) -> Result<u64, MigrateError> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    vmm::config::parse_size(s.trim_end_matches("/s"))
        .map_err(|_| MigrateError::BadBandwidth(s.to_string()))
}

/// The migration parameters to set before `migrate`; `None` keeps the VM's setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationSettings {
    /// `max-bandwidth`, bytes per second (0 = unlimited).
    pub max_bandwidth: Option<u64>,
    /// `downtime-limit`, ms.
    pub downtime_limit_ms: Option<u64>,
    /// The `xbzrle` capability and `xbzrle-cache-size`.
    pub xbzrle: Option<Xbzrle>,
}

/// Runs `command` and names it in the error.
fn execute(
    client: &mut QmpClient,
    command: &'static str,
    args: Option<Value>,
) -> Result<Value, MigrateError> {
    client
        .execute(command, args)
        .map_err(|source| MigrateError::Command { command, source })
}

/// Sets `settings` and turns the `events` capability on (MIGRATION and MIGRATION_PASS events).
pub fn apply_settings(
    client: &mut QmpClient,
    settings: &MigrationSettings,
) -> Result<(), MigrateError> {
    let mut caps = vec![json!({"capability": "events", "state": true})];
    if let Some(x) = settings.xbzrle {
        caps.push(json!({"capability": "xbzrle", "state": x != Xbzrle::Off}));
    }
    execute(
        client,
        "migrate-set-capabilities",
        Some(json!({ "capabilities": caps })),
    )?;
    let mut params = serde_json::Map::new();
    if let Some(b) = settings.max_bandwidth {
        params.insert("max-bandwidth".into(), json!(b));
    }
    if let Some(d) = settings.downtime_limit_ms {
        params.insert("downtime-limit".into(), json!(d));
    }
    if let Some(Xbzrle::Cache(c)) = settings.xbzrle {
        params.insert("xbzrle-cache-size".into(), json!(c));
    }
    if !params.is_empty() {
        execute(
            client,
            "migrate-set-parameters",
            Some(Value::Object(params)),
        )?;
    }
    Ok(())
}

/// One `query-migrate` reply, with the fields the progress display needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// `status` (`setup`, `active`, `completed` …).
    pub status: String,
    /// ms since `migrate`.
    pub total_time_ms: u64,
    /// Bytes sent so far.
    pub transferred: u64,
    /// RAM bytes still dirty.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Last measured throughput, Mbit/s.
    pub mbps: f64,
    /// Pages the guest dirties per second.
    pub dirty_pages_rate: u64,
    /// The downtime expected if the guest were stopped now, ms.
    pub expected_downtime_ms: u64,
    /// Passes over RAM (dirty syncs).
    pub passes: u64,
}

impl Snapshot {
    /// Reads a `query-migrate` reply.
    pub fn from_info(info: &Value) -> Self {
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        let ram = &info["ram"];
        Self {
            status: info["status"].as_str().unwrap_or("none").to_string(),
            total_time_ms: u(&info["total-time"]),
            transferred: u(&ram["transferred"]),
            remaining: u(&ram["remaining"]),
            total: u(&ram["total"]),
            mbps: ram["mbps"].as_f64().unwrap_or(0.0),
            dirty_pages_rate: u(&ram["dirty-pages-rate"]),
            expected_downtime_ms: u(&info["expected-downtime"]),
            passes: u(&ram["dirty-sync-count"]),
        }
    }

    /// Throughput in bytes per second.
    pub fn bytes_per_second(&self) -> f64 {
        self.mbps * 1e6 / 8.0
    }

    /// True once the migration has ended one way or another.
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    /// One line of progress, for logs.
    pub fn line(&self) -> String {
        if self.status == "setup" || self.total == 0 {
            return format!(
                "migrate: {} ({})",
                self.status,
                super::millis(self.total_time_ms)
            );
        }
        format!(
            "migrate: {}, pass {}, {} sent, {} of {} left, {}, {} dirty pages/s, expected downtime {} ms ({})",
            self.status,
            self.passes,
            super::bytes(self.transferred),
            super::bytes(self.remaining),
            super::bytes(self.total),
            super::rate(self.bytes_per_second()),
            super::count(self.dirty_pages_rate),
            self.expected_downtime_ms,
            super::millis(self.total_time_ms),
        )
    }
}

/// Where progress goes: a bar on a terminal, a line per second otherwise, or nowhere. Progress
/// is written to stderr; [`ProgressView::println`] prints above the bar on stdout's behalf.
pub enum ProgressView {
    /// An indicatif bar on stderr.
    Bar {
        /// The bar.
        bar: ProgressBar,
        /// Whether it still shows the setup spinner.
        spinning: bool,
    },
    /// A progress line on stderr at most once per second.
    Lines {
        /// When the last line was printed.
        last: Option<Instant>,
    },
    /// Nothing.
    Hidden,
}

impl ProgressView {
    /// A bar when `interactive`, else progress lines.
    pub fn new(interactive: bool) -> Self {
        if !interactive {
            return Self::Lines { last: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner:.green} {msg} {elapsed}")
                .expect("the template is valid")
                .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "),
        );
        bar.set_message("setting up the migration…");
        bar.enable_steady_tick(Duration::from_millis(100));
        Self::Bar {
            bar,
            spinning: true,
        }
    }

    /// Shows `s`.
    pub fn update(&mut self, s: &Snapshot) {
        match self {
            Self::Bar { bar, spinning } => {
                if s.status == "setup" || s.total == 0 {
                    return;
                }
                if *spinning {
                    *spinning = false;
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner:.green} {prefix:>7} [{bar:30.cyan/blue}] {percent:>3}% {wide_msg}",
                        )
                        .expect("the template is valid")
                        .progress_chars("=> ")
                        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "),
                    );
                    bar.set_length(s.total);
                }
                bar.set_prefix(format!("pass {}", s.passes));
                bar.set_position(s.total.saturating_sub(s.remaining));
                bar.set_message(format!(
                    "{} sent · {} · {} dirty pages/s · downtime ≈ {} ms · {}",
                    super::bytes(s.transferred),
                    super::rate(s.bytes_per_second()),
                    super::count(s.dirty_pages_rate),
                    s.expected_downtime_ms,
                    super::millis(s.total_time_ms),
                ));
            }
            Self::Lines { last } => {
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) || s.finished() {
                    *last = Some(Instant::now());
                    eprintln!("{}", s.line());
                }
            }
            Self::Hidden => {}
        }
    }

    /// Prints a line of stdout without disturbing the bar.
    pub fn println(&self, line: &str) {
        match self {
            Self::Bar { bar, .. } => bar.suspend(|| println!("{line}")),
            _ => println!("{line}"),
        }
    }

    /// Prints a message on stderr without disturbing the bar.
    pub fn note(&self, line: &str) {
        match self {
            Self::Bar { bar, .. } => bar.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Self::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }
}

/// How a migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Completed: the guest runs on the destination.
    Completed,
    /// Failed, with QEMU's `error-desc` when there is one; the source runs on.
    Failed(Option<String>),
    /// Cancelled; the source runs on.
    Cancelled,
}

/// A finished migration.
#[derive(Debug, Clone)]
pub struct Finished {
    /// How it ended.
    pub outcome: Outcome,
    /// The final `query-migrate` reply.
    pub info: Value,
    /// Passes over RAM (from MIGRATION_PASS events and `dirty-sync-count`).
    pub passes: u64,
    /// Whether Ctrl-C asked for a cancellation (it may have come too late).
    pub cancel_requested: bool,
    /// With block migration, the last `disk` object `query-migrate` showed (QEMU shows it
    /// only while the migration is active, not once it completed).
    pub last_disk: Option<Value>,
}

/// Sends `migrate` to `uri`.
pub fn start_migration(client: &mut QmpClient, uri: &str) -> Result<(), MigrateError> {
    start_migration_with(client, uri, false, false)
}

/// Sends `migrate` to `uri`, with block migration (`blk`) or its incremental form (`inc`).
pub fn start_migration_with(
    client: &mut QmpClient,
    uri: &str,
    blk: bool,
    inc: bool,
) -> Result<(), MigrateError> {
    client.take_events();
    let mut args = json!({ "uri": uri });
    if blk {
        args["blk"] = json!(true);
    }
    if inc {
        args["inc"] = json!(true);
    }
    client
        .execute("migrate", Some(args))
        .map_err(MigrateError::Start)?;
    Ok(())
}

/// Starts `migrate` to `uri` (with `blk` / `inc`) and follows it to its end: see
/// [`follow_migration`].
pub fn run_migration(
    client: &mut QmpClient,
    uri: &str,
    (blk, inc): (bool, bool),
    view: &mut ProgressView,
    on_tick: &mut dyn FnMut(&ProgressView),
) -> Result<Finished, MigrateError> {
    start_migration_with(client, uri, blk, inc)?;
    follow_migration(client, view, on_tick)
}

/// Follows a started migration to its end, showing progress in `view` and calling `on_tick`
/// after every poll (the demo prints the guest's output there). Ctrl-C (see
/// [`super::catch_interrupts`]) sends `migrate_cancel`; a second one stops waiting.
pub fn follow_migration(
    client: &mut QmpClient,
    view: &mut ProgressView,
    on_tick: &mut dyn FnMut(&ProgressView),
) -> Result<Finished, MigrateError> {
    let mut cancel_requested = false;
    let mut passes = 0;
    let mut last_disk = None;
    loop {
        let interrupts = super::interrupts();
        if interrupts > 0 && !cancel_requested {
            cancel_requested = true;
            execute(client, "migrate_cancel", None)?;
            view.note("hopvm: cancelling the migration (Ctrl-C again to stop waiting)");
        } else if interrupts > 1 {
            view.finish();
            return Err(MigrateError::Abandoned);
        }
        let info = execute(client, "query-migrate", None)?;
        if info["disk"].is_object() {
            last_disk = Some(info["disk"].clone());
        }
        for e in client.take_events() {
            if e.name == "MIGRATION_PASS" {
                passes = passes.max(e.data["pass"].as_u64().unwrap_or(0));
            }
        }
        let snapshot = Snapshot::from_info(&info);
        passes = passes.max(snapshot.passes);
        view.update(&Snapshot {
            passes,
            ..snapshot.clone()
        });
        on_tick(view);
        if snapshot.finished() {
            view.finish();
            let outcome = match snapshot.status.as_str() {
                "completed" => Outcome::Completed,
                "cancelled" => Outcome::Cancelled,
                _ => Outcome::Failed(info["error-desc"].as_str().map(str::to_string)),
            };
            return Ok(Finished {
                outcome,
                info,
                passes,
                cancel_requested,
                last_disk,
            });
        }
        // The next poll. (Not a timed wait for the MIGRATION event: the client's timed reads
        // could lose a line that arrives in two pieces across the timeout.)
        std::thread::sleep(POLL);
    }
}

/// The summary table of a finished migration's `query-migrate` reply.
pub fn summary(info: &Value, passes: u64) -> String {
    summary_with_disk(info, passes, None)
}

/// [`summary`], with the `disk` object last seen while the migration ran (block migration:
/// a completed migration's reply has none, as QEMU's).
pub fn summary_with_disk(info: &Value, passes: u64, last_disk: Option<&Value>) -> String {
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let ram = &info["ram"];
    let status = info["status"].as_str().unwrap_or("?");
    let total_ms = u(&info["total-time"]);
    let transferred = u(&ram["transferred"]);
    let mut rows: Vec<(&str, String)> = vec![
        ("status", status.to_string()),
        (
            "total time",
            format!(
                "{} (setup {})",
                super::millis(total_ms),
                super::millis(u(&info["setup-time"]))
            ),
        ),
    ];
    if let Some(d) = info["downtime"].as_u64() {
        rows.push(("downtime", super::millis(d)));
    }
    rows.push((
        "transferred",
        format!(
            "{} ({} bytes)",
            super::bytes(transferred),
            super::count(transferred)
        ),
    ));
    if info["disk"].is_object() {
        let disk = &info["disk"];
        rows.push((
            "disks",
            format!(
                "{}: {} sent ({} remaining)",
                super::bytes(u(&disk["total"])),
                super::bytes(u(&disk["transferred"])),
                super::bytes(u(&disk["remaining"]))
            ),
        ));
    } else if let (Some(disk), "completed") = (last_disk, status) {
        rows.push((
            "disks",
            format!(
                "{} copied in the stream (block migration)",
                super::bytes(u(&disk["total"]))
            ),
        ));
    }
    let normal = u(&ram["normal"]);
    rows.push((
        "guest RAM",
        format!(
            "{}: {} pages sent in full ({}), {} zero pages ({})",
            super::bytes(u(&ram["total"])),
            super::count(normal),
            super::bytes(u(&ram["normal-bytes"])),
            super::count(u(&ram["duplicate"])),
            super::bytes(u(&ram["duplicate"]) * 4096),
        ),
    ));
    let average = if total_ms > 0 {
        transferred as f64 * 1e3 / total_ms as f64
    } else {
        0.0
    };
    let mbps = ram["mbps"].as_f64().unwrap_or(0.0);
    rows.push((
        "throughput",
        format!(
            "{} average, {} last measured ({mbps:.1} Mbit/s)",
            super::rate(average),
            super::rate(mbps * 1e6 / 8.0)
        ),
    ));
    rows.push((
        "passes",
        passes.max(u(&ram["dirty-sync-count"])).to_string(),
    ));
    let x = &info["xbzrle-cache"];
    if x.is_object() {
        rows.push((
            "xbzrle",
            format!(
                "{} pages as {} (cache {}, {:.0}% misses, {} overflows)",
                super::count(u(&x["pages"])),
                super::bytes(u(&x["bytes"])),
                super::bytes(u(&x["cache-size"])),
                x["cache-miss-rate"].as_f64().unwrap_or(0.0) * 100.0,
                super::count(u(&x["overflow"])),
            ),
        ));
    }
    if let Some(e) = info["error-desc"].as_str() {
        rows.push(("error", e.to_string()));
    }
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("  {k:<12} {v}\n"));
    }
    out
}

/// Fetches the migration timeline and writes the reports asked for.
pub fn write_reports(
    client: &mut QmpClient,
    info: &Value,
    targets: &[ReportTarget],
) -> Result<(), MigrateError> {
    if targets.is_empty() {
        return Ok(());
    }
    let timeline = client
        .execute("x-query-migration-timeline", None)
        .map_err(ReportError::Timeline)?;
    let data = report::ReportData::from_qmp(&timeline, info)?;
    for target in targets {
        report::write(&data, target)?;
    }
    Ok(())
}

/// `hopvm migrate`: returns the exit status.
pub fn command(args: &MigrateArgs) -> i32 {
    super::catch_interrupts();
    let path = super::qmp_socket_path(&args.qmp);
    let mut client = match super::connect_qmp(&path, CONNECT_TIMEOUT) {
        Ok(c) => c,
        Err(source) => {
            eprintln!(
                "hopvm: {}",
                MigrateError::Connect {
                    path: path.display().to_string(),
                    source
                }
            );
            return EXIT_FAILED;
        }
    };
    let result = apply_settings(&mut client, &args.params.settings()).and_then(|_| {
        let mut view = ProgressView::new(super::interactive());
        run_migration(
            &mut client,
            &args.uri,
            (args.blk, args.inc),
            &mut view,
            &mut |_| {},
        )
    });
    let finished = match result {
        Ok(f) => f,
        Err(MigrateError::Abandoned) => {
            eprintln!("hopvm: {}", MigrateError::Abandoned);
            return EXIT_CANCELLED;
        }
        Err(e) => {
            eprintln!("hopvm: {e}");
            return EXIT_FAILED;
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&finished.info).unwrap_or_default()
        );
    }
    let report = write_reports(&mut client, &finished.info, &args.report);
    let status = match &finished.outcome {
        Outcome::Completed => {
            if !args.json {
                println!(
                    "Migration completed\n{}",
                    summary_with_disk(&finished.info, finished.passes, finished.last_disk.as_ref())
                );
            }
            if finished.cancel_requested {
                eprintln!("hopvm: the migration completed before it could be cancelled");
            }
            EXIT_COMPLETED
        }
        Outcome::Failed(desc) => {
            eprintln!(
                "hopvm: migration failed: {}; the source keeps running",
                desc.as_deref().unwrap_or("no reason given")
            );
            EXIT_FAILED
        }
        Outcome::Cancelled => {
            let state = client
                .execute("query-status", None)
                .ok()
                .and_then(|s| s["status"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from("unknown"));
            eprintln!("hopvm: migration cancelled; the source VM is {state}");
            EXIT_CANCELLED
        }
    };
    match report {
        Ok(()) => {
            for t in &args.report {
                eprintln!("hopvm: timeline written to {}", t.path.display());
            }
            status
        }
        Err(e) => {
            eprintln!("hopvm: {e}");
            status.max(EXIT_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        assert_eq!(parse_bandwidth("unlimited").ok(), Some(0));
        assert_eq!(parse_bandwidth("1M").ok(), Some(1 << 20));
        assert_eq!(parse_bandwidth("32M/s").ok(), Some(32 << 20));
        assert_eq!(parse_bandwidth("1000").ok(), Some(1000));
        assert!(parse_bandwidth("fast").is_err());
        assert_eq!(parse_xbzrle("on").ok(), Some(Xbzrle::On));
        assert_eq!(parse_xbzrle("off").ok(), Some(Xbzrle::Off));
        assert_eq!(parse_xbzrle("64M").ok(), Some(Xbzrle::Cache(64 << 20)));
        assert!(parse_xbzrle("3M").is_err());
        assert!(parse_xbzrle("1K").is_err());
    }

    #[test]
    fn snapshot_and_summary_read_query_migrate() {
        let info = json!({
            "status": "completed", "total-time": 3421, "setup-time": 2, "downtime": 21,
            "ram": {"transferred": 50540544u64, "remaining": 0, "total": 268435456u64,
                    "duplicate": 53536, "normal": 12000, "normal-bytes": 49152000u64,
                    "dirty-pages-rate": 1900, "mbps": 255.2, "dirty-sync-count": 4,
                    "page-size": 4096, "skipped": 0},
        });
        let s = Snapshot::from_info(&info);
        assert!(s.finished());
        assert_eq!(s.transferred, 50540544);
        assert_eq!(s.passes, 4);
        assert!((s.bytes_per_second() - 31.9e6).abs() < 1e3);
        let table = summary(&info, 4);
        for want in [
            "status       completed",
            "total time   3.42 s (setup 2 ms)",
            "downtime     21 ms",
            "transferred  48.2 MiB (50 540 544 bytes)",
            "12 000 pages sent in full",
            "53 536 zero pages",
            "passes       4",
        ] {
            assert!(table.contains(want), "{want:?} not in\n{table}");
        }
        assert!(Snapshot::from_info(&json!({"status": "setup"}))
            .line()
            .starts_with("migrate: setup"));
    }
}
