//! Kernel loaders: turn an image file into guest memory contents and the boot vCPU's entry state.
//!
//! The format is detected from the image, in the order QEMU's `-kernel` tries them: a Linux
//! setup header (bzImage), a Multiboot header, then an ELF kernel — booted by PVH when it
//! carries a PVH entry note and is not Linux, else by Linux's 64-bit boot protocol.

pub mod elf;
pub mod linux;
pub mod multiboot;
mod payload;
pub mod pvh;

pub use payload::{decompress_bzimage, PayloadError};

use crate::arch::regs::EntryState;
use crate::memory::{GuestMemoryMmap, Layout};

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// Not a format hopvm knows.
    #[error("unrecognised kernel image: not a bzImage, vmlinux, multiboot or pvh elf")]
    UnknownFormat,
    /// A broken ELF image.
    #[error(transparent)]
    Elf(#[from] elf::ElfError),
    /// A Multiboot image using the a.out kludge.
    #[error("multiboot a.out kludge images (header flag 16) are not supported; use an elf image")]
    MultibootAout,
    /// A bzImage whose payload could not be unpacked.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// linux-loader refused the vmlinux.
    #[error("invalid vmlinux: {0}")]
    Linux(#[source] linux_loader::loader::Error),
    /// Guest RAM too small.
    #[error("guest memory is too small for {0}")]
    NoRoom(&'static str),
    /// The command line is longer than the kernel accepts.
    #[error("command line of {len} bytes is longer than the kernel's limit of {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// The boot protocol an image is booted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Linux bzImage (payload unpacked on the host).
    BzImage,
    /// Uncompressed Linux vmlinux ELF.
    Vmlinux,
    /// Multiboot v1 ELF.
    Multiboot,
    /// ELF with a PVH entry note.
    Pvh,
}

/// True if an ELF's notes say it is Linux (a "Linux" owner note, or Xen's GUEST_OS = "linux").
fn is_linux(notes: &[elf::Note]) -> bool {
    const XEN_ELFNOTE_GUEST_OS: u32 = 6;
    notes.iter().any(|n| {
        n.name == b"Linux"
            || (n.name == b"Xen" && n.kind == XEN_ELFNOTE_GUEST_OS && n.desc.starts_with(b"linux"))
    })
}

/// Detects the boot protocol of `image`.
pub fn detect(image: &[u8]) -> Result<KernelFormat, LoaderError> {
    if linux::is_bzimage(image) {
        return Ok(KernelFormat::BzImage);
    }
    if multiboot::header_flags(image).is_some() {
        return Ok(KernelFormat::Multiboot);
    }
    if !elf::is_elf(image) {
        return Err(LoaderError::UnknownFormat);
    }
    let parsed = elf::Elf::parse(image)?;
    let notes = parsed.notes();
    if pvh::entry_point(&notes).is_some() && !(parsed.is_64 && is_linux(&notes)) {
        Ok(KernelFormat::Pvh)
    } else if parsed.is_64 {
        Ok(KernelFormat::Vmlinux)
    } else {
        Err(LoaderError::UnknownFormat)
    }
}

/// Everything a loader needs.
pub struct BootRequest<'a> {
    /// The image's path as the user gave it (Multiboot's argv[0]).
    pub kernel_path: &'a str,
    /// The image.
    pub image: &'a [u8],
    /// The command line.
    pub cmdline: &'a str,
    /// Initrd / module 0 and its path.
    pub initrd: Option<(&'a [u8], &'a str)>,
}

/// Loads `req` into `mem`; returns the detected format and the boot vCPU's entry state.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &Layout,
    req: &BootRequest,
) -> Result<(KernelFormat, EntryState), LoaderError> {
    let format = detect(req.image)?;
    let entry = match format {
        KernelFormat::BzImage | KernelFormat::Vmlinux => linux::load(
            mem,
            layout,
            &linux::LinuxParams {
                image: req.image,
                cmdline: req.cmdline,
                initrd: req.initrd.map(|(d, _)| d),
            },
        )?,
        KernelFormat::Multiboot => multiboot::load(
            mem,
            layout,
            &multiboot::MultibootParams {
                image: req.image,
                kernel_path: req.kernel_path,
                cmdline: req.cmdline,
                module: req.initrd,
            },
        )?,
        KernelFormat::Pvh => pvh::load(
            mem,
            layout,
            &pvh::PvhParams {
                image: req.image,
                cmdline: req.cmdline,
                module: req.initrd.map(|(d, _)| d),
            },
        )?,
    };
    Ok((format, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_images_are_errors() {
        assert!(matches!(detect(b""), Err(LoaderError::UnknownFormat)));
        assert!(matches!(
            detect(&[0u8; 10000]),
            Err(LoaderError::UnknownFormat)
        ));
        assert!(detect(b"\x7fELF\x01\x01").is_err());
        let elf32 = elf::tests::elf32(0x10_0000, &[0; 8], 0, None);
        assert!(matches!(detect(&elf32), Err(LoaderError::UnknownFormat)));
    }

    #[test]
    fn linux_notes_win_over_pvh() {
        let pvh = elf::tests::note(b"Xen", 18, &[0; 4]);
        let image = elf::tests::elf32(0x10_0000, &[0; 8], 0, Some(&pvh));
        assert_eq!(detect(&image).unwrap(), KernelFormat::Pvh);
        let linux = elf::tests::note(b"Linux", 0x100, b"salt");
        let image = elf::tests::elf32(0x10_0000, &[0; 8], 0, Some(&linux));
        assert!(is_linux(&elf::Elf::parse(&image).unwrap().notes()));
    }
}
