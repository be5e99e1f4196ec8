//! Issue 14, point 5: races and holes that lost or doubled a guest, each reproduced between
//! real hopvm processes.
//!
//! * A reset during a migration drops the guest's pages on the source; every one of them must
//!   reach the destination again (checked by comparing the two sides' RAM with `pmemsave`).
//! * A `migrate_cancel` that arrives once the whole stream has been handed to the transport is
//!   too late: the source must not resume a guest the destination can start.
//! * The destination's monitor answers while its incoming stream stalls.

mod common;

use std::time::{Duration, Instant};

use common::passes;
use common::proc::{spawn_plain, Hopvm, TempDir};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(120);
const MEMORY: &str = "16M";
const MEMORY_BYTES: u64 = 16 << 20;

fn dirty(ws: &str) -> Vec<String> {
    common::tools::dirty_args(MEMORY, ws)
}

use common::tools::strs;

fn events_on(vm: &mut Hopvm) {
    vm.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
}

/// All of `vm`'s guest RAM, through QMP `pmemsave`.
fn ram(vm: &mut Hopvm, dir: &TempDir, name: &str) -> Vec<u8> {
    let path = dir.join(name);
    vm.cmd(
        "pmemsave",
        json!({"val": 0, "size": MEMORY_BYTES, "filename": path.display().to_string()}),
    );
    std::fs::read(&path).unwrap()
}

/// The first page where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(4096)
        .zip(b.chunks(4096))
        .position(|(x, y)| x != y)
        .map(|p| p * 4096)
}

#[test]
fn reset_during_migration_reaches_the_destination() {
    let dir = TempDir::new("reset-mig");
    let mut src = Hopvm::spawn(&dir.0, "src", &strs(&dirty("1M")));
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Hopvm::spawn(
        &dir.0,
        "dst",
        &["--memory", MEMORY, "--incoming", &uri, "--paused"],
    );
    events_on(&mut src);
    // Slow enough never to converge while the guest runs: every page is sent at least once
    // (the bulk pass) before the reset.
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 4 << 20}));
    src.cmd("migrate", json!({"uri": uri}));
    src.qmp
        .wait_event("MIGRATION_PASS", LONG, |d| d["pass"].as_u64() >= Some(2))
        .unwrap();
    // Now a trickle, so the migration is still running after the reset, with the guest
    // stopped so that nothing but the reset changes its memory.
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 1}));
    src.cmd("stop", Value::Null);
    src.cmd("system_reset", Value::Null);
    assert_eq!(src.cmd("query-migrate", Value::Null)["status"], "active");
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.wait_migration("completed", LONG);
    assert_eq!(src.status(), "postmigrate");
    let deadline = Instant::now() + LONG;
    while dst.status() != "paused" {
        assert!(Instant::now() < deadline, "{}", dst.err.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (a, b) = (
        ram(&mut src, &dir, "src.ram"),
        ram(&mut dst, &dir, "dst.ram"),
    );
    assert_eq!(a.len() as u64, MEMORY_BYTES);
    if let Some(at) = first_difference(&a, &b) {
        panic!("destination RAM differs from the source's from page {at:#x} on");
    }
    // The destination runs the reset guest from its start.
    dst.cmd("cont", Value::Null);
    dst.out
        .wait_for(LONG, "passes on the destination", |t| passes(t) >= 1);
    assert!(!dst.out.text().contains("CORRUPT"), "{}", dst.out.text());
}

/// Makes a FIFO.
fn mkfifo(path: &std::path::Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn cancel_after_the_last_byte_is_too_late() {
    let dir = TempDir::new("late-cancel");
    let mut src = Hopvm::spawn(&dir.0, "src", &strs(&dirty("256K")));
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    events_on(&mut src);
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    let file = dir.join("vm.img");
    let gate = dir.join("gate");
    mkfifo(&gate);
    // The command takes the whole stream, then waits at the gate before it exits.
    src.cmd(
        "migrate",
        json!({"uri": format!("exec:cat > {} && read x < {}", file.display(), gate.display())}),
    );
    // Wait until the whole stream (it ends with the JSON VM description) is in the file.
    let deadline = Instant::now() + LONG;
    loop {
        let bytes = std::fs::read(&file).unwrap_or_default();
        let end = bytes.iter().rposition(|&b| b != b' ');
        if bytes.len() > 4096 && end.is_some_and(|e| bytes[e] == b'}') {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream never reached the file"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(src.cmd("query-migrate", Value::Null)["status"], "active");
    src.cmd("migrate_cancel", Value::Null);
    std::fs::write(&gate, b"go\n").unwrap();
    src.wait_migration("completed", LONG);
    assert_eq!(src.status(), "postmigrate");
    // The stream is whole: a destination loads it and runs the one copy of the guest.
    let (mut child, out, err) = spawn_plain(&[
        "--memory",
        MEMORY,
        "--incoming",
        &format!("exec:cat {}", file.display()),
    ]);
    out.wait_for(LONG, "passes on the destination", |t| passes(t) >= 1);
    assert!(!out.text().contains("CORRUPT"), "{}", out.text());
    let _ = child.kill();
    let _ = child.wait();
    assert!(!err.text().contains("panicked"), "{}", err.text());
}

#[test]
fn destination_monitor_answers_while_the_stream_stalls() {
    let dir = TempDir::new("stall-mon");
    let sock = dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", MEMORY, "--incoming", &uri]);
    // A "source" that sends the start of a stream (header, RAM section start) and stops.
    let mut src = Hopvm::spawn(&dir.0, "src", &strs(&dirty("1M")));
    src.out.wait_for(LONG, "a first pass", |t| passes(t) >= 1);
    let img = dir.join("vm.img");
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    events_on(&mut src);
    src.cmd(
        "migrate",
        json!({"uri": format!("exec:cat > {}", img.display())}),
    );
    src.wait_migration("completed", LONG);
    let stream = std::fs::read(&img).unwrap();
    let mut conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::io::Write::write_all(&mut conn, &stream[..stream.len() / 2]).unwrap();
    // `setup` until the incoming thread has accepted the connection, as QEMU's.
    let deadline = Instant::now() + Duration::from_secs(10);
    while dst.cmd("query-migrate", Value::Null)["status"] == "setup" {
        assert!(Instant::now() < deadline, "never accepted");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The load is under way and waits for more: every command is answered at once.
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(dst.status(), "inmigrate");
        assert_eq!(dst.cmd("query-migrate", Value::Null)["status"], "active");
        let err = dst
            .qmp
            .execute("system_reset", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("incoming migration is loading"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    drop(conn);
    assert_eq!(dst.wait_exit(LONG), Some(1), "{}", dst.err.text());
    assert!(
        dst.err.text().contains("incoming migration failed"),
        "{}",
        dst.err.text()
    );
}

/// A pipe whose read end the test holds and never reads, shrunk to one page.
fn stalled_pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 just created both descriptors and nothing else owns them.
    let (r, w) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ only resizes the pipe's buffer.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    (r, w)
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether process `pid`'s thread named `thread` sleeps in the kernel's pipe write (its wait
/// channel: `pipe_write`, `anon_pipe_write` on newer kernels).
fn blocked_in_pipe_write(pid: u32, thread: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        let read = |name: &str| std::fs::read_to_string(t.path().join(name)).unwrap_or_default();
        read("comm").trim() == thread && read("wchan").contains("pipe_write")
    })
}

/// Bytes waiting in a pipe.
fn queued(fd: &std::os::fd::OwnedFd) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    n as usize
}

/// The last `pass N ok` number in `text`, 0 before the first.
fn last_pass(text: &str) -> u64 {
    common::last_pass(text).unwrap_or(0)
}

#[test]
fn a_full_stdout_pipe_stalls_neither_vcpus_nor_monitor_nor_migration() {
    use std::process::{Command, Stdio};
    let dir = TempDir::new("full-pipe");
    let (read_end, write_end) = stalled_pipe();
    let qmp_path = dir.join("src.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_hopvm"))
        .arg("run")
        .args(strs(&dirty("64K")))
        .arg("--qmp")
        .arg(format!("unix:{}", qmp_path.display()))
        .args(["--serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Ended however the test ends (a panicking test must not leave a busy guest behind).
    let child = KillOnDrop(child);
    let mut qmp = qmp::client::QmpClient::connect_retry(&qmp_path, LONG).unwrap();
    // The guest prints a line per pass until the pipe is full: until hopvm's output thread
    // waits in the kernel's pipe write. (Bytes queued are no measure: a write of up to a page
    // is all-or-nothing, so the pipe can stall with less than a page in it.)
    let deadline = Instant::now() + LONG;
    while !(queued(&read_end) > 0 && blocked_in_pipe_write(child.0.id(), "serial-out")) {
        assert!(Instant::now() < deadline, "the pipe never filled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let timed = |qmp: &mut qmp::client::QmpClient, cmd: &str, args: Option<Value>| {
        let t = Instant::now();
        let r = qmp.execute(cmd, args).unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{cmd} took {:?}",
            t.elapsed()
        );
        r
    };
    for _ in 0..3 {
        timed(&mut qmp, "stop", None);
        assert_eq!(timed(&mut qmp, "query-status", None)["status"], "paused");
        timed(&mut qmp, "cont", None);
    }
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", MEMORY, "--incoming", &uri]);
    timed(
        &mut qmp,
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 0})),
    );
    timed(&mut qmp, "migrate", Some(json!({"uri": uri})));
    let deadline = Instant::now() + LONG;
    loop {
        let info = timed(&mut qmp, "query-migrate", None);
        if info["status"] == "completed" {
            break;
        }
        assert!(
            matches!(info["status"].as_str(), Some("setup" | "active")),
            "{info}"
        );
        assert!(Instant::now() < deadline, "{info}");
        std::thread::sleep(Duration::from_millis(20));
    }
    dst.out
        .wait_for(LONG, "passes on the destination", |t| passes(t) >= 1);
    assert!(!dst.out.text().contains("CORRUPT"), "{}", dst.out.text());
    // The source's guest ran on after its output stopped being taken.
    drop(child);
    let mut stalled = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(read_end), &mut stalled).ok();
    let stalled_at = last_pass(&String::from_utf8_lossy(&stalled));
    let arrived_at = last_pass(&dst.out.text());
    assert!(
        arrived_at > stalled_at,
        "the guest stopped when its output did: pass {stalled_at} in the pipe, {arrived_at} after migrating"
    );
    let _ = dst.cmd("quit", Value::Null);
}
