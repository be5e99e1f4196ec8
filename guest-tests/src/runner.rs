//! Runs manifest tests by spawning `hopvm run` and judging the result.
//!
//! Each test becomes
//!
//! ```text
//! hopvm run --kernel <image> --memory <memory> --cpus <smp> --serial stdio \
//!     --debug-exit iobase=0xf4,iosize=4 --no-reboot [--cmdline <append>] <extra_params...>
//! ```
//!
//! (without `--no-reboot` for tests with `no_reboot = false`) with stdout
//! and stderr captured and a hard timeout (the child is killed).  Tests with
//! `migrate = yes` run as a source and a destination hopvm and are migrated
//! live when the guest asks (see [`crate::migrate`]).
//! A test passes when the exit status equals `expect_status` and every
//! `expect_output` pattern is found in stdout followed by stderr.  A guest
//! that exits with code 77 ("SKIP: ...", status 155) is reported as skipped.
//! Tests needing more memory than the host has available are skipped; so are
//! tests filtered out by group. More vCPUs than host CPUs is fine: KVM
//! overcommits them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::manifest::{Manifest, TestSpec, NODEFAULT_GROUP};
pub use crate::process::{
    run_with_timeout, Outcome, EMULATION_FAILURE_STATUS, GUEST_SKIP_STATUS, MAX_OUTPUT,
};

/// Environment variable naming the hopvm binary.
pub const HOPVM_ENV: &str = "HOPVM";
/// Errors that stop a whole run (as opposed to a failing test).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The hopvm binary was not found.
    #[error("hopvm binary not found; looked at: {}. Build it (cargo build) or set {HOPVM_ENV}=/path/to/hopvm", .looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    HopvmNotFound {
        /// Paths checked, in order.
        looked: Vec<PathBuf>,
    },
    /// `HOPVM` names something that is not a file.
    #[error("{HOPVM_ENV}={} does not name an existing file", .0.display())]
    HopvmEnvInvalid(PathBuf),
    /// A test name given on the command line is not in the manifest.
    #[error("no test named {0:?} in the manifest")]
    UnknownTest(String),
}

/// Finds the hopvm binary: `$HOPVM` if set, else `hopvm` in the cargo
/// target profile directory of the running executable (the executable's
/// own directory, or its parent for test binaries in `target/<profile>/deps/`).
pub fn find_hopvm() -> Result<PathBuf, RunnerError> {
    if let Some(p) = std::env::var_os(HOPVM_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(RunnerError::HopvmEnvInvalid(p))
        };
    }
    let exe = std::env::current_exe().ok();
    find_hopvm_near(exe.as_deref())
}

/// The search behind [`find_hopvm`] without the environment variable:
/// `hopvm` next to `exe`, then in its parent directories up to and
/// including the profile directory (the child of a `target` directory).
pub fn find_hopvm_near(exe: Option<&Path>) -> Result<PathBuf, RunnerError> {
    let mut looked = Vec::new();
    if let Some(exe) = exe {
        let mut dir = exe.parent();
        for _ in 0..3 {
            let Some(d) = dir else { break };
            let candidate = d.join("hopvm");
            if candidate.is_file() {
                return Ok(candidate);
            }
            looked.push(candidate);
            // Stop at the profile directory, e.g. target/debug.
            if d.parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n == "target")
            {
                break;
            }
            dir = d.parent();
        }
    }
    Err(RunnerError::HopvmNotFound { looked })
}

/// Options for a run.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// The hopvm binary.
    pub hopvm: PathBuf,
    /// Directory with the guest images.
    pub images_dir: PathBuf,
    /// Only run tests in any of these groups (all when empty).
    pub groups: Vec<String>,
    /// Only run these tests (all when empty); not-selected tests are omitted.
    pub names: Vec<String>,
    /// Host resources used to skip tests that cannot fit.
    pub host: HostResources,
}

impl RunnerConfig {
    /// A configuration with the default images directory and the actual
    /// host resources.
    pub fn new(hopvm: PathBuf) -> RunnerConfig {
        RunnerConfig {
            hopvm,
            images_dir: crate::images_dir(),
            groups: Vec::new(),
            names: Vec::new(),
            host: HostResources::detect(),
        }
    }
}

/// CPUs and memory of the host, for skipping tests that do not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostResources {
    /// Available memory in bytes (`MemAvailable`), if known.
    pub mem_available: Option<u64>,
}

impl HostResources {
    /// Reads the host's CPU count and `/proc/meminfo`'s `MemAvailable`.
    pub fn detect() -> HostResources {
        let mem_available = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| kb * 1024);
        HostResources { mem_available }
    }

    /// Why `spec` cannot run on this host, if it cannot.
    pub fn skip_reason(&self, spec: &TestSpec) -> Option<String> {
        match self.mem_available {
            Some(avail) if spec.memory.bytes > avail => Some(format!(
                "needs {} of memory, host has {} MiB available",
                spec.memory,
                avail >> 20
            )),
            _ => None,
        }
    }
}

/// The outcome of one test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The test passed.
    Pass,
    /// The test failed, with the reason.
    Fail(String),
    /// The test was not run or the guest skipped itself, with the reason.
    Skip(String),
}

/// Result of one test, as reported.
#[derive(Clone, Debug)]
pub struct TestResult {
    /// Test name.
    pub name: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The command that was run (empty if not run).
    pub command: Vec<OsString>,
    /// What the process produced (default if not run).
    pub outcome: Outcome,
    /// Wall time of the run.
    pub duration: Duration,
}

impl TestResult {
    /// The runner line: `PASS name`, `FAIL name (reason)` or `SKIP name (reason)`.
    pub fn line(&self) -> String {
        match &self.verdict {
            Verdict::Pass => format!("PASS {}", self.name),
            Verdict::Fail(r) => format!("FAIL {} ({r})", self.name),
            Verdict::Skip(r) => format!("SKIP {} ({r})", self.name),
        }
    }

    /// The command line, shell-quoted for copying.
    pub fn command_line(&self) -> String {
        self.command
            .iter()
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The captured output, labelled, for logs.
    pub fn output_text(&self) -> String {
        let mut s = String::new();
        if !self.command.is_empty() {
            s.push_str(&format!("$ {}\n", self.command_line()));
        }
        s.push_str("--- stdout ---\n");
        s.push_str(&self.outcome.stdout);
        if !self.outcome.stdout.ends_with('\n') && !self.outcome.stdout.is_empty() {
            s.push('\n');
        }
        s.push_str("--- stderr ---\n");
        s.push_str(&self.outcome.stderr);
        if !self.outcome.stderr.ends_with('\n') && !self.outcome.stderr.is_empty() {
            s.push('\n');
        }
        s.push_str(&format!(
            "--- exit: {} in {:.2}s ---\n",
            describe_exit(&self.outcome),
            self.duration.as_secs_f64()
        ));
        s
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Totals of a run.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
    /// Tests that were skipped.
    pub skipped: usize,
    /// Every reported result, in order.
    pub results: Vec<TestResult>,
}

impl Summary {
    /// `N passed, N failed` plus `, N skipped` when any were skipped.
    pub fn line(&self) -> String {
        let mut s = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 {
            s.push_str(&format!(", {} skipped", self.skipped));
        }
        s
    }

    /// True when nothing failed.
    pub fn success(&self) -> bool {
        self.failed == 0
    }
}

/// The `hopvm run` arguments for `spec` with the image at `image`.
pub fn hopvm_args(spec: &TestSpec, image: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "run".into(),
        "--kernel".into(),
        image.as_os_str().to_owned(),
        "--memory".into(),
        spec.memory.text.clone().into(),
        "--cpus".into(),
        spec.smp.to_string().into(),
        "--serial".into(),
        "stdio".into(),
        "--debug-exit".into(),
        "iobase=0xf4,iosize=4".into(),
    ];
    if spec.no_reboot {
        a.push("--no-reboot".into());
    }
    if !spec.append.is_empty() {
        a.push("--cmdline".into());
        a.push(spec.append.clone().into());
    }
    a.extend(spec.extra_params.iter().map(OsString::from));
    a
}

/// Runs every selected test of `manifest`, calling `report` with each
/// result as soon as it is known.
pub fn run_manifest(
    manifest: &Manifest,
    config: &RunnerConfig,
    mut report: impl FnMut(&TestResult),
) -> Result<Summary, RunnerError> {
    for n in &config.names {
        if manifest.get(n).is_none() {
            return Err(RunnerError::UnknownTest(n.clone()));
        }
    }
    let mut summary = Summary::default();
    for spec in &manifest.tests {
        if !config.names.is_empty() && !config.names.contains(&spec.name) {
            continue;
        }
        let result = match selection_skip(spec, config) {
            Some(reason) => TestResult {
                name: spec.name.clone(),
                verdict: Verdict::Skip(reason),
                command: Vec::new(),
                outcome: Outcome::default(),
                duration: Duration::ZERO,
            },
            None => run_test(spec, config),
        };
        match result.verdict {
            Verdict::Pass => summary.passed += 1,
            Verdict::Fail(_) => summary.failed += 1,
            Verdict::Skip(_) => summary.skipped += 1,
        }
        report(&result);
        summary.results.push(result);
    }
    Ok(summary)
}

/// Why `spec` is not run with this configuration (group filter, nodefault
/// group, host resources), if it is not.
fn selection_skip(spec: &TestSpec, config: &RunnerConfig) -> Option<String> {
    let named = config.names.contains(&spec.name);
    if !config.groups.is_empty() && !named && !config.groups.iter().any(|g| spec.in_group(g)) {
        return Some(format!("not in group {}", config.groups.join(" or ")));
    }
    if spec.in_group(NODEFAULT_GROUP)
        && !named
        && !config.groups.iter().any(|g| g == NODEFAULT_GROUP)
    {
        return Some(format!(
            "in group {NODEFAULT_GROUP}; select it by name or -g {NODEFAULT_GROUP}"
        ));
    }
    config.host.skip_reason(spec)
}

/// Runs one test (no group or resource filtering).
pub fn run_test(spec: &TestSpec, config: &RunnerConfig) -> TestResult {
    let image = if spec.file.contains('/') {
        PathBuf::from(&spec.file)
    } else {
        config.images_dir.join(&spec.file)
    };
    let mut args = hopvm_args(spec, &image);
    let disk = match spec.disk.as_ref().map(TempDisk::create).transpose() {
        Ok(d) => d,
        Err(e) => {
            return TestResult {
                name: spec.name.clone(),
                verdict: Verdict::Fail(format!("cannot create the disk image: {e}")),
                command: Vec::new(),
                outcome: Outcome::default(),
                duration: Duration::ZERO,
            }
        }
    };
    if let Some(d) = &disk {
        args.push("--disk".into());
        args.push(d.0.clone().into_os_string());
    }
    let mut command = vec![config.hopvm.clone().into_os_string()];
    let migration_dir = spec.migrate.then(new_migration_dir);
    match &migration_dir {
        Some(dir) => {
            let sockets = crate::migrate::Sockets::in_dir(dir);
            command.extend(crate::migrate::source_args(&args, &sockets));
        }
        None => command.extend(args.iter().cloned()),
    }
    let start = Instant::now();
    let mut result = TestResult {
        name: spec.name.clone(),
        verdict: Verdict::Pass,
        command,
        outcome: Outcome::default(),
        duration: Duration::ZERO,
    };
    if !image.is_file() {
        result.verdict = Verdict::Fail(format!("image {} not found", image.display()));
        return result;
    }
    if let Some(dir) = &migration_dir {
        run_migration_test(spec, config, &args, dir, &mut result);
        result.duration = start.elapsed();
        return result;
    }
    match run_with_timeout(&config.hopvm, &args, spec.timeout) {
        Ok(outcome) => {
            result.duration = start.elapsed();
            result.verdict = judge(spec, &outcome);
            result.outcome = outcome;
        }
        Err(e) => {
            result.duration = start.elapsed();
            result.verdict = Verdict::Fail(format!("cannot run {}: {e}", config.hopvm.display()));
        }
    }
    result
}

/// A test's zero-filled disk image, removed on drop.
struct TempDisk(PathBuf);

impl TempDisk {
    fn create(size: &crate::manifest::MemorySize) -> std::io::Result<Self> {
        static DISKS: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hopvm-unittests-disk-{}-{}.img",
            std::process::id(),
            DISKS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::File::create(&path)?.set_len(size.bytes)?;
        Ok(Self(path))
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh temporary directory path for a migration test's sockets (short:
/// Unix socket paths are limited to 107 bytes).
fn new_migration_dir() -> PathBuf {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "hopvm-unittests-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Runs a `migrate = yes` test (source, destination, live migration) into
/// `result`, with the sockets in `dir` (created and removed here).
fn run_migration_test(
    spec: &TestSpec,
    config: &RunnerConfig,
    args: &[OsString],
    dir: &Path,
    result: &mut TestResult,
) {
    let run = std::fs::create_dir_all(dir)
        .and_then(|()| crate::migrate::run_migration(&config.hopvm, args, dir, spec.timeout));
    let _ = std::fs::remove_dir_all(dir);
    match run {
        Ok(m) => {
            result.verdict = match m.failure {
                Some(f) => Verdict::Fail(match failure_hint(&m.outcome) {
                    Some(h) if !h.starts_with("runner:") => format!("{f}; {h}"),
                    _ => f,
                }),
                None => judge(spec, &m.outcome),
            };
            result.outcome = m.outcome;
        }
        Err(e) => {
            result.verdict = Verdict::Fail(format!("cannot run {}: {e}", config.hopvm.display()));
        }
    }
}

/// Describes an exit for messages, e.g. `status 85 (guest exit code 42)`.
pub fn describe_exit(o: &Outcome) -> String {
    if o.timed_out {
        return "killed after timeout".to_string();
    }
    match (o.status, o.signal) {
        (Some(s), _) => format!("status {s}{}", describe_status(s, &o.stderr)),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "not run".to_string(),
    }
}

fn describe_status(s: i32, stderr: &str) -> String {
    let emulation = s == EMULATION_FAILURE_STATUS && parse_emulation_failure_rip(stderr).is_some();
    match s {
        _ if emulation => " (hopvm: KVM emulation failure)".to_string(),
        0 => " (VM shutdown: triple fault or reset)".to_string(),
        2 => " (hopvm: bad arguments)".to_string(),
        GUEST_SKIP_STATUS => " (guest skipped: exit code 77)".to_string(),
        s if s % 2 == 1 => format!(" (guest exit code {})", (s - 1) / 2),
        _ => String::new(),
    }
}

/// The most telling line of the output for a failure message: the first
/// guest `FAIL:`/`ABORT:`/`UNEXPECTED`/`CORRUPT` line, else the last
/// `hopvm:` line of stderr.
fn failure_hint(o: &Outcome) -> Option<String> {
    o.stdout
        .lines()
        .find(|l| {
            l.starts_with("FAIL:")
                || l.starts_with("ABORT:")
                || l.starts_with("UNEXPECTED")
                || l.starts_with("CORRUPT")
        })
        .or_else(|| o.stderr.lines().rev().find(|l| l.contains("hopvm")))
        .or_else(|| o.stderr.lines().rev().find(|l| !l.trim().is_empty()))
        .map(|l| l.trim().to_string())
}

/// Parses the rip from hopvm's emulation failure report in `stderr`
/// (`... emulation failure at rip 0x401234 ...`, case-insensitive).
pub fn parse_emulation_failure_rip(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|line| {
        let lower = line.to_ascii_lowercase();
        let at = lower.find("emulation failure")?;
        let rest = &lower[at..];
        let rip = rest.find("rip")?;
        parse_hex_after(&rest[rip + 3..])
    })
}

/// Parses the address the guest printed as `PREFIX 0x<hex>` (last one wins).
pub fn parse_printed_address(stdout: &str, prefix: &str) -> Option<u64> {
    stdout.lines().rev().find_map(|line| {
        line.find(prefix)
            .and_then(|i| parse_hex_after(&line[i + prefix.len()..]))
    })
}

/// Parses `[ :=]*(0x)?<hex digits>` at the start of `s`.
fn parse_hex_after(s: &str) -> Option<u64> {
    let s = s.trim_start_matches([' ', ':', '=', '\t']);
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let digits: String = s.chars().take_while(char::is_ascii_hexdigit).collect();
    if digits.is_empty() {
        return None;
    }
    u64::from_str_radix(&digits, 16).ok()
}

/// Judges a finished run against the test's expectations.
pub fn judge(spec: &TestSpec, o: &Outcome) -> Verdict {
    if o.timed_out {
        let hint = failure_hint(o)
            .or_else(|| o.stdout.lines().last().map(str::to_string))
            .map_or(String::new(), |h| format!("; last output: {h}"));
        return Verdict::Fail(format!("timeout after {}s{hint}", spec.timeout.as_secs()));
    }
    let status = match (o.status, o.signal) {
        (Some(s), _) => s,
        (None, Some(sig)) => return Verdict::Fail(format!("hopvm killed by signal {sig}")),
        (None, None) => return Verdict::Fail("hopvm did not run".into()),
    };

    if let Some(prefix) = &spec.emulation_failure_at {
        if status == EMULATION_FAILURE_STATUS {
            if let Some(rip) = parse_emulation_failure_rip(&o.stderr) {
                return match parse_printed_address(&o.stdout, prefix) {
                    Some(printed) if printed == rip => Verdict::Pass,
                    Some(printed) => Verdict::Fail(format!(
                        "emulation failure at rip {rip:#x}, but the guest printed \"{prefix} {printed:#x}\""
                    )),
                    None => Verdict::Fail(format!(
                        "emulation failure at rip {rip:#x}, but the guest printed no \"{prefix} 0x...\" line"
                    )),
                };
            }
        }
    }

    if status == GUEST_SKIP_STATUS && spec.expect_status != GUEST_SKIP_STATUS {
        let why = o
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("SKIP:"))
            .map_or("exit code 77".to_string(), |s| s.trim().to_string());
        return Verdict::Skip(format!("guest skipped: {why}"));
    }

    if status != spec.expect_status {
        let mut reason = format!(
            "exit status {status}{}, expected {}{}",
            describe_status(status, &o.stderr),
            spec.expect_status,
            describe_status(spec.expect_status, "")
        );
        if let Some(h) = failure_hint(o) {
            reason.push_str(&format!("; {h}"));
        }
        return Verdict::Fail(reason);
    }

    let combined = format!("{}\n{}", o.stdout, o.stderr);
    for p in &spec.expect_output {
        if !p.is_match(&combined) {
            return Verdict::Fail(format!("output does not contain {p}"));
        }
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;

    fn spec(text: &str) -> TestSpec {
        manifest::parse(&format!("[t]\nfile = x.elf\n{text}"))
            .unwrap()
            .tests
            .remove(0)
    }

    fn outcome(status: i32, stdout: &str, stderr: &str) -> Outcome {
        Outcome {
            status: Some(status),
            signal: None,
            timed_out: false,
            stdout: stdout.into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn judge_status_and_output() {
        let s = spec("expect_output = hello\nexpect_output = /^EXIT: code=0$/\n");
        assert_eq!(
            judge(&s, &outcome(1, "hello\nEXIT: code=0\n", "")),
            Verdict::Pass
        );
        match judge(&s, &outcome(3, "FAIL: thing broke\nEXIT: code=1\n", "")) {
            Verdict::Fail(r) => {
                assert!(
                    r.contains("exit status 3 (guest exit code 1), expected 1"),
                    "{r}"
                );
                assert!(r.contains("FAIL: thing broke"), "{r}");
            }
            v => panic!("{v:?}"),
        }
        match judge(&s, &outcome(1, "EXIT: code=0\n", "")) {
            Verdict::Fail(r) => assert!(r.contains("output does not contain \"hello\""), "{r}"),
            v => panic!("{v:?}"),
        }
        // stderr counts too.
        let s = spec("expect_output = hopvm: note\n");
        assert_eq!(judge(&s, &outcome(1, "", "hopvm: note\n")), Verdict::Pass);
    }

    #[test]
    fn judge_timeout_signal_skip() {
        let s = spec("timeout = 5\n");
        let mut o = outcome(0, "pass 1 ok\n", "");
        o.timed_out = true;
        o.status = None;
        o.signal = Some(9);
        match judge(&s, &o) {
            Verdict::Fail(r) => assert!(
                r.starts_with("timeout after 5s; last output: pass 1 ok"),
                "{r}"
            ),
            v => panic!("{v:?}"),
        }
        let o = Outcome {
            signal: Some(11),
            ..Outcome::default()
        };
        assert_eq!(
            judge(&s, &o),
            Verdict::Fail("hopvm killed by signal 11".into())
        );
        assert_eq!(
            judge(&s, &outcome(155, "SKIP: no XSAVE\nEXIT: code=77\n", "")),
            Verdict::Skip("guest skipped: no XSAVE".into())
        );
        let s = spec("expect_status = 155\n");
        assert_eq!(judge(&s, &outcome(155, "SKIP: x\n", "")), Verdict::Pass);
    }

    #[test]
    fn judge_emulation_failure_rip() {
        let s = spec("expect_status = 43\nexpect_output = xrstor executed\nemulation_failure_at = xrstor at\n");
        let out = "CR4.OSXSAVE enabled\nxrstor at 0x400154\n";
        let err_ok = "hopvm: vcpu 0: emulation failure at rip 0x400154 (64-bit): instruction bytes 0f ae 2f\n";
        assert_eq!(judge(&s, &outcome(3, out, err_ok)), Verdict::Pass);
        // Case-insensitive, different spelling of the rip.
        let err_upper = "HOPVM: VCPU 0: EMULATION FAILURE AT RIP=0X400154\n";
        assert_eq!(judge(&s, &outcome(3, out, err_upper)), Verdict::Pass);
        // Wrong rip.
        let err_bad = "hopvm: vcpu 0: emulation failure at rip 0x400150 (64-bit)\n";
        match judge(&s, &outcome(3, out, err_bad)) {
            Verdict::Fail(r) => assert!(r.contains("0x400150") && r.contains("0x400154"), "{r}"),
            v => panic!("{v:?}"),
        }
        // Guest did not print its address.
        match judge(&s, &outcome(3, "nothing\n", err_ok)) {
            Verdict::Fail(r) => assert!(r.contains("printed no"), "{r}"),
            v => panic!("{v:?}"),
        }
        // Status 3 without an emulation failure report is a guest exit code 1.
        match judge(&s, &outcome(3, "FAIL: x\n", "")) {
            Verdict::Fail(r) => assert!(r.contains("guest exit code 1"), "{r}"),
            v => panic!("{v:?}"),
        }
        // The hardware outcome: XRSTOR executed.
        assert_eq!(
            judge(
                &s,
                &outcome(43, "xrstor at 0x400154\nxrstor executed\n", "")
            ),
            Verdict::Pass
        );
    }

    #[test]
    fn rip_parsing() {
        assert_eq!(
            parse_emulation_failure_rip("x\nhopvm: vcpu 1: emulation failure at rip 0x401234 (64-bit): instruction bytes 0f\n"),
            Some(0x401234)
        );
        assert_eq!(
            parse_emulation_failure_rip("Emulation failure, RIP: 0xABCdef"),
            Some(0xabcdef)
        );
        assert_eq!(
            parse_emulation_failure_rip("emulation failure at rip ?"),
            None
        );
        assert_eq!(parse_emulation_failure_rip("no report"), None);
        assert_eq!(
            parse_printed_address("xrstor at 0x10\nxrstor at 0x20\n", "xrstor at"),
            Some(0x20)
        );
        assert_eq!(
            parse_printed_address("xrstor at nowhere", "xrstor at"),
            None
        );
    }

    #[test]
    fn args_for_hopvm() {
        let s =
            spec("smp = 2\nmemory = 4G\nappend = mem=4096 cpus=2\nextra_params = --initrd 'a b'\n");
        let a: Vec<String> = hopvm_args(&s, Path::new("/img/x.elf"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            a,
            [
                "run",
                "--kernel",
                "/img/x.elf",
                "--memory",
                "4G",
                "--cpus",
                "2",
                "--serial",
                "stdio",
                "--debug-exit",
                "iobase=0xf4,iosize=4",
                "--no-reboot",
                "--cmdline",
                "mem=4096 cpus=2",
                "--initrd",
                "a b",
            ]
        );
        let s = spec("");
        assert!(!hopvm_args(&s, Path::new("x"))
            .iter()
            .any(|a| a == "--cmdline"));
        assert!(hopvm_args(&s, Path::new("x"))
            .iter()
            .any(|a| a == "--no-reboot"));
        let s = spec("no_reboot = false\n");
        assert!(!hopvm_args(&s, Path::new("x"))
            .iter()
            .any(|a| a == "--no-reboot"));
    }

    #[test]
    fn host_resource_skips() {
        let host = HostResources {
            mem_available: Some(1 << 30),
        };
        assert_eq!(host.skip_reason(&spec("smp = 2\n")), None);
        assert_eq!(host.skip_reason(&spec("smp = 4\n")), None);
        assert_eq!(
            host.skip_reason(&spec("memory = 4G\n")),
            Some("needs 4G of memory, host has 1024 MiB available".into())
        );
    }

    #[test]
    fn summary_line() {
        let mut s = Summary {
            passed: 3,
            failed: 1,
            ..Summary::default()
        };
        assert_eq!(s.line(), "3 passed, 1 failed");
        assert!(!s.success());
        s.skipped = 2;
        assert_eq!(s.line(), "3 passed, 1 failed, 2 skipped");
    }

    #[test]
    fn hopvm_search_reports_where_it_looked() {
        let dir = std::env::temp_dir().join(format!("guest-tests-find-{}", std::process::id()));
        let deps = dir.join("target").join("debug").join("deps");
        std::fs::create_dir_all(&deps).unwrap();
        let exe = deps.join("unittests-abc");
        match find_hopvm_near(Some(&exe)) {
            Err(RunnerError::HopvmNotFound { looked }) => {
                assert_eq!(
                    looked,
                    vec![deps.join("hopvm"), dir.join("target/debug/hopvm")]
                );
                let msg = RunnerError::HopvmNotFound { looked }.to_string();
                assert!(
                    msg.contains("target/debug/hopvm") && msg.contains("HOPVM="),
                    "{msg}"
                );
            }
            r => panic!("{r:?}"),
        }
        std::fs::write(dir.join("target/debug/hopvm"), "").unwrap();
        assert_eq!(
            find_hopvm_near(Some(&exe)).unwrap(),
            dir.join("target/debug/hopvm")
        );
        // A binary directly in the profile directory.
        let bin = dir.join("target/debug/hopvm-unittests");
        assert_eq!(
            find_hopvm_near(Some(&bin)).unwrap(),
            dir.join("target/debug/hopvm")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_with_timeout_kills_and_captures() {
        let sh = Path::new("/bin/sh");
        let o = run_with_timeout(
            sh,
            &["-c".into(), "echo out; echo err >&2; exit 7".into()],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!((o.status, o.timed_out), (Some(7), false));
        assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("out\n", "err\n"));

        let start = Instant::now();
        let o = run_with_timeout(
            sh,
            &["-c".into(), "echo started; exec sleep 30".into()],
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(o.timed_out);
        assert_eq!(o.signal, Some(9));
        assert_eq!(o.stdout, "started\n");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn selection() {
        let m = manifest::parse(
            "[a]\nfile = x\ngroups = smoke\n[b]\nfile = x\n[c]\nfile = x\ngroups = nodefault\n",
        )
        .unwrap();
        let mut cfg = RunnerConfig::new(PathBuf::from("/nonexistent/hopvm"));
        cfg.host = HostResources {
            mem_available: None,
        };
        assert_eq!(selection_skip(&m.tests[0], &cfg), None);
        assert!(selection_skip(&m.tests[2], &cfg)
            .unwrap()
            .contains("nodefault"));
        cfg.groups = vec!["smoke".into()];
        assert_eq!(selection_skip(&m.tests[0], &cfg), None);
        assert_eq!(
            selection_skip(&m.tests[1], &cfg),
            Some("not in group smoke".into())
        );
        cfg.groups.clear();
        cfg.names = vec!["c".into()];
        assert_eq!(selection_skip(&m.tests[2], &cfg), None);
        cfg.names = vec!["zzz".into()];
        assert!(matches!(
            run_manifest(&m, &cfg, |_| {}),
            Err(RunnerError::UnknownTest(n)) if n == "zzz"
        ));
    }
}
