//! Multifd: RAM pages over several extra connections to the same URI, in QEMU 7.2's format
//! (`migration/multifd.c`).
//!
//! With the `multifd` capability on both sides, the source opens `multifd-channels` more
//! connections to the migration URI after the main one ([`crate::transport::connect_channel`];
//! `exec:` and `fd:` cannot, as in QEMU). Each channel starts with a 64-byte handshake,
//! [`ChannelInit`] (QEMU's `MultiFDInit_t`: magic `0x11223344`, version 1, the source's UUID —
//! all zero, hopvm has none, as QEMU without `-uuid` — and the channel id). After it come page
//! packets, [`Packet`] (`MultiFDPacket_t`: magic, version, flags, pages allocated (128),
//! normal pages, the size of the page data, a packet number, the RAM block's name and one
//! be64 offset per page slot), each followed by its pages' data.
//!
//! Which page goes where is QEMU 7.2's split: all-zero pages stay on the main channel as ZERO
//! records, every other page goes in a packet. The channels are synchronised with the main
//! stream at every end of a RAM part, as QEMU 7.2's `multifd_send_sync_main` /
//! `multifd_recv_sync_main` do: before the RAM section writes its EOS on the main channel,
//! every channel gets a packet flagged [`MULTIFD_FLAG_SYNC`]; the destination, at that EOS,
//! waits until every channel has loaded up to its SYNC packet, and each channel waits there
//! until the main channel has read its EOS. So a page sent in two rounds (say on a channel
//! first, then as a ZERO record on the main channel) always lands in the order sent.
//!
//! The destination tells the channels apart from the main channel by their first four bytes
//! (the stream's `QEVM` or the multifd magic), whatever order they connect in ([`accept`]).
//!
//! With `tls-creds` set, every channel runs TLS 1.3, as in QEMU 7.2: the source's multifd
//! channels each run their own handshake, with the main channel's credentials and host name,
//! before their `MultiFDInit_t` ([`crate::transport::Outgoing::open_channel`]); the
//! destination runs the server handshake on every connection it accepts, then reads the four
//! bytes through it. Packets are sealed into full TLS records by each channel's sending
//! thread, on its own session (no lock shared between the channels).
//!
//! Between two hopvm processes with the return path on, the source also announces its
//! channel count on the main channel ([`MIG_CMD_X_HOPVM_MULTIFD`], a command number QEMU leaves
//! free), so that a destination whose capability or channel count differs refuses the stream
//! with a clear error instead of waiting for channels that never come or loading a stream
//! whose pages went elsewhere.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vmm_sync::lock;

use crate::rate_limit::BufferedOutput;
use crate::stream::{PAGE_SIZE, QEMU_VM_FILE_MAGIC};
use crate::transport::tls::{ServerTls, TlsError};
use crate::transport::{ChannelStream, ConnectCancel, Incoming, IncomingChannel, TransportError};
use crate::SectionOutput;

/// `MultiFDInit_t.magic` and `MultiFDPacket_t.magic`.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// `MULTIFD_VERSION`.
pub const MULTIFD_VERSION: u32 = 1;
/// `MULTIFD_FLAG_SYNC`: the last packet of a round on this channel.
pub const MULTIFD_FLAG_SYNC: u32 = 1;
/// `MULTIFD_FLAG_COMPRESSION_MASK`: 0 = no compression, the only one hopvm has.
pub const MULTIFD_FLAG_COMPRESSION_MASK: u32 = 0xe;
/// Page slots per packet: QEMU's `MULTIFD_PACKET_SIZE` (512 KiB) in 4 KiB pages.
pub const PAGES_PER_PACKET: u32 = 128;
/// Bytes of the channel handshake (`MultiFDInit_t`).
pub const INIT_LEN: usize = 64;
/// Bytes of a packet before its offsets (`MultiFDPacket_t` without `offset[]`).
pub const PACKET_HEADER_LEN: usize = 320;
/// Bytes of `MultiFDPacket_t.ramblock`.
const RAMBLOCK_LEN: usize = 256;
/// `multifd-channels`' default, QEMU 7.2's.
pub const DEFAULT_CHANNELS: u8 = 2;
/// hopvm: the source sends RAM over this many multifd channels (be32), right after
/// [`crate::return_path::MIG_CMD_X_HOPVM_SWITCHOVER`].
pub const MIG_CMD_X_HOPVM_MULTIFD: u16 = 0x7e04;
/// How long an accepted channel may take to send its handshake.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of multifd channels.
#[derive(Debug, thiserror::Error)]
pub enum MultifdError {
    /// A channel handshake or packet with another magic number.
    #[error("multifd: received packet magic {0:#x} expected {MULTIFD_MAGIC:#x}")]
    Magic(u32),
    /// A channel handshake of another version.
    #[error("multifd: received channel version {0} expected {MULTIFD_VERSION}")]
    ChannelVersion(u32),
    /// A packet of another version.
    #[error("multifd: received packet version {0} expected {MULTIFD_VERSION}")]
    PacketVersion(u32),
    /// A channel of another source.
    #[error("multifd: received uuid '{found}' and expected uuid '{expected}' for channel {id}")]
    Uuid {
        /// The channel's UUID.
        found: String,
        /// This side's.
        expected: String,
        /// The channel.
        id: u8,
    },
    /// A channel id past the configured count.
    #[error("multifd: received channel id {id} is greater than number of channels {channels}")]
    ChannelId {
        /// The id received.
        id: u8,
        /// `multifd-channels` here.
        channels: u8,
    },
    /// Two channels with one id.
    #[error("multifd: channel {0} connected twice")]
    DuplicateChannel(u8),
    /// More page slots than a packet has.
    #[error("multifd: received packet with {pages} pages and expected maximum pages are {max}")]
    PagesAlloc {
        /// Slots in the packet.
        pages: u32,
        /// This side's maximum.
        max: u32,
    },
    /// More pages than slots.
    #[error(
        "multifd: received packet with {normal} normal pages and expected maximum pages are {max}"
    )]
    NormalPages {
        /// Pages in the packet.
        normal: u32,
        /// Its slots.
        max: u32,
    },
    /// The page data's size does not match the page count.
    #[error("multifd: received packet with {normal} pages and {size} bytes of page data")]
    PacketSize {
        /// Pages in the packet.
        normal: u32,
        /// `next_packet_size`.
        size: u32,
    },
    /// Compression or unknown flags.
    #[error(
        "multifd: flags received {0:#x}, flags expected 0x0 or 0x1 (hopvm sends and reads \
         uncompressed pages only)"
    )]
    Flags(u32),
    /// A RAM block name without its terminating NUL, or not UTF-8.
    #[error("multifd: ram block name is not a terminated string")]
    BlockName,
    /// A RAM block this side does not have.
    #[error("multifd: unknown ram block {0}")]
    UnknownBlock(String),
    /// A page offset past the block's end or not page-aligned.
    #[error("multifd: offset {offset:#x} outside ram block {block} ({size:#x} bytes)")]
    Offset {
        /// The block.
        block: String,
        /// The offset.
        offset: u64,
        /// The block's size.
        size: u64,
    },
    /// Reading or writing the channel failed.
    #[error("multifd channel {id}: {source}")]
    Io {
        /// The channel.
        id: u8,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A channel's packet was refused.
    #[error("multifd channel {id}: {source}")]
    Channel {
        /// The channel.
        id: u8,
        /// Why.
        #[source]
        source: Box<MultifdError>,
    },
    /// A channel ended before the migration did.
    #[error("multifd channel {0} was closed by the source before the end of the migration")]
    Closed(u8),
    /// An accepted connection did not send its 64-byte handshake.
    #[error("multifd: cannot read a channel's handshake: {0}")]
    Handshake(#[source] io::Error),
    /// A channel could not be opened.
    #[error("cannot open multifd channel {id}: {source}")]
    Connect {
        /// The channel.
        id: u8,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// Accepting connections failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A connection that is neither a stream nor a multifd channel.
    #[error(
        "a connection is neither a migration stream nor a multifd channel (it starts with \
         {0:#010x})"
    )]
    UnknownMagic(u32),
    /// The source uses multifd, this side does not.
    #[error(
        "the source sends RAM over {0} multifd channel(s) but the multifd capability is off \
         here: enable it on both sides (migrate-set-capabilities before migrate-incoming)"
    )]
    NotEnabledHere(u32),
    /// The channel counts differ.
    #[error(
        "the source uses {theirs} multifd channel(s), this side expects {ours}: set \
         multifd-channels the same on both sides"
    )]
    ChannelCount {
        /// The source's.
        theirs: u32,
        /// This side's.
        ours: u8,
    },
    /// This side uses multifd, the source does not.
    #[error(
        "the multifd capability is on here but the source does not use multifd: enable it on \
         both sides, or on neither"
    )]
    NotEnabledAtSource,
    /// The announcement command is malformed.
    #[error("malformed multifd announcement ({0} bytes)")]
    Announcement(usize),
    /// The migration ended while a channel waited.
    #[error("multifd: the migration ended")]
    Stopped,
    /// A thread could not be started.
    #[error("cannot start a multifd thread: {0}")]
    Thread(#[source] io::Error),
    /// The first error of the receiving channels (reported again to whoever waits).
    #[error(transparent)]
    Shared(Arc<MultifdError>),
}

/// `MultiFDInit_t`: the first 64 bytes of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelInit {
    /// The source VM's UUID.
    pub uuid: [u8; 16],
    /// The channel's id, 0-based.
    pub id: u8,
}

impl ChannelInit {
    /// Big-endian, as QEMU sends it; the reserved bytes are zero.
    pub fn encode(&self) -> [u8; INIT_LEN] {
        let mut b = [0u8; INIT_LEN];
        b[0..4].copy_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&MULTIFD_VERSION.to_be_bytes());
        b[8..24].copy_from_slice(&self.uuid);
        b[24] = self.id;
        b
    }

    /// Checks the magic and version.
    pub fn decode(b: &[u8; INIT_LEN]) -> Result<Self, MultifdError> {
        let magic = be32(&b[0..4]);
        if magic != MULTIFD_MAGIC {
            return Err(MultifdError::Magic(magic));
        }
        let version = be32(&b[4..8]);
        if version != MULTIFD_VERSION {
            return Err(MultifdError::ChannelVersion(version));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        Ok(Self { uuid, id: b[24] })
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `MultiFDPacket_t` without its page data: what precedes the pages on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// [`MULTIFD_FLAG_SYNC`] or 0.
    pub flags: u32,
    /// Page slots (offsets sent): [`PAGES_PER_PACKET`].
    pub pages_alloc: u32,
    /// The packet number, counted over all channels.
    pub packet_num: u64,
    /// The RAM block of every page (empty when there are none).
    pub ramblock: String,
    /// Byte offsets of the pages in the block; their data follows, in this order.
    pub offsets: Vec<u64>,
}

impl Packet {
    /// The header and the `pages_alloc` offset slots (unused ones zero), big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let slots = (self.pages_alloc as usize).max(self.offsets.len());
        let mut b = Vec::with_capacity(PACKET_HEADER_LEN + 8 * slots);
        let normal = self.offsets.len() as u32;
        for v in [
            MULTIFD_MAGIC,
            MULTIFD_VERSION,
            self.flags,
            slots as u32,
            normal,
            normal * PAGE_SIZE as u32,
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&self.packet_num.to_be_bytes());
        b.extend_from_slice(&[0u8; 32]);
        let mut name = [0u8; RAMBLOCK_LEN];
        let n = self.ramblock.len().min(RAMBLOCK_LEN - 1);
        name[..n].copy_from_slice(&self.ramblock.as_bytes()[..n]);
        b.extend_from_slice(&name);
        for i in 0..slots {
            b.extend_from_slice(&self.offsets.get(i).copied().unwrap_or(0).to_be_bytes());
        }
        b
    }

    /// Reads one packet's header and offsets from `r` (not its page data), refusing anything
    /// QEMU's receiver would and slot counts over `max_pages`. `Ok(None)`: the channel ended
    /// cleanly, before a packet.
    pub fn read(r: &mut dyn Read, max_pages: u32) -> Result<Option<Self>, PacketReadError> {
        let mut h = [0u8; PACKET_HEADER_LEN];
        if !read_or_eof(r, &mut h).map_err(PacketReadError::Io)? {
            return Ok(None);
        }
        let magic = be32(&h[0..4]);
        if magic != MULTIFD_MAGIC {
            return Err(MultifdError::Magic(magic).into());
        }
        let version = be32(&h[4..8]);
        if version != MULTIFD_VERSION {
            return Err(MultifdError::PacketVersion(version).into());
        }
        let flags = be32(&h[8..12]);
        if flags & !MULTIFD_FLAG_SYNC != 0 {
            return Err(MultifdError::Flags(flags).into());
        }
        let pages_alloc = be32(&h[12..16]);
        if pages_alloc > max_pages {
            return Err(MultifdError::PagesAlloc {
                pages: pages_alloc,
                max: max_pages,
            }
            .into());
        }
        let normal = be32(&h[16..20]);
        if normal > pages_alloc {
            return Err(MultifdError::NormalPages {
                normal,
                max: pages_alloc,
            }
            .into());
        }
        let size = be32(&h[20..24]);
        if u64::from(size) != u64::from(normal) * PAGE_SIZE {
            return Err(MultifdError::PacketSize { normal, size }.into());
        }
        let packet_num = be64(&h[24..32]);
        let name = &h[64..64 + RAMBLOCK_LEN];
        let end = name
            .iter()
            .position(|b| *b == 0)
            .ok_or(MultifdError::BlockName)?;
        let ramblock = std::str::from_utf8(&name[..end])
            .map_err(|_| MultifdError::BlockName)?
            .to_owned();
        let mut raw = vec![0u8; 8 * pages_alloc as usize];
        r.read_exact(&mut raw).map_err(PacketReadError::Io)?;
        let offsets = raw
            .chunks_exact(8)
            .take(normal as usize)
            .map(be64)
            .collect();
        Ok(Some(Self {
            flags,
            pages_alloc,
            packet_num,
            ramblock,
            offsets,
        }))
    }
}

/// Why [`Packet::read`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PacketReadError {
    /// The channel failed or ended inside a packet.
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The packet is invalid.
    #[error(transparent)]
    Invalid(#[from] MultifdError),
}

/// Fills `buf`; false if the reader ended before its first byte.
fn read_or_eof(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A RAM block as multifd names it: its name, host mapping and size.
#[derive(Debug, Clone)]
pub struct BlockInfo {
    /// The stream's block id (`pc.ram`).
    pub id: String,
    /// Host address of its first byte (the mapping lives as long as the VM).
    pub host: usize,
    /// Its size in pages.
    pub pages: usize,
}

/// A page queued for a channel: block index, page index.
#[derive(Debug, Clone, Copy)]
struct QueuedPage {
    block: u32,
    page: u32,
}

/// What the RAM section queued since the last flush: rounds of pages, each ended by a sync.
#[derive(Debug, Default)]
struct SendQueue {
    rounds: Vec<(Vec<QueuedPage>, bool)>,
}

/// `multifd` settings (capability and `multifd-channels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultifdSettings {
    /// The capability.
    pub enabled: bool,
    /// `multifd-channels`, 1..=255.
    pub channels: u8,
}

impl Default for MultifdSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            channels: DEFAULT_CHANNELS,
        }
    }
}

/// A VM's multifd state, shared by the migration (settings, the sender's queue) and the RAM
/// section (which queues pages on the source and waits for the channels on the destination).
/// Its mutexes are leaf locks.
#[derive(Debug, Default)]
pub struct Multifd {
    settings: Mutex<MultifdSettings>,
    /// Source: a multifd migration is running; the RAM section queues its pages.
    sending: AtomicBool,
    queue: Mutex<SendQueue>,
    blocks: Mutex<Arc<Vec<BlockInfo>>>,
    /// Destination: the channels of the incoming migration.
    receiver: Mutex<Option<Arc<Receiver>>>,
    /// Bytes sent on the channels (`query-migrate`'s `multifd-bytes`).
    pub bytes: AtomicU64,
}

impl Multifd {
    /// The settings.
    pub fn settings(&self) -> MultifdSettings {
        *lock(&self.settings)
    }

    /// Sets the capability.
    pub fn set_enabled(&self, on: bool) {
        lock(&self.settings).enabled = on;
    }

    /// Sets `multifd-channels` (the caller checks 1..=255).
    pub fn set_channels(&self, n: u8) {
        lock(&self.settings).channels = n;
    }

    /// The RAM section's blocks (set once, when it is built).
    pub fn set_blocks(&self, blocks: Vec<BlockInfo>) {
        *lock(&self.blocks) = Arc::new(blocks);
    }

    /// Source: whether the RAM section sends its pages over the channels.
    pub fn sending(&self) -> bool {
        self.sending.load(Ordering::SeqCst)
    }

    fn set_sending(&self, on: bool) {
        lock(&self.queue).rounds.clear();
        self.sending.store(on, Ordering::SeqCst);
    }

    /// Source, RAM section: queues a round of pages (block index, page index) for the
    /// channels, ended by a sync on every channel if `sync`.
    pub fn queue_round(&self, pages: &mut Vec<(usize, usize)>, sync: bool) {
        if pages.is_empty() && !sync {
            return;
        }
        let round = pages
            .drain(..)
            .map(|(b, p)| QueuedPage {
                block: b as u32,
                page: p as u32,
            })
            .collect();
        lock(&self.queue).rounds.push((round, sync));
    }

    /// Destination: the receiver of the current incoming migration.
    pub fn receiver(&self) -> Option<Arc<Receiver>> {
        lock(&self.receiver).clone()
    }

    /// Destination: a command record of the main channel. The switchover announcement marks
    /// a hopvm source; [`MIG_CMD_X_HOPVM_MULTIFD`] must match this side's settings.
    pub fn on_command(&self, cmd: u16, data: &[u8]) -> Result<(), MultifdError> {
        let receiver = self.receiver();
        match cmd {
            crate::return_path::MIG_CMD_X_HOPVM_SWITCHOVER => {
                if let Some(r) = receiver {
                    lock(&r.state).hopvm_source = true;
                }
                Ok(())
            }
            MIG_CMD_X_HOPVM_MULTIFD => {
                let n = <[u8; 4]>::try_from(data)
                    .map(u32::from_be_bytes)
                    .map_err(|_| MultifdError::Announcement(data.len()))?;
                let Some(r) = receiver else {
                    return Err(MultifdError::NotEnabledHere(n));
                };
                if n != u32::from(r.channels) {
                    return Err(MultifdError::ChannelCount {
                        theirs: n,
                        ours: r.channels,
                    });
                }
                lock(&r.state).announced = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A page pointer that may cross to a sending thread.
struct SendPtr(*const u8);
// SAFETY: it points into guest memory, which stays mapped for the VM's life and which any
// thread of the VMM may read.
unsafe impl Send for SendPtr {}

/// Source: the open channels.
pub struct MultifdSender {
    shared: Arc<Multifd>,
    channels: Vec<ChannelStream>,
    outs: Vec<BufferedOutput>,
    packet_num: u64,
    next: usize,
    finished: bool,
}

impl std::fmt::Debug for MultifdSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultifdSender")
            .field("channels", &self.channels.len())
            .finish()
    }
}

impl MultifdSender {
    /// Sends each channel its handshake (channel `i` gets id `i`) and switches the RAM
    /// section to queue its pages for them.
    pub fn new(
        shared: Arc<Multifd>,
        mut channels: Vec<ChannelStream>,
    ) -> Result<Self, MultifdError> {
        for (id, c) in channels.iter_mut().enumerate() {
            let id = id as u8;
            let init = ChannelInit { uuid: [0; 16], id };
            c.write_all(&init.encode())
                .map_err(|source| MultifdError::Io { id, source })?;
        }
        let outs = channels.iter().map(|_| BufferedOutput::new()).collect();
        shared.bytes.store(0, Ordering::Relaxed);
        shared.set_sending(true);
        Ok(Self {
            shared,
            channels,
            outs,
            packet_num: 0,
            next: 0,
            finished: false,
        })
    }

    /// Handles that shut every channel down from another thread (`migrate_cancel`).
    pub fn shutdown_handles(&self) -> Vec<ChannelStream> {
        self.channels
            .iter()
            .filter_map(|c| c.try_clone().ok())
            .collect()
    }

    /// Builds the packets of what the RAM section queued, round-robin over the channels.
    fn prepare(&mut self) -> Result<(), MultifdError> {
        let rounds = std::mem::take(&mut lock(&self.shared.queue).rounds);
        if rounds.is_empty() {
            return Ok(());
        }
        let blocks = lock(&self.shared.blocks).clone();
        let n = self.channels.len();
        for (pages, sync) in rounds {
            // Pending packets per channel in this round, so the last one can carry SYNC.
            let mut last: Vec<Option<Packet>> = vec![None; n];
            let mut data: Vec<Vec<SendPtr>> = (0..n).map(|_| Vec::new()).collect();
            let mut i = 0;
            while i < pages.len() {
                let block = pages[i].block;
                let mut j = i;
                while j < pages.len()
                    && j - i < PAGES_PER_PACKET as usize
                    && pages[j].block == block
                {
                    j += 1;
                }
                let b = &blocks[block as usize];
                let ch = self.next;
                self.next = (self.next + 1) % n;
                if let Some(p) = last[ch].take() {
                    self.emit(ch, &p, &mut data[ch])?;
                }
                let mut ptrs = Vec::with_capacity(j - i);
                let offsets = pages[i..j]
                    .iter()
                    .map(|q| {
                        let off = u64::from(q.page) * PAGE_SIZE;
                        ptrs.push(SendPtr((b.host + off as usize) as *const u8));
                        off
                    })
                    .collect();
                data[ch] = ptrs;
                last[ch] = Some(Packet {
                    flags: 0,
                    pages_alloc: PAGES_PER_PACKET,
                    packet_num: 0,
                    ramblock: b.id.clone(),
                    offsets,
                });
                i = j;
            }
            for ch in 0..n {
                let p = match last[ch].take() {
                    Some(mut p) => {
                        if sync {
                            p.flags |= MULTIFD_FLAG_SYNC;
                        }
                        p
                    }
                    None if sync => Packet {
                        flags: MULTIFD_FLAG_SYNC,
                        pages_alloc: PAGES_PER_PACKET,
                        packet_num: 0,
                        ramblock: String::new(),
                        offsets: Vec::new(),
                    },
                    None => continue,
                };
                self.emit(ch, &p, &mut data[ch])?;
            }
        }
        Ok(())
    }

    /// Appends one packet and its pages (referenced in place) to channel `ch`'s buffer.
    fn emit(&mut self, ch: usize, p: &Packet, data: &mut Vec<SendPtr>) -> Result<(), MultifdError> {
        let mut p = p.clone();
        p.packet_num = self.packet_num;
        self.packet_num += 1;
        let out = &mut self.outs[ch];
        let io = |source| MultifdError::Io {
            id: ch as u8,
            source,
        };
        out.write_all(&p.encode()).map_err(io)?;
        for ptr in data.drain(..) {
            // SAFETY: a page of guest memory (block offset checked when it was queued: the
            // RAM section queues only pages of its blocks), mapped for the VM's life. The
            // guest may change it before the flush; its dirty bit was taken, so it goes again.
            unsafe { out.write_guest(ptr.0, PAGE_SIZE as usize) }.map_err(io)?;
        }
        Ok(())
    }

    /// Sends what the RAM section queued, every channel on its own thread; returns the bytes
    /// sent. Call it with no lock held.
    pub fn flush(&mut self) -> Result<u64, MultifdError> {
        self.prepare()?;
        if self.outs.iter().all(BufferedOutput::is_empty) {
            return Ok(0);
        }
        let results: Vec<Result<u64, MultifdError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .outs
                .iter_mut()
                .zip(self.channels.iter_mut())
                .enumerate()
                .filter(|(_, (o, _))| !o.is_empty())
                .map(|(id, (o, c))| {
                    std::thread::Builder::new()
                        .name(format!("multifd-send-{id}"))
                        .spawn_scoped(s, move || {
                            o.flush_to(c).map_err(|e| MultifdError::Io {
                                id: id as u8,
                                source: io::Error::other(e),
                            })
                        })
                        .map_err(MultifdError::Thread)
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.and_then(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(MultifdError::Thread(io::Error::other("panicked")))
                        })
                    })
                })
                .collect()
        });
        let mut total = 0;
        for r in results {
            total += r?;
        }
        self.shared.bytes.fetch_add(total, Ordering::Relaxed);
        Ok(total)
    }

    /// The migration completed: the channels end cleanly.
    pub fn finish(mut self) {
        self.finished = true;
        for c in &self.channels {
            let _ = c.finish();
        }
    }
}

impl Drop for MultifdSender {
    /// Unfinished, the migration failed: the destination must see every channel end, even
    /// while a shutdown handle keeps a socket open.
    fn drop(&mut self) {
        if !self.finished {
            self.channels.iter().for_each(ChannelStream::shutdown);
        }
        self.shared.set_sending(false);
    }
}

/// Destination: the multifd channels of one incoming migration.
#[derive(Debug)]
pub struct Receiver {
    channels: u8,
    blocks: Arc<Vec<BlockInfo>>,
    /// Per block, the pages a channel loaded (merged into the RAM section at each sync).
    received: Vec<Vec<AtomicU64>>,
    state: Mutex<RecvState>,
    cv: Condvar,
    /// Ends the wait for more channels.
    cancel: ConnectCancel,
}

#[derive(Debug)]
struct RecvState {
    connected: Vec<bool>,
    /// SYNC packets each channel has loaded.
    synced: Vec<u64>,
    /// The channel ended cleanly (after a sync).
    closed: Vec<bool>,
    /// Rounds the main channel has finished.
    released: u64,
    error: Option<Arc<MultifdError>>,
    finished: bool,
    sockets: Vec<ChannelStream>,
    hopvm_source: bool,
    announced: bool,
}

impl Receiver {
    fn new(channels: u8, blocks: Arc<Vec<BlockInfo>>) -> Result<Self, MultifdError> {
        let n = channels as usize;
        Ok(Self {
            channels,
            received: blocks
                .iter()
                .map(|b| {
                    (0..b.pages.div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
            blocks,
            state: Mutex::new(RecvState {
                connected: vec![false; n],
                synced: vec![0; n],
                closed: vec![false; n],
                released: 0,
                error: None,
                finished: false,
                sockets: Vec::new(),
                hopvm_source: false,
                announced: false,
            }),
            cv: Condvar::new(),
            cancel: ConnectCancel::new()?,
        })
    }

    /// Records the first error; every waiter wakes.
    fn fail(&self, e: MultifdError) {
        let mut s = lock(&self.state);
        if s.error.is_none() && !s.finished {
            log::warn!("multifd: {e}");
            s.error = Some(Arc::new(e));
        }
        drop(s);
        self.cv.notify_all();
    }

    fn all_connected(&self) -> bool {
        lock(&self.state).connected.iter().all(|c| *c)
    }

    /// Reads a new connection's handshake and starts its thread.
    fn add_channel(self: &Arc<Self>, mut stream: ChannelStream) -> Result<(), MultifdError> {
        let mut b = [0u8; INIT_LEN];
        stream
            .set_read_timeout(Some(INIT_TIMEOUT))
            .and_then(|()| stream.read_exact(&mut b))
            .and_then(|()| stream.set_read_timeout(None))
            .map_err(MultifdError::Handshake)?;
        let init = ChannelInit::decode(&b)?;
        if init.uuid != [0; 16] {
            return Err(MultifdError::Uuid {
                found: uuid_string(&init.uuid),
                expected: uuid_string(&[0; 16]),
                id: init.id,
            });
        }
        if init.id >= self.channels {
            return Err(MultifdError::ChannelId {
                id: init.id,
                channels: self.channels,
            });
        }
        {
            let mut s = lock(&self.state);
            if s.connected[init.id as usize] {
                return Err(MultifdError::DuplicateChannel(init.id));
            }
            s.connected[init.id as usize] = true;
            if let Ok(c) = stream.try_clone() {
                s.sockets.push(c);
            }
        }
        let me = self.clone();
        let id = init.id;
        std::thread::Builder::new()
            .name(format!("multifd-recv-{id}"))
            .spawn(move || {
                let result = me.receive(id, &mut stream);
                match result {
                    Ok(()) => {
                        lock(&me.state).closed[id as usize] = true;
                        me.cv.notify_all();
                    }
                    Err(e @ MultifdError::Io { .. }) => me.fail(e),
                    Err(e) => me.fail(MultifdError::Channel {
                        id,
                        source: Box::new(e),
                    }),
                }
            })
            .map_err(MultifdError::Thread)?;
        self.cv.notify_all();
        Ok(())
    }

    /// One channel's thread: packets into guest memory until the channel ends, the
    /// migration finishes or fails.
    fn receive(&self, id: u8, stream: &mut ChannelStream) -> Result<(), MultifdError> {
        let io = |source| MultifdError::Io { id, source };
        loop {
            let p = match Packet::read(stream, PAGES_PER_PACKET) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(PacketReadError::Io(e)) => return Err(io(e)),
                Err(PacketReadError::Invalid(e)) => return Err(e),
            };
            if lock(&self.state).finished {
                return Err(MultifdError::Stopped);
            }
            if !p.offsets.is_empty() {
                let (bi, b) = self
                    .blocks
                    .iter()
                    .enumerate()
                    .find(|(_, b)| b.id == p.ramblock)
                    .ok_or_else(|| MultifdError::UnknownBlock(p.ramblock.clone()))?;
                let size = b.pages as u64 * PAGE_SIZE;
                for &offset in &p.offsets {
                    if offset % PAGE_SIZE != 0 || offset >= size {
                        return Err(MultifdError::Offset {
                            block: b.id.clone(),
                            offset,
                            size,
                        });
                    }
                }
                for &offset in &p.offsets {
                    // SAFETY: offset < size, page-aligned: a page inside block `bi`'s
                    // mapping, which lives as long as the VM. The destination's vCPUs do not
                    // run while a stream loads, and within one round no other channel nor
                    // the main channel writes this page (the source sends a page once per
                    // round; the rounds are separated by the syncs).
                    let page = unsafe {
                        std::slice::from_raw_parts_mut(
                            (b.host + offset as usize) as *mut u8,
                            PAGE_SIZE as usize,
                        )
                    };
                    stream.read_exact(page).map_err(io)?;
                    let n = (offset / PAGE_SIZE) as usize;
                    self.received[bi][n / 64].fetch_or(1 << (n % 64), Ordering::Relaxed);
                }
            }
            if p.flags & MULTIFD_FLAG_SYNC != 0 && !self.synced(id) {
                return Ok(());
            }
        }
    }

    /// A channel reached its SYNC packet: wait until the main channel has finished the round.
    /// False if the migration finished or failed meanwhile.
    fn synced(&self, id: u8) -> bool {
        let mut s = lock(&self.state);
        s.synced[id as usize] += 1;
        let round = s.synced[id as usize];
        self.cv.notify_all();
        while s.released < round && !s.finished && s.error.is_none() {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.released >= round && !s.finished && s.error.is_none()
    }

    /// Main channel, at the RAM section's EOS: waits until every channel has loaded this
    /// round (its SYNC packet), then lets them go on.
    pub fn sync_main(&self) -> Result<(), MultifdError> {
        let mut s = lock(&self.state);
        if s.hopvm_source && !s.announced {
            return Err(MultifdError::NotEnabledAtSource);
        }
        let round = s.released + 1;
        loop {
            if let Some(e) = &s.error {
                return Err(MultifdError::Shared(e.clone()));
            }
            if s.finished {
                return Err(MultifdError::Stopped);
            }
            if let Some(id) = (0..s.synced.len()).find(|&i| s.closed[i] && s.synced[i] < round) {
                return Err(MultifdError::Closed(id as u8));
            }
            if s.synced.iter().all(|n| *n >= round) {
                break;
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.released = round;
        drop(s);
        self.cv.notify_all();
        Ok(())
    }

    /// The channels' first error, waiting up to `timeout` for one while a channel is still
    /// open: when the main channel failed, a channel's failure is usually why (a cut
    /// connection ends them all, each noticing in its own time).
    pub fn error_within(&self, timeout: Duration) -> Option<Arc<MultifdError>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = lock(&self.state);
        loop {
            if let Some(e) = &s.error {
                return Some(e.clone());
            }
            let open = (0..s.connected.len()).any(|i| s.connected[i] && !s.closed[i]);
            let now = std::time::Instant::now();
            if !open || s.finished || now >= deadline {
                return None;
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The pages of block `block` the channels have loaded (one bit per page); each call
    /// takes them.
    pub fn take_received(&self, block: usize) -> Vec<u64> {
        self.received
            .get(block)
            .map(|w| w.iter().map(|a| a.swap(0, Ordering::Relaxed)).collect())
            .unwrap_or_default()
    }

    /// The RAM section's last part has loaded: no channel writes guest memory any more.
    pub fn finish(&self) {
        let mut s = lock(&self.state);
        s.finished = true;
        drop(s);
        self.cancel.cancel();
        self.cv.notify_all();
    }

    /// Ends everything: the wait for channels, every channel's socket.
    fn abort(&self) {
        self.cancel.cancel();
        let mut s = lock(&self.state);
        s.finished = true;
        for c in &s.sockets {
            c.shutdown();
        }
        s.sockets.clear();
        drop(s);
        self.cv.notify_all();
    }
}

/// Destination: keeps the multifd channels of an incoming migration; dropping it ends them.
#[derive(Debug)]
pub struct ReceiveGuard {
    shared: Arc<Multifd>,
    receiver: Arc<Receiver>,
}

impl Drop for ReceiveGuard {
    fn drop(&mut self) {
        self.receiver.abort();
        let mut r = lock(&self.shared.receiver);
        if r.as_ref().is_some_and(|r| Arc::ptr_eq(r, &self.receiver)) {
            *r = None;
        }
    }
}

/// The destination's TLS, asked for each accepted connection (`None`: no TLS).
pub type ServerTlsSource = Arc<dyn Fn() -> Result<Option<ServerTls>, TlsError> + Send + Sync>;

/// Destination: accepts the incoming migration. Without multifd this is
/// [`Incoming::accept_channel_tls`]; with it, a `multifd-accept` thread accepts connections
/// until the main channel (the one that starts with `QEVM`) and every multifd channel are
/// there, whatever order they come in, and hands each to a short-lived `multifd-peek` thread
/// that tells which it is: a multifd channel is taken on at once, the main channel is
/// returned here.
///
/// With TLS (`tls` returns a server configuration, asked for each connection), that thread
/// first runs the connection's TLS handshake ([`ChannelStream::accept_tls`]: one that fails
/// it is refused and the destination keeps waiting, main channel or not, as QEMU's
/// `migration_tls_incoming_handshake` does), then reads the first four decrypted bytes. The
/// handshakes run beside each other, not in the accept loop: the source opens (and
/// handshakes) all its multifd channels before it writes the main stream, so a destination
/// waiting for the main channel's first bytes must go on accepting meanwhile.
pub fn accept(
    incoming: Incoming,
    shared: &Arc<Multifd>,
    tls: ServerTlsSource,
) -> Result<(IncomingChannel, Option<ReceiveGuard>), MultifdError> {
    let settings = shared.settings();
    if !settings.enabled {
        return Ok((incoming.accept_channel_tls(&*tls)?, None));
    }
    if !incoming.multi_channel() {
        return Err(TransportError::MultiChannelUnsupported.into());
    }
    let blocks = lock(&shared.blocks).clone();
    let receiver = Arc::new(Receiver::new(settings.channels, blocks)?);
    *lock(&shared.receiver) = Some(receiver.clone());
    let guard = ReceiveGuard {
        shared: shared.clone(),
        receiver: receiver.clone(),
    };
    // The main channel (or the first error before it) comes back on `main_rx`.
    let (main_tx, main_rx) = std::sync::mpsc::channel::<Result<ChannelStream, MultifdError>>();
    let main_seen = Arc::new(AtomicBool::new(false));
    let r = receiver.clone();
    let seen = main_seen.clone();
    let err_tx = main_tx.clone();
    std::thread::Builder::new()
        .name(String::from("multifd-accept"))
        .spawn(move || {
            let uri = incoming.uri().clone();
            while !(r.all_connected() && seen.load(Ordering::SeqCst)) {
                let s = match incoming.accept_stream(&r.cancel) {
                    Ok(s) => s,
                    Err(TransportError::Cancelled) => break,
                    Err(e) => {
                        report(&r, &err_tx, e.into());
                        break;
                    }
                };
                let (r2, seen2, tx, tls, uri) = (
                    r.clone(),
                    seen.clone(),
                    err_tx.clone(),
                    tls.clone(),
                    uri.clone(),
                );
                let spawned = std::thread::Builder::new()
                    .name(String::from("multifd-peek"))
                    .spawn(move || classify(s, &r2, &seen2, &tx, &*tls, &uri));
                if let Err(e) = spawned {
                    report(&r, &err_tx, MultifdError::Thread(e));
                    break;
                }
            }
        })
        .map_err(MultifdError::Thread)?;
    drop(main_tx);
    let main = match main_rx.recv() {
        Ok(main) => main?,
        // The accept thread and every peek thread ended without a main channel.
        Err(std::sync::mpsc::RecvError) => return Err(TransportError::Cancelled.into()),
    };
    Ok((main.into_incoming(), Some(guard)))
}

/// An error of the accept side: to the main channel's waiter if it still waits, else to the
/// receiver (which fails the load).
fn report(
    r: &Receiver,
    main: &std::sync::mpsc::Sender<Result<ChannelStream, MultifdError>>,
    e: MultifdError,
) {
    if let Err(std::sync::mpsc::SendError(Err(e))) = main.send(Err(e)) {
        r.fail(e);
    }
}

/// One accepted connection: its TLS handshake if `tls` says so, then its first four bytes
/// tell a multifd channel (taken on) from the main channel (sent to `main`).
fn classify(
    s: ChannelStream,
    r: &Arc<Receiver>,
    seen: &AtomicBool,
    main: &std::sync::mpsc::Sender<Result<ChannelStream, MultifdError>>,
    tls: &dyn Fn() -> Result<Option<ServerTls>, TlsError>,
    uri: &crate::transport::MigrationUri,
) {
    let mut s = match tls() {
        Err(e) => return report(r, main, TransportError::Tls(e).into()),
        Ok(None) => s,
        Ok(Some(server)) => match s.accept_tls(&server, uri) {
            Ok(s) => s,
            // Refused (and said so): the destination keeps waiting.
            Err(_) => return,
        },
    };
    let mut magic = [0u8; 4];
    let peeked = s
        .set_read_timeout(Some(INIT_TIMEOUT))
        .and_then(|()| s.peek(&mut magic))
        .and_then(|n| s.set_read_timeout(None).map(|()| n));
    // A connection that closes or stays silent before its first four bytes is dropped, as
    // one that fails the TLS handshake is: the destination keeps waiting for the source.
    let silent = match peeked {
        Ok(4) => None,
        Ok(_) => Some(String::from("closed or silent before its first four bytes")),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = silent {
        eprintln!(
            "hopvm: incoming migration on {uri}: dropped a connection that sent no stream \
             header ({why}); still waiting"
        );
        return;
    }
    match u32::from_be_bytes(magic) {
        QEMU_VM_FILE_MAGIC => {
            seen.store(true, Ordering::SeqCst);
            if let Err(std::sync::mpsc::SendError(Ok(_))) = main.send(Ok(s)) {
                // A second main channel after the first: not this migration's.
                log::warn!("multifd: a second migration stream connected; closed");
            }
        }
        MULTIFD_MAGIC => {
            // A refused channel fails the load, not the wait for the main channel: the main
            // channel still comes, and with it the source learns why (a channel count that
            // differs is named by the announcement on the main channel).
            if let Err(e) = r.add_channel(s) {
                r.fail(e);
            }
        }
        other => report(r, main, MultifdError::UnknownMagic(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<Option<Packet>, PacketReadError> {
        Packet::read(&mut &bytes[..], PAGES_PER_PACKET)
    }

    fn packet(offsets: Vec<u64>, flags: u32) -> Packet {
        Packet {
            flags,
            pages_alloc: PAGES_PER_PACKET,
            packet_num: 7,
            ramblock: String::from("pc.ram"),
            offsets,
        }
    }

    #[test]
    fn init_round_trip_and_layout() {
        let init = ChannelInit {
            uuid: [0xab; 16],
            id: 3,
        };
        let b = init.encode();
        assert_eq!(&b[..4], &[0x11, 0x22, 0x33, 0x44]);
        assert_eq!(&b[4..8], &[0, 0, 0, 1]);
        assert_eq!(b[24], 3);
        assert!(b[25..].iter().all(|x| *x == 0));
        assert_eq!(ChannelInit::decode(&b).unwrap(), init);
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(
            ChannelInit::decode(&bad).unwrap_err().to_string(),
            "multifd: received packet magic 0x223344 expected 0x11223344"
        );
        let mut bad = b;
        bad[7] = 2;
        assert_eq!(
            ChannelInit::decode(&bad).unwrap_err().to_string(),
            "multifd: received channel version 2 expected 1"
        );
    }

    #[test]
    fn packet_round_trip_and_layout() {
        let p = packet(vec![0, 0x1000, 0x7000], MULTIFD_FLAG_SYNC);
        let b = p.encode();
        assert_eq!(b.len(), PACKET_HEADER_LEN + 8 * 128);
        assert_eq!(be32(&b[8..12]), MULTIFD_FLAG_SYNC);
        assert_eq!(be32(&b[12..16]), 128);
        assert_eq!(be32(&b[16..20]), 3);
        assert_eq!(be32(&b[20..24]), 3 * 4096);
        assert_eq!(be64(&b[24..32]), 7);
        assert_eq!(&b[64..70], b"pc.ram");
        assert_eq!(be64(&b[PACKET_HEADER_LEN + 16..]), 0x7000);
        assert_eq!(read(&b).unwrap().unwrap(), p);
        // A clean end before a packet; a cut inside one is an error.
        assert!(read(&[]).unwrap().is_none());
        assert!(matches!(read(&b[..100]), Err(PacketReadError::Io(_))));
        assert!(matches!(
            read(&b[..PACKET_HEADER_LEN + 8]),
            Err(PacketReadError::Io(_))
        ));
        // An empty SYNC packet.
        let sync = Packet {
            ramblock: String::new(),
            ..packet(vec![], MULTIFD_FLAG_SYNC)
        };
        assert_eq!(read(&sync.encode()).unwrap().unwrap(), sync);
    }

    #[test]
    fn hostile_packets_are_refused_with_clear_errors() {
        let good = packet(vec![0x1000], 0).encode();
        let set32 = |at: usize, v: u32| {
            let mut b = good.clone();
            b[at..at + 4].copy_from_slice(&v.to_be_bytes());
            b
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                set32(0, 0xdead_beef),
                "multifd: received packet magic 0xdeadbeef expected 0x11223344",
            ),
            (set32(4, 9), "multifd: received packet version 9 expected 1"),
            (set32(8, 2), "multifd: flags received 0x2"),
            (
                set32(12, 100_000),
                "multifd: received packet with 100000 pages and expected maximum pages are 128",
            ),
            (
                set32(16, u32::MAX),
                "multifd: received packet with 4294967295 normal pages and expected maximum \
                 pages are 128",
            ),
            (
                set32(20, 4095),
                "multifd: received packet with 1 pages and 4095 bytes of page data",
            ),
            (
                {
                    let mut b = good.clone();
                    b[64..64 + RAMBLOCK_LEN].fill(b'a');
                    b
                },
                "multifd: ram block name is not a terminated string",
            ),
        ];
        for (bytes, want) in cases {
            let err = read(&bytes).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err} != {want}");
        }
        // A huge page count never allocates more than the limit allows.
        let err = Packet::read(&mut &set32(12, u32::MAX)[..], PAGES_PER_PACKET).unwrap_err();
        assert!(err.to_string().contains("4294967295 pages"), "{err}");
    }

    /// A receiver over one 16-page block in a heap buffer.
    fn receiver(mem: &mut [u8], channels: u8) -> Arc<Receiver> {
        let blocks = Arc::new(vec![BlockInfo {
            id: String::from("pc.ram"),
            host: mem.as_mut_ptr() as usize,
            pages: mem.len() / PAGE_SIZE as usize,
        }]);
        Arc::new(Receiver::new(channels, blocks).unwrap())
    }

    /// Offsets outside the block, unaligned ones and unknown blocks are refused before any
    /// page is written.
    #[test]
    fn receiver_refuses_offsets_outside_ram() {
        let mut mem = vec![0u8; 16 * PAGE_SIZE as usize];
        let r = receiver(&mut mem, 1);
        let cases: Vec<(Packet, &str)> = vec![
            (
                packet(vec![16 * PAGE_SIZE], 0),
                "multifd: offset 0x10000 outside ram block pc.ram (0x10000 bytes)",
            ),
            (
                packet(vec![u64::MAX - 4095], 0),
                "multifd: offset 0xfffffffffffff000 outside ram block pc.ram",
            ),
            (
                packet(vec![12], 0),
                "multifd: offset 0xc outside ram block pc.ram",
            ),
            (
                Packet {
                    ramblock: String::from("pc.rom"),
                    ..packet(vec![0], 0)
                },
                "multifd: unknown ram block pc.rom",
            ),
        ];
        for (p, want) in cases {
            let mut bytes = p.encode();
            bytes.extend(std::iter::repeat_n(0xee, PAGE_SIZE as usize));
            let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            a.write_all(&bytes).unwrap();
            drop(a);
            let err = r
                .receive(0, &mut ChannelStream::Unix(b))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{err} != {want}");
        }
        assert!(mem.iter().all(|b| *b == 0), "a refused packet wrote memory");
    }

    /// Pages land where the packets say; a channel waits at its SYNC packet until the main
    /// channel's round is over, and the main channel waits for every channel.
    #[test]
    fn pages_load_and_rounds_synchronise() {
        let mut mem = vec![0u8; 16 * PAGE_SIZE as usize];
        let r = receiver(&mut mem, 2);
        let mut writers = Vec::new();
        for id in 0..2u8 {
            let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            a.write_all(&ChannelInit { uuid: [0; 16], id }.encode())
                .unwrap();
            r.add_channel(ChannelStream::Unix(b)).unwrap();
            writers.push(a);
        }
        let send = |w: &mut std::os::unix::net::UnixStream, page: u64, fill: u8| {
            let mut bytes = packet(vec![page * PAGE_SIZE], MULTIFD_FLAG_SYNC).encode();
            bytes.extend(std::iter::repeat_n(fill, PAGE_SIZE as usize));
            w.write_all(&bytes).unwrap();
        };
        // Round 1: page 3 on channel 0, page 5 on channel 1.
        send(&mut writers[0], 3, 0x33);
        send(&mut writers[1], 5, 0x55);
        r.sync_main().unwrap();
        let got = r.take_received(0);
        assert_eq!(got[0], (1 << 3) | (1 << 5));
        // Round 2: page 3 again, on channel 1 this time; channel 0 sends only a sync.
        send(&mut writers[1], 3, 0x77);
        let sync = Packet {
            ramblock: String::new(),
            ..packet(vec![], MULTIFD_FLAG_SYNC)
        };
        writers[0].write_all(&sync.encode()).unwrap();
        r.sync_main().unwrap();
        r.finish();
        let page = |n: usize| &mem[n * PAGE_SIZE as usize..(n + 1) * PAGE_SIZE as usize];
        assert!(page(3).iter().all(|b| *b == 0x77));
        assert!(page(5).iter().all(|b| *b == 0x55));
        assert!(page(4).iter().all(|b| *b == 0));
    }

    /// A channel cut mid-packet fails the main channel's wait with the channel's error; a
    /// channel id past the count is refused.
    #[test]
    fn a_cut_channel_fails_the_sync() {
        let mut mem = vec![0u8; 16 * PAGE_SIZE as usize];
        let r = receiver(&mut mem, 1);
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(
            &ChannelInit {
                uuid: [0; 16],
                id: 0,
            }
            .encode(),
        )
        .unwrap();
        r.add_channel(ChannelStream::Unix(b)).unwrap();
        a.write_all(&packet(vec![0], MULTIFD_FLAG_SYNC).encode()[..200])
            .unwrap();
        drop(a);
        let err = r.sync_main().unwrap_err().to_string();
        assert!(err.starts_with("multifd channel 0: "), "{err}");
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(
            &ChannelInit {
                uuid: [0; 16],
                id: 4,
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(
            r.add_channel(ChannelStream::Unix(b))
                .unwrap_err()
                .to_string(),
            "multifd: received channel id 4 is greater than number of channels 1"
        );
    }

    /// The sender's packets, read back by a receiver: 128 pages at most per packet, round
    /// robin over the channels, the last packet of every channel flagged SYNC (an empty one
    /// for a channel with no pages), every byte counted in `multifd-bytes`.
    #[test]
    fn sender_and_receiver_round_trip() {
        let pages = 300usize;
        let mut src = vec![0u8; pages * PAGE_SIZE as usize];
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i / PAGE_SIZE as usize) as u8 ^ (i as u8);
        }
        let mut dst = vec![0u8; pages * PAGE_SIZE as usize];
        let shared = Arc::new(Multifd::default());
        shared.set_blocks(vec![BlockInfo {
            id: String::from("pc.ram"),
            host: src.as_ptr() as usize,
            pages,
        }]);
        let r = receiver(&mut dst, 3);
        let mut ours = Vec::new();
        for _ in 0..3 {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            ours.push(ChannelStream::Unix(a));
            let r = r.clone();
            // The receiver reads the handshake as the sender writes it.
            std::thread::spawn(move || r.add_channel(ChannelStream::Unix(b)).unwrap());
        }
        let mut sender = MultifdSender::new(shared.clone(), ours).unwrap();
        assert!(shared.sending());
        // Every page but 7; all of them in one round.
        let mut queued: Vec<(usize, usize)> =
            (0..pages).filter(|p| *p != 7).map(|p| (0, p)).collect();
        shared.queue_round(&mut queued, true);
        assert!(queued.is_empty());
        let sent = sender.flush().unwrap();
        let header = (PACKET_HEADER_LEN + 8 * PAGES_PER_PACKET as usize) as u64;
        // 299 pages: packets of 128, 128 and 43, one per channel.
        assert_eq!(sent, 3 * header + 299 * PAGE_SIZE);
        r.sync_main().unwrap();
        let got = r.take_received(0);
        assert_eq!(got.iter().map(|w| w.count_ones()).sum::<u32>(), 299);
        assert_eq!(got[0] & (1 << 7), 0);
        // A round without pages is a SYNC packet on every channel.
        shared.queue_round(&mut Vec::new(), true);
        assert_eq!(sender.flush().unwrap(), 3 * header);
        r.sync_main().unwrap();
        assert_eq!(
            shared.bytes.load(Ordering::Relaxed),
            6 * header + 299 * PAGE_SIZE
        );
        r.finish();
        let page = |m: &[u8], n: usize| m[n * 4096..(n + 1) * 4096].to_vec();
        for n in 0..pages {
            if n == 7 {
                assert!(page(&dst, n).iter().all(|b| *b == 0));
            } else {
                assert_eq!(page(&dst, n), page(&src, n), "page {n}");
            }
        }
        sender.finish();
        drop(shared);
    }

    /// Seeded mutations of valid packets (bit flips, edge values in the header fields, cuts):
    /// every one is refused with an error or loads inside the block — never a panic, never a
    /// write outside guest memory (the buffer's guard pages around the block stay zero).
    #[test]
    fn mutated_packets_never_panic_or_write_outside_ram() {
        let pages = 16usize;
        let guard = PAGE_SIZE as usize;
        let mut mem = vec![0u8; pages * PAGE_SIZE as usize + 2 * guard];
        let blocks = Arc::new(vec![BlockInfo {
            id: String::from("pc.ram"),
            host: mem.as_mut_ptr() as usize + guard,
            pages,
        }]);
        let r = Arc::new(Receiver::new(1, blocks).unwrap());
        // A packet that came out flagged SYNC waits for the main channel: release each round.
        let releaser = {
            let r = r.clone();
            std::thread::spawn(move || while r.sync_main().is_ok() {})
        };
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut refused, mut loaded) = (0, 0);
        for case in 0..3000 {
            let offsets: Vec<u64> = (0..(next() % 4) as usize)
                .map(|_| (next() % pages as u64) * PAGE_SIZE)
                .collect();
            let data = offsets.len() * PAGE_SIZE as usize;
            let mut bytes = packet(offsets, 0).encode();
            let n = bytes.len();
            bytes.extend(std::iter::repeat_n(0xa5, data));
            match case % 3 {
                0 => {
                    for _ in 0..1 + next() % 4 {
                        let at = (next() as usize) % n;
                        bytes[at] ^= 1 << (next() % 8);
                    }
                }
                1 => {
                    let at = [0, 4, 8, 12, 16, 20][(next() % 6) as usize];
                    let v = [0, 1, 127, 128, 129, u32::MAX, 0x8000_0000][(next() % 7) as usize];
                    bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
                }
                _ => {
                    let at = PACKET_HEADER_LEN + (next() % 4) as usize * 8;
                    bytes[at..at + 8].copy_from_slice(&next().to_be_bytes());
                }
            }
            if next() % 5 == 0 {
                bytes.truncate((next() as usize) % bytes.len());
            }
            let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let writer = std::thread::spawn(move || {
                let _ = a.write_all(&bytes);
            });
            match r.receive(0, &mut ChannelStream::Unix(b)) {
                Ok(()) => loaded += 1,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    refused += 1;
                }
            }
            writer.join().unwrap();
        }
        r.finish();
        releaser.join().unwrap();
        assert!(
            refused > 0 && loaded > 0,
            "{refused} refused, {loaded} loaded"
        );
        assert!(
            mem[..guard].iter().all(|b| *b == 0),
            "wrote below the block"
        );
        assert!(
            mem[mem.len() - guard..].iter().all(|b| *b == 0),
            "wrote past the block"
        );
    }

    /// The announcement must match this side's settings.
    #[test]
    fn announcement_must_match() {
        let m = Multifd::default();
        assert_eq!(
            m.on_command(MIG_CMD_X_HOPVM_MULTIFD, &4u32.to_be_bytes())
                .unwrap_err()
                .to_string(),
            "the source sends RAM over 4 multifd channel(s) but the multifd capability is off \
             here: enable it on both sides (migrate-set-capabilities before migrate-incoming)"
        );
        let mut mem = vec![0u8; 16 * PAGE_SIZE as usize];
        *lock(&m.receiver) = Some(receiver(&mut mem, 2));
        assert!(m
            .on_command(MIG_CMD_X_HOPVM_MULTIFD, &4u32.to_be_bytes())
            .unwrap_err()
            .to_string()
            .contains("the source uses 4 multifd channel(s), this side expects 2"));
        // A hopvm source that announced nothing does not use multifd.
        m.on_command(crate::return_path::MIG_CMD_X_HOPVM_SWITCHOVER, &[])
            .unwrap();
        assert_eq!(
            m.receiver().unwrap().sync_main().unwrap_err().to_string(),
            "the multifd capability is on here but the source does not use multifd: enable it \
             on both sides, or on neither"
        );
    }
}
