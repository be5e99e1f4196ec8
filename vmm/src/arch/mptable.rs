//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! its IOAPIC and how ISA interrupts are wired.
//!
//! The floating pointer sits at the start of the EBDA, where Linux and most test kernels look
//! first; the configuration table follows it. The interrupt entries describe the same wiring
//! hopvm programs into KVM's GSI routing: ISA IRQ 0 (the PIT) arrives at IOAPIC pin 2, every
//! other ISA IRQ n at pin n, and LINT0/LINT1 are ExtINT/NMI as in virtual-wire mode. Bus 1 is
//! PCI bus 0: each PCI function's INTx pin is listed at the IOAPIC pin of the ISA IRQ its PIRQ
//! line is wired to (10 or 11), level-triggered and active-low, as SeaBIOS writes it on QEMU's
//! `pc`.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestMemoryMmap, EBDA_START};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Too many CPUs for an MP table (APIC IDs are 8 bits; 0xff is broadcast).
    #[error("too many cpus for the mp table: {0}")]
    TooManyCpus(usize),
    /// Guest memory too small.
    #[error("cannot write the mp table: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The APIC ID of the IOAPIC (after the highest possible CPU APIC ID).
pub const IOAPIC_ID: u8 = 0xfe;
/// Number of IOAPIC pins.
pub const IOAPIC_PINS: u8 = 24;

const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;

/// Which IOAPIC pin ISA IRQ `irq` arrives at: IRQ 0 is overridden to pin 2, as on a PC.
pub fn isa_irq_to_ioapic_pin(irq: u8) -> u8 {
    if irq == 0 {
        2
    } else {
        irq
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// A PCI function's interrupt: device number, INTx pin (1 = INTA#) and the ISA IRQ it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIntx {
    /// Device number on bus 0.
    pub slot: u8,
    /// 1 = INTA# … 4 = INTD#.
    pub pin: u8,
    /// The ISA IRQ (and IOAPIC pin) it is wired to.
    pub irq: u8,
}

/// The MP table's bus ID of PCI bus 0.
const PCI_BUS_ID: u8 = 1;
/// MP interrupt flags: active low, level-triggered.
const LEVEL_ACTIVE_LOW: u8 = 0x0f;

/// Builds the MP floating pointer and configuration table for `cpus` CPUs placed at `base`.
pub fn build(cpus: usize, base: u64) -> Result<Vec<u8>, MpTableError> {
    build_with_pci(cpus, &[], base)
}

/// Builds the MP table for `cpus` CPUs and the PCI interrupts `pci`, placed at `base`.
pub fn build_with_pci(cpus: usize, pci: &[PciIntx], base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus >= usize::from(IOAPIC_ID) {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let table_addr = base + 16;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        count += 1;
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[0, id as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    // Bus 0: ISA.
    count += 1;
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    // Bus 1: PCI.
    count += 1;
    entries.extend_from_slice(&[1, PCI_BUS_ID]);
    entries.extend_from_slice(b"PCI   ");
    // The IOAPIC.
    count += 1;
    entries.extend_from_slice(&[2, IOAPIC_ID, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    // I/O interrupt assignments: ISA IRQ → IOAPIC pin, conforming polarity and trigger.
    for irq in 0..16u8 {
        if irq == 2 {
            continue; // the cascade; its pin carries the PIT
        }
        count += 1;
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, IOAPIC_ID, isa_irq_to_ioapic_pin(irq)]);
    }
    // PCI interrupts: source IRQ = device << 2 | (pin - 1).
    for p in pci
        .iter()
        .filter(|p| (1..=4).contains(&p.pin) && p.slot < 32)
    {
        count += 1;
        let src = p.slot << 2 | (p.pin - 1);
        entries.extend_from_slice(&[3, 0, LEVEL_ACTIVE_LOW, 0, PCI_BUS_ID, src, IOAPIC_ID, p.irq]);
    }
    // Local interrupts: LINT0 ExtINT, LINT1 NMI, to every local APIC.
    for (kind, lint) in [(3u8, 0u8), (1, 1)] {
        count += 1;
        entries.extend_from_slice(&[4, kind, 0, 0, 0, 0, 0xff, lint]);
    }

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum patched below
    header.extend_from_slice(b"HOPVM   "); // OEM id
    header.extend_from_slice(b"PC          "); // product id
    header.extend_from_slice(&[0; 6]); // OEM table pointer and size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length/16, revision, checksum, features
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table into the EBDA, and the BIOS data area fields that point there.
pub fn write(mem: &GuestMemoryMmap, cpus: usize) -> Result<(), MpTableError> {
    write_with_pci(mem, cpus, &[])
}

/// Writes the MP table with PCI interrupt entries into the EBDA (see [`write`]).
pub fn write_with_pci(
    mem: &GuestMemoryMmap,
    cpus: usize,
    pci: &[PciIntx],
) -> Result<(), MpTableError> {
    let table = build_with_pci(cpus, pci, EBDA_START)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)?;
    // BDA 0x40e: EBDA segment; 0x413: base memory in KiB.
    mem.write_obj((EBDA_START >> 4) as u16, GuestAddress(0x40e))
        .map_err(MpTableError::Write)?;
    mem.write_obj((EBDA_START >> 10) as u16, GuestAddress(0x413))
        .map_err(MpTableError::Write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(4, EBDA_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 2 + 1 + 15 + 2);
        // The first processor entry is the bootstrap processor with APIC ID 0.
        assert_eq!(&table[44..48], &[0, 0, APIC_VERSION, 3]);
        assert!(build(0, 0).is_err());
        assert!(build(254, 0).is_err());
    }

    #[test]
    fn pci_interrupt_entries() {
        let pci = [PciIntx {
            slot: 2,
            pin: 1,
            irq: 11,
        }];
        let t = build_with_pci(1, &pci, EBDA_START).unwrap();
        let table = &t[16..];
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 1 + 2 + 1 + 15 + 1 + 2);
        let entry = [3, 0, 0x0f, 0, 1, 2 << 2, IOAPIC_ID, 11];
        assert!(table.windows(8).any(|w| w == entry));
        let pci_bus = [1, 1, b'P', b'C', b'I', b' ', b' ', b' '];
        assert!(table.windows(8).any(|w| w == pci_bus));
    }
}
