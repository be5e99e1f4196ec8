//! hopvm's live migration, after QEMU's classic `migration.c`.
//!
//! A migration is a stream of *sections* in QEMU's savevm format ([`stream`]); each migratable
//! component of the VM registers one section ([`registry`]). Components that hold a lot of state
//! that changes while the guest runs (RAM) are *live*: they implement [`LiveSection`] and are
//! sent in rounds while the guest keeps running. Everything else (vCPU registers, devices)
//! implements [`Snapshot`] and is sent once, with the guest stopped, at the end.
//!
//! The contract is a pair of small traits whose methods all have defaults, as Cloud
//! Hypervisor's `Pausable` / `Snapshottable` / `Migratable` do, so a component implements only
//! what it needs.

use std::io::{self, Read, Write};

pub mod block;
pub mod integrity;
pub mod multifd;
mod pagemap;
pub mod ram;
pub mod ram_format;
pub mod rate_limit;
pub mod registry;
pub mod return_path;
pub mod stream;
pub mod thread;
pub mod transport;
mod wire;
pub mod xbzrle;

pub use ram_format::{RamBlockInfo, RamFormatError, RamRecord, RamRecordReader, RamRecordWriter};
pub use rate_limit::{BufferedOutput, RateLimitError, RateLimiter, SlotSummary};
pub use stream::{Record, StreamError, StreamReader, StreamWriter, VmDescription};
pub use transport::{
    connect_outgoing, connect_outgoing_cancellable, listen_incoming, ConnectCancel, Incoming,
    IncomingChannel, MigrationUri, Outgoing, ShutdownHandle, TransportError,
};
pub use xbzrle::{XbzrleCache, XbzrleError, XbzrleOutcome, XbzrleStats};

/// Errors of a migration section.
#[derive(Debug, thiserror::Error)]
pub enum SectionError {
    /// Reading or writing the stream failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The incoming data is not what this section expects.
    #[error("invalid {section} data: {reason}")]
    Invalid {
        /// The section's id string.
        section: String,
        /// What is wrong.
        reason: String,
    },
    /// The component cannot take part in migration right now.
    #[error("{0}")]
    Unsupported(String),
    /// The stream's version of this section is one this side cannot read.
    #[error("unsupported {section} state version {version} (this side reads {min} to {max})")]
    Version {
        /// The section's id string.
        section: String,
        /// The version in the stream.
        version: u32,
        /// The oldest version this side reads.
        min: u32,
        /// The newest version this side reads.
        max: u32,
    },
    /// The state decoded but the component rejected it (the component's own error says why).
    #[error("invalid {section} state: {source}")]
    State {
        /// The section's id string.
        section: String,
        /// The component's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SectionError {
    /// Checks that `version` lies in `min..=max`, the versions section `section` reads.
    pub fn check_version(section: &str, version: u32, min: u32, max: u32) -> Result<(), Self> {
        if (min..=max).contains(&version) {
            Ok(())
        } else {
            Err(SectionError::Version {
                section: section.to_string(),
                version,
                min,
                max,
            })
        }
    }

    /// Wraps a component's error about the state of section `section`.
    pub fn state(section: &str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        SectionError::State {
            section: section.to_string(),
            source: Box::new(source),
        }
    }
}

/// A component whose state is sent once, while the guest is stopped (QEMU's `vmsd` devices).
///
/// The state is an opaque byte buffer on the wire; hopvm's devices use the JSON encoding of
/// their plain `…State` structs, so the section *is* the device's state type.
pub trait Snapshot: Send {
    /// The component's state.
    fn save(&mut self) -> Result<Vec<u8>, SectionError>;

    /// Restores state produced by `save` of section version `version`.
    fn restore(&mut self, data: &[u8], version: u32) -> Result<(), SectionError>;
}

/// Where a live section writes its body: bytes, and guest memory that the output may send
/// by reference, straight from the guest's mapping (one vectored write for many pages, no
/// copy), as QEMU's `qemu_put_buffer_async` does.
pub trait SectionOutput: Write {
    /// Writes the `len` bytes at `data`, which may be read only when the output is flushed;
    /// the default copies them at once.
    ///
    /// # Safety
    /// `data..data + len` must be readable now and stay mapped until the output has been
    /// flushed or dropped (guest memory: its mapping outlives the migration). The bytes may
    /// change meanwhile; what is sent is what they hold at flush time, so the caller must
    /// track such writes (RAM: the page's dirty bit was taken before, so a later write
    /// dirties it again and it is sent again).
    unsafe fn write_guest(&mut self, data: *const u8, len: usize) -> io::Result<()> {
        // SAFETY: readable now, per this function's contract.
        self.write_all(unsafe { std::slice::from_raw_parts(data, len) })
    }
}

/// A plain buffer copies (tests, snapshots to memory).
impl SectionOutput for Vec<u8> {}

/// A component sent in rounds while the guest runs (QEMU's `SaveVMHandlers` with the
/// `save_live_*` hooks). Every method has a no-op default.
pub trait LiveSection: Send {
    /// Source: whether this migration carries the section (QEMU's `is_active`; asked once, before
    /// [`begin`](Self::begin): an inactive section is left out of the stream entirely).
    fn is_active(&self) -> bool {
        true
    }

    /// Destination: whether a stream without this section is refused (QEMU's destination never
    /// insists on a section; hopvm's does on all but optional ones such as `block`).
    fn required_on_load(&self) -> bool {
        true
    }

    /// Source: the migration completed (the destination runs the guest): undo what `begin`
    /// set up, as [`cancel`](Self::cancel) does after a failure.
    fn finished(&mut self) {}

    /// Starts the migration: switch on dirty tracking, write the section's set-up data.
    fn begin(&mut self, _out: &mut dyn SectionOutput) -> Result<(), SectionError> {
        Ok(())
    }

    /// Bytes still to send (an estimate); `max_size` is what could be sent within the
    /// downtime limit, so a component may stop counting past it.
    fn pending(&mut self, _max_size: u64) -> u64 {
        0
    }

    /// Sends a batch of about `budget` bytes (at least one item, and holding the big lock for
    /// at most ~50 ms); returns true when nothing is left for this round.
    fn iterate(
        &mut self,
        _out: &mut dyn SectionOutput,
        _budget: u64,
    ) -> Result<bool, SectionError> {
        Ok(true)
    }

    /// With the guest stopped: sends everything that is left.
    fn complete(&mut self, _out: &mut dyn SectionOutput) -> Result<(), SectionError> {
        Ok(())
    }

    /// Everything written so far reached the transport.
    fn flushed(&mut self) {}

    /// Writing the buffered output to the transport failed: whatever this section wrote since
    /// the last [`flushed`](Self::flushed) never arrived (RAM puts those pages back as dirty).
    fn flush_failed(&mut self) {}

    /// The migration failed or was cancelled: undo what `begin` set up.
    fn cancel(&mut self) {}

    /// Destination side, before the stream arrives (`-incoming`, `migrate-incoming`): get
    /// ready to load, e.g. fault memory in while the source connects.
    fn prepare_load(&mut self) {}

    /// Destination side: reads one part of this section (a START, PART or END body).
    fn load(&mut self, _input: &mut dyn Read, _version: u32) -> Result<(), SectionError> {
        Ok(())
    }

    /// Destination side: the section's END part has loaded; nothing more comes for it
    /// (RAM stops faulting memory in ahead of the stream: the guest takes over).
    fn load_end(&mut self) {}

    /// Destination side: what the last [`load`](Self::load) covered, in words (RAM: the
    /// guest-physical pages), for an error about that part; `None` if there is nothing to say.
    fn last_load(&self) -> Option<String> {
        None
    }
}
