//! The `q35` machine with `kernel-irqchip=split`, an Intel IOMMU and an edu device: a guest runs
//! on it, a reset restores it, the migration is refused with the machine's blocker, and the
//! combinations hopvm does not support are refused when the VM is built.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{passes, Capture};
use vmm::config::{IommuConfig, IrqchipMode, MachineType, SerialConfig, VmConfig};
use vmm::instance::{Instance, InstanceError};
use vmm::vm::SharedWriter;

fn config() -> VmConfig {
    let mut c = VmConfig::new(guest_tests::image_path("dirty"));
    c.cmdline = String::from("ws=4");
    c.memory = 64 << 20;
    c.cpus = 2;
    c.serial = SerialConfig::Null;
    c.machine = MachineType::Q35;
    c.irqchip = IrqchipMode::Split;
    c.intel_iommu = Some(IommuConfig {
        aw_bits: 39,
        intremap: true,
    });
    c.edu = 1;
    c
}

fn instance(c: &VmConfig) -> Result<(Arc<Instance>, Capture), vmm::vm::VmError> {
    let capture = Capture::default();
    let i = Instance::new(c, SharedWriter::new(Box::new(capture.clone())))?;
    Ok((i, capture))
}

#[test]
fn a_guest_runs_on_q35_split_with_an_iommu_resets_and_is_not_migratable() {
    let (vm, out) = instance(&config()).unwrap();
    vm.cont().unwrap();
    out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);
    match vm.migrate("unix:/nonexistent/hopvm-q35.sock") {
        Err(InstanceError::Blocked(reason)) => {
            assert!(reason.contains("kernel-irqchip=split"), "{reason}")
        }
        other => panic!("migration of a split-irqchip machine: {other:?}"),
    }
    // A reset restores every section, the IOAPIC's, IOMMU's and edu's included, and the guest
    // boots again.
    let before = passes(&out.text());
    vm.reset(false).unwrap();
    out.wait_for(Duration::from_secs(120), "passes after the reset", |t| {
        passes(t) > before
    });
}

#[test]
fn unsupported_combinations_are_refused() {
    let mut c = config();
    c.machine = MachineType::Pc;
    let e = instance(&c).err().expect("intel-iommu on pc").to_string();
    assert!(e.contains("q35,kernel-irqchip=split"), "{e}");
    let mut c = config();
    c.irqchip = IrqchipMode::Kernel;
    assert!(
        instance(&c).is_err(),
        "intel-iommu with the in-kernel irqchip"
    );
    let mut c = config();
    c.memory = 3 << 30;
    let e = instance(&c).err().expect("too much low RAM").to_string();
    assert!(e.contains("2816 MiB"), "{e}");
    let mut c = config();
    c.intel_iommu = Some(IommuConfig {
        aw_bits: 40,
        intremap: true,
    });
    let e = instance(&c).err().expect("aw-bits=40").to_string();
    assert!(e.contains("aw-bits=40"), "{e}");
    let mut c = config();
    c.rng = Some(vmm::config::RngConfig::default());
    let e = instance(&c)
        .err()
        .expect("virtio behind the iommu")
        .to_string();
    assert!(e.contains("virtio"), "{e}");
}
