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

/// A unix proxy for every connection of a migration (the main channel and each multifd
/// channel), passing both ways and recording what the source sent on each connection.
pub struct MultiProxy {
    /// The source's bytes, one entry per connection in the order they came.
    pub recorded: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    /// A message each time a connection's source side has ended.
    pub done_rx: mpsc::Receiver<()>,
}

impl MultiProxy {
    /// Listens at `path`, connecting each source connection to `dest`. With `cut_after`, the
    /// first connection that starts with the multifd magic in clear (a plaintext multifd
    /// channel) is cut, both ways, once that many of its bytes have passed.
    pub fn start(path: &Path, dest: PathBuf, cut_after: Option<usize>) -> Self {
        let listener = UnixListener::bind(path).unwrap();
        let recorded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = recorded.clone();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut cut_one = false;
            for src in listener.incoming() {
                let Ok(src) = src else { return };
                let Ok(dst) = UnixStream::connect(&dest) else {
                    return;
                };
                let mut magic = [0u8; 4];
                // SAFETY: `magic` is valid for 4 bytes; the descriptor is `src`'s.
                let n = unsafe {
                    libc::recv(
                        std::os::fd::AsRawFd::as_raw_fd(&src),
                        magic.as_mut_ptr().cast(),
                        4,
                        libc::MSG_PEEK | libc::MSG_WAITALL,
                    )
                };
                let cut =
                    cut_after.filter(|_| n == 4 && magic == [0x11, 0x22, 0x33, 0x44] && !cut_one);
                cut_one |= cut.is_some();
                let slot = {
                    let mut r = record.lock().unwrap();
                    r.push(Vec::new());
                    r.len() - 1
                };
                let (mut s2, mut d2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
                // Destination → source (the return path), untouched.
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut d2, &mut s2);
                });
                let (mut s, mut d) = (src, dst);
                let (record, done) = (record.clone(), done_tx.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut passed = 0usize;
                    loop {
                        let n = match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let n = cut.map_or(n, |c| n.min(c - passed));
                        record.lock().unwrap()[slot].extend_from_slice(&buf[..n]);
                        if d.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        passed += n;
                        if cut.is_some_and(|c| passed >= c) {
                            break;
                        }
                    }
                    if cut.is_some() {
                        let _ = s.shutdown(Shutdown::Both);
                        let _ = d.shutdown(Shutdown::Both);
                    } else {
                        let _ = d.shutdown(Shutdown::Write);
                    }
                    let _ = done.send(());
                });
            }
        });
        Self { recorded, done_rx }
    }
}
