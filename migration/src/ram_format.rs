//! Record encoding of QEMU's `ram` section, version 4 (`migration/ram.c`).
//!
//! RAM is hopvm's one live section. Its START / PART / END bodies are sequences of *records*,
//! each introduced by a be64 whose low 12 bits (below the page size) are flags and whose high
//! bits are a page offset inside a RAM block:
//!
//! | flag | value | payload after the be64 (and the block id) |
//! |---|---|---|
//! | `MEM_SIZE` | 0x04 | the be64's high bits are the total RAM size; then per block: u8 length + id, be64 size |
//! | `ZERO` | 0x02 | one fill byte (QEMU writes 0; a page filled with that byte) |
//! | `PAGE` | 0x08 | 4096 bytes of page data |
//! | `EOS` | 0x10 | nothing; ends each chunk (each section body) |
//! | `CONTINUE` | 0x20 | with ZERO / PAGE / XBZRLE: same block as the previous page record, so no block id follows; without it a u8-length block id follows the be64 |
//! | `XBZRLE` | 0x40 | u8 encoding (0x01), be16 length, the [`xbzrle`](crate::xbzrle) delta |
//!
//! Using QEMU's exact encoding keeps hopvm streams readable by `analyze-migration.py` (which
//! writes each RAM block out to a file with `-x`), and the record set is the minimal one a
//! pre-copy migration needs. The section must be registered with id string
//! [`RAM_SECTION_IDSTR`], instance 0 and version [`RAM_SECTION_VERSION`], which is the key the
//! script looks RAM up by.
//!
//! The "last block" that `CONTINUE` refers to is state that spans records *and* section parts
//! (QEMU keeps `last_sent_block` across iterations), so both [`RamRecordWriter`] and
//! [`RamRecordReader`] are created once per migration, not per chunk.
//!
//! Not supported (rejected as unknown flags): QEMU's `HOOK` (RDMA), compressed pages,
//! multifd, and the capability-dependent extra `MEM_SIZE` fields (postcopy page sizes,
//! `x-ignore-shared`, mapped-ram).

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::wire;
use crate::SectionOutput;

/// [`crate::stream::PAGE_SIZE`] as a length: the unit of RAM records.
pub const PAGE_SIZE: usize = crate::stream::PAGE_SIZE as usize;
/// Mask of the flag bits in a record's be64.
pub const FLAGS_MASK: u64 = PAGE_SIZE as u64 - 1;

/// A page filled with one byte.
pub const RAM_SAVE_FLAG_ZERO: u64 = 0x02;
/// The RAM block list.
pub const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
/// A full page.
pub const RAM_SAVE_FLAG_PAGE: u64 = 0x08;
/// End of a chunk.
pub const RAM_SAVE_FLAG_EOS: u64 = 0x10;
/// Same block as the previous page record.
pub const RAM_SAVE_FLAG_CONTINUE: u64 = 0x20;
/// An XBZRLE-encoded page.
pub const RAM_SAVE_FLAG_XBZRLE: u64 = 0x40;
/// The only XBZRLE encoding byte.
pub const ENCODING_FLAG_XBZRLE: u8 = 0x01;

/// Largest accepted XBZRLE payload. QEMU's loader rejects anything longer than a page
/// ("len overflow"), and an encoding that does not fit in a page is never worth sending, so
/// hopvm uses the same bound on both sides rather than adding slack QEMU would refuse.
pub const MAX_XBZRLE_LEN: usize = PAGE_SIZE;
/// Most RAM blocks a `MEM_SIZE` record may list.
pub const MAX_RAM_BLOCKS: usize = 1024;
/// The RAM section's id string.
pub const RAM_SECTION_IDSTR: &str = "ram";
/// The RAM section's version.
pub const RAM_SECTION_VERSION: u32 = 4;

/// Errors of RAM record encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum RamFormatError {
    /// The underlying reader or writer failed.
    #[error("i/o: {0}")]
    Io(#[source] io::Error),
    /// The stream ended inside a record.
    #[error("truncated ram record")]
    Truncated,
    /// A flag combination this reader does not accept.
    #[error("unknown ram flags {0:#x}")]
    UnknownFlags(u64),
    /// `CONTINUE` on the first page record.
    #[error("continue flag without a previous block")]
    ContinueWithoutBlock,
    /// A block id that is empty, longer than 255 bytes, or not UTF-8.
    #[error("invalid block id {0:?}")]
    BadBlockId(String),
    /// A page offset (or block size) that is not page-aligned.
    #[error("unaligned offset {0:#x}")]
    Unaligned(u64),
    /// The `MEM_SIZE` block list does not add up, or is too long.
    #[error("bad ram block list: {0}")]
    BadMemSize(String),
    /// An XBZRLE record with an unknown encoding byte.
    #[error("unknown xbzrle encoding {0:#x}")]
    BadEncoding(u8),
    /// An XBZRLE payload longer than [`MAX_XBZRLE_LEN`].
    #[error("xbzrle data too long: {0} bytes")]
    XbzrleTooLong(usize),
    /// A page whose data is not exactly [`PAGE_SIZE`] bytes.
    #[error("page data is {0} bytes")]
    BadPageLength(usize),
    /// An EOS record with address bits set.
    #[error("eos with non-zero address {0:#x}")]
    BadEos(u64),
}

impl From<io::Error> for RamFormatError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            RamFormatError::Truncated
        } else {
            RamFormatError::Io(e)
        }
    }
}

/// One RAM block in a `MEM_SIZE` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlockInfo {
    /// The block's id string (QEMU's are like `pc.ram`).
    pub id: String,
    /// The block's size in bytes; a multiple of [`PAGE_SIZE`].
    pub size: u64,
}

/// A decoded RAM record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamRecord {
    /// The list of RAM blocks (sent once, at the start).
    MemSize {
        /// The blocks, in stream order; their sizes add up to the record's total.
        blocks: Vec<RamBlockInfo>,
    },
    /// A page filled with `fill`.
    Zero {
        /// Block id.
        block: Arc<str>,
        /// Page offset inside the block.
        offset: u64,
        /// The fill byte (QEMU always sends 0; newer QEMU rejects anything else).
        fill: u8,
    },
    /// A full page.
    Page {
        /// Block id.
        block: Arc<str>,
        /// Page offset inside the block.
        offset: u64,
        /// [`PAGE_SIZE`] bytes.
        data: Vec<u8>,
    },
    /// An XBZRLE delta against the destination's current page.
    Xbzrle {
        /// Block id.
        block: Arc<str>,
        /// Page offset inside the block.
        offset: u64,
        /// The encoded delta, at most [`MAX_XBZRLE_LEN`] bytes; not yet validated.
        data: Vec<u8>,
    },
    /// End of the chunk.
    Eos,
}

/// What [`RamRecordReader::read_next`] read: a whole record, or the header of a `PAGE`
/// record whose data follows in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamItem {
    /// A record other than `PAGE`.
    Record(RamRecord),
    /// A `PAGE` record's header; [`PAGE_SIZE`] bytes of data follow.
    PageHeader {
        /// Block id.
        block: Arc<str>,
        /// Page offset inside the block.
        offset: u64,
    },
}

fn check_block_id(id: &str) -> Result<(), RamFormatError> {
    if id.is_empty() || id.len() > 255 {
        return Err(RamFormatError::BadBlockId(id.to_owned()));
    }
    Ok(())
}

fn check_aligned(offset: u64) -> Result<(), RamFormatError> {
    if offset & FLAGS_MASK != 0 {
        return Err(RamFormatError::Unaligned(offset));
    }
    Ok(())
}

/// Writes RAM records, remembering the last block for `CONTINUE`. Every method returns the
/// number of bytes it wrote.
#[derive(Debug, Default)]
pub struct RamRecordWriter {
    last_block: Option<String>,
}

impl RamRecordWriter {
    /// A writer with no previous block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the last block, so that the next page record names its block (QEMU resets
    /// `last_sent_block` when it restarts the RAM state).
    pub fn reset(&mut self) {
        self.last_block = None;
    }

    /// Writes the be64 header and, unless it is the same block as last time, the block id.
    fn page_header(
        &mut self,
        out: &mut dyn Write,
        block: &str,
        offset: u64,
        flag: u64,
    ) -> Result<usize, RamFormatError> {
        check_block_id(block)?;
        check_aligned(offset)?;
        let same = self.last_block.as_deref() == Some(block);
        // be64 + u8 length + id (at most 255 bytes): on the stack, no allocation per page.
        let mut hdr = [0u8; 8 + 1 + 255];
        let len = if same {
            hdr[..8].copy_from_slice(&(offset | flag | RAM_SAVE_FLAG_CONTINUE).to_be_bytes());
            8
        } else {
            hdr[..8].copy_from_slice(&(offset | flag).to_be_bytes());
            hdr[8] = block.len() as u8;
            hdr[9..9 + block.len()].copy_from_slice(block.as_bytes());
            9 + block.len()
        };
        out.write_all(&hdr[..len])?;
        if !same {
            self.last_block = Some(block.to_owned());
        }
        Ok(len)
    }

    /// Writes the `MEM_SIZE` record listing every RAM block.
    pub fn mem_size(
        &mut self,
        out: &mut dyn Write,
        blocks: &[RamBlockInfo],
    ) -> Result<usize, RamFormatError> {
        if blocks.len() > MAX_RAM_BLOCKS {
            return Err(RamFormatError::BadMemSize(format!(
                "{} blocks",
                blocks.len()
            )));
        }
        let mut total: u64 = 0;
        for b in blocks {
            check_block_id(&b.id)?;
            check_aligned(b.size)?;
            if b.size == 0 {
                return Err(RamFormatError::BadMemSize(format!("empty block {}", b.id)));
            }
            total = total
                .checked_add(b.size)
                .ok_or_else(|| RamFormatError::BadMemSize("total overflows".into()))?;
        }
        let mut rec = Vec::new();
        rec.extend_from_slice(&(total | RAM_SAVE_FLAG_MEM_SIZE).to_be_bytes());
        for b in blocks {
            wire::write_counted(&mut rec, b.id.as_bytes())?;
            rec.extend_from_slice(&b.size.to_be_bytes());
        }
        out.write_all(&rec)?;
        Ok(rec.len())
    }

    /// Writes a page filled with `fill` (QEMU's zero page: `fill` is 0).
    pub fn zero_page(
        &mut self,
        out: &mut dyn Write,
        block: &str,
        offset: u64,
        fill: u8,
    ) -> Result<usize, RamFormatError> {
        let n = self.page_header(out, block, offset, RAM_SAVE_FLAG_ZERO)?;
        out.write_all(&[fill])?;
        Ok(n + 1)
    }

    /// Writes a full page; `data` must be [`PAGE_SIZE`] bytes.
    pub fn page(
        &mut self,
        out: &mut dyn Write,
        block: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, RamFormatError> {
        if data.len() != PAGE_SIZE {
            return Err(RamFormatError::BadPageLength(data.len()));
        }
        let n = self.page_header(out, block, offset, RAM_SAVE_FLAG_PAGE)?;
        out.write_all(data)?;
        Ok(n + PAGE_SIZE)
    }

    /// Writes a full page that the output may send in place, straight from guest memory
    /// ([`SectionOutput::write_guest`]).
    ///
    /// # Safety
    /// `data` points to [`PAGE_SIZE`] bytes that satisfy `write_guest`'s contract.
    pub unsafe fn page_in_place(
        &mut self,
        out: &mut dyn SectionOutput,
        block: &str,
        offset: u64,
        data: *const u8,
    ) -> Result<usize, RamFormatError> {
        let n = self.page_header(out, block, offset, RAM_SAVE_FLAG_PAGE)?;
        // SAFETY: the caller's contract.
        unsafe { out.write_guest(data, PAGE_SIZE) }?;
        Ok(n + PAGE_SIZE)
    }

    /// Writes an XBZRLE-encoded page; `encoded` is at most [`MAX_XBZRLE_LEN`] bytes.
    pub fn xbzrle_page(
        &mut self,
        out: &mut dyn Write,
        block: &str,
        offset: u64,
        encoded: &[u8],
    ) -> Result<usize, RamFormatError> {
        if encoded.len() > MAX_XBZRLE_LEN {
            return Err(RamFormatError::XbzrleTooLong(encoded.len()));
        }
        let n = self.page_header(out, block, offset, RAM_SAVE_FLAG_XBZRLE)?;
        let mut hdr = [0u8; 3];
        hdr[0] = ENCODING_FLAG_XBZRLE;
        // MAX_XBZRLE_LEN fits in u16.
        hdr[1..].copy_from_slice(&(encoded.len() as u16).to_be_bytes());
        out.write_all(&hdr)?;
        out.write_all(encoded)?;
        Ok(n + 3 + encoded.len())
    }

    /// Ends the chunk.
    pub fn eos(&mut self, out: &mut dyn Write) -> Result<usize, RamFormatError> {
        out.write_all(&RAM_SAVE_FLAG_EOS.to_be_bytes())?;
        Ok(8)
    }
}

/// Reads RAM records, remembering the last block for `CONTINUE`.
#[derive(Debug, Default)]
pub struct RamRecordReader {
    last_block: Option<Arc<str>>,
}

impl RamRecordReader {
    /// A reader with no previous block.
    pub fn new() -> Self {
        Self::default()
    }

    fn block_id(input: &mut dyn Read) -> Result<String, RamFormatError> {
        let raw = wire::read_counted_bytes(input)?;
        let id = String::from_utf8(raw).map_err(|e| {
            RamFormatError::BadBlockId(String::from_utf8_lossy(e.as_bytes()).into())
        })?;
        check_block_id(&id)?;
        Ok(id)
    }

    fn block(&mut self, input: &mut dyn Read, flags: u64) -> Result<Arc<str>, RamFormatError> {
        if flags & RAM_SAVE_FLAG_CONTINUE != 0 {
            return self
                .last_block
                .clone()
                .ok_or(RamFormatError::ContinueWithoutBlock);
        }
        let id: Arc<str> = Self::block_id(input)?.into();
        self.last_block = Some(id.clone());
        Ok(id)
    }

    /// Reads the next record, validating flags, lengths and alignment.
    pub fn read_record(&mut self, input: &mut dyn Read) -> Result<RamRecord, RamFormatError> {
        match self.read_next(input)? {
            RamItem::Record(r) => Ok(r),
            RamItem::PageHeader { block, offset } => {
                let mut data = vec![0u8; PAGE_SIZE];
                input.read_exact(&mut data)?;
                Ok(RamRecord::Page {
                    block,
                    offset,
                    data,
                })
            }
        }
    }

    /// Like [`read_record`](Self::read_record), but a `PAGE` record stops after its header:
    /// the caller reads its [`PAGE_SIZE`] bytes of data from `input` straight to where they
    /// belong (guest memory), before reading anything else.
    pub fn read_next(&mut self, input: &mut dyn Read) -> Result<RamItem, RamFormatError> {
        let raw = wire::read_be64(input)?;
        let flags = raw & FLAGS_MASK;
        let addr = raw & !FLAGS_MASK;
        let kind = flags & !RAM_SAVE_FLAG_CONTINUE;
        let has_continue = flags & RAM_SAVE_FLAG_CONTINUE != 0;
        match kind {
            RAM_SAVE_FLAG_MEM_SIZE if !has_continue => self.mem_size(input, addr),
            RAM_SAVE_FLAG_EOS if !has_continue => {
                if addr != 0 {
                    return Err(RamFormatError::BadEos(addr));
                }
                Ok(RamItem::Record(RamRecord::Eos))
            }
            RAM_SAVE_FLAG_ZERO => {
                let block = self.block(input, flags)?;
                let fill = wire::read_u8(input)?;
                Ok(RamItem::Record(RamRecord::Zero {
                    block,
                    offset: addr,
                    fill,
                }))
            }
            RAM_SAVE_FLAG_PAGE => {
                let block = self.block(input, flags)?;
                Ok(RamItem::PageHeader {
                    block,
                    offset: addr,
                })
            }
            RAM_SAVE_FLAG_XBZRLE => {
                let block = self.block(input, flags)?;
                let encoding = wire::read_u8(input)?;
                if encoding != ENCODING_FLAG_XBZRLE {
                    return Err(RamFormatError::BadEncoding(encoding));
                }
                let len = usize::from(wire::read_be16(input)?);
                if len > MAX_XBZRLE_LEN {
                    return Err(RamFormatError::XbzrleTooLong(len));
                }
                let mut data = vec![0u8; len];
                input.read_exact(&mut data)?;
                Ok(RamItem::Record(RamRecord::Xbzrle {
                    block,
                    offset: addr,
                    data,
                }))
            }
            _ => Err(RamFormatError::UnknownFlags(flags)),
        }
    }

    fn mem_size(&mut self, input: &mut dyn Read, total: u64) -> Result<RamItem, RamFormatError> {
        let mut remaining = total;
        let mut blocks = Vec::new();
        while remaining > 0 {
            if blocks.len() == MAX_RAM_BLOCKS {
                return Err(RamFormatError::BadMemSize("too many blocks".into()));
            }
            let id = Self::block_id(input)?;
            let size = wire::read_be64(input)?;
            check_aligned(size)?;
            if size == 0 || size > remaining {
                return Err(RamFormatError::BadMemSize(format!(
                    "block {id} size {size:#x} with {remaining:#x} left"
                )));
            }
            remaining -= size;
            blocks.push(RamBlockInfo { id, size });
        }
        Ok(RamItem::Record(RamRecord::MemSize { blocks }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks() -> Vec<RamBlockInfo> {
        vec![
            RamBlockInfo {
                id: "pc.ram".into(),
                size: 0x10_0000,
            },
            RamBlockInfo {
                id: "/rom@etc/acpi/tables".into(),
                size: 0x2000,
            },
        ]
    }

    #[test]
    fn exact_bytes_and_continue() {
        let mut w = RamRecordWriter::new();
        let mut out = Vec::new();
        assert_eq!(w.zero_page(&mut out, "ab", 0x1000, 0).unwrap(), 12);
        assert_eq!(w.zero_page(&mut out, "ab", 0x2000, 0).unwrap(), 9);
        assert_eq!(w.eos(&mut out).unwrap(), 8);
        let expect: Vec<u8> = [
            &[0, 0, 0, 0, 0, 0, 0x10, 0x02, 2, b'a', b'b', 0][..],
            &[0, 0, 0, 0, 0, 0, 0x20, 0x22, 0],
            &[0, 0, 0, 0, 0, 0, 0, 0x10],
        ]
        .concat();
        assert_eq!(out, expect);
    }

    #[test]
    fn round_trip_all_records() {
        let mut w = RamRecordWriter::new();
        let mut out = Vec::new();
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| i as u8).collect();
        let mut n = w.mem_size(&mut out, &blocks()).unwrap();
        n += w.page(&mut out, "pc.ram", 0, &page).unwrap();
        n += w.page(&mut out, "pc.ram", 0x1000, &page).unwrap();
        n += w
            .zero_page(&mut out, "/rom@etc/acpi/tables", 0x1000, 0)
            .unwrap();
        n += w
            .xbzrle_page(&mut out, "/rom@etc/acpi/tables", 0, &[0, 1, 9])
            .unwrap();
        n += w.eos(&mut out).unwrap();
        // Next chunk: CONTINUE carries over.
        n += w.zero_page(&mut out, "/rom@etc/acpi/tables", 0, 7).unwrap();
        w.reset();
        n += w.zero_page(&mut out, "/rom@etc/acpi/tables", 0, 0).unwrap();
        n += w.eos(&mut out).unwrap();
        assert_eq!(n, out.len());

        let mut r = RamRecordReader::new();
        let mut input = &out[..];
        assert_eq!(
            r.read_record(&mut input).unwrap(),
            RamRecord::MemSize { blocks: blocks() }
        );
        let rom: Arc<str> = "/rom@etc/acpi/tables".into();
        let ram: Arc<str> = "pc.ram".into();
        assert_eq!(
            r.read_record(&mut input).unwrap(),
            RamRecord::Page {
                block: ram.clone(),
                offset: 0,
                data: page.clone()
            }
        );
        assert_eq!(
            r.read_record(&mut input).unwrap(),
            RamRecord::Page {
                block: ram,
                offset: 0x1000,
                data: page
            }
        );
        assert_eq!(
            r.read_record(&mut input).unwrap(),
            RamRecord::Zero {
                block: rom.clone(),
                offset: 0x1000,
                fill: 0
            }
        );
        assert_eq!(
            r.read_record(&mut input).unwrap(),
            RamRecord::Xbzrle {
                block: rom.clone(),
                offset: 0,
                data: vec![0, 1, 9]
            }
        );
        assert_eq!(r.read_record(&mut input).unwrap(), RamRecord::Eos);
        assert_eq!(
            r.read_record(&mut input).unwrap(),
            RamRecord::Zero {
                block: rom.clone(),
                offset: 0,
                fill: 7
            }
        );
        assert_eq!(
            r.read_record(&mut input).unwrap(),
            RamRecord::Zero {
                block: rom,
                offset: 0,
                fill: 0
            }
        );
        assert_eq!(r.read_record(&mut input).unwrap(), RamRecord::Eos);
        assert!(input.is_empty());
        assert!(matches!(
            r.read_record(&mut input),
            Err(RamFormatError::Truncated)
        ));
    }

    #[test]
    fn writer_validates() {
        let mut w = RamRecordWriter::new();
        let mut out = Vec::new();
        assert!(matches!(
            w.page(&mut out, "b", 0, &[0; 100]),
            Err(RamFormatError::BadPageLength(100))
        ));
        assert!(matches!(
            w.zero_page(&mut out, "b", 0x10, 0),
            Err(RamFormatError::Unaligned(0x10))
        ));
        assert!(w.zero_page(&mut out, "", 0, 0).is_err());
        assert!(w.zero_page(&mut out, &"x".repeat(256), 0, 0).is_err());
        assert!(matches!(
            w.xbzrle_page(&mut out, "b", 0, &[0; PAGE_SIZE + 1]),
            Err(RamFormatError::XbzrleTooLong(_))
        ));
        let bad = [RamBlockInfo {
            id: "a".into(),
            size: 100,
        }];
        assert!(w.mem_size(&mut out, &bad).is_err());
        let empty = [RamBlockInfo {
            id: "a".into(),
            size: 0,
        }];
        assert!(w.mem_size(&mut out, &empty).is_err());
        let huge = [
            RamBlockInfo {
                id: "a".into(),
                size: 1 << 63,
            },
            RamBlockInfo {
                id: "b".into(),
                size: 1 << 63,
            },
        ];
        assert!(w.mem_size(&mut out, &huge).is_err());
        assert!(out.is_empty(), "failed records wrote bytes");
        // A failed record does not change the last block.
        w.zero_page(&mut out, "b", 0, 0).unwrap();
        assert!(w.zero_page(&mut out, "c", 1, 0).is_err());
        let before = out.len();
        w.zero_page(&mut out, "b", 0x1000, 0).unwrap();
        assert_eq!(out.len() - before, 9, "should have used CONTINUE");
    }

    fn read_one(bytes: &[u8]) -> Result<RamRecord, RamFormatError> {
        RamRecordReader::new().read_record(&mut &bytes[..])
    }

    #[test]
    fn reader_rejects_bad_records() {
        let be = |v: u64| v.to_be_bytes().to_vec();
        // Unknown and combined flags.
        for flags in [
            0x01u64, 0x80, 0x100, 0x200, 0x0a, 0x12, 0x06, 0x24, 0x30, 0x20, 0x48, 0,
        ] {
            assert!(
                matches!(read_one(&be(flags)), Err(RamFormatError::UnknownFlags(_))),
                "flags {flags:#x}"
            );
        }
        assert!(matches!(
            read_one(&be(0x1000 | RAM_SAVE_FLAG_EOS)),
            Err(RamFormatError::BadEos(0x1000))
        ));
        assert!(matches!(
            read_one(&be(RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE)),
            Err(RamFormatError::ContinueWithoutBlock)
        ));
        // Empty and non-UTF-8 block ids.
        let mut b = be(RAM_SAVE_FLAG_ZERO);
        b.extend_from_slice(&[0, 0]);
        assert!(matches!(read_one(&b), Err(RamFormatError::BadBlockId(_))));
        let mut b = be(RAM_SAVE_FLAG_ZERO);
        b.extend_from_slice(&[1, 0xff, 0]);
        assert!(matches!(read_one(&b), Err(RamFormatError::BadBlockId(_))));
        // XBZRLE: bad encoding byte, too long.
        let mut b = be(RAM_SAVE_FLAG_XBZRLE);
        b.extend_from_slice(&[1, b'a', 2, 0, 1, 0]);
        assert!(matches!(read_one(&b), Err(RamFormatError::BadEncoding(2))));
        let mut b = be(RAM_SAVE_FLAG_XBZRLE);
        b.extend_from_slice(&[1, b'a', 1, 0x10, 0x01]);
        assert!(matches!(
            read_one(&b),
            Err(RamFormatError::XbzrleTooLong(4097))
        ));
        // MEM_SIZE that does not add up, unaligned, zero-sized, too many blocks.
        let mut b = be(0x2000 | RAM_SAVE_FLAG_MEM_SIZE);
        b.extend_from_slice(&[1, b'a']);
        b.extend_from_slice(&0x3000u64.to_be_bytes());
        assert!(matches!(read_one(&b), Err(RamFormatError::BadMemSize(_))));
        let mut b = be(0x2000 | RAM_SAVE_FLAG_MEM_SIZE);
        b.extend_from_slice(&[1, b'a']);
        b.extend_from_slice(&0x1001u64.to_be_bytes());
        assert!(matches!(read_one(&b), Err(RamFormatError::Unaligned(_))));
        let mut b = be(0x2000 | RAM_SAVE_FLAG_MEM_SIZE);
        b.extend_from_slice(&[1, b'a']);
        b.extend_from_slice(&0u64.to_be_bytes());
        assert!(matches!(read_one(&b), Err(RamFormatError::BadMemSize(_))));
        let mut b = be(0x1000_0000 | RAM_SAVE_FLAG_MEM_SIZE);
        for _ in 0..=MAX_RAM_BLOCKS {
            b.extend_from_slice(&[1, b'a']);
            b.extend_from_slice(&0x1000u64.to_be_bytes());
        }
        assert!(matches!(read_one(&b), Err(RamFormatError::BadMemSize(_))));
        // MEM_SIZE with zero total is an empty list.
        assert_eq!(
            read_one(&be(RAM_SAVE_FLAG_MEM_SIZE)).unwrap(),
            RamRecord::MemSize { blocks: vec![] }
        );
    }

    #[test]
    fn every_truncation_errors() {
        let mut w = RamRecordWriter::new();
        let mut out = Vec::new();
        w.mem_size(&mut out, &blocks()).unwrap();
        w.page(&mut out, "pc.ram", 0, &[5; PAGE_SIZE]).unwrap();
        w.zero_page(&mut out, "pc.ram", 0x1000, 0).unwrap();
        w.xbzrle_page(&mut out, "pc.ram", 0x2000, &[0, 2, 1, 1])
            .unwrap();
        w.eos(&mut out).unwrap();
        for cut in 0..out.len() {
            let mut r = RamRecordReader::new();
            let mut input = &out[..cut];
            let res = loop {
                match r.read_record(&mut input) {
                    Ok(RamRecord::Eos) => break Ok(()),
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            };
            assert!(
                matches!(res, Err(RamFormatError::Truncated)),
                "cut {cut}: {res:?}"
            );
        }
    }

    #[test]
    fn corrupted_records_never_panic() {
        let mut w = RamRecordWriter::new();
        let mut out = Vec::new();
        w.mem_size(&mut out, &blocks()).unwrap();
        w.zero_page(&mut out, "pc.ram", 0x1000, 0).unwrap();
        w.xbzrle_page(&mut out, "pc.ram", 0x2000, &[0, 2, 1, 1])
            .unwrap();
        w.zero_page(&mut out, "pc.ram", 0x3000, 0).unwrap();
        w.eos(&mut out).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut d = out.clone();
            let pos = (seed % d.len() as u64) as usize;
            d[pos] ^= (seed >> 40) as u8 | 1;
            let mut r = RamRecordReader::new();
            let mut input = &d[..];
            for _ in 0..16 {
                if r.read_record(&mut input).is_err() {
                    break;
                }
            }
        }
    }
}
