//! The `hopvm` binary's handling of bad input: one clear line on stderr and the documented exit
//! status, never a panic.

use std::process::{Command, Output};

fn hopvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hopvm"))
        .args(args)
        .output()
        .expect("hopvm runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    for args in [
        &["run"][..],
        &["run", "--kernel", "k", "--memory", "12Q"],
        &["run", "--kernel", "k", "--cpus", "0"],
        &["run", "--kernel", "k", "--cpus", "300"],
        &["run", "--kernel", "k", "--serial", "tcp:x"],
        &["run", "--kernel", "k", "--debug-exit", "iobase=zz"],
        &["run", "--kernel", "k", "--frobnicate"],
        &["frobnicate"],
        &[],
    ] {
        let o = hopvm(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("hopvm: "), "{args:?}: {err}");
    }
}

#[test]
fn help_explains_every_option() {
    let o = hopvm(&["run", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory",
        "--cpus",
        "--serial",
        "--debug-exit",
        "--no-reboot",
    ] {
        assert!(help.contains(opt), "run --help lacks {opt}");
    }
    assert_eq!(hopvm(&["--help"]).status.code(), Some(0));
}

#[test]
fn bad_kernels_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("hopvm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "unrecognised kernel image"),
        ("garbage", vec![0x5a; 70_000], "unrecognised kernel image"),
        ("truncated-elf", b"\x7fELF\x02\x01\x01\x00".to_vec(), "elf"),
        // A bzImage header whose payload is missing.
        (
            "bzimage",
            {
                let mut b = vec![0u8; 0x1000];
                b[0x1f1] = 1;
                b[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
                b[0x201] = 0x6a;
                b[0x202..0x206].copy_from_slice(b"HdrS");
                b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
                b[0x248..0x24c].copy_from_slice(&0x10000u32.to_le_bytes());
                b[0x24c..0x250].copy_from_slice(&0x10000u32.to_le_bytes());
                b
            },
            "cannot load kernel",
        ),
    ];
    for (name, bytes, expect) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let o = hopvm(&["run", "--kernel", path.to_str().unwrap()]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(expect), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let o = hopvm(&["run", "--kernel", "/nonexistent/kernel"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("could not load kernel '/nonexistent/kernel'"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// hopvm behind a link named `qemu-system-x86_64` speaks QEMU's command line, as
/// kvm-unit-tests' scripts drive it.
#[test]
fn qemu_compatible_command_line() {
    let dir = std::env::temp_dir().join(format!("hopvm-qemu-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("qemu-system-x86_64");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_hopvm"), &link).unwrap();
    let qemu = |args: &[&str]| Command::new(&link).args(args).output().unwrap();

    let o = qemu(&["-device", "?"]);
    let devices = String::from_utf8_lossy(&o.stdout);
    assert!(devices.contains("\"pc-testdev\"") && devices.contains("\"pci-testdev\""));
    let o = qemu(&["-help"]);
    let first = String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(first.starts_with("QEMU emulator version 7.2."), "{first}");

    // x86/run's command line, with a guest that exits 0 through isa-debug-exit.
    let hello = guest_tests::image_path("hello").display().to_string();
    let o = qemu(&[
        "-enable-kvm",
        "-device",
        "pc-testdev",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x4",
        "-vnc",
        "none",
        "-serial",
        "stdio",
        "-device",
        "pci-testdev",
        "-kernel",
        &hello,
        "--no-reboot",
        "-nodefaults",
        "-global",
        "kvm-pit.lost_tick_policy=discard",
        "-display",
        "none",
        "-machine",
        "accel=kvm",
        "-smp",
        "2",
        "-m",
        "64",
        "-cpu",
        "qemu64,+x2apic",
        "-append",
        "one two",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("argv[2]=two"));
    assert!(
        o.stderr.is_empty(),
        "stderr must stay quiet: {}",
        stderr(&o)
    );

    let o = qemu(&["-kernel", &hello, "-usb"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "hopvm: unsupported qemu option '-usb'\n");
    let o = Command::new(env!("CARGO_BIN_EXE_hopvm"))
        .args(["qemu", "-device", "help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"pc-testdev\""));
    std::fs::remove_dir_all(&dir).unwrap();
}
