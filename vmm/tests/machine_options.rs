//! QEMU's machine options that change what the VM is built with: `-machine pit=off` (no PIT,
//! migrated without one) and `-overcommit cpu-pm=on` (KVM_CAP_X86_DISABLE_EXITS).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{migrate, migrate_and_verify, passes, unix_uri, Capture};
use migration::thread::MigrationStatus;
use vmm::config::{SerialConfig, VmConfig};
use vmm::instance::Instance;
use vmm::runstate::RunState;
use vmm::vcpu::VmEvent;
use vmm::vm::SharedWriter;

fn instance(kernel: bool, pit: bool, cpu_pm: bool) -> (Arc<Instance>, Capture) {
    let mut c = VmConfig::new(guest_tests::image_path("dirty"));
    if !kernel {
        c.kernel = None;
    }
    c.cmdline = String::from("ws=4");
    c.memory = 64 << 20;
    c.serial = SerialConfig::Null;
    c.pit = pit;
    c.cpu_pm = cpu_pm;
    let capture = Capture::default();
    let i = Instance::new(&c, SharedWriter::new(Box::new(capture.clone()))).unwrap();
    (i, capture)
}

#[test]
fn a_guest_without_a_pit_runs_and_migrates_to_a_vm_without_one() {
    let (src, src_out) = instance(true, false, true);
    src.cont().unwrap();
    src_out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);

    let (dst, dst_out) = instance(false, false, false);
    migrate_and_verify(&src, &dst, &dst_out, "mo-nopit", 2);
}

#[test]
fn a_vm_with_a_pit_refuses_the_state_of_one_without() {
    let (src, src_out) = instance(true, false, false);
    src.cont().unwrap();
    src_out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);
    let (dst, _) = instance(false, true, false);
    // The source has sent everything; the destination fails loading the machine state and
    // ends (hopvm exits with status 1) without running the guest.
    migrate(&src, &dst, &unix_uri("mo-pit"));
    let event = dst.vm.wait_event_timeout(Duration::from_secs(60));
    assert!(matches!(event, Some(VmEvent::Exit(1))), "{event:?}");
    assert_ne!(dst.incoming_status(), Some(MigrationStatus::Completed));
    assert_ne!(dst.runstate(), RunState::Running);
}
