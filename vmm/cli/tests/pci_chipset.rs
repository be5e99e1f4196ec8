//! The chipset's configuration registers and a moved I/O BAR, end to end: the `pcicfg` test
//! guest programs the PIRQ routes, PAM registers and the host bridge's command register, moves
//! pci-testdev's I/O BAR to 0xd000 and then 0x1000 (outside the ports assigned at boot) and
//! keeps reading them back. Live-migrated between two hopvm processes (`pc` and `q35`), the
//! destination must read what the source's guest wrote and find the BAR at 0x1000; under
//! QEMU 7.2, when installed, the guest must read the same values as under hopvm.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::proc::{Hopvm, TempDir};
use common::tools::{on_hopvm_and_qemu, qemu_guest_args};
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);

/// What the guest writes, as it prints it (`pirq_e` is q35's PIRQE–H).
fn wanted(machine: &str) -> String {
    let pirq_e = if machine == "q35" {
        "800e0a05"
    } else {
        "00000000"
    };
    format!("pirq=0a80050b pirq_e={pirq_e} pam=13313333 host_cmd=0006 bar1=00001001 name=p")
}

/// The `pass N ok …` lines' values (of whole lines: the capture may end inside one).
fn pass_values(text: &str) -> Vec<String> {
    let whole = text.rsplit_once('\n').map_or("", |(lines, _)| lines);
    whole
        .lines()
        .filter_map(|l| {
            let rest = l.trim_end_matches('\r').strip_prefix("pass ")?;
            let (_, values) = rest.split_once(" ok ")?;
            Some(values.to_string())
        })
        .collect()
}

/// QEMU's command line for the guest on `machine` with a pci-testdev.
fn guest_args(machine: &str, append: &str) -> Vec<String> {
    let kernel = guest_tests::image_path("pcicfg").display().to_string();
    let mut args = qemu_guest_args(&kernel, append);
    args[1] = machine.to_string();
    args.extend(["-device", "pci-testdev"].map(String::from));
    args
}

/// `hopvm qemu ARGS -qmp unix:<dir>/<name>.sock,server,nowait` (what `Hopvm::spawn` does with
/// `hopvm run`), so that the machine can be `q35`.
fn spawn_qemu(dir: &TempDir, name: &str, args: Vec<String>) -> Hopvm {
    let qmp = format!(
        "unix:{},server,nowait",
        dir.join(&format!("{name}.sock")).display()
    );
    Hopvm::spawn_with(&dir.0, name, &[], move |cmd| {
        let mut qemu = Command::new(cmd.get_program());
        qemu.arg("qemu").args(&args).args(["-qmp", &qmp]);
        qemu.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        *cmd = qemu;
    })
}

fn migrate(machine: &str) {
    let dir = TempDir::new(&format!("pci-chipset-{machine}"));
    let args = guest_args(machine, "");
    let mut src = spawn_qemu(&dir, "src", args.clone());
    src.out.wait_for(LONG, "a first pass on the source", |t| {
        !pass_values(t).is_empty() || t.contains("MISMATCH") || t.contains("FAIL")
    });
    let text = src.out.text();
    assert!(!text.contains("FAIL"), "{machine}: {text}");
    assert_eq!(pass_values(&text)[0], wanted(machine), "{machine}: {text}");

    let sock = dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let mut dst_args = args;
    dst_args.extend([String::from("-incoming"), uri.clone()]);
    let mut dst = spawn_qemu(&dir, "dst", dst_args);
    assert_eq!(dst.status(), "inmigrate");
    for vm in [&mut src, &mut dst] {
        vm.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
    }
    src.cmd("migrate", json!({ "uri": uri }));
    src.wait_migration("completed", LONG);
    assert_eq!(src.status(), "postmigrate");
    // The destination's output starts after the switchover: its passes read what the source's
    // guest wrote (a register at its power-on value, or the BAR not decoded at 0x1000, is a
    // MISMATCH line and exit status 1).
    dst.out
        .wait_for(LONG, "two passes on the destination", |t| {
            pass_values(t).len() >= 2 || t.contains("MISMATCH")
        });
    let text = dst.out.text();
    assert!(!text.contains("MISMATCH"), "{machine}: {text}");
    for values in pass_values(&text) {
        assert_eq!(values, wanted(machine), "{machine}: {text}");
    }
    assert_eq!(dst.status(), "running");
}

#[test]
fn chipset_registers_and_a_moved_io_bar_survive_live_migration_on_pc() {
    migrate("pc");
}

#[test]
fn chipset_registers_and_a_moved_io_bar_survive_live_migration_on_q35() {
    migrate("q35");
}

/// The guest's lines that do not depend on where firmware put the BAR at boot (SeaBIOS and
/// hopvm may choose differently).
fn comparable(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.contains("from boot") && !l.contains("old place 0xc"))
        .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL") || l.starts_with("pass"))
        .map(String::from)
        .collect()
}

#[test]
fn pcicfg_reads_what_qemu_reads() {
    for machine in ["pc", "q35"] {
        let mut outputs = Vec::new();
        on_hopvm_and_qemu(&guest_args(machine, "passes=1"), |program, args| {
            let o = Command::new("timeout")
                .arg("120")
                .arg(program)
                .args(args)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            assert_eq!(o.status.code(), Some(1), "{program} {machine}: {text}");
            assert!(
                text.contains("SUMMARY: 8 tests, 0 failures"),
                "{program} {machine}: {text}"
            );
            outputs.push(comparable(&text));
        });
        assert!(outputs[0].contains(&format!("pass 1 ok {}", wanted(machine))));
        if let [ours, qemu] = &outputs[..] {
            assert_eq!(ours, qemu, "{machine}: hopvm vs qemu");
        }
    }
}
