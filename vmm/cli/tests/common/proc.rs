//! Running `hopvm` processes with a QMP monitor, for the multi-process tests.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qmp::client::QmpClient;
use serde_json::{json, Value};

use super::Capture;

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory named after `name`.
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("hopvm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    /// A path inside.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running hopvm with its serial output captured and a QMP connection.
pub struct Hopvm {
    /// The process.
    pub child: Child,
    /// The monitor.
    pub qmp: QmpClient,
    /// COM1 output (stdout).
    pub out: Capture,
    /// stderr.
    pub err: Capture,
    /// The monitor socket.
    pub qmp_path: PathBuf,
}

/// Copies `from` into `to` on a thread until it ends, then closes `to`.
pub fn pump(mut from: impl Read + Send + 'static, mut to: Capture) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            std::io::Write::write_all(&mut to, &buf[..n]).unwrap();
        }
        to.close();
    })
}

/// Starts `hopvm run ARGS --serial stdio` without a monitor; returns the process and its
/// captured stdout and stderr.
pub fn spawn_plain(args: &[&str]) -> (Child, Capture, Capture) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hopvm"))
        .arg("run")
        .args(args)
        .args(["--serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hopvm starts");
    let (out, err) = (Capture::default(), Capture::default());
    pump(child.stdout.take().unwrap(), out.clone());
    pump(child.stderr.take().unwrap(), err.clone());
    (child, out, err)
}

impl Hopvm {
    /// Starts `hopvm run ARGS --qmp unix:<dir>/<name>.sock --serial stdio`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Self {
        Self::spawn_with(dir, name, args, |_| {})
    }

    /// Like [`Hopvm::spawn`], letting the caller adjust the command (e.g. to pass fds).
    pub fn spawn_with(
        dir: &Path,
        name: &str,
        args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        let qmp_path = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hopvm"));
        cmd.arg("run")
            .args(args)
            .arg("--qmp")
            .arg(format!("unix:{}", qmp_path.display()))
            .args(["--serial", "stdio"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("hopvm starts");
        let (out, err) = (Capture::default(), Capture::default());
        pump(child.stdout.take().unwrap(), out.clone());
        pump(child.stderr.take().unwrap(), err.clone());
        let qmp = match QmpClient::connect_retry(&qmp_path, Duration::from_secs(30)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                panic!("cannot reach {name}'s monitor: {e}; stderr: {}", err.text());
            }
        };
        Self {
            child,
            qmp,
            out,
            err,
            qmp_path,
        }
    }

    /// Runs a QMP command that must succeed.
    pub fn cmd(&mut self, command: &str, args: Value) -> Value {
        let args = if args.is_null() { None } else { Some(args) };
        self.qmp
            .execute(command, args)
            .unwrap_or_else(|e| panic!("{command}: {e}; stderr: {}", self.err.text()))
    }

    /// The run state.
    pub fn status(&mut self) -> String {
        self.cmd("query-status", Value::Null)["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits for the MIGRATION event with `status` (the `events` capability must be on).
    pub fn wait_migration(&mut self, status: &str, timeout: Duration) {
        let want = json!(status);
        if let Err(e) = self
            .qmp
            .wait_event("MIGRATION", timeout, |d| d["status"] == want)
        {
            panic!("no MIGRATION {status}: {e}; stderr: {}", self.err.text());
        }
    }

    /// The guest is running here and goes on verifying its memory: two more `pass N ok`
    /// lines (at most `timeout`), and never `CORRUPT`.
    pub fn runs_intact(&mut self, timeout: Duration) {
        assert_eq!(self.status(), "running", "stderr: {}", self.err.text());
        let before = super::passes(&self.out.text());
        self.out.wait_for(timeout, "two more verified passes", |t| {
            super::passes(t) >= before + 2 || t.contains("CORRUPT")
        });
        let text = self.out.text();
        assert!(!text.contains("CORRUPT"), "{text}");
    }

    /// Saves the guest to `file` with `exec:cat > file`, unthrottled, and waits for the
    /// migration to complete (the `events` capability must be on).
    pub fn save_to_file(&mut self, file: &Path, timeout: Duration) {
        self.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
        self.cmd(
            "migrate",
            json!({"uri": format!("exec:cat > {}", file.display())}),
        );
        self.wait_migration("completed", timeout);
    }

    /// Waits for the process to end and returns its exit code; its output is then complete
    /// (unless a child it started still holds the pipes when `timeout` runs out).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                self.out.wait_closed(left);
                self.err.wait_closed(left);
                return s.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Hopvm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hopvm run ARGS` inside network namespace `ns` (`ip netns exec`), for `Hopvm::spawn_with`.
pub fn in_netns(ns: &str) -> impl FnOnce(&mut Command) + '_ {
    move |cmd: &mut Command| {
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut wrapped = Command::new("ip");
        wrapped.args(["netns", "exec", ns]).arg(program).args(args);
        wrapped
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        *cmd = wrapped;
    }
}
