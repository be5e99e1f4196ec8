//! The PVH boot protocol: a 32-bit entry point announced by a Xen ELF note.
//!
//! Kernels built for PVH (Linux with CONFIG_PVH, many unikernels and test kernels) say where to
//! enter them in a `XEN_ELFNOTE_PHYS32_ENTRY` note. They start in flat 32-bit protected mode
//! with paging off and EBX pointing at an `hvm_start_info` that describes the command line, the
//! memory map and module 0 (`--initrd`).
//!
//! The start info, memory map and module list are linux-loader's structures, written by its
//! `PvhBootConfigurator`. Finding the entry note stays here: linux-loader reads PVH notes only
//! from ELF64 images, and PVH kernels may be ELF32 ([`super::elf`] reads both).

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
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

    let memmap: Vec<hvm_memmap_table_entry> = layout
        .memory_map()
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.start,
            size: e.len,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: START_INFO_MAGIC,
        version: 1,
        modlist_paddr: MODLIST_ADDR,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some(module) = p.module {
        let addr = layout
            .low_ram_end()
            .checked_sub(module.len() as u64)
            .map(|a| a & !(PAGE_SIZE - 1))
            .filter(|a| *a >= elf.end())
            .ok_or(LoaderError::NoRoom("the initrd"))?;
        mem.write_slice(module, GuestAddress(addr))
            .map_err(|_| LoaderError::NoRoom("the initrd"))?;
        modules.push(hvm_modlist_entry {
            paddr: addr,
            size: module.len() as u64,
            ..Default::default()
        });
        start_info.nr_modules = 1;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|_| LoaderError::NoRoom("the pvh start info"))?;

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
        let info: hvm_start_info = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        assert_eq!((info.version, info.nr_modules), (1, 1));
        assert_eq!(
            (info.modlist_paddr, info.cmdline_paddr, info.memmap_paddr),
            (MODLIST_ADDR, CMDLINE_ADDR, MEMMAP_ADDR)
        );
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(MODLIST_ADDR)).unwrap();
        assert_eq!((module.paddr, module.size), (modaddr, 10));
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(MEMMAP_ADDR)).unwrap();
        let map = layout.memory_map();
        assert_eq!((first.addr, first.size), (map[0].start, map[0].len));
        let mut cmdline = [0u8; 14];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0\0");
    }

    #[test]
    fn no_note_no_entry() {
        let n = note(b"Xen", 5, &[0; 4]);
        let image = elf32(0x10_0000, &[0; 4], 0, Some(&n));
        let elf = Elf::parse(&image).unwrap();
        assert_eq!(entry_point(&elf.notes()), None);
    }
}
