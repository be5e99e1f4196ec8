//! Minimal ACPI tables, shaped like the ones QEMU's `pc` machine (with SeaBIOS) hands a guest.
//!
//! # Why
//!
//! Linux needs ACPI to power off (`\_S5_`), to find the PM timer it calibrates against and to
//! reboot through the FADT reset register; kvm-unit-tests' `s3` and `vmexit inl_from_pmtimer`
//! tests read the PM1 and PM timer ports out of the FADT and the FACS waking vector. Both find
//! the tables the legacy way: `lib/x86/acpi.c` scans 0xE0000–0xFFFFF on 16-byte boundaries for
//! `"RSD PTR "`, follows the RSDT and picks tables by signature (Linux scans the EBDA first,
//! then the same range). hopvm has no firmware, so it writes the tables itself, as it writes
//! the MP table.
//!
//! # What
//!
//! All tables live in the lower half of the reserved BIOS area, [`ACPI_START`]..[`ACPI_END`]
//! (0xE0000–0xEFFFF): the MP table sits in the EBDA and 0xF0000–0xFFFFF is kept for real-mode
//! BIOS stubs. In order:
//!
//! * **RSDP** at 0xE0000. Revision 0 (ACPI 1.0, RSDT only) as QEMU builds it for x86
//!   (`hw/i386/acpi-build.c`: `.revision = 0, .rsdt_tbl_offset = &rsdt`); revision 2 with an
//!   XSDT as well is available through [`AcpiConfig::rsdp_revision`]. Both checksums are set.
//! * **FACS**, 64 bytes, 64-byte aligned, all zero but signature and length (QEMU's
//!   `build_facs`). The guest writes its waking vector here before S3.
//! * **DSDT**, revision 1, whose AML body only declares the sleep-state packages, hand-encoded
//!   in [`DSDT_AML`]: `\_S3_` = {1, 1, 0, 0} and `\_S5_` = {0, 0, 0, 0}, the PIIX4 `SLP_TYP`
//!   values QEMU's DSDT uses (kvm-unit-tests' `s3` writes SLP_TYP 1). There is no `\_S4_`
//!   (no hibernation support in the PM device) and no PCI root bridge yet (no `PNP0A03` device,
//!   no `_PRT`): Linux then probes bus 0 through configuration mechanism #1 itself ("PCI:
//!   Probing PCI hardware") and finds the devices; their interrupts are MSI-X, INTx routing being
//!   in the MP table only.
//! * **FADT** (`FACP`), revision 3 (the ACPI 2.0 layout, 244 bytes). QEMU's `pc` machine uses
//!   revision 1 for the sake of Windows 2000, but revision 1 has no reset register; revision 3
//!   is what QEMU's `q35` machine builds, with the same fields and flags as `pc` plus the reset
//!   register. PIIX4 PM block at 0x600: PM1a event 0x600 (4 bytes), PM1a control 0x604
//!   (2 bytes), PM timer 0x608 (4 bytes, 24-bit: `TMR_VAL_EXT` clear); SCI on IRQ 9; no GPE
//!   block; no SMI command port (so the guest takes the machine to be in ACPI mode already);
//!   reset register 0xcf9 with value 0x06; RTC century at CMOS 0x32; `IAPC_BOOT_ARCH` says an
//!   8042 is present (Linux skips i8042 probing without it on a revision ≥ 2 FADT); flags as
//!   QEMU's `init_common_fadt_data`: WBINVD, PROC_C1, SLP_BUTTON, RTC_S4, USE_PLATFORM_CLOCK,
//!   FORCE_APIC_CLUSTER_MODEL above 8 CPUs, plus RESET_REG_SUP. The 64-bit `X_` fields repeat
//!   the 32-bit ones, `X_FIRMWARE_CTRL` is 0, as QEMU leaves it.
//! * **MADT** (`APIC`), as QEMU's `acpi_build_madt`: local APIC at 0xFEE00000, PCAT_COMPAT
//!   (not under `kernel-irqchip=split`, where hopvm has no PIC),
//!   one enabled Processor Local APIC per CPU (ACPI processor id = APIC id = index), the IOAPIC
//!   (the MP table's [`IOAPIC_ID`], 0xFEC00000, GSI base 0), interrupt source overrides
//!   IRQ 0 → GSI 2 (conforming) and IRQ 5, 9, 10, 11 level / active high (QEMU's PCI link IRQs
//!   on `pc`, among them the SCI), and a Local APIC NMI on LINT1 of every processor. This is
//!   the wiring hopvm programs into KVM's GSI routing, which [`mptable`](super::mptable)
//!   describes too.
//! * **MCFG** on `q35`: one allocation, the ECAM window (QEMU's 0xb0000000, segment 0, buses
//!   0–255).
//! * **DMAR** with `-device intel-iommu`, as QEMU's `build_dmar_q35`: host address width
//!   `aw-bits` − 1, the INTR_REMAP flag with `intremap=on`, one DRHD with INCLUDE_PCI_ALL for
//!   segment 0 at the VT-d register base and, with interrupt remapping, an IOAPIC device scope
//!   (enumeration ID the MADT's IOAPIC ID, source ID ff:00.0 as QEMU's pseudo IOAPIC device).
//! * **RSDT** (and **XSDT**) listing the FADT, the MADT and the MCFG and DMAR when present.
//!
//! The devices behind the FADT's ports are not built here; the constants below are what the
//! VM must register ([`PM_TMR_BLK`] is the `devices` crate's PM timer base).

use vm_memory::{Bytes, GuestAddress};

use crate::arch::mptable::{IOAPIC_ADDR, IOAPIC_ID, LAPIC_ADDR};
use crate::memory::{GuestMemoryMmap, BIOS_START};

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// No CPUs, or more than APIC IDs allow (0xfe is the IOAPIC, 0xff broadcast).
    #[error("invalid number of cpus for acpi: {0}")]
    InvalidCpuCount(u8),
    /// The tables would not fit below the given address.
    #[error("acpi tables do not fit below {0:#x}")]
    TooLarge(u64),
    /// Guest memory too small.
    #[error("cannot write the acpi tables: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// First byte of the window the tables are written to (the start of the BIOS area).
pub const ACPI_START: u64 = BIOS_START;
/// End (exclusive) of the window: 0xF0000–0xFFFFF stays free for real-mode BIOS stubs.
pub const ACPI_END: u64 = 0xf_0000;
/// Where [`write()`] puts the RSDP.
pub const RSDP_ADDR: u64 = ACPI_START;

/// Base of the PIIX4 power-management I/O block.
pub const PM_IO_BASE: u16 = 0x600;
/// PM1a event block (status at +0, enable at +2).
pub const PM1A_EVT_BLK: u16 = PM_IO_BASE;
/// Length of the PM1a event block in bytes.
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a control block.
pub const PM1A_CNT_BLK: u16 = PM_IO_BASE + 4;
/// Length of the PM1a control block in bytes.
pub const PM1_CNT_LEN: u8 = 2;
/// PM timer block (a 24-bit counter at 3.579545 MHz).
pub const PM_TMR_BLK: u16 = PM_IO_BASE + 8;
/// Length of the PM timer block in bytes.
pub const PM_TMR_LEN: u8 = 4;
/// The ISA IRQ (and GSI) of the SCI; level triggered, active high.
pub const SCI_IRQ: u8 = 9;
/// PM1 control: SCI_EN (reads as 1: the machine is always in ACPI mode).
pub const PM1_CNT_SCI_EN: u16 = 1 << 0;
/// PM1 control: SLP_EN, writing 1 enters the sleep state in SLP_TYP.
pub const PM1_CNT_SLP_EN: u16 = 1 << 13;
/// PM1 control: shift of the 3-bit SLP_TYP field.
pub const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
/// SLP_TYP of S3 (suspend to RAM) in the DSDT's `\_S3_`.
pub const SLP_TYP_S3: u8 = 1;
/// SLP_TYP of S5 (soft off) in the DSDT's `\_S5_`.
pub const SLP_TYP_S5: u8 = 0;
/// The FADT reset register: the PIIX reset control register.
pub const RESET_REG_PORT: u16 = 0xcf9;
/// The value the guest writes to [`RESET_REG_PORT`] to reset (hard reset + reset CPU).
pub const RESET_VALUE: u8 = 0x06;
/// CMOS index of the RTC century byte.
pub const RTC_CENTURY: u8 = 0x32;

const OEM_ID: &[u8; 6] = b"HOPVM ";
const OEM_TABLE_ID: &[u8; 8] = b"HOPVMPC ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: &[u8; 4] = b"HOPV";
const CREATOR_REVISION: u32 = 1;

const HEADER_LEN: usize = 36;
const RSDP_V1_LEN: usize = 20;
const RSDP_V2_LEN: usize = 36;
const FACS_LEN: usize = 64;
const FADT_LEN: usize = 244;
const FADT_REVISION: u8 = 3;

/// FADT flags (ACPI 6.x table 5.10).
const FADT_F_WBINVD: u32 = 1 << 0;
const FADT_F_PROC_C1: u32 = 1 << 2;
const FADT_F_SLP_BUTTON: u32 = 1 << 5;
const FADT_F_RTC_S4: u32 = 1 << 7;
const FADT_F_RESET_REG_SUP: u32 = 1 << 10;
const FADT_F_USE_PLATFORM_CLOCK: u32 = 1 << 15;
const FADT_F_FORCE_APIC_CLUSTER_MODEL: u32 = 1 << 18;
/// IAPC_BOOT_ARCH: the motherboard has an 8042.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// Generic Address Structure address space: system I/O.
const GAS_SYSTEM_IO: u8 = 1;

/// MADT flags: PCAT_COMPAT (dual 8259s present).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INT_SRC_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// Local APIC flags: enabled.
const LAPIC_ENABLED: u32 = 1;
/// MPS INTI flags: active high (01), level triggered (11 << 2).
const INTI_LEVEL_ACTIVE_HIGH: u16 = 0xd;
/// ISA IRQs QEMU's `pc` machine overrides to level / active high (its PCI link IRQs).
const LEVEL_IRQS: [u8; 4] = [5, 9, 10, 11];

/// The DSDT's AML body (ACPI 6.x §20), in the root scope:
///
/// ```text
/// 08                 NameOp
/// 5F 53 33 5F        NameSeg "_S3_"
/// 12 06 04           PackageOp, PkgLength 6 (itself + NumElements + 4 data bytes), 4 elements
/// 01 01 00 00        One (PM1a SLP_TYP), One (PM1b SLP_TYP), Zero, Zero (reserved)
/// 08                 NameOp
/// 5F 53 35 5F        NameSeg "_S5_"
/// 12 06 04           PackageOp, PkgLength 6, 4 elements
/// 00 00 00 00        Zero, Zero, Zero, Zero
/// ```
///
/// i.e. `Name (_S3, Package (4) { 1, 1, 0, 0 })` and `Name (_S5, Package (4) { 0, 0, 0, 0 })`.
pub const DSDT_AML: [u8; 24] = [
    0x08, b'_', b'S', b'3', b'_', 0x12, 0x06, 0x04, 0x01, 0x01, 0x00, 0x00, //
    0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
];

/// Which RSDP (and root table) to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RsdpRevision {
    /// ACPI 1.0: revision 0, 20 bytes, RSDT only (what QEMU builds for x86).
    #[default]
    Acpi1,
    /// ACPI 2.0+: revision 2, 36 bytes with the extended checksum, RSDT and XSDT.
    Acpi2,
}

/// What to describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of CPUs (APIC IDs 0..cpus).
    pub cpus: u8,
    /// The RSDP revision.
    pub rsdp_revision: RsdpRevision,
    /// The PCIe ECAM window's base (an MCFG table for buses 0–255), on `q35`.
    pub ecam: Option<u64>,
    /// A VT-d IOMMU (a DMAR table).
    pub dmar: Option<DmarConfig>,
    /// Dual 8259 PICs present (the MADT's PCAT_COMPAT flag); none under
    /// `kernel-irqchip=split`.
    pub pic: bool,
}

/// What the DMAR table describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmarConfig {
    /// The VT-d register base.
    pub base: u64,
    /// The guest address width (39 or 48).
    pub aw_bits: u8,
    /// Interrupt remapping.
    pub intremap: bool,
}

impl AcpiConfig {
    /// QEMU's choices for `cpus` CPUs.
    pub fn new(cpus: u8) -> Self {
        Self {
            cpus,
            rsdp_revision: RsdpRevision::default(),
            ecam: None,
            dmar: None,
            pic: true,
        }
    }
}

/// The MCFG table: one ECAM allocation for segment 0, buses 0–255.
fn mcfg(base: u64) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    b.extend_from_slice(&base.to_le_bytes());
    b.extend_from_slice(&[0, 0, 0, 0xff, 0, 0, 0, 0]);
    sdt(b"MCFG", 1, &b)
}

/// The DMAR table: one DRHD covering every PCI device, with the IOAPIC in its scope when
/// interrupts are remapped.
fn dmar(d: &DmarConfig) -> Vec<u8> {
    let mut b = vec![d.aw_bits - 1, u8::from(d.intremap)];
    b.extend_from_slice(&[0; 10]);
    let mut drhd = vec![0u8, 0, 0, 0, 1, 0, 0, 0];
    drhd.extend_from_slice(&d.base.to_le_bytes());
    if d.intremap {
        // Device scope: type 3 (IOAPIC), length 8, enumeration ID, start bus 0xff, path 00.0.
        drhd.extend_from_slice(&[3, 8, 0, 0, IOAPIC_ID, 0xff, 0, 0]);
    }
    let len = drhd.len() as u16;
    drhd[2..4].copy_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&drhd);
    sdt(b"DMAR", 1, &b)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// A system description table: the standard 36-byte header followed by `body`, with length
/// and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = (HEADER_LEN + body.len()) as u32;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, patched below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure in system I/O space (access size 0: ACPI 2.0 reserved).
fn gas_io(port: u16, bit_width: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = bit_width;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn rsdp(revision: RsdpRevision, rsdt: u32, xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_V2_LEN);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(match revision {
        RsdpRevision::Acpi1 => 0,
        RsdpRevision::Acpi2 => 2,
    });
    r.extend_from_slice(&rsdt.to_le_bytes());
    r[8] = checksum(&r);
    if revision == RsdpRevision::Acpi2 {
        r.extend_from_slice(&(RSDP_V2_LEN as u32).to_le_bytes());
        r.extend_from_slice(&xsdt.to_le_bytes());
        r.extend_from_slice(&[0; 4]); // extended checksum, reserved
        r[32] = checksum(&r);
    }
    r
}

fn facs() -> Vec<u8> {
    let mut f = vec![0u8; FACS_LEN];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    f
}

fn fadt(cpus: u8, facs: u32, dsdt: u32) -> Vec<u8> {
    let mut b: Vec<u8> = Vec::with_capacity(FADT_LEN - HEADER_LEN);
    b.extend_from_slice(&facs.to_le_bytes()); // 36 FIRMWARE_CTRL
    b.extend_from_slice(&dsdt.to_le_bytes()); // 40 DSDT
    b.push(1); // 44 INT_MODEL in ACPI 1.0 (multiple APIC), reserved since
    b.push(0); // 45 Preferred_PM_Profile: unspecified
    b.extend_from_slice(&u16::from(SCI_IRQ).to_le_bytes()); // 46 SCI_INT
    b.extend_from_slice(&0u32.to_le_bytes()); // 48 SMI_CMD: none, always in ACPI mode
    b.extend_from_slice(&[0, 0, 0, 0]); // 52 ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
    b.extend_from_slice(&u32::from(PM1A_EVT_BLK).to_le_bytes()); // 56 PM1a_EVT_BLK
    b.extend_from_slice(&0u32.to_le_bytes()); // 60 PM1b_EVT_BLK
    b.extend_from_slice(&u32::from(PM1A_CNT_BLK).to_le_bytes()); // 64 PM1a_CNT_BLK
    b.extend_from_slice(&0u32.to_le_bytes()); // 68 PM1b_CNT_BLK
    b.extend_from_slice(&0u32.to_le_bytes()); // 72 PM2_CNT_BLK
    b.extend_from_slice(&u32::from(PM_TMR_BLK).to_le_bytes()); // 76 PM_TMR_BLK
    b.extend_from_slice(&0u32.to_le_bytes()); // 80 GPE0_BLK
    b.extend_from_slice(&0u32.to_le_bytes()); // 84 GPE1_BLK
    b.extend_from_slice(&[PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN]); // 88 PM1/PM2/PM_TMR lengths
    b.extend_from_slice(&[0; 4]); // 92 GPE0_BLK_LEN, GPE1_BLK_LEN, GPE1_BASE, CST_CNT
    b.extend_from_slice(&0xfffu16.to_le_bytes()); // 96 P_LVL2_LAT: C2 not supported
    b.extend_from_slice(&0xfffu16.to_le_bytes()); // 98 P_LVL3_LAT: C3 not supported
    b.extend_from_slice(&[0; 4]); // 100 FLUSH_SIZE, FLUSH_STRIDE
    b.extend_from_slice(&[0, 0, 0, 0]); // 104 DUTY_OFFSET, DUTY_WIDTH, DAY_ALRM, MON_ALRM
    b.push(RTC_CENTURY); // 108 CENTURY
    b.extend_from_slice(&IAPC_BOOT_ARCH_8042.to_le_bytes()); // 109 IAPC_BOOT_ARCH
    b.push(0); // 111 reserved
    let mut flags = FADT_F_WBINVD
        | FADT_F_PROC_C1
        | FADT_F_SLP_BUTTON
        | FADT_F_RTC_S4
        | FADT_F_RESET_REG_SUP
        | FADT_F_USE_PLATFORM_CLOCK;
    if cpus > 8 {
        // Flat logical destination mode reaches 8 CPUs at most.
        flags |= FADT_F_FORCE_APIC_CLUSTER_MODEL;
    }
    b.extend_from_slice(&flags.to_le_bytes()); // 112 Flags
    b.extend_from_slice(&gas_io(RESET_REG_PORT, 8)); // 116 RESET_REG
    b.push(RESET_VALUE); // 128 RESET_VALUE
    b.extend_from_slice(&[0; 3]); // 129 reserved
    b.extend_from_slice(&0u64.to_le_bytes()); // 132 X_FIRMWARE_CTRL: FIRMWARE_CTRL is used
    b.extend_from_slice(&u64::from(dsdt).to_le_bytes()); // 140 X_DSDT
    b.extend_from_slice(&gas_io(PM1A_EVT_BLK, PM1_EVT_LEN * 8)); // 148 X_PM1a_EVT_BLK
    b.extend_from_slice(&[0; 12]); // 160 X_PM1b_EVT_BLK
    b.extend_from_slice(&gas_io(PM1A_CNT_BLK, PM1_CNT_LEN * 8)); // 172 X_PM1a_CNT_BLK
    b.extend_from_slice(&[0; 12]); // 184 X_PM1b_CNT_BLK
    b.extend_from_slice(&[0; 12]); // 196 X_PM2_CNT_BLK
    b.extend_from_slice(&gas_io(PM_TMR_BLK, PM_TMR_LEN * 8)); // 208 X_PM_TMR_BLK
    b.extend_from_slice(&[0; 12]); // 220 X_GPE0_BLK
    b.extend_from_slice(&[0; 12]); // 232 X_GPE1_BLK
    sdt(b"FACP", FADT_REVISION, &b)
}

fn madt(cpus: u8, pic: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    let flags = if pic { MADT_PCAT_COMPAT } else { 0 };
    b.extend_from_slice(&flags.to_le_bytes());
    for id in 0..cpus {
        b.extend_from_slice(&[MADT_LOCAL_APIC, 8, id, id]);
        b.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }
    b.extend_from_slice(&[MADT_IO_APIC, 12, IOAPIC_ID, 0]);
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    let overrides = std::iter::once((0u8, 2u32, 0u16))
        .chain(LEVEL_IRQS.map(|irq| (irq, u32::from(irq), INTI_LEVEL_ACTIVE_HIGH)));
    for (irq, gsi, flags) in overrides {
        b.extend_from_slice(&[MADT_INT_SRC_OVERRIDE, 10, 0, irq]); // bus 0: ISA
        b.extend_from_slice(&gsi.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
    }
    // NMI on LINT1 of all processors (0xff), conforming polarity and trigger.
    b.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 1, &b)
}

/// Builds every table for `config` with the RSDP at `base` (rounded up to 16 bytes) and the
/// other tables packed after it. Returns (guest address, bytes) pairs, the RSDP first.
pub fn build_with(config: &AcpiConfig, base: u64) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let cpus = config.cpus;
    if cpus == 0 || cpus >= IOAPIC_ID {
        return Err(AcpiError::InvalidCpuCount(cpus));
    }
    let limit = u64::from(u32::MAX) + 1;
    let too_large = || AcpiError::TooLarge(limit);
    // Every pointer except the XSDT's is 32 bits wide, so everything must sit below 4 GiB.
    let addr32 = |addr: u64, len: usize| -> Result<u32, AcpiError> {
        match addr.checked_add(len as u64) {
            Some(end) if end <= limit => Ok(addr as u32),
            _ => Err(too_large()),
        }
    };
    let rsdp_addr = base.checked_next_multiple_of(16).ok_or_else(too_large)?;
    let rsdp_len = match config.rsdp_revision {
        RsdpRevision::Acpi1 => RSDP_V1_LEN,
        RsdpRevision::Acpi2 => RSDP_V2_LEN,
    };
    let next = |addr: u64, len: usize, align: u64| -> Result<u64, AcpiError> {
        addr.checked_add(len as u64)
            .and_then(|end| end.checked_next_multiple_of(align))
            .ok_or_else(too_large)
    };

    let facs_addr = next(rsdp_addr, rsdp_len, 64)?;
    let facs = facs();
    let dsdt_addr = next(facs_addr, facs.len(), 16)?;
    let dsdt = sdt(b"DSDT", 1, &DSDT_AML);
    let fadt_addr = next(dsdt_addr, dsdt.len(), 16)?;
    let fadt = fadt(
        cpus,
        addr32(facs_addr, facs.len())?,
        addr32(dsdt_addr, dsdt.len())?,
    );
    let madt_addr = next(fadt_addr, fadt.len(), 16)?;
    let madt = madt(cpus, config.pic);
    let mut extra = Vec::new();
    let mut end = next(madt_addr, madt.len(), 16)?;
    for table in config
        .ecam
        .map(mcfg)
        .into_iter()
        .chain(config.dmar.as_ref().map(dmar))
    {
        let at = end;
        end = next(at, table.len(), 16)?;
        extra.push((at, table));
    }
    let rsdt_addr = end;
    let mut entries = vec![
        addr32(fadt_addr, fadt.len())?,
        addr32(madt_addr, madt.len())?,
    ];
    for (at, table) in &extra {
        entries.push(addr32(*at, table.len())?);
    }
    let rsdt = sdt(
        b"RSDT",
        1,
        &entries
            .iter()
            .flat_map(|a| a.to_le_bytes())
            .collect::<Vec<_>>(),
    );
    let rsdt32 = addr32(rsdt_addr, rsdt.len())?;

    let mut tables = Vec::with_capacity(7);
    let mut xsdt_addr = 0;
    let mut xsdt = None;
    if config.rsdp_revision == RsdpRevision::Acpi2 {
        xsdt_addr = next(rsdt_addr, rsdt.len(), 16)?;
        let body: Vec<u8> = entries
            .iter()
            .flat_map(|a| u64::from(*a).to_le_bytes())
            .collect();
        let table = sdt(b"XSDT", 1, &body);
        addr32(xsdt_addr, table.len())?;
        xsdt = Some(table);
    }
    tables.push((rsdp_addr, rsdp(config.rsdp_revision, rsdt32, xsdt_addr)));
    tables.push((facs_addr, facs));
    tables.push((dsdt_addr, dsdt));
    tables.push((fadt_addr, fadt));
    tables.push((madt_addr, madt));
    tables.extend(extra);
    tables.push((rsdt_addr, rsdt));
    if let Some(xsdt) = xsdt {
        tables.push((xsdt_addr, xsdt));
    }
    Ok(tables)
}

/// Builds the tables QEMU's `pc` machine would provide for `cpus` CPUs, the RSDP at `base`
/// (see [`build_with`]).
pub fn build(cpus: u8, base: u64) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    build_with(&AcpiConfig::new(cpus), base)
}

/// Writes the tables for `config` into [`ACPI_START`]..[`ACPI_END`] and returns the RSDP's
/// address ([`RSDP_ADDR`]).
pub fn write_with(mem: &GuestMemoryMmap, config: &AcpiConfig) -> Result<u64, AcpiError> {
    let tables = build_with(config, RSDP_ADDR)?;
    if tables
        .iter()
        .any(|(addr, bytes)| addr + bytes.len() as u64 > ACPI_END)
    {
        return Err(AcpiError::TooLarge(ACPI_END));
    }
    for (addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(RSDP_ADDR)
}

/// The firmware waking vector the guest left in the FACS (where S3 resume enters it).
pub fn waking_vector(mem: &GuestMemoryMmap, cpus: u8) -> Result<u32, AcpiError> {
    let (facs, _) = build(cpus, ACPI_START)?
        .into_iter()
        .find(|(_, t)| t.starts_with(b"FACS"))
        .ok_or(AcpiError::TooLarge(ACPI_END))?;
    // FACS offset 12: firmware_waking_vector.
    mem.read_obj::<u32>(GuestAddress(facs + 12))
        .map_err(AcpiError::Write)
}

/// Writes QEMU's `pc` tables for `cpus` CPUs into the BIOS area; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<u64, AcpiError> {
    write_with(mem, &AcpiConfig::new(cpus))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::mptable;
    use crate::memory::{create_guest_memory, Layout, EBDA_START};

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// A whole table from guest memory, sized by its header's length field.
    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, HEADER_LEN);
        read(mem, addr, u32_at(&header, 4) as usize)
    }

    fn table<'a>(tables: &'a [(u64, Vec<u8>)], sig: &[u8; 4]) -> &'a (u64, Vec<u8>) {
        tables.iter().find(|(_, t)| &t[0..4] == sig).unwrap()
    }

    #[test]
    fn checksums_and_lengths() {
        for revision in [RsdpRevision::Acpi1, RsdpRevision::Acpi2] {
            let config = AcpiConfig {
                cpus: 4,
                rsdp_revision: revision,
                ..AcpiConfig::new(4)
            };
            let tables = build_with(&config, ACPI_START).unwrap();
            let (addr, rsdp) = &tables[0];
            assert_eq!(*addr, ACPI_START);
            assert_eq!(&rsdp[0..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..RSDP_V1_LEN]), 0);
            match revision {
                RsdpRevision::Acpi1 => {
                    assert_eq!(rsdp.len(), RSDP_V1_LEN);
                    assert_eq!(rsdp[15], 0);
                }
                RsdpRevision::Acpi2 => {
                    assert_eq!(rsdp.len(), RSDP_V2_LEN);
                    assert_eq!(rsdp[15], 2);
                    assert_eq!(u32_at(rsdp, 20), RSDP_V2_LEN as u32);
                    assert_eq!(sum(rsdp), 0);
                }
            }
            for (addr, t) in &tables[1..] {
                assert_eq!(u32_at(t, 4) as usize, t.len());
                if &t[0..4] == b"FACS" {
                    assert_eq!(addr % 64, 0);
                    assert_eq!(t.len(), FACS_LEN);
                } else {
                    assert_eq!(sum(t), 0, "{}", String::from_utf8_lossy(&t[0..4]));
                    assert_eq!(&t[10..16], OEM_ID);
                }
            }
            // Tables do not overlap.
            let mut spans: Vec<_> = tables
                .iter()
                .map(|(a, t)| (*a, a + t.len() as u64))
                .collect();
            spans.sort();
            assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
        }
    }

    /// Finds everything the way kvm-unit-tests' `lib/x86/acpi.c` does, in written memory.
    #[test]
    fn found_by_scanning_memory() {
        let mem = create_guest_memory(&Layout::new(2 << 20)).unwrap();
        mptable::write(&mem, 2).unwrap();
        let mp_before = read(&mem, EBDA_START, 0x400);
        assert_eq!(write(&mem, 2).unwrap(), RSDP_ADDR);
        // The MP table is untouched, and no table reaches the BIOS stub area.
        assert_eq!(read(&mem, EBDA_START, 0x400), mp_before);
        for (addr, t) in build(2, RSDP_ADDR).unwrap() {
            assert!(addr >= ACPI_START && addr + t.len() as u64 <= ACPI_END);
        }

        let rsdp_addr = (0xe0000u64..0x100000)
            .step_by(16)
            .find(|a| read(&mem, *a, 8) == b"RSD PTR ")
            .expect("RSDP found");
        assert_eq!(rsdp_addr, RSDP_ADDR);
        let rsdp = read(&mem, rsdp_addr, RSDP_V1_LEN);
        assert_eq!(sum(&rsdp), 0);
        let rsdt_addr = u64::from(u32_at(&rsdp, 16));
        let rsdt = read_table(&mem, rsdt_addr);
        assert_eq!(&rsdt[0..4], b"RSDT");
        assert_eq!(sum(&rsdt), 0);
        let find = |sig: &[u8; 4]| {
            rsdt[HEADER_LEN..]
                .chunks(4)
                .map(|c| u64::from(u32_at(c, 0)))
                .find(|a| read(&mem, *a, 4) == sig)
        };
        let fadt_addr = find(b"FACP").expect("FADT in the RSDT");
        let madt_addr = find(b"APIC").expect("MADT in the RSDT");
        assert_eq!((rsdt.len() - HEADER_LEN) / 4, 2);
        let fadt = read_table(&mem, fadt_addr);
        assert_eq!(sum(&fadt), 0);
        assert_eq!(sum(&read_table(&mem, madt_addr)), 0);

        // FACS via FADT.firmware_ctrl, DSDT via FADT.dsdt, as the s3 test and Linux do.
        let facs_addr = u64::from(u32_at(&fadt, 36));
        assert_eq!(read(&mem, facs_addr, 4), b"FACS");
        assert_eq!(facs_addr % 64, 0);
        let dsdt_addr = u64::from(u32_at(&fadt, 40));
        let dsdt = read_table(&mem, dsdt_addr);
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(sum(&dsdt), 0);
        assert_eq!(&dsdt[HEADER_LEN..], &DSDT_AML);
        assert_eq!(u64_at(&fadt, 140), dsdt_addr);
        assert_eq!(u64_at(&fadt, 132), 0);
    }

    #[test]
    fn fadt_fields() {
        let tables = build(4, ACPI_START).unwrap();
        let (_, f) = table(&tables, b"FACP");
        let (facs_addr, _) = table(&tables, b"FACS");
        let (dsdt_addr, _) = table(&tables, b"DSDT");
        assert_eq!(f.len(), FADT_LEN);
        assert_eq!(f[8], FADT_REVISION);
        assert_eq!(u64::from(u32_at(f, 36)), *facs_addr);
        assert_eq!(u64::from(u32_at(f, 40)), *dsdt_addr);
        assert_eq!(u16_at(f, 46), 9);
        assert_eq!(u32_at(f, 48), 0); // no SMI_CMD
        assert_eq!(u32_at(f, 56), 0x600);
        assert_eq!(u32_at(f, 64), 0x604);
        assert_eq!(u32_at(f, 76), 0x608);
        assert_eq!(u32_at(f, 80), 0); // no GPE0 block
        assert_eq!(&f[88..92], &[4, 2, 0, 4]);
        assert_eq!(u16_at(f, 96), 0xfff);
        assert_eq!(u16_at(f, 98), 0xfff);
        assert_eq!(f[108], 0x32);
        assert_eq!(u16_at(f, 109), 2);
        let flags = u32_at(f, 112);
        assert_eq!(flags, 0x1 | 0x4 | 0x20 | 0x80 | 0x400 | 0x8000);
        assert_eq!(flags & (1 << 8), 0, "TMR_VAL_EXT: 24-bit timer");
        assert_eq!(&f[116..128], &[1, 8, 0, 0, 0xf9, 0x0c, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f[128], 0x06);
        assert_eq!(u64_at(f, 140), *dsdt_addr);
        assert_eq!(&f[148..160], &[1, 32, 0, 0, 0x00, 0x06, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&f[172..184], &[1, 16, 0, 0, 0x04, 0x06, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&f[208..220], &[1, 32, 0, 0, 0x08, 0x06, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&f[220..244], &[0; 24]);

        let (_, big) = table(&build(9, ACPI_START).unwrap(), b"FACP").clone();
        assert_ne!(u32_at(&big, 112) & (1 << 18), 0);
    }

    #[test]
    fn madt_entries() {
        for cpus in [1u8, 3, 16, 253] {
            let tables = build(cpus, ACPI_START).unwrap();
            let (_, m) = table(&tables, b"APIC");
            assert_eq!(m[8], 1);
            assert_eq!(u32_at(m, 36), 0xfee0_0000);
            assert_eq!(u32_at(m, 40), 1);
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut overrides = Vec::new();
            let mut nmis = Vec::new();
            let mut off = 44;
            while off < m.len() {
                let (kind, len) = (m[off], usize::from(m[off + 1]));
                let e = &m[off..off + len];
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        lapics.push((e[2], e[3], u32_at(e, 4)));
                    }
                    1 => {
                        assert_eq!(len, 12);
                        ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8)));
                    }
                    2 => {
                        assert_eq!(len, 10);
                        assert_eq!(e[2], 0);
                        overrides.push((e[3], u32_at(e, 4), u16_at(e, 8)));
                    }
                    4 => nmis.push(e.to_vec()),
                    _ => panic!("unexpected madt entry {kind}"),
                }
                off += len;
            }
            assert_eq!(off, m.len());
            let expected: Vec<_> = (0..cpus).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, expected);
            assert_eq!(ioapics, vec![(IOAPIC_ID, 0xfec0_0000, 0)]);
            assert_eq!(
                overrides,
                vec![
                    (0, 2, 0),
                    (5, 5, 0xd),
                    (9, 9, 0xd),
                    (10, 10, 0xd),
                    (11, 11, 0xd)
                ]
            );
            assert_eq!(nmis, vec![vec![4, 6, 0xff, 0, 0, 1]]);
        }
    }

    /// A decoder for exactly the AML subset the DSDT uses: Name(NameSeg, Package(n){consts}).
    fn parse_sleep_packages(mut aml: &[u8]) -> Vec<(String, Vec<u64>)> {
        let mut out = Vec::new();
        while !aml.is_empty() {
            assert_eq!(aml[0], 0x08, "NameOp");
            let name = String::from_utf8(aml[1..5].to_vec()).unwrap();
            assert_eq!(aml[5], 0x12, "PackageOp");
            let pkg_len = usize::from(aml[6]);
            assert_eq!(pkg_len >> 6, 0, "one-byte PkgLength");
            let body = &aml[6..6 + pkg_len];
            let count = usize::from(body[1]);
            let mut elems = Vec::new();
            let mut rest = &body[2..];
            while !rest.is_empty() {
                let (value, used) = match rest[0] {
                    0x00 => (0, 1),                  // ZeroOp
                    0x01 => (1, 1),                  // OneOp
                    0x0a => (u64::from(rest[1]), 2), // BytePrefix
                    op => panic!("unexpected opcode {op:#x}"),
                };
                elems.push(value);
                rest = &rest[used..];
            }
            assert_eq!(elems.len(), count);
            out.push((name, elems));
            aml = &aml[6 + pkg_len..];
        }
        out
    }

    #[test]
    fn dsdt_aml() {
        let expected: [u8; 24] = [
            0x08, 0x5f, 0x53, 0x33, 0x5f, 0x12, 0x06, 0x04, 0x01, 0x01, 0x00, 0x00, 0x08, 0x5f,
            0x53, 0x35, 0x5f, 0x12, 0x06, 0x04, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(DSDT_AML, expected);
        assert_eq!(
            parse_sleep_packages(&DSDT_AML),
            vec![
                (String::from("_S3_"), vec![u64::from(SLP_TYP_S3), 1, 0, 0]),
                (String::from("_S5_"), vec![u64::from(SLP_TYP_S5), 0, 0, 0]),
            ]
        );
        let tables = build(1, ACPI_START).unwrap();
        let (_, d) = table(&tables, b"DSDT");
        assert_eq!(d[8], 1, "revision 1: 32-bit AML integers");
        assert_eq!(&d[HEADER_LEN..], &expected);
    }

    #[test]
    fn q35_mcfg_and_dmar() {
        let config = AcpiConfig {
            rsdp_revision: RsdpRevision::Acpi2,
            ecam: Some(0xb000_0000),
            dmar: Some(DmarConfig {
                base: 0xfed9_0000,
                aw_bits: 39,
                intremap: true,
            }),
            ..AcpiConfig::new(2)
        };
        let tables = build_with(&config, ACPI_START).unwrap();
        for (_, t) in &tables[1..] {
            if &t[0..4] != b"FACS" {
                assert_eq!(sum(t), 0, "{}", String::from_utf8_lossy(&t[0..4]));
                assert_eq!(u32_at(t, 4) as usize, t.len());
            }
        }
        let (mcfg_addr, m) = table(&tables, b"MCFG");
        assert_eq!(m.len(), HEADER_LEN + 8 + 16);
        assert_eq!(u64_at(m, HEADER_LEN + 8), 0xb000_0000);
        assert_eq!(m[HEADER_LEN + 8 + 11], 0xff, "end bus");
        let (dmar_addr, d) = table(&tables, b"DMAR");
        assert_eq!(d[HEADER_LEN], 38, "host address width - 1");
        assert_eq!(d[HEADER_LEN + 1], 1, "intr_remap");
        let drhd = &d[HEADER_LEN + 12..];
        assert_eq!(u16_at(drhd, 0), 0, "type drhd");
        assert_eq!(usize::from(u16_at(drhd, 2)), drhd.len());
        assert_eq!(drhd[4], 1, "include_pci_all");
        assert_eq!(u64_at(drhd, 8), 0xfed9_0000);
        assert_eq!(&drhd[16..24], &[3, 8, 0, 0, IOAPIC_ID, 0xff, 0, 0]);
        // Both listed in the RSDT and the XSDT.
        let (_, rsdt) = table(&tables, b"RSDT");
        let listed: Vec<u64> = rsdt[HEADER_LEN..]
            .chunks(4)
            .map(|c| u64::from(u32_at(c, 0)))
            .collect();
        assert!(listed.contains(mcfg_addr) && listed.contains(dmar_addr));
        let (_, xsdt) = table(&tables, b"XSDT");
        assert_eq!(xsdt.len() - HEADER_LEN, 8 * 4);
        // Without remapping: no flag, no device scope.
        let mut c = config;
        c.dmar = Some(DmarConfig {
            intremap: false,
            aw_bits: 48,
            base: 0xfed9_0000,
        });
        let tables = build_with(&c, ACPI_START).unwrap();
        let (_, d) = table(&tables, b"DMAR");
        assert_eq!((d[HEADER_LEN], d[HEADER_LEN + 1]), (47, 0));
        assert_eq!(d.len(), HEADER_LEN + 12 + 16);
        let (_, madt) = table(&tables, b"APIC");
        assert_eq!(u32_at(madt, HEADER_LEN + 4), 1, "pcat_compat");
        c.pic = false;
        let tables = build_with(&c, ACPI_START).unwrap();
        let (_, madt) = table(&tables, b"APIC");
        assert_eq!(u32_at(madt, HEADER_LEN + 4), 0, "no pic");
        // pc: neither.
        let tables = build_with(&AcpiConfig::new(2), ACPI_START).unwrap();
        assert!(tables
            .iter()
            .all(|(_, t)| &t[0..4] != b"MCFG" && &t[0..4] != b"DMAR"));
    }

    #[test]
    fn xsdt_mirrors_rsdt() {
        let config = AcpiConfig {
            rsdp_revision: RsdpRevision::Acpi2,
            ..AcpiConfig::new(2)
        };
        let tables = build_with(&config, ACPI_START).unwrap();
        let (_, rsdp) = &tables[0];
        let (rsdt_addr, rsdt) = table(&tables, b"RSDT");
        let (xsdt_addr, xsdt) = table(&tables, b"XSDT");
        assert_eq!(u64::from(u32_at(rsdp, 16)), *rsdt_addr);
        assert_eq!(u64_at(rsdp, 24), *xsdt_addr);
        let r: Vec<u64> = rsdt[HEADER_LEN..]
            .chunks(4)
            .map(|c| u64::from(u32_at(c, 0)))
            .collect();
        let x: Vec<u64> = xsdt[HEADER_LEN..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(r, x);
        let mem = create_guest_memory(&Layout::new(2 << 20)).unwrap();
        write_with(&mem, &config).unwrap();
        assert_eq!(read(&mem, *xsdt_addr, 4), b"XSDT");
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(build(0, 0), Err(AcpiError::InvalidCpuCount(0))));
        assert!(matches!(
            build(254, 0),
            Err(AcpiError::InvalidCpuCount(254))
        ));
        assert!(matches!(
            build(255, 0),
            Err(AcpiError::InvalidCpuCount(255))
        ));
        assert!(matches!(build(1, 0xffff_ff00), Err(AcpiError::TooLarge(_))));
        assert!(matches!(
            build(1, u64::MAX - 4),
            Err(AcpiError::TooLarge(_))
        ));
        // Unaligned bases are rounded up to the RSDP's 16-byte alignment.
        assert_eq!(build(1, 0xe0001).unwrap()[0].0, 0xe0010);
        // Too little guest memory.
        let mem = create_guest_memory(&Layout::new(512 << 10)).unwrap();
        assert!(matches!(write(&mem, 1), Err(AcpiError::Write(_))));
        // The largest machine still fits the window.
        let mem = create_guest_memory(&Layout::new(2 << 20)).unwrap();
        assert!(write(&mem, 253).is_ok());
    }
}
