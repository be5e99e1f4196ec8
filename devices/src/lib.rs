//! Emulated devices of hopvm's legacy PC (and of its `q35` machine).
//!
//! Every device lives in a file of its own and is split in two: the live struct, which may hold
//! handles (an output sink, an interrupt line), and a plain `…State` struct of serde data that
//! captures everything the guest can observe. `state()` takes a snapshot and `restore()` applies
//! one; the migration stream carries the state structs, so a device's state type *is* its wire
//! format. `restore()` returns a `Result` with the device module's own error type: a state the
//! device could not have reached (an over-long FIFO, reserved bits, an index out of range,
//! fields that contradict each other) is rejected before anything is applied, and unknown
//! fields are refused by the decoder. Each file has a save → restore round-trip test and a
//! rejection test.
//!
//! Devices know nothing of KVM: the VMM dispatches port and MMIO accesses to them through
//! [`BusDevice`], hands them an [`IrqLine`] for their interrupt, and acts on the [`VmRequest`]s
//! their writes return.
//!
//! | device | bus | base | length | interrupt lines |
//! |---|---|---|---|---|
//! | [`Serial`] (16550A) | pio | 0x3f8 | 8 | IRQ 4 |
//! | [`I8042`] (PS/2) | pio | 0x60 | 5 (0x60 data, 0x64 status/command) | IRQ 1, IRQ 12 |
//! | [`Cmos`] (RTC + CMOS RAM) | pio | 0x70 | 2 | IRQ 8 |
//! | [`DebugExit`] | pio | VMM's choice (0xf4) | VMM's choice (4) | — |
//! | [`PciHost`] (+ 0xcf9 reset control) | pio | 0xcf8 | 8 | — |
//! | [`pci::PciMmioWindow`] (memory BARs of [`pci::PciBus`]) | mmio | wherever the guest puts them (below the fixed devices) | — | PCI INTx → IRQ 10, 11 |
//! | [`FwCfg`] | pio | 0x510 | 2 | — |
//! | [`PcTestdevPorts`] | pio | 0xe0 | 12 | — |
//! | [`PcTestdevIrq`] | pio | 0x2000 | 24 | lines 0–23 |
//! | [`PcTestdevMmio`] | mmio | 0xff00_0000 | 0x10000 | — |
//! | [`PmTimer`] (ACPI PM timer) | pio | 0x608 | 4 | — |
//! | [`ioapic::Ioapic`] (`kernel-irqchip=split` only) | mmio | 0xfec0_0000 | 0x1000 | delivers MSIs |
//! | [`intel_iommu::IntelIommu`] (VT-d) | mmio | 0xfed9_0000 | 0x1000 | fault / invalidation events (MSI) |
//! | [`q35::PciEcam`] (`q35` only) | mmio | 0xb000_0000 | 0x1000_0000 | — |
//! | [`edu::Edu`] (a PCI function) | BAR 0 | assigned | 1 MiB | INTA#, one MSI |
//! | [`pci::PciIoWindow`] (I/O BARs of [`pci::PciBus`]) | pio | wherever the guest puts them, 0xc000 on from boot (above the fixed ports) | — | — |
//! | [`pci_testdev::PciTestdev`] (a PCI function) | BAR 0, BAR 1 (I/O) | assigned | 4 KiB, 256 ports | — |
//! | [`Port92`] (System Control Port A) | pio | 0x92 | 1 | — |

use std::sync::Arc;

pub mod acpi_pm;
pub mod cmos;
pub mod debug_exit;
pub mod edu;
pub mod fw_cfg;
pub mod i440fx;
pub mod i8042;
pub mod intel_iommu;
pub mod ioapic;
pub mod pc_testdev;
pub mod pci;
pub mod pci_host;
pub mod pci_testdev;
pub mod piix3;
pub mod pirq;
pub mod pm_timer;
pub mod q35;
pub mod reset_ports;
pub mod serial;

pub use acpi_pm::{AcpiPm, AcpiPmState, AcpiPmStateError};
pub use cmos::{Cmos, CmosState, CmosStateError};
pub use debug_exit::{DebugExit, DebugExitState};
pub use fw_cfg::{FwCfg, FwCfgError, FwCfgState};
pub use i8042::{I8042State, I8042StateError, I8042};
pub use pc_testdev::{
    PcTestdevIrq, PcTestdevIrqState, PcTestdevMmio, PcTestdevMmioState, PcTestdevPorts,
    PcTestdevPortsState, PcTestdevStateError,
};
pub use pci_host::{PciHost, PciHostState};
pub use pm_timer::{PmTimer, PmTimerState};
pub use reset_ports::{Port92, Port92State, ResetControl, ResetControlState, ResetPortsStateError};
pub use serial::{Serial, SerialState, SerialStateError};

/// A device on the I/O port or MMIO bus.
///
/// `offset` is relative to the base address the device was registered at; `data` has the
/// access width (1, 2, 4 or 8 bytes). Calls are serialised by the VMM's big lock. A device with
/// a thread of its own (the RTC timer) keeps what that thread touches behind the device's inner
/// mutex and says why it needs no big lock; `docs/architecture.md` has the whole lock order.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);

    /// Writes `data` at `offset`; the device may ask something of the VM in return.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest>;
}

/// A window onto a PCI bus's BARs in one address space (ports or memory): the VMM's bus asks
/// it about an access at an absolute address beside its fixed devices
/// ([`pci::PciIoWindow`] before them, [`pci::PciMmioWindow`] after them).
pub trait BarWindow: Send {
    /// Reads at `addr` if a BAR decodes `[addr, addr + data.len())`; false (and `data`
    /// untouched) if none does.
    fn bar_read(&mut self, addr: u64, data: &mut [u8]) -> bool;

    /// Writes at `addr` if a BAR decodes it; false if none does.
    fn bar_write(&mut self, addr: u64, data: &[u8]) -> bool;
}

/// The address space of an [`IoEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoSpace {
    /// Guest-physical memory.
    Mmio,
    /// I/O ports.
    Pio,
}

/// A guest write the hypervisor should swallow and turn into an eventfd signal (KVM's
/// ioeventfd) instead of an exit to the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoEvent {
    /// Which bus.
    pub space: IoSpace,
    /// The address or port.
    pub addr: u64,
    /// `Some(v)`: only 1-byte writes of `v`; `None`: writes of any length and value.
    pub datamatch: Option<u8>,
}

/// Registers [`IoEvent`]s with the hypervisor (the VMM owns the eventfds behind them).
pub trait IoEventFds: Send + Sync {
    /// Starts swallowing the writes `event` describes.
    fn add(&self, event: IoEvent) -> std::io::Result<()>;
    /// Stops it.
    fn remove(&self, event: IoEvent) -> std::io::Result<()>;
}

/// Something a device asks of the whole VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRequest {
    /// Reset the machine (the VMM ends instead under `--no-reboot`).
    Reset,
    /// End hopvm with this process exit status.
    Exit(i32),
    /// Flush the host's mapping of the guest-physical page at this page-aligned address, so
    /// that the next guest access to it faults in the host again (pc-testdev's port 0xe4; QEMU
    /// does `mprotect(PROT_NONE)` and back). The VM goes on running.
    FlushPage(u64),
    /// Power the machine off (ACPI S5).
    PowerOff,
    /// Suspend the machine to RAM (ACPI S3).
    Suspend,
}

/// A device back-end that works outside the vCPU threads (virtio's `virtio-io` thread) and
/// must stand still while the vCPUs do: when the VM is paused (QMP `stop`, the migration's
/// switchover, a reset) no request is served and no guest RAM is written until it resumes.
pub trait Quiesce: Send + Sync {
    /// Waits for the request in progress, if any, and serves no other.
    fn pause(&self);
    /// Serves again, starting with the notifications that arrived while paused.
    fn resume(&self);
}

/// A device's interrupt line into the interrupt controllers.
pub trait IrqLine: Send + Sync {
    /// Drives the line high (`true`) or low (`false`).
    fn set_level(&self, high: bool);
}

/// A shared interrupt line.
pub type SharedIrq = Arc<dyn IrqLine>;

/// Where message-signalled interrupts go: the VMM's KVM `KVM_SIGNAL_MSI`, possibly behind an
/// IOMMU's interrupt remapping ([`intel_iommu::RemappedMsi`]).
pub trait MsiTarget: Send + Sync {
    /// The message as it reaches the LAPICs, after interrupt remapping; `None` if it is
    /// blocked (a remapping fault, recorded by the IOMMU). `source` is the requester ID
    /// (bus << 8 | devfn) of a PCI function, `None` for the IOAPIC (whose messages carry no
    /// requester ID, as on QEMU).
    fn translate(&self, source: Option<u16>, address: u64, data: u32) -> Option<(u64, u32)>;

    /// Delivers a message that needs no more translation.
    fn send(&self, address: u64, data: u32);

    /// Translates and delivers a message.
    fn deliver(&self, source: Option<u16>, address: u64, data: u32) {
        if let Some((address, data)) = self.translate(source, address, data) {
            self.send(address, data);
        }
    }

    /// The IOAPIC tells which (translated) message pin `pin` sends while it is a level-triggered
    /// entry (`None` otherwise), so that the in-kernel LAPIC reports its EOI
    /// (`KVM_EXIT_IOAPIC_EOI` under `kernel-irqchip=split`).
    fn set_ioapic_route(&self, _pin: u8, _msi: Option<(u64, u32)>) {}
}

/// Guest-physical memory as devices that do DMA (or walk tables in RAM) see it.
pub trait GuestRam: Send + Sync {
    /// Reads `buf.len()` bytes at `gpa`; false (and `buf` unspecified) if any is not RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;

    /// Writes `buf` at `gpa`; false (nothing written) if any byte is not RAM.
    fn write(&self, gpa: u64, buf: &[u8]) -> bool;
}

/// The little-endian value of an access's bytes (only the first 8 count).
pub(crate) fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | u64::from(*b) << (8 * i))
}

/// Stores `value` little-endian into an access's bytes (bytes past the 8th read 0).
pub(crate) fn fill_le(data: &mut [u8], value: u64) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = if i < 8 { (value >> (8 * i)) as u8 } else { 0 };
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the device tests.

    use std::sync::{Arc, Mutex};

    use crate::{IrqLine, SharedIrq};

    /// An interrupt line that records every level it is driven to.
    #[derive(Default)]
    pub struct RecordingIrq {
        /// Every `set_level` call, in order.
        pub levels: Mutex<Vec<bool>>,
    }

    impl RecordingIrq {
        /// A new line and the same line as a [`SharedIrq`].
        pub fn new() -> (Arc<Self>, SharedIrq) {
            let irq = Arc::new(Self::default());
            let shared: SharedIrq = irq.clone();
            (irq, shared)
        }

        /// The level last driven (low if never driven).
        pub fn level(&self) -> bool {
            self.levels.lock().unwrap().last().copied().unwrap_or(false)
        }

        /// How many low → high transitions happened (edges an ISA PIC would see).
        pub fn rising_edges(&self) -> usize {
            let levels = self.levels.lock().unwrap();
            let mut prev = false;
            let mut edges = 0;
            for &l in levels.iter() {
                if l && !prev {
                    edges += 1;
                }
                prev = l;
            }
            edges
        }
    }

    impl IrqLine for RecordingIrq {
        fn set_level(&self, high: bool) {
            self.levels.lock().unwrap().push(high);
        }
    }
}
