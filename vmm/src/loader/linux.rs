//! Linux's 64-bit boot protocol, for bzImage and uncompressed vmlinux kernels.
//!
//! The vmlinux ELF is loaded at its physical addresses with linux-loader and entered at
//! `startup_64` in long mode, with RSI pointing at the zero page (`boot_params`) that carries
//! the E820 map, the command line and the initrd. A bzImage is not run through its own
//! decompressor: its payload is unpacked on the host ([`super::payload`]) and booted as the
//! vmlinux it contains, with the bzImage's setup header copied into the zero page as the boot
//! protocol asks. On this machine's emulated CPU that saves minutes; on hardware, milliseconds.

use std::io::Cursor;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{payload, LoaderError};
use crate::arch::regs::{EntryMode, EntryState};
use crate::memory::{GuestMemoryMmap, Layout, HIGH_MEMORY_START, PAGE_SIZE};

/// Where the zero page goes.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The longest command line hopvm passes when the kernel does not say (x86's COMMAND_LINE_SIZE).
const DEFAULT_CMDLINE_SIZE: u32 = 2048;
/// Room reserved for the command line below the next structure.
const CMDLINE_MAX: u64 = 0x1_0000;

const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xaa55;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const LOADFLAG_LOADED_HIGH: u8 = 0x01;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;

/// True if `image` carries a Linux real-mode setup header (a bzImage).
pub fn is_bzimage(image: &[u8]) -> bool {
    image.len() > 0x260 && image[0x202..0x206] == HDRS_MAGIC.to_le_bytes()
}

/// The bzImage's setup header, as many bytes of it as the image declares.
fn setup_header_of(image: &[u8]) -> setup_header {
    let mut hdr = setup_header::default();
    // The header runs from 0x1f1 to 0x202 + the jump byte at 0x201.
    let declared_end = 0x202 + usize::from(image[0x201]);
    let len = (declared_end - 0x1f1)
        .min(size_of::<setup_header>())
        .min(image.len() - 0x1f1);
    hdr.as_mut_slice()[..len].copy_from_slice(&image[0x1f1..0x1f1 + len]);
    hdr
}

/// What the Linux loader is given.
pub struct LinuxParams<'a> {
    /// bzImage or vmlinux.
    pub image: &'a [u8],
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Initial ramdisk.
    pub initrd: Option<&'a [u8]>,
}

/// Loads a Linux kernel and writes its zero page; returns the entry state.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    p: &LinuxParams,
) -> Result<EntryState, LoaderError> {
    let (vmlinux, mut hdr) = if is_bzimage(p.image) {
        let hdr = setup_header_of(p.image);
        (payload::decompress_bzimage(p.image)?, hdr)
    } else {
        let hdr = setup_header {
            boot_flag: BOOT_FLAG,
            header: HDRS_MAGIC,
            kernel_alignment: 0x100_0000,
            cmdline_size: DEFAULT_CMDLINE_SIZE,
            initrd_addr_max: u32::MAX,
            ..Default::default()
        };
        (p.image.to_vec(), hdr)
    };
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(&vmlinux),
        Some(GuestAddress(HIGH_MEMORY_START)),
    )
    .map_err(LoaderError::Linux)?;

    let cmdline_size = match hdr.cmdline_size {
        0 => DEFAULT_CMDLINE_SIZE,
        n => n,
    };
    if p.cmdline.len() as u64 >= u64::from(cmdline_size).min(CMDLINE_MAX) {
        return Err(LoaderError::CmdlineTooLong {
            len: p.cmdline.len(),
            max: cmdline_size as usize - 1,
        });
    }
    let mut cmdline = p.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| LoaderError::NoRoom("the command line"))?;

    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= LOADFLAG_LOADED_HIGH | LOADFLAG_CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline_size;
    if let Some(initrd) = p.initrd {
        let addr_max = match hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            n => u64::from(n),
        };
        let top = (addr_max + 1).min(layout.low_ram_end());
        let addr = top
            .checked_sub(initrd.len() as u64)
            .map(|a| a & !(PAGE_SIZE - 1))
            .filter(|a| *a >= loaded.kernel_end)
            .ok_or(LoaderError::NoRoom("the initrd"))?;
        mem.write_slice(initrd, GuestAddress(addr))
            .map_err(|_| LoaderError::NoRoom("the initrd"))?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = initrd.len() as u32;
    }

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let map = layout.memory_map();
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.start,
            size: e.len,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|_| LoaderError::NoRoom("the zero page"))?;

    Ok(EntryState {
        mode: EntryMode::Long64,
        rip: loaded.kernel_load.0,
        rax: 0,
        rbx: 0,
        rsi: ZERO_PAGE_ADDR,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_bzimage_and_reads_header() {
        let mut image = vec![0u8; 0x400];
        assert!(!is_bzimage(&image));
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x201] = 0x6a; // header ends at 0x26c
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x238..0x23c].copy_from_slice(&4096u32.to_le_bytes()); // cmdline_size
        assert!(is_bzimage(&image));
        let hdr = setup_header_of(&image);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.cmdline_size }, 4096);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        // A short jump byte limits what is copied.
        image[0x201] = 0;
        assert_eq!({ setup_header_of(&image).cmdline_size }, 0);
    }

    #[test]
    fn rejects_garbage_vmlinux() {
        let layout = Layout::new(64 << 20);
        let mem = crate::memory::create_guest_memory(&layout).unwrap();
        let p = LinuxParams {
            image: b"\x7fELF\x02\x01\x01garbage",
            cmdline: "",
            initrd: None,
        };
        assert!(load(&mem, &layout, &p).is_err());
    }
}
