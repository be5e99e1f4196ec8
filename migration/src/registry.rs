//! The savevm handler registry, after QEMU's `savevm_state.handlers`: every migratable component
//! registers one section (id string, instance id, version) and the registry drives them all —
//! writing a stream on the source, dispatching one on the destination.
//!
//! Components that cannot be migrated register a *blocker* instead (QEMU's
//! `migrate_add_blocker`); `migrate` refuses to start while any blocker is registered.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use std::sync::Mutex;

use crate::integrity::IntegrityError;
use crate::return_path;
use crate::stream::{Record, StreamError, StreamReader, StreamWriter, MIG_CMD_OPEN_RETURN_PATH};
use crate::{LiveSection, SectionError, SectionOutput, Snapshot};

/// Errors driving the registered sections.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The stream framing is broken.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A section's handler failed.
    #[error("section {idstr} (instance {instance}): {source}")]
    Section {
        /// The section's id string.
        idstr: String,
        /// Its instance id.
        instance: u32,
        /// What failed.
        #[source]
        source: SectionError,
    },
    /// The stream has a section nobody registered.
    #[error("unknown section {idstr} (instance {instance})")]
    UnknownSection {
        /// The section's id string.
        idstr: String,
        /// Its instance id.
        instance: u32,
    },
    /// The stream's section is newer than this side understands.
    #[error("section {idstr} version {version} is newer than supported version {supported}")]
    UnsupportedVersion {
        /// The section's id string.
        idstr: String,
        /// The stream's version.
        version: u32,
        /// The highest version registered here.
        supported: u32,
    },
    /// A PART or END for a section that never started.
    #[error("section id {0} was never started")]
    UnknownSectionId(u32),
    /// A live section sent as FULL or the other way round.
    #[error("section {0} has the wrong kind (live vs. full)")]
    WrongKind(String),
    /// The stream ended without sections this side needs.
    #[error("stream ended without sections: {0}")]
    Missing(String),
    /// The stream ended before its last record, the VM description.
    #[error("the stream ended before the source finished it (cancelled or cut off)")]
    Unfinished,
    /// A command record this side does not implement.
    #[error("unsupported migration command {0}")]
    UnsupportedCommand(u16),
    /// The source's multifd set-up does not match this side's.
    #[error(transparent)]
    Multifd(#[from] crate::multifd::MultifdError),
}

/// What a registered section does.
pub enum Handler {
    /// Sent in rounds while the guest runs.
    Live(Box<dyn LiveSection>),
    /// Sent once, with the guest stopped.
    Snapshot(Box<dyn Snapshot>),
}

struct Entry {
    section_id: u32,
    idstr: String,
    instance: u32,
    version: u32,
    handler: Handler,
    /// Source: a live section this migration carries ([`LiveSection::is_active`] at begin).
    active: bool,
}

/// Wraps a section's error with the section's name.
fn section_err(idstr: &str, instance: u32) -> impl FnOnce(SectionError) -> RegistryError + '_ {
    move |source| RegistryError::Section {
        idstr: idstr.to_string(),
        instance,
        source,
    }
}

/// Adds what a live section last loaded (RAM: the pages) to an integrity mismatch.
fn with_load_detail(e: StreamError, h: &dyn LiveSection) -> RegistryError {
    match (e, h.last_load()) {
        (
            StreamError::Integrity(IntegrityError::Mismatch {
                what,
                stream,
                computed,
            }),
            Some(d),
        ) => StreamError::Integrity(IntegrityError::Mismatch {
            what: format!("{what}, {d}"),
            stream,
            computed,
        })
        .into(),
        (e, _) => e.into(),
    }
}

/// The first section id handed out.
const FIRST_SECTION_ID: u32 = 2;

/// A blocker's handle, to remove it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockerId(u64);

/// The registered sections, in registration order (which is stream order).
#[derive(Default)]
pub struct Registry {
    entries: Vec<Entry>,
    blockers: BTreeMap<BlockerId, String>,
    next_blocker: u64,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, idstr: &str, instance: u32, version: u32, handler: Handler) {
        self.entries.push(Entry {
            // QEMU numbers its own handlers so that RAM is section 2; ids from 2 up keep
            // hopvm's streams loadable by QEMU (which matches PART/END by the last id seen,
            // 0 by default).
            section_id: self.entries.len() as u32 + FIRST_SECTION_ID,
            idstr: idstr.to_string(),
            instance,
            version,
            handler,
            active: true,
        });
    }

    /// Registers a live section.
    pub fn register_live(
        &mut self,
        idstr: &str,
        instance: u32,
        version: u32,
        h: Box<dyn LiveSection>,
    ) {
        self.push(idstr, instance, version, Handler::Live(h));
    }

    /// Registers a section sent once at the end.
    pub fn register(&mut self, idstr: &str, instance: u32, version: u32, h: Box<dyn Snapshot>) {
        self.push(idstr, instance, version, Handler::Snapshot(h));
    }

    /// Registers a reason why the VM cannot be migrated now.
    pub fn add_blocker(&mut self, reason: impl Into<String>) -> BlockerId {
        let id = BlockerId(self.next_blocker);
        self.next_blocker += 1;
        self.blockers.insert(id, reason.into());
        id
    }

    /// Removes a blocker.
    pub fn remove_blocker(&mut self, id: BlockerId) {
        self.blockers.remove(&id);
    }

    /// The first reason migration is blocked, if any.
    pub fn blocker(&self) -> Option<&str> {
        self.blockers.values().next().map(String::as_str)
    }

    fn live(&mut self) -> impl Iterator<Item = (u32, &mut Box<dyn LiveSection>, &str, u32)> {
        self.entries
            .iter_mut()
            .filter_map(|e| match &mut e.handler {
                Handler::Live(h) if e.active => {
                    Some((e.section_id, h, e.idstr.as_str(), e.instance))
                }
                _ => None,
            })
    }

    /// Source: the stream header and every live section's START.
    pub fn begin<W: SectionOutput>(
        &mut self,
        w: &mut StreamWriter<W>,
    ) -> Result<(), RegistryError> {
        // The caller may have written the header and commands (the return path) already.
        if !w.has_header() {
            w.header()?;
        }
        for e in &mut self.entries {
            if let Handler::Live(h) = &mut e.handler {
                e.active = h.is_active();
                if !e.active {
                    continue;
                }
                w.section_start(e.section_id, &e.idstr, e.instance, e.version)?;
                let result = h.begin(w);
                result.map_err(section_err(&e.idstr, e.instance))?;
                w.footer(e.section_id)?;
            }
        }
        Ok(())
    }

    /// Source: bytes the live sections still have to send.
    pub fn pending(&mut self, max_size: u64) -> u64 {
        self.live().map(|(_, h, _, _)| h.pending(max_size)).sum()
    }

    /// Source: one PART of every live section, sharing `budget` bytes; true when all have
    /// nothing left this round.
    pub fn iterate<W: SectionOutput>(
        &mut self,
        w: &mut StreamWriter<W>,
        budget: u64,
    ) -> Result<bool, RegistryError> {
        let mut all_done = true;
        // One budget for all of them (RAM and disks share the bandwidth limit); each still
        // sends at least one item.
        let start = w.bytes_written();
        for (id, h, idstr, instance) in self.live() {
            w.section_part(id)?;
            let left = budget.saturating_sub(w.bytes_written() - start).max(1);
            let done = h.iterate(w, left).map_err(section_err(idstr, instance))?;
            w.footer(id)?;
            all_done &= done;
        }
        Ok(all_done)
    }

    /// Source, guest stopped: every live section's END, every other section in full, EOF and
    /// the VM description.
    pub fn complete<W: SectionOutput>(
        &mut self,
        w: &mut StreamWriter<W>,
    ) -> Result<(), RegistryError> {
        for e in &mut self.entries {
            match &mut e.handler {
                Handler::Live(_) if !e.active => {}
                Handler::Live(h) => {
                    w.section_end(e.section_id)?;
                    let result = h.complete(w);
                    result.map_err(section_err(&e.idstr, e.instance))?;
                    w.footer(e.section_id)?;
                }
                Handler::Snapshot(h) => {
                    let data = h.save().map_err(section_err(&e.idstr, e.instance))?;
                    w.section_full(e.section_id, &e.idstr, e.instance, e.version, &data)?;
                }
            }
        }
        w.eof_with_description()?;
        Ok(())
    }

    /// Source: the buffered output reached the transport.
    pub fn flushed(&mut self) {
        self.live().for_each(|(_, h, _, _)| h.flushed());
    }

    /// Source: the buffered output could not be sent.
    pub fn flush_failed(&mut self) {
        self.live().for_each(|(_, h, _, _)| h.flush_failed());
    }

    /// Source: the migration ended without completing.
    pub fn cancel(&mut self) {
        self.live().for_each(|(_, h, _, _)| h.cancel());
    }

    /// Source: the migration completed.
    pub fn finished(&mut self) {
        self.live().for_each(|(_, h, _, _)| h.finished());
    }

    /// Destination: every live section's `prepare_load`, before the stream arrives.
    pub fn prepare_load(&mut self) {
        self.live().for_each(|(_, h, _, _)| h.prepare_load());
    }

    /// Saves every non-live section, in order (a reset restores the power-on copy).
    pub fn save_snapshots(&mut self) -> Result<Vec<Vec<u8>>, RegistryError> {
        let mut out = Vec::new();
        for e in &mut self.entries {
            if let Handler::Snapshot(h) = &mut e.handler {
                let data = h.save().map_err(section_err(&e.idstr, e.instance))?;
                out.push(data);
            }
        }
        Ok(out)
    }

    /// Restores what [`save_snapshots`](Self::save_snapshots) returned to the sections whose
    /// id string `select` accepts; the others stay as they are.
    pub fn restore_snapshots(
        &mut self,
        states: &[Vec<u8>],
        select: &dyn Fn(&str) -> bool,
    ) -> Result<(), RegistryError> {
        let mut states = states.iter();
        for e in &mut self.entries {
            if let Handler::Snapshot(h) = &mut e.handler {
                let data = states
                    .next()
                    .ok_or_else(|| RegistryError::Missing(e.idstr.clone()))?;
                if !select(&e.idstr) {
                    continue;
                }
                h.restore(data, e.version)
                    .map_err(section_err(&e.idstr, e.instance))?;
            }
        }
        Ok(())
    }

    fn find(&self, idstr: &str, instance: u32) -> Result<usize, RegistryError> {
        self.entries
            .iter()
            .position(|e| e.idstr == idstr && e.instance == instance)
            .ok_or_else(|| RegistryError::UnknownSection {
                idstr: idstr.to_string(),
                instance,
            })
    }

    /// Destination: takes the handler of live section `index` out for a load that reads the
    /// network, leaving a placeholder, so the registry is not locked meanwhile.
    fn take_live(&mut self, index: usize) -> Result<Box<dyn LiveSection>, RegistryError> {
        let entry = &mut self.entries[index];
        match std::mem::replace(&mut entry.handler, Handler::Live(Box::new(Loading))) {
            Handler::Live(h) => Ok(h),
            other => {
                entry.handler = other;
                Err(RegistryError::WrongKind(entry.idstr.clone()))
            }
        }
    }

    fn put_live(&mut self, index: usize, h: Box<dyn LiveSection>) {
        self.entries[index].handler = Handler::Live(h);
    }

    /// Destination: reads a whole stream, handing every section to its handler.
    ///
    /// Every registered section must appear in the stream, and the stream must end with its
    /// VM description (the last thing a source sends: a stream cut anywhere before it, by a
    /// cancel or a broken connection, is refused); an unknown section, a newer version, a
    /// broken footer or a handler's error ends the load with an error.
    pub fn load<R: Read>(
        &mut self,
        r: &mut StreamReader<R>,
    ) -> Result<IncomingLoad, RegistryError> {
        let me = Mutex::new(std::mem::take(self));
        let result = Self::load_locked(&me, r);
        *self = vmm_sync::into_inner(me);
        result
    }

    /// Like [`load`](Self::load) on a registry shared with other threads: the lock is taken
    /// only to look sections up and hand them their data, never while waiting for the
    /// stream — a FULL section's data is read first, a live section's handler is taken out of
    /// the registry while it reads its part.
    pub fn load_locked<R: Read>(
        registry: &Mutex<Registry>,
        r: &mut StreamReader<R>,
    ) -> Result<IncomingLoad, RegistryError> {
        Self::load_locked_with(registry, r, &mut |_, _| Ok(()))
    }

    /// [`load_locked`](Self::load_locked), handing every command record the stream carries
    /// (`MIG_CMD_*`: the return path's open and ping, hopvm's switchover handshake) to
    /// `on_command` as it arrives; unknown commands are refused before it sees them.
    pub fn load_locked_with<R: Read>(
        registry: &Mutex<Registry>,
        r: &mut StreamReader<R>,
        on_command: &mut CommandHandler<'_>,
    ) -> Result<IncomingLoad, RegistryError> {
        let lock = || vmm_sync::lock(registry);
        let mut load = IncomingLoad {
            started: HashMap::new(),
            seen: vec![false; lock().entries.len()],
            described: false,
            return_path: false,
            switchover: false,
        };
        while let Some(record) = r.next_record()? {
            match record {
                Record::Header | Record::Eof => {}
                Record::VmDescription(_) => load.described = true,
                Record::Command { cmd, data } => {
                    match cmd {
                        MIG_CMD_OPEN_RETURN_PATH => load.return_path = true,
                        return_path::MIG_CMD_PING => {}
                        return_path::MIG_CMD_X_HOPVM_SWITCHOVER => load.switchover = true,
                        crate::multifd::MIG_CMD_X_HOPVM_MULTIFD => {}
                        _ => return Err(RegistryError::UnsupportedCommand(cmd)),
                    }
                    on_command(cmd, &data)?;
                }
                Record::Footer { id } => {
                    return Err(StreamError::BadFooter {
                        expected: id,
                        found: String::from("a footer outside a section"),
                    }
                    .into())
                }
                Record::SectionFull {
                    id,
                    idstr,
                    instance,
                    version,
                } => {
                    let index = lock().check_section(&idstr, instance, version)?;
                    let data = r.read_full_data()?;
                    // The footer (and with x-integrity the checksum) is checked before the
                    // component sees its state.
                    r.expect_footer(id)?;
                    {
                        let mut reg = lock();
                        let entry = &mut reg.entries[index];
                        match &mut entry.handler {
                            Handler::Snapshot(h) => h
                                .restore(&data, version)
                                .map_err(section_err(&entry.idstr, entry.instance))?,
                            Handler::Live(_) => return Err(RegistryError::WrongKind(idstr)),
                        }
                    }
                    load.seen[index] = true;
                }
                Record::SectionStart {
                    id,
                    idstr,
                    instance,
                    version,
                } => {
                    let index = lock().check_section(&idstr, instance, version)?;
                    load.started.insert(id, (index, version));
                    load.seen[index] = true;
                    Self::load_live(registry, r, id, index, version)?;
                }
                Record::SectionPart { id } | Record::SectionEnd { id } => {
                    let (index, version) = *load
                        .started
                        .get(&id)
                        .ok_or(RegistryError::UnknownSectionId(id))?;
                    Self::load_live(registry, r, id, index, version)?;
                    if matches!(record, Record::SectionEnd { .. }) {
                        if let Handler::Live(h) = &mut lock().entries[index].handler {
                            h.load_end();
                        }
                    }
                }
            }
        }
        let reg = lock();
        let missing: Vec<String> = reg
            .entries
            .iter()
            .zip(&load.seen)
            .filter(|(e, seen)| {
                !**seen && !matches!(&e.handler, Handler::Live(h) if !h.required_on_load())
            })
            .map(|(e, _)| format!("{} {}", e.idstr, e.instance))
            .collect();
        if !missing.is_empty() {
            return Err(RegistryError::Missing(missing.join(", ")));
        }
        if !load.described {
            return Err(RegistryError::Unfinished);
        }
        Ok(load)
    }

    /// The entry for a START or FULL record, if its version is one this side reads.
    fn check_section(
        &self,
        idstr: &str,
        instance: u32,
        version: u32,
    ) -> Result<usize, RegistryError> {
        let index = self.find(idstr, instance)?;
        let supported = self.entries[index].version;
        if version > supported {
            return Err(RegistryError::UnsupportedVersion {
                idstr: idstr.to_string(),
                version,
                supported,
            });
        }
        Ok(index)
    }

    /// One part of live section `index` (stream id `id`) and its footer, read with the
    /// handler out of the registry.
    fn load_live<R: Read>(
        registry: &Mutex<Registry>,
        r: &mut StreamReader<R>,
        id: u32,
        index: usize,
        version: u32,
    ) -> Result<(), RegistryError> {
        let lock = || vmm_sync::lock(registry);
        let (mut h, idstr, instance) = {
            let mut reg = lock();
            let h = reg.take_live(index)?;
            let e = &reg.entries[index];
            (h, e.idstr.clone(), e.instance)
        };
        let result = h
            .load(r, version)
            .map_err(section_err(&idstr, instance))
            .and_then(|()| {
                r.expect_footer(id)
                    .map_err(|e| with_load_detail(e, h.as_ref()))
            });
        lock().put_live(index, h);
        result
    }
}

/// What a destination does with a command record of the stream (`MIG_CMD_*` number, data).
pub type CommandHandler<'a> = dyn FnMut(u16, &[u8]) -> Result<(), RegistryError> + 'a;

/// Stands in for a live section's handler while the incoming thread has it.
struct Loading;

impl LiveSection for Loading {}

/// What a finished load found besides the sections.
#[derive(Debug)]
pub struct IncomingLoad {
    started: HashMap<u32, (usize, u32)>,
    seen: Vec<bool>,
    described: bool,
    return_path: bool,
    switchover: bool,
}

impl IncomingLoad {
    /// Whether the source asked for a return path (`MIG_CMD_OPEN_RETURN_PATH`).
    pub fn return_path(&self) -> bool {
        self.return_path
    }

    /// Whether the source runs hopvm's switchover handshake: the destination waits for its
    /// go-ahead before starting the guest ([`crate::return_path`]).
    pub fn switchover_handshake(&self) -> bool {
        self.switchover
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A snapshot section holding a byte vector shared with the test.
    struct Blob(Arc<Mutex<Vec<u8>>>);

    impl Snapshot for Blob {
        fn save(&mut self) -> Result<Vec<u8>, SectionError> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn restore(&mut self, data: &[u8], _version: u32) -> Result<(), SectionError> {
            if data.first() == Some(&0xff) {
                return Err(SectionError::Unsupported(String::from("bad blob")));
            }
            *self.0.lock().unwrap() = data.to_vec();
            Ok(())
        }
    }

    /// A live section counting up to `rounds` parts of one byte each.
    struct Counter {
        rounds: u8,
        sent: u8,
        received: Arc<Mutex<Vec<u8>>>,
    }

    impl LiveSection for Counter {
        fn pending(&mut self, _max: u64) -> u64 {
            u64::from(self.rounds - self.sent)
        }
        fn iterate(
            &mut self,
            out: &mut dyn SectionOutput,
            _budget: u64,
        ) -> Result<bool, SectionError> {
            self.sent += 1;
            out.write_all(&[self.sent])?;
            Ok(self.sent == self.rounds)
        }
        fn complete(&mut self, out: &mut dyn SectionOutput) -> Result<(), SectionError> {
            out.write_all(&[0xee])?;
            Ok(())
        }
        fn load(&mut self, input: &mut dyn Read, _version: u32) -> Result<(), SectionError> {
            let mut b = [0u8];
            if self.received.lock().unwrap().is_empty() && self.sent == 0 {
                // START carries no body.
                self.sent = 1;
                return Ok(());
            }
            input.read_exact(&mut b)?;
            self.received.lock().unwrap().push(b[0]);
            Ok(())
        }
    }

    type Shared = Arc<Mutex<Vec<u8>>>;

    fn pair() -> (Registry, Shared, Shared) {
        let blob = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let mut r = Registry::new();
        r.register_live(
            "counter",
            0,
            1,
            Box::new(Counter {
                rounds: 3,
                sent: 0,
                received: received.clone(),
            }),
        );
        r.register("blob", 0, 2, Box::new(Blob(blob.clone())));
        (r, blob, received)
    }

    fn stream() -> Vec<u8> {
        stream_with(StreamWriter::new(Vec::new()))
    }

    fn stream_with(mut w: StreamWriter<Vec<u8>>) -> Vec<u8> {
        let (mut src, blob, _) = pair();
        *blob.lock().unwrap() = vec![1, 2, 3];
        src.begin(&mut w).unwrap();
        assert_eq!(src.pending(0), 3);
        while !src.iterate(&mut w, 1).unwrap() {}
        src.complete(&mut w).unwrap();
        w.into_inner()
    }

    #[test]
    fn round_trip() {
        let bytes = stream();
        let (mut dst, blob, received) = pair();
        dst.load(&mut StreamReader::new(&bytes[..])).unwrap();
        assert_eq!(*blob.lock().unwrap(), vec![1, 2, 3]);
        assert_eq!(*received.lock().unwrap(), vec![1, 2, 3, 0xee]);
    }

    #[test]
    fn unknown_missing_and_newer_sections_fail() {
        let bytes = stream();
        // A destination without the blob section.
        let mut only_live = Registry::new();
        only_live.register_live(
            "counter",
            0,
            1,
            Box::new(Counter {
                rounds: 3,
                sent: 0,
                received: Arc::new(Mutex::new(Vec::new())),
            }),
        );
        assert!(matches!(
            only_live.load(&mut StreamReader::new(&bytes[..])),
            Err(RegistryError::UnknownSection { .. })
        ));
        // A destination with an extra section the stream lacks.
        let (mut extra, _, _) = pair();
        extra.register(
            "more",
            0,
            1,
            Box::new(Blob(Arc::new(Mutex::new(Vec::new())))),
        );
        assert!(matches!(
            extra.load(&mut StreamReader::new(&bytes[..])),
            Err(RegistryError::Missing(_))
        ));
        // A destination that only knows version 1 of the blob.
        let mut old = Registry::new();
        old.register_live(
            "counter",
            0,
            1,
            Box::new(Counter {
                rounds: 3,
                sent: 0,
                received: Arc::new(Mutex::new(Vec::new())),
            }),
        );
        old.register(
            "blob",
            0,
            1,
            Box::new(Blob(Arc::new(Mutex::new(Vec::new())))),
        );
        assert!(matches!(
            old.load(&mut StreamReader::new(&bytes[..])),
            Err(RegistryError::UnsupportedVersion { .. })
        ));
    }

    /// Where the EOF marker before the VM description is.
    fn description_start(bytes: &[u8]) -> usize {
        (0..bytes.len() - 6)
            .rev()
            .find(|&i| {
                bytes[i] == 0 && bytes[i + 1] == 6 && {
                    let n = u32::from_be_bytes(bytes[i + 2..i + 6].try_into().unwrap()) as usize;
                    i + 6 + n == bytes.len()
                }
            })
            .unwrap()
    }

    #[test]
    fn truncated_and_corrupted_streams_fail() {
        let bytes = stream();
        // Every byte is needed, the VM description included.
        for len in 0..bytes.len() {
            let (mut dst, _, _) = pair();
            assert!(
                dst.load(&mut StreamReader::new(&bytes[..len])).is_err(),
                "len {len}"
            );
        }
        for i in 8..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0xff;
            let (mut dst, _, _) = pair();
            // Must not panic; most corruptions are errors.
            let _ = dst.load(&mut StreamReader::new(&bad[..]));
        }
    }

    #[test]
    fn a_stream_without_its_description_is_refused() {
        let bytes = stream();
        // Cut right after EOF: every section arrived, but not the source's last record.
        let eof = description_start(&bytes) + 1;
        assert_eq!(bytes[eof - 1], 0, "EOF marker");
        let (mut dst, _, _) = pair();
        assert!(matches!(
            dst.load(&mut StreamReader::new(&bytes[..eof])),
            Err(RegistryError::Unfinished)
        ));
        let (mut dst, _, _) = pair();
        assert!(dst.load(&mut StreamReader::new(&bytes[..])).is_ok());
    }

    /// Reads `bytes`, asserting on every read that the registry is not locked.
    struct Unlocked<'a> {
        bytes: &'a [u8],
        registry: &'a Mutex<Registry>,
        reads: usize,
    }

    impl Read for Unlocked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            assert!(
                self.registry.try_lock().is_ok(),
                "registry locked while reading the stream"
            );
            self.reads += 1;
            // A byte at a time: every field is a separate wait on the "network".
            let n = buf.len().min(self.bytes.len()).min(1);
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn load_locked_never_holds_the_lock_while_reading() {
        let bytes = stream();
        let (dst, blob, received) = pair();
        let registry = Mutex::new(dst);
        let mut input = Unlocked {
            bytes: &bytes,
            registry: &registry,
            reads: 0,
        };
        let load = Registry::load_locked(&registry, &mut StreamReader::new(&mut input)).unwrap();
        assert!(!load.return_path());
        assert!(input.reads >= bytes.len());
        assert_eq!(*blob.lock().unwrap(), vec![1, 2, 3]);
        assert_eq!(*received.lock().unwrap(), vec![1, 2, 3, 0xee]);
    }

    #[test]
    fn snapshots_round_trip() {
        let (mut r, blob, _) = pair();
        *blob.lock().unwrap() = vec![7];
        let saved = r.save_snapshots().unwrap();
        *blob.lock().unwrap() = vec![8];
        r.restore_snapshots(&saved, &|_| true).unwrap();
        assert_eq!(*blob.lock().unwrap(), vec![7]);
        *blob.lock().unwrap() = vec![9];
        r.restore_snapshots(&saved, &|name| name != "blob").unwrap();
        assert_eq!(*blob.lock().unwrap(), vec![9]);
        assert!(r.restore_snapshots(&[], &|_| true).is_err());
    }

    /// A live section that is in the stream only when switched on (as `block`).
    struct Optional(bool);

    impl LiveSection for Optional {
        fn is_active(&self) -> bool {
            self.0
        }
        fn required_on_load(&self) -> bool {
            false
        }
        fn begin(&mut self, out: &mut dyn SectionOutput) -> Result<(), SectionError> {
            Ok(out.write_all(&[0x41])?)
        }
        fn complete(&mut self, out: &mut dyn SectionOutput) -> Result<(), SectionError> {
            Ok(out.write_all(&[0x43])?)
        }
        fn iterate(
            &mut self,
            out: &mut dyn SectionOutput,
            _budget: u64,
        ) -> Result<bool, SectionError> {
            out.write_all(&[0x42])?;
            Ok(true)
        }
        fn load(&mut self, input: &mut dyn Read, _version: u32) -> Result<(), SectionError> {
            // One byte in every part.
            let mut b = [0u8; 1];
            input.read_exact(&mut b)?;
            Ok(())
        }
    }

    #[test]
    fn an_inactive_section_leaves_the_stream_unchanged() {
        let plain = stream();
        let with = |on: bool| {
            let (mut src, blob, _) = pair();
            src.register_live("optional", 0, 1, Box::new(Optional(on)));
            *blob.lock().unwrap() = vec![1, 2, 3];
            let mut w = StreamWriter::new(Vec::new());
            src.begin(&mut w).unwrap();
            while !src.iterate(&mut w, 1).unwrap() {}
            src.complete(&mut w).unwrap();
            w.into_inner()
        };
        assert_eq!(with(false), plain, "byte for byte");
        // A destination with the optional section loads a stream without it...
        let (mut dst, blob, _) = pair();
        dst.register_live("optional", 0, 1, Box::new(Optional(false)));
        dst.load(&mut StreamReader::new(&plain[..])).unwrap();
        assert_eq!(*blob.lock().unwrap(), vec![1, 2, 3]);
        // ... and with it; one without it refuses a stream that has it.
        let active = with(true);
        assert_ne!(active, plain);
        let (mut dst, _, _) = pair();
        dst.register_live("optional", 0, 1, Box::new(Optional(false)));
        dst.load(&mut StreamReader::new(&active[..])).unwrap();
        let (mut dst, _, _) = pair();
        assert!(matches!(
            dst.load(&mut StreamReader::new(&active[..])),
            Err(RegistryError::UnknownSection { .. })
        ));
    }

    #[test]
    fn blockers() {
        let mut r = Registry::new();
        assert_eq!(r.blocker(), None);
        let a = r.add_blocker("device x cannot migrate");
        assert_eq!(r.blocker(), Some("device x cannot migrate"));
        r.remove_blocker(a);
        assert_eq!(r.blocker(), None);
    }

    fn integrity_stream() -> Vec<u8> {
        stream_with(StreamWriter::with_integrity(Vec::new()))
    }

    #[test]
    fn integrity_round_trip_and_format() {
        let plain = stream();
        let bytes = integrity_stream();
        let (mut dst, blob, received) = pair();
        dst.load(&mut StreamReader::with_integrity(&bytes[..]))
            .unwrap();
        assert_eq!(*blob.lock().unwrap(), vec![1, 2, 3]);
        assert_eq!(*received.lock().unwrap(), vec![1, 2, 3, 0xee]);
        // One 13-byte record after each of the 6 footers (START, 3 PARTs, END, FULL) and one
        // at the end; without the capability nothing changes.
        assert_eq!(bytes.len(), plain.len() + 7 * 13);
        assert_eq!(
            &bytes[bytes.len() - 13..bytes.len() - 8],
            &[0x49, 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn integrity_rejects_every_mutation_and_truncation() {
        let bytes = integrity_stream();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                let (mut dst, _, _) = pair();
                let r = dst.load(&mut StreamReader::with_integrity(&bad[..]));
                assert!(r.is_err(), "byte {i} ^ {flip:#x} loaded");
            }
        }
        for len in 0..bytes.len() {
            let (mut dst, _, _) = pair();
            let r = dst.load(&mut StreamReader::with_integrity(&bytes[..len]));
            assert!(r.is_err(), "cut at {len} loaded");
        }
        // What follows the final checksum is not read (the connection may stay open for
        // the return path), so it cannot change what loaded.
    }

    #[test]
    fn integrity_mismatch_names_the_section_before_it_is_applied() {
        let bytes = integrity_stream();
        // The blob's data: [1, 2, 3] after its be32 length; change the 2.
        let pos = bytes
            .windows(7)
            .position(|w| w == [0, 0, 0, 3, 1, 2, 3])
            .unwrap()
            + 5;
        let mut bad = bytes.clone();
        bad[pos] = 9;
        let (mut dst, blob, _) = pair();
        let e = dst
            .load(&mut StreamReader::with_integrity(&bad[..]))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("x-integrity checksum mismatch in section blob (instance 0)"),
            "{msg}"
        );
        // The restore never ran.
        assert!(blob.lock().unwrap().is_empty());
        // Without the capability the same change loads.
        let plain = stream();
        let mut bad = plain.clone();
        let pos = plain
            .windows(7)
            .position(|w| w == [0, 0, 0, 3, 1, 2, 3])
            .unwrap()
            + 5;
        bad[pos] = 9;
        let (mut dst, blob, _) = pair();
        dst.load(&mut StreamReader::new(&bad[..])).unwrap();
        assert_eq!(*blob.lock().unwrap(), vec![1, 9, 3]);
    }

    #[test]
    fn integrity_capability_mismatch_is_explained() {
        let (mut dst, _, _) = pair();
        let e = dst
            .load(&mut StreamReader::new(&integrity_stream()[..]))
            .unwrap_err();
        assert!(
            e.to_string().contains("enable the x-integrity capability"),
            "{e}"
        );
        let (mut dst, _, _) = pair();
        let e = dst
            .load(&mut StreamReader::with_integrity(&stream()[..]))
            .unwrap_err();
        assert!(
            e.to_string().contains("is x-integrity on at the source"),
            "{e}"
        );
    }
}
