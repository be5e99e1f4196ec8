//! Multiboot v1: the format of kvm-unit-tests images and many hobby and test kernels.
//!
//! hopvm boots exactly what `qemu-system-x86_64 -kernel` boots: an ELF image (ELF32, which may
//! hold 64-bit code) with a Multiboot header in its first 8 KiB, loaded by its program headers.
//! The a.out kludge (header flag 16) is refused. The kernel is entered in flat 32-bit protected
//! mode with paging off, EAX = 0x2BADB002 and EBX pointing at the info structure, which hopvm
//! places on the first page boundary after the image, followed by the memory map, the command
//! line (`"<kernel path> <args>"`, argv[0] first, as QEMU passes it) and module 0 (`--initrd`).

use vm_memory::{Bytes, GuestAddress};

use super::elf::Elf;
use super::LoaderError;
use crate::arch::regs::{EntryMode, EntryState};
use crate::memory::{GuestMemoryMmap, Layout, EBDA_START, HIGH_MEMORY_START, PAGE_SIZE};

/// The header magic in the image.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// The magic in EAX at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Header flag: the a.out kludge (load addresses in the header), which hopvm does not support.
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// How far into the image the header may start.
const SEARCH_LEN: usize = 8192;

/// Info structure flags.
const INFO_MEM: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;
/// Size of the info structure.
const INFO_SIZE: u64 = 88;

/// The header's flags, if `image` has a valid Multiboot header (magic + flags + checksum = 0).
pub fn header_flags(image: &[u8]) -> Option<u32> {
    image[..image.len().min(SEARCH_LEN)]
        .chunks_exact(4)
        .enumerate()
        .find_map(|(i, w)| {
            let magic = u32::from_le_bytes(w.try_into().ok()?);
            let rest = image.get(i * 4 + 4..i * 4 + 12)?;
            let flags = u32::from_le_bytes(rest[..4].try_into().ok()?);
            let sum = u32::from_le_bytes(rest[4..].try_into().ok()?);
            (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0)
                .then_some(flags)
        })
}

/// Appends bytes to guest memory at a moving address.
struct Writer<'m> {
    mem: &'m GuestMemoryMmap,
    next: u64,
    limit: u64,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8], align: u64) -> Result<u64, LoaderError> {
        let at = self.next.next_multiple_of(align);
        let end = at + bytes.len() as u64;
        if end > self.limit {
            return Err(LoaderError::NoRoom("the multiboot information"));
        }
        self.mem
            .write_slice(bytes, GuestAddress(at))
            .map_err(|_| LoaderError::NoRoom("the multiboot information"))?;
        self.next = end;
        Ok(at)
    }

    fn put_str(&mut self, s: &str) -> Result<u32, LoaderError> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        Ok(self.put(&b, 1)? as u32)
    }
}

/// What the Multiboot loader is given.
pub struct MultibootParams<'a> {
    /// The kernel image.
    pub image: &'a [u8],
    /// The kernel's path as the user gave it (argv[0]).
    pub kernel_path: &'a str,
    /// The arguments.
    pub cmdline: &'a str,
    /// Module 0 and its name.
    pub module: Option<(&'a [u8], &'a str)>,
}

/// Loads a Multiboot image and writes its info structure; returns the entry state.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    p: &MultibootParams,
) -> Result<EntryState, LoaderError> {
    let flags = header_flags(p.image).ok_or(LoaderError::UnknownFormat)?;
    if flags & FLAG_AOUT_KLUDGE != 0 {
        return Err(LoaderError::MultibootAout);
    }
    let elf = Elf::parse(p.image)?;
    let ram_end = layout.low_ram_end();
    elf.load(mem, ram_end)?;

    let mut w = Writer {
        mem,
        next: elf.end().next_multiple_of(PAGE_SIZE),
        limit: ram_end,
    };
    let info_addr = w.put(&[0u8; INFO_SIZE as usize], PAGE_SIZE)?;
    let mut mmap = Vec::new();
    for e in layout.memory_map() {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.start.to_le_bytes());
        mmap.extend_from_slice(&e.len.to_le_bytes());
        mmap.extend_from_slice(&(e.kind as u32).to_le_bytes());
    }
    let mmap_addr = w.put(&mmap, 8)? as u32;
    let cmdline = w.put_str(&format!("{} {}", p.kernel_path, p.cmdline))?;
    let loader_name = w.put_str("hopvm")?;
    let mut mods = (0u32, 0u32);
    if let Some((data, name)) = p.module {
        let name = w.put_str(name)?;
        let entry_addr = w.put(&[0u8; 16], 16)?;
        let start = w.put(data, PAGE_SIZE)?;
        let mut entry = Vec::with_capacity(16);
        for v in [start as u32, (start + data.len() as u64) as u32, name, 0] {
            entry.extend_from_slice(&v.to_le_bytes());
        }
        w.put_at(&entry, entry_addr)?;
        mods = (1, entry_addr as u32);
    }

    let mem_lower = (EBDA_START >> 10) as u32;
    let mem_upper = ((layout.below_4g().saturating_sub(HIGH_MEMORY_START)) >> 10) as u32;
    let mut info = [0u8; INFO_SIZE as usize];
    let mut set = |off: usize, v: u32| info[off..off + 4].copy_from_slice(&v.to_le_bytes());
    set(
        0,
        INFO_MEM | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME,
    );
    set(4, mem_lower);
    set(8, mem_upper);
    set(12, 0xffff_ffff); // boot_device: none
    set(16, cmdline);
    set(20, mods.0);
    set(24, mods.1);
    set(44, mmap.len() as u32);
    set(48, mmap_addr);
    set(64, loader_name);
    w.put_at(&info, info_addr)?;

    Ok(EntryState {
        mode: EntryMode::Protected32,
        rip: elf.entry,
        rax: u64::from(BOOTLOADER_MAGIC),
        rbx: info_addr,
        rsi: 0,
    })
}

impl Writer<'_> {
    fn put_at(&self, bytes: &[u8], at: u64) -> Result<(), LoaderError> {
        self.mem
            .write_slice(bytes, GuestAddress(at))
            .map_err(|_| LoaderError::NoRoom("the multiboot information"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::elf::tests::elf32;
    use crate::memory::create_guest_memory;
    use vm_memory::Address;

    fn header(flags: u32) -> Vec<u8> {
        let mut h = Vec::new();
        for v in [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    }

    #[test]
    fn loads_and_fills_info() {
        let layout = Layout::new(64 << 20);
        let mem = create_guest_memory(&layout).unwrap();
        let image = elf32(0x40_0000, &header(2), 0x1000, None);
        let module = [9u8; 100];
        let entry = load(
            &mem,
            &layout,
            &MultibootParams {
                image: &image,
                kernel_path: "guest.elf",
                cmdline: "a=1",
                module: Some((&module, "env")),
            },
        )
        .unwrap();
        assert_eq!(entry.mode, EntryMode::Protected32);
        assert_eq!(entry.rip, 0x40_0000);
        assert_eq!(entry.rbx, 0x40_2000);
        let info = GuestAddress(entry.rbx);
        let read = |off: u64| mem.read_obj::<u32>(info.unchecked_add(off)).unwrap();
        assert_eq!(read(0) & 0x4d, 0x4d);
        assert_eq!(read(4), 639);
        assert_eq!(read(8), (64 << 10) - 1024);
        let mut cmd = [0u8; 13];
        mem.read_slice(&mut cmd, GuestAddress(u64::from(read(16))))
            .unwrap();
        assert_eq!(&cmd, b"guest.elf a=1");
        assert_eq!(read(20), 1);
        let m = GuestAddress(u64::from(read(24)));
        let start = mem.read_obj::<u32>(m).unwrap();
        let end = mem.read_obj::<u32>(m.unchecked_add(4)).unwrap();
        assert_eq!((end - start, start % 4096), (100, 0));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(u64::from(start))).unwrap(),
            9
        );
        assert_eq!(read(44), 3 * 24);
    }

    #[test]
    fn rejects_aout_and_missing_header() {
        let layout = Layout::new(64 << 20);
        let mem = create_guest_memory(&layout).unwrap();
        let params = |image: &'static [u8]| MultibootParams {
            image,
            kernel_path: "k",
            cmdline: "",
            module: None,
        };
        let aout = elf32(0x40_0000, &header(1 << 16), 0, None).leak();
        assert!(matches!(
            load(&mem, &layout, &params(aout)),
            Err(LoaderError::MultibootAout)
        ));
        let mut bad_sum = header(0);
        bad_sum[8] ^= 1;
        let image = elf32(0x40_0000, &bad_sum, 0, None).leak();
        assert_eq!(header_flags(image), None);
        // A header in an image whose ELF is truncated.
        let good = elf32(0x40_0000, &header(0), 0, None);
        let truncated = good[..good.len() - 14].to_vec().leak();
        assert!(load(&mem, &layout, &params(truncated)).is_err());
    }
}
