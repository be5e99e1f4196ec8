//! The boot vCPU's entry state for each boot protocol, and the tables it needs in guest memory.
//!
//! hopvm boots kernels directly, without firmware, so it must leave the CPU the way each boot
//! protocol promises: flat 32-bit protected mode with paging off for Multiboot and PVH, 64-bit
//! long mode on identity-mapped page tables for Linux's 64-bit boot protocol. The GDT it writes
//! serves both: Linux wants `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Errors writing boot tables.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory too small for the boot tables.
    #[error("cannot write boot tables to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Where the boot GDT lives.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Where the (empty) boot IDT lives.
pub const BOOT_IDT_ADDR: u64 = 0x540;
/// The identity-mapping PML4 for 64-bit entry; PDPT and four PDs follow page by page.
pub const PML4_ADDR: u64 = 0x9000;
/// The boot stack's top for 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;

/// GDT selectors.
pub const SEL_CODE32: u16 = 0x08;
/// 64-bit code (`__BOOT_CS`).
pub const SEL_CODE64: u16 = 0x10;
/// Flat data (`__BOOT_DS`).
pub const SEL_DATA: u16 = 0x18;
/// The TSS, which VMX wants loaded even when the guest never uses it.
pub const SEL_TSS: u16 = 0x20;

const GDT: [u64; 5] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // data
    gdt_entry(0x808b, 0, 0xfffff), // TSS (busy)
];

/// Packs a GDT descriptor from flags (access byte + G/DB/L nibble), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The KVM segment a GDT entry describes when loaded with `selector`.
fn segment(selector: u16) -> kvm_segment {
    let entry = GDT[usize::from(selector >> 3)];
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The CPU mode a boot protocol enters the kernel in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// Flat 32-bit protected mode, paging off (Multiboot, PVH).
    Protected32,
    /// 64-bit long mode on an identity map of the first 4 GiB (Linux 64-bit boot protocol).
    Long64,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryState {
    /// The CPU mode.
    pub mode: EntryMode,
    /// First instruction.
    pub rip: u64,
    /// RAX (the Multiboot magic).
    pub rax: u64,
    /// RBX (Multiboot info / PVH start info).
    pub rbx: u64,
    /// RSI (Linux boot_params).
    pub rsi: u64,
}

/// Writes the GDT, an empty IDT and, for long mode, the identity-mapping page tables.
pub fn write_boot_tables(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), RegsError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))
            .map_err(RegsError::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
        .map_err(RegsError::Write)?;
    if mode == EntryMode::Long64 {
        // PML4[0] → PDPT; PDPT[0..4] → four PDs of 512 2-MiB pages each: 4 GiB identity-mapped.
        let pml4 = GuestAddress(PML4_ADDR);
        let pdpt = pml4.unchecked_add(0x1000);
        mem.write_obj(pdpt.0 | 0x3, pml4)
            .map_err(RegsError::Write)?;
        let mut table = vec![0u8; 4 * 4096];
        for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
            let entry = ((i as u64) << 21) | 0x83; // present, writable, 2 MiB page
            chunk.copy_from_slice(&entry.to_le_bytes());
        }
        let pd = pdpt.unchecked_add(0x1000);
        for i in 0..4u64 {
            mem.write_obj((pd.0 + i * 0x1000) | 0x3, pdpt.unchecked_add(i * 8))
                .map_err(RegsError::Write)?;
        }
        mem.write_slice(&table, pd).map_err(RegsError::Write)?;
    }
    Ok(())
}

/// Special registers for `mode`, on top of the vCPU's current ones.
pub fn entry_sregs(mut sregs: kvm_sregs, mode: EntryMode) -> kvm_sregs {
    let code = segment(match mode {
        EntryMode::Protected32 => SEL_CODE32,
        EntryMode::Long64 => SEL_CODE64,
    });
    let data = segment(SEL_DATA);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(SEL_TSS);
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if mode == EntryMode::Long64 {
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    sregs
}

/// Special registers for real mode with CS:IP at the real-mode address `vector` (the ACPI
/// waking vector, which firmware enters as segment `vector >> 4`).
pub fn real_mode_sregs(mut sregs: kvm_sregs, vector: u32) -> kvm_sregs {
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    };
    sregs.cs = seg((vector >> 4) as u16, 0xb);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = seg(0, 3);
    }
    sregs.cr0 = CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0xffff;
    sregs.idt.base = 0;
    sregs.idt.limit = 0x3ff;
    sregs
}

/// General registers for real mode at the real-mode address `vector`.
pub fn real_mode_regs(vector: u32) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: u64::from(vector & 0xf),
        ..Default::default()
    }
}

/// General registers for `entry`.
pub fn entry_regs(entry: &EntryState) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rax: entry.rax,
        rbx: entry.rbx,
        rsi: entry.rsi,
        ..Default::default()
    };
    if entry.mode == EntryMode::Long64 {
        regs.rsp = BOOT_STACK;
        regs.rbp = BOOT_STACK;
    }
    regs
}

/// The FPU as after FNINIT: control word 0x37f, MXCSR 0x1f80.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// MSRs a BIOS would leave set on every CPU: fast strings on, MTRRs enabled with write-back as
/// the default type (Linux maps all RAM uncached otherwise).
pub fn boot_msrs() -> Msrs {
    let entries = [
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: 1,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: (1 << 11) | 6,
            ..Default::default()
        },
    ];
    Msrs::from_entries(&entries).expect("two entries fit in an Msrs")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, Layout};

    #[test]
    fn segments_decode() {
        let cs = segment(SEL_CODE64);
        assert_eq!((cs.l, cs.db, cs.type_, cs.present), (1, 0, 0xb, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = segment(SEL_CODE32);
        assert_eq!((cs32.l, cs32.db, cs32.s), (0, 1, 1));
        let ds = segment(SEL_DATA);
        assert_eq!((ds.type_, ds.db, ds.base), (3, 1, 0));
        let tr = segment(SEL_TSS);
        assert_eq!((tr.type_, tr.s), (0xb, 0));
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = create_guest_memory(&Layout::new(16 << 20)).unwrap();
        write_boot_tables(&mem, EntryMode::Long64).unwrap();
        let pdpt: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pdpt & !0xfff, PML4_ADDR + 0x1000);
        let pd3: u64 = mem.read_obj(GuestAddress(PML4_ADDR + 0x1000 + 24)).unwrap();
        let last: u64 = mem
            .read_obj(GuestAddress((pd3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, (4 << 30) - (2 << 20));
        let s = entry_sregs(kvm_sregs::default(), EntryMode::Long64);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.efer & EFER_LMA, 0);
    }
}
