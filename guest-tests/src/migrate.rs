//! Live migration of a test guest, as kvm-unit-tests' `migration` tests expect
//! from their runner (`scripts/arch-run.bash`).
//!
//! A test with `migrate = yes` runs in two hopvm processes:
//!
//! ```text
//! hopvm run <args> --qmp unix:<dir>/src.sock                                   # source
//! hopvm run <args> --incoming unix:<dir>/mig.sock --qmp unix:<dir>/dst.sock    # destination
//! ```
//!
//! where `<args>` are the test's usual `hopvm run` arguments (the destination
//! gets the same kernel, memory and CPUs; the incoming stream replaces what it
//! loads) and `<dir>` a fresh temporary directory.  When the source's console
//! shows [`MIGRATE_MARKER`] ("Now migrate the VM"; newer tests print
//! "Now migrate the VM, then press a key to continue..."), the runner asks the
//! source over QMP to `migrate` to `unix:<dir>/mig.sock`, polls
//! `query-migrate` until the status is `completed` (or `failed` /
//! `cancelled`), writes a newline to the destination's stdin (which hopvm
//! forwards to COM1, where the guest waits for a key), ends the source with
//! `quit` and waits for the destination to finish.
//!
//! The test is judged like any other by the destination's exit status and by
//! the source's output up to the migration followed by the destination's.
//! QMP goes through hopvm's client (crate `qmp-client`), every read bounded
//! by the test's deadline.

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use qmp_client::{QmpClient, QmpClientError};
use serde_json::{json, Value};

use crate::process::{capture, Capture, Outcome, GUEST_SKIP_STATUS};

/// What a migration test prints when it wants to be migrated.
pub const MIGRATE_MARKER: &str = "Now migrate the VM";
/// How often the runner polls processes and `query-migrate`.
const POLL: Duration = Duration::from_millis(20);
/// How long the source gets to exit after `quit`.
const QUIT_GRACE: Duration = Duration::from_secs(5);

/// The socket paths of one migration run.
#[derive(Clone, Debug)]
pub struct Sockets {
    /// The source's QMP monitor.
    pub src_qmp: PathBuf,
    /// The destination's QMP monitor.
    pub dst_qmp: PathBuf,
    /// The destination's incoming migration socket.
    pub migration: PathBuf,
}

impl Sockets {
    /// The sockets in `dir`.
    pub fn in_dir(dir: &Path) -> Sockets {
        Sockets {
            src_qmp: dir.join("src.sock"),
            dst_qmp: dir.join("dst.sock"),
            migration: dir.join("mig.sock"),
        }
    }

    /// The migration URI, `unix:<path>`.
    pub fn migration_uri(&self) -> String {
        format!("unix:{}", self.migration.display())
    }
}

fn unix_arg(p: &Path) -> OsString {
    let mut s = OsString::from("unix:");
    s.push(p.as_os_str());
    s
}

/// The source's arguments: `base` plus its QMP monitor.
pub fn source_args(base: &[OsString], sockets: &Sockets) -> Vec<OsString> {
    let mut a = base.to_vec();
    a.push("--qmp".into());
    a.push(unix_arg(&sockets.src_qmp));
    a
}

/// The destination's arguments: `base` plus `--incoming` and its QMP monitor.
pub fn destination_args(base: &[OsString], sockets: &Sockets) -> Vec<OsString> {
    let mut a = base.to_vec();
    a.push("--incoming".into());
    a.push(unix_arg(&sockets.migration));
    a.push("--qmp".into());
    a.push(unix_arg(&sockets.dst_qmp));
    a
}

/// A child process that is killed (and reaped) when dropped.
struct Proc {
    child: Child,
    stdout: Option<Capture>,
    stderr: Option<Capture>,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(program: &Path, args: &[OsString], stdin: Stdio) -> io::Result<Proc> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().map(capture);
        let stderr = child.stderr.take().map(capture);
        Ok(Proc {
            child,
            stdout,
            stderr,
            status: None,
        })
    }

    /// Whether it has exited (the status is kept).
    fn exited(&mut self) -> io::Result<bool> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status.is_some())
    }

    /// Waits until `deadline`; kills it then.  Returns whether it was killed.
    fn wait_until(&mut self, deadline: Instant) -> io::Result<bool> {
        while !self.exited()? {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                self.status = Some(self.child.wait()?);
                return Ok(true);
            }
            std::thread::sleep(POLL);
        }
        Ok(false)
    }

    fn stdout_text(&self) -> String {
        self.stdout.as_ref().map_or_else(String::new, Capture::text)
    }

    /// Ends the output capture; returns (stdout, stderr).
    fn finish(&mut self) -> (String, String) {
        let grace = Duration::from_secs(2);
        let out = self
            .stdout
            .take()
            .map_or_else(String::new, |c| c.finish(grace));
        let err = self
            .stderr
            .take()
            .map_or_else(String::new, |c| c.finish(grace));
        (out, err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The result of a migration run: the outcome to judge and, if the run
/// itself went wrong (migration failed, destination died early...), why.
#[derive(Clone, Debug, Default)]
pub struct MigrationOutcome {
    /// Destination status, source output then destination output.
    pub outcome: Outcome,
    /// Why the migration did not happen as it should, if it did not.
    pub failure: Option<String>,
}

/// Runs `program` as source and destination (see the module documentation)
/// with the test's `base` arguments, sockets in `dir`, all within `timeout`.
pub fn run_migration(
    program: &Path,
    base: &[OsString],
    dir: &Path,
    timeout: Duration,
) -> io::Result<MigrationOutcome> {
    let deadline = Instant::now() + timeout;
    let sockets = Sockets::in_dir(dir);
    let dst_args = destination_args(base, &sockets);
    let mut notes: Vec<String> = vec![format!(
        "runner: destination: {} {}",
        program.display(),
        dst_args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    )];

    let mut dst = Proc::spawn(program, &dst_args, Stdio::piped())?;
    let mut dst_in: Option<ChildStdin> = dst.child.stdin.take();
    let mut src = Proc::spawn(program, &source_args(base, &sockets), Stdio::null())?;

    // Wait for the guest to ask.
    let mut failure = None;
    let mut src_timed_out = false;
    let asked = loop {
        if src.stdout_text().contains(MIGRATE_MARKER) {
            break true;
        }
        if src.exited()? {
            break false;
        }
        if dst.exited()? {
            failure = Some(format!(
                "the destination exited ({}) before the migration",
                describe(dst.status)
            ));
            break false;
        }
        if Instant::now() >= deadline {
            src_timed_out = true;
            break false;
        }
        std::thread::sleep(POLL);
    };

    if !asked {
        // Judge the source alone; the destination never got a guest.
        let killed = src.wait_until(Instant::now())?;
        let (stdout, mut stderr) = src.finish();
        let _ = dst.wait_until(Instant::now());
        let (_, dst_err) = dst.finish();
        let status = src.status;
        if failure.is_none()
            && !src_timed_out
            && status.and_then(|s| s.code()) != Some(GUEST_SKIP_STATUS)
        {
            failure = Some(format!(
                "the guest never printed \"{MIGRATE_MARKER}\" (source {})",
                describe(status)
            ));
        }
        for n in &notes {
            append_section(&mut stderr, "", n);
        }
        append_section(&mut stderr, "destination stderr", &dst_err);
        return Ok(MigrationOutcome {
            outcome: outcome_of(status, src_timed_out || killed, stdout, stderr),
            failure,
        });
    }

    // Migrate over the source's QMP monitor.
    let migrated = migrate(&sockets, deadline, &mut notes);
    if let Err(e) = &migrated {
        failure = Some(format!("migration failed: {e}"));
    }
    if migrated.is_ok() {
        // The guest waits for a key on COM1.
        if let Some(w) = dst_in.as_mut() {
            if let Err(e) = w.write_all(b"\n").and_then(|()| w.flush()) {
                notes.push(format!("runner: writing to the destination's stdin: {e}"));
            }
        }
        // The source is paused for good: end it.
        if let Ok(mut qmp) = QmpClient::connect_until(&sockets.src_qmp, Instant::now() + QUIT_GRACE)
        {
            qmp.set_deadline(Some(Instant::now() + QUIT_GRACE));
            let _ = qmp.execute("quit", None);
        }
        src.wait_until(Instant::now() + QUIT_GRACE)?;
    } else {
        src.wait_until(Instant::now())?;
    }
    let dst_deadline = if migrated.is_ok() {
        deadline
    } else {
        Instant::now()
    };
    let dst_killed = dst.wait_until(dst_deadline)?;
    drop(dst_in);

    let (src_out, src_err) = src.finish();
    let (dst_out, dst_err) = dst.finish();
    // One serial console across the switchover: the destination's output goes on exactly
    // where the source's stopped, mid-line if the guest was printing one when it moved.
    let mut stdout = src_out;
    stdout.push_str(&dst_out);
    let mut stderr = src_err;
    for n in &notes {
        append_section(&mut stderr, "", n);
    }
    append_section(&mut stderr, "destination stderr", &dst_err);
    Ok(MigrationOutcome {
        outcome: outcome_of(dst.status, dst_killed && migrated.is_ok(), stdout, stderr),
        failure,
    })
}

fn append_section(s: &mut String, title: &str, text: &str) {
    if text.is_empty() {
        return;
    }
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    if !title.is_empty() {
        s.push_str(&format!("--- {title} ---\n"));
    }
    s.push_str(text);
    if !s.ends_with('\n') {
        s.push('\n');
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("status {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => "unknown status".into(),
        },
        None => "still running".into(),
    }
}

fn outcome_of(
    status: Option<ExitStatus>,
    timed_out: bool,
    stdout: String,
    stderr: String,
) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    Outcome {
        status: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        timed_out,
        stdout,
        stderr,
    }
}

/// Why the runner's migration did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RunnerMigrationError {
    /// The destination's socket never appeared.
    #[error("the destination is not listening on {path}: {source}", path = .path.display())]
    NotListening {
        /// The migration socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The source's monitor could not be reached.
    #[error("source QMP {path}: {source}", path = .path.display())]
    Monitor {
        /// The monitor socket.
        path: PathBuf,
        /// Why.
        source: QmpClientError,
    },
    /// A QMP command failed (a failed command shows the server's description).
    #[error("{command}: {}", qmp_error(.source))]
    Command {
        /// The command.
        command: &'static str,
        /// Its error.
        source: QmpClientError,
    },
    /// The migration ended as `failed` or `cancelled`.
    #[error("query-migrate says {status}: {why}")]
    Ended {
        /// The final status.
        status: String,
        /// `error-desc`.
        why: String,
    },
    /// The deadline passed.
    #[error("timeout; last status {0:?}")]
    Timeout(String),
}

/// A failed command as its description (the runner's notes quote the server), anything else
/// as the client says it.
fn qmp_error(e: &QmpClientError) -> String {
    match e {
        QmpClientError::Command { desc, .. } => desc.clone(),
        e => e.to_string(),
    }
}

/// Asks the source to migrate and waits for the result; notes the steps.
fn migrate(
    sockets: &Sockets,
    deadline: Instant,
    notes: &mut Vec<String>,
) -> Result<(), RunnerMigrationError> {
    wait_for_path(&sockets.migration, deadline).map_err(|source| {
        RunnerMigrationError::NotListening {
            path: sockets.migration.clone(),
            source,
        }
    })?;
    let mut qmp = QmpClient::connect_until(&sockets.src_qmp, deadline).map_err(|source| {
        RunnerMigrationError::Monitor {
            path: sockets.src_qmp.clone(),
            source,
        }
    })?;
    let uri = sockets.migration_uri();
    let command = |command| move |source| RunnerMigrationError::Command { command, source };
    qmp.execute("migrate", Some(json!({ "uri": uri })))
        .map_err(command("migrate"))?;
    let start = Instant::now();
    loop {
        let info = qmp
            .execute("query-migrate", None)
            .map_err(command("query-migrate"))?;
        let status = info.get("status").and_then(Value::as_str).unwrap_or("");
        match status {
            "completed" => {
                notes.push(format!(
                    "runner: migrated to {uri} in {:.2}s",
                    start.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            "failed" | "cancelled" => {
                let why = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no error-desc");
                return Err(RunnerMigrationError::Ended {
                    status: status.to_string(),
                    why: why.to_string(),
                });
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(RunnerMigrationError::Timeout(status.to_string()));
        }
        std::thread::sleep(POLL);
    }
}

fn wait_for_path(path: &Path, deadline: Instant) -> io::Result<()> {
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timeout"));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let s = Sockets::in_dir(Path::new("/t"));
        let base: Vec<OsString> = vec!["run".into(), "--kernel".into(), "k".into()];
        assert_eq!(
            source_args(&base, &s),
            ["run", "--kernel", "k", "--qmp", "unix:/t/src.sock"]
                .map(OsString::from)
                .to_vec()
        );
        assert_eq!(
            destination_args(&base, &s),
            [
                "run",
                "--kernel",
                "k",
                "--incoming",
                "unix:/t/mig.sock",
                "--qmp",
                "unix:/t/dst.sock"
            ]
            .map(OsString::from)
            .to_vec()
        );
        assert_eq!(s.migration_uri(), "unix:/t/mig.sock");
    }
}
