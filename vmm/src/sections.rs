//! The VM's migration sections: how each part of hopvm's state goes into the stream.
//!
//! | section | instance | what | kind |
//! |---|---|---|---|
//! | `ram` | 0 | guest RAM, pre-copied with dirty logging | live |
//! | `cpu` | vCPU index | registers, LAPIC, MSRs, events ([`crate::kvm_state::VcpuState`]) | full |
//! | `kvm-vm` | 0 | PIT, PIC, IOAPIC, kvmclock ([`crate::kvm_state::VmState`]) | full |
//! | `serial`, `i8042`, `mc146818rtc`, `pci-host`, `fw_cfg`, `pc-testdev`, `pc-testdev-irq`, `pc-testdev-mmio`, `acpi-pm`, `acpi-pm-timer`, `port92` | 0 | each device's `…State` | full |
//! | `I440FX`, `PIIX3` (`pc`) or `mch`, `ICH9LPC` (`q35`) | 0 | the chipset's configuration spaces (QEMU's names); the PIRQ routes are re-applied on restore | full |
//!
//! Device and vCPU states travel as the JSON encoding of their plain state structs, so a
//! section's format is its state type. On load every section checks its version first, then
//! decodes (unknown fields are an error), then the component validates the state before it
//! applies any of it: a state the device could not have reached fails the load with the
//! section's name and the device's reason, and the device keeps its previous state.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};
use migration::ram::{DirtyLog, RamCounters};
use migration::{SectionError, Snapshot};
use serde::de::DeserializeOwned;
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::bus::lock;
use crate::dirty_ring::DirtyRings;
use crate::kvm_state::{self, SavedMsrs};
use crate::memory::{self, GuestMemoryMmap};

/// Largest state blob a device section accepts.
const MAX_STATE_LEN: usize = 16 << 20;

fn encode<S: Serialize>(state: &S) -> Result<Vec<u8>, SectionError> {
    serde_json::to_vec(state).map_err(|e| SectionError::Unsupported(e.to_string()))
}

fn invalid(section: &str, reason: String) -> SectionError {
    SectionError::Invalid {
        section: section.to_string(),
        reason,
    }
}

fn decode<S: DeserializeOwned>(section: &str, data: &[u8]) -> Result<S, SectionError> {
    if data.len() > MAX_STATE_LEN {
        return Err(invalid(section, format!("{} bytes of state", data.len())));
    }
    serde_json::from_slice(data).map_err(|e| invalid(section, e.to_string()))
}

/// The version of every device section: the JSON encoding of the device's `…State` struct.
/// A state struct that gains a field bumps it (and keeps reading the older versions).
pub const DEVICE_STATE_VERSION: u32 = 1;

/// A device section: the device's `state()` / `restore()` pair, JSON on the wire.
pub struct DeviceSection<D, S, E> {
    name: &'static str,
    device: Arc<Mutex<D>>,
    save: fn(&D) -> S,
    restore: fn(&mut D, &S) -> Result<(), E>,
}

impl<D, S, E> DeviceSection<D, S, E> {
    /// A section for `device`.
    pub fn new(
        name: &'static str,
        device: Arc<Mutex<D>>,
        save: fn(&D) -> S,
        restore: fn(&mut D, &S) -> Result<(), E>,
    ) -> Self {
        Self {
            name,
            device,
            save,
            restore,
        }
    }
}

impl<D, S, E> Snapshot for DeviceSection<D, S, E>
where
    D: Send,
    S: Serialize + DeserializeOwned,
    E: std::error::Error + Send + Sync + 'static,
{
    fn save(&mut self) -> Result<Vec<u8>, SectionError> {
        encode(&(self.save)(&lock(&self.device)))
    }

    /// Checks the section version, decodes the state and hands it to the device, which
    /// rejects a state it could not have reached (and then keeps its own).
    fn restore(&mut self, data: &[u8], version: u32) -> Result<(), SectionError> {
        SectionError::check_version(self.name, version, 1, DEVICE_STATE_VERSION)?;
        let state: S = decode(self.name, data)?;
        (self.restore)(&mut lock(&self.device), &state)
            .map_err(|e| SectionError::state(self.name, e))
    }
}

/// A vCPU's section. The vCPU must be paused (its thread parked) while it is saved or loaded.
pub struct VcpuSection {
    vcpu: Arc<Mutex<VcpuFd>>,
    msrs: Arc<SavedMsrs>,
}

impl VcpuSection {
    /// A section for `vcpu`, saving the MSRs in `msrs`.
    pub fn new(vcpu: Arc<Mutex<VcpuFd>>, msrs: Arc<SavedMsrs>) -> Self {
        Self { vcpu, msrs }
    }
}

impl Snapshot for VcpuSection {
    fn save(&mut self) -> Result<Vec<u8>, SectionError> {
        kvm_state::save_vcpu(&lock(&self.vcpu), &self.msrs)
            .and_then(|s| s.to_bytes())
            .map_err(|e| SectionError::Unsupported(e.to_string()))
    }

    fn restore(&mut self, data: &[u8], version: u32) -> Result<(), SectionError> {
        kvm_state::VcpuState::from_bytes(data, version)
            .and_then(|state| kvm_state::restore_vcpu(&lock(&self.vcpu), &state))
            .map_err(|e| SectionError::state("cpu", e))
    }
}

/// The VM-wide KVM state: PIT, PICs, IOAPIC and kvmclock.
pub struct KvmVmSection {
    vm: Arc<VmFd>,
}

impl KvmVmSection {
    /// A section for `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl Snapshot for KvmVmSection {
    fn save(&mut self) -> Result<Vec<u8>, SectionError> {
        kvm_state::save_vm(&self.vm)
            .and_then(|s| s.to_bytes())
            .map_err(|e| SectionError::Unsupported(e.to_string()))
    }

    fn restore(&mut self, data: &[u8], version: u32) -> Result<(), SectionError> {
        kvm_state::VmState::from_bytes(data, version)
            .and_then(|state| kvm_state::restore_vm(&self.vm, &state))
            .map_err(|e| SectionError::state("kvm-vm", e))
    }
}

/// The VM-wide KVM state of a `kernel-irqchip=split` machine: kvmclock.
pub struct KvmSplitVmSection {
    vm: Arc<VmFd>,
}

impl KvmSplitVmSection {
    /// A section for `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl Snapshot for KvmSplitVmSection {
    fn save(&mut self) -> Result<Vec<u8>, SectionError> {
        kvm_state::save_split_vm(&self.vm)
            .and_then(|s| s.to_bytes())
            .map_err(|e| SectionError::Unsupported(e.to_string()))
    }

    fn restore(&mut self, data: &[u8], version: u32) -> Result<(), SectionError> {
        kvm_state::SplitVmState::from_bytes(data, version)
            .and_then(|state| kvm_state::restore_split_vm(&self.vm, &state))
            .map_err(|e| SectionError::state("kvm-split-vm", e))
    }
}

/// KVM's dirty pages over hopvm's memory slots (slot n = RAM region n): from KVM's dirty
/// bitmap, or from the vCPUs' dirty rings when the VM has them ([`crate::dirty_ring`]).
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    rings: Option<Arc<DirtyRings>>,
    counters: Option<Arc<RamCounters>>,
    /// Ring-full exits and reap time when logging was switched on.
    full_base: (u64, Duration),
}

impl KvmDirtyLog {
    /// The dirty log of `vm`'s RAM, read from KVM's bitmap.
    pub fn new(vm: Arc<VmFd>, memory: GuestMemoryMmap) -> Self {
        Self {
            vm,
            memory,
            rings: None,
            counters: None,
            full_base: (0, Duration::ZERO),
        }
    }

    /// Reads the dirty pages from `rings` instead (the VM was built with them).
    pub fn with_rings(mut self, rings: Option<Arc<DirtyRings>>) -> Self {
        self.rings = rings;
        self
    }

    /// Books the harvest time and ring-full exits into `counters`' profile (with
    /// `HOPVM_MIGRATION_PROFILE` set).
    pub fn with_profile(mut self, counters: Arc<RamCounters>) -> Self {
        if std::env::var_os(migration::ram::PROFILE_ENV).is_some() {
            self.counters = Some(counters);
        }
        self
    }

    fn book(&self, t0: Option<Instant>) {
        let (Some(t0), Some(c)) = (t0, &self.counters) else {
            return;
        };
        let p = &c.profile;
        p.add_since(&p.harvest_ns, t0);
        if let Some(rings) = &self.rings {
            let (n, t) = rings.full_exits();
            p.ring_full_exits
                .store(n - self.full_base.0, Ordering::Relaxed);
            p.ring_full_ns
                .store((t - self.full_base.1).as_nanos() as u64, Ordering::Relaxed);
            p.ring_overruns
                .store(u64::from(rings.overrun()), Ordering::Relaxed);
        }
    }
}

impl DirtyLog for KvmDirtyLog {
    fn set_logging(&mut self, on: bool) -> std::io::Result<()> {
        if let (true, Some(rings)) = (on, &self.rings) {
            self.full_base = rings.full_exits();
            // A ring KVM overran cannot be trusted again: no migration starts on it.
            rings.check()?;
        }
        memory::set_kvm_slots(&self.vm, &self.memory, on).map_err(std::io::Error::other)?;
        if let (false, Some(rings)) = (on, &self.rings) {
            // Hand the entries logged so far back to KVM, so no ring stays nearly full
            // while nothing reads it; their pages wait in the harvest (a next migration
            // marks every page dirty anyway).
            rings.reap()?;
        }
        Ok(())
    }

    fn take_dirty(&mut self, index: usize) -> std::io::Result<Vec<u64>> {
        let t0 = self.counters.as_ref().map(|_| Instant::now());
        let dirty = match &self.rings {
            Some(rings) => rings.take_slot(index),
            None => {
                let region = self
                    .memory
                    .iter()
                    .nth(index)
                    .ok_or_else(|| std::io::Error::other(format!("no ram region {index}")))?;
                self.vm
                    .get_dirty_log(index as u32, region.len() as usize)
                    .map_err(std::io::Error::other)
            }
        };
        self.book(t0);
        dirty
    }

    fn enable_manual_protect(&mut self) -> bool {
        // Never with the ring: with KVM_DIRTY_LOG_INITIALLY_SET, KVM would not write-protect
        // the slots when logging starts, and the ring would see no writes (nor is there a
        // bitmap to clear).
        self.rings.is_none() && memory::enable_manual_dirty_protect(&self.vm)
    }

    fn clear_dirty(
        &mut self,
        index: usize,
        first_page: usize,
        pages: usize,
        bitmap: &[u64],
    ) -> std::io::Result<()> {
        let t0 = self.counters.as_ref().map(|_| Instant::now());
        let r = memory::clear_dirty_log(
            &self.vm,
            index as u32,
            first_page as u64,
            pages as u32,
            bitmap,
        );
        self.book(t0);
        r
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use devices::{AcpiPm, AcpiPmState};

    use super::*;

    fn section() -> (
        Arc<Mutex<AcpiPm>>,
        DeviceSection<AcpiPm, AcpiPmState, devices::AcpiPmStateError>,
    ) {
        let dev = Arc::new(Mutex::new(AcpiPm::new()));
        let s = DeviceSection::new("acpi-pm", dev.clone(), AcpiPm::state, AcpiPm::restore);
        (dev, s)
    }

    #[test]
    fn device_section_round_trip_and_rejections() {
        let (dev, mut s) = section();
        let saved = s.save().unwrap();
        s.restore(&saved, DEVICE_STATE_VERSION).unwrap();
        // Versions this side does not read.
        for version in [0, DEVICE_STATE_VERSION + 1] {
            let e = s.restore(&saved, version).unwrap_err();
            assert!(matches!(e, SectionError::Version { .. }), "{e}");
            assert!(e.to_string().contains("acpi-pm"), "{e}");
        }
        // Not JSON, unknown fields.
        assert!(matches!(
            s.restore(b"{", 1),
            Err(SectionError::Invalid { .. })
        ));
        assert!(s
            .restore(br#"{"status":0,"enable":0,"control":1,"x":1}"#, 1)
            .is_err());
        // Decodes, but the device rejects it: the error names the section and keeps the
        // device's reason as its source.
        let e = s
            .restore(br#"{"status":1,"enable":0,"control":1}"#, 1)
            .unwrap_err();
        assert!(matches!(e, SectionError::State { .. }));
        assert!(
            e.to_string()
                .starts_with("invalid acpi-pm state: pm1 status"),
            "{e}"
        );
        let source = e.source().unwrap();
        assert!(source.downcast_ref::<devices::AcpiPmStateError>().is_some());
        assert_eq!(lock(&dev).state(), AcpiPm::new().state());
    }
}
