//! hopvm's tools for people: `hopvm demo`, `hopvm migrate`, `hopvm qmp` and the migration
//! timeline report.
//!
//! They live apart from the VMM on purpose: every one of them is a *client* of a running hopvm.
//! They reach it only through its QMP monitor socket (and, for the demo, by starting `hopvm run`
//! processes), exactly as a user, a script or QEMU's own tools would. So they exercise the
//! interface people depend on rather than the VMM's internals, they can drive a QEMU just as
//! well (except the hopvm-only timeline), and a bug in them cannot harm a guest.
//!
//! * [`migrate`] drives one migration: parameters, `migrate`, live progress from
//!   `query-migrate` polling and the MIGRATION_PASS events, a summary, Ctrl-C =
//!   `migrate_cancel`;
//! * [`demo`] runs a whole live migration on one machine in one command;
//! * [`qmp_shell`] sends one command, or is an interactive shell like QEMU's `qmp-shell`;
//! * [`report`] draws the migration thread's timeline (`x-query-migration-timeline`) as SVG or
//!   writes it as JSON.
//!
//! This module keeps what they share: Ctrl-C handling, connecting to a monitor, and number
//! formatting.

pub mod demo;
pub mod migrate;
pub mod netns;
pub mod qmp_shell;
pub mod report;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use qmp::client::QmpClient;

/// How many SIGINT / SIGTERM / SIGHUP arrived since [`catch_interrupts`].
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    // An atomic add is async-signal-safe: no lock, no allocation.
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
}

/// Turns Ctrl-C (SIGINT), SIGTERM and SIGHUP into a counter the tools poll, so that they can
/// clean up — cancel a migration, stop child processes, delete network namespaces — instead of
/// dying on the spot. Idempotent.
pub fn catch_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction is plain data; all-zero is a valid (empty) value to fill in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_interrupt as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: sa_mask is a valid sigset_t owned by `action`.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: the handler only performs an atomic add, which is async-signal-safe, and
        // `action` is fully initialised; a null old-action pointer is allowed.
        unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) };
    }
}

/// How many interrupt signals arrived so far (0 = none).
pub fn interrupts() -> usize {
    INTERRUPTS.load(Ordering::SeqCst)
}

/// True when both stdout and stderr are terminals: only then are progress bars drawn.
pub fn interactive() -> bool {
    std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// The socket path of a `--qmp` option: `unix:PATH` or a plain path.
pub fn qmp_socket_path(spec: &str) -> PathBuf {
    PathBuf::from(spec.strip_prefix("unix:").unwrap_or(spec))
}

/// Connects to the QMP monitor at `path`, retrying for up to `timeout` while the socket does
/// not exist yet or refuses (a VM that is still starting) — unless its directory does not
/// exist either, which no wait will fix.
pub fn connect_qmp(
    path: &Path,
    timeout: Duration,
) -> Result<QmpClient, qmp::client::QmpClientError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if dir.is_some_and(|d| !d.is_dir()) {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory").into());
    }
    QmpClient::connect_retry(path, timeout)
}

/// Formats a byte count for people: `812 B`, `3.4 KiB`, `48.2 MiB`, `1.50 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value >= 100.0 || value.fract() == 0.0 {
        0
    } else {
        1
    };
    format!("{value:.digits$} {}", UNITS[unit])
}

/// Formats a rate in bytes per second: `31.9 MiB/s`.
pub fn rate(bytes_per_second: f64) -> String {
    format!("{}/s", bytes(bytes_per_second.max(0.0).round() as u64))
}

/// Formats milliseconds: `850 ms`, `3.42 s`, `2 min 5 s`.
pub fn millis(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1000..=119_999 => format!("{:.2} s", ms as f64 / 1e3),
        _ => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// Formats a count with thin groups of three digits: `1 234 567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_for_people() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(48 << 20), "48 MiB");
        assert_eq!(bytes((48 << 20) + (1 << 19)), "48.5 MiB");
        assert_eq!(bytes(256 << 20), "256 MiB");
        assert_eq!(bytes(3 << 30), "3 GiB");
        assert_eq!(rate(32.0 * 1048576.0), "32 MiB/s");
        assert_eq!(millis(21), "21 ms");
        assert_eq!(millis(3421), "3.42 s");
        assert_eq!(millis(125_000), "2 min 5 s");
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1234567), "1 234 567");
        assert_eq!(
            qmp_socket_path("unix:/tmp/a.sock"),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(qmp_socket_path("/tmp/b"), PathBuf::from("/tmp/b"));
    }
}
