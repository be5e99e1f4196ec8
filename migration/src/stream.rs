//! QEMU's savevm stream framing (`migration/savevm.c`, file version 3).
//!
//! hopvm writes its migration stream in QEMU's format rather than an ad-hoc one so that the
//! tooling built around that format works on it unchanged — most usefully QEMU's
//! `scripts/analyze-migration.py`, which dumps the device state (`-d state`), the description
//! (`-d desc`) or extracts RAM blocks and state to files (`-x`) — and so that the framing has
//! the same well-understood failure modes (section footers catch a section handler that read
//! too much or too little).
//!
//! # Layout
//!
//! ```text
//! be32 0x5145564d ("QEVM")   be32 3
//! { section }*
//! u8 0x00 (EOF)
//! u8 0x06 (VMDESCRIPTION)  be32 length  JSON (length bytes, no NUL)
//!
//! section := u8 0x01 START | 0x04 FULL, be32 section id, u8 length + id string,
//!                be32 instance id, be32 version id, body, footer
//!          | u8 0x02 PART | 0x03 END, be32 section id, body, footer
//! footer  := u8 0x7e, be32 section id
//! ```
//!
//! With the `x-integrity` capability ([`StreamWriter::with_integrity`] /
//! [`StreamReader::with_integrity`]) every footer, and the description, is followed by a
//! checksum record (see [`crate::integrity`]); without it the stream is exactly the above.
//!
//! Live sections (RAM) are sent as START, PART…, END with self-delimiting bodies. A non-live
//! component's state is sent once, as a FULL section whose body is hopvm's *opaque buffer*:
//! `be32 length` followed by `length` bytes. QEMU itself has no generic length prefix (its
//! loader knows every device's layout from the VMStateDescription), but hopvm's loader must
//! hand [`Snapshot::restore`](crate::Snapshot::restore) a byte slice, so the body describes its
//! own length — exactly QEMU's `VMSTATE_VBUFFER` shape, a `uint32` length field followed by a
//! buffer.
//!
//! # The description
//!
//! After EOF the writer appends the VM description, which `analyze-migration.py` needs to
//! parse any non-RAM section: a JSON object `{"page_size":…,"devices":[…]}` with one entry per
//! FULL section, listing its fields (`length`, `uint32`, 4 bytes; `data`, `buffer`, N bytes).
//! Because a buffer's size is only known once the section has been written, the writer
//! records each FULL section as it goes. The script finds the description by searching the
//! stream's last 10 MB for the last NUL byte and the first `{` after it, then checks that the
//! byte five positions before the brace is 0x06; the JSON is therefore NUL-free
//! (`serde_json` escapes NUL inside strings) and, when a byte of the be32 length would itself
//! look like `{` after the length's last zero byte, padded with trailing spaces until it
//! does not. The reader accepts descriptions up to [`MAX_VMDESCRIPTION`] bytes.
//!
//! `analyze-migration.py` reads a section's id string length as a *signed* byte, so although
//! the format allows 255-byte id strings, ids longer than 127 bytes break that script; hopvm's
//! ids are short names like `serial` or `ram`.
//!
//! # Interoperating with QEMU
//!
//! hopvm writes no `QEMU_VM_CONFIGURATION` (0x07) record, and its reader rejects one (and
//! subsections; of QEMU's commands (0x08) the registry accepts only `OPEN_RETURN_PATH`, which
//! the source sends when the `return-path` capability is on), so a QEMU on either end needs
//! `-global migration.send-configuration=off`. QEMU's loader finds the handler of a PART or
//! END record by comparing the id with each handler's last START id, which is 0 for handlers
//! that received none: a live section with id 0 is therefore mistaken for QEMU's first
//! registered device. Section ids of live sections should start at 1 (QEMU's own RAM section
//! has id 2).

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::integrity::{self, Digest, IntegrityError, QEMU_VM_HOPVM_INTEGRITY, STREAM_END_ID};
use crate::wire;
use crate::SectionOutput;

/// The stream's magic number, "QEVM".
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// The stream format version.
pub const QEMU_VM_FILE_VERSION: u32 = 3;
/// End of the sections.
pub const QEMU_VM_EOF: u8 = 0x00;
/// First part of a live section; carries the full section header.
pub const QEMU_VM_SECTION_START: u8 = 0x01;
/// A middle part of a live section; carries only the section id.
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
/// Last part of a live section; carries only the section id.
pub const QEMU_VM_SECTION_END: u8 = 0x03;
/// A complete non-live section; carries the full section header.
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
/// The JSON VM description that follows EOF.
pub const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
/// A command to the destination (QEMU's `QEMU_VM_COMMAND`): be16 command, be16 length, data.
pub const QEMU_VM_COMMAND: u8 = 0x08;
/// QEMU's `MIG_CMD_OPEN_RETURN_PATH`: the destination is to answer on the return path.
pub const MIG_CMD_OPEN_RETURN_PATH: u16 = 1;
/// Closes every section: the marker and the section id again.
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

/// Largest VM description the reader accepts.
pub const MAX_VMDESCRIPTION: usize = 16 << 20;
/// Largest FULL section buffer (one component's state) either side accepts.
pub const MAX_FULL_DATA: usize = 64 << 20;
/// The guest page size (x86-64): the unit of guest RAM and of dirty tracking, written into the
/// VM description as QEMU's target page size. The one definition hopvm has.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of the savevm framing.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The underlying reader or writer failed.
    #[error("i/o: {0}")]
    Io(#[source] io::Error),
    /// The stream ended in the middle of a record.
    #[error("truncated stream")]
    Truncated,
    /// The stream does not start with "QEVM".
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// The stream's format version is not 3.
    #[error("unsupported stream version {0}")]
    BadVersion(u32),
    /// A record type byte that this reader does not know.
    #[error("unknown section type {0:#04x}")]
    UnknownSectionType(u8),
    /// A section was closed with another section's footer, or not closed at all.
    #[error("bad footer for section {expected}: {found}")]
    BadFooter {
        /// The section whose footer was expected.
        expected: u32,
        /// What came instead.
        found: String,
    },
    /// A section id string is empty, longer than 255 bytes or contains NUL.
    #[error("invalid section id string {0:?}")]
    BadIdString(String),
    /// A section id string on the wire is not UTF-8.
    #[error("section id string is not utf-8")]
    IdNotUtf8,
    /// A FULL section buffer is larger than [`MAX_FULL_DATA`].
    #[error("section data too large: {0} bytes")]
    DataTooLarge(u64),
    /// The VM description is larger than [`MAX_VMDESCRIPTION`].
    #[error("vm description too large: {0} bytes")]
    DescriptionTooLarge(u64),
    /// The VM description is not valid UTF-8 or JSON, or contains NUL.
    #[error("bad vm description: {0}")]
    BadDescription(String),
    /// Two FULL sections with the same id string and instance id.
    #[error("duplicate section {name} instance {instance}")]
    DuplicateSection {
        /// The id string.
        name: String,
        /// The instance id.
        instance: u32,
    },
    /// The writer or reader was used in the wrong order.
    #[error("out of order: {0}")]
    OutOfOrder(&'static str),
    /// An `x-integrity` check failed.
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
}

impl From<io::Error> for StreamError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            StreamError::Truncated
        } else {
            StreamError::Io(e)
        }
    }
}

/// The JSON VM description written after EOF, in the shape `analyze-migration.py` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// The target page size; the script uses it to split RAM record headers.
    pub page_size: u64,
    /// One entry per FULL section.
    pub devices: Vec<DeviceDescription>,
}

/// One FULL section in the [`VmDescription`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescription {
    /// The section id string (the key the script matches sections by, with `instance_id`).
    pub name: String,
    /// The instance id.
    pub instance_id: u32,
    /// QEMU's VMStateDescription name; hopvm uses the id string.
    #[serde(default)]
    pub vmsd_name: String,
    /// The section version.
    #[serde(default)]
    pub version: u32,
    /// The fields of the section body, in order.
    pub fields: Vec<FieldDescription>,
}

/// One field of a described section body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDescription {
    /// Field name.
    pub name: String,
    /// QEMU vmstate field type name (`uint32`, `buffer`, …).
    #[serde(rename = "type")]
    pub field_type: String,
    /// Size in bytes.
    #[serde(default)]
    pub size: u64,
}

impl DeviceDescription {
    /// The description of a hopvm FULL section: a `uint32` length and a `size`-byte buffer.
    pub fn opaque(name: &str, instance_id: u32, version: u32, size: u64) -> Self {
        DeviceDescription {
            name: name.to_owned(),
            instance_id,
            vmsd_name: name.to_owned(),
            version,
            fields: vec![
                FieldDescription {
                    name: "length".to_owned(),
                    field_type: "uint32".to_owned(),
                    size: 4,
                },
                FieldDescription {
                    name: "data".to_owned(),
                    field_type: "buffer".to_owned(),
                    size,
                },
            ],
        }
    }
}

impl VmDescription {
    /// Parses a description read from a stream.
    pub fn from_json(json: &str) -> Result<Self, StreamError> {
        serde_json::from_str(json).map_err(|e| StreamError::BadDescription(e.to_string()))
    }

    /// Serializes the description for the wire: NUL-free, and padded with trailing spaces
    /// until no byte of its be32 length can be mistaken for the opening brace by
    /// `analyze-migration.py`'s backwards search (see the module docs).
    pub fn to_wire_json(&self) -> Result<Vec<u8>, StreamError> {
        let mut json =
            serde_json::to_vec(self).map_err(|e| StreamError::BadDescription(e.to_string()))?;
        debug_assert!(!json.contains(&0));
        loop {
            if json.len() > MAX_VMDESCRIPTION {
                return Err(StreamError::DescriptionTooLarge(json.len() as u64));
            }
            let len = u32::try_from(json.len())
                .map_err(|_| StreamError::DescriptionTooLarge(json.len() as u64))?;
            if !length_confuses_search(len) {
                return Ok(json);
            }
            json.push(b' ');
        }
    }
}

/// Whether a byte of the be32 description length, after the length's last zero byte (the
/// last NUL before the JSON), is `{`: the script would take that byte for the JSON's start.
fn length_confuses_search(len: u32) -> bool {
    let bytes = len.to_be_bytes();
    let start = bytes.iter().rposition(|&b| b == 0).map_or(0, |p| p + 1);
    bytes[start..].contains(&b'{')
}

/// Checks an id string written by hopvm: 1..=255 bytes, no NUL (QEMU keeps them as C strings).
fn check_idstr(idstr: &str) -> Result<(), StreamError> {
    if idstr.is_empty() || idstr.len() > 255 || idstr.contains('\0') {
        return Err(StreamError::BadIdString(idstr.to_owned()));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
    /// Nothing written yet.
    Start,
    /// Header written; sections may follow.
    Sections,
    /// EOF and description written.
    Ended,
}

/// Writes a savevm stream to `W`, counting the bytes and recording FULL sections for the
/// VM description.
///
/// Live sections: `section_start` / `section_part` / `section_end`, then the caller writes the
/// body through the writer's [`Write`] impl, then `footer`. Non-live sections: `section_full`
/// writes header, body and footer at once.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    inner: W,
    bytes: u64,
    state: WriterState,
    open: Option<u32>,
    devices: Vec<DeviceDescription>,
    seen: HashSet<(String, u32)>,
    /// With `x-integrity`: the running digest of every byte written.
    digest: Option<Digest>,
    /// With `x-integrity`: a stable copy of a body write (see the `Write` impl).
    scratch: Vec<u8>,
}

impl<W: Write> StreamWriter<W> {
    /// A writer that has written nothing yet (QEMU's format, no checksums).
    pub fn new(inner: W) -> Self {
        StreamWriter {
            inner,
            bytes: 0,
            state: WriterState::Start,
            open: None,
            devices: Vec::new(),
            seen: HashSet::new(),
            digest: None,
            scratch: Vec::new(),
        }
    }

    /// A writer that follows every footer, and the description, with an `x-integrity`
    /// record (see [`crate::integrity`]).
    pub fn with_integrity(inner: W) -> Self {
        StreamWriter {
            digest: Some(Digest::new()),
            ..Self::new(inner)
        }
    }

    /// Whether this writer adds `x-integrity` records.
    pub fn integrity(&self) -> bool {
        self.digest.is_some()
    }

    /// Writes the integrity record for section `id`, if the writer has the capability.
    fn integrity_record(&mut self, id: u32) -> Result<(), StreamError> {
        if let Some(d) = &self.digest {
            let record = d.record(id);
            self.put(&record)?;
        }
        Ok(())
    }

    /// Bytes written so far (framing and bodies).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The underlying writer, mutably; bytes written through it are not counted.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Gives the underlying writer back.
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// The FULL sections recorded so far, as they will appear in the description.
    pub fn description(&self) -> VmDescription {
        VmDescription {
            page_size: PAGE_SIZE,
            devices: self.devices.clone(),
        }
    }

    fn put(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.inner.write_all(data).map_err(StreamError::Io)?;
        self.bytes += data.len() as u64;
        if let Some(d) = &mut self.digest {
            d.update(data);
        }
        Ok(())
    }

    fn ready_for_section(&self) -> Result<(), StreamError> {
        match (self.state, self.open) {
            (WriterState::Start, _) => Err(StreamError::OutOfOrder("section before header")),
            (WriterState::Ended, _) => Err(StreamError::OutOfOrder("section after eof")),
            (WriterState::Sections, Some(_)) => {
                Err(StreamError::OutOfOrder("previous section has no footer"))
            }
            (WriterState::Sections, None) => Ok(()),
        }
    }

    /// Whether the header has been written.
    pub fn has_header(&self) -> bool {
        self.state != WriterState::Start
    }

    /// Writes the magic and version; must come first.
    pub fn header(&mut self) -> Result<(), StreamError> {
        if self.state != WriterState::Start {
            return Err(StreamError::OutOfOrder("header written twice"));
        }
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&QEMU_VM_FILE_MAGIC.to_be_bytes());
        b[4..].copy_from_slice(&QEMU_VM_FILE_VERSION.to_be_bytes());
        self.put(&b)?;
        self.state = WriterState::Sections;
        Ok(())
    }

    fn full_header(
        &mut self,
        kind: u8,
        id: u32,
        idstr: &str,
        instance: u32,
        version: u32,
    ) -> Result<(), StreamError> {
        self.ready_for_section()?;
        check_idstr(idstr)?;
        let mut b = Vec::with_capacity(14 + idstr.len());
        b.push(kind);
        b.extend_from_slice(&id.to_be_bytes());
        wire::write_counted(&mut b, idstr.as_bytes()).map_err(StreamError::Io)?;
        b.extend_from_slice(&instance.to_be_bytes());
        b.extend_from_slice(&version.to_be_bytes());
        self.put(&b)
    }

    fn short_header(&mut self, kind: u8, id: u32) -> Result<(), StreamError> {
        self.ready_for_section()?;
        let mut b = [0u8; 5];
        b[0] = kind;
        b[1..].copy_from_slice(&id.to_be_bytes());
        self.put(&b)
    }

    /// Opens the first part of live section `id`; the body and [`footer`](Self::footer) follow.
    pub fn section_start(
        &mut self,
        id: u32,
        idstr: &str,
        instance: u32,
        version: u32,
    ) -> Result<(), StreamError> {
        self.full_header(QEMU_VM_SECTION_START, id, idstr, instance, version)?;
        self.open = Some(id);
        Ok(())
    }

    /// Opens a middle part of live section `id`; the body and footer follow.
    pub fn section_part(&mut self, id: u32) -> Result<(), StreamError> {
        self.short_header(QEMU_VM_SECTION_PART, id)?;
        self.open = Some(id);
        Ok(())
    }

    /// Opens the last part of live section `id`; the body and footer follow.
    pub fn section_end(&mut self, id: u32) -> Result<(), StreamError> {
        self.short_header(QEMU_VM_SECTION_END, id)?;
        self.open = Some(id);
        Ok(())
    }

    /// Writes a command record (QEMU's `qemu_savevm_command_send`) between sections.
    pub fn command(&mut self, cmd: u16, data: &[u8]) -> Result<(), StreamError> {
        self.ready_for_section()?;
        let len = u16::try_from(data.len())
            .map_err(|_| StreamError::OutOfOrder("command data longer than 65535 bytes"))?;
        let mut b = Vec::with_capacity(5 + data.len());
        b.push(QEMU_VM_COMMAND);
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.put(&b)
    }

    /// Closes the open section, which must be `id`.
    pub fn footer(&mut self, id: u32) -> Result<(), StreamError> {
        match self.open {
            Some(open) if open == id => {}
            Some(open) => {
                return Err(StreamError::BadFooter {
                    expected: open,
                    found: format!("footer for section {id}"),
                })
            }
            None => return Err(StreamError::OutOfOrder("footer without open section")),
        }
        let mut b = [0u8; 5];
        b[0] = QEMU_VM_SECTION_FOOTER;
        b[1..].copy_from_slice(&id.to_be_bytes());
        self.put(&b)?;
        self.open = None;
        self.integrity_record(id)
    }

    /// Writes a complete FULL section — header, `be32 len` + `data`, footer — and records it
    /// for the VM description. Each (`idstr`, `instance`) pair may appear once.
    pub fn section_full(
        &mut self,
        id: u32,
        idstr: &str,
        instance: u32,
        version: u32,
        data: &[u8],
    ) -> Result<(), StreamError> {
        if data.len() > MAX_FULL_DATA {
            return Err(StreamError::DataTooLarge(data.len() as u64));
        }
        // Checked before anything is written, so a rejected section leaves no trace.
        self.ready_for_section()?;
        check_idstr(idstr)?;
        let key = (idstr.to_owned(), instance);
        if self.seen.contains(&key) {
            return Err(StreamError::DuplicateSection {
                name: idstr.to_owned(),
                instance,
            });
        }
        self.full_header(QEMU_VM_SECTION_FULL, id, idstr, instance, version)?;
        self.open = Some(id);
        // MAX_FULL_DATA < u32::MAX, checked above.
        self.put(&(data.len() as u32).to_be_bytes())?;
        self.put(data)?;
        self.footer(id)?;
        self.seen.insert(key);
        self.devices.push(DeviceDescription::opaque(
            idstr,
            instance,
            version,
            data.len() as u64,
        ));
        Ok(())
    }

    /// Ends the stream: EOF, then the VM description of every FULL section written.
    pub fn eof_with_description(&mut self) -> Result<(), StreamError> {
        self.ready_for_section()?;
        let json = self.description().to_wire_json()?;
        let mut b = Vec::with_capacity(json.len() + 6);
        b.push(QEMU_VM_EOF);
        b.push(QEMU_VM_VMDESCRIPTION);
        b.extend_from_slice(&(json.len() as u32).to_be_bytes());
        b.extend_from_slice(&json);
        self.put(&b)?;
        self.integrity_record(STREAM_END_ID)?;
        self.state = WriterState::Ended;
        Ok(())
    }
}

/// Section bodies are written through the stream writer so that they are counted.
impl<W: Write> Write for StreamWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(d) = &mut self.digest else {
            let n = self.inner.write(buf)?;
            self.bytes += n as u64;
            return Ok(n);
        };
        // `buf` may be guest memory that the guest writes meanwhile (RAM pages are sent in
        // place): copied once, so that the bytes hashed are exactly the bytes written.
        self.scratch.clear();
        self.scratch.extend_from_slice(buf);
        let n = self.inner.write(&self.scratch)?;
        d.update(&self.scratch[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Guest memory goes through by reference, unless `x-integrity` must hash it: then one
/// stable copy is hashed and buffered, as for any other body write.
impl<W: SectionOutput> SectionOutput for StreamWriter<W> {
    unsafe fn write_guest(&mut self, data: *const u8, len: usize) -> io::Result<()> {
        if self.digest.is_some() {
            // SAFETY: readable now, per the caller's contract.
            return self.write_all(unsafe { std::slice::from_raw_parts(data, len) });
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { self.inner.write_guest(data, len) }?;
        self.bytes += len as u64;
        Ok(())
    }
}

/// One framing record of a savevm stream. Section bodies are not part of the records: after
/// a START, PART, END or FULL record the caller reads the body (through the reader's
/// [`Read`] impl, or [`StreamReader::read_full_data`] for FULL) and then the footer
/// ([`StreamReader::expect_footer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Magic and version were valid.
    Header,
    /// First part of a live section.
    SectionStart {
        /// Section id, used by the PART / END records and the footer.
        id: u32,
        /// The section's id string ("ram", "serial", …).
        idstr: String,
        /// Instance id.
        instance: u32,
        /// Section version.
        version: u32,
    },
    /// A middle part of live section `id`.
    SectionPart {
        /// Section id.
        id: u32,
    },
    /// The last part of live section `id`.
    SectionEnd {
        /// Section id.
        id: u32,
    },
    /// A complete non-live section.
    SectionFull {
        /// Section id.
        id: u32,
        /// The section's id string.
        idstr: String,
        /// Instance id.
        instance: u32,
        /// Section version.
        version: u32,
    },
    /// Closes section `id`.
    Footer {
        /// Section id.
        id: u32,
    },
    /// End of the sections.
    Eof,
    /// The JSON VM description after EOF.
    VmDescription(String),
    /// A command to the destination (`QEMU_VM_COMMAND`).
    Command {
        /// QEMU's `MIG_CMD_*` number.
        cmd: u16,
        /// Its data.
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderState {
    Start,
    Sections,
    AfterEof,
    Done,
}

/// Reads a savevm stream from `R` record by record, counting the bytes.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    inner: R,
    bytes: u64,
    state: ReaderState,
    /// With `x-integrity`: the running digest of every byte read.
    digest: Option<Digest>,
    /// Section id → "idstr instance", to name a section in integrity errors.
    names: HashMap<u32, String>,
}

impl<R: Read> StreamReader<R> {
    /// A reader at the start of a stream in QEMU's format (no checksums).
    pub fn new(inner: R) -> Self {
        StreamReader {
            inner,
            bytes: 0,
            state: ReaderState::Start,
            digest: None,
            names: HashMap::new(),
        }
    }

    /// A reader that requires and checks an `x-integrity` record after every footer and
    /// after the description (see [`crate::integrity`]).
    pub fn with_integrity(inner: R) -> Self {
        StreamReader {
            digest: Some(Digest::new()),
            ..Self::new(inner)
        }
    }

    /// Whether this reader checks `x-integrity` records.
    pub fn integrity(&self) -> bool {
        self.digest.is_some()
    }

    /// "section serial (instance 0)" for section `id`.
    fn section_name(&self, id: u32) -> String {
        match self.names.get(&id) {
            Some(name) => format!("section {name}"),
            None => format!("section id {id}"),
        }
    }

    /// Reads and checks the integrity record that must follow section `id`'s footer (or,
    /// for [`STREAM_END_ID`], the description) when the reader has the capability.
    fn check_integrity(&mut self, id: u32) -> Result<(), StreamError> {
        let Some(computed) = self.digest.as_ref().map(Digest::value) else {
            return Ok(());
        };
        let name = if id == STREAM_END_ID {
            String::from("the end of the stream")
        } else {
            self.section_name(id)
        };
        let what = || name.clone();
        let kind = match self.u8() {
            Ok(kind) => kind,
            Err(StreamError::Truncated) => {
                return Err(IntegrityError::Missing {
                    what: what(),
                    found: String::from("the end of the input"),
                }
                .into())
            }
            Err(e) => return Err(e),
        };
        if kind != QEMU_VM_HOPVM_INTEGRITY {
            return Err(IntegrityError::Missing {
                what: what(),
                found: format!("byte {kind:#04x}"),
            }
            .into());
        }
        let record_id = self.be32()?;
        let stream = wire::read_be64(self)?;
        integrity::check(what, id, record_id, stream, computed)?;
        Ok(())
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Gives the underlying reader back.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn u8(&mut self) -> Result<u8, StreamError> {
        Ok(wire::read_u8(self)?)
    }

    fn be32(&mut self) -> Result<u32, StreamError> {
        Ok(wire::read_be32(self)?)
    }

    fn idstr(&mut self) -> Result<String, StreamError> {
        let raw = wire::read_counted_bytes(self)?;
        String::from_utf8(raw).map_err(|_| StreamError::IdNotUtf8)
    }

    /// The next record; `Ok(None)` once the stream has ended cleanly (after EOF and the
    /// optional description). The first call reads and checks the header.
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        match self.state {
            ReaderState::Start => {
                let magic = self.be32()?;
                if magic != QEMU_VM_FILE_MAGIC {
                    return Err(StreamError::BadMagic(magic));
                }
                let version = self.be32()?;
                if version != QEMU_VM_FILE_VERSION {
                    return Err(StreamError::BadVersion(version));
                }
                self.state = ReaderState::Sections;
                Ok(Some(Record::Header))
            }
            ReaderState::Sections => self.section_record().map(Some),
            ReaderState::AfterEof => self.description_record(),
            ReaderState::Done => Ok(None),
        }
    }

    fn section_record(&mut self) -> Result<Record, StreamError> {
        let kind = self.u8()?;
        let record = match kind {
            QEMU_VM_EOF => {
                self.state = ReaderState::AfterEof;
                Record::Eof
            }
            QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => {
                let id = self.be32()?;
                let idstr = self.idstr()?;
                let instance = self.be32()?;
                let version = self.be32()?;
                if self.digest.is_some() {
                    self.names
                        .insert(id, format!("{idstr} (instance {instance})"));
                }
                if kind == QEMU_VM_SECTION_START {
                    Record::SectionStart {
                        id,
                        idstr,
                        instance,
                        version,
                    }
                } else {
                    Record::SectionFull {
                        id,
                        idstr,
                        instance,
                        version,
                    }
                }
            }
            QEMU_VM_SECTION_PART => Record::SectionPart { id: self.be32()? },
            QEMU_VM_SECTION_END => Record::SectionEnd { id: self.be32()? },
            QEMU_VM_SECTION_FOOTER => Record::Footer { id: self.be32()? },
            QEMU_VM_HOPVM_INTEGRITY if self.digest.is_none() => {
                return Err(IntegrityError::Unexpected.into())
            }
            QEMU_VM_COMMAND => {
                let cmd = wire::read_be16(self)?;
                let len = wire::read_be16(self)?;
                let data = wire::read_vec(self, usize::from(len))?;
                Record::Command { cmd, data }
            }
            other => return Err(StreamError::UnknownSectionType(other)),
        };
        Ok(record)
    }

    fn description_record(&mut self) -> Result<Option<Record>, StreamError> {
        let mut kind = [0u8; 1];
        // A clean end of input right after EOF is a stream without a description.
        let n = loop {
            match self.inner.read(&mut kind) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            // With x-integrity the final record is missing.
            self.check_integrity(STREAM_END_ID)?;
            self.state = ReaderState::Done;
            return Ok(None);
        }
        self.bytes += 1;
        let computed_before = self.digest.as_ref().map(Digest::value);
        if let Some(d) = &mut self.digest {
            d.update(&kind);
        }
        if kind[0] == QEMU_VM_HOPVM_INTEGRITY {
            if let Some(computed) = computed_before {
                // A stream without a description: the final record follows EOF at once.
                let record_id = self.be32()?;
                let stream = wire::read_be64(self)?;
                integrity::check(
                    || String::from("the end of the stream"),
                    STREAM_END_ID,
                    record_id,
                    stream,
                    computed,
                )?;
                self.state = ReaderState::Done;
                return Ok(None);
            }
            return Err(IntegrityError::Unexpected.into());
        }
        if kind[0] != QEMU_VM_VMDESCRIPTION {
            return Err(StreamError::UnknownSectionType(kind[0]));
        }
        let len = self.be32()?;
        if len as usize > MAX_VMDESCRIPTION {
            return Err(StreamError::DescriptionTooLarge(u64::from(len)));
        }
        let raw = wire::read_vec(self, len as usize)?;
        if raw.contains(&0) {
            return Err(StreamError::BadDescription("contains nul".to_owned()));
        }
        let json =
            String::from_utf8(raw).map_err(|_| StreamError::BadDescription("not utf-8".into()))?;
        self.check_integrity(STREAM_END_ID)?;
        self.state = ReaderState::Done;
        Ok(Some(Record::VmDescription(json)))
    }

    /// Reads the next record and checks that it is the footer of section `id`.
    pub fn expect_footer(&mut self, id: u32) -> Result<(), StreamError> {
        if self.state != ReaderState::Sections {
            return Err(StreamError::OutOfOrder("footer outside the sections"));
        }
        match self.section_record() {
            Ok(Record::Footer { id: found }) if found == id => self.check_integrity(id),
            Ok(Record::Footer { id: found }) => Err(StreamError::BadFooter {
                expected: id,
                found: format!("footer for section {found}"),
            }),
            Ok(other) => Err(StreamError::BadFooter {
                expected: id,
                found: format!("{other:?}"),
            }),
            Err(StreamError::UnknownSectionType(t)) => Err(StreamError::BadFooter {
                expected: id,
                found: format!("byte {t:#04x}"),
            }),
            Err(e) => Err(e),
        }
    }

    /// Reads a hopvm FULL section body (`be32 len` + data), bounded by [`MAX_FULL_DATA`].
    pub fn read_full_data(&mut self) -> Result<Vec<u8>, StreamError> {
        let len = self.be32()?;
        if len as usize > MAX_FULL_DATA {
            return Err(StreamError::DataTooLarge(u64::from(len)));
        }
        Ok(wire::read_vec(self, len as usize)?)
    }
}

/// Section bodies are read through the stream reader so that they are counted.
impl<R: Read> Read for StreamReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        if let Some(d) = &mut self.digest {
            d.update(&buf[..n]);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_stream() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new());
        w.header().unwrap();
        w.section_start(0, "ram", 0, 4).unwrap();
        w.write_all(b"live-start").unwrap();
        w.footer(0).unwrap();
        w.section_part(0).unwrap();
        w.write_all(b"part").unwrap();
        w.footer(0).unwrap();
        w.section_end(0).unwrap();
        w.footer(0).unwrap();
        w.section_full(1, "serial", 0, 2, b"{\"lcr\":3}").unwrap();
        w.section_full(2, "cpu", 1, 1, &[]).unwrap();
        w.eof_with_description().unwrap();
        let n = w.bytes_written();
        let out = w.into_inner();
        assert_eq!(n, out.len() as u64);
        out
    }

    #[test]
    fn header_bytes() {
        let mut w = StreamWriter::new(Vec::new());
        w.header().unwrap();
        assert_eq!(w.get_ref(), &[0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]);
    }

    #[test]
    fn exact_section_bytes() {
        let mut w = StreamWriter::new(Vec::new());
        w.header().unwrap();
        w.section_start(5, "ab", 7, 4).unwrap();
        w.footer(5).unwrap();
        w.section_part(5).unwrap();
        w.footer(5).unwrap();
        let out = w.into_inner();
        let expect: Vec<u8> = [
            &[0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3][..],
            &[0x01, 0, 0, 0, 5, 2, b'a', b'b', 0, 0, 0, 7, 0, 0, 0, 4],
            &[0x7e, 0, 0, 0, 5],
            &[0x02, 0, 0, 0, 5],
            &[0x7e, 0, 0, 0, 5],
        ]
        .concat();
        assert_eq!(out, expect);
    }

    #[test]
    fn round_trip() {
        let data = sample_stream();
        let mut r = StreamReader::new(&data[..]);
        assert_eq!(r.next_record().unwrap(), Some(Record::Header));
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::SectionStart {
                id: 0,
                idstr: "ram".into(),
                instance: 0,
                version: 4
            })
        );
        let mut body = [0u8; 10];
        r.read_exact(&mut body).unwrap();
        assert_eq!(&body, b"live-start");
        r.expect_footer(0).unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::SectionPart { id: 0 })
        );
        let mut body = [0u8; 4];
        r.read_exact(&mut body).unwrap();
        r.expect_footer(0).unwrap();
        assert_eq!(r.next_record().unwrap(), Some(Record::SectionEnd { id: 0 }));
        // Footers can also be read as plain records.
        assert_eq!(r.next_record().unwrap(), Some(Record::Footer { id: 0 }));
        assert_eq!(
            r.next_record().unwrap(),
            Some(Record::SectionFull {
                id: 1,
                idstr: "serial".into(),
                instance: 0,
                version: 2
            })
        );
        assert_eq!(r.read_full_data().unwrap(), b"{\"lcr\":3}");
        r.expect_footer(1).unwrap();
        assert!(matches!(
            r.next_record().unwrap(),
            Some(Record::SectionFull { id: 2, .. })
        ));
        assert_eq!(r.read_full_data().unwrap(), b"");
        r.expect_footer(2).unwrap();
        assert_eq!(r.next_record().unwrap(), Some(Record::Eof));
        let Some(Record::VmDescription(json)) = r.next_record().unwrap() else {
            panic!("no description");
        };
        assert_eq!(r.next_record().unwrap(), None);
        assert_eq!(r.next_record().unwrap(), None);
        assert_eq!(r.bytes_read(), data.len() as u64);

        let desc = VmDescription::from_json(&json).unwrap();
        assert_eq!(desc.page_size, 4096);
        assert_eq!(
            desc.devices,
            vec![
                DeviceDescription::opaque("serial", 0, 2, 9),
                DeviceDescription::opaque("cpu", 1, 1, 0)
            ]
        );
        // Exactly the keys analyze-migration.py reads.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let dev = &v["devices"][0];
        assert_eq!(dev["name"], "serial");
        assert_eq!(dev["instance_id"], 0);
        assert_eq!(dev["fields"][1]["type"], "buffer");
        assert_eq!(dev["fields"][1]["size"], 9);
        assert_eq!(dev["fields"][0]["type"], "uint32");
    }

    /// Mimics analyze-migration.py's search: last NUL in the final 10 MB, then the first
    /// brace after it, then the type byte 5 bytes before.
    fn script_finds_description(stream: &[u8]) -> Option<String> {
        let window = &stream[stream.len().saturating_sub(10 << 20)..];
        let nul = window.iter().rposition(|&b| b == 0)?;
        let brace = nul + window[nul..].iter().position(|&b| b == b'{')?;
        if brace < 5 || window[brace - 5] != QEMU_VM_VMDESCRIPTION {
            return None;
        }
        let len = u32::from_be_bytes(window[brace - 4..brace].try_into().unwrap()) as usize;
        String::from_utf8(window[brace..brace + len].to_vec()).ok()
    }

    #[test]
    fn description_is_findable_by_the_script() {
        let data = sample_stream();
        let json = script_finds_description(&data).unwrap();
        assert!(VmDescription::from_json(&json).is_ok());
    }

    #[test]
    fn description_padding_avoids_brace_in_length() {
        // 0x7b = '{'. Lengths whose bytes after the last zero contain it get padded.
        assert!(length_confuses_search(0x0000_7b10));
        assert!(length_confuses_search(0x0000_107b));
        assert!(!length_confuses_search(0x7b00_0010));
        assert!(!length_confuses_search(0x0000_0100));
        // Build descriptions around the 0x7b00..0x7bff lengths and check the script finds them.
        for extra in [0x7aff_usize, 0x7b00, 0x7b40, 0x7bff] {
            let mut w = StreamWriter::new(Vec::new());
            w.header().unwrap();
            let name = "n";
            w.section_full(1, name, 0, 1, &[]).unwrap();
            let mut desc = w.description();
            // Grow the JSON to about `extra` bytes with a long vmsd_name.
            let base = serde_json::to_vec(&desc).unwrap().len();
            desc.devices[0].vmsd_name = "x".repeat(extra.saturating_sub(base) + 1);
            let json = desc.to_wire_json().unwrap();
            assert!(!length_confuses_search(json.len() as u32));
            let mut stream = w.into_inner();
            stream.push(QEMU_VM_EOF);
            stream.push(QEMU_VM_VMDESCRIPTION);
            stream.extend_from_slice(&(json.len() as u32).to_be_bytes());
            stream.extend_from_slice(&json);
            assert!(
                script_finds_description(&stream).is_some(),
                "len {}",
                json.len()
            );
        }
    }

    #[test]
    fn description_has_no_nul_even_with_nul_in_names() {
        let desc = VmDescription {
            page_size: 4096,
            devices: vec![DeviceDescription {
                vmsd_name: "a\0b".into(),
                ..DeviceDescription::opaque("x", 0, 1, 1)
            }],
        };
        let json = desc.to_wire_json().unwrap();
        assert!(!json.contains(&0));
        let back = VmDescription::from_json(std::str::from_utf8(&json).unwrap()).unwrap();
        assert_eq!(back, desc);
    }

    #[test]
    fn writer_rejects_misuse() {
        let mut w = StreamWriter::new(Vec::new());
        assert!(matches!(w.section_part(0), Err(StreamError::OutOfOrder(_))));
        w.header().unwrap();
        assert!(w.header().is_err());
        assert!(matches!(w.footer(0), Err(StreamError::OutOfOrder(_))));
        w.section_start(1, "ram", 0, 4).unwrap();
        assert!(w.section_part(2).is_err());
        assert!(matches!(w.footer(2), Err(StreamError::BadFooter { .. })));
        assert!(w.eof_with_description().is_err());
        w.footer(1).unwrap();
        assert!(matches!(
            w.section_full(2, "", 0, 1, b""),
            Err(StreamError::BadIdString(_))
        ));
        assert!(w.section_full(2, &"x".repeat(256), 0, 1, b"").is_err());
        assert!(w.section_full(2, "a\0b", 0, 1, b"").is_err());
        w.section_full(2, &"x".repeat(255), 0, 1, b"").unwrap();
        w.section_full(3, "dev", 0, 1, b"a").unwrap();
        let before = w.bytes_written();
        assert!(matches!(
            w.section_full(4, "dev", 0, 1, b"b"),
            Err(StreamError::DuplicateSection { .. })
        ));
        assert_eq!(w.bytes_written(), before, "rejected section wrote bytes");
        w.section_full(4, "dev", 1, 1, b"b").unwrap();
        w.eof_with_description().unwrap();
        assert!(w.section_part(1).is_err());
        assert!(w.eof_with_description().is_err());
    }

    #[test]
    fn reader_rejects_bad_header() {
        let mut r = StreamReader::new(&[0x51u8, 0x45, 0x56, 0x4e, 0, 0, 0, 3][..]);
        assert!(matches!(
            r.next_record(),
            Err(StreamError::BadMagic(0x5145_564e))
        ));
        let mut r = StreamReader::new(&[0x51u8, 0x45, 0x56, 0x4d, 0, 0, 0, 2][..]);
        assert!(matches!(r.next_record(), Err(StreamError::BadVersion(2))));
        let mut r = StreamReader::new(&[0x51u8, 0x45][..]);
        assert!(matches!(r.next_record(), Err(StreamError::Truncated)));
        let mut r = StreamReader::new(&[][..]);
        assert!(matches!(r.next_record(), Err(StreamError::Truncated)));
    }

    #[test]
    fn reader_rejects_bad_records() {
        let hdr = [0x51u8, 0x45, 0x56, 0x4d, 0, 0, 0, 3];
        let with = |rest: &[u8]| [&hdr[..], rest].concat();

        let data = with(&[0x09]);
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        assert!(matches!(
            r.next_record(),
            Err(StreamError::UnknownSectionType(9))
        ));

        // Footer for another section.
        let data = with(&[0x02, 0, 0, 0, 1, 0x7e, 0, 0, 0, 2]);
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        r.next_record().unwrap();
        assert!(matches!(
            r.expect_footer(1),
            Err(StreamError::BadFooter { expected: 1, .. })
        ));

        // Something else where the footer belongs.
        let data = with(&[0x02, 0, 0, 0, 1, 0x00]);
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        r.next_record().unwrap();
        assert!(matches!(
            r.expect_footer(1),
            Err(StreamError::BadFooter { .. })
        ));
        let data = with(&[0x02, 0, 0, 0, 1, 0x42]);
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        r.next_record().unwrap();
        assert!(matches!(
            r.expect_footer(1),
            Err(StreamError::BadFooter { .. })
        ));

        // Non-UTF-8 id string.
        let data = with(&[0x04, 0, 0, 0, 1, 2, 0xff, 0xfe, 0, 0, 0, 0, 0, 0, 0, 1]);
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        assert!(matches!(r.next_record(), Err(StreamError::IdNotUtf8)));

        // Oversized FULL data.
        let mut data = with(&[0x04, 0, 0, 0, 1, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 1]);
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        r.next_record().unwrap();
        assert!(matches!(
            r.read_full_data(),
            Err(StreamError::DataTooLarge(_))
        ));

        // FULL data shorter than its length.
        let mut data = with(&[0x04, 0, 0, 0, 1, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 1]);
        data.extend_from_slice(&100u32.to_be_bytes());
        data.extend_from_slice(&[1, 2, 3]);
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        r.next_record().unwrap();
        assert!(matches!(r.read_full_data(), Err(StreamError::Truncated)));

        // Oversized description.
        let mut data = with(&[0x00, 0x06]);
        data.extend_from_slice(&(MAX_VMDESCRIPTION as u32 + 1).to_be_bytes());
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        r.next_record().unwrap();
        assert!(matches!(
            r.next_record(),
            Err(StreamError::DescriptionTooLarge(_))
        ));

        // Description with NUL, and garbage after EOF.
        let data = with(&[0x00, 0x06, 0, 0, 0, 2, b'{', 0]);
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        r.next_record().unwrap();
        assert!(matches!(
            r.next_record(),
            Err(StreamError::BadDescription(_))
        ));
        let data = with(&[0x00, 0x05]);
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        r.next_record().unwrap();
        assert!(matches!(
            r.next_record(),
            Err(StreamError::UnknownSectionType(5))
        ));

        // EOF without a description is a clean end.
        let data = with(&[0x00]);
        let mut r = StreamReader::new(&data[..]);
        r.next_record().unwrap();
        assert_eq!(r.next_record().unwrap(), Some(Record::Eof));
        assert_eq!(r.next_record().unwrap(), None);
        assert!(r.expect_footer(0).is_err());
    }

    #[test]
    fn every_truncation_errors() {
        let data = sample_stream();
        for cut in 0..data.len() {
            let mut r = StreamReader::new(&data[..cut]);
            let mut failed = false;
            let mut full = false;
            loop {
                match r.next_record() {
                    Ok(Some(Record::SectionStart { .. })) => {
                        let mut b = [0u8; 10];
                        if r.read_exact(&mut b).is_err() || r.expect_footer(0).is_err() {
                            failed = true;
                            break;
                        }
                    }
                    Ok(Some(Record::SectionPart { .. })) => {
                        let mut b = [0u8; 4];
                        if r.read_exact(&mut b).is_err() {
                            failed = true;
                            break;
                        }
                    }
                    Ok(Some(Record::SectionFull { id, .. })) => {
                        full = true;
                        if r.read_full_data().is_err() || r.expect_footer(id).is_err() {
                            failed = true;
                            break;
                        }
                    }
                    Ok(Some(Record::VmDescription(_))) | Ok(None) => break,
                    Ok(Some(_)) => {}
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            // Cutting right after the EOF byte is a valid stream without a description.
            let eof_pos = data
                .iter()
                .rposition(|&b| b == QEMU_VM_VMDESCRIPTION)
                .unwrap()
                - 1;
            if cut == eof_pos + 1 {
                assert!(!failed);
            } else {
                assert!(
                    failed,
                    "cut at {cut} of {} not detected ({full})",
                    data.len()
                );
            }
        }
    }

    #[test]
    fn corrupted_streams_never_panic() {
        let data = sample_stream();
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut d = data.clone();
            let pos = (seed % d.len() as u64) as usize;
            d[pos] ^= (seed >> 32) as u8 | 1;
            let mut r = StreamReader::new(&d[..]);
            for _ in 0..64 {
                match r.next_record() {
                    Ok(Some(Record::SectionFull { id, .. })) => {
                        if r.read_full_data().is_err() || r.expect_footer(id).is_err() {
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
