//! `exec:COMMAND`: the stream goes through a shell command (`sh -c COMMAND`), as in QEMU —
//! outgoing into its stdin (stdout to /dev/null), incoming from its stdout (stdin from
//! /dev/null); stderr stays hopvm's.
//!
//! The command is always reaped, and its failure is the migration's failure: outgoing,
//! [`Outgoing::finish`](super::Outgoing::finish) closes stdin, waits and reports a non-zero
//! exit; incoming, the reader reports it when the output ends. A channel dropped unfinished
//! (the migration failed) stops the command: a short grace period, then SIGKILL.
//!
//! The command stays in hopvm's process group, like QEMU's, so that a command such as `ssh`
//! can still prompt on the terminal. Shutting the channel down kills the command itself; a
//! command that leaves background children holding the pipe may therefore not unblock a
//! writer (`exec:` commands normally `exec` into, or are, the data mover).

use std::io::{self, Read};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::TransportError;

fn shell(cmd: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd).stderr(Stdio::inherit());
    c
}

/// A running `exec:` command shared between the outgoing channel and its shutdown handles.
///
/// The child is reaped only under the mutex, and killing also happens under the mutex (by
/// `Child::kill`, which does nothing once the child has been reaped), so a kill can never hit
/// a recycled pid.
pub(super) struct ChildSlot {
    child: Mutex<Child>,
    command: String,
}

impl ChildSlot {
    /// The command line.
    pub(super) fn command(&self) -> &str {
        &self.command
    }

    /// Kills the command (no-op once it has been reaped).
    pub(super) fn kill(&self) -> io::Result<()> {
        match vmm_sync::lock(&self.child).kill() {
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(()),
            r => r,
        }
    }

    /// Whether the command has exited (reaping it if so).
    pub(super) fn exited(&self) -> bool {
        !matches!(vmm_sync::lock(&self.child).try_wait(), Ok(None))
    }

    /// Waits for the command to exit and reaps it. The wait itself happens without the lock
    /// (`waitid` with `WNOWAIT` leaves the child unreaped), so a shutdown handle can still
    /// kill a command that does not exit.
    pub(super) fn wait(&self) -> io::Result<ExitStatus> {
        let pid = vmm_sync::lock(&self.child).id();
        // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: `info` is a valid siginfo_t to write to. With WNOWAIT the child is not
            // reaped, so `pid` stays ours until the reaping `wait` below; if the child was
            // already reaped (by `exited`), waitid fails with ECHILD, which is fine.
            let rc =
                unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if rc == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break;
            }
        }
        vmm_sync::lock(&self.child).wait()
    }

    /// Stops a command whose channel was abandoned: waits briefly for it to exit on its own
    /// (its stdin is closed by now), then kills it, and reaps it.
    pub(super) fn abort(&self) {
        for _ in 0..10 {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.kill();
        let _ = vmm_sync::lock(&self.child).wait();
    }
}

/// Starts `cmd` for an outgoing migration.
pub(super) fn spawn_outgoing(cmd: &str) -> Result<(ChildStdin, ChildSlot), TransportError> {
    let mut child = shell(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|source| TransportError::Spawn {
            command: cmd.to_owned(),
            source,
        })?;
    let Some(stdin) = child.stdin.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(TransportError::Spawn {
            command: cmd.to_owned(),
            source: io::Error::other("no stdin pipe"),
        });
    };
    Ok((
        stdin,
        ChildSlot {
            child: Mutex::new(child),
            command: cmd.to_owned(),
        },
    ))
}

/// The incoming stream: the command's stdout, reporting its exit status at the end.
pub(super) struct ExecReader {
    stdout: ChildStdout,
    child: Child,
    command: String,
    reaped: bool,
}

/// Starts `cmd` for an incoming migration.
pub(super) fn spawn_incoming(cmd: &str) -> Result<ExecReader, TransportError> {
    let mut child = shell(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| TransportError::Spawn {
            command: cmd.to_owned(),
            source,
        })?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(TransportError::Spawn {
            command: cmd.to_owned(),
            source: io::Error::other("no stdout pipe"),
        });
    };
    Ok(ExecReader {
        stdout,
        child,
        command: cmd.to_owned(),
        reaped: false,
    })
}

impl Read for ExecReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.reaped {
            self.reaped = true;
            let status = self.child.wait()?;
            if !status.success() {
                return Err(io::Error::other(
                    TransportError::CommandFailed {
                        command: self.command.clone(),
                        status,
                    }
                    .to_string(),
                ));
            }
        }
        Ok(n)
    }
}

impl Drop for ExecReader {
    /// The loader stopped reading early (done or failed): stop and reap the command.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
