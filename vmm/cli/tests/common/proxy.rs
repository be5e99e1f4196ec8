//! A unix-socket proxy between a migration source and its destination that parses the
//! return path (QEMU framing: be16 type, be16 length, data) and can cut, hold or drop it at
//! each step of the switchover handshake, or cut the whole connection at a chosen moment; or
//! passes both ways as they come and records what the source sent (a capture of the wire).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// What the proxy does with the destination's return-path messages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Policy {
    /// Pass everything.
    Forward,
    /// Swallow the verdict (SHUT) and cut both connections.
    CutAtVerdict,
    /// Pass the verdict, swallow STARTED and cut both connections.
    CutAtStarted,
    /// Pass the verdict, then stop passing anything either way and close the destination's
    /// side: the go-ahead is lost.
    LoseGoAhead,
    /// Hold the verdict until told to go on; report when it arrives.
    HoldVerdict,
    /// Pass everything, and cut both connections this long after the source connected.
    CutAfter(Duration),
    /// Pass both ways without parsing (the channel may be encrypted), and record the
    /// source's bytes ([`Proxy::recorded`]).
    Record,
}

const SHUT: u16 = 1;
const STARTED: u16 = 0x7e02;

/// A unix-socket proxy between a source and a destination that parses the return path.
pub struct Proxy {
    /// Where the source connects.
    pub path: PathBuf,
    messages: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// A message per verdict held ([`Policy::HoldVerdict`]).
    pub verdict_rx: mpsc::Receiver<()>,
    /// Releases a held verdict (or, with [`Policy::LoseGoAhead`], the silent connection).
    pub release_tx: mpsc::Sender<()>,
    recorded: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Tells when the source's side has ended (the whole stream is recorded).
    pub done_rx: mpsc::Receiver<()>,
}

impl Proxy {
    /// Listens at `path` and, once the source connects, connects to `dest`.
    pub fn start(path: &Path, dest: &Path, policy: Policy) -> Self {
        let listener = UnixListener::bind(path).unwrap();
        let dest = dest.to_owned();
        let messages = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = messages.clone();
        let (verdict_tx, verdict_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let recorded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = (policy == Policy::Record).then(|| recorded.clone());
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (src, _) = listener.accept().unwrap();
            let Ok(dst) = UnixStream::connect(&dest) else {
                return;
            };
            if let Policy::CutAfter(delay) = policy {
                let (a, b) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let _ = a.shutdown(Shutdown::Both);
                    let _ = b.shutdown(Shutdown::Both);
                });
            }
            let (mut src_r, mut dst_w) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let forward_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stop = forward_stop.clone();
            // Source → destination: the stream, passed as it comes.
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = match src_r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        continue;
                    }
                    if let Some(r) = &record {
                        r.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    if dst_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = dst_w.shutdown(Shutdown::Write);
                let _ = done_tx.send(());
            });
            // Destination → source: message by message.
            let (mut dst_r, mut src_w) = (dst, src);
            let cut = |a: &UnixStream, b: &UnixStream| {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            };
            if policy == Policy::Record {
                let _ = std::io::copy(&mut dst_r, &mut src_w);
                let _ = src_w.shutdown(Shutdown::Write);
                return;
            }
            loop {
                let mut head = [0u8; 4];
                if dst_r.read_exact(&mut head).is_err() {
                    break;
                }
                let kind = u16::from_be_bytes([head[0], head[1]]);
                let mut data = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]]))];
                if dst_r.read_exact(&mut data).is_err() {
                    break;
                }
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match (policy, kind) {
                    (Policy::CutAtVerdict, SHUT) | (Policy::CutAtStarted, STARTED) => {
                        cut(&dst_r, &src_w);
                        break;
                    }
                    (Policy::HoldVerdict, SHUT) => {
                        let _ = verdict_tx.send(());
                        let _ = release_rx.recv();
                    }
                    // Stop passing the source's bytes *before* it sees the verdict: its
                    // go-ahead follows at once and must not slip through. (The whole stream
                    // is through already: the destination answers only after loading it.)
                    (Policy::LoseGoAhead, SHUT) => {
                        forward_stop.store(true, std::sync::atomic::Ordering::SeqCst)
                    }
                    _ => {}
                }
                if src_w
                    .write_all(&head)
                    .and_then(|()| src_w.write_all(&data))
                    .is_err()
                {
                    break;
                }
                if (policy, kind) == (Policy::LoseGoAhead, SHUT) {
                    let _ = dst_r.shutdown(Shutdown::Both);
                    // The source's side stays open and silent.
                    let _ = release_rx.recv();
                    break;
                }
            }
            drop(src_w);
        });
        Self {
            path: path.to_owned(),
            messages,
            verdict_rx,
            release_tx,
            recorded,
            done_rx,
        }
    }

    /// What the source sent so far ([`Policy::Record`]).
    pub fn recorded(&self) -> Vec<u8> {
        self.recorded.lock().unwrap().clone()
    }

    /// Return-path messages seen so far.
    pub fn return_messages(&self) -> usize {
        self.messages.load(std::sync::atomic::Ordering::SeqCst)
    }
}
