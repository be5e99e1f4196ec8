//! hopvm processes as the runner sees them: their output captured in the background (bounded
//! by [`MAX_OUTPUT`]), what a finished one produced ([`Outcome`]), and the exit statuses that mean
//! something to a test. Both the plain runner ([`crate::runner`]) and the migration runner
//! ([`crate::migrate`]) use this; neither imports the other.

use std::ffi::OsString;
use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// hopvm's exit status when KVM reports an emulation failure.
pub const EMULATION_FAILURE_STATUS: i32 = 3;
/// Exit status of a guest that skipped itself (exit code 77).
pub const GUEST_SKIP_STATUS: i32 = (77 << 1) | 1;
/// Captured output is truncated beyond this many bytes per stream.
pub const MAX_OUTPUT: usize = 8 << 20;
/// Interval at which a running child is polled for exit.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// What a finished hopvm process produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Exit status code (None if killed by a signal or not run).
    pub status: Option<i32>,
    /// Signal that killed the process, if any.
    pub signal: Option<i32>,
    /// Whether the run hit the timeout and was killed.
    pub timed_out: bool,
    /// Captured stdout (the guest's serial console).
    pub stdout: String,
    /// Captured stderr (hopvm's own messages).
    pub stderr: String,
}

/// A captured stream: the bytes so far plus a channel that signals EOF.
pub(crate) struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

pub(crate) fn capture(mut r: impl Read + Send + 'static) -> Capture {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let (tx, done) = mpsc::channel();
    let b = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut v = vmm_sync::lock(&b);
                    let room = MAX_OUTPUT.saturating_sub(v.len());
                    v.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
        let _ = tx.send(());
    });
    Capture { buf, done }
}

impl Capture {
    /// The text captured so far.
    pub(crate) fn text(&self) -> String {
        let v = vmm_sync::lock(&self.buf);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// Waits (briefly) for EOF and returns the text captured.
    pub(crate) fn finish(self, grace: Duration) -> String {
        let _ = self.done.recv_timeout(grace);
        let v = vmm_sync::lock(&self.buf);
        let mut s = String::from_utf8_lossy(&v).into_owned();
        if v.len() >= MAX_OUTPUT {
            s.push_str("\n[output truncated]\n");
        }
        s
    }
}

/// Spawns `program args`, captures its output and kills it after `timeout`.
pub fn run_with_timeout(
    program: &Path,
    args: &[OsString],
    timeout: Duration,
) -> std::io::Result<Outcome> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().map(capture);
    let stderr = child.stderr.take().map(capture);
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            // The child may exit between try_wait and kill; both are fine.
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    // Output written just before exit is still in the pipes: wait for EOF,
    // but not forever (a grandchild could hold the pipe open).
    let grace = Duration::from_secs(2);
    let stdout = stdout.map_or_else(String::new, |c| c.finish(grace));
    let stderr = stderr.map_or_else(String::new, |c| c.finish(grace));
    use std::os::unix::process::ExitStatusExt;
    Ok(Outcome {
        status: status.code(),
        signal: status.signal(),
        timed_out,
        stdout,
        stderr,
    })
}
