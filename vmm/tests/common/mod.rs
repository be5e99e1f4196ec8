//! Helpers shared by the integration tests and benchmarks of the VMM core (the `hopvm` crate's
//! tests include this file too).

#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};

use std::time::{Duration, Instant};
use vmm::instance::Instance;

/// Serial output captured in memory, with a condition variable signalled on every write so a
/// test can wait for the guest to print something without sleeping. Whoever feeds it from a
/// pipe [closes](Capture::close) it at the pipe's end.
#[derive(Clone, Default)]
pub struct Capture(Arc<(Mutex<Captured>, Condvar)>);

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    closed: bool,
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 .0.lock().unwrap().bytes.extend_from_slice(buf);
        self.0 .1.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `text` up to and including its last newline: the lines a writer has finished (a process
/// may write one line in several pieces).
fn complete_lines(text: &str) -> &str {
    text.rfind('\n').map_or("", |i| &text[..=i])
}

impl Capture {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0 .0.lock().unwrap().bytes).into_owned()
    }

    /// Marks the end of the output (the pipe feeding it has closed).
    pub fn close(&self) {
        self.0 .0.lock().unwrap().closed = true;
        self.0 .1.notify_all();
    }

    /// Waits until `pred` holds for the output, or panics after `timeout`.
    pub fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut out = self.0 .0.lock().unwrap();
        while !pred(&String::from_utf8_lossy(&out.bytes)) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; output:\n{}",
                String::from_utf8_lossy(&out.bytes)
            );
            out = self.0 .1.wait_timeout(out, left).unwrap().0;
        }
    }

    /// Like [`Capture::wait_for`], with `pred` seeing only complete lines: what it found is
    /// whole when this returns.
    pub fn wait_for_lines(&self, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) {
        self.wait_for(timeout, what, |t| pred(complete_lines(t)));
    }

    /// Waits until the output has ended (see [`Capture::close`]); false after `timeout`.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut out = self.0 .0.lock().unwrap();
        while !out.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            out = self.0 .1.wait_timeout(out, left).unwrap().0;
        }
        true
    }
}

/// Numbers of the dirty guest's `pass N ok` lines, in order. The guest ends each line with
/// `\r\n`, and a capture may hold a line whose `\r` came but not yet its `\n`: that line counts
/// the same before and after.
pub fn pass_numbers(text: &str) -> impl DoubleEndedIterator<Item = u64> + '_ {
    text.lines().filter_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix("pass ")?
            .strip_suffix(" ok")?
            .parse()
            .ok()
    })
}

/// How many passes the dirty guest has verified.
pub fn passes(text: &str) -> usize {
    pass_numbers(text).count()
}

/// The number of the last `pass N ok` line, if any.
pub fn last_pass(text: &str) -> Option<u64> {
    pass_numbers(text).next_back()
}

/// Migrates the running guest of `src` into `dst` within this process (`dst` listens on `uri`
/// first) and returns how the migration ended (at most 120 s).
pub fn migrate(
    src: &Arc<Instance>,
    dst: &Arc<Instance>,
    uri: &str,
) -> migration::thread::MigrationStatus {
    use migration::thread::MigrationEvent;
    let (tx, rx) = std::sync::mpsc::channel();
    src.migration.add_notifier(move |e| {
        if let MigrationEvent::Status(s) = e {
            if !s.is_running() {
                let _ = tx.send(*s);
            }
        }
    });
    dst.incoming(uri).unwrap();
    src.migrate(uri).unwrap();
    rx.recv_timeout(Duration::from_secs(120))
        .expect("migration ends")
}

/// A `unix:` URI for a socket in a fresh directory of its own under the temporary directory
/// (named after `name` and this process), so that tests running at once never share one.
pub fn unix_uri(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("hopvm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    format!("unix:{}", dir.join("sock").display())
}

/// Migrates the running guest of `src` into `dst` over [`unix_uri`]`(name)`, requires the
/// migration to complete, and waits until the guest has verified `want` passes on the
/// destination (`dst_out`), running and intact.
pub fn migrate_and_verify(
    src: &Arc<Instance>,
    dst: &Arc<Instance>,
    dst_out: &Capture,
    name: &str,
    want: usize,
) {
    let uri = unix_uri(name);
    let status = migrate(src, dst, &uri);
    if let Some(dir) = uri
        .strip_prefix("unix:")
        .and_then(|p| std::path::Path::new(p).parent())
    {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert_eq!(
        status,
        migration::thread::MigrationStatus::Completed,
        "{:?}",
        src.migration.info()
    );
    dst_out.wait_for(Duration::from_secs(120), "passes on the destination", |t| {
        passes(t) >= want || t.contains("CORRUPT")
    });
    let text = dst_out.text();
    assert!(!text.contains("CORRUPT"), "{text}");
    assert_eq!(dst.runstate(), vmm::runstate::RunState::Running);
}
