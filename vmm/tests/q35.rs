//! The `q35` machine with `kernel-irqchip=split`, an Intel IOMMU and an edu device: a guest runs
//! on it, a reset restores it, it migrates live with the IOAPIC's, the IOMMU's and edu's state,
//! and the combinations hopvm does not support are refused when the VM is built.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{passes, Capture};
use devices::pci::PciDevice;
use devices::BusDevice;
use vmm::config::{IommuConfig, IrqchipMode, MachineType, SerialConfig, VmConfig};
use vmm::instance::Instance;
use vmm::runstate::RunState;
use vmm::vm::SharedWriter;
use vmm_sync::lock;

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

/// Programs the IOMMU, the IOAPIC and edu as a guest would (under the big lock, as the bus).
fn program_devices(i: &Instance) {
    let d = &i.vm.devices;
    let _big = lock(&i.vm.machine);
    let mut iommu = lock(d.intel_iommu.as_ref().unwrap());
    iommu.write(0x20, &0x10_0000u64.to_le_bytes()); // RTADDR
    iommu.write(0xb8, &0x20_0007u64.to_le_bytes()); // IRTA
    iommu.write(0x18, &(1u32 << 30).to_le_bytes()); // SRTP
    iommu.write(0x18, &(1u32 << 24 | 1 << 30).to_le_bytes()); // SIRTP
    drop(iommu);
    let mut ioapic = lock(d.ioapic.as_ref().unwrap());
    ioapic.write(0, &[0x10 + 2 * 9]);
    ioapic.write(0x10, &0x0001_8055u32.to_le_bytes()); // pin 9: level, masked, vector 0x55
    drop(ioapic);
    let mut edu = lock(&d.edu[0]);
    edu.bar_write(0, 4, &0x1234u32.to_le_bytes()); // liveness
    edu.bar_write(0, 0x80, &0xabcd_0000u64.to_le_bytes()); // DMA source
}

fn device_states(i: &Instance) -> String {
    let d = &i.vm.devices;
    let _big = lock(&i.vm.machine);
    format!(
        "{:?} {:?} {:?}",
        lock(d.intel_iommu.as_ref().unwrap()).state(),
        lock(d.ioapic.as_ref().unwrap()).state(),
        lock(&d.edu[0]).state()
    )
}

#[test]
fn a_q35_split_guest_with_an_iommu_and_edu_migrates_live() {
    let (src, src_out) = instance(&config()).unwrap();
    src.cont().unwrap();
    src_out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);
    program_devices(&src);
    let mut c = config();
    c.kernel = None;
    let (dst, dst_out) = instance(&c).unwrap();
    assert_ne!(device_states(&src), device_states(&dst));

    common::migrate_and_verify(&src, &dst, &dst_out, "q35", 2);
    assert_eq!(dst.runstate(), RunState::Running);
    assert!(!dst_out.text().contains("CORRUPT"), "{}", dst_out.text());
    // The source is paused since the switchover: its device state is what the destination
    // loaded.
    assert_eq!(device_states(&src), device_states(&dst));
}

#[test]
fn a_guest_runs_on_q35_split_with_an_iommu_and_resets() {
    let (vm, out) = instance(&config()).unwrap();
    vm.cont().unwrap();
    out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);
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
    assert!(e.contains("-machine q35"), "{e}");
    let mut c = config();
    c.irqchip = IrqchipMode::Kernel;
    let e = instance(&c)
        .err()
        .expect("intremap=on, kernel irqchip")
        .to_string();
    assert!(e.contains("kernel-irqchip=on"), "{e}");
    // DMA remapping alone works with KVM's IOAPIC, as in QEMU.
    c.intel_iommu = Some(IommuConfig {
        aw_bits: 48,
        intremap: false,
    });
    let (vm, out) = instance(&c).unwrap();
    vm.cont().unwrap();
    out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);
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

/// The IOAPIC pins whose input is high.
fn ioapic_lines(i: &Instance) -> u32 {
    let _big = lock(&i.vm.machine);
    lock(i.vm.devices.ioapic.as_ref().unwrap()).state().lines
}

/// edu's slot and PIRQ route register (the LPC bridge's 0x60 + PIRQ).
fn edu_route(i: &Instance) -> (u8, usize) {
    let bus = lock(&i.vm.devices.pci_bus);
    let slot = (0..32u8)
        .find(|&s| bus.config_read(s, 0, 0) == 0x11e8_1234)
        .expect("edu on the bus");
    (slot, 0x60 + devices::pci::intx_pirq(slot, 1))
}

/// Raises (0x60) or acknowledges (0x64) edu's interrupt 1, as the guest's driver would.
fn edu_irq(i: &Instance, reg: u64) {
    let _big = lock(&i.vm.machine);
    lock(&i.vm.devices.edu[0]).bar_write(0, reg, &1u32.to_le_bytes());
}

#[test]
fn a_rerouted_pirq_stays_rerouted_after_live_migration() {
    let (src, src_out) = instance(&config()).unwrap();
    src.cont().unwrap();
    src_out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);
    let (slot, route) = edu_route(&src);
    let boot_irq = devices::pci::intx_irq(slot, 1);
    // edu's INTx on the IRQ SeaBIOS would route its PIRQ to.
    edu_irq(&src, 0x60);
    assert_eq!(ioapic_lines(&src) & (1 << boot_irq | 1 << 5), 1 << boot_irq);
    // The guest routes the PIRQ to IRQ 5 (ICH9: bit 7 clear, IRQ in the low nibble): the
    // asserted level moves there.
    {
        let _big = lock(&src.vm.machine);
        lock(&src.vm.devices.pci_bus).config_write(0x1f, 0, route, &[0x05]);
    }
    assert_eq!(ioapic_lines(&src) & (1 << boot_irq | 1 << 5), 1 << 5);

    let mut c = config();
    c.kernel = None;
    let (dst, dst_out) = instance(&c).unwrap();
    common::migrate_and_verify(&src, &dst, &dst_out, "q35-pirq", 1);
    assert_eq!(
        lock(&dst.vm.devices.pci_bus).config_read(0x1f, 0, route / 4) >> (8 * (route % 4)) & 0xff,
        5
    );
    assert_eq!(ioapic_lines(&dst) & (1 << boot_irq | 1 << 5), 1 << 5);
    // The destination's router knows the route: the acknowledgement lowers IRQ 5 (with the
    // power-on route it would lower IRQ 10/11 and leave 5 stuck), and a new interrupt raises it.
    edu_irq(&dst, 0x64);
    assert_eq!(ioapic_lines(&dst) & (1 << boot_irq | 1 << 5), 0);
    edu_irq(&dst, 0x60);
    assert_eq!(ioapic_lines(&dst) & (1 << boot_irq | 1 << 5), 1 << 5);
}
