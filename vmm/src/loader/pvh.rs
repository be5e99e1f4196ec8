//! The PVH boot protocol: a 32-bit entry point announced by a Xen ELF note.
//!
//! Kernels built for PVH (Linux with CONFIG_PVH, many unikernels and test kernels) say where to
//! enter them in a `XEN_ELFNOTE_PHYS32_ENTRY` note. They start in flat 32-bit protected mode
//! with paging off and EBX pointing at an `hvm_start_info` that describes the command line, the
//! memory map and module 0 (`--initrd`).

use vm_memory::{Bytes, GuestAddress};

use super::elf::{Elf, Note};
use super::LoaderError;
use crate::arch::regs::{EntryMode, EntryState};
use crate::memory::{GuestMemoryMmap, Layout, PAGE_SIZE};

/// The Xen note type carrying the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `hvm_start_info.magic`.
const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Where the start info goes; the module list and memory map follow it.
pub const START_INFO_ADDR: u64 = 0x6000;
const MODLIST_ADDR: u64 = 0x6040;
const MEMMAP_ADDR: u64 = 0x6100;
/// Where the command line goes.
const CMDLINE_ADDR: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 0x1_0000;

/// The PVH entry point among `notes`, if any.
pub fn entry_point(notes: &[Note]) -> Option<u64> {
    notes.iter().find_map(|n| {
        if n.name != b"Xen" || n.kind != XEN_ELFNOTE_PHYS32_ENTRY {
            return None;
        }
        match n.desc.len() {
            4 => Some(u64::from(u32::from_le_bytes(n.desc.try_into().ok()?))),
            8 => Some(u64::from_le_bytes(n.desc.try_into().ok()?)),
            _ => None,
        }
    })
}

/// What the PVH loader is given.
pub struct PvhParams<'a> {
    /// The ELF image.
    pub image: &'a [u8],
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Module 0.
    pub module: Option<&'a [u8]>,
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    v: T,
    at: u64,
) -> Result<(), LoaderError> {
    mem.write_obj(v, GuestAddress(at))
        .map_err(|_| LoaderError::NoRoom("the pvh start info"))
}

/// Loads a PVH kernel and writes its start info; returns the entry state.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    p: &PvhParams,
) -> Result<EntryState, LoaderError> {
    let elf = Elf::parse(p.image)?;
    let entry = entry_point(&elf.notes()).ok_or(LoaderError::UnknownFormat)?;
    elf.load(mem, layout.low_ram_end())?;

    if p.cmdline.len() >= CMDLINE_MAX {
        return Err(LoaderError::CmdlineTooLong {
            len: p.cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let mut cmdline = p.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| LoaderError::NoRoom("the command line"))?;

    let map = layout.memory_map();
    for (i, e) in map.iter().enumerate() {
        let at = MEMMAP_ADDR + 24 * i as u64;
        write(mem, e.start, at)?;
        write(mem, e.len, at + 8)?;
        write(mem, e.kind as u32, at + 16)?;
        write(mem, 0u32, at + 20)?;
    }
    let mut nr_modules = 0u32;
    if let Some(module) = p.module {
        let addr = layout
            .low_ram_end()
            .checked_sub(module.len() as u64)
            .map(|a| a & !(PAGE_SIZE - 1))
            .filter(|a| *a >= elf.end())
            .ok_or(LoaderError::NoRoom("the initrd"))?;
        mem.write_slice(module, GuestAddress(addr))
            .map_err(|_| LoaderError::NoRoom("the initrd"))?;
        write(mem, addr, MODLIST_ADDR)?;
        write(mem, module.len() as u64, MODLIST_ADDR + 8)?;
        write(mem, 0u64, MODLIST_ADDR + 16)?;
        write(mem, 0u64, MODLIST_ADDR + 24)?;
        nr_modules = 1;
    }
    // hvm_start_info, version 1.
    write(mem, START_INFO_MAGIC, START_INFO_ADDR)?;
    write(mem, 1u32, START_INFO_ADDR + 4)?;
    write(mem, 0u32, START_INFO_ADDR + 8)?;
    write(mem, nr_modules, START_INFO_ADDR + 12)?;
    write(mem, MODLIST_ADDR, START_INFO_ADDR + 16)?;
    write(mem, CMDLINE_ADDR, START_INFO_ADDR + 24)?;
    write(mem, 0u64, START_INFO_ADDR + 32)?; // rsdp
    write(mem, MEMMAP_ADDR, START_INFO_ADDR + 40)?;
    write(mem, map.len() as u32, START_INFO_ADDR + 48)?;
    write(mem, 0u32, START_INFO_ADDR + 52)?;

    Ok(EntryState {
        mode: EntryMode::Protected32,
        rip: entry,
        rax: 0,
        rbx: START_INFO_ADDR,
        rsi: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::elf::tests::{elf32, note};
    use crate::memory::create_guest_memory;

    #[test]
    fn pvh_entry_and_start_info() {
        let n = note(
            b"Xen",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x10_0040u32.to_le_bytes(),
        );
        let image = elf32(0x10_0000, &[0x90; 64], 0, Some(&n));
        let layout = Layout::new(32 << 20);
        let mem = create_guest_memory(&layout).unwrap();
        let p = PvhParams {
            image: &image,
            cmdline: "console=ttyS0",
            module: Some(&[5u8; 10]),
        };
        let e = load(&mem, &layout, &p).unwrap();
        assert_eq!(
            (e.rip, e.rbx, e.mode),
            (0x10_0040, START_INFO_ADDR, EntryMode::Protected32)
        );
        let magic: u32 = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        assert_eq!(magic, START_INFO_MAGIC);
        let entries: u32 = mem.read_obj(GuestAddress(START_INFO_ADDR + 48)).unwrap();
        assert_eq!(entries as usize, layout.memory_map().len());
        let modaddr: u64 = mem.read_obj(GuestAddress(MODLIST_ADDR)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(modaddr)).unwrap(), 5);
    }

    #[test]
    fn no_note_no_entry() {
        let n = note(b"Xen", 5, &[0; 4]);
        let image = elf32(0x10_0000, &[0; 4], 0, Some(&n));
        let elf = Elf::parse(&image).unwrap();
        assert_eq!(entry_point(&elf.notes()), None);
    }
}
