//! Host-side decompression of a bzImage's compressed kernel payload.
//!
//! A bzImage is a small real-mode setup program plus a protected-mode stub
//! that decompresses the real kernel (an ELF `vmlinux`, stored as a
//! compressed "payload") into guest memory before jumping to it. Running that
//! decompressor inside the guest is slow: on a host without hardware
//! virtualisation, where every guest instruction is emulated, it takes far
//! longer than the rest of early boot, and even under KVM it costs time on
//! every boot. The boot protocol (version 2.08 and later) records where the
//! payload lies in the image, so the VMM can decompress it on the host
//! instead and load the resulting ELF directly with the 64-bit boot protocol.
//!
//! Supported payload formats are gzip, xz (including the x86 BCJ filter that
//! the kernel build always applies), legacy lzma, zstd and legacy lz4 (which
//! Debian 12's kernels use). bzip2 and lzo payloads are recognised and
//! rejected with a clear error. Output is capped at [`MAX_DECOMPRESSED_SIZE`]
//! and every length field is bounds-checked, so a corrupt image gives an
//! error instead of a panic or an unbounded allocation.
//!
//! The decompression itself is done by crates (flate2, lzma-rs, ruzstd, lz4_flex); hand-written
//! is only the kernel-specific framing around them, because linux-loader loads a bzImage as is
//! (no payload extraction) and no crate reads the kernel's legacy lz4 framing or undoes the
//! x86 BCJ filter behind lzma-rs.

use std::fmt;
use std::io::{self, Read, Write};

/// Largest decompressed kernel accepted by [`decompress_bzimage`] (1 GiB).
pub const MAX_DECOMPRESSED_SIZE: usize = 1 << 30;

/// Oldest boot protocol version that records the payload's location (2.08).
pub const MIN_BOOT_PROTOCOL: u16 = 0x0208;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Errors from parsing a bzImage or decompressing its payload.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The image ends before the end of its setup header.
    #[error("image too short for a bzimage setup header ({0} bytes)")]
    TooShort(usize),
    /// The "HdrS" magic is missing: this is not a bzImage.
    #[error("not a bzimage: missing \"HdrS\" setup header magic")]
    NotBzImage,
    /// The boot protocol predates 2.08, which added the payload fields.
    #[error("boot protocol {}.{:02} is too old: need 2.08 or later", .0 >> 8, .0 & 0xff)]
    ProtocolTooOld(u16),
    /// The payload fields point outside the image.
    #[error(
        "payload at offset {offset:#x} ({length} bytes) lies outside the {image_len}-byte image"
    )]
    PayloadOutOfBounds {
        /// Offset of the payload from the start of the image.
        offset: u64,
        /// Length of the payload.
        length: u32,
        /// Length of the image.
        image_len: usize,
    },
    /// The payload does not start with any known compression magic.
    #[error("unknown payload compression (magic {0})")]
    UnknownCompression(String),
    /// The payload uses a compression format this module cannot decompress.
    #[error("{0}-compressed kernels are not supported; use an uncompressed vmlinux")]
    Unsupported(Compression),
    /// The compressed data is corrupt or truncated.
    #[error("corrupt {format} payload: {reason}")]
    Corrupt {
        /// The payload's compression format.
        format: Compression,
        /// What the decompressor objected to.
        reason: String,
    },
    /// The decompressed kernel would exceed the size limit.
    #[error("decompressed kernel exceeds the {limit}-byte limit")]
    TooLarge {
        /// The limit that was exceeded, in bytes.
        limit: usize,
    },
    /// The payload decompressed to something that is not an ELF file.
    #[error("decompressed payload is not an elf image")]
    NotElf,
}

fn corrupt(format: Compression, reason: impl fmt::Display) -> PayloadError {
    PayloadError::Corrupt {
        format,
        reason: reason.to_string(),
    }
}

/// Compression formats a Linux kernel payload can use, told apart by magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (`1f 8b`).
    Gzip,
    /// xz (`fd 37 7a 58 5a 00`).
    Xz,
    /// zstd (`28 b5 2f fd`).
    Zstd,
    /// Legacy `.lzma` (`5d 00 00`).
    Lzma,
    /// bzip2 (`BZh`); recognised but not supported.
    Bzip2,
    /// Legacy lz4 frames (`02 21 4c 18`).
    Lz4,
    /// lzop (`89 4c 5a 4f`); recognised but not supported.
    Lzo,
}

impl Compression {
    /// Identifies the compression format of `data` by its leading magic.
    pub fn detect(data: &[u8]) -> Option<Self> {
        const MAGICS: [(&[u8], Compression); 7] = [
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], Compression::Xz),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (b"BZh", Compression::Bzip2),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (&[0x89, 0x4c, 0x5a, 0x4f], Compression::Lzo),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| data.starts_with(magic))
            .map(|&(_, format)| format)
    }

    /// The format's usual lower-case name, e.g. `"gzip"`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lzma => "lzma",
            Compression::Bzip2 => "bzip2",
            Compression::Lz4 => "lz4",
            Compression::Lzo => "lzo",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The setup header fields of a bzImage (boot protocol 2.08 or later) that a
/// loader needs. Offsets are those of Documentation/arch/x86/boot.rst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// Size of the real-mode setup code in 512-byte sectors (0x1f1; a stored
    /// 0 already replaced by 4).
    pub setup_sects: u8,
    /// Boot protocol version, e.g. `0x020f` for 2.15 (0x206).
    pub version: u16,
    /// Boot loader flags (0x211).
    pub loadflags: u8,
    /// Highest address an initrd may occupy (0x22c).
    pub initrd_addr_max: u32,
    /// Alignment the kernel must be loaded at if relocated (0x230).
    pub kernel_alignment: u32,
    /// Whether the protected-mode kernel is relocatable (0x234).
    pub relocatable_kernel: bool,
    /// Extended boot loader flags (0x236; 0 before protocol 2.12).
    pub xloadflags: u16,
    /// Largest command line, excluding the NUL (0x238).
    pub cmdline_size: u32,
    /// Offset of the payload from the start of the protected-mode code (0x248).
    pub payload_offset: u32,
    /// Length of the payload in bytes (0x24c).
    pub payload_length: u32,
    /// Preferred load address of the kernel (0x258; 0 before protocol 2.10).
    pub pref_address: u64,
    /// Memory the kernel needs from its load address for decompression and
    /// early boot (0x260; 0 before protocol 2.10).
    pub init_size: u32,
}

/// Smallest image that holds the setup header fields read by [`SetupHeader::parse`].
const SETUP_HEADER_END: usize = 0x264;

impl SetupHeader {
    /// Parses and checks the setup header at the start of a bzImage.
    pub fn parse(image: &[u8]) -> Result<Self, PayloadError> {
        if image.len() < 0x206 {
            return Err(PayloadError::TooShort(image.len()));
        }
        if &image[0x202..0x206] != b"HdrS" {
            return Err(PayloadError::NotBzImage);
        }
        if image.len() < SETUP_HEADER_END {
            return Err(PayloadError::TooShort(image.len()));
        }
        let u8_at = |off: usize| image[off];
        let u16_at = |off: usize| u16::from_le_bytes([image[off], image[off + 1]]);
        let u32_at = |off: usize| u32::from_le_bytes(le_array(&image[off..]));
        let u64_at = |off: usize| u64::from_le_bytes(le_array(&image[off..]));

        let version = u16_at(0x206);
        if version < MIN_BOOT_PROTOCOL {
            return Err(PayloadError::ProtocolTooOld(version));
        }
        let setup_sects = match u8_at(0x1f1) {
            0 => 4,
            n => n,
        };
        Ok(SetupHeader {
            setup_sects,
            version,
            loadflags: u8_at(0x211),
            initrd_addr_max: u32_at(0x22c),
            kernel_alignment: u32_at(0x230),
            relocatable_kernel: u8_at(0x234) != 0,
            xloadflags: if version >= 0x020c { u16_at(0x236) } else { 0 },
            cmdline_size: u32_at(0x238),
            payload_offset: u32_at(0x248),
            payload_length: u32_at(0x24c),
            pref_address: if version >= 0x020a { u64_at(0x258) } else { 0 },
            init_size: if version >= 0x020a { u32_at(0x260) } else { 0 },
        })
    }

    /// Offset in the image of the protected-mode code, `(setup_sects + 1) * 512`.
    pub fn protected_mode_offset(&self) -> usize {
        (usize::from(self.setup_sects) + 1) * 512
    }

    /// The compressed payload within `image`, bounds-checked.
    pub fn payload<'a>(&self, image: &'a [u8]) -> Result<&'a [u8], PayloadError> {
        let start = self.protected_mode_offset() as u64 + u64::from(self.payload_offset);
        let end = start + u64::from(self.payload_length);
        if self.payload_length == 0 || end > image.len() as u64 {
            return Err(PayloadError::PayloadOutOfBounds {
                offset: start,
                length: self.payload_length,
                image_len: image.len(),
            });
        }
        // Both bounds are at most image.len(), so they fit in usize.
        Ok(&image[start as usize..end as usize])
    }
}

/// Copies the first `N` bytes of `bytes` (the caller guarantees there are
/// enough) into an array for `from_le_bytes`.
fn le_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// Decompresses the kernel payload of a bzImage into the `vmlinux` ELF bytes.
///
/// Checks the setup header (boot protocol 2.08 or later), locates the
/// payload, decompresses it on the host and checks that the result is an ELF
/// file of at most [`MAX_DECOMPRESSED_SIZE`] bytes.
pub fn decompress_bzimage(image: &[u8]) -> Result<Vec<u8>, PayloadError> {
    let header = SetupHeader::parse(image)?;
    decompress_payload(header.payload(image)?, MAX_DECOMPRESSED_SIZE)
}

/// Decompresses a kernel payload (as located by [`SetupHeader::payload`]),
/// producing at most `limit` bytes, and checks that the result is an ELF file.
///
/// The kernel build appends the uncompressed size as a 4-byte little-endian
/// trailer to every payload format but gzip (whose own trailer holds it).
/// Formats that mark their own end (xz, zstd, gzip) ignore what follows;
/// legacy lz4 and size-less `.lzma`, which do not, require the trailer and
/// check it against the output.
pub fn decompress_payload(payload: &[u8], limit: usize) -> Result<Vec<u8>, PayloadError> {
    let format = Compression::detect(payload).ok_or_else(|| {
        let magic: Vec<String> = payload.iter().take(6).map(|b| format!("{b:02x}")).collect();
        PayloadError::UnknownCompression(magic.join(" "))
    })?;
    let mut out = Vec::with_capacity(capacity_hint(payload, limit));
    match format {
        Compression::Gzip => gunzip(payload, &mut out, limit)?,
        Compression::Xz => xz::decompress(payload, &mut out, limit)?,
        Compression::Zstd => unzstd(payload, &mut out, limit)?,
        Compression::Lzma => unlzma(payload, &mut out, limit)?,
        Compression::Lz4 => unlz4_legacy(payload, &mut out, limit)?,
        Compression::Bzip2 | Compression::Lzo => return Err(PayloadError::Unsupported(format)),
    }
    if !out.starts_with(ELF_MAGIC) {
        return Err(PayloadError::NotElf);
    }
    Ok(out)
}

/// Initial output capacity: the kernel build ends every payload with the
/// uncompressed size (gzip's ISIZE or an appended 32-bit trailer). It is only
/// a hint, so it is bounded by the limit and a generous compression ratio.
fn capacity_hint(payload: &[u8], limit: usize) -> usize {
    let Some(tail) = payload.len().checked_sub(4).map(|at| &payload[at..]) else {
        return 0;
    };
    let hint = u32::from_le_bytes(le_array(tail)) as usize;
    hint.min(limit).min(payload.len().saturating_mul(16))
}

/// Reads all of `reader` into `out`, failing once `out` would exceed `limit`.
fn read_capped(
    reader: impl Read,
    out: &mut Vec<u8>,
    limit: usize,
    format: Compression,
) -> Result<(), PayloadError> {
    let room = limit.saturating_sub(out.len()) as u64;
    reader
        .take(room.saturating_add(1))
        .read_to_end(out)
        .map_err(|e| corrupt(format, e))?;
    if out.len() > limit {
        return Err(PayloadError::TooLarge { limit });
    }
    Ok(())
}

fn gunzip(payload: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), PayloadError> {
    // A single gzip member, as the kernel build writes; its trailer already
    // holds the size, and anything after the member is ignored.
    read_capped(
        flate2::bufread::GzDecoder::new(payload),
        out,
        limit,
        Compression::Gzip,
    )
}

fn unzstd(payload: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), PayloadError> {
    const FRAME_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let format = Compression::Zstd;
    let mut rest = payload;
    loop {
        if rest.starts_with(&FRAME_MAGIC) {
            // A fresh decoder per frame: ruzstd only allocates its window as
            // output is produced, and the kernel's `zstd -22 --ultra` frames
            // declare a 128 MiB window.
            let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut rest)
                .map_err(|e| corrupt(format, e))?;
            read_capped(&mut decoder, out, limit, format)?;
            let frame = decoder.into_frame_decoder();
            if !frame.is_finished() {
                return Err(corrupt(format, "frame ended early"));
            }
            if let (Some(stored), Some(computed)) = (
                frame.get_checksum_from_data(),
                frame.get_calculated_checksum(),
            ) {
                if stored != computed {
                    return Err(corrupt(format, "content checksum mismatch"));
                }
            }
        } else if rest.len() >= 8 && rest[0] & 0xf0 == 0x50 && rest[1..4] == [0x2a, 0x4d, 0x18] {
            // Skippable frame: magic 0x184d2a5?, 32-bit length, data.
            let len = u32::from_le_bytes(le_array(&rest[4..])) as usize;
            rest = len
                .checked_add(8)
                .and_then(|end| rest.get(end..))
                .ok_or_else(|| corrupt(format, "truncated skippable frame"))?;
        } else {
            // End of the frames: what follows is the kernel's size trailer.
            return Ok(());
        }
    }
}

/// Output sink that refuses to grow `out` beyond `limit` and remembers that
/// it did, so the caller can tell a size error from a decoder error.
struct CappedWriter<'a> {
    out: &'a mut Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl Write for CappedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() > self.limit.saturating_sub(self.out.len()) {
            self.overflowed = true;
            return Err(io::Error::other("output size limit exceeded"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn unlzma(payload: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), PayloadError> {
    const HEADER_LEN: usize = 13;
    let format = Compression::Lzma;
    if payload.len() < HEADER_LEN {
        return Err(corrupt(format, "truncated header"));
    }
    // Bytes 5..13 are the uncompressed size, or all ones if unknown.
    let size = u64::from_le_bytes(le_array(&payload[5..]));
    if size != u64::MAX {
        // lzma-rs stops at the known size and ignores what follows.
        if size > limit.saturating_sub(out.len()) as u64 {
            return Err(PayloadError::TooLarge { limit });
        }
        return unlzma_exact(payload, out, limit);
    }
    // Size unknown, as in the kernel's `lzma -9` output. lzma-rs rejects
    // data after the end marker, so cut off the 4-byte size trailer that
    // the kernel build appends; the trailer must then match the output, as
    // it also accepts data without an end marker cut off at a lucky place.
    let (data, trailer) = payload.split_at(payload.len() - 4);
    if data.len() < HEADER_LEN {
        return Err(corrupt(format, "truncated header"));
    }
    let start = out.len();
    unlzma_exact(data, out, limit)?;
    if u32::from_le_bytes(le_array(trailer)) != (out.len() - start) as u32 {
        return Err(corrupt(format, "size trailer does not match the data"));
    }
    Ok(())
}

/// Decodes `.lzma` data that must end exactly at the end of `payload`.
fn unlzma_exact(payload: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), PayloadError> {
    let options = lzma_rs::decompress::Options {
        memlimit: Some(limit),
        ..Default::default()
    };
    let mut writer = CappedWriter {
        out,
        limit,
        overflowed: false,
    };
    let result = lzma_rs::lzma_decompress_with_options(&mut &payload[..], &mut writer, &options);
    match result {
        Ok(()) => Ok(()),
        Err(_) if writer.overflowed => Err(PayloadError::TooLarge { limit }),
        // The dictionary holds output not yet written out; it outgrowing
        // `memlimit` (our `limit`) means the output did too. lzma-rs 0.3 has
        // no error variant for this, only the message.
        Err(lzma_rs::error::Error::LzmaError(msg)) if msg.starts_with("exceeded memory limit") => {
            Err(PayloadError::TooLarge { limit })
        }
        Err(e) => Err(corrupt(Compression::Lzma, e)),
    }
}

/// Decodes the lz4 "legacy" frame format that the kernel build writes with
/// `lz4 -l`: a magic number, then blocks of a 32-bit little-endian compressed
/// length followed by an lz4 block of at most 8 MiB uncompressed. The format
/// has no end marker or checksum, so the kernel build's 4-byte size trailer
/// is required: it marks the end and catches a stream cut at a block boundary.
fn unlz4_legacy(payload: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), PayloadError> {
    const MAGIC: u32 = 0x184c_2102;
    const MAX_BLOCK: usize = 8 << 20;
    // LZ4_COMPRESSBOUND(8 MiB): the largest a valid legacy block can be.
    const MAX_COMPRESSED: usize = MAX_BLOCK + MAX_BLOCK / 255 + 16;
    let format = Compression::Lz4;
    let first = out.len();
    let mut rest = payload;
    loop {
        if rest.len() < 4 {
            return Err(corrupt(format, "truncated data or missing size trailer"));
        }
        let word = u32::from_le_bytes(le_array(rest));
        rest = &rest[4..];
        if word == MAGIC {
            continue; // start of (another) legacy stream
        }
        if rest.is_empty() {
            // The last 4 bytes: the size trailer.
            if word != (out.len() - first) as u32 {
                return Err(corrupt(format, "size trailer does not match the data"));
            }
            return Ok(());
        }
        let len = word as usize;
        if len == 0 || len > MAX_COMPRESSED {
            return Err(corrupt(format, format!("bad block length {len}")));
        }
        let block = rest
            .get(..len)
            .ok_or_else(|| corrupt(format, "truncated block"))?;
        rest = &rest[len..];
        let start = out.len();
        let room = limit.saturating_sub(start).min(MAX_BLOCK);
        out.resize(start + room, 0);
        match lz4_flex::block::decompress_into(block, &mut out[start..]) {
            Ok(n) => out.truncate(start + n),
            Err(lz4_flex::block::DecompressError::OutputTooSmall { .. }) if room < MAX_BLOCK => {
                return Err(PayloadError::TooLarge { limit });
            }
            Err(e) => return Err(corrupt(format, e)),
        }
    }
}

/// A decoder for the `.xz` container as the kernel build writes it: LZMA2
/// data, optionally behind the x86 BCJ filter (`xz --x86 --lzma2`).
///
/// lzma-rs 0.3 decodes LZMA2 but its `.xz` reader rejects every filter other
/// than LZMA2, so this parses the container itself, hands each block's LZMA2
/// data to lzma-rs and undoes the BCJ filter afterwards.
mod xz {
    use super::{corrupt, le_array, Compression, PayloadError};

    const FORMAT: Compression = Compression::Xz;
    pub(super) const MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0x00];
    const FOOTER_MAGIC: [u8; 2] = *b"YZ";
    const FILTER_X86: u64 = 0x04;
    const FILTER_LZMA2: u64 = 0x21;

    fn err(reason: impl std::fmt::Display) -> PayloadError {
        corrupt(FORMAT, reason)
    }

    /// Bounds-checked reading from the compressed data.
    struct Input<'a> {
        data: &'a [u8],
        pos: usize,
    }

    impl<'a> Input<'a> {
        fn take(&mut self, len: usize) -> Result<&'a [u8], PayloadError> {
            let bytes = self
                .data
                .get(self.pos..)
                .and_then(|rest| rest.get(..len))
                .ok_or_else(|| err("unexpected end of data"))?;
            self.pos += len;
            Ok(bytes)
        }

        fn byte(&mut self) -> Result<u8, PayloadError> {
            Ok(self.take(1)?[0])
        }

        fn u32_le(&mut self) -> Result<u32, PayloadError> {
            Ok(u32::from_le_bytes(le_array(self.take(4)?)))
        }

        /// A variable-length integer: 7 bits a byte, at most 9 bytes.
        fn varint(&mut self) -> Result<u64, PayloadError> {
            let mut value = 0u64;
            for i in 0..9 {
                let byte = self.byte()?;
                value |= u64::from(byte & 0x7f) << (7 * i);
                if byte & 0x80 == 0 {
                    if i > 0 && byte == 0 {
                        return Err(err("non-minimal integer encoding"));
                    }
                    return Ok(value);
                }
            }
            Err(err("integer too long"))
        }

        /// Skips zero bytes up to the next multiple of 4 from `start`.
        fn padding(&mut self, start: usize) -> Result<(), PayloadError> {
            let len = (4 - (self.pos - start) % 4) % 4;
            if self.take(len)?.iter().any(|&b| b != 0) {
                return Err(err("non-zero padding"));
            }
            Ok(())
        }

        fn rest(&self) -> &'a [u8] {
            &self.data[self.pos.min(self.data.len())..]
        }
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        crc.sum()
    }

    /// CRC-64/XZ (ECMA-182 polynomial, reflected), table-driven.
    fn crc64(data: &[u8]) -> u64 {
        const TABLE: [u64; 256] = {
            let mut table = [0u64; 256];
            let mut i = 0;
            while i < 256 {
                let mut crc = i as u64;
                let mut bit = 0;
                while bit < 8 {
                    crc = if crc & 1 != 0 {
                        (crc >> 1) ^ 0xc96c_5795_d787_0f42
                    } else {
                        crc >> 1
                    };
                    bit += 1;
                }
                table[i] = crc;
                i += 1;
            }
            table
        };
        !data.iter().fold(!0u64, |crc, &b| {
            TABLE[usize::from(crc as u8 ^ b)] ^ (crc >> 8)
        })
    }

    /// Size of the block check field for each check type (xz spec 2.1.1.2).
    fn check_size(check: u8) -> usize {
        match check {
            0 => 0,
            1..=3 => 4,
            4..=6 => 8,
            7..=9 => 16,
            10..=12 => 32,
            _ => 64,
        }
    }

    /// Decompresses all `.xz` streams at the start of `data` into `out`.
    pub(super) fn decompress(
        data: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), PayloadError> {
        let mut input = Input { data, pos: 0 };
        loop {
            stream(&mut input, out, limit)?;
            // Stream padding (zero words) may separate concatenated streams;
            // anything else after a stream is the kernel's size trailer.
            while input.rest().len() >= 4 && input.rest()[..4] == [0; 4] {
                input.pos += 4;
            }
            if !input.rest().starts_with(&MAGIC) {
                return Ok(());
            }
        }
    }

    fn stream(input: &mut Input<'_>, out: &mut Vec<u8>, limit: usize) -> Result<(), PayloadError> {
        if input.take(6)? != MAGIC {
            return Err(err("bad stream header magic"));
        }
        let flags = input.take(2)?;
        if input.u32_le()? != crc32(flags) {
            return Err(err("stream header crc mismatch"));
        }
        if flags[0] != 0 || flags[1] & 0xf0 != 0 {
            return Err(err("unsupported stream flags"));
        }
        let check = flags[1];

        // (unpadded size, uncompressed size) of each block, for the index.
        let mut records = Vec::new();
        loop {
            let block_start = input.pos;
            let header_size = input.byte()?;
            if header_size == 0 {
                break; // the index indicator
            }
            let out_start = out.len();
            let uncompressed = block(input, header_size, out, limit)?;
            let unpadded = input.pos - block_start + check_size(check);
            input.padding(block_start)?;
            let stored = input.take(check_size(check))?;
            verify_check(check, stored, &out[out_start..])?;
            records.push((unpadded as u64, uncompressed));
        }

        // Index: indicator (read above), record count, records, padding, CRC32.
        let index_start = input.pos - 1;
        if input.varint()? != records.len() as u64 {
            return Err(err("index does not match the blocks"));
        }
        for &(unpadded, uncompressed) in &records {
            if input.varint()? != unpadded || input.varint()? != uncompressed {
                return Err(err("index does not match the blocks"));
            }
        }
        input.padding(index_start)?;
        let index = &input.data[index_start..input.pos];
        if input.u32_le()? != crc32(index) {
            return Err(err("index crc mismatch"));
        }
        let index_size = (input.pos - index_start) as u64;

        // Footer: CRC32, backward size, the header's flags again, magic.
        let footer_crc = input.u32_le()?;
        let backward = input.take(6)?;
        if footer_crc != crc32(backward) {
            return Err(err("stream footer crc mismatch"));
        }
        if input.take(2)? != FOOTER_MAGIC {
            return Err(err("bad stream footer magic"));
        }
        let backward_size = (u64::from(u32::from_le_bytes(le_array(backward))) + 1) * 4;
        if backward[4..] != *flags || backward_size != index_size {
            return Err(err("stream footer does not match the stream"));
        }
        Ok(())
    }

    fn verify_check(check: u8, stored: &[u8], data: &[u8]) -> Result<(), PayloadError> {
        let ok = match check {
            1 => u32::from_le_bytes(le_array(stored)) == crc32(data),
            4 => u64::from_le_bytes(le_array(stored)) == crc64(data),
            // None, or a check (SHA-256 or reserved) left unverified.
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err(err("block check mismatch"))
        }
    }

    /// Decodes one block, whose header size byte has just been read, up to
    /// the end of its compressed data; returns its uncompressed size.
    fn block(
        input: &mut Input<'_>,
        header_size_byte: u8,
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<u64, PayloadError> {
        let header_start = input.pos - 1;
        let header_len = (usize::from(header_size_byte) + 1) * 4;
        input.take(header_len - 1)?;
        let (header, stored_crc) = input.data[header_start..input.pos].split_at(header_len - 4);
        if u32::from_le_bytes(le_array(stored_crc)) != crc32(header) {
            return Err(err("block header crc mismatch"));
        }

        let mut fields = Input {
            data: header,
            pos: 2,
        };
        let flags = header[1];
        if flags & 0x3c != 0 {
            return Err(err("unsupported block flags"));
        }
        let compressed_size = (flags & 0x40 != 0).then(|| fields.varint()).transpose()?;
        let uncompressed_size = (flags & 0x80 != 0).then(|| fields.varint()).transpose()?;
        let mut filters = Vec::new();
        for _ in 0..=(flags & 0x03) {
            let id = fields.varint()?;
            let props_len =
                usize::try_from(fields.varint()?).map_err(|_| err("bad filter properties"))?;
            filters.push((id, fields.take(props_len)?));
        }
        if fields.rest().iter().any(|&b| b != 0) {
            return Err(err("non-zero block header padding"));
        }

        // The chain must be any x86 BCJ filters followed by LZMA2.
        let Some((&(last_id, last_props), bcj)) = filters.split_last() else {
            return Err(err("block has no filters"));
        };
        if last_id != FILTER_LZMA2 || last_props.len() != 1 || last_props[0] > 40 {
            return Err(unsupported_filter(last_id));
        }
        let mut bcj_starts = Vec::new();
        for &(id, props) in bcj {
            match (id, props.len()) {
                (FILTER_X86, 0) => bcj_starts.push(0),
                (FILTER_X86, 4) => bcj_starts.push(u32::from_le_bytes(le_array(props))),
                (FILTER_X86, _) => return Err(err("bad x86 filter properties")),
                _ => return Err(unsupported_filter(id)),
            }
        }

        // Find the LZMA2 data's extent and output size from its chunk
        // headers before decoding, so that the output can be bounded.
        let (lzma2_len, unpacked) = scan_lzma2(input.rest())?;
        if compressed_size.is_some_and(|size| size != lzma2_len as u64)
            || uncompressed_size.is_some_and(|size| size != unpacked)
        {
            return Err(err("block sizes do not match its header"));
        }
        if unpacked > limit.saturating_sub(out.len()) as u64 {
            return Err(PayloadError::TooLarge { limit });
        }
        let mut lzma2 = input.take(lzma2_len)?;
        let start = out.len();
        lzma_rs::lzma2_decompress(&mut lzma2, out).map_err(err)?;
        if (out.len() - start) as u64 != unpacked {
            return Err(err("lzma2 data decoded to the wrong size"));
        }
        for &bcj_start in bcj_starts.iter().rev() {
            bcj_x86(&mut out[start..], bcj_start, false);
        }
        Ok(unpacked)
    }

    fn unsupported_filter(id: u64) -> PayloadError {
        err(format!(
            "unsupported filter {id:#x} (only x86 bcj and lzma2)"
        ))
    }

    /// Walks the LZMA2 chunk headers at the start of `data`; returns the
    /// length of the LZMA2 data including its end marker, and its
    /// uncompressed size.
    fn scan_lzma2(data: &[u8]) -> Result<(usize, u64), PayloadError> {
        let truncated = || err("truncated lzma2 data");
        let be16 = |at: usize| -> Result<usize, PayloadError> {
            let bytes = data.get(at..at + 2).ok_or_else(truncated)?;
            Ok(usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
        };
        let mut pos = 0;
        let mut total = 0u64;
        loop {
            let control = *data.get(pos).ok_or_else(truncated)?;
            match control {
                0x00 => return Ok((pos + 1, total)),
                // Uncompressed chunk: size - 1, then the data.
                0x01 | 0x02 => {
                    let size = be16(pos + 1)? + 1;
                    pos += 3 + size;
                    total += size as u64;
                }
                0x03..=0x7f => return Err(err(format!("invalid lzma2 control byte {control:#x}"))),
                // LZMA chunk: unpacked size - 1 (21 bits), packed size - 1,
                // a properties byte if the state is reset, then the data.
                _ => {
                    let unpacked = (usize::from(control & 0x1f) << 16 | be16(pos + 1)?) + 1;
                    let packed = be16(pos + 3)? + 1;
                    let props = usize::from(control >= 0xc0);
                    pos += 5 + props + packed;
                    total += unpacked as u64;
                }
            }
            if pos > data.len() {
                return Err(truncated());
            }
        }
    }

    /// Undoes (or, with `encode`, applies) the x86 BCJ filter over `buf`, a
    /// whole block whose first byte is at uncompressed position `start`.
    ///
    /// The filter rewrites the 32-bit relative targets of `call` (E8) and
    /// `jmp` (E9) instructions into absolute addresses, which compress
    /// better. A candidate is converted only if its operand's top byte is
    /// 0x00 or 0xff (a plausible nearby target); `mask` records which of the
    /// previous three bytes were unconverted candidates, to avoid treating an
    /// E8/E9 inside another candidate's operand as an instruction. Converted
    /// operands again have a top byte of 0x00 or 0xff, so both directions
    /// see the same candidates and the same walk serves both. The last four
    /// bytes are never converted: a candidate there has no whole operand.
    pub(super) fn bcj_x86(buf: &mut [u8], start: u32, encode: bool) {
        // Indexed by mask: whether a candidate may be converted, and which
        // operand byte (counted from the top) to test.
        const ALLOWED: [bool; 8] = [true, true, true, false, true, false, false, false];
        const BYTE_FROM_TOP: [usize; 8] = [0, 1, 2, 2, 3, 3, 3, 3];
        let top_byte_ok = |b: u8| b == 0x00 || b == 0xff;

        let end = buf.len().saturating_sub(4);
        let mut mask = 0usize;
        let mut prev_candidate: Option<usize> = None;
        let mut i = 0;
        while i < end {
            if buf[i] & 0xfe != 0xe8 {
                i += 1;
                continue;
            }
            let distance = prev_candidate.map_or(usize::MAX, |prev| i - prev);
            prev_candidate = Some(i);
            if distance > 3 {
                mask = 0;
            } else {
                mask = (mask << (distance - 1)) & 7;
                if mask != 0 && (!ALLOWED[mask] || top_byte_ok(buf[i + 4 - BYTE_FROM_TOP[mask]])) {
                    mask = (mask << 1) | 1;
                    i += 1;
                    continue;
                }
            }
            if !top_byte_ok(buf[i + 4]) {
                mask = (mask << 1) | 1;
                i += 1;
                continue;
            }

            let operand = &mut buf[i + 1..i + 5];
            let pc = start.wrapping_add(i as u32).wrapping_add(5);
            let mut src = u32::from_le_bytes(le_array(operand));
            let mut dest;
            loop {
                dest = if encode {
                    src.wrapping_add(pc)
                } else {
                    src.wrapping_sub(pc)
                };
                if mask == 0 {
                    break;
                }
                let shift = 24 - 8 * BYTE_FROM_TOP[mask];
                if !top_byte_ok((dest >> shift) as u8) {
                    break;
                }
                src = dest ^ ((1u32 << (shift + 8)) - 1);
            }
            // Sign-extend from bit 24, so the top byte is 0x00 or 0xff again.
            dest &= 0x01ff_ffff;
            if dest & 0x0100_0000 != 0 {
                dest |= 0xff00_0000;
            }
            operand.copy_from_slice(&dest.to_le_bytes());
            i += 5;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small fake ELF image: an ELF identification followed by x86-like
    /// code with `call`/`jmp` instructions to a few fixed targets (what the
    /// BCJ filter is for) and some zero runs. Prefixes are stable: the
    /// first `n` bytes of `fake_elf(m)` are `fake_elf(n)` for `n <= m`.
    pub(super) fn fake_elf(len: usize) -> Vec<u8> {
        const TARGETS: [u32; 4] = [0x0100, 0x0480, 0x0900, 0x2000];
        let mut v = b"\x7fELF\x02\x01\x01\x00".to_vec();
        let mut x: u32 = 0x1234_5678;
        while v.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            match (x >> 16) % 5 {
                0 | 1 => {
                    let target = TARGETS[((x >> 20) % 4) as usize];
                    let rel = target.wrapping_sub(v.len() as u32 + 5);
                    v.push(if x & 0x100 != 0 { 0xe8 } else { 0xe9 });
                    v.extend_from_slice(&rel.to_le_bytes());
                }
                2 => v.extend_from_slice(&[0x48, 0x89, 0xe5, 0x5d, 0xc3]),
                3 => v.extend_from_slice(&[0x48, 0x8b, 0x47, (x >> 24) as u8 & 0x38]),
                _ => v.extend_from_slice(&[0; 6]),
            }
        }
        v.truncate(len);
        v
    }

    /// `fake_elf(1024)` compressed by `xz --x86 --lzma2=preset=9e --check=crc32`
    /// (xz-utils 5.4.1): BCJ filter plus LZMA2 chunks.
    const XZ_X86_FAKE_ELF: [u8; 332] = [
        0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00, 0x01, 0x69, 0x22, 0xde, 0x36, 0x02, 0x01, 0x04,
        0x00, 0x21, 0x01, 0x1c, 0x00, 0x87, 0x6e, 0xda, 0xe5, 0xe0, 0x03, 0xff, 0x01, 0x0e, 0x5d,
        0x00, 0x3f, 0x91, 0x45, 0x84, 0x68, 0x3d, 0x89, 0xa6, 0xda, 0x48, 0x17, 0x24, 0x44, 0xeb,
        0x4d, 0x2b, 0x1f, 0x80, 0xf3, 0x8c, 0xcf, 0x8a, 0x5b, 0x4f, 0x10, 0x94, 0xcc, 0xbc, 0x1a,
        0x2c, 0x0b, 0xd7, 0x7c, 0x59, 0x8c, 0x74, 0x8e, 0xa2, 0xa0, 0xd6, 0x27, 0x1e, 0xd1, 0xee,
        0x87, 0x8c, 0xc2, 0xb1, 0xd0, 0x8a, 0x62, 0x7e, 0x74, 0x68, 0xba, 0x29, 0x90, 0x84, 0x5a,
        0xbf, 0xe8, 0xc7, 0x91, 0x55, 0x07, 0x7d, 0x14, 0xc3, 0x26, 0x16, 0x1d, 0x72, 0xaf, 0x2c,
        0xd2, 0x05, 0x9a, 0xc4, 0xa0, 0x8e, 0x3e, 0xaf, 0xa1, 0x74, 0xd7, 0xf2, 0xe4, 0xec, 0xbc,
        0x7b, 0x43, 0x0b, 0xed, 0x6f, 0x6c, 0xa3, 0x50, 0x5f, 0x1c, 0x32, 0x07, 0xc6, 0xe2, 0x10,
        0xd6, 0xc9, 0xcb, 0xed, 0x2a, 0xce, 0xe3, 0xed, 0xa8, 0xc3, 0xba, 0xa2, 0xda, 0x98, 0x54,
        0x18, 0xf7, 0x7d, 0x28, 0x8b, 0x56, 0xa3, 0x56, 0xc6, 0x5d, 0xf6, 0x37, 0x25, 0xe8, 0x2b,
        0x3b, 0xf1, 0xe8, 0x43, 0x81, 0xeb, 0xb0, 0xfc, 0x86, 0x24, 0xf2, 0x4e, 0x32, 0x2c, 0x5a,
        0x42, 0x35, 0xd2, 0x38, 0x28, 0xbe, 0xde, 0x34, 0x2a, 0xa0, 0xa8, 0xd4, 0x0b, 0x49, 0x1a,
        0x60, 0xac, 0x88, 0xeb, 0x2b, 0x54, 0x7d, 0x62, 0xe2, 0xcf, 0x15, 0x7c, 0x5e, 0x8f, 0x1a,
        0x1f, 0xc8, 0x0f, 0x17, 0x71, 0xa8, 0xc9, 0x7e, 0xd5, 0xd1, 0x5f, 0x7d, 0x77, 0x4e, 0xd1,
        0xbb, 0xc8, 0x57, 0x62, 0x0e, 0x98, 0xa1, 0xcc, 0x17, 0xdd, 0x34, 0xae, 0xa1, 0x13, 0xb4,
        0xe5, 0xe6, 0xd6, 0x25, 0x1f, 0xd8, 0xba, 0xbb, 0xf0, 0x3a, 0xf2, 0xe8, 0xb8, 0x55, 0x2a,
        0x5d, 0x88, 0x4f, 0xc8, 0xe7, 0x1f, 0x12, 0xd8, 0x44, 0x3b, 0x51, 0x39, 0x0c, 0xcd, 0x4b,
        0x62, 0x81, 0x19, 0xf8, 0x15, 0xd5, 0xcc, 0x67, 0xea, 0x89, 0xdc, 0xc5, 0x02, 0xf0, 0x54,
        0x96, 0x8f, 0xb3, 0xbc, 0x14, 0x40, 0x85, 0xb3, 0x03, 0x24, 0x2a, 0xb7, 0x9d, 0x18, 0xfa,
        0x1c, 0x00, 0x00, 0x00, 0x4f, 0xd5, 0x98, 0x13, 0x00, 0x01, 0xa6, 0x02, 0x80, 0x08, 0x00,
        0x00, 0xcd, 0x92, 0x9a, 0x95, 0x3e, 0x30, 0x0d, 0x8b, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01,
        0x59, 0x5a,
    ];

    /// `fake_elf(1024)` piped through `zstd -22 --ultra` (zstd 1.5.4), as the
    /// kernel build does: a frame declaring a 128 MiB window, with checksum.
    const ZSTD_ULTRA_FAKE_ELF: [u8; 473] = [
        0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x88, 0x65, 0x0e, 0x00, 0xe6, 0xd1, 0x3e, 0x2b, 0x30, 0x59,
        0x63, 0xa7, 0xe9, 0x29, 0xe6, 0x5f, 0x2b, 0x67, 0x89, 0xce, 0x71, 0xe2, 0xe0, 0xb3, 0x82,
        0x3e, 0xb1, 0x62, 0xcd, 0xa1, 0x73, 0x40, 0xb1, 0xc9, 0x3e, 0x69, 0x09, 0x09, 0x7a, 0x35,
        0xd5, 0x38, 0x6d, 0x39, 0xf0, 0xf9, 0xac, 0xee, 0xbd, 0x77, 0x0a, 0x31, 0x00, 0x33, 0x00,
        0x35, 0x00, 0x2c, 0xf9, 0xb5, 0xff, 0x47, 0xec, 0x86, 0xdb, 0xbf, 0xac, 0xd3, 0x90, 0x4d,
        0xc8, 0x26, 0x12, 0xea, 0xd8, 0xa3, 0xff, 0xc7, 0x51, 0xff, 0x57, 0xea, 0xff, 0xce, 0xfd,
        0xa8, 0xfe, 0x65, 0xa9, 0xfe, 0x63, 0xd5, 0xfe, 0xe3, 0xd5, 0x36, 0xa6, 0xaa, 0x35, 0xd1,
        0x5d, 0xf7, 0x05, 0x91, 0x3e, 0xb3, 0xff, 0x4b, 0xdc, 0xbf, 0xa0, 0xa3, 0x2f, 0x2b, 0xdd,
        0x7a, 0xe9, 0xd8, 0xfe, 0x1d, 0xb4, 0x79, 0x9e, 0x7f, 0x14, 0x83, 0x49, 0xff, 0x8e, 0xe8,
        0x05, 0x59, 0x4d, 0x79, 0xc4, 0x05, 0xfd, 0xcb, 0x87, 0xfd, 0x5f, 0x21, 0x4b, 0xf6, 0xa6,
        0xb2, 0xff, 0x63, 0x34, 0x5c, 0xdc, 0x97, 0x65, 0x02, 0x86, 0xa5, 0x01, 0x77, 0x73, 0x8e,
        0x1d, 0xd1, 0x94, 0x06, 0x66, 0x88, 0xd4, 0x9b, 0xd2, 0xfe, 0xdd, 0xe7, 0xef, 0x4e, 0x37,
        0x6c, 0x07, 0xb4, 0xac, 0xdb, 0x7f, 0x60, 0xb7, 0x27, 0x7f, 0x39, 0x49, 0xdd, 0xdc, 0xef,
        0x69, 0xcf, 0xf3, 0x96, 0xba, 0xff, 0xc6, 0xd6, 0x8d, 0xeb, 0x2b, 0x83, 0xe5, 0x81, 0x7e,
        0x68, 0x87, 0x25, 0xb3, 0x03, 0xfb, 0x07, 0xb8, 0x86, 0xfd, 0x33, 0x10, 0xfa, 0x97, 0x0d,
        0x70, 0x43, 0x34, 0x9c, 0x33, 0xff, 0x43, 0x35, 0x4a, 0xff, 0x97, 0x6e, 0x19, 0xfb, 0xbb,
        0x0b, 0x5e, 0x4f, 0xff, 0x00, 0xdf, 0x0e, 0xba, 0x23, 0x7d, 0x06, 0x54, 0x6b, 0xa9, 0x1a,
        0x60, 0x75, 0x6d, 0xed, 0x16, 0xde, 0x04, 0xfd, 0x65, 0xa8, 0xe1, 0x3c, 0xaf, 0x6a, 0xa8,
        0x14, 0xa4, 0x30, 0x8d, 0x01, 0x50, 0xc6, 0x0c, 0x9d, 0x9d, 0x03, 0x30, 0xcc, 0x9c, 0xa1,
        0xa1, 0x49, 0xa5, 0x03, 0x88, 0x2a, 0x5c, 0x29, 0x24, 0x1e, 0x73, 0x40, 0x03, 0x62, 0x82,
        0x5c, 0x88, 0x18, 0xb5, 0x97, 0xb0, 0x27, 0x40, 0x91, 0x29, 0xe8, 0x97, 0x29, 0x80, 0x53,
        0x92, 0x91, 0x5d, 0xde, 0x5e, 0x63, 0x03, 0xf4, 0x48, 0x3c, 0x00, 0xe6, 0x24, 0x2e, 0xdc,
        0xe1, 0x97, 0x45, 0xed, 0xc2, 0xca, 0xa3, 0x34, 0xb5, 0x87, 0x9b, 0x45, 0xd8, 0xe1, 0xf2,
        0x7c, 0xfe, 0xbe, 0x89, 0xa0, 0x07, 0x70, 0x67, 0xba, 0xa7, 0x40, 0x6c, 0xeb, 0x42, 0xb2,
        0xd0, 0xd9, 0x97, 0x64, 0x23, 0x71, 0x21, 0x0d, 0x5b, 0x96, 0x94, 0x17, 0x44, 0xe1, 0xe2,
        0xed, 0x69, 0x08, 0xe5, 0xef, 0x44, 0xe7, 0xcf, 0xa8, 0x96, 0xa5, 0x24, 0xe7, 0x32, 0x4f,
        0xe4, 0x84, 0x30, 0x6a, 0x16, 0x17, 0xf6, 0xe5, 0xf7, 0xe0, 0xf1, 0xf5, 0xe2, 0x85, 0xbd,
        0xcf, 0x9d, 0x16, 0x25, 0xe4, 0x90, 0xda, 0x06, 0x17, 0xad, 0x51, 0x05, 0x44, 0xc9, 0xbb,
        0x42, 0xfe, 0x83, 0xdb, 0x3b, 0x61, 0x49, 0x0b, 0x40, 0x29, 0x5b, 0xec, 0xee, 0x20, 0xa4,
        0x80, 0xb0, 0x07, 0x10, 0xf1, 0x88, 0x1b, 0x72, 0xa8, 0xd8, 0x00, 0x37, 0xab, 0xc4, 0xb6,
        0x22, 0x60, 0xe3, 0x30, 0xee, 0x99, 0x02, 0xd1, 0xcf, 0xd0, 0x0a, 0x48, 0xd9, 0xac, 0x52,
        0x8d, 0xab, 0x07, 0xfc, 0x50, 0xec, 0xb2, 0xff,
    ];

    /// Builds a bzImage around `payload`: a setup header declaring
    /// `setup_sects` and `version`, then protected-mode code with a stub
    /// before and after the payload.
    fn bzimage_with(setup_sects: u8, version: u16, payload: &[u8]) -> Vec<u8> {
        const STUB: usize = 0x80;
        let sects = if setup_sects == 0 { 4 } else { setup_sects };
        let pm = (usize::from(sects) + 1) * 512;
        let mut image = vec![0xcc; pm + STUB];
        image[..pm].fill(0);
        image[0x1f1] = setup_sects;
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        image[0x211] = 0x01; // LOADED_HIGH
        image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        image[0x230..0x234].copy_from_slice(&0x0020_0000u32.to_le_bytes());
        image[0x234] = 1;
        image[0x236..0x238].copy_from_slice(&0x007fu16.to_le_bytes());
        image[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&(STUB as u32).to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image[0x258..0x260].copy_from_slice(&0x0100_0000u64.to_le_bytes());
        image[0x260..0x264].copy_from_slice(&0x0200_0000u32.to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0xcc; 0x40]);
        image
    }

    fn bzimage(payload: &[u8]) -> Vec<u8> {
        bzimage_with(0, 0x020f, payload)
    }

    /// Appends the 4-byte little-endian size trailer the kernel build adds.
    fn with_trailer(mut data: Vec<u8>, size: usize) -> Vec<u8> {
        data.extend_from_slice(&(size as u32).to_le_bytes());
        data
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    fn lzma(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        lzma_rs::lzma_compress(&mut &data[..], &mut out).unwrap();
        out
    }

    /// lz4 legacy frames, as `lz4 -l` writes them, with `block`-byte blocks.
    fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = 0x184c_2102u32.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let compressed = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            out.extend_from_slice(&compressed);
        }
        out
    }

    fn varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push(value as u8 | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn pad4(out: &mut Vec<u8>, from: usize) {
        while (out.len() - from) % 4 != 0 {
            out.push(0);
        }
    }

    fn crc32(data: &[u8]) -> [u8; 4] {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        crc.sum().to_le_bytes()
    }

    /// A single-block `.xz` stream with a CRC32 check, whose filter chain is
    /// the x86 BCJ filter (if `bcj`, with start offset `bcj_start`) then
    /// LZMA2. lzma-rs's encoder only writes uncompressed LZMA2 chunks, which
    /// is enough to exercise the container and filter code.
    fn xz(data: &[u8], bcj: Option<u32>) -> Vec<u8> {
        let mut out = xz::MAGIC.to_vec();
        let flags = [0x00, 0x01];
        out.extend_from_slice(&flags);
        out.extend_from_slice(&crc32(&flags));

        let block_start = out.len();
        let mut header = vec![0, if bcj.is_some() { 0x01 } else { 0x00 }];
        match bcj {
            Some(0) => header.extend_from_slice(&[0x04, 0x00]),
            Some(start) => {
                header.extend_from_slice(&[0x04, 0x04]);
                header.extend_from_slice(&start.to_le_bytes());
            }
            None => {}
        }
        header.extend_from_slice(&[0x21, 0x01, 0x16]);
        pad4(&mut header, 0);
        header[0] = (header.len() / 4) as u8; // (len + 4) / 4 - 1
        let header_crc = crc32(&header);
        out.extend_from_slice(&header);
        out.extend_from_slice(&header_crc);

        let mut filtered = data.to_vec();
        if let Some(start) = bcj {
            xz::bcj_x86(&mut filtered, start, true);
        }
        lzma_rs::lzma2_compress(&mut &filtered[..], &mut out).unwrap();
        let unpadded = out.len() - block_start + 4;
        pad4(&mut out, block_start);
        out.extend_from_slice(&crc32(data));

        let index_start = out.len();
        out.push(0);
        varint(&mut out, 1);
        varint(&mut out, unpadded as u64);
        varint(&mut out, data.len() as u64);
        pad4(&mut out, index_start);
        let index_crc = crc32(&out[index_start..]);
        out.extend_from_slice(&index_crc);
        let index_size = out.len() - index_start;

        let mut footer = ((index_size / 4 - 1) as u32).to_le_bytes().to_vec();
        footer.extend_from_slice(&flags);
        out.extend_from_slice(&crc32(&footer));
        out.extend_from_slice(&footer);
        out.extend_from_slice(b"YZ");
        out
    }

    /// One valid payload per supported format (each with the kernel's size
    /// trailer where the kernel build adds one) wrapping `elf`.
    fn payloads(elf: &[u8]) -> Vec<(Compression, Vec<u8>)> {
        vec![
            (Compression::Gzip, gzip(elf)),
            (Compression::Xz, with_trailer(xz(elf, Some(0)), elf.len())),
            (Compression::Zstd, with_trailer(zstd(elf), elf.len())),
            (Compression::Lzma, with_trailer(lzma(elf), elf.len())),
            (
                Compression::Lz4,
                with_trailer(lz4_legacy(elf, 1000), elf.len()),
            ),
        ]
    }

    #[test]
    fn detects_formats_by_magic() {
        let cases: [(&[u8], Option<Compression>); 9] = [
            (&[0x1f, 0x8b, 0x08], Some(Compression::Gzip)),
            (
                &[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00],
                Some(Compression::Xz),
            ),
            (&[0x28, 0xb5, 0x2f, 0xfd], Some(Compression::Zstd)),
            (&[0x5d, 0x00, 0x00, 0x80, 0x00], Some(Compression::Lzma)),
            (b"BZh91AY&SY", Some(Compression::Bzip2)),
            (&[0x02, 0x21, 0x4c, 0x18], Some(Compression::Lz4)),
            (&[0x89, 0x4c, 0x5a, 0x4f, 0x00], Some(Compression::Lzo)),
            (b"\x7fELF", None),
            (&[], None),
        ];
        for (data, expected) in cases {
            assert_eq!(Compression::detect(data), expected, "{data:02x?}");
        }
    }

    #[test]
    fn parses_setup_header() {
        let image = bzimage_with(0, 0x020f, b"payload");
        let header = SetupHeader::parse(&image).unwrap();
        assert_eq!(
            header,
            SetupHeader {
                setup_sects: 4,
                version: 0x020f,
                loadflags: 0x01,
                initrd_addr_max: 0x7fff_ffff,
                kernel_alignment: 0x0020_0000,
                relocatable_kernel: true,
                xloadflags: 0x007f,
                cmdline_size: 2048,
                payload_offset: 0x80,
                payload_length: 7,
                pref_address: 0x0100_0000,
                init_size: 0x0200_0000,
            }
        );
        assert_eq!(header.protected_mode_offset(), 5 * 512);
        assert_eq!(header.payload(&image).unwrap(), b"payload");

        let image = bzimage_with(29, 0x0208, b"xyz");
        let header = SetupHeader::parse(&image).unwrap();
        assert_eq!(header.setup_sects, 29);
        assert_eq!(header.protected_mode_offset(), 30 * 512);
        assert_eq!(header.payload(&image).unwrap(), b"xyz");
        // Fields added after 2.08 read as 0 on older protocols.
        assert_eq!(
            (header.xloadflags, header.pref_address, header.init_size),
            (0, 0, 0)
        );
    }

    #[test]
    fn rejects_bad_setup_headers() {
        let image = bzimage(&gzip(&fake_elf(64)));
        assert!(matches!(
            SetupHeader::parse(&image[..0x100]),
            Err(PayloadError::TooShort(0x100))
        ));
        assert!(matches!(
            SetupHeader::parse(&image[..0x210]),
            Err(PayloadError::TooShort(0x210))
        ));
        assert!(matches!(
            decompress_bzimage(&[]),
            Err(PayloadError::TooShort(0))
        ));

        let mut bad = image.clone();
        bad[0x202] = b'h';
        assert!(matches!(
            decompress_bzimage(&bad),
            Err(PayloadError::NotBzImage)
        ));
        assert!(matches!(
            decompress_bzimage(&fake_elf(4096)),
            Err(PayloadError::NotBzImage)
        ));

        let old = bzimage_with(0, 0x0207, b"x");
        let err = decompress_bzimage(&old).unwrap_err();
        assert!(matches!(err, PayloadError::ProtocolTooOld(0x0207)));
        assert_eq!(
            err.to_string(),
            "boot protocol 2.07 is too old: need 2.08 or later"
        );

        // Payload running past the end of the image, or empty.
        let cut = &image[..image.len() - 0x50];
        assert!(matches!(
            decompress_bzimage(cut),
            Err(PayloadError::PayloadOutOfBounds { .. })
        ));
        let mut huge = image.clone();
        huge[0x248..0x24c].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decompress_bzimage(&huge),
            Err(PayloadError::PayloadOutOfBounds { .. })
        ));
        let mut empty = image;
        empty[0x24c..0x250].fill(0);
        assert!(matches!(
            decompress_bzimage(&empty),
            Err(PayloadError::PayloadOutOfBounds { .. })
        ));
    }

    #[test]
    fn round_trips_every_supported_format() {
        let elf = fake_elf(30_000);
        for (format, payload) in payloads(&elf) {
            assert_eq!(Compression::detect(&payload), Some(format));
            let out =
                decompress_bzimage(&bzimage(&payload)).unwrap_or_else(|e| panic!("{format}: {e}"));
            assert!(out == elf, "{format}: output differs");
        }
    }

    #[test]
    fn round_trips_without_size_trailers() {
        let elf = fake_elf(20_000);
        for payload in [xz(&elf, Some(0)), zstd(&elf)] {
            assert_eq!(decompress_payload(&payload, 1 << 20).unwrap(), elf);
        }
        // Where the data may end without an end marker (legacy lz4, and
        // .lzma of unknown size), the trailer is needed to notice truncation.
        for (format, payload) in [
            (Compression::Lzma, lzma(&elf)),
            (Compression::Lz4, lz4_legacy(&elf, 3000)),
        ] {
            let err = decompress_payload(&payload, 1 << 20).unwrap_err();
            assert!(
                matches!(err, PayloadError::Corrupt { format: f, .. } if f == format),
                "{err}"
            );
        }
    }

    #[test]
    fn decodes_reference_xz_with_x86_bcj() {
        let elf = fake_elf(1024);
        let payload = with_trailer(XZ_X86_FAKE_ELF.to_vec(), elf.len());
        assert_eq!(decompress_bzimage(&bzimage(&payload)).unwrap(), elf);
    }

    #[test]
    fn decodes_reference_zstd_with_128_mib_window() {
        let elf = fake_elf(1024);
        // Window descriptor: exponent 17 + 10 = 27, i.e. 128 MiB.
        assert_eq!(ZSTD_ULTRA_FAKE_ELF[5], 0x88);
        let payload = with_trailer(ZSTD_ULTRA_FAKE_ELF.to_vec(), elf.len());
        assert_eq!(decompress_bzimage(&bzimage(&payload)).unwrap(), elf);
    }

    #[test]
    fn decodes_xz_variants() {
        let elf = fake_elf(10_000);
        // No BCJ filter, and BCJ with a non-zero start offset.
        for bcj in [None, Some(0x1234)] {
            assert_eq!(decompress_payload(&xz(&elf, bcj), 1 << 20).unwrap(), elf);
        }
        // Concatenated streams with stream padding between them.
        let mut two = xz(&elf, Some(0));
        two.extend_from_slice(&[0; 8]);
        two.extend_from_slice(&xz(b"tail", None));
        let mut expected = elf.clone();
        expected.extend_from_slice(b"tail");
        assert_eq!(decompress_payload(&two, 1 << 20).unwrap(), expected);
    }

    #[test]
    fn decodes_multiple_zstd_frames() {
        let elf = fake_elf(10_000);
        let mut payload = zstd(&elf[..4000]);
        // A skippable frame between the two halves.
        payload.extend_from_slice(&[0x5e, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        payload.extend_from_slice(&zstd(&elf[4000..]));
        let payload = with_trailer(payload, elf.len());
        assert_eq!(decompress_payload(&payload, 1 << 20).unwrap(), elf);
    }

    #[test]
    fn bcj_x86_round_trips() {
        let mut x: u32 = 1;
        let mut random: Vec<u8> = (0..20_000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                // Plenty of E8/E9 opcodes and 0x00/0xff operand bytes.
                [0xe8, 0xe9, 0x00, 0xff, (x >> 24) as u8][(x >> 16) as usize % 5]
            })
            .collect();
        for data in [fake_elf(20_000), std::mem::take(&mut random), vec![0xe8; 3]] {
            for start in [0, 1, 0x1234_5678, u32::MAX - 100] {
                let mut buf = data.clone();
                xz::bcj_x86(&mut buf, start, true);
                if data.len() > 100 {
                    assert_ne!(buf, data, "the filter should change x86 code");
                }
                xz::bcj_x86(&mut buf, start, false);
                assert!(buf == data, "round trip failed (start {start:#x})");
            }
        }
    }

    #[test]
    fn bcj_x86_makes_call_targets_absolute() {
        // A call at 0x10 to 0x1000: relative 0x1000 - 0x15 becomes absolute.
        let mut buf = vec![0x90; 0x20];
        buf[0x10] = 0xe8;
        buf[0x11..0x15].copy_from_slice(&(0x1000u32 - 0x15).to_le_bytes());
        xz::bcj_x86(&mut buf, 0, true);
        assert_eq!(buf[0x11..0x15], 0x1000u32.to_le_bytes());
        xz::bcj_x86(&mut buf, 0, false);
        assert_eq!(buf[0x11..0x15], (0x1000u32 - 0x15).to_le_bytes());
    }

    #[test]
    fn rejects_unsupported_formats() {
        let bzip2 = bzimage(b"BZh91AY&SY\x00\x00\x00\x00");
        let err = decompress_bzimage(&bzip2).unwrap_err();
        assert!(matches!(err, PayloadError::Unsupported(Compression::Bzip2)));
        assert_eq!(
            err.to_string(),
            "bzip2-compressed kernels are not supported; use an uncompressed vmlinux"
        );
        let lzo = bzimage(&[0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a]);
        let err = decompress_bzimage(&lzo).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lzo-compressed kernels are not supported; use an uncompressed vmlinux"
        );
        let err = decompress_bzimage(&bzimage(b"\x7fELF\x02\x01")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown payload compression (magic 7f 45 4c 46 02 01)"
        );
    }

    #[test]
    fn rejects_output_that_is_not_elf() {
        let text = b"this is not an elf file".repeat(100);
        for (format, payload) in payloads(&text) {
            let err = decompress_bzimage(&bzimage(&payload)).unwrap_err();
            assert!(matches!(err, PayloadError::NotElf), "{format}: {err}");
        }
    }

    #[test]
    fn enforces_the_size_limit() {
        let elf = fake_elf(100_000);
        for (format, payload) in payloads(&elf) {
            assert_eq!(
                decompress_payload(&payload, elf.len()).unwrap(),
                elf,
                "{format}"
            );
            for limit in [0, 1000, elf.len() - 1] {
                let err = decompress_payload(&payload, limit).unwrap_err();
                assert!(
                    matches!(err, PayloadError::TooLarge { limit: l } if l == limit),
                    "{format} (limit {limit}): {err}"
                );
            }
        }
        // lzma with the size in its header is refused before decoding.
        let mut out = Vec::new();
        let options = lzma_rs::compress::Options {
            unpacked_size: lzma_rs::compress::UnpackedSize::WriteToHeader(Some(elf.len() as u64)),
        };
        lzma_rs::lzma_compress_with_options(&mut &elf[..], &mut out, &options).unwrap();
        assert_eq!(decompress_payload(&out, 1 << 20).unwrap(), elf);
        assert!(matches!(
            decompress_payload(&out, 1000),
            Err(PayloadError::TooLarge { limit: 1000 })
        ));
    }

    #[test]
    fn rejects_truncated_payloads() {
        let elf = fake_elf(2500);
        // Without the (ignored) trailer where the format has an end of its
        // own, so that every prefix is a truncated stream.
        let cases = [
            (Compression::Gzip, gzip(&elf)),
            (Compression::Xz, xz(&elf, Some(0))),
            (Compression::Xz, XZ_X86_FAKE_ELF.to_vec()),
            (Compression::Zstd, zstd(&elf)),
            (Compression::Zstd, ZSTD_ULTRA_FAKE_ELF.to_vec()),
            (Compression::Lzma, with_trailer(lzma(&elf), elf.len())),
            (
                Compression::Lz4,
                with_trailer(lz4_legacy(&elf, 1000), elf.len()),
            ),
        ];
        for (format, payload) in cases {
            for len in 0..payload.len() {
                let result = decompress_payload(&payload[..len], 1 << 16);
                assert!(result.is_err(), "{format} cut to {len} bytes was accepted");
            }
        }
    }

    #[test]
    fn detects_corruption_in_checked_formats() {
        let elf = fake_elf(5000);
        for (format, payload) in payloads(&elf) {
            // A flipped byte in the middle of the data fails the format's
            // checksum (gzip, xz, zstd) or decoding; lzma has no checksum but
            // the kernel's ELF check may still catch it, so only the former
            // are checked strictly.
            let mut bad = payload.clone();
            let at = bad.len() / 2;
            bad[at] ^= 0x10;
            let result = decompress_payload(&bad, 1 << 20);
            if format != Compression::Lzma && format != Compression::Lz4 {
                assert!(result.is_err(), "{format}: corruption not detected");
            }
        }
    }

    /// Flips every byte of every format's payload in turn: whatever the
    /// decoders make of it, the result must be a value, never a panic.
    #[test]
    fn never_panics_on_corrupt_payloads() {
        let elf = fake_elf(2000);
        let mut cases = payloads(&elf);
        cases.push((Compression::Xz, XZ_X86_FAKE_ELF.to_vec()));
        cases.push((Compression::Zstd, ZSTD_ULTRA_FAKE_ELF.to_vec()));
        for (format, payload) in cases {
            for at in 0..payload.len() {
                for flip in [0x01, 0xff] {
                    let mut bad = payload.clone();
                    bad[at] ^= flip;
                    let result = std::panic::catch_unwind(|| decompress_payload(&bad, 1 << 14));
                    assert!(result.is_ok(), "{format}: panic with byte {at} ^ {flip:#x}");
                }
            }
        }
    }

    #[test]
    fn error_messages_name_the_format() {
        let elf = fake_elf(2000);
        let mut payload = xz(&elf, Some(0));
        let len = payload.len();
        payload[len - 20] ^= 0xff; // inside the index
        let err = decompress_payload(&payload, 1 << 20).unwrap_err();
        assert!(err.to_string().starts_with("corrupt xz payload: "), "{err}");
    }
}
