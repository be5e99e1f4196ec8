//! Saving and restoring the state KVM keeps for a VM and its vCPUs, for live migration.
//!
//! Guest RAM and hopvm's own devices are not enough to move a running guest: KVM holds the rest
//! of the machine in the kernel. Per vCPU that is the register files (`REGS`, `SREGS`, the FPU /
//! `XSAVE` area, `XCRS`, `DEBUGREGS`), the in-kernel local APIC, the MSRs, the multiprocessor
//! state (running, halted, waiting for INIT/SIPI) and the pending events (an exception being
//! injected, an NMI, an interrupt shadow); per VM it is the PIT, the two PICs, the IOAPIC and
//! the kvmclock. [`save_vcpu`] / [`restore_vcpu`] and [`save_vm`] / [`restore_vm`] move that
//! state into plain serde structs ([`VcpuState`], [`VmState`]) and back.
//!
//! # Ordering
//!
//! The `KVM_GET_*` / `KVM_SET_*` ioctls are not independent: some read or modify state others
//! carry, and a wrong order silently loses state (a pending exception, the TSC-deadline timer,
//! the APIC base). The order used here follows QEMU (`kvm_arch_get_registers` /
//! `kvm_arch_put_registers`) and Firecracker (`vstate/vcpu`); each rule is written down where it
//! applies, in [`save_vcpu`] and [`restore_vcpu`]. Both must run with *every* vCPU of the VM
//! paused: `KVM_GET_VCPU_EVENTS` / `KVM_SET_VCPU_EVENTS` race with IPIs and NMIs from running
//! vCPUs, and the VM-wide state changes under running vCPUs.
//!
//! # Hosts without every feature
//!
//! Optional state is saved only if the host's KVM offers it, like QEMU does: the capabilities
//! are probed once per VM ([`KvmCaps`]), and each missing one is reported with a log line
//! instead of failing the migration (no `KVM_CAP_XSAVE`: only the legacy FPU / SSE state moves).
//! The MSRs worth saving are probed once per VM too ([`SavedMsrs`]): every MSR KVM lists that it
//! can actually read. Restore is driven by what the saved state contains; if the destination
//! cannot take a piece of it, that is an error.
//!
//! # Encoding
//!
//! The structs are encoded as JSON ([`VcpuState::to_bytes`], [`VmState::to_bytes`]), like every
//! hopvm migration section, with the version numbers [`VCPU_STATE_VERSION`] and
//! [`VM_STATE_VERSION`] carried by the section header. The KVM structs inside use
//! kvm-bindings' serde implementations (its `serde` feature: each struct as its raw bytes, a
//! JSON array of numbers); the PICs and the IOAPIC travel as the `kvm_irqchip` that carries
//! them, the XSAVE area as a byte array, and `kvm_fpu`, which kvm-bindings does not serialise,
//! field by field. Decoding checks every struct's length exactly (kvm-bindings' decoder would
//! zero-pad or truncate), so a damaged blob is an error rather than a plausible state; it is
//! bounded in size and never panics. These sections are hopvm's own, not QEMU's (whose `cpu`
//! section is its vmstate format), so nothing outside hopvm reads this encoding.

use std::fmt;
use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_ioapic_state, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pic_state, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

/// Version of the [`VcpuState`] encoding (1 stored the KVM structs as hex strings).
pub const VCPU_STATE_VERSION: u32 = 2;
/// Version of the [`VmState`] encoding (1 stored the KVM structs as hex strings).
pub const VM_STATE_VERSION: u32 = 2;

/// The largest encoded [`VcpuState`] accepted (a 4 KiB XSAVE area and 1 KiB LAPIC page take
/// 12 to 25 KiB as JSON byte arrays; AMX state adds 8 KiB of bytes; the largest XSAVE area
/// accepted fits too).
pub const MAX_VCPU_STATE_BYTES: usize = 2 << 20;
/// The largest encoded [`VmState`] accepted (about 4 KiB in practice).
pub const MAX_VM_STATE_BYTES: usize = 64 << 10;

/// The most MSRs a [`VcpuState`] may hold (KVM lists a few dozen to a few hundred).
const MAX_MSRS: usize = 4096;
/// The guest TSC frequencies a state may ask for, in kHz: 1 MHz to 100 GHz. KVM accepts far
/// more in `KVM_SET_TSC_KHZ`, but a frequency of 2^31 kHz or more comes back from
/// `KVM_GET_TSC_KHZ` as a negative return value, i.e. an error, and the vCPU's state could
/// never be saved again.
const TSC_KHZ_RANGE: std::ops::RangeInclusive<u32> = 1_000..=100_000_000;
/// The largest XSAVE area accepted (AMX makes it about 11 KiB today).
const MAX_XSAVE_BYTES: usize = 256 << 10;
/// The size of the classic `kvm_xsave` struct, which `KVM_GET_XSAVE` fills.
const XSAVE_LEGACY_BYTES: usize = size_of::<kvm_xsave>();
/// MSRs per `KVM_GET_MSRS` / `KVM_SET_MSRS` call: KVM refuses 255 (`MAX_IO_MSRS`) or more.
const MSR_BATCH: usize = 128;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SPEC_CTRL: u32 = 0x48;
const MSR_MTRR_CAP: u32 = 0xfe;
const MSR_MTRR_PHYS_BASE0: u32 = 0x200;
const MSR_MTRR_FIXED: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_TSC_AUX: u32 = 0xc000_0103;
/// MTRRCAP: fixed-range MTRRs supported.
const MTRR_CAP_FIX: u64 = 1 << 8;
/// At most this many variable MTRR pairs (0x200.. up to the first fixed MTRR at 0x250).
const MAX_VAR_MTRRS: u64 = 40;

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// `KVM_GET_MSRS` stopped at this MSR.
    #[error("kvm cannot read msr {0:#x}")]
    MsrRead(u32),
    /// `KVM_SET_MSRS` stopped at this MSR.
    #[error("kvm cannot set msr {0:#x}")]
    MsrSet(u32),
    /// The encoded state is larger than the limit.
    #[error("state of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The section carries a version this build does not know.
    #[error("unsupported {section} state version {version}")]
    Version {
        /// `vcpu` or `vm`.
        section: &'static str,
        /// The version received.
        version: u32,
    },
    /// The state could not be encoded.
    #[error("cannot encode state: {0}")]
    Encode(#[source] serde_json::Error),
    /// The bytes are not a valid encoding.
    #[error("cannot decode state: {0}")]
    Decode(#[source] serde_json::Error),
    /// A KVM argument buffer (MSR batch, XSAVE area) could not be allocated.
    #[error("cannot build the {0} buffer: {1}")]
    Buffer(&'static str, #[source] vmm_sys_util::fam::Error),
    /// The source had no PIT (`-machine pit=off`), this VM has one.
    #[error("invalid state: the source has no PIT (pit=off), this VM has one")]
    NoPit,
    /// A restored XSAVE area of impossible size.
    #[error("invalid state: xsave area of {0} bytes")]
    XsaveSize(usize),
    /// More MSRs than any vCPU has.
    #[error("invalid state: {0} msrs, at most {MAX_MSRS} allowed")]
    TooManyMsrs(usize),
    /// A guest TSC frequency no CPU has (and KVM could not report back).
    #[error("invalid state: tsc frequency of {0} khz, outside 1 MHz to 100 GHz")]
    TscKhz(u32),
    /// More XCRs than the structure holds.
    #[error("invalid state: {0} xcrs")]
    Xcrs(u32),
}

/// Results of this module.
pub type Result<T> = std::result::Result<T, KvmStateError>;

fn ioctl(name: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |e| KvmStateError::Ioctl(name, e)
}

// ---------------------------------------------------------------------------------------------
// Encoding of the KVM structs.

/// `#[serde(deserialize_with)]` for a KVM struct that kvm-bindings serialises (as its raw bytes):
/// the bytes must be exactly the struct's size. kvm-bindings' own decoder zero-pads a short
/// blob and truncates a long one, which would turn a damaged stream into a plausible state.
fn exact<'de, T: DeserializeOwned, D: Deserializer<'de>>(d: D) -> std::result::Result<T, D::Error> {
    let bytes = Vec::<u8>::deserialize(d)?;
    exact_from(&bytes)
}

/// `#[serde(deserialize_with)]` for an optional KVM struct, see [`exact`].
fn exact_opt<'de, T: DeserializeOwned, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    match Option::<Vec<u8>>::deserialize(d)? {
        Some(bytes) => exact_from(&bytes).map(Some),
        None => Ok(None),
    }
}

fn exact_from<T: DeserializeOwned, E: serde::de::Error>(bytes: &[u8]) -> std::result::Result<T, E> {
    if bytes.len() != size_of::<T>() {
        return Err(E::custom(format!(
            "{} bytes where {} were expected",
            bytes.len(),
            size_of::<T>()
        )));
    }
    T::deserialize(serde::de::value::BytesDeserializer::<E>::new(bytes))
}

/// kvm-bindings gives `kvm_fpu` no serde implementation: its fields, by name.
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_fpu", deny_unknown_fields)]
struct KvmFpu {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    pad1: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
    pad2: u32,
}

/// The `kvm_irqchip` that carries a PIC's state (`KVM_SET_IRQCHIP`'s argument, and the form
/// kvm-bindings serialises).
fn pic_chip(chip_id: u32, pic: &kvm_pic_state) -> kvm_irqchip {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    chip.chip.pic = *pic;
    chip
}

/// The `kvm_irqchip` that carries the IOAPIC's state.
fn ioapic_chip(ioapic: &kvm_ioapic_state) -> kvm_irqchip {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    chip.chip.ioapic = *ioapic;
    chip
}

fn serialize_pic_master<S: serde::Serializer>(
    pic: &kvm_pic_state,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    pic_chip(KVM_IRQCHIP_PIC_MASTER, pic).serialize(s)
}

fn serialize_pic_slave<S: serde::Serializer>(
    pic: &kvm_pic_state,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    pic_chip(KVM_IRQCHIP_PIC_SLAVE, pic).serialize(s)
}

fn deserialize_pic<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<kvm_pic_state, D::Error> {
    let chip: kvm_irqchip = exact(d)?;
    // SAFETY: every member of the union is plain integers over bytes the decoder filled, so
    // reading the PIC view is defined.
    Ok(unsafe { chip.chip.pic })
}

// ---------------------------------------------------------------------------------------------
// Capabilities and the MSR list.

/// The optional pieces of state this host's KVM can save and restore, probed once per VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvmCaps {
    /// `KVM_CAP_XSAVE`: the whole XSAVE area (AVX and later) instead of the legacy FPU.
    pub xsave: bool,
    /// `KVM_CAP_XSAVE2`: the size of this VM's XSAVE area in bytes, or 0.
    pub xsave2_size: usize,
    /// `KVM_CAP_XCRS`: XCR0.
    pub xcrs: bool,
    /// `KVM_CAP_DEBUGREGS`: DR0–DR3, DR6, DR7.
    pub debugregs: bool,
    /// `KVM_CAP_VCPU_EVENTS`: pending exceptions, interrupts, NMIs, SMIs.
    pub vcpu_events: bool,
    /// `KVM_CAP_GET_TSC_KHZ`: the guest TSC frequency can be read.
    pub get_tsc_khz: bool,
    /// `KVM_CAP_TSC_CONTROL`: the guest TSC frequency can be set (scaled).
    pub tsc_control: bool,
    /// `KVM_CAP_ADJUST_CLOCK`: the flags `KVM_GET_CLOCK` may report, or 0 without the
    /// capability.
    pub adjust_clock: u32,
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the LAPIC timer has TSC-deadline mode.
    pub tsc_deadline_timer: bool,
}

impl KvmCaps {
    /// Asks the VM's KVM (capabilities are per VM: the XSAVE size depends on the guest's
    /// permitted features).
    pub fn probe(vm: &VmFd) -> Self {
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        Self {
            xsave: vm.check_extension(Cap::Xsave),
            xsave2_size: usize::try_from(xsave2).unwrap_or(0),
            xcrs: vm.check_extension(Cap::Xcrs),
            debugregs: vm.check_extension(Cap::Debugregs),
            vcpu_events: vm.check_extension(Cap::VcpuEvents),
            get_tsc_khz: vm.check_extension(Cap::GetTscKhz),
            tsc_control: vm.check_extension(Cap::TscControl),
            adjust_clock: u32::try_from(vm.check_extension_int(Cap::AdjustClock)).unwrap_or(0),
            tsc_deadline_timer: vm.check_extension(Cap::TscDeadlineTimer),
        }
    }

    /// Logs what will not be migrated on this host, one line per missing capability.
    pub fn log_missing(&self) {
        if !self.xsave {
            log::warn!(
                "kvm lacks KVM_CAP_XSAVE: migrating only the legacy fpu/sse state, \
                 avx and later registers are lost"
            );
        }
        if !self.xcrs {
            log::warn!("kvm lacks KVM_CAP_XCRS: xcr0 is not migrated");
        }
        if !self.debugregs {
            log::warn!("kvm lacks KVM_CAP_DEBUGREGS: debug registers are not migrated");
        }
        if !self.vcpu_events {
            log::warn!(
                "kvm lacks KVM_CAP_VCPU_EVENTS: pending exceptions, interrupts and nmis \
                 are not migrated"
            );
        }
        if !self.get_tsc_khz {
            log::warn!("kvm lacks KVM_CAP_GET_TSC_KHZ: the guest tsc frequency is not migrated");
        }
        if !self.tsc_control {
            log::info!(
                "kvm lacks KVM_CAP_TSC_CONTROL: a guest from a host with another tsc \
                 frequency cannot keep its tsc rate here"
            );
        }
        if self.adjust_clock == 0 {
            log::warn!("kvm lacks KVM_CAP_ADJUST_CLOCK: kvmclock is not migrated");
        }
    }
}

/// The MSRs [`save_vcpu`] reads from every vCPU of a VM, with the VM's [`KvmCaps`]; probed once
/// per VM by [`SavedMsrs::probe`].
///
/// The list is KVM's `KVM_GET_MSR_INDEX_LIST`, plus a few architectural MSRs a guest programs
/// and some KVMs leave out of that list (the MTRRs, `TSC_AUX`, `SPEC_CTRL`), minus every MSR
/// KVM refuses to read. It is ordered for restore: `IA32_TSC` first, `IA32_TSC_DEADLINE` last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedMsrs {
    indices: Vec<u32>,
    caps: KvmCaps,
}

/// Restore order of an MSR: `IA32_TSC` before everything (a TSC write re-bases the TSC offset
/// that other time MSRs are relative to), `IA32_TSC_DEADLINE` after everything (it is an
/// absolute guest TSC value, armed against the TSC restored before it).
fn msr_rank(index: u32) -> u8 {
    match index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    }
}

/// Reads `indices` in batches; `KVM_GET_MSRS` returns how many entries it read and stops at the
/// first MSR it refuses, so the refused ones are found without one ioctl per MSR. Returns the
/// readable MSRs with their values.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32], skip_refused: bool) -> Result<Vec<MsrValue>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| KvmStateError::Buffer("msr", e))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        let n = n.min(batch.len());
        out.extend(msrs.as_slice()[..n].iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
        if n < batch.len() {
            if !skip_refused {
                return Err(KvmStateError::MsrRead(batch[n]));
            }
            log::debug!("kvm refuses to read msr {:#x}: not migrated", batch[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

impl SavedMsrs {
    /// Probes the MSRs worth saving on `vcpu` (of `vm`, whose CPUID is already set) and logs
    /// the capabilities this host lacks. Call once per VM, before the vCPUs run.
    pub fn probe(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd) -> Result<Self> {
        let caps = KvmCaps::probe(vm);
        caps.log_missing();
        let listed = kvm
            .get_msr_index_list()
            .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let mut candidates: Vec<u32> = listed.as_slice().to_vec();
        let mut extra = vec![MSR_MTRR_DEF_TYPE, MSR_TSC_AUX, MSR_IA32_SPEC_CTRL];
        // The variable MTRRs come in base/mask pairs, as many as MTRRCAP's VCNT says.
        if let Some(cap) = read_msrs(vcpu, &[MSR_MTRR_CAP], true)?.first() {
            for i in 0..(cap.data & 0xff).min(MAX_VAR_MTRRS) as u32 {
                extra.extend([MSR_MTRR_PHYS_BASE0 + 2 * i, MSR_MTRR_PHYS_BASE0 + 2 * i + 1]);
            }
            if cap.data & MTRR_CAP_FIX != 0 {
                extra.extend(MSR_MTRR_FIXED);
            }
        }
        for index in extra {
            if !candidates.contains(&index) {
                candidates.push(index);
            }
        }
        let mut indices: Vec<u32> = read_msrs(vcpu, &candidates, true)?
            .into_iter()
            .map(|m| m.index)
            .collect();
        indices.sort_by_key(|&i| msr_rank(i));
        log::info!(
            "kvm state: saving {} of {} msrs, fpu as {}",
            indices.len(),
            candidates.len(),
            if caps.xsave { "xsave" } else { "legacy fpu" }
        );
        Ok(Self { indices, caps })
    }

    /// The MSR indices, in restore order.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// The VM's capabilities.
    pub fn caps(&self) -> &KvmCaps {
        &self.caps
    }
}

// ---------------------------------------------------------------------------------------------
// vCPU state.

/// One MSR's value.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MsrValue {
    /// The MSR index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// The x87 / SSE / AVX… register state.
// Boxing the legacy variant would save nothing: a VcpuState holds the 1 KiB LAPIC page inline.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum FpuState {
    /// The raw XSAVE area (`KVM_GET_XSAVE` / `KVM_GET_XSAVE2`), standard format, 4 KiB or more.
    Xsave(Vec<u8>),
    /// The legacy FPU / SSE state, on hosts without `KVM_CAP_XSAVE`.
    Fpu(#[serde(with = "KvmFpu")] kvm_fpu),
}

/// Everything KVM holds for one vCPU, besides its CPUID (which the destination sets when it
/// creates the vCPU).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// Running, halted, waiting for INIT / SIPI (`KVM_GET_MP_STATE`).
    #[serde(deserialize_with = "exact")]
    pub mp_state: kvm_mp_state,
    /// General registers, RIP, RFLAGS.
    #[serde(deserialize_with = "exact")]
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base, pending interrupt.
    #[serde(deserialize_with = "exact")]
    pub sregs: kvm_sregs,
    /// FPU and vector registers.
    pub fpu: FpuState,
    /// Extended control registers (XCR0), if the host has `KVM_CAP_XCRS`.
    #[serde(deserialize_with = "exact_opt")]
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers, if the host has `KVM_CAP_DEBUGREGS`.
    #[serde(deserialize_with = "exact_opt")]
    pub debugregs: Option<kvm_debugregs>,
    /// The in-kernel local APIC's register page.
    #[serde(deserialize_with = "exact")]
    pub lapic: kvm_lapic_state,
    /// MSRs, in restore order (TSC first, TSC deadline last).
    pub msrs: Vec<MsrValue>,
    /// Pending and injected exceptions, interrupts, NMIs, SMIs, if the host has
    /// `KVM_CAP_VCPU_EVENTS`.
    #[serde(deserialize_with = "exact_opt")]
    pub vcpu_events: Option<kvm_vcpu_events>,
    /// The guest TSC frequency in kHz, if the host can tell.
    pub tsc_khz: Option<u32>,
}

/// Decodes the JSON state of section `section` (at most `max` bytes), whose stream says it is
/// of section version `version`: only `expected` is known.
fn decode<T: DeserializeOwned>(
    section: &'static str,
    data: &[u8],
    version: u32,
    expected: u32,
    max: usize,
) -> Result<T> {
    if version != expected {
        return Err(KvmStateError::Version { section, version });
    }
    if data.len() > max {
        return Err(KvmStateError::TooLarge {
            len: data.len(),
            max,
        });
    }
    serde_json::from_slice(data).map_err(KvmStateError::Decode)
}

impl VcpuState {
    /// The JSON encoding of this state (section version [`VCPU_STATE_VERSION`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(KvmStateError::Encode)
    }

    /// Decodes a state of section version `version`; any damage is an error.
    pub fn from_bytes(data: &[u8], version: u32) -> Result<Self> {
        let state: Self = decode(
            "vcpu",
            data,
            version,
            VCPU_STATE_VERSION,
            MAX_VCPU_STATE_BYTES,
        )?;
        state.validate()?;
        Ok(state)
    }

    /// Checks what the types alone do not.
    pub fn validate(&self) -> Result<()> {
        if let FpuState::Xsave(area) = &self.fpu {
            if area.len() < XSAVE_LEGACY_BYTES
                || area.len() > MAX_XSAVE_BYTES
                || area.len() % 4 != 0
            {
                return Err(KvmStateError::XsaveSize(area.len()));
            }
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(KvmStateError::TooManyMsrs(self.msrs.len()));
        }
        if let Some(khz) = self.tsc_khz {
            if !TSC_KHZ_RANGE.contains(&khz) {
                return Err(KvmStateError::TscKhz(khz));
            }
        }
        if let Some(xcrs) = &self.xcrs {
            if xcrs.nr_xcrs as usize > xcrs.xcrs.len() {
                return Err(KvmStateError::Xcrs(xcrs.nr_xcrs));
            }
        }
        Ok(())
    }
}

/// The size of the host CPU's largest XSAVE area (CPUID.(EAX=0DH,ECX=0):ECX). The guest FPU
/// buffer KVM copies in and out (its "uabi size") never exceeds it.
#[allow(unused_unsafe)]
fn host_xsave_max() -> usize {
    // SAFETY: CPUID exists on every x86-64 CPU and only reads identification registers. (The
    // intrinsic is a safe function in newer Rust; the block keeps older compilers happy.)
    let leaf = unsafe { std::arch::x86_64::__cpuid_count(0xd, 0) };
    leaf.ecx as usize
}

/// A zeroed XSAVE buffer of at least `bytes` bytes, the host's largest XSAVE area and 4 KiB.
fn xsave_buffer(bytes: usize) -> Result<Xsave> {
    let total = bytes.max(host_xsave_max()).max(XSAVE_LEGACY_BYTES);
    let fam = (total - XSAVE_LEGACY_BYTES).div_ceil(4);
    Xsave::new(fam).map_err(|e| KvmStateError::Buffer("xsave", e))
}

fn xsave_words_to_bytes(region: &[u32], extra: &[u32], len: usize) -> Vec<u8> {
    region
        .iter()
        .chain(extra)
        .flat_map(|w| w.to_le_bytes())
        .take(len)
        .collect()
}

fn save_fpu(vcpu: &VcpuFd, caps: &KvmCaps) -> Result<FpuState> {
    if caps.xsave2_size > 0 {
        // KVM_GET_XSAVE2 whenever the host has it, as QEMU does: the guest may use state
        // beyond 4 KiB (AMX), which KVM_GET_XSAVE refuses to return.
        let mut buf = xsave_buffer(caps.xsave2_size)?;
        // SAFETY: KVM_GET_XSAVE2 copies out the guest FPU's uabi size, which is what
        // KVM_CAP_XSAVE2 reported and can never exceed the host CPU's largest XSAVE area (even
        // if the process's xfeature permissions grew since); `buf` is at least as large as
        // both, so KVM writes only within it.
        unsafe { vcpu.get_xsave2(&mut buf) }.map_err(ioctl("KVM_GET_XSAVE2"))?;
        let len = caps.xsave2_size.max(XSAVE_LEGACY_BYTES).div_ceil(4) * 4;
        let region = &buf.as_fam_struct_ref().xsave.region;
        Ok(FpuState::Xsave(xsave_words_to_bytes(
            region,
            buf.as_slice(),
            len,
        )))
    } else if caps.xsave {
        let xsave = vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        Ok(FpuState::Xsave(xsave_words_to_bytes(
            &xsave.region,
            &[],
            XSAVE_LEGACY_BYTES,
        )))
    } else {
        Ok(FpuState::Fpu(vcpu.get_fpu().map_err(ioctl("KVM_GET_FPU"))?))
    }
}

fn restore_fpu(vcpu: &VcpuFd, fpu: &FpuState) -> Result<()> {
    match fpu {
        FpuState::Xsave(area) => {
            let mut buf = xsave_buffer(area.len())?;
            let mut words = area
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            // SAFETY: only the fixed-size region is written, never the FAM length field, so
            // the wrapper's length stays consistent with its allocation.
            let header = unsafe { buf.as_mut_fam_struct() };
            for w in header.xsave.region.iter_mut() {
                *w = words.next().unwrap_or(0);
            }
            for w in buf.as_mut_slice().iter_mut() {
                *w = words.next().unwrap_or(0);
            }
            // SAFETY: KVM_SET_XSAVE copies the guest FPU's uabi size from the buffer. That size
            // never exceeds the host's largest XSAVE area (CPUID leaf 0xd), and `buf` is at
            // least that large (zero-padded past the saved area, which leaves the missing
            // components in their init state), so KVM reads only memory `buf` owns.
            unsafe { vcpu.set_xsave2(&buf) }.map_err(ioctl("KVM_SET_XSAVE"))
        }
        FpuState::Fpu(fpu) => vcpu.set_fpu(fpu).map_err(ioctl("KVM_SET_FPU")),
    }
}

/// Saves the state of a vCPU. Every vCPU of the VM must be paused (outside `KVM_RUN`), not only
/// this one: pending events are only consistent while no other vCPU can send an IPI or NMI.
pub fn save_vcpu(vcpu: &VcpuFd, msrs: &SavedMsrs) -> Result<VcpuState> {
    let caps = &msrs.caps;
    // MP_STATE first: KVM_GET_MP_STATE runs kvm_apic_accept_events(), which delivers a pending
    // INIT or SIPI and so may rewrite the registers and the LAPIC. Read after it, everything
    // else is consistent with the MP state saved.
    let mp_state = vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    // SREGS also carries a pending external interrupt (interrupt_bitmap), like VCPU_EVENTS.
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    let fpu = save_fpu(vcpu, caps)?;
    let xcrs = if caps.xcrs {
        Some(vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debugregs = if caps.debugregs {
        Some(vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?)
    } else {
        None
    };
    // KVM_GET_LAPIC computes the timer's current count (TMCCT) as of the call.
    let lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let tsc_khz = if caps.get_tsc_khz {
        Some(vcpu.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))?)
    } else {
        None
    };
    let msrs = read_msrs(vcpu, &msrs.indices, false)?;
    // VCPU_EVENTS last: the GET ioctls above may complete or queue events (accepting an INIT,
    // reading the LAPIC), and the pending exception / interrupt / NMI must be captured as
    // they finally are. It is only consistent while no other vCPU runs (an IPI or NMI could
    // arrive in between), hence the whole VM is paused.
    let vcpu_events = if caps.vcpu_events {
        Some(
            vcpu.get_vcpu_events()
                .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
        )
    } else {
        None
    };
    Ok(VcpuState {
        mp_state,
        regs,
        sregs,
        fpu,
        xcrs,
        debugregs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

/// Sets the guest TSC frequency the state was saved with, if this host's differs.
fn restore_tsc_khz(vcpu: &VcpuFd, khz: u32) {
    match vcpu.get_tsc_khz() {
        Ok(current) if current == khz => {}
        Ok(current) => {
            if let Err(e) = vcpu.set_tsc_khz(khz) {
                log::warn!(
                    "cannot run the guest tsc at its {khz} khz here ({current} khz, \
                     KVM_SET_TSC_KHZ: {e}): guest time will drift"
                );
            }
        }
        Err(e) => log::warn!("cannot read the tsc frequency ({e}): guest time may drift"),
    }
}

/// Restores a saved state into a vCPU created with the same CPUID, before it (or any vCPU of
/// the VM) runs.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    state.validate()?;
    // CPUID was set when the vCPU was created: it must precede everything, since KVM checks
    // SREGS (CR4 bits), XCRS, XSAVE components, MSRs and the LAPIC timer modes against it.
    //
    // The TSC frequency first: it scales every TSC value restored below.
    if let Some(khz) = state.tsc_khz {
        restore_tsc_khz(vcpu, khz);
    }
    // MP_STATE early: some SET ioctls behave differently for a vCPU waiting for INIT / SIPI.
    vcpu.set_mp_state(state.mp_state)
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    // REGS before VCPU_EVENTS: KVM_SET_REGS drops any pending exception, which VCPU_EVENTS
    // restores.
    vcpu.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
    restore_fpu(vcpu, &state.fpu)?;
    // XCRS after the XSAVE area, as QEMU does.
    if let Some(xcrs) = &state.xcrs {
        vcpu.set_xcrs(xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    }
    // SREGS before the LAPIC: it carries APIC_BASE (enabled, x2APIC mode), and KVM_SET_LAPIC
    // interprets the register page (the APIC ID format) in the mode APIC_BASE sets.
    vcpu.set_sregs(&state.sregs)
        .map_err(ioctl("KVM_SET_SREGS"))?;
    // LAPIC before the MSRs: KVM drops a write to IA32_TSC_DEADLINE unless the LVT timer is
    // already in TSC-deadline mode.
    vcpu.set_lapic(&state.lapic)
        .map_err(ioctl("KVM_SET_LAPIC"))?;
    restore_msrs(vcpu, &state.msrs)?;
    check_tsc(vcpu, state);
    // VCPU_EVENTS after REGS, SREGS and the LAPIC, which all touch pending events: it has the
    // final word on the pending / injected exception, interrupt, NMI and SMM state. Like the
    // save, it requires every vCPU of the VM to be stopped.
    if let Some(events) = &state.vcpu_events {
        let mut events = *events;
        // KVM_GET_VCPU_EVENTS fills sipi_vector without flagging it valid.
        events.flags |= KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        vcpu.set_vcpu_events(&events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    }
    if let Some(debugregs) = &state.debugregs {
        vcpu.set_debug_regs(debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    }
    Ok(())
}

/// Warns (once per process) when KVM accepted the guest TSC but did not apply it: on some hosts
/// host-initiated `IA32_TSC` writes are silently ignored (under PVM the guest reads the host's
/// TSC directly). The guest's TSC then continues from the destination host's, not from the
/// saved value; TSC-deadline timers and kvmclock still work, but the guest sees its TSC jump
/// by the difference.
fn check_tsc(vcpu: &VcpuFd, state: &VcpuState) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(wanted) = state.msrs.iter().find(|m| m.index == MSR_IA32_TSC) else {
        return;
    };
    let Ok(now) = read_msrs(vcpu, &[MSR_IA32_TSC], false) else {
        return;
    };
    let Some(now) = now.first() else {
        return;
    };
    // More than a second (at the saved frequency, else 5 GHz) away from what was written.
    let second = state
        .tsc_khz
        .map_or(5_000_000_000, |khz| u64::from(khz) * 1000);
    if now.data.abs_diff(wanted.data) > second
        && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        log::warn!(
            "kvm ignored the restored guest tsc ({:#x}, reads {:#x}): the guest tsc follows \
             this host's instead",
            wanted.data,
            now.data
        );
    }
}

/// Writes the MSRs in batches, `IA32_TSC` first and `IA32_TSC_DEADLINE` last whatever order
/// the state has them in. `KVM_SET_MSRS` returns how many it set and stops at the first it
/// refuses: that one is named in the error.
fn restore_msrs(vcpu: &VcpuFd, msrs: &[MsrValue]) -> Result<()> {
    let mut ordered = msrs.to_vec();
    ordered.sort_by_key(|m| msr_rank(m.index));
    for batch in ordered.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| KvmStateError::Buffer("msr", e))?;
        let n = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if n < batch.len() {
            return Err(KvmStateError::MsrSet(batch[n].index));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// VM state.

/// The in-kernel IOAPIC's state (`kvm_ioapic_state`, which kvm-bindings gives no `PartialEq` or
/// `Debug`: its redirection entries are unions).
#[derive(Clone, Copy)]
pub struct IoapicState(pub kvm_ioapic_state);

impl IoapicState {
    /// Redirection table entry `pin` as a 64-bit value (`None` past the last pin).
    pub fn redirection(&self, pin: usize) -> Option<u64> {
        // SAFETY: both members of the union are 8 bytes of plain integers, so reading the u64
        // view of any entry is defined.
        self.0.redirtbl.get(pin).map(|e| unsafe { e.bits })
    }

    /// Sets redirection table entry `pin` (ignored past the last pin).
    pub fn set_redirection(&mut self, pin: usize, bits: u64) {
        if let Some(e) = self.0.redirtbl.get_mut(pin) {
            e.bits = bits;
        }
    }
}

impl PartialEq for IoapicState {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.0, &other.0);
        (a.base_address, a.ioregsel, a.id, a.irr, a.pad)
            == (b.base_address, b.ioregsel, b.id, b.irr, b.pad)
            && (0..a.redirtbl.len()).all(|pin| self.redirection(pin) == other.redirection(pin))
    }
}

impl fmt::Debug for IoapicState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redirtbl: Vec<String> = (0..self.0.redirtbl.len())
            .filter_map(|pin| self.redirection(pin))
            .map(|bits| format!("{bits:#x}"))
            .collect();
        f.debug_struct("IoapicState")
            .field("base_address", &format_args!("{:#x}", self.0.base_address))
            .field("ioregsel", &self.0.ioregsel)
            .field("id", &self.0.id)
            .field("irr", &format_args!("{:#x}", self.0.irr))
            .field("redirtbl", &redirtbl)
            .finish()
    }
}

/// Encoded as the `kvm_irqchip` that carries it, which kvm-bindings serialises.
impl Serialize for IoapicState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        ioapic_chip(&self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for IoapicState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let chip: kvm_irqchip = exact(d)?;
        // SAFETY: every member of the union is plain integers over bytes the decoder filled, so
        // reading the IOAPIC view is defined.
        Ok(Self(unsafe { chip.chip.ioapic }))
    }
}

/// Everything KVM holds for the VM as a whole.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The PIT's three channels (`KVM_GET_PIT2`); none for a VM without a PIT
    /// (`-machine pit=off`).
    #[serde(deserialize_with = "exact_opt")]
    pub pit: Option<kvm_pit_state2>,
    /// The master PIC.
    #[serde(
        serialize_with = "serialize_pic_master",
        deserialize_with = "deserialize_pic"
    )]
    pub pic_master: kvm_pic_state,
    /// The slave PIC.
    #[serde(
        serialize_with = "serialize_pic_slave",
        deserialize_with = "deserialize_pic"
    )]
    pub pic_slave: kvm_pic_state,
    /// The IOAPIC.
    pub ioapic: IoapicState,
    /// kvmclock (`KVM_GET_CLOCK`), if the host has `KVM_CAP_ADJUST_CLOCK`.
    #[serde(deserialize_with = "exact_opt")]
    pub clock: Option<kvm_clock_data>,
}

impl VmState {
    /// The JSON encoding of this state (section version [`VM_STATE_VERSION`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(KvmStateError::Encode)
    }

    /// Decodes a state of section version `version`; any damage is an error.
    pub fn from_bytes(data: &[u8], version: u32) -> Result<Self> {
        decode("vm", data, version, VM_STATE_VERSION, MAX_VM_STATE_BYTES)
    }
}

fn get_irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// The PIT's state, or none if the VM has no PIT (KVM answers ENXIO).
fn get_pit(vm: &VmFd) -> Result<Option<kvm_pit_state2>> {
    match vm.get_pit2() {
        Ok(pit) => Ok(Some(pit)),
        Err(e) if e.errno() == libc::ENXIO => Ok(None),
        Err(e) => Err(KvmStateError::Ioctl("KVM_GET_PIT2", e)),
    }
}

/// Saves the PIT, PICs, IOAPIC and kvmclock of a VM whose vCPUs are all paused: the
/// controllers change under running vCPUs, and a clock read before the last vCPU stopped would
/// let the guest see time run backwards after the restore.
pub fn save_vm(vm: &VmFd) -> Result<VmState> {
    let pit = get_pit(vm)?;
    let (master, slave, ioapic) = (
        get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
    );
    // SAFETY: the union members read are the ones `chip_id` made KVM fill; all members are
    // plain integers, every byte initialised by the zeroed struct and KVM's copy.
    let (pic_master, pic_slave, ioapic) =
        unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
    let clock = get_clock(vm)?;
    Ok(VmState {
        pit,
        pic_master,
        pic_slave,
        ioapic: IoapicState(ioapic),
        clock,
    })
}

/// Restores the VM-wide state into a VM created with the same irqchip and PIT, before any of
/// its vCPUs runs.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<()> {
    // The interrupt controllers before the PIT, whose timer may fire into them at once.
    for chip in [
        pic_chip(KVM_IRQCHIP_PIC_MASTER, &state.pic_master),
        pic_chip(KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave),
        ioapic_chip(&state.ioapic.0),
    ] {
        vm.set_irqchip(&chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    // KVM_SET_PIT2 reloads each channel's count as of now: the part of channel 0's period that
    // had elapsed at the save is lost (QEMU's behaviour too).
    match &state.pit {
        Some(pit) => vm.set_pit2(pit).map_err(ioctl("KVM_SET_PIT2"))?,
        None if get_pit(vm)?.is_some() => return Err(KvmStateError::NoPit),
        None => {}
    }
    set_clock(vm, &state.clock)
}

/// kvmclock (`KVM_GET_CLOCK`), if the host has `KVM_CAP_ADJUST_CLOCK`.
fn get_clock(vm: &VmFd) -> Result<Option<kvm_clock_data>> {
    if vm.check_extension(Cap::AdjustClock) {
        Ok(Some(vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?))
    } else {
        log::warn!("kvm lacks KVM_CAP_ADJUST_CLOCK: kvmclock is not migrated");
        Ok(None)
    }
}

/// Sets kvmclock to a saved value, if there is one.
fn set_clock(vm: &VmFd, clock: &Option<kvm_clock_data>) -> Result<()> {
    if let Some(clock) = clock {
        // KVM_SET_CLOCK must happen before any vCPU runs, or the guest could read kvmclock
        // before it jumps to the saved value.
        //
        // Only the clock value is passed. KVM_GET_CLOCK's flags (TSC_STABLE, REALTIME,
        // HOST_TSC) and its realtime / host_tsc fields describe the source host; older kernels
        // reject any flag in KVM_SET_CLOCK, newer ones would, with KVM_CLOCK_REALTIME, advance
        // the clock by the wall time since the save. Like QEMU, hopvm keeps the guest's clock
        // standing still while the guest is stopped, consistently with its TSC, which is
        // restored to the saved value too: kvmclock continues from exactly where it stopped.
        let data = kvm_clock_data {
            clock: clock.clock,
            ..Default::default()
        };
        vm.set_clock(&data).map_err(ioctl("KVM_SET_CLOCK"))?;
    }
    Ok(())
}

/// The VM-wide KVM state of a `kernel-irqchip=split` machine: KVM holds no PIC, IOAPIC or PIT
/// there (the IOAPIC is hopvm's, in a section of its own), so only kvmclock.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitVmState {
    /// kvmclock (`KVM_GET_CLOCK`), if the host has `KVM_CAP_ADJUST_CLOCK`.
    #[serde(deserialize_with = "exact_opt")]
    pub clock: Option<kvm_clock_data>,
}

impl SplitVmState {
    /// The JSON encoding (section version [`VM_STATE_VERSION`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(KvmStateError::Encode)
    }

    /// Decodes a state of section version `version`; any damage is an error.
    pub fn from_bytes(data: &[u8], version: u32) -> Result<Self> {
        decode("vm", data, version, VM_STATE_VERSION, MAX_VM_STATE_BYTES)
    }
}

/// Saves a split-irqchip VM's kvmclock (all vCPUs paused, as for [`save_vm`]).
pub fn save_split_vm(vm: &VmFd) -> Result<SplitVmState> {
    Ok(SplitVmState {
        clock: get_clock(vm)?,
    })
}

/// Restores a split-irqchip VM's kvmclock, before any of its vCPUs runs.
pub fn restore_split_vm(vm: &VmFd, state: &SplitVmState) -> Result<()> {
    set_clock(vm, &state.clock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> VcpuState {
        VcpuState {
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            fpu: FpuState::Fpu(kvm_fpu::default()),
            xcrs: None,
            debugregs: None,
            lapic: kvm_lapic_state::default(),
            msrs: Vec::new(),
            vcpu_events: None,
            tsc_khz: Some(2_000_000),
        }
    }

    #[test]
    fn split_vm_state_round_trip_and_rejects() {
        let s = SplitVmState { clock: None };
        let bytes = s.to_bytes().unwrap();
        assert_eq!(
            SplitVmState::from_bytes(&bytes, VM_STATE_VERSION).unwrap(),
            s
        );
        assert!(SplitVmState::from_bytes(&bytes, VM_STATE_VERSION + 1).is_err());
        assert!(
            SplitVmState::from_bytes(br#"{"clock":null,"pit":null}"#, VM_STATE_VERSION).is_err()
        );
        assert!(SplitVmState::from_bytes(br#"{"clock":[1,2,3]}"#, VM_STATE_VERSION).is_err());
        assert!(SplitVmState::from_bytes(b"{", VM_STATE_VERSION).is_err());
    }

    #[test]
    fn validate_rejects_impossible_states() {
        state().validate().unwrap();
        // A hostile stream's tsc frequency: KVM takes it, then cannot report it back.
        for khz in [0, 999, 100_000_001, 0x8000_0000, u32::MAX] {
            let s = VcpuState {
                tsc_khz: Some(khz),
                ..state()
            };
            let e = s.validate().unwrap_err();
            assert!(e.to_string().contains("tsc frequency"), "{e}");
        }
        let s = VcpuState {
            msrs: vec![MsrValue { index: 0, data: 0 }; MAX_MSRS + 1],
            ..state()
        };
        assert!(s.validate().is_err());
        let s = VcpuState {
            fpu: FpuState::Xsave(vec![0; 100]),
            ..state()
        };
        assert!(s.validate().is_err());
        // Through the section decoder too.
        let mut bytes = serde_json::to_value(state()).unwrap();
        bytes["tsc_khz"] = serde_json::json!(u32::MAX);
        let bytes = serde_json::to_vec(&bytes).unwrap();
        assert!(VcpuState::from_bytes(&bytes, VCPU_STATE_VERSION).is_err());
    }
}
