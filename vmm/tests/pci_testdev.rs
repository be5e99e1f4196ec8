//! QEMU's pci-testdev in a VM: the ioeventfd of its selected test is a real KVM ioeventfd on
//! the BAR's address, it migrates live with its test and count (the destination registers the
//! same ioeventfd), and a reset deselects the test and removes the ioeventfd.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{passes, Capture};
use devices::pci::PciDevice;
use devices::pci_testdev::PciTestdev;
use devices::{IoEvent, IoSpace};
use kvm_ioctls::IoEventAddress;
use vmm::config::{SerialConfig, VmConfig};
use vmm::instance::Instance;
use vmm::vm::SharedWriter;
use vmm_sync::lock;
use vmm_sys_util::eventfd::EventFd;

fn config() -> VmConfig {
    let mut c = VmConfig::new(guest_tests::image_path("dirty"));
    c.cmdline = String::from("ws=4");
    c.memory = 64 << 20;
    c.serial = SerialConfig::Null;
    c.pci_testdev = 1;
    c
}

fn instance(c: &VmConfig) -> (Arc<Instance>, Capture) {
    let capture = Capture::default();
    let i = Instance::new(c, SharedWriter::new(Box::new(capture.clone()))).unwrap();
    (i, capture)
}

/// Runs `f` on the device under the big lock, as the bus does.
fn with_dev<T>(i: &Instance, f: impl FnOnce(&mut PciTestdev) -> T) -> T {
    let _big = lock(&i.vm.machine);
    let mut d = lock(&i.vm.devices.pci_testdev[0]);
    f(&mut d)
}

/// Whether KVM already holds an ioeventfd for `e` (registering a second one is EEXIST).
fn kvm_has(i: &Instance, e: IoEvent) -> bool {
    let fd = EventFd::new(0).unwrap();
    let addr = match e.space {
        IoSpace::Mmio => IoEventAddress::Mmio(e.addr),
        IoSpace::Pio => IoEventAddress::Pio(e.addr),
    };
    let v = e.datamatch.expect("a datamatch test");
    match i.vm.fd.register_ioevent(&fd, &addr, v) {
        Err(err) => {
            assert_eq!(err.errno(), libc::EEXIST, "{err}");
            true
        }
        Ok(()) => {
            i.vm.fd.unregister_ioevent(&fd, &addr, v).unwrap();
            false
        }
    }
}

#[test]
fn pci_testdev_ioeventfds_migrate_live_and_reset() {
    let (src, src_out) = instance(&config());
    src.cont().unwrap();
    src_out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);
    // portio-datamatch-eventfd, and three writes that reach the device (from the host side,
    // not through KVM, so they count).
    let event = with_dev(&src, |d| {
        d.bar_write(1, 0, &[2]);
        for _ in 0..3 {
            d.bar_write(1, 133, &[0xfa]);
        }
        assert_eq!(d.current(), Some(("portio-datamatch-eventfd", 3)));
        d.registered().expect("registered")
    });
    let base = lock(&src.vm.devices.pci_testdev[0])
        .config()
        .bar_address(1)
        .unwrap();
    assert_eq!(
        event,
        IoEvent {
            space: IoSpace::Pio,
            addr: base + 133,
            datamatch: Some(0xfa)
        }
    );
    assert!(kvm_has(&src, event), "the source's ioeventfd is KVM's");

    let mut c = config();
    c.kernel = None;
    let (dst, dst_out) = instance(&c);
    assert!(!kvm_has(&dst, event));
    common::migrate_and_verify(&src, &dst, &dst_out, "pci-testdev", 1);
    assert_eq!(with_dev(&dst, |d| d.state()), with_dev(&src, |d| d.state()));
    assert_eq!(with_dev(&dst, |d| d.registered()), Some(event));
    assert!(
        kvm_has(&dst, event),
        "the destination registered it with KVM"
    );

    // A reset: power-on state, no test, no ioeventfd.
    dst.reset(false).unwrap();
    assert_eq!(
        with_dev(&dst, |d| (d.current(), d.registered())),
        (None, None)
    );
    assert!(!kvm_has(&dst, event));
}
