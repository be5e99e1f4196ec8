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
//! the kernel build always applies), legacy lzma, zstd and legacy lz4 (used
//! by Debian's kernels). bzip2 and lzo payloads are recognised and rejected
//! with a clear error. Output is capped at [`MAX_DECOMPRESSED_SIZE`] so a
//! corrupt image gives an error instead of exhausting memory.

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
    #[error("payload at offset {offset:#x} ({length} bytes) lies outside the {image_len}-byte image")]
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
/// Data after the compressed stream, such as the 4-byte little-endian size
/// that the kernel build appends to every payload format but gzip, is ignored.
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
            let mut decoder =
                ruzstd::decoding::StreamingDecoder::new(&mut rest).map_err(|e| corrupt(format, e))?;
            read_capped(&mut decoder, out, limit, format)?;
            let frame = decoder.into_frame_decoder();
            if !frame.is_finished() {
                return Err(corrupt(format, "frame ended early"));
            }
            if let (Some(stored), Some(computed)) =
                (frame.get_checksum_from_data(), frame.get_calculated_checksum())
            {
                if stored != computed {
                    return Err(corrupt(format, "content checksum mismatch"));
                }
            }
        } else if rest.len() >= 8 && rest[0] & 0xf0 == 0x50 && rest[1..4] == [0x2a, 0x4d, 0x18] {
            // Skippable frame: magic 0x184d2a5?, 32-bit length, data.
            let len = u32::from_le_bytes(le_array(&rest[4..])) as usize;
            rest = rest
                .get(8 + len..)
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
    // Bytes 5..13 are the uncompressed size, all ones when unknown (as in
    // the kernel's `lzma -9` output, which ends with an end marker instead).
    let size = u64::from_le_bytes(le_array(&payload[5..]));
    if size != u64::MAX && size > limit.saturating_sub(out.len()) as u64 {
        return Err(PayloadError::TooLarge { limit });
    }
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
    if writer.overflowed {
        return Err(PayloadError::TooLarge { limit });
    }
    result.map_err(|e| corrupt(format, e))
}

/// Decodes the lz4 "legacy" frame format that the kernel build writes with
/// `lz4 -l`: a magic number, then blocks of a 32-bit little-endian compressed
/// length followed by an lz4 block of at most 8 MiB uncompressed.
fn unlz4_legacy(payload: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), PayloadError> {
    const MAGIC: u32 = 0x184c_2102;
    const MAX_BLOCK: usize = 8 << 20;
    // LZ4_COMPRESSBOUND(8 MiB): the largest a valid legacy block can be.
    const MAX_COMPRESSED: usize = MAX_BLOCK + MAX_BLOCK / 255 + 16;
    let format = Compression::Lz4;
    let mut rest = payload;
    let mut blocks = 0usize;
    while rest.len() >= 4 {
        let word = u32::from_le_bytes(le_array(rest));
        rest = &rest[4..];
        if word == MAGIC {
            // Start of (another) legacy stream.
            continue;
        }
        if rest.is_empty() && blocks > 0 {
            // The last 4 bytes: the size trailer the kernel build appends.
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
        if start >= limit {
            return Err(PayloadError::TooLarge { limit });
        }
        out.resize(start + MAX_BLOCK, 0);
        let written = lz4_flex::block::decompress_into(block, &mut out[start..]);
        match written {
            Ok(n) => out.truncate(start + n),
            Err(e) => {
                out.truncate(start);
                return Err(corrupt(format, e));
            }
        }
        if out.len() > limit {
            return Err(PayloadError::TooLarge { limit });
        }
        blocks += 1;
    }
    if !rest.is_empty() || blocks == 0 {
        return Err(corrupt(format, "truncated stream"));
    }
    Ok(())
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
    const MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0x00];
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
        let compressed_size = (flags & 0x40 != 0)
            .then(|| fields.varint())
            .transpose()?;
        let uncompressed_size = (flags & 0x80 != 0)
            .then(|| fields.varint())
            .transpose()?;
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
        err(format!("unsupported filter {id:#x} (only x86 bcj and lzma2)"))
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
    /// E8/E9 inside another candidate's operand as an instruction. The
    /// decisions depend only on bytes the conversion leaves alone, so the
    /// same walk serves both directions. The last four bytes are never
    /// converted, as a candidate there lacks a complete operand.
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
                if mask != 0
                    && (!ALLOWED[mask] || top_byte_ok(buf[i + 4 - BYTE_FROM_TOP[mask]]))
                {
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
