//! A small, defensive ELF reader for kernel images: program headers and notes, ELF32 and ELF64.
//!
//! Multiboot images (kvm-unit-tests) are ELF32 files holding 64-bit code, and PVH kernels may be
//! either class, so hopvm reads both itself: linux-loader's ELF loader reads only ELF64 headers
//! and so cannot load the ELF32 files Multiboot kernels are. Every offset and size in the file is checked
//! against the file before use: a corrupt image yields an [`ElfError`], never a panic.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Errors reading or loading an ELF image.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// Not an ELF file, or one hopvm cannot run.
    #[error("not a little-endian x86 elf executable")]
    NotElf,
    /// A header or segment lies outside the file.
    #[error("truncated elf image: {0} lies outside the file")]
    Truncated(&'static str),
    /// A segment does not fit in guest RAM.
    #[error("elf segment at {addr:#x} (+{len:#x}) does not fit in guest ram")]
    SegmentOutsideRam {
        /// The segment's physical address.
        addr: u64,
        /// Its size in memory.
        len: u64,
    },
    /// No loadable segment.
    #[error("elf image has no loadable segment")]
    NoSegments,
}

/// A loadable segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Physical load address (`p_paddr`).
    pub paddr: u64,
    /// Offset of its bytes in the file.
    pub offset: u64,
    /// Bytes taken from the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zero-filled).
    pub memsz: u64,
}

/// An ELF note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note<'a> {
    /// Owner name without the terminating NUL.
    pub name: &'a [u8],
    /// Note type.
    pub kind: u32,
    /// Descriptor bytes.
    pub desc: &'a [u8],
}

/// A parsed ELF image.
#[derive(Debug)]
pub struct Elf<'a> {
    /// The file.
    pub data: &'a [u8],
    /// ELF64 (true) or ELF32.
    pub is_64: bool,
    /// Entry point.
    pub entry: u64,
    /// Loadable segments.
    pub segments: Vec<Segment>,
    notes: Vec<(u64, u64)>,
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;

fn bytes<'a>(data: &'a [u8], off: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
    let start = usize::try_from(off).map_err(|_| ElfError::Truncated(what))?;
    let len = usize::try_from(len).map_err(|_| ElfError::Truncated(what))?;
    data.get(start..start.checked_add(len).ok_or(ElfError::Truncated(what))?)
        .ok_or(ElfError::Truncated(what))
}

fn u16_at(d: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([d[o], d[o + 1]])
}

fn u32_at(d: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(d[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(d: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(d[o..o + 8].try_into().expect("8 bytes"))
}

/// True if `data` starts with the ELF magic.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

impl<'a> Elf<'a> {
    /// Parses the headers of `data`.
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if !is_elf(data) || data.len() < 52 {
            return Err(ElfError::NotElf);
        }
        let is_64 = match data[4] {
            1 => false,
            2 => true,
            _ => return Err(ElfError::NotElf),
        };
        let machine = u16_at(data, 18);
        if data[5] != 1 || !matches!(machine, EM_386 | EM_X86_64) {
            return Err(ElfError::NotElf);
        }
        let (entry, phoff, phentsize, phnum) = if is_64 {
            let h = bytes(data, 0, 64, "elf header")?;
            (u64_at(h, 24), u64_at(h, 32), u16_at(h, 54), u16_at(h, 56))
        } else {
            (
                u64::from(u32_at(data, 24)),
                u64::from(u32_at(data, 28)),
                u16_at(data, 42),
                u16_at(data, 44),
            )
        };
        let min_entsize = if is_64 { 56 } else { 32 };
        if phentsize < min_entsize {
            return Err(ElfError::Truncated("program header table"));
        }
        let mut segments = Vec::new();
        let mut notes = Vec::new();
        for i in 0..u64::from(phnum) {
            let ph = bytes(
                data,
                phoff.saturating_add(i * u64::from(phentsize)),
                u64::from(min_entsize),
                "program header",
            )?;
            let kind = u32_at(ph, 0);
            let (offset, paddr, filesz, memsz) = if is_64 {
                (
                    u64_at(ph, 8),
                    u64_at(ph, 24),
                    u64_at(ph, 32),
                    u64_at(ph, 40),
                )
            } else {
                (
                    u64::from(u32_at(ph, 4)),
                    u64::from(u32_at(ph, 12)),
                    u64::from(u32_at(ph, 16)),
                    u64::from(u32_at(ph, 20)),
                )
            };
            match kind {
                PT_LOAD if memsz > 0 => {
                    bytes(data, offset, filesz, "a loadable segment")?;
                    if filesz > memsz {
                        return Err(ElfError::Truncated("a segment's file size"));
                    }
                    segments.push(Segment {
                        paddr,
                        offset,
                        filesz,
                        memsz,
                    });
                }
                PT_NOTE => {
                    bytes(data, offset, filesz, "a note segment")?;
                    notes.push((offset, filesz));
                }
                _ => {}
            }
        }
        if segments.is_empty() {
            return Err(ElfError::NoSegments);
        }
        Ok(Self {
            data,
            is_64,
            entry,
            segments,
            notes,
        })
    }

    /// Every note in the image's note segments (malformed notes end the walk of their segment).
    pub fn notes(&self) -> Vec<Note<'a>> {
        let mut out = Vec::new();
        for &(offset, size) in &self.notes {
            let seg = &self.data[offset as usize..(offset + size) as usize];
            let mut pos = 0usize;
            while pos + 12 <= seg.len() {
                let namesz = u32_at(seg, pos) as usize;
                let descsz = u32_at(seg, pos + 4) as usize;
                let kind = u32_at(seg, pos + 8);
                let name_start = pos + 12;
                let desc_start = name_start + namesz.next_multiple_of(4);
                let end = desc_start.saturating_add(descsz.next_multiple_of(4));
                if end > seg.len() || desc_start + descsz > seg.len() {
                    break;
                }
                let name = &seg[name_start..name_start + namesz];
                out.push(Note {
                    name: name.strip_suffix(b"\0").unwrap_or(name),
                    kind,
                    desc: &seg[desc_start..desc_start + descsz],
                });
                pos = end;
            }
        }
        out
    }

    /// One past the highest byte any segment occupies in memory.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.paddr.saturating_add(s.memsz))
            .max()
            .unwrap_or(0)
    }

    /// Copies every segment to guest memory at its physical address, zero-filling to `memsz`.
    ///
    /// `ram_end` bounds the loadable range: segments must lie in `[0, ram_end)`.
    pub fn load(&self, mem: &GuestMemoryMmap, ram_end: u64) -> Result<(), ElfError> {
        for s in &self.segments {
            let outside = ElfError::SegmentOutsideRam {
                addr: s.paddr,
                len: s.memsz,
            };
            match s.paddr.checked_add(s.memsz) {
                Some(end) if end <= ram_end => {}
                _ => return Err(outside),
            }
            let file = &self.data[s.offset as usize..(s.offset + s.filesz) as usize];
            mem.write_slice(file, GuestAddress(s.paddr))
                .map_err(|_| outside)?;
            zero_fill(mem, s.paddr + s.filesz, s.memsz - s.filesz).map_err(|_| {
                ElfError::SegmentOutsideRam {
                    addr: s.paddr,
                    len: s.memsz,
                }
            })?;
        }
        Ok(())
    }
}

/// Zeroes `len` bytes of guest memory at `addr`, a bounded chunk at a time.
pub fn zero_fill(
    mem: &GuestMemoryMmap,
    addr: u64,
    len: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    const CHUNK: u64 = 64 << 10;
    let zeros = [0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        mem.write_slice(&zeros[..n as usize], GuestAddress(addr + done))?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF32 image with one PT_LOAD segment of `payload` at `paddr` and an
    /// optional note segment.
    pub(crate) fn elf32(paddr: u32, payload: &[u8], bss: u32, note: Option<&[u8]>) -> Vec<u8> {
        let phnum: u16 = if note.is_some() { 2 } else { 1 };
        let data_off = 52 + 32 * u32::from(phnum);
        let mut f = vec![0u8; 52];
        f[..7].copy_from_slice(b"\x7fELF\x01\x01\x01");
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&EM_386.to_le_bytes());
        f[24..28].copy_from_slice(&paddr.to_le_bytes());
        f[28..32].copy_from_slice(&52u32.to_le_bytes());
        f[42..44].copy_from_slice(&32u16.to_le_bytes());
        f[44..46].copy_from_slice(&phnum.to_le_bytes());
        let mut ph = |kind: u32, off: u32, addr: u32, filesz: u32, memsz: u32| {
            for v in [kind, off, addr, addr, filesz, memsz, 7, 4] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        };
        let plen = payload.len() as u32;
        ph(PT_LOAD, data_off, paddr, plen, plen + bss);
        if let Some(n) = note {
            ph(PT_NOTE, data_off + plen, 0, n.len() as u32, n.len() as u32);
        }
        f.extend_from_slice(payload);
        if let Some(n) = note {
            f.extend_from_slice(n);
        }
        f
    }

    /// Encodes one ELF note.
    pub(crate) fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.push(0);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn parse_load_and_notes() {
        use crate::memory::{create_guest_memory, Layout};
        let n = note(b"Xen", 18, &0x1234u32.to_le_bytes());
        let image = elf32(0x10_0000, &[1, 2, 3, 4], 16, Some(&n));
        let elf = Elf::parse(&image).unwrap();
        assert!(!elf.is_64);
        assert_eq!(elf.entry, 0x10_0000);
        assert_eq!(elf.end(), 0x10_0000 + 20);
        let notes = elf.notes();
        assert_eq!(notes.len(), 1);
        assert_eq!((notes[0].name, notes[0].kind), (&b"Xen"[..], 18));
        let mem = create_guest_memory(&Layout::new(2 << 20)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x10_0010)).unwrap();
        elf.load(&mem, 2 << 20).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(),
            0x0403_0201
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0010)).unwrap(), 0);
        assert!(matches!(
            elf.load(&mem, 0x10_0010),
            Err(ElfError::SegmentOutsideRam { .. })
        ));
    }

    #[test]
    fn corrupt_images_are_errors() {
        let image = elf32(0x10_0000, &[1, 2, 3, 4], 0, None);
        for len in [0, 4, 20, 51, 60, 84, 86] {
            assert!(Elf::parse(&image[..len]).is_err(), "length {len}");
        }
        let mut bad = image.clone();
        bad[28..32].copy_from_slice(&u32::MAX.to_le_bytes()); // phoff far outside
        assert!(Elf::parse(&bad).is_err());
        let mut bad = image.clone();
        bad[52 + 16..52 + 20].copy_from_slice(&0x100u32.to_le_bytes()); // filesz > memsz
        assert!(Elf::parse(&bad).is_err());
        let mut bad = image;
        bad[18] = 40; // ARM
        assert!(matches!(Elf::parse(&bad), Err(ElfError::NotElf)));
    }
}
