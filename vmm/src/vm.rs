//! Building a VM: KVM, guest memory, interrupt controllers, devices, the kernel, and the vCPUs.
//!
//! [`Vm::build`] does everything in the order KVM requires: the TSS and identity-map pages and
//! the in-kernel irqchip must exist before any vCPU is created; guest memory and the kernel are
//! in place before the boot vCPU's registers point into them; the vCPU threads start parked and
//! only run when [`Vm::resume`] is called.

use std::fs::File;
use std::io::Write;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use devices::{IrqLine, SharedIrq};
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_irqchip, kvm_pit_config, KvmIrqRouting, KVM_CAP_SPLIT_IRQCHIP,
    KVM_CAP_X86_DISABLE_EXITS, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_PIT_SPEAKER_DUMMY, KVM_X86_DISABLE_EXITS_CSTATE,
    KVM_X86_DISABLE_EXITS_HLT, KVM_X86_DISABLE_EXITS_MWAIT, KVM_X86_DISABLE_EXITS_PAUSE,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::arch::cpuid::{vcpu_cpuid, CpuidOptions};
use crate::arch::mptable::{self, isa_irq_to_ioapic_pin, IOAPIC_PINS};
use crate::arch::regs;
use crate::arch::{acpi, bios, cpu_model};
use crate::bus::{lock, Bus, Sink, WindowPriority};
use crate::config::{IrqchipMode, MachineType, VmConfig};
use crate::dirty_ring::{self, DirtyRings};
use crate::loader::{self, BootRequest, KernelFormat};
use crate::memory::{self, GuestMemoryMmap, Layout};
use crate::vcpu::{self, Machine, VcpuControl, VcpuShared, VmEvent};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed while building the VM.
    #[error("kvm {0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The kernel image could not be read. Worded as QEMU words it: kvm-unit-tests' runner
    /// (`scripts/vmm.bash`) probes the command line with a missing kernel and only trusts a
    /// VMM whose error says "could not load kernel".
    #[error("could not load kernel '{0}': {1}")]
    ReadKernel(String, #[source] std::io::Error),
    /// A file given on the command line could not be read.
    #[error("cannot read {0}: {1}")]
    ReadFile(String, #[source] std::io::Error),
    /// The kernel could not be loaded.
    #[error("cannot load kernel {0}: {1}")]
    Load(String, #[source] loader::LoaderError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// More vCPUs than KVM (or the MP table) allows.
    #[error("{0} vcpus requested, but this host allows 1 to {1}")]
    TooManyCpus(u8, usize),
    /// More memory than the host has.
    #[error("{0} of guest memory requested, but this host has only {1}")]
    TooMuchMemory(String, String),
    /// The boot tables could not be written.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The CPU model is invalid or this host cannot provide it.
    #[error("cpu model: {0}")]
    CpuModel(#[from] cpu_model::CpuModelError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The legacy BIOS state could not be set up.
    #[error(transparent)]
    Bios(#[from] bios::BiosError),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// Device ranges clash.
    #[error("cannot place a device: {0}")]
    Bus(#[from] crate::bus::BusError),
    /// vCPU threads could not be started.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// KVM's state could not be probed.
    #[error("machine state: {0}")]
    KvmState(#[source] crate::kvm_state::KvmStateError),
    /// Saving or restoring the machine's sections (a reset's power-on state) failed.
    #[error("machine state: {0}")]
    Sections(#[source] migration::registry::RegistryError),
    /// A reset was asked for while an incoming migration writes the machine.
    #[error("machine state: cannot reset while an incoming migration is loading")]
    ResetWhileLoading,
    /// The serial output file could not be created.
    #[error("cannot open serial output {0}: {1}")]
    SerialFile(String, #[source] std::io::Error),
    /// The dirty ring asked for cannot be had.
    #[error(transparent)]
    DirtyRing(#[from] dirty_ring::DirtyRingError),
    /// A disk image could not be opened.
    #[error(transparent)]
    Disk(#[from] virtio::BlockError),
    /// A tap device could not be opened.
    #[error(transparent)]
    Net(#[from] virtio::NetError),
    /// A virtio device could not be created.
    #[error(transparent)]
    Virtio(#[from] virtio::pci::VirtioPciError),
    /// The virtio back-end thread could not be started.
    #[error(transparent)]
    VirtioIo(#[from] virtio::event_loop::EventLoopError),
    /// A descriptor named on the command line was not inherited (or is already in use).
    #[error("descriptor {0} was not handed to hopvm or is already in use")]
    NotInherited(i32),
    /// No PCI slot is left.
    #[error("no free pci slot for another device")]
    PciSlots,
    /// A device asked for a PCI slot that is taken or does not exist.
    #[error("pci slot {0:#x} is taken or does not exist")]
    PciSlot(u8),
    /// The q35 machine's ECAM window would overlap RAM.
    #[error("q35: at most 2816 MiB of RAM below 4 GiB are supported (the ECAM window is at 0xb0000000); {0} asked")]
    Q35Memory(String),
    /// `-device intel-iommu` on another machine than q35.
    #[error("intel-iommu needs -machine q35")]
    IommuNeedsQ35,
    /// `-device intel-iommu,intremap=on` with KVM's IOAPIC, which cannot remap.
    #[error(
        "intel-iommu: interrupt remapping cannot work with kernel-irqchip=on, please use 'split'"
    )]
    IommuNeedsSplit,
    /// `-device intel-iommu` with virtio devices, whose DMA would bypass it.
    #[error("intel-iommu: virtio devices behind the iommu are not supported yet")]
    IommuWithVirtio,
    /// The IOMMU's configuration.
    #[error(transparent)]
    Iommu(#[from] devices::intel_iommu::IntelIommuError),
    /// `mem-lock=on`: the memory could not be locked.
    #[error("cannot lock memory (mem-lock=on): {0}")]
    MemLock(#[source] std::io::Error),
}

/// Addresses KVM needs for its real-mode emulation helpers on Intel; below the test-device
/// window at 0xff000000 and clear of the LAPIC and IOAPIC.
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// QEMU's fw_cfg ports (selector, data).
const FW_CFG_BASE: u64 = 0x510;
/// pc-testdev: scratch registers and flush-page port.
const TESTDEV_PORTS: u64 = 0xe0;
/// pc-testdev: one port per ISA IRQ line.
const TESTDEV_IRQ_PORTS: u64 = 0x2000;
/// pc-testdev: the 64 KiB MMIO scratch area.
const TESTDEV_MMIO: u64 = 0xff00_0000;
/// The ACPI PM timer (PIIX4's PM block at 0x600, timer at +8), as the FADT says.
const PM_TIMER_PORT: u64 = 0x608;
/// The RTC interrupt.
const RTC_IRQ: u32 = 8;
/// COM1's port base and IRQ.
const COM1_BASE: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;
/// i8042 interrupts.
const KBD_IRQ: u32 = 1;
const AUX_IRQ: u32 = 12;

/// A GSI raised and lowered with `KVM_IRQ_LINE`.
pub struct KvmIrq {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl IrqLine for KvmIrq {
    fn set_level(&self, high: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, high) {
            log::warn!("cannot set irq {}: {e}", self.gsi);
        }
    }
}

/// The first GSI for MSI routes (after the IOAPIC's 24 pins).
const FIRST_MSI_GSI: u32 = 24;
/// One past the last GSI hopvm gives MSI routes (KVM allows up to 4096 routes).
const END_MSI_GSI: u32 = 1024;

/// The VM's GSI routing: the `pc` irqchip routes (none under `kernel-irqchip=split`, where KVM
/// refuses them) plus one MSI route per irqfd vector and, under `split`, the MSI each
/// level-triggered IOAPIC pin sends on GSI = pin (KVM derives the vectors whose EOI it reports
/// with `KVM_EXIT_IOAPIC_EOI` from those), set with `KVM_SET_GSI_ROUTING` as a whole each time
/// a route changes (its mutex is a leaf lock).
pub struct MsiRouter {
    vm: Arc<VmFd>,
    irqchip_routes: bool,
    routes: Mutex<MsiRoutes>,
}

/// The next free GSI and every MSI route: GSI → (address, data).
struct MsiRoutes {
    next: u32,
    msi: std::collections::BTreeMap<u32, (u64, u32)>,
}

impl MsiRouter {
    fn new(vm: Arc<VmFd>, irqchip_routes: bool) -> Self {
        Self {
            vm,
            irqchip_routes,
            routes: Mutex::new(MsiRoutes {
                next: FIRST_MSI_GSI,
                msi: std::collections::BTreeMap::new(),
            }),
        }
    }

    /// A GSI of its own for an MSI vector, if any is left.
    fn allocate(&self) -> Option<u32> {
        let mut r = lock(&self.routes);
        let gsi = r.next;
        (gsi < END_MSI_GSI).then(|| {
            r.next += 1;
            gsi
        })
    }

    /// Points `gsi` at (address, data) (or removes its route) and gives KVM the whole table.
    fn set_route(&self, gsi: u32, msi: Option<(u64, u32)>) -> Result<(), kvm_ioctls::Error> {
        let mut r = lock(&self.routes);
        match msi {
            Some(m) => r.msi.insert(gsi, m),
            None => r.msi.remove(&gsi),
        };
        let mut entries = if self.irqchip_routes {
            gsi_routing().as_slice().to_vec()
        } else {
            Vec::new()
        };
        for (&gsi, &(address, data)) in &r.msi {
            entries.push(kvm_irq_routing_entry {
                gsi,
                type_: kvm_bindings::KVM_IRQ_ROUTING_MSI,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_bindings::kvm_irq_routing_msi {
                        address_lo: address as u32,
                        address_hi: (address >> 32) as u32,
                        data,
                        ..Default::default()
                    },
                },
                ..Default::default()
            });
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        self.vm.set_gsi_routing(&table)
    }
}

/// One virtio device's MSI-X vectors: an irqfd per vector on a GSI of its own whose MSI route
/// follows the guest's table entry, so the `virtio-io` thread raises an interrupt with an
/// eventfd write. A vector without an irqfd or route (KVM refused one) is delivered with
/// `KVM_SIGNAL_MSI` instead.
struct KvmMsiVectors {
    vm: Arc<VmFd>,
    router: Arc<MsiRouter>,
    irqfds: Vec<Option<(u32, vmm_sys_util::eventfd::EventFd)>>,
    programmed: Mutex<Vec<Option<(u64, u32)>>>,
}

impl KvmMsiVectors {
    fn new(vm: Arc<VmFd>, router: Arc<MsiRouter>, vectors: usize) -> Self {
        let irqfds = (0..vectors)
            .map(|_| {
                let gsi = router.allocate()?;
                let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).ok()?;
                // KVM ordering: the irqfd may be registered before its GSI has a route; it
                // only fires once the route exists (set in `program`).
                match vm.register_irqfd(&fd, gsi) {
                    Ok(()) => Some((gsi, fd)),
                    Err(e) => {
                        log::warn!("cannot register an irqfd for gsi {gsi}: {e}");
                        None
                    }
                }
            })
            .collect();
        Self {
            vm,
            router,
            programmed: Mutex::new(vec![None; vectors]),
            irqfds,
        }
    }
}

impl virtio::MsiSender for KvmMsiVectors {
    fn program(&self, vector: u16, address: u64, data: u32) {
        let v = usize::from(vector);
        let Some(Some((gsi, _))) = self.irqfds.get(v) else {
            return;
        };
        let ok = match self.router.set_route(*gsi, Some((address, data))) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("cannot route msi vector {vector} (gsi {gsi}): {e}");
                false
            }
        };
        if let Some(p) = lock(&self.programmed).get_mut(v) {
            *p = ok.then_some((address, data));
        }
    }

    fn send(&self, vector: u16, address: u64, data: u32) {
        let v = usize::from(vector);
        let routed = lock(&self.programmed).get(v).copied().flatten() == Some((address, data));
        if let (true, Some(Some((_, fd)))) = (routed, self.irqfds.get(v)) {
            if fd.write(1).is_ok() {
                return;
            }
        }
        signal_msi(&self.vm, address, data);
    }
}

/// Sends one message to the in-kernel LAPICs (`KVM_SIGNAL_MSI`); a refusal is logged.
fn signal_msi(vm: &VmFd, address: u64, data: u32) {
    let msi = kvm_bindings::kvm_msi {
        address_lo: address as u32,
        address_hi: (address >> 32) as u32,
        data,
        ..Default::default()
    };
    if let Err(e) = vm.signal_msi(msi) {
        log::warn!("cannot signal msi {address:#x}/{data:#x}: {e}");
    }
}

/// Messages to the in-kernel LAPICs with `KVM_SIGNAL_MSI` (the IOAPIC's under
/// `kernel-irqchip=split`, the edu device's, the IOMMU's fault events).
struct KvmMsi {
    vm: Arc<VmFd>,
    router: Arc<MsiRouter>,
}

impl devices::MsiTarget for KvmMsi {
    fn translate(&self, _source: Option<u16>, address: u64, data: u32) -> Option<(u64, u32)> {
        Some((address, data))
    }

    fn send(&self, address: u64, data: u32) {
        signal_msi(&self.vm, address, data);
    }

    fn set_ioapic_route(&self, pin: u8, msi: Option<(u64, u32)>) {
        if let Err(e) = self.router.set_route(u32::from(pin), msi) {
            log::warn!("cannot route ioapic pin {pin}: {e}");
        }
    }
}

/// Guest RAM for device DMA and the IOMMU's table walks.
struct DeviceRam(GuestMemoryMmap);

impl devices::GuestRam for DeviceRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        use vm_memory::Bytes;
        self.0.read_slice(buf, vm_memory::GuestAddress(gpa)).is_ok()
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        use vm_memory::{Bytes, GuestMemoryBackend};
        // All or nothing: check the whole range is RAM first.
        let end = gpa.checked_add(buf.len().saturating_sub(1) as u64);
        let in_ram = end.is_some_and(|end| {
            self.0.address_in_range(vm_memory::GuestAddress(gpa))
                && self.0.address_in_range(vm_memory::GuestAddress(end))
                && self.0.check_range(vm_memory::GuestAddress(gpa), buf.len())
        });
        in_ram
            && self
                .0
                .write_slice(buf, vm_memory::GuestAddress(gpa))
                .is_ok()
    }
}

/// Queue notification addresses as KVM ioeventfds (any access length, no data match).
struct KvmIoEvents(Arc<VmFd>);

impl virtio::IoEventRegistrar for KvmIoEvents {
    fn register(&self, addr: u64, fd: &vmm_sys_util::eventfd::EventFd) -> std::io::Result<()> {
        self.0
            .register_ioevent(
                fd,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, addr: u64, fd: &vmm_sys_util::eventfd::EventFd) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(
                fd,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// pci-testdev's ioeventfds: KVM swallows the writes they describe (the eventfds are never
/// read; they exist because KVM needs one to signal). The list is a leaf lock, taken under the
/// device's.
struct KvmDeviceIoEvents {
    fd: Arc<VmFd>,
    live: Mutex<Vec<(devices::IoEvent, vmm_sys_util::eventfd::EventFd)>>,
}

impl KvmDeviceIoEvents {
    fn address(e: &devices::IoEvent) -> kvm_ioctls::IoEventAddress {
        match e.space {
            devices::IoSpace::Mmio => kvm_ioctls::IoEventAddress::Mmio(e.addr),
            devices::IoSpace::Pio => kvm_ioctls::IoEventAddress::Pio(e.addr),
        }
    }

    fn ioctl(
        &self,
        e: &devices::IoEvent,
        fd: &vmm_sys_util::eventfd::EventFd,
        add: bool,
    ) -> std::io::Result<()> {
        let addr = Self::address(e);
        // Length 0 without a datamatch (any write), length 1 with one.
        let r = match (add, e.datamatch) {
            (true, None) => self.fd.register_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
            (true, Some(v)) => self.fd.register_ioevent(fd, &addr, v),
            (false, None) => self
                .fd
                .unregister_ioevent(fd, &addr, kvm_ioctls::NoDatamatch),
            (false, Some(v)) => self.fd.unregister_ioevent(fd, &addr, v),
        };
        r.map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl devices::IoEventFds for KvmDeviceIoEvents {
    fn add(&self, event: devices::IoEvent) -> std::io::Result<()> {
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
        self.ioctl(&event, &fd, true)?;
        lock(&self.live).push((event, fd));
        Ok(())
    }

    fn remove(&self, event: devices::IoEvent) -> std::io::Result<()> {
        let mut live = lock(&self.live);
        let Some(i) = live.iter().position(|(e, _)| *e == event) else {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        };
        let (_, fd) = live.remove(i);
        self.ioctl(&event, &fd, false)
    }
}

/// A clonable output sink shared by the serial ports of successive VM incarnations (reset
/// rebuilds the VM but keeps writing to the same terminal or file).
#[derive(Clone)]
pub struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    /// Wraps a writer.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(w)))
    }

    /// Opens the sink a [`crate::config::SerialConfig`] names.
    pub fn open(config: &crate::config::SerialConfig) -> Result<Self, VmError> {
        use crate::config::SerialConfig;
        Ok(match config {
            SerialConfig::Stdio => Self::new(Box::new(std::io::stdout())),
            SerialConfig::Null => Self::new(Box::new(std::io::sink())),
            SerialConfig::File(path) => {
                Self::new(Box::new(File::create(path).map_err(|e| {
                    VmError::SerialFile(path.display().to_string(), e)
                })?))
            }
        })
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

/// The machine's host bridge and ISA / LPC bridge (functions on [`Devices::pci_bus`]).
pub enum Chipset {
    /// `pc`: the i440FX at 00.0 and the PIIX3 at 01.0.
    Pc {
        /// The host bridge.
        i440fx: Arc<Mutex<devices::i440fx::I440fx>>,
        /// The ISA bridge.
        piix3: Arc<Mutex<devices::piix3::Piix3>>,
    },
    /// `q35`: the MCH at 00.0 and the ICH9 LPC bridge at 1f.0.
    Q35 {
        /// The host bridge.
        mch: Arc<Mutex<devices::q35::Mch>>,
        /// The LPC bridge.
        lpc: Arc<Mutex<devices::q35::Ich9Lpc>>,
    },
}

/// Typed handles to the devices whose state the VMM needs to reach directly.
pub struct Devices {
    /// COM1.
    pub serial: Arc<Mutex<devices::serial::Serial>>,
    /// The PS/2 controller.
    pub i8042: Arc<Mutex<devices::i8042::I8042>>,
    /// The RTC and CMOS memory.
    pub cmos: Arc<Mutex<devices::cmos::Cmos>>,
    /// The PCI configuration ports (and the reset control register).
    pub pci_host: Arc<Mutex<devices::pci_host::PciHost>>,
    /// PCI bus 0 (host bridge, PIIX3, virtio devices).
    pub pci_bus: Arc<Mutex<devices::pci::PciBus>>,
    /// The host bridge and the ISA / LPC bridge on it.
    pub chipset: Chipset,
    /// QEMU's firmware configuration interface.
    pub fw_cfg: Arc<Mutex<devices::fw_cfg::FwCfg>>,
    /// pc-testdev's scratch and flush ports.
    pub testdev_ports: Arc<Mutex<devices::pc_testdev::PcTestdevPorts>>,
    /// pc-testdev's IRQ line ports.
    pub testdev_irq: Arc<Mutex<devices::pc_testdev::PcTestdevIrq>>,
    /// pc-testdev's MMIO scratch area.
    pub testdev_mmio: Arc<Mutex<devices::pc_testdev::PcTestdevMmio>>,
    /// The ACPI PM1 event and control registers.
    pub acpi_pm: Arc<Mutex<devices::acpi_pm::AcpiPm>>,
    /// The ACPI PM timer.
    pub pm_timer: Arc<Mutex<devices::pm_timer::PmTimer>>,
    /// System control port A (fast reset, A20).
    pub port92: Arc<Mutex<devices::reset_ports::Port92>>,
    /// The virtio-blk disks, in `--disk` order.
    pub virtio_blk: Vec<Arc<Mutex<virtio::VirtioPci>>>,
    /// The virtio-net cards, in `--net` order.
    pub virtio_net: Vec<Arc<Mutex<virtio::VirtioPci>>>,
    /// Their names, as QEMU's network clients are named (`announce-self`'s `interfaces`):
    /// the `-device` id, or `virtio-net-pci.N`.
    pub virtio_net_names: Vec<String>,
    /// The virtio-rng entropy source, if any.
    pub virtio_rng: Option<Arc<Mutex<virtio::VirtioPci>>>,
    /// The userspace IOAPIC (`kernel-irqchip=split`).
    pub ioapic: Option<Arc<Mutex<devices::ioapic::Ioapic>>>,
    /// The VT-d IOMMU (`-device intel-iommu`).
    pub intel_iommu: Option<Arc<Mutex<devices::intel_iommu::IntelIommu>>>,
    /// QEMU's edu devices.
    pub edu: Vec<Arc<Mutex<devices::edu::Edu>>>,
    /// QEMU's PCI test devices.
    pub pci_testdev: Vec<Arc<Mutex<devices::pci_testdev::PciTestdev>>>,
    /// The disks as block migration sees them (`virtio0`, … in `--disk` order), until the
    /// `block` section takes them.
    pub block_disks: Vec<migration::block::BlockDisk>,
}

/// The kernel and initrd, kept so that a reset can load them again.
struct BootImage {
    name: String,
    image: Vec<u8>,
    cmdline: String,
    initrd: Option<(Vec<u8>, String)>,
    format: KernelFormat,
}

impl BootImage {
    fn read(path: &std::path::Path, config: &VmConfig) -> Result<Self, VmError> {
        let name = path.display().to_string();
        let image = std::fs::read(path).map_err(|e| VmError::ReadKernel(name.clone(), e))?;
        let initrd = match &config.initrd {
            Some(p) => Some((
                std::fs::read(p).map_err(|e| VmError::ReadFile(p.display().to_string(), e))?,
                p.display().to_string(),
            )),
            None => None,
        };
        let format = loader::detect(&image).map_err(|e| VmError::Load(name.clone(), e))?;
        Ok(Self {
            name,
            image,
            cmdline: config.cmdline.clone(),
            initrd,
            format,
        })
    }
}

/// A built VM.
pub struct Vm {
    /// The VM file descriptor.
    pub fd: Arc<VmFd>,
    /// Guest RAM.
    pub memory: GuestMemoryMmap,
    /// Where RAM sits.
    pub layout: Layout,
    /// The big lock.
    pub machine: Arc<Mutex<Machine>>,
    /// Typed device handles.
    pub devices: Devices,
    /// KVM's dirty ring, when the VM collects dirty pages with it rather than the bitmap.
    pub dirty_rings: Option<Arc<DirtyRings>>,
    /// The detected kernel format (none for a destination started without a kernel).
    pub format: Option<KernelFormat>,
    boot: Option<BootImage>,
    cpus: u8,
    control: Arc<VcpuControl>,
    events: Mutex<Receiver<VmEvent>>,
    event_tx: std::sync::mpsc::Sender<VmEvent>,
    kvm: Kvm,
    pit: bool,
    acpi: bool,
    acpi_config: acpi::AcpiConfig,
    virtio_io: Option<virtio::EventLoop>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm(what, e)
}

/// The GSI routing QEMU's `pc` machine programs: ISA IRQs to both PICs (except the cascade) and
/// to the IOAPIC, IRQ 0 to IOAPIC pin 2, and the remaining IOAPIC pins 16–23 one to one.
fn gsi_routing() -> KvmIrqRouting {
    let entry = |gsi: u32, chip: u32, pin: u32| kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    };
    let mut entries = Vec::new();
    for gsi in 0..16u32 {
        if gsi != 2 {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            entries.push(entry(gsi, chip, pin));
        }
    }
    for gsi in 0..u32::from(IOAPIC_PINS) {
        let pin = if gsi < 16 {
            u32::from(isa_irq_to_ioapic_pin(gsi as u8))
        } else {
            gsi
        };
        if gsi != 2 {
            entries.push(entry(gsi, KVM_IRQCHIP_IOAPIC, pin));
        }
    }
    KvmIrqRouting::from_entries(&entries).expect("routing table within KVM's limit")
}

/// The VM exits `cpu-pm=on` asks KVM to disable, as QEMU does: HLT, PAUSE, MWAIT and C-state
/// exits, of those this KVM can disable (`KVM_CHECK_EXTENSION(KVM_CAP_X86_DISABLE_EXITS)`).
fn cpu_pm_exits(supported: u32) -> u32 {
    supported
        & (KVM_X86_DISABLE_EXITS_MWAIT
            | KVM_X86_DISABLE_EXITS_HLT
            | KVM_X86_DISABLE_EXITS_PAUSE
            | KVM_X86_DISABLE_EXITS_CSTATE)
}

/// Locks hopvm's present and future memory (guest RAM included) into host RAM.
fn lock_memory() -> Result<(), VmError> {
    // SAFETY: mlockall only changes how the kernel pages this process's memory.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        return Err(VmError::MemLock(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Physical memory of the host, in bytes.
fn host_memory() -> u64 {
    // SAFETY: sysconf only reads system information.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages.max(0) as u64).saturating_mul(page.max(0) as u64)
}

impl Vm {
    /// Builds a VM for `config`, writing COM1 to `serial_out`. The vCPUs start paused.
    pub fn build(config: &VmConfig, serial_out: SharedWriter) -> Result<Self, VmError> {
        // Read and check the image and the CPU model before touching KVM.
        let cpu_model: cpu_model::CpuModel = config.cpu.parse()?;
        let boot = match &config.kernel {
            Some(path) => Some(BootImage::read(path, config)?),
            None => None,
        };

        let host_mem = host_memory();
        if config.memory > host_mem {
            return Err(VmError::TooMuchMemory(
                crate::config::format_size(config.memory),
                crate::config::format_size(host_mem),
            ));
        }

        if config.mem_lock {
            // Before guest RAM is mapped: MCL_FUTURE makes the kernel populate and lock it.
            lock_memory()?;
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        cpu_model.check_hyperv(kvm.check_extension(kvm_ioctls::Cap::Hyperv))?;
        let max_cpus = kvm.get_max_vcpus().min(usize::from(mptable::IOAPIC_ID) - 1);
        if config.cpus == 0 || usize::from(config.cpus) > max_cpus {
            return Err(VmError::TooManyCpus(config.cpus, max_cpus));
        }
        let fd = Arc::new(kvm.create_vm().map_err(kvm_err("create vm"))?);
        // Both must be set before the first vCPU is created.
        fd.set_tss_address(TSS_ADDR)
            .map_err(kvm_err("set tss address"))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(kvm_err("set identity map address"))?;
        let layout = Layout::new(config.memory);
        let memory = memory::create_guest_memory(&layout)?;
        // Registering the first memory slot costs a few milliseconds of kernel time whatever
        // its size (an SRCU grace period); do it while the rest of the VM is put together.
        let slots = {
            let (fd, memory) = (fd.clone(), memory.clone());
            std::thread::Builder::new()
                .name(String::from("memslots"))
                .spawn(move || memory::set_kvm_slots(&fd, &memory, false))
                .map_err(|e| VmError::Vcpu(vcpu::VcpuError::Spawn(e)))?
        };
        if config.cpu_pm {
            // KVM only takes KVM_CAP_X86_DISABLE_EXITS before the first vCPU is created.
            let supported = fd.check_extension_raw(KVM_CAP_X86_DISABLE_EXITS.into());
            let exits = cpu_pm_exits(u32::try_from(supported).unwrap_or(0));
            if exits == 0 {
                log::warn!("cpu-pm=on: this kvm cannot disable any vm exit");
            } else {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_X86_DISABLE_EXITS,
                    ..Default::default()
                };
                cap.args[0] = u64::from(exits);
                fd.enable_cap(&cap)
                    .map_err(kvm_err("enable cap x86-disable-exits"))?;
            }
        }
        // KVM only takes the dirty ring before the first vCPU is created.
        let dirty_rings = match dirty_ring::resolve(&kvm, config.dirty_ring)? {
            Some(entries) => {
                use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
                let pages = memory.iter().map(|r| r.len() / memory::PAGE_SIZE).collect();
                let rings = DirtyRings::enable(&kvm, fd.clone(), entries, pages)?;
                log::info!("dirty log: kvm dirty ring, {entries} entries per vcpu");

                Some(Arc::new(rings))
            }
            None => None,
        };
        let q35 = config.machine == MachineType::Q35;
        let split = config.irqchip == IrqchipMode::Split;
        if q35 && layout.below_4g() > devices::q35::ECAM_BASE {
            return Err(VmError::Q35Memory(crate::config::format_size(
                config.memory,
            )));
        }
        if config.intel_iommu.is_some() && !q35 {
            return Err(VmError::IommuNeedsQ35);
        }
        if config.intel_iommu.is_some_and(|i| i.intremap) && !split {
            return Err(VmError::IommuNeedsSplit);
        }
        if config.intel_iommu.is_some()
            && (!config.disks.is_empty() || !config.nets.is_empty() || config.rng.is_some())
        {
            return Err(VmError::IommuWithVirtio);
        }
        let pit = config.pit && !split;
        if split {
            // KVM ordering: KVM_CAP_SPLIT_IRQCHIP takes the place of KVM_CREATE_IRQCHIP and must
            // be enabled before the first vCPU is created; args[0] is how many GSIs KVM keeps
            // for the userspace IOAPIC's routes (its 24 pins). There is no PIC and no PIT then
            // (KVM's PIT needs its PIC; hopvm has no userspace PIT).
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = u64::from(IOAPIC_PINS);
            fd.enable_cap(&cap)
                .map_err(kvm_err("enable cap split-irqchip"))?;
            if config.pit {
                log::info!("kernel-irqchip=split: the machine has no pit");
            }
        } else {
            fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
            // The PIT after the irqchip (its interrupts go there). QEMU's `pit=off` has none:
            // the guest's timers are then the LAPIC timer, the RTC and the PM timer.
            if config.pit {
                fd.create_pit2(kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                })
                .map_err(kvm_err("create pit"))?;
            }
            fd.set_gsi_routing(&gsi_routing())
                .map_err(kvm_err("set gsi routing"))?;
            bios::program_pic_and_pit(&fd, config.pit)?;
        }

        let router = Arc::new(MsiRouter::new(fd.clone(), !split));
        let ram: Arc<dyn devices::GuestRam> = Arc::new(DeviceRam(memory.clone()));
        let kvm_msi: Arc<dyn devices::MsiTarget> = Arc::new(KvmMsi {
            vm: fd.clone(),
            router: router.clone(),
        });
        let intel_iommu = match config.intel_iommu {
            Some(c) => Some(Arc::new(Mutex::new(devices::intel_iommu::IntelIommu::new(
                c,
                ram.clone(),
                kvm_msi.clone(),
            )?))),
            None => None,
        };
        let msi_target: Arc<dyn devices::MsiTarget> = match &intel_iommu {
            Some(iommu) => Arc::new(devices::intel_iommu::RemappedMsi::new(
                iommu.clone(),
                kvm_msi.clone(),
            )),
            None => kvm_msi.clone(),
        };
        let ioapic =
            split.then(|| Arc::new(Mutex::new(devices::ioapic::Ioapic::new(msi_target.clone()))));
        let irq = |gsi: u32| -> SharedIrq {
            match &ioapic {
                Some(ioapic) => {
                    let pin = u8::try_from(gsi).map_or(usize::MAX, |g| {
                        usize::from(if g < 16 { isa_irq_to_ioapic_pin(g) } else { g })
                    });
                    Arc::new(devices::ioapic::IoapicPin::new(ioapic.clone(), pin))
                }
                None => Arc::new(KvmIrq {
                    vm: fd.clone(),
                    gsi,
                }),
            }
        };
        // The host may stop taking output (a full pipe): the UART writes into a queue that
        // never blocks the vCPU holding the big lock.
        let serial = Arc::new(Mutex::new(devices::serial::Serial::new(
            irq(COM1_IRQ),
            devices::serial::OutputQueue::spawn(Box::new(serial_out)),
        )));
        let i8042 = Arc::new(Mutex::new(devices::i8042::I8042::new(
            irq(KBD_IRQ),
            irq(AUX_IRQ),
        )));
        let cmos = Arc::new(Mutex::new(devices::cmos::Cmos::new(
            layout.below_4g(),
            layout.above_4g(),
            config.cpus,
            irq(RTC_IRQ),
        )));
        let mut pio = Bus::new("pio");
        pio.insert(COM1_BASE, 8, serial.clone())?;
        pio.insert(0x60, 5, i8042.clone())?;
        pio.insert(0x70, 2, cmos.clone())?;
        pio.insert(0x80, 1, Arc::new(Mutex::new(Sink)))?;
        // PCI INTx: each function's pin is a line of the ISA bridge's PIRQ router, which
        // drives the ISA IRQ its route register names (10, 10, 11, 11 at boot).
        let pirq = devices::pirq::PirqRouter::new(
            if q35 {
                devices::pirq::RouteFormat::Ich9
            } else {
                devices::pirq::RouteFormat::Piix
            },
            (0..devices::pirq::ISA_IRQS as u32).map(irq).collect(),
        );
        let (pci_bus, chipset) = if q35 {
            let (bus, mch, lpc) = devices::q35::new_chipset(Some(pirq.clone()));
            (bus, Chipset::Q35 { mch, lpc })
        } else {
            let (bus, i440fx, piix3) = devices::pci::PciBus::pc_chipset(Some(pirq.clone()));
            (bus, Chipset::Pc { i440fx, piix3 })
        };
        let pci_bus = Arc::new(Mutex::new(pci_bus));
        let pci_host = Arc::new(Mutex::new(devices::pci_host::PciHost::with_bus(
            pci_bus.clone(),
        )));
        pio.insert(0xcf8, 8, pci_host.clone())?;
        pio.insert(
            u64::from(config.debug_exit.iobase),
            u64::from(config.debug_exit.iosize),
            Arc::new(Mutex::new(devices::debug_exit::DebugExit::new())),
        )?;
        let fw_cfg = Arc::new(Mutex::new(devices::fw_cfg::FwCfg::new(
            config.memory,
            u16::from(config.cpus),
            u16::from(config.cpus),
        )));
        pio.insert(FW_CFG_BASE, 2, fw_cfg.clone())?;
        let testdev_ports = Arc::new(Mutex::new(devices::pc_testdev::PcTestdevPorts::new()));
        pio.insert(TESTDEV_PORTS, 12, testdev_ports.clone())?;
        let testdev_irq = Arc::new(Mutex::new(devices::pc_testdev::PcTestdevIrq::new(
            (0..u32::from(IOAPIC_PINS)).map(irq).collect(),
        )));
        pio.insert(
            TESTDEV_IRQ_PORTS,
            u64::from(IOAPIC_PINS),
            testdev_irq.clone(),
        )?;
        let acpi_pm = Arc::new(Mutex::new(devices::acpi_pm::AcpiPm::new()));
        pio.insert(acpi::PM1A_EVT_BLK.into(), 6, acpi_pm.clone())?;
        let pm_timer = Arc::new(Mutex::new(devices::pm_timer::PmTimer::new()));
        pio.insert(PM_TIMER_PORT, 4, pm_timer.clone())?;
        let port92 = Arc::new(Mutex::new(devices::reset_ports::Port92::new()));
        pio.insert(0x92, 1, port92.clone())?;
        let mut mmio = Bus::new("mmio");
        let testdev_mmio = Arc::new(Mutex::new(devices::pc_testdev::PcTestdevMmio::new()));
        mmio.insert(TESTDEV_MMIO, 0x1_0000, testdev_mmio.clone())?;
        // virtio devices: the disks in order, then the entropy source, one PCI slot each from
        // 00.2 on (or where QEMU's addr= puts them).
        let mut virtio_blk = Vec::new();
        let mut virtio_net = Vec::new();
        let mut virtio_rng = None;
        let mut subscribers = Vec::new();
        let mut quiesce = Vec::new();
        let ioevents: Arc<dyn virtio::IoEventRegistrar> = Arc::new(KvmIoEvents(fd.clone()));
        let mut wanted: Vec<(Option<u8>, Box<dyn virtio::VirtioBackend>)> = Vec::new();
        let mut block_disks = Vec::new();
        for (i, disk) in config.disks.iter().enumerate() {
            let backend = virtio::Block::open(&disk.path, disk.readonly, &disk.serial)?;
            block_disks.push(backend.migration_disk(&format!("virtio{i}"))?);
            wanted.push((disk.slot, Box::new(backend)));
        }
        for (i, net) in config.nets.iter().enumerate() {
            let mac = net.mac.unwrap_or(crate::config::default_mac(i));
            let backend = match net.fd {
                Some(fd) => {
                    let owned = migration::transport::take_inherited_fd(fd)
                        .ok_or(VmError::NotInherited(fd))?;
                    virtio::Net::from_fd(owned, mac)?
                }
                None => virtio::Net::open(&net.tap, mac)?,
            };
            wanted.push((net.slot, Box::new(backend)));
        }
        if let Some(rng) = &config.rng {
            wanted.push((rng.slot, Box::new(virtio::Entropy::new())));
        }
        // Devices with a device number of their own first, then the others in order.
        let mut pci_slots: Vec<Option<u8>> = wanted.iter().map(|w| w.0).collect();
        let mut taken: Vec<u8> = if q35 {
            vec![0, devices::q35::LPC_SLOT]
        } else {
            vec![0, 1]
        };
        for s in pci_slots.iter().flatten() {
            if taken.contains(s) || *s >= 32 {
                return Err(VmError::PciSlot(*s));
            }
            taken.push(*s);
        }
        for s in pci_slots.iter_mut().filter(|s| s.is_none()) {
            let free = (2..32u8)
                .find(|n| !taken.contains(n))
                .ok_or(VmError::PciSlots)?;
            taken.push(free);
            *s = Some(free);
        }
        let (disks, nets) = (config.disks.len(), config.nets.len());
        for (i, ((_, backend), slot)) in wanted
            .into_iter()
            .zip(pci_slots.into_iter().flatten())
            .enumerate()
        {
            // One MSI-X vector per queue and one for configuration changes.
            let vectors = backend.queue_max_sizes().len() + 1;
            let msi = Arc::new(KvmMsiVectors::new(fd.clone(), router.clone(), vectors));
            let dev = virtio::VirtioPci::new(
                backend,
                memory.clone(),
                pirq.line(devices::pci::intx_pirq(slot, 1)),
                msi,
                Some(ioevents.clone()),
            )?;
            subscribers.push(dev.subscriber());
            quiesce.push(dev.quiesce());
            let dev = Arc::new(Mutex::new(dev));
            if !lock(&pci_bus).insert(slot, dev.clone()) {
                return Err(VmError::PciSlot(slot));
            }
            if i < disks {
                virtio_blk.push(dev);
            } else if i < disks + nets {
                virtio_net.push(dev);
            } else {
                virtio_rng = Some(dev);
            }
        }
        let mut edu = Vec::new();
        for _ in 0..config.edu {
            let slot = (1..32u8)
                .find(|n| !taken.contains(n))
                .ok_or(VmError::PciSlots)?;
            taken.push(slot);
            let dev = Arc::new(Mutex::new(devices::edu::Edu::new(
                u16::from(slot) << 3,
                pirq.line(devices::pci::intx_pirq(slot, 1)),
                msi_target.clone(),
                devices::intel_iommu::DmaSpace::new(ram.clone(), intel_iommu.clone()),
            )));
            if !lock(&pci_bus).insert(slot, dev.clone()) {
                return Err(VmError::PciSlot(slot));
            }
            edu.push(dev);
        }
        let mut pci_testdev = Vec::new();
        let device_ioevents: Arc<dyn devices::IoEventFds> = Arc::new(KvmDeviceIoEvents {
            fd: fd.clone(),
            live: Mutex::new(Vec::new()),
        });
        for _ in 0..config.pci_testdev {
            let slot = (1..32u8)
                .find(|n| !taken.contains(n))
                .ok_or(VmError::PciSlots)?;
            taken.push(slot);
            let dev = Arc::new(Mutex::new(devices::pci_testdev::PciTestdev::new(Some(
                device_ioevents.clone(),
            ))));
            if !lock(&pci_bus).insert(slot, dev.clone()) {
                return Err(VmError::PciSlot(slot));
            }
            pci_testdev.push(dev);
        }
        let virtio_io = if subscribers.is_empty() {
            None
        } else {
            Some(virtio::EventLoop::spawn(subscribers)?)
        };
        // Firmware's job on a PC: place the BARs in the PCI hole and set the interrupt lines.
        lock(&pci_bus).assign_resources();
        // The BARs wherever the guest moves them: I/O BARs before the fixed ports (QEMU's
        // priority), memory BARs where no fixed device or RAM is.
        pio.set_window(
            Arc::new(Mutex::new(devices::pci::PciIoWindow::new(pci_bus.clone()))),
            WindowPriority::Above,
        );
        mmio.set_window(
            Arc::new(Mutex::new(devices::pci::PciMmioWindow::new(
                pci_bus.clone(),
            ))),
            WindowPriority::Below,
        );
        if q35 {
            mmio.insert(
                devices::q35::ECAM_BASE,
                devices::q35::ECAM_SIZE,
                Arc::new(Mutex::new(devices::q35::PciEcam::new(pci_bus.clone()))),
            )?;
        }
        if let Some(ioapic) = &ioapic {
            mmio.insert(
                devices::ioapic::IOAPIC_BASE,
                devices::ioapic::IOAPIC_SIZE,
                ioapic.clone(),
            )?;
        }
        if let Some(iommu) = &intel_iommu {
            mmio.insert(
                devices::intel_iommu::IOMMU_BASE,
                devices::intel_iommu::IOMMU_SIZE,
                iommu.clone(),
            )?;
        }
        let mut machine = Machine::new(pio, mmio);
        machine.ioapic = ioapic.clone();
        machine.quiesce = quiesce;
        let machine = Arc::new(Mutex::new(machine));

        vcpu::install_kick_handler()?;
        let arch_caps = cpu_model::arch_capabilities_msr(&kvm);
        let base_cpuid = cpu_model.apply(&cpu_model::supported_cpuid(&kvm, arch_caps)?)?;
        let vmx_msrs = cpu_model.vmx_msrs(&base_cpuid, |m| cpu_model::feature_msr(&kvm, m))?;
        let vmx_msrs = kvm_bindings::Msrs::from_entries(
            &vmx_msrs
                .iter()
                .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| VmError::CpuModel(cpu_model::CpuModelError::TooManyEntries))?;
        let mut opts = CpuidOptions {
            cpus: config.cpus,
            hide_arch_capabilities: false,
        };
        let control = Arc::new(VcpuControl::new());
        let (tx, events) = channel();
        let shared = VcpuShared {
            machine: machine.clone(),
            control: control.clone(),
            events: tx.clone(),
            memory: memory.clone(),
            dirty_rings: dirty_rings.clone(),
        };
        for id in 0..config.cpus {
            let vcpu = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create vcpu"))?;
            if let Some(rings) = &dirty_rings {
                // Mapped before the vCPU first runs: its ring is where KVM logs its writes.
                rings.add_vcpu(usize::from(id), &vcpu)?;
            }
            if id == 0 {
                // Advertising IA32_ARCH_CAPABILITIES when KVM refuses the host's value for it
                // is what makes QEMU's `-cpu host` abort on some hosts: probe, and hide it.
                opts.hide_arch_capabilities =
                    cpu_model::must_hide_arch_capabilities(&vcpu, &base_cpuid, arch_caps);
            }
            vcpu.set_cpuid2(&vcpu_cpuid(&base_cpuid, id, &opts))
                .map_err(kvm_err("set cpuid"))?;
            // The VMX capability MSRs after the CPUID: KVM only takes them from a vCPU whose
            // CPUID shows VMX.
            if !vmx_msrs.as_slice().is_empty() {
                let set = vcpu.set_msrs(&vmx_msrs).map_err(kvm_err("set vmx msrs"))?;
                if set != vmx_msrs.as_slice().len() {
                    log::warn!("vcpu {id}: kvm accepted only {set} vmx capability msrs");
                }
            }
            let msrs = regs::boot_msrs();
            let set = vcpu.set_msrs(&msrs).map_err(kvm_err("set msrs"))?;
            if set != msrs.as_slice().len() {
                log::warn!("vcpu {id}: kvm accepted only {set} boot msrs");
            }
            vcpu.set_fpu(&regs::entry_fpu())
                .map_err(kvm_err("set fpu"))?;
            control.spawn(format!("vcpu{id}"), vcpu, usize::from(id), shared.clone())?;
        }

        let vm = Self {
            fd,
            memory,
            layout,
            machine,
            dirty_rings,
            devices: Devices {
                serial,
                i8042,
                cmos,
                pci_host,
                pci_bus,
                chipset,
                fw_cfg,
                testdev_ports,
                testdev_irq,
                testdev_mmio,
                acpi_pm,
                pm_timer,
                port92,
                virtio_blk,
                virtio_net,
                virtio_net_names: config
                    .nets
                    .iter()
                    .enumerate()
                    .map(|(i, n)| n.id.clone().unwrap_or(format!("virtio-net-pci.{i}")))
                    .collect(),
                virtio_rng,
                ioapic,
                intel_iommu,
                edu,
                pci_testdev,
                block_disks,
            },
            format: boot.as_ref().map(|b| b.format),
            boot,
            cpus: config.cpus,
            control,
            events: Mutex::new(events),
            event_tx: tx,
            kvm,
            pit,
            acpi: config.acpi,
            acpi_config: acpi::AcpiConfig {
                ecam: q35.then_some(devices::q35::ECAM_BASE),
                dmar: config.intel_iommu.map(|i| acpi::DmarConfig {
                    base: devices::intel_iommu::IOMMU_BASE,
                    aw_bits: i.aw_bits,
                    intremap: i.intremap,
                }),
                pic: !split,
                ..acpi::AcpiConfig::new(config.cpus)
            },
            virtio_io,
        };
        vm.load_kernel()?;
        // The vCPUs are still parked: the slots only have to exist before they first run.
        slots
            .join()
            .unwrap_or(Err(memory::MemoryError::SlotThread))?;
        Ok(vm)
    }

    /// Writes the kernel, its boot information and the firmware tables into guest memory and
    /// points the boot vCPU at the entry (the vCPUs must be paused). Without a kernel (a
    /// destination waiting for its state) there is nothing to do.
    pub fn load_kernel(&self) -> Result<(), VmError> {
        let Some(boot) = &self.boot else {
            return Ok(());
        };
        let (_, entry) = loader::load(
            &self.memory,
            &self.layout,
            &BootRequest {
                kernel_path: &boot.name,
                image: &boot.image,
                cmdline: &boot.cmdline,
                initrd: boot
                    .initrd
                    .as_ref()
                    .map(|(d, n)| (d.as_slice(), n.as_str())),
            },
        )
        .map_err(|e| VmError::Load(boot.name.clone(), e))?;
        regs::write_boot_tables(&self.memory, entry.mode)?;
        let pci: Vec<_> = lock(&self.devices.pci_bus)
            .intx_routes()
            .into_iter()
            .map(|(slot, pin, irq)| mptable::PciIntx { slot, pin, irq })
            .collect();
        mptable::write_with_pci(&self.memory, usize::from(self.cpus), &pci)?;
        if self.acpi {
            acpi::write_with(&self.memory, &self.acpi_config)?;
        }
        bios::write_ivt(&self.memory)?;
        // The boot vCPU starts at the loader's entry; the others stay in KVM's INIT-wait
        // state until the guest sends INIT + SIPI.
        let bsp = self.control.vcpus()[0].clone();
        let bsp = lock(&bsp);
        let sregs = bsp.get_sregs().map_err(kvm_err("get sregs"))?;
        bsp.set_sregs(&regs::entry_sregs(sregs, entry.mode))
            .map_err(kvm_err("set sregs"))?;
        bsp.set_regs(&regs::entry_regs(&entry))
            .map_err(kvm_err("set regs"))?;
        Ok(())
    }

    /// Points the boot vCPU at the ACPI FACS firmware waking vector, in real mode, as firmware
    /// does when the machine wakes from S3.
    pub fn enter_waking_vector(&self) -> Result<(), VmError> {
        let vector = acpi::waking_vector(&self.memory, self.cpus)?;
        let bsp = self.control.vcpus()[0].clone();
        let bsp = lock(&bsp);
        let sregs = bsp.get_sregs().map_err(kvm_err("get sregs"))?;
        bsp.set_sregs(&regs::real_mode_sregs(sregs, vector))
            .map_err(kvm_err("set sregs"))?;
        bsp.set_regs(&regs::real_mode_regs(vector))
            .map_err(kvm_err("set regs"))?;
        Ok(())
    }

    /// Zeroes all guest RAM by dropping its pages (a reset reloads the kernel afterwards).
    pub fn clear_memory(&self) {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        for region in self.memory.iter() {
            let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                continue;
            };
            // SAFETY: the range is exactly one private anonymous guest RAM mapping; dropping
            // its pages makes them read as zero again, which is what a reset wants, and no
            // Rust reference into guest RAM exists.
            unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_DONTNEED) };
            // KVM's dirty log never sees pages dropped by the host: mark them in the VMM's
            // own bitmap, so a migration under way sends every one of them again.
            let mmap: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
            vm_memory::bitmap::Bitmap::mark_dirty(mmap.bitmap(), 0, region.len() as usize);
        }
    }

    /// Whether the VM has a PIT (QEMU's `-machine pit=on`).
    pub fn has_pit(&self) -> bool {
        self.pit
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Lets the vCPUs run.
    pub fn resume(&self) {
        self.control.resume(&mut lock(&self.machine));
    }

    /// Stops every vCPU outside `KVM_RUN` and waits until they are.
    pub fn pause(&self) {
        drop(self.control.pause(lock(&self.machine)));
    }

    /// True while the vCPUs are asked to run.
    pub fn is_running(&self) -> bool {
        lock(&self.machine).vcpus_running()
    }

    /// The vCPU controller.
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    /// Waits for the next event from a vCPU.
    pub fn wait_event(&self) -> VmEvent {
        lock(&self.events)
            .recv()
            .unwrap_or_else(|_| VmEvent::Fatal(String::from("all vcpu threads ended")))
    }

    /// Waits up to `timeout` for the next event from a vCPU.
    pub fn wait_event_timeout(&self, timeout: std::time::Duration) -> Option<VmEvent> {
        lock(&self.events).recv_timeout(timeout).ok()
    }

    /// A sender that injects events as if a vCPU had reported them (terminal quit, QMP `quit`).
    pub fn event_sender(&self) -> std::sync::mpsc::Sender<VmEvent> {
        self.event_tx.clone()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.control.stop(&self.machine);
        // After the vCPUs: no notification can come any more.
        self.virtio_io.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_matches_a_pc() {
        let r = gsi_routing();
        let entries = r.as_slice();
        let ioapic_pin = |gsi: u32| {
            entries
                .iter()
                .find(|e| {
                    // SAFETY: every entry is an irqchip route.
                    let chip = unsafe { e.u.irqchip.irqchip };
                    e.gsi == gsi && chip == KVM_IRQCHIP_IOAPIC
                })
                // SAFETY: as above.
                .map(|e| unsafe { e.u.irqchip.pin })
        };
        assert_eq!(ioapic_pin(0), Some(2));
        assert_eq!(ioapic_pin(2), None);
        assert_eq!(ioapic_pin(4), Some(4));
        assert_eq!(ioapic_pin(23), Some(23));
        assert_eq!(entries.len(), 15 + 23);
    }

    #[test]
    fn msi_routes_on_top_of_the_pc_routes() {
        let kvm = Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let router = MsiRouter::new(vm.clone(), true);
        assert_eq!(router.allocate(), Some(FIRST_MSI_GSI));
        assert_eq!(router.allocate(), Some(FIRST_MSI_GSI + 1));
        router
            .set_route(FIRST_MSI_GSI, Some((0xfee0_0000, 0x41)))
            .unwrap();
        router
            .set_route(FIRST_MSI_GSI + 1, Some((0xfee0_1000, 0x42)))
            .unwrap();
        router
            .set_route(FIRST_MSI_GSI, Some((0xfee0_0000, 0x43)))
            .unwrap();
        assert_eq!(lock(&router.routes).msi.len(), 2);
        // A vector's irqfd on its GSI: KVM takes it.
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&fd, FIRST_MSI_GSI).unwrap();
        while router.allocate().is_some() {}
        assert_eq!(
            lock(&router.routes).next,
            END_MSI_GSI,
            "GSIs run out, no panic"
        );
    }

    #[test]
    fn device_ram_is_all_or_nothing() {
        use devices::GuestRam;
        let layout = Layout::new(16 << 20);
        let ram = DeviceRam(memory::create_guest_memory(&layout).unwrap());
        assert!(ram.write(0x1000, &[1, 2, 3, 4]));
        let mut b = [0u8; 4];
        assert!(ram.read(0x1000, &mut b));
        assert_eq!(b, [1, 2, 3, 4]);
        // Straddling the end of RAM: refused, and the part inside is not written.
        let end = 16 << 20;
        assert!(!ram.write(end - 2, &[9; 4]));
        assert!(ram.read(end - 2, &mut b[..2]));
        assert_eq!(&b[..2], &[0, 0]);
        assert!(!ram.read(end - 2, &mut b));
        assert!(!ram.write(u64::MAX - 1, &[9; 4]));
        assert!(!ram.read(0xfee0_0000, &mut b));
    }

    #[test]
    fn cpu_pm_disables_only_power_management_exits() {
        assert_eq!(cpu_pm_exits(0), 0);
        assert_eq!(
            cpu_pm_exits(0xff),
            KVM_X86_DISABLE_EXITS_MWAIT
                | KVM_X86_DISABLE_EXITS_HLT
                | KVM_X86_DISABLE_EXITS_PAUSE
                | KVM_X86_DISABLE_EXITS_CSTATE
        );
        assert_eq!(cpu_pm_exits(0x6), 0x6);
    }
}
