//! hopvm as libvirt 9.0 starts QEMU (the reference's `qemu-cmdline-src.txt`): through a
//! `qemu-system-x86_64` link, with the monitor socket and the serial file handed over as
//! descriptors, objects and devices in JSON.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use qmp::client::QmpClient;
use serde_json::Value;

use super::proc::TempDir;

/// Where libvirt puts the monitor's listening socket (`-chardev socket,fd=30`).
pub const MONITOR_FD: RawFd = 30;
/// Where libvirt puts the serial port's file (`-add-fd set=0,fd=31`).
pub const SERIAL_FD: RawFd = 31;

/// The `qemu-system-x86_64` link to the hopvm binary under test, in `dir` (made once).
pub fn qemu_link(dir: &TempDir) -> PathBuf {
    let link = dir.join("qemu-system-x86_64");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_hopvm"), &link).unwrap();
    }
    link
}

/// libvirt's command line for the reference domain with this test's kernel, master key file
/// and `-append`; a destination gets `-incoming defer` where libvirt puts it.
pub fn domain_args(kernel: &Path, key: &Path, append: &str, incoming: bool) -> Vec<String> {
    let secret = format!(
        r#"{{"qom-type":"secret","id":"masterKey0","format":"raw","file":"{}"}}"#,
        key.display()
    );
    let mut args: Vec<String> = [
        "-name",
        "guest=mbguest,debug-threads=on",
        "-S",
        "-object",
        &secret,
        "-machine",
        "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
        "-accel",
        "kvm",
        "-cpu",
        "qemu64,svm=off",
        "-m",
        "32",
        "-object",
        r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":33554432}"#,
        "-overcommit",
        "mem-lock=off",
        "-smp",
        "1,sockets=1,cores=1,threads=1",
        "-uuid",
        "9a061521-ce5a-4da2-9fa7-8cd95e573f09",
        "-display",
        "none",
        "-no-user-config",
        "-nodefaults",
        "-chardev",
        "socket,id=charmonitor,fd=30,server=on,wait=off",
        "-mon",
        "chardev=charmonitor,id=monitor,mode=control",
        "-rtc",
        "base=utc",
        "-no-shutdown",
        "-no-acpi",
        "-boot",
        "strict=on",
        "-kernel",
        &kernel.display().to_string(),
        "-append",
        append,
        "-add-fd",
        "set=0,fd=31,opaque=serial0-source",
        "-chardev",
        "file,id=charserial0,path=/dev/fdset/0,append=on",
        "-device",
        r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#,
        "-audiodev",
        r#"{"id":"audio1","driver":"none"}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if incoming {
        args.extend(["-incoming", "defer"].map(String::from));
    }
    args.extend(
        [
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-msg",
            "timestamp=on",
        ]
        .map(String::from),
    );
    args
}

/// Spawns `cmd` with each `(from, to)` descriptor of this process as descriptor `to` of the
/// child, as libvirt hands over sockets, files and pipes (at most 8).
pub fn spawn_with_fds(cmd: &mut Command, fds: &[(RawFd, RawFd)]) -> Child {
    assert!(fds.len() <= 8, "too many descriptors");
    let fds = fds.to_vec();
    // SAFETY: between fork and exec only fcntl and dup2 (async-signal-safe) run, on
    // descriptors this process owns and keeps open until spawn returns. Every source is
    // first copied above the targets (close-on-exec), so that a source that happens to be
    // numbered like an earlier target is not overwritten; dup2 clears close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0; 8];
            for (i, &(from, _)) in fds.iter().enumerate() {
                high[i] = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &(_, to)) in fds.iter().enumerate() {
                if libc::dup2(high[i], to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// Runs a QMP command that must succeed (`args` null: none) and returns its reply.
pub fn ok(qmp: &mut QmpClient, command: &str, args: Value) -> Value {
    let args = if args.is_null() { None } else { Some(args) };
    qmp.execute(command, args)
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}
