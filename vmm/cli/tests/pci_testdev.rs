//! QEMU's pci-testdev end to end: the `pci-testdev` test guest runs every test of the device's
//! memory and I/O BARs with a driver of its own, under hopvm's QEMU front end
//! (`-device pci-testdev`) on the `pc` and `q35` machines and, when it is installed, under QEMU
//! 7.2 with the same options: the tests, their names and their counts must be QEMU's.

mod common;

use std::process::Command;

use common::tools::qemu_guest_args;

/// The guest's per-test lines (`PASS: <name>: …`), in order.
fn test_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains("counted") || l.contains("no such test"))
        .map(|l| l.trim().to_string())
        .collect()
}

fn run(program: &str, prefix: &[&str], machine: &str) -> (Option<i32>, String) {
    let kernel = guest_tests::image_path("pci-testdev").display().to_string();
    let mut args = qemu_guest_args(&kernel, "");
    args[1] = machine.to_string();
    args.extend(["-device", "pci-testdev"].map(String::from));
    let o = Command::new("timeout")
        .arg("120")
        .arg(program)
        .args(prefix)
        .args(&args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    (o.status.code(), text)
}

#[test]
fn pci_testdev_runs_every_test_as_qemu_does() {
    let qemu = common::tools::qemu_installed();
    for machine in ["pc", "q35"] {
        let (code, text) = run(env!("CARGO_BIN_EXE_hopvm"), &["qemu"], machine);
        assert!(
            text.contains("SUMMARY: 15 tests, 0 failures"),
            "{machine}: {text}"
        );
        assert_eq!(code, Some(1), "{machine}: {text}");
        let ours = test_lines(&text);
        // Real ioeventfds: the eventfd tests' writes never reach the device.
        for name in ["mmio", "portio"] {
            assert!(
                ours.contains(&format!("PASS: {name}-no-eventfd: 16 of 16 writes counted")),
                "{machine}: {text}"
            );
            for test in ["wildcard", "datamatch"] {
                let line = format!("PASS: {name}-{test}-eventfd: 0 of 16 writes counted");
                assert!(ours.contains(&line), "{machine}: {text}");
            }
        }
        if qemu {
            let (code, qtext) = run("qemu-system-x86_64", &[], machine);
            assert_eq!(code, Some(1), "qemu {machine}: {qtext}");
            assert_eq!(ours, test_lines(&qtext), "{machine}: hopvm vs qemu");
        }
    }
}
