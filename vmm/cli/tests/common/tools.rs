//! Running hopvm's tools (`hopvm demo`, `hopvm migrate`, `hopvm qmp`) the way a user does — as
//! separate processes with their output captured — for the tools tests.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::proc::pump;
use super::Capture;

/// A running `hopvm` tool process; killed on drop.
pub struct Tool {
    /// The process.
    pub child: Child,
    /// Its stdout.
    pub out: Capture,
    /// Its stderr.
    pub err: Capture,
    pumps: Vec<std::thread::JoinHandle<()>>,
}

impl Tool {
    /// Starts `hopvm ARGS` with no standard input.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with_input(args, None)
    }

    /// Starts `hopvm ARGS`, writing `input` to its standard input and then closing it.
    pub fn spawn_with_input(args: &[&str], input: Option<&str>) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hopvm"))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hopvm starts");
        if let Some(text) = input {
            let mut stdin = child.stdin.take().unwrap();
            let text = text.to_string();
            std::thread::spawn(move || {
                let _ = stdin.write_all(text.as_bytes());
            });
        }
        let (out, err) = (Capture::default(), Capture::default());
        let pumps = vec![
            pump(child.stdout.take().unwrap(), out.clone()),
            pump(child.stderr.take().unwrap(), err.clone()),
        ];
        Self {
            child,
            out,
            err,
            pumps,
        }
    }

    /// Waits for the process to end; returns its exit status. Panics (with its output) if it
    /// is still running after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The pumps end with the pipes: then every byte has been collected.
                for p in self.pumps.drain(..) {
                    p.join().unwrap();
                }
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "hopvm still running after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.out.text(),
                    self.err.text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill only sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Both outputs, for assertion messages.
    pub fn outputs(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.out.text(), self.err.text())
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `hopvm ARGS` to its end (at most `timeout`); returns (status, stdout, stderr).
pub fn run(args: &[&str], timeout: Duration) -> (i32, String, String) {
    let mut t = Tool::spawn(args);
    let status = t.wait(timeout);
    (status, t.out.text(), t.err.text())
}

/// A free TCP port on the loopback interface.
pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `hopvm run` options booting the dirty guest with a working set of `ws`.
pub fn dirty_args(memory: &str, ws: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        guest_tests::image_path("dirty").display().to_string(),
        "--memory".into(),
        memory.into(),
        "--cmdline".into(),
        format!("ws={ws}"),
    ]
}

/// QEMU's command line for a test guest as the manifest's QEMU runs boot it — `pc` machine,
/// `qemu64`, 64 MiB, no default devices, serial on stdio, isa-debug-exit — for hopvm's QEMU
/// front end and QEMU 7.2 alike; the devices under test follow.
pub fn qemu_guest_args(kernel: &str, append: &str) -> Vec<String> {
    [
        "-M",
        "pc",
        "-cpu",
        "qemu64",
        "-enable-kvm",
        "-m",
        "64",
        "-display",
        "none",
        "-nodefaults",
        "-serial",
        "stdio",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel",
        kernel,
        "-append",
        append,
    ]
    .map(String::from)
    .to_vec()
}

/// `&[String]` as `&[&str]`.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Whether QEMU (`qemu-system-x86_64`) can be run here.
pub fn qemu_installed() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("-version")
        .output()
        .is_ok()
}

/// Runs `run(program, args)` with QEMU's command line `args` under hopvm's QEMU front end
/// (`hopvm qemu ARGS`), then under QEMU 7.2 when it is installed.
pub fn on_hopvm_and_qemu(args: &[String], mut run: impl FnMut(&str, &[String])) {
    let mut hopvm_args = vec![String::from("qemu")];
    hopvm_args.extend(args.iter().cloned());
    run(env!("CARGO_BIN_EXE_hopvm"), &hopvm_args);
    if qemu_installed() {
        run("qemu-system-x86_64", args);
    }
}
