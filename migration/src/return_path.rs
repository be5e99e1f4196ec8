//! The return path: what the destination tells the source over the same connection, and the
//! switchover handshake that keeps exactly one copy of the guest running.
//!
//! # Wire format
//!
//! As QEMU's (`migration/migration.c`, `migrate_send_rp_message`): each message is a be16 type,
//! a be16 length and that many bytes. hopvm sends QEMU's [`MIG_RP_MSG_SHUT`] (be32: 0 = the
//! load succeeded, 1 = it failed) and [`MIG_RP_MSG_PONG`] (the be32 of a `MIG_CMD_PING`), plus
//! two messages of its own in a range QEMU does not use: [`MIG_RP_MSG_X_HOPVM_ERROR`] (the
//! destination's error text, UTF-8, before a failed SHUT) and [`MIG_RP_MSG_X_HOPVM_STARTED`]
//! (the guest runs on the destination).
//!
//! # The switchover handshake
//!
//! With the `return-path` capability the source opens the return path at the start of the
//! stream (QEMU's `MIG_CMD_OPEN_RETURN_PATH` and a `MIG_CMD_PING`) and announces the handshake
//! with [`MIG_CMD_X_HOPVM_SWITCHOVER`]. Then:
//!
//! 1. the source sends the whole stream, the vCPUs stopped, and waits;
//! 2. the destination loads and checks everything and answers SHUT 0 — or the error text and
//!    SHUT 1, after which it exits and the source resumes its guest with that error;
//! 3. the source, once it has the verdict, sends the go-ahead ([`MIG_CMD_X_HOPVM_GO`]: a
//!    `QEMU_VM_COMMAND` record after the stream's end) — or [`MIG_CMD_X_HOPVM_ABORT`] if a
//!    `migrate_cancel` came first, and resumes;
//! 4. the destination starts the guest only on the go-ahead and answers STARTED; the source
//!    completes on STARTED.
//!
//! So the destination never runs a guest the source might resume: until the go-ahead is sent
//! the source can fail or be cancelled safely (the destination, seeing the connection end
//! without a go-ahead, does not start), and once it is sent the source never resumes by
//! itself. If the connection is lost between the go-ahead and STARTED the source cannot know
//! whether the destination runs; it stays paused and `query-migrate` says so.

use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::wire;

/// QEMU's `MIG_RP_MSG_SHUT`: the destination is done; be32 0 = success.
pub const MIG_RP_MSG_SHUT: u16 = 1;
/// QEMU's `MIG_RP_MSG_PONG`: the answer to a `MIG_CMD_PING`, with its be32.
pub const MIG_RP_MSG_PONG: u16 = 2;
/// hopvm: the destination's error text (UTF-8), sent before a failed SHUT.
pub const MIG_RP_MSG_X_HOPVM_ERROR: u16 = 0x7e01;
/// hopvm: the destination got the go-ahead and runs the guest.
pub const MIG_RP_MSG_X_HOPVM_STARTED: u16 = 0x7e02;

/// QEMU's `MIG_CMD_PING` (source → destination): be32, answered with a PONG.
pub const MIG_CMD_PING: u16 = 2;
/// hopvm: the source runs the switchover handshake; the destination waits for its go-ahead.
pub const MIG_CMD_X_HOPVM_SWITCHOVER: u16 = 0x7e01;
/// hopvm: the go-ahead, after the verdict: the destination may start the guest.
pub const MIG_CMD_X_HOPVM_GO: u16 = 0x7e02;
/// hopvm: the source was cancelled after the verdict and resumes; the destination must not
/// start.
pub const MIG_CMD_X_HOPVM_ABORT: u16 = 0x7e03;

/// Longest error text sent back (the rest is cut).
pub const MAX_ERROR_TEXT: usize = 4096;

/// Errors of the return path.
#[derive(Debug, thiserror::Error)]
pub enum ReturnPathError {
    /// Reading or writing the return path failed.
    #[error("return path i/o: {0}")]
    Io(#[from] io::Error),
    /// A message this side does not know, or with a wrong length.
    #[error("invalid return-path message {kind:#06x} (length {len})")]
    BadMessage {
        /// Its type.
        kind: u16,
        /// Its length.
        len: u16,
    },
    /// The record after the stream is not a go-ahead or abort command.
    #[error("expected the source's go-ahead after the stream, found {0}")]
    BadGoAhead(String),
}

/// A message on the return path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpMessage {
    /// QEMU's SHUT: `true` when the load failed.
    Shut {
        /// The load failed.
        failed: bool,
    },
    /// QEMU's PONG.
    Pong(u32),
    /// hopvm: why the load failed.
    Error(String),
    /// hopvm: the destination runs the guest.
    Started,
}

impl RpMessage {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, data): (u16, Vec<u8>) = match self {
            RpMessage::Shut { failed } => {
                (MIG_RP_MSG_SHUT, u32::from(*failed).to_be_bytes().into())
            }
            RpMessage::Pong(v) => (MIG_RP_MSG_PONG, v.to_be_bytes().into()),
            RpMessage::Error(text) => {
                let mut end = text.len().min(MAX_ERROR_TEXT);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                (MIG_RP_MSG_X_HOPVM_ERROR, text.as_bytes()[..end].to_vec())
            }
            RpMessage::Started => (MIG_RP_MSG_X_HOPVM_STARTED, Vec::new()),
        };
        let mut b = Vec::with_capacity(4 + data.len());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u16).to_be_bytes());
        b.extend_from_slice(&data);
        b
    }

    /// Writes the message and flushes.
    pub fn send(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(&self.encode())?;
        w.flush()
    }

    /// Reads one message; `Ok(None)` at a clean end of the return path.
    pub fn read(r: &mut dyn Read) -> Result<Option<Self>, ReturnPathError> {
        let mut head = [0u8; 4];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = u16::from_be_bytes([head[2], head[3]]);
        let bad = ReturnPathError::BadMessage { kind, len };
        let data = wire::read_vec(r, usize::from(len))?;
        let be32 = |d: &[u8]| -> Option<u32> { Some(u32::from_be_bytes(d.try_into().ok()?)) };
        Ok(Some(match kind {
            MIG_RP_MSG_SHUT => RpMessage::Shut {
                failed: be32(&data).ok_or(bad)? != 0,
            },
            MIG_RP_MSG_PONG => RpMessage::Pong(be32(&data).ok_or(bad)?),
            MIG_RP_MSG_X_HOPVM_ERROR => {
                RpMessage::Error(String::from_utf8_lossy(&data).into_owned())
            }
            MIG_RP_MSG_X_HOPVM_STARTED if data.is_empty() => RpMessage::Started,
            _ => return Err(bad),
        }))
    }
}

/// What the source learnt from the destination about the load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything loaded and checked: the destination waits for the go-ahead.
    Loaded,
    /// The load failed, with the destination's reason.
    Failed(String),
    /// The return path ended (or broke) without a verdict.
    Lost(String),
    /// [`SourceReturnPath::wake`] was called (a `migrate_cancel`).
    Woken,
}

#[derive(Debug, Default)]
struct State {
    verdict: Option<Verdict>,
    error_text: Option<String>,
    started: bool,
    /// Why the return path ended, once it has.
    ended: Option<String>,
    woken: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// The source's end: a thread that reads the destination's messages.
pub struct SourceReturnPath {
    shared: Shared,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SourceReturnPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceReturnPath").finish_non_exhaustive()
    }
}

/// Wakes a [`SourceReturnPath`] waiter from another thread.
#[derive(Clone)]
pub struct ReturnPathWaker(Shared);

impl ReturnPathWaker {
    /// Ends a wait in progress (or the next one) with [`Verdict::Woken`].
    pub fn wake(&self) {
        let (m, c) = &*self.0;
        vmm_sync::lock(m).woken = true;
        c.notify_all();
    }
}

impl SourceReturnPath {
    /// Starts reading `reader`. `on_failure` runs (on the reader thread) when the destination
    /// reports a failed load, so the sender can stop at once instead of writing on.
    pub fn spawn(
        mut reader: Box<dyn Read + Send>,
        on_failure: Box<dyn Fn() + Send>,
    ) -> io::Result<Self> {
        let shared: Shared = Arc::default();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(String::from("migration-rp"))
            .spawn(move || {
                let (m, c) = &*s;
                let ended = loop {
                    let msg = RpMessage::read(reader.as_mut());
                    let mut st = vmm_sync::lock(m);
                    match msg {
                        Ok(Some(RpMessage::Shut { failed: false })) => {
                            st.verdict.get_or_insert(Verdict::Loaded);
                        }
                        Ok(Some(RpMessage::Shut { failed: true })) => {
                            let why = st.error_text.clone().unwrap_or_else(|| {
                                String::from("the destination reported a failed load")
                            });
                            st.verdict.get_or_insert(Verdict::Failed(why));
                            drop(st);
                            c.notify_all();
                            on_failure();
                            continue;
                        }
                        Ok(Some(RpMessage::Error(text))) => st.error_text = Some(text),
                        Ok(Some(RpMessage::Started)) => st.started = true,
                        Ok(Some(RpMessage::Pong(v))) => log::debug!("return path: pong {v}"),
                        Ok(None) => break String::from("the destination closed the connection"),
                        Err(e) => break e.to_string(),
                    }
                    drop(st);
                    c.notify_all();
                };
                let mut st = vmm_sync::lock(m);
                st.ended = Some(ended);
                drop(st);
                c.notify_all();
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// A handle that ends a wait from another thread.
    pub fn waker(&self) -> ReturnPathWaker {
        ReturnPathWaker(self.shared.clone())
    }

    /// Waits for the destination's verdict on the load (no time limit: a destination that is
    /// still loading is waited for; one that dies ends the connection and the wait).
    pub fn wait_verdict(&self) -> Verdict {
        let (m, c) = &*self.shared;
        let mut st = vmm_sync::lock(m);
        loop {
            if let Some(v) = &st.verdict {
                return v.clone();
            }
            if st.woken {
                return Verdict::Woken;
            }
            if let Some(why) = &st.ended {
                return Verdict::Lost(why.clone());
            }
            st = vmm_sync::wait(c, st);
        }
    }

    /// Waits up to `timeout` for STARTED; false if the return path ended or time ran out.
    pub fn wait_started(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, c) = &*self.shared;
        let mut st = vmm_sync::lock(m);
        loop {
            if st.started {
                return true;
            }
            let now = Instant::now();
            if st.ended.is_some() || now >= deadline {
                return false;
            }
            st = c
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The destination's error, if it reported one: waits up to `timeout` for the return path
    /// to deliver it (a failed write on the main channel usually means the destination gave
    /// up, and its reason is on the way).
    pub fn destination_error(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, c) = &*self.shared;
        let mut st = vmm_sync::lock(m);
        loop {
            if let Some(Verdict::Failed(why)) = &st.verdict {
                return Some(why.clone());
            }
            let now = Instant::now();
            if st.ended.is_some() || now >= deadline {
                return st.error_text.clone();
            }
            st = c
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for SourceReturnPath {
    /// The reader thread ends when the connection does (the channel is closed or shut down
    /// by then); it is not joined here, so a destination that keeps the connection open
    /// cannot hold the migration thread.
    fn drop(&mut self) {
        drop(self.thread.take());
    }
}

/// Writes the go-ahead (or abort) command record after the stream.
pub fn send_command(w: &mut dyn Write, cmd: u16) -> io::Result<()> {
    let mut b = [0u8; 5];
    b[0] = crate::stream::QEMU_VM_COMMAND;
    b[1..3].copy_from_slice(&cmd.to_be_bytes());
    w.write_all(&b)?;
    w.flush()
}

/// What the source said after the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoAhead {
    /// Start the guest.
    Go,
    /// The source was cancelled and resumes: do not start.
    Abort,
}

/// The destination reads the source's go-ahead command record after the stream.
pub fn read_go_ahead(r: &mut dyn Read) -> Result<GoAhead, ReturnPathError> {
    let mut b = [0u8; 5];
    r.read_exact(&mut b)?;
    let cmd = u16::from_be_bytes([b[1], b[2]]);
    let len = u16::from_be_bytes([b[3], b[4]]);
    match (b[0], cmd, len) {
        (crate::stream::QEMU_VM_COMMAND, MIG_CMD_X_HOPVM_GO, 0) => Ok(GoAhead::Go),
        (crate::stream::QEMU_VM_COMMAND, MIG_CMD_X_HOPVM_ABORT, 0) => Ok(GoAhead::Abort),
        _ => Err(ReturnPathError::BadGoAhead(format!("bytes {b:02x?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_in_qemu_framing() {
        for m in [
            RpMessage::Shut { failed: false },
            RpMessage::Shut { failed: true },
            RpMessage::Pong(7),
            RpMessage::Error(String::from("unknown section cpu (instance 1)")),
            RpMessage::Started,
        ] {
            let b = m.encode();
            assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])), b.len() - 4);
            assert_eq!(RpMessage::read(&mut &b[..]).unwrap(), Some(m));
        }
        // QEMU's SHUT(0) exactly.
        assert_eq!(
            RpMessage::Shut { failed: false }.encode(),
            [0, 1, 0, 4, 0, 0, 0, 0]
        );
        assert_eq!(RpMessage::read(&mut &[][..]).unwrap(), None);
    }

    #[test]
    fn bad_messages_are_errors() {
        for b in [
            &[0u8, 1, 0, 3, 0, 0, 0][..],
            &[0x12, 0x34, 0, 0],
            &[0, 1, 0, 4, 0],
        ] {
            assert!(RpMessage::read(&mut &b[..]).is_err(), "{b:?}");
        }
    }

    #[test]
    fn long_error_text_is_cut_at_a_char_boundary() {
        let text = "é".repeat(MAX_ERROR_TEXT);
        let b = RpMessage::Error(text).encode();
        match RpMessage::read(&mut &b[..]).unwrap() {
            Some(RpMessage::Error(t)) => {
                assert!(t.len() <= MAX_ERROR_TEXT && !t.contains('\u{fffd}'))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn go_ahead_framing() {
        let mut b = Vec::new();
        send_command(&mut b, MIG_CMD_X_HOPVM_GO).unwrap();
        assert_eq!(read_go_ahead(&mut &b[..]).unwrap(), GoAhead::Go);
        b.clear();
        send_command(&mut b, MIG_CMD_X_HOPVM_ABORT).unwrap();
        assert_eq!(read_go_ahead(&mut &b[..]).unwrap(), GoAhead::Abort);
        assert!(read_go_ahead(&mut &[0x08, 0, 2, 0, 0][..]).is_err());
        assert!(read_go_ahead(&mut &[0x08][..]).is_err());
    }

    #[test]
    fn source_side_reports_failure_with_the_destination_text() {
        let mut bytes = RpMessage::Pong(1).encode();
        bytes.extend(RpMessage::Error(String::from("ram layout differs")).encode());
        bytes.extend(RpMessage::Shut { failed: true }.encode());
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = failed.clone();
        let rp = SourceReturnPath::spawn(
            Box::new(io::Cursor::new(bytes)),
            Box::new(move || f.store(true, std::sync::atomic::Ordering::SeqCst)),
        )
        .unwrap();
        assert_eq!(
            rp.wait_verdict(),
            Verdict::Failed(String::from("ram layout differs"))
        );
        assert_eq!(
            rp.destination_error(Duration::from_secs(5)).as_deref(),
            Some("ram layout differs")
        );
        assert!(!rp.wait_started(Duration::from_secs(5)));
        assert!(failed.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn source_side_verdict_then_started() {
        let mut bytes = RpMessage::Shut { failed: false }.encode();
        bytes.extend(RpMessage::Started.encode());
        let rp =
            SourceReturnPath::spawn(Box::new(io::Cursor::new(bytes)), Box::new(|| {})).unwrap();
        assert_eq!(rp.wait_verdict(), Verdict::Loaded);
        assert!(rp.wait_started(Duration::from_secs(5)));
    }

    #[test]
    fn a_closed_return_path_is_a_lost_verdict_and_a_waker_ends_the_wait() {
        let rp = SourceReturnPath::spawn(Box::new(io::empty()), Box::new(|| {})).unwrap();
        assert!(matches!(rp.wait_verdict(), Verdict::Lost(_)));
        // A return path that stays open: only the waker ends the wait.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let rp = SourceReturnPath::spawn(Box::new(a), Box::new(|| {})).unwrap();
        let w = rp.waker();
        let t = std::thread::spawn(move || w.wake());
        assert_eq!(rp.wait_verdict(), Verdict::Woken);
        t.join().unwrap();
    }
}
