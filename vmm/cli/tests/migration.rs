//! Live migration between two hopvm processes driven over QMP, over every transport, with the
//! guest idle (a tiny working set) and busy (megabytes rewritten continuously), XBZRLE on and
//! off. The dirty guest verifies every word it wrote before rewriting it: it must keep running
//! on the destination without printing CORRUPT.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use common::passes;
use common::proc::{Hopvm, TempDir};
use serde_json::{json, Value};

const MEMORY: &str = "64M";
const LONG: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Unix,
    Exec,
    Fd,
}

fn dirty_args(ws: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        guest_tests::image_path("dirty").display().to_string(),
        "--memory".into(),
        MEMORY.into(),
        "--cmdline".into(),
        format!("ws={ws}"),
    ]
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A connected socket pair whose ends survive exec (no close-on-exec).
fn inheritable_pair() -> (OwnedFd, OwnedFd) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    for fd in [a.as_raw_fd(), b.as_raw_fd()] {
        // SAFETY: fd is a valid open descriptor owned by this function's sockets.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // SAFETY: as above; only FD_CLOEXEC is cleared.
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) };
    }
    (a.into(), b.into())
}

fn strings(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Migrates a running dirty guest from one hopvm to another over `transport`.
fn migrate(name: &str, transport: Transport, busy: bool, xbzrle: bool) {
    let dir = TempDir::new(name);
    let ws = if busy { "8" } else { "64K" };
    let src_args = dirty_args(ws);
    let fifo = dir.join("stream.fifo");
    let (uri_out, uri_in, fds) = match transport {
        Transport::Tcp => {
            let port = free_tcp_port();
            (
                format!("tcp:127.0.0.1:{port}"),
                format!("tcp:127.0.0.1:{port}"),
                None,
            )
        }
        Transport::Unix => {
            let p = dir.join("mig.sock");
            (
                format!("unix:{}", p.display()),
                format!("unix:{}", p.display()),
                None,
            )
        }
        Transport::Exec => {
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: c is a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            (
                format!("exec:cat > {}", fifo.display()),
                format!("exec:cat {}", fifo.display()),
                None,
            )
        }
        Transport::Fd => {
            let (a, b) = inheritable_pair();
            (
                format!("fd:{}", a.as_raw_fd()),
                format!("fd:{}", b.as_raw_fd()),
                Some((a, b)),
            )
        }
    };
    let mut src = Hopvm::spawn(&dir.0, "src", &strings(&src_args));
    src.out
        .wait_for(LONG, "the first pass on the source", |t| passes(t) >= 1);
    let mut dst = Hopvm::spawn(&dir.0, "dst", &["--memory", MEMORY, "--incoming", &uri_in]);
    // The pair's ends now live in the children too; the test's copies can go.
    drop(fds);
    assert_eq!(dst.status(), "inmigrate");
    for vm in [&mut src, &mut dst] {
        vm.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
    }
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "xbzrle", "state": xbzrle}]}),
    );
    src.cmd("migrate", json!({"uri": uri_out}));
    src.wait_migration("completed", LONG);
    assert_eq!(src.status(), "postmigrate");

    let info = src.cmd("query-migrate", Value::Null);
    let ram = &info["ram"];
    let num = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("{info}"));
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        num(&ram["transferred"]) >= num(&ram["normal-bytes"]),
        "{info}"
    );
    assert!(
        num(&ram["duplicate"]) + num(&ram["normal"]) >= num(&ram["total"]) / 4096,
        "{info}"
    );
    assert_eq!(num(&ram["remaining"]), 0, "{info}");
    assert!(num(&info["downtime"]) <= num(&info["total-time"]), "{info}");
    assert_eq!(info.get("xbzrle-cache").is_some(), xbzrle, "{info}");

    dst.out
        .wait_for(LONG, "two passes on the destination", |t| passes(t) >= 2);
    assert_eq!(dst.status(), "running");
    assert_eq!(dst.cmd("query-migrate", Value::Null)["status"], "completed");
    for vm in [&src, &dst] {
        assert!(!vm.out.text().contains("CORRUPT"), "{}", vm.out.text());
    }
}

#[test]
fn tcp_busy() {
    migrate("tcp-busy", Transport::Tcp, true, false);
}

#[test]
fn tcp_idle_xbzrle() {
    migrate("tcp-idle-xbzrle", Transport::Tcp, false, true);
}

#[test]
fn unix_busy_xbzrle() {
    migrate("unix-busy-xbzrle", Transport::Unix, true, true);
}

#[test]
fn unix_idle() {
    migrate("unix-idle", Transport::Unix, false, false);
}

#[test]
fn exec_busy() {
    migrate("exec-busy", Transport::Exec, true, false);
}

#[test]
fn exec_idle_xbzrle() {
    migrate("exec-idle-xbzrle", Transport::Exec, false, true);
}

#[test]
fn fd_busy_xbzrle() {
    migrate("fd-busy-xbzrle", Transport::Fd, true, true);
}

#[test]
fn fd_idle() {
    migrate("fd-idle", Transport::Fd, false, false);
}
