//! The migration thread and its state machine, after QEMU's 2013 `migration_thread`.
//!
//! States: `setup` → `active` → `completed` | `failed` | `cancelled` (via `cancelling`); with
//! `pause-before-switchover`, `active` → `pre-switchover` (the guest stopped, waiting for
//! `migrate-continue`) → `device` → `completed`, as QEMU's `migration_maybe_pause`.
//!
//! The thread holds the big VMM lock while it runs the sections' hooks — *begin*, then in a loop
//! *pending* and either *iterate* (send a bounded batch) or, once what is pending fits in
//! `max_size` = bandwidth × max downtime, stop the vCPUs and *complete*. The sections write into
//! an in-memory buffer; the thread flushes it to the transport *outside* the lock, so a slow
//! network never blocks a vCPU that needs the lock for a port access. Every 100 ms it measures
//! the bandwidth actually achieved and recomputes `max_size`; when a slot's byte budget
//! (bandwidth limit / 10) is spent it sleeps until the slot ends.
//!
//! With `multifd` the thread also opens the multifd channels after the main one
//! ([`crate::multifd`]); each flush then writes the main buffer and, on scoped threads, the
//! pages the RAM section queued for the channels; `migrate_cancel` shuts all of them down.
//!
//! Downtime is the time from stopping the vCPUs to completion; total time runs from `migrate`
//! to completion. A failed or cancelled migration restarts the vCPUs if they had been running.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::multifd::{Multifd, MultifdError, MultifdSender, MIG_CMD_X_HOPVM_MULTIFD};
use crate::ram::{RamCounters, XbzrleSettings};
use crate::rate_limit::{BufferedOutput, RateLimitError, RateLimiter};
use crate::registry::{Registry, RegistryError};
use crate::return_path::{self, SourceReturnPath, Verdict};
use crate::stream::{StreamError, StreamWriter, MIG_CMD_OPEN_RETURN_PATH};
use crate::transport::{ChannelStream, ConnectCancel, MigrationUri, Outgoing, TransportError};

/// Default bandwidth limit: 32 MiB/s, as QEMU's `MAX_THROTTLE` of 2013.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 32 << 20;
/// Default maximum downtime: 30 ms, as QEMU's `DEFAULT_MIGRATE_SET_DOWNTIME`.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 30;
/// How often the bandwidth is measured: QEMU's `BUFFER_DELAY`.
pub const SLOT: Duration = Duration::from_millis(100);
/// Bytes one iteration may send when there is no bandwidth limit.
const UNLIMITED_BATCH: u64 = 16 << 20;

/// Errors starting a migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// One is already running.
    #[error("There's a migration process in progress")]
    InProgress,
    /// A component cannot be migrated.
    #[error("{0}")]
    Blocked(String),
    /// The thread could not be started.
    #[error("cannot start the migration thread: {0}")]
    Thread(#[source] io::Error),
    /// The connect's cancel descriptor could not be made.
    #[error("{0}")]
    Cancel(#[source] TransportError),
    /// `multifd` over a transport that cannot open more channels (QEMU's wording).
    #[error("multifd is not supported by current protocol")]
    MultifdProtocol,
    /// `multifd` with `x-integrity`, whose checksums cover the main channel only.
    #[error(
        "x-integrity does not cover the multifd channels: switch off the multifd or the \
         x-integrity capability"
    )]
    MultifdIntegrity,
}

/// A migration's state, with QEMU's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    /// No migration has run.
    None,
    /// Setting up (sections' begin).
    Setup,
    /// Sending.
    Active,
    /// Cancel requested.
    Cancelling,
    /// Cancelled; the source runs on.
    Cancelled,
    /// Done; the source stays paused.
    Completed,
    /// Failed; the source runs on.
    Failed,
    /// `pause-before-switchover`: the guest is stopped, waiting for `migrate-continue`.
    #[serde(rename = "pre-switchover")]
    PreSwitchover,
    /// `pause-before-switchover`: continued, sending the devices' final state.
    Device,
}

/// `migrate-continue` refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContinueError {
    /// The migration is in another state than the one named (QEMU's text).
    #[error("Migration not in expected state: {}", .0.as_str())]
    NotInState(MigrationStatus),
}

impl MigrationStatus {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
        }
    }

    /// The status QEMU calls `name`, among those hopvm has.
    pub fn from_qemu_name(name: &str) -> Option<Self> {
        [
            Self::None,
            Self::Setup,
            Self::Active,
            Self::Cancelling,
            Self::Cancelled,
            Self::Completed,
            Self::Failed,
            Self::PreSwitchover,
            Self::Device,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// True while a migration is under way.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            Self::Setup | Self::Active | Self::Cancelling | Self::PreSwitchover | Self::Device
        )
    }
}

/// What the state-change notifiers hear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationEvent {
    /// The status changed.
    Status(MigrationStatus),
    /// A dirty sync started pass `n` over RAM (QEMU's `MIGRATION_PASS`).
    Pass(u64),
}

/// Where a migration stream goes: written while the migration runs, finished when it completes
/// (an `exec:` command is then waited for; its failure fails the migration). Dropping it
/// unfinished aborts the channel.
pub trait MigrationOutput: Write + Send {
    /// Flushes and closes the channel.
    fn finish(self: Box<Self>) -> Result<(), TransportError>;

    /// Interrupts a write blocked on a stalled peer, from another thread (`migrate_cancel`).
    fn canceller(&self) -> Option<Canceller> {
        None
    }

    /// The channel back from the destination (QEMU's return path), for two-way transports.
    fn return_path(&self) -> Option<Box<dyn Read + Send>> {
        None
    }

    /// Opens one more channel to the same destination (a multifd channel).
    fn connect_channel(&self, _cancel: &ConnectCancel) -> Result<ChannelStream, TransportError> {
        Err(TransportError::MultiChannelUnsupported)
    }
}

impl MigrationOutput for Outgoing {
    fn finish(self: Box<Self>) -> Result<(), TransportError> {
        Outgoing::finish(*self)
    }

    fn canceller(&self) -> Option<Canceller> {
        let handle = self.shutdown_handle();
        Some(Box::new(move || {
            let _ = handle.shutdown();
        }))
    }

    fn return_path(&self) -> Option<Box<dyn Read + Send>> {
        Outgoing::return_path(self)
    }

    /// Through TLS when this channel runs it (each channel its own handshake).
    fn connect_channel(&self, cancel: &ConnectCancel) -> Result<ChannelStream, TransportError> {
        self.open_channel(cancel)
    }
}

/// Opens the outgoing channel. It runs on the migration thread — `migrate` returns at once
/// and the monitor stays free while a destination does not answer — and must give up when
/// its [`ConnectCancel`] fires (`migrate_cancel`).
pub type Connector =
    Box<dyn FnOnce(&ConnectCancel) -> Result<Box<dyn MigrationOutput>, TransportError> + Send>;

/// Why a running migration failed (`query-migrate`'s `error-desc`).
#[derive(Debug, thiserror::Error)]
pub enum MigrationRunError {
    /// The channel could not be opened.
    #[error("{0}")]
    Connect(#[source] TransportError),
    /// A section failed, or the stream could not be framed.
    #[error("{0}")]
    Section(#[from] RegistryError),
    /// The stream framing failed (return-path commands).
    #[error("{0}")]
    Stream(#[from] StreamError),
    /// Sending to the transport failed.
    #[error("{0}")]
    Send(#[from] RateLimitError),
    /// Closing the channel failed (an `exec:` command's failure, say).
    #[error("{0}")]
    Finish(#[source] TransportError),
    /// A multifd channel failed.
    #[error("{0}")]
    Multifd(#[from] MultifdError),
    /// The return-path reader could not be started.
    #[error("cannot start the return-path thread: {0}")]
    ReturnPathThread(#[source] io::Error),
    /// The destination reported a failed load, with its reason.
    #[error("the destination failed to load the migration: {0}")]
    Destination(String),
    /// The connection ended before the destination's verdict.
    #[error("the destination gave no verdict on the load ({0}); the guest runs on here")]
    NoVerdict(String),
    /// The go-ahead could not be sent: the destination cannot have it.
    #[error("cannot send the go-ahead to the destination ({0}); the guest runs on here")]
    GoAhead(#[source] io::Error),
    /// The go-ahead went out but the destination never said it started.
    #[error(
        "the destination confirmed the load and was sent the go-ahead, but did not confirm that \
         it started; it may be running the guest, so this copy stays paused (check the \
         destination before 'cont')"
    )]
    OutcomeUnknown,
}

/// Bytes of the stream's end held back until a migration without a return path commits.
const STREAM_TAIL: usize = 4096;

/// How long the source waits for STARTED after the go-ahead.
const STARTED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed source waits for the destination's reason on the return path.
const REASON_TIMEOUT: Duration = Duration::from_secs(2);

/// What the migration thread needs from the VMM.
pub trait MigrationHost: Send + Sync + 'static {
    /// What the big lock protects.
    type Locked: Send + 'static;

    /// The big VMM lock.
    fn big_lock(&self) -> &Mutex<Self::Locked>;

    /// The registered sections (locked after the big lock, never before it).
    fn registry(&self) -> &Mutex<Registry>;

    /// `auto-converge`: makes the vCPUs sleep `pct` % of the time (0: full speed). Called
    /// without any lock held.
    fn throttle_vcpus(&self, _pct: u32) {}

    /// Stops the vCPUs; may release the big lock while it waits. Returns whether they were
    /// running.
    fn stop_vm<'a>(&self, g: MutexGuard<'a, Self::Locked>) -> (MutexGuard<'a, Self::Locked>, bool);

    /// The migration failed or was cancelled: restart the vCPUs if they had been running,
    /// else leave them stopped.
    fn aborted(&self, g: &mut Self::Locked, was_running: bool);

    /// The migration completed: the source enters `postmigrate`.
    fn completed(&self, g: &mut Self::Locked);
}

/// One 100 ms slot of the migration, for the timeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SlotRecord {
    /// End of the slot, in ms since `migrate`.
    pub t_ms: f64,
    /// Bytes sent in the slot.
    pub bytes: u64,
    /// Bytes pending at the end of the slot.
    pub pending: u64,
    /// Pages the dirty syncs in this slot found.
    pub dirty_pages: u64,
    /// Measured bandwidth, bytes per second.
    pub bandwidth: f64,
    /// The completion threshold computed from it, bytes.
    pub max_size: u64,
    /// The pass (dirty sync count) at the end of the slot.
    pub pass: u64,
}

/// A whole migration's timeline.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    /// Every slot.
    pub slots: Vec<SlotRecord>,
    /// When each pass began, ms since `migrate`.
    pub passes: Vec<(u64, f64)>,
    /// When setup ended.
    pub setup_ms: Option<f64>,
    /// When the vCPUs were stopped.
    pub stop_ms: Option<f64>,
    /// When the migration ended.
    pub end_ms: Option<f64>,
}

/// QEMU's CPU throttling parameters, which `auto-converge` uses (`migrate-set-parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ThrottleParameters {
    /// First percentage, once the dirty rate outruns the transfer (`cpu-throttle-initial`).
    pub initial: u32,
    /// Added each time it still does (`cpu-throttle-increment`).
    pub increment: u32,
    /// Add only what the measured rates call for, at most the increment
    /// (`cpu-throttle-tailslow`).
    pub tailslow: bool,
    /// Upper bound (`max-cpu-throttle`).
    pub max: u32,
    /// Throttle when the bytes dirtied in a period exceed this share, in %, of the bytes sent
    /// (`throttle-trigger-threshold`).
    pub trigger_threshold: u32,
}

/// QEMU's self-announce timing after an incoming migration (`announce-initial`, `-max`,
/// `-rounds`, `-step` of `migrate-set-parameters`, also the arguments of `announce-self`):
/// the first round at once, then rounds `initial`, `initial + step`, `initial + 2 × step` … ms
/// apart, each gap at most `max`, `rounds` rounds in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AnnounceParameters {
    /// The first gap, ms.
    pub initial: u64,
    /// The largest gap, ms.
    pub max: u64,
    /// How many rounds.
    pub rounds: u64,
    /// How much each gap grows, ms.
    pub step: u64,
}

impl Default for AnnounceParameters {
    /// QEMU 7.2's defaults.
    fn default() -> Self {
        Self {
            initial: 50,
            max: 550,
            rounds: 5,
            step: 100,
        }
    }
}

impl AnnounceParameters {
    /// The wait after round `done` (1 for the first) before the next, as QEMU's
    /// `qemu_announce_timer_step`: `initial + (done - 1) × step`, at most `max`.
    pub fn gap_after(&self, done: u64) -> Duration {
        let ms = done
            .saturating_sub(1)
            .checked_mul(self.step)
            .and_then(|g| g.checked_add(self.initial))
            .filter(|&g| g <= self.max)
            .unwrap_or(self.max);
        Duration::from_millis(ms)
    }
}

impl Default for ThrottleParameters {
    /// QEMU 7.2's defaults.
    fn default() -> Self {
        Self {
            initial: 20,
            increment: 10,
            tailslow: false,
            max: 99,
            trigger_threshold: 50,
        }
    }
}

/// The length of a dirty-rate period for `auto-converge` (QEMU compares rates at the first
/// dirty sync at least a second after the previous comparison).
const THROTTLE_PERIOD: Duration = Duration::from_secs(1);

/// `auto-converge`'s decision at the end of a period (QEMU's `migration_trigger_throttle` and
/// `mig_throttle_guest_down`): the new percentage, or `None` to leave it.
fn next_throttle(
    p: &ThrottleParameters,
    now: u32,
    bytes_dirty: u64,
    bytes_xfer: u64,
    high_count: &mut u32,
) -> Option<u32> {
    let threshold = bytes_xfer.saturating_mul(u64::from(p.trigger_threshold)) / 100;
    if bytes_dirty <= threshold {
        return None;
    }
    *high_count += 1;
    if *high_count < 2 {
        return None;
    }
    *high_count = 0;
    if now == 0 {
        return Some(p.initial);
    }
    let inc = if p.tailslow {
        let cpu_now = f64::from(100 - now);
        let cpu_ideal = cpu_now * (threshold as f64 / bytes_dirty as f64);
        ((cpu_now - cpu_ideal) as u32).min(p.increment)
    } else {
        p.increment
    };
    Some((now + inc).min(p.max))
}

/// What `query-migrate` reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MigrationInfo {
    /// The state.
    pub status: MigrationStatus,
    /// ms from `migrate` to now, or to completion.
    pub total_time_ms: u64,
    /// ms spent in setup.
    pub setup_time_ms: u64,
    /// While active: the downtime expected at the current bandwidth, ms.
    pub expected_downtime_ms: u64,
    /// Once completed: the actual downtime, ms.
    pub downtime_ms: u64,
    /// Measured throughput, Mbit/s.
    pub mbps: f64,
    /// Bytes written to the transport (all sections).
    pub transferred: u64,
    /// RAM bytes still dirty.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Zero pages sent.
    pub duplicate: u64,
    /// Full pages sent.
    pub normal: u64,
    /// Bytes of full pages sent.
    pub normal_bytes: u64,
    /// Dirty pages per second.
    pub dirty_pages_rate: u64,
    /// Dirty syncs.
    pub dirty_sync_count: u64,
    /// XBZRLE on for this migration.
    pub xbzrle: bool,
    /// XBZRLE cache size.
    pub xbzrle_cache_size: u64,
    /// XBZRLE pages sent.
    pub xbzrle_pages: u64,
    /// XBZRLE bytes sent.
    pub xbzrle_bytes: u64,
    /// XBZRLE cache misses.
    pub xbzrle_cache_miss: u64,
    /// XBZRLE overflows.
    pub xbzrle_overflow: u64,
    /// Pages sent per second in the last 100 ms slot.
    pub pages_per_second: u64,
    /// Bytes sent on multifd channels.
    pub multifd_bytes: u64,
    /// Bytes sent before the guest stopped.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was stopped.
    pub downtime_bytes: u64,
    /// `auto-converge`'s current throttle, % (0: not throttled).
    pub cpu_throttle_percentage: u32,
    /// With block migration (`blk`, `inc`, the `block` capability): the disks' progress.
    pub disk: Option<DiskInfo>,
    /// Why it failed.
    pub error: Option<String>,
}

/// `query-migrate`'s `disk`: block migration's progress.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct DiskInfo {
    /// Bytes of disk sent (chunks written during the migration count again; holes skipped
    /// with `inc` count as sent).
    pub transferred: u64,
    /// Bytes still to send: the rest of the bulk pass and the chunks written since they went.
    pub remaining: u64,
    /// Every disk's size.
    pub total: u64,
}

type Notifier = Box<dyn Fn(&MigrationEvent) + Send + Sync>;
/// Interrupts a migration blocked on its transport.
pub type Canceller = Box<dyn Fn() + Send + Sync>;

struct Inner {
    status: MigrationStatus,
    start: Option<Instant>,
    setup_time: Duration,
    total_time: Duration,
    downtime: Duration,
    expected_downtime: Duration,
    mbps: f64,
    transferred: u64,
    max_bandwidth: u64,
    downtime_limit_ms: u64,
    xbzrle_on: bool,
    events: bool,
    integrity: bool,
    return_path: bool,
    auto_converge: bool,
    /// `pause-before-switchover`.
    pause_before_switchover: bool,
    /// `migrate-continue` arrived for the current `pre-switchover` pause.
    continued: bool,
    /// `late-block-activate` (destination; hopvm's disks are plain files: nothing to activate).
    late_block_activate: bool,
    throttle_params: ThrottleParameters,
    announce_params: AnnounceParameters,
    throttle_pct: u32,
    pages_per_second: u64,
    precopy_bytes: u64,
    downtime_bytes: u64,
    error: Option<String>,
    timeline: Timeline,
    /// Interrupts the connect while the channel is being opened.
    connect_cancel: Option<Arc<ConnectCancel>>,
    canceller: Option<Canceller>,
    /// The whole stream has been handed to the transport: too late to cancel.
    committed: bool,
    thread: Option<JoinHandle<()>>,
}

/// A VM's migration state: parameters, the current (or last) migration, and its thread.
pub struct Migration {
    inner: Mutex<Inner>,
    /// RAM counters, shared with the RAM section.
    pub ram: Arc<RamCounters>,
    /// XBZRLE capability and cache size, shared with the RAM section.
    pub xbzrle: Arc<Mutex<XbzrleSettings>>,
    /// `multifd` capability, `multifd-channels`, and the channels' state, shared with the RAM
    /// section.
    pub multifd: Arc<Multifd>,
    notifiers: Mutex<Vec<Notifier>>,
    /// Wakes the `pre-switchover` pause (continue or cancel).
    pause: Condvar,
    /// TLS credentials objects and the `tls-creds` / `tls-hostname` parameters.
    pub tls: crate::transport::tls::MigrationTls,
    /// Block migration's settings (`block`, `block-incremental`, `blk`, `inc`) and counters,
    /// shared with the `block` section.
    pub block: Arc<crate::block::BlockMigration>,
}

use vmm_sync::lock;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Default for Migration {
    fn default() -> Self {
        Self::new()
    }
}

impl Migration {
    /// No migration yet, default parameters.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                status: MigrationStatus::None,
                start: None,
                setup_time: Duration::ZERO,
                total_time: Duration::ZERO,
                downtime: Duration::ZERO,
                expected_downtime: Duration::ZERO,
                mbps: 0.0,
                transferred: 0,
                max_bandwidth: DEFAULT_MAX_BANDWIDTH,
                downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
                xbzrle_on: false,
                events: false,
                integrity: false,
                return_path: true,
                auto_converge: false,
                pause_before_switchover: false,
                continued: false,
                late_block_activate: false,
                throttle_params: ThrottleParameters::default(),
                announce_params: AnnounceParameters::default(),
                throttle_pct: 0,
                pages_per_second: 0,
                precopy_bytes: 0,
                downtime_bytes: 0,
                error: None,
                timeline: Timeline::default(),
                connect_cancel: None,
                canceller: None,
                committed: false,
                thread: None,
            }),
            ram: Arc::new(RamCounters::default()),
            xbzrle: Arc::new(Mutex::new(XbzrleSettings::default())),
            multifd: Arc::default(),
            notifiers: Mutex::new(Vec::new()),
            pause: Condvar::new(),
            tls: Default::default(),
            block: Arc::default(),
        }
    }

    /// Adds a state-change notifier (events, run state).
    pub fn add_notifier(&self, f: impl Fn(&MigrationEvent) + Send + Sync + 'static) {
        lock(&self.notifiers).push(Box::new(f));
    }

    fn notify(&self, e: MigrationEvent) {
        for n in lock(&self.notifiers).iter() {
            n(&e);
        }
    }

    /// The current status.
    pub fn status(&self) -> MigrationStatus {
        lock(&self.inner).status
    }

    /// Sets the status and tells the notifiers; a cancel request wins over `active`.
    fn set_status(&self, status: MigrationStatus) {
        // The notifier list is held from the change to its announcement, so that two changes
        // (a cancel on a monitor thread, the migration thread's end) are announced in the
        // order they were made.
        let notifiers = lock(&self.notifiers);
        {
            let mut i = lock(&self.inner);
            if i.status == status
                || (i.status == MigrationStatus::Cancelling
                    && matches!(
                        status,
                        MigrationStatus::Active
                            | MigrationStatus::PreSwitchover
                            | MigrationStatus::Device
                    ))
            {
                return;
            }
            i.status = status;
        }
        let e = MigrationEvent::Status(status);
        notifiers.iter().for_each(|n| n(&e));
    }

    /// Bandwidth limit in bytes per second (0 = unlimited).
    pub fn max_bandwidth(&self) -> u64 {
        lock(&self.inner).max_bandwidth
    }

    /// Sets the bandwidth limit; a running migration uses it from its next slot on.
    pub fn set_max_bandwidth(&self, bytes_per_second: u64) {
        lock(&self.inner).max_bandwidth = bytes_per_second;
    }

    /// Maximum downtime in ms.
    pub fn downtime_limit_ms(&self) -> u64 {
        lock(&self.inner).downtime_limit_ms
    }

    /// Sets the maximum downtime.
    pub fn set_downtime_limit_ms(&self, ms: u64) {
        lock(&self.inner).downtime_limit_ms = ms;
    }

    /// Whether the `events` capability is on: MIGRATION and MIGRATION_PASS events are sent
    /// only then, as in QEMU.
    pub fn events_enabled(&self) -> bool {
        lock(&self.inner).events
    }

    /// Sets the `events` capability.
    pub fn set_events_enabled(&self, on: bool) {
        lock(&self.inner).events = on;
    }

    /// Whether the `x-integrity` capability is on: the stream written, or read, carries a
    /// checksum after every section part ([`crate::integrity`]).
    pub fn integrity_enabled(&self) -> bool {
        lock(&self.inner).integrity
    }

    /// Sets the `x-integrity` capability (both ends must agree).
    pub fn set_integrity_enabled(&self, on: bool) {
        lock(&self.inner).integrity = on;
    }

    /// Whether the `return-path` capability is on (the default): on a two-way transport the
    /// source waits for the destination's verdict and runs the switchover handshake
    /// ([`crate::return_path`]); one-way transports (`exec:`, a pipe `fd:`) ignore it.
    pub fn return_path_enabled(&self) -> bool {
        lock(&self.inner).return_path
    }

    /// Sets the `return-path` capability.
    pub fn set_return_path_enabled(&self, on: bool) {
        lock(&self.inner).return_path = on;
    }

    /// Whether the `auto-converge` capability is on: the vCPUs are slowed down while the
    /// guest dirties memory faster than it is sent.
    pub fn auto_converge_enabled(&self) -> bool {
        lock(&self.inner).auto_converge
    }

    /// Sets the `auto-converge` capability.
    pub fn set_auto_converge_enabled(&self, on: bool) {
        lock(&self.inner).auto_converge = on;
    }

    /// Whether the `pause-before-switchover` capability is on: once the guest is stopped for
    /// the switchover the migration waits in `pre-switchover` for `migrate-continue`.
    pub fn pause_before_switchover_enabled(&self) -> bool {
        lock(&self.inner).pause_before_switchover
    }

    /// Sets the `pause-before-switchover` capability.
    pub fn set_pause_before_switchover_enabled(&self, on: bool) {
        lock(&self.inner).pause_before_switchover = on;
    }

    /// Whether the `late-block-activate` capability is on. It is recorded and reported only:
    /// hopvm's disks are plain files, so there is nothing to activate late.
    pub fn late_block_activate_enabled(&self) -> bool {
        lock(&self.inner).late_block_activate
    }

    /// Sets the `late-block-activate` capability.
    pub fn set_late_block_activate_enabled(&self, on: bool) {
        lock(&self.inner).late_block_activate = on;
    }

    /// QMP `migrate-continue`: `state` must be the current state (QEMU's check); in
    /// `pre-switchover` the paused migration goes on to `device`.
    pub fn continue_from(&self, state: MigrationStatus) -> Result<(), ContinueError> {
        let mut i = lock(&self.inner);
        if i.status != state {
            return Err(ContinueError::NotInState(i.status));
        }
        if state == MigrationStatus::PreSwitchover {
            i.continued = true;
            self.pause.notify_all();
        }
        Ok(())
    }

    /// With `pause-before-switchover`: `pre-switchover` until `migrate-continue` (then
    /// `device`, true) or a cancel (false). The guest is stopped and the big lock free.
    fn pause_before_switchover(&self) -> bool {
        {
            let mut i = lock(&self.inner);
            if !i.pause_before_switchover || i.status == MigrationStatus::Cancelling {
                return i.status != MigrationStatus::Cancelling;
            }
            i.continued = false;
        }
        self.set_status(MigrationStatus::PreSwitchover);
        let mut i = lock(&self.inner);
        while !i.continued && i.status == MigrationStatus::PreSwitchover {
            i = self.pause.wait(i).unwrap_or_else(|e| e.into_inner());
        }
        drop(i);
        self.set_status(MigrationStatus::Device);
        !self.cancelling()
    }

    /// The CPU throttling parameters.
    pub fn throttle_parameters(&self) -> ThrottleParameters {
        lock(&self.inner).throttle_params
    }

    /// Sets the CPU throttling parameters (a running migration uses them from its next
    /// period on).
    pub fn set_throttle_parameters(&self, p: ThrottleParameters) {
        lock(&self.inner).throttle_params = p;
    }

    /// The self-announce parameters an incoming migration uses.
    pub fn announce_parameters(&self) -> AnnounceParameters {
        lock(&self.inner).announce_params
    }

    /// Sets the self-announce parameters.
    pub fn set_announce_parameters(&self, p: AnnounceParameters) {
        lock(&self.inner).announce_params = p;
    }

    /// Applies `auto-converge`'s percentage to the vCPUs and records it.
    fn set_throttle<H: MigrationHost>(&self, host: &H, pct: u32) {
        lock(&self.inner).throttle_pct = pct;
        host.throttle_vcpus(pct);
    }

    /// The timeline of the current or last migration.
    pub fn timeline(&self) -> Timeline {
        lock(&self.inner).timeline.clone()
    }

    /// What `query-migrate` reports.
    pub fn info(&self) -> MigrationInfo {
        // Read under the notifier list, which `set_status` and `cancel` hold from a change to
        // its announcement: a client that sees a status here has been sent its event first
        // (QEMU's order: the MIGRATION event, then the `query-migrate` that shows it).
        let _announced = lock(&self.notifiers);
        let i = lock(&self.inner);
        let c = &self.ram;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let total_time = match (i.status.is_running(), i.start) {
            (true, Some(start)) => start.elapsed(),
            _ => i.total_time,
        };
        let cache_size = lock(&self.xbzrle).cache_size;
        MigrationInfo {
            status: i.status,
            total_time_ms: total_time.as_millis() as u64,
            setup_time_ms: i.setup_time.as_millis() as u64,
            expected_downtime_ms: i.expected_downtime.as_millis() as u64,
            downtime_ms: i.downtime.as_millis() as u64,
            mbps: i.mbps,
            transferred: i.transferred,
            remaining: get(&c.remaining_pages) * crate::ram::PAGE_SIZE,
            total: get(&c.total),
            duplicate: get(&c.duplicate),
            normal: get(&c.normal),
            normal_bytes: get(&c.normal) * crate::ram::PAGE_SIZE,
            dirty_pages_rate: get(&c.dirty_pages_rate),
            dirty_sync_count: get(&c.dirty_sync_count),
            xbzrle: i.xbzrle_on,
            xbzrle_cache_size: cache_size,
            xbzrle_pages: get(&c.xbzrle_pages),
            xbzrle_bytes: get(&c.xbzrle_bytes),
            xbzrle_cache_miss: get(&c.xbzrle_cache_miss),
            xbzrle_overflow: get(&c.xbzrle_overflow),
            pages_per_second: i.pages_per_second,
            multifd_bytes: self.multifd.bytes.load(Ordering::Relaxed),
            precopy_bytes: if i.status == MigrationStatus::Completed {
                i.precopy_bytes
            } else {
                i.transferred
            },
            downtime_bytes: i.downtime_bytes,
            cpu_throttle_percentage: i.throttle_pct,
            // As QEMU: while the migration runs (not once it completed).
            disk: {
                let b = &self.block.counters;
                let running = matches!(
                    i.status,
                    MigrationStatus::Active
                        | MigrationStatus::Cancelling
                        | MigrationStatus::PreSwitchover
                        | MigrationStatus::Device
                );
                (running && b.active.load(Ordering::Relaxed)).then(|| DiskInfo {
                    transferred: get(&b.transferred),
                    remaining: get(&b.remaining),
                    total: get(&b.total),
                })
            },
            error: i.error.clone(),
        }
    }

    /// Checks that a migration to `uri` can use this side's capabilities: `multifd` needs a
    /// transport that opens more channels (`tcp:`, `unix:`; QEMU refuses the others with the
    /// same words) and is not covered by `x-integrity`.
    pub fn check_uri(&self, uri: &MigrationUri) -> Result<(), MigrationError> {
        if self.multifd.settings().enabled {
            if !crate::transport::supports_multi_channel(uri) {
                return Err(MigrationError::MultifdProtocol);
            }
            if self.integrity_enabled() {
                return Err(MigrationError::MultifdIntegrity);
            }
        }
        Ok(())
    }

    /// Starts a migration on the channel `connect` opens. `migrate` returns at once: the
    /// connect runs on the migration thread in the `setup` state, where `migrate_cancel` ends
    /// it.
    pub fn start<H: MigrationHost>(
        self: &Arc<Self>,
        host: Arc<H>,
        connect: Connector,
    ) -> Result<(), MigrationError> {
        // The previous migration's thread may still be telling the notifiers how it ended,
        // and they take the state lock: join it without holding that lock.
        let previous = {
            let mut i = lock(&self.inner);
            if i.status.is_running() {
                return Err(MigrationError::InProgress);
            }
            i.thread.take()
        };
        if let Some(t) = previous {
            let _ = t.join();
        }
        // The registry is locked before the migration state, never while holding it.
        if let Some(reason) = lock(host.registry()).blocker() {
            return Err(MigrationError::Blocked(reason.to_string()));
        }
        if self.multifd.settings().enabled && self.integrity_enabled() {
            return Err(MigrationError::MultifdIntegrity);
        }
        let cancel = Arc::new(ConnectCancel::new().map_err(MigrationError::Cancel)?);
        {
            let mut i = lock(&self.inner);
            if i.status.is_running() {
                return Err(MigrationError::InProgress);
            }
            for a in [
                &self.ram.transferred,
                &self.ram.duplicate,
                &self.ram.normal,
                &self.ram.remaining_pages,
                &self.ram.dirty_sync_count,
                &self.ram.last_sync_dirty,
                &self.ram.dirty_pages_rate,
                &self.ram.xbzrle_pages,
                &self.ram.xbzrle_bytes,
                &self.ram.xbzrle_cache_miss,
                &self.ram.xbzrle_overflow,
                &self.multifd.bytes,
                &self.block.counters.transferred,
                &self.block.counters.remaining,
                &self.block.counters.total,
            ] {
                a.store(0, Ordering::Relaxed);
            }
            self.block.counters.active.store(false, Ordering::Relaxed);
            i.start = Some(Instant::now());
            i.setup_time = Duration::ZERO;
            i.total_time = Duration::ZERO;
            i.downtime = Duration::ZERO;
            i.expected_downtime = Duration::ZERO;
            i.mbps = 0.0;
            i.transferred = 0;
            i.throttle_pct = 0;
            i.pages_per_second = 0;
            i.precopy_bytes = 0;
            i.downtime_bytes = 0;
            i.error = None;
            i.timeline = Timeline::default();
            i.xbzrle_on = lock(&self.xbzrle).enabled;
            i.connect_cancel = Some(cancel.clone());
            i.canceller = None;
            i.committed = false;
            i.status = MigrationStatus::Setup;
        }
        self.notify(MigrationEvent::Status(MigrationStatus::Setup));
        let me = self.clone();
        let thread = std::thread::Builder::new()
            .name(String::from("migration"))
            .spawn(move || me.run(host, connect, cancel));
        match thread {
            Ok(t) => {
                lock(&self.inner).thread = Some(t);
                Ok(())
            }
            Err(e) => {
                {
                    let mut i = lock(&self.inner);
                    i.error = Some(format!("cannot start the migration thread: {e}"));
                    i.connect_cancel = None;
                }
                self.set_status(MigrationStatus::Failed);
                Err(MigrationError::Thread(e))
            }
        }
    }

    /// Asks a running migration to stop (QMP `migrate_cancel`); the source keeps running.
    /// A connect in progress is interrupted. Once the go-ahead has gone to the destination
    /// (or, without a return path, the whole stream has been handed to the transport) the
    /// destination may run the guest, so a cancel then does nothing and the migration ends
    /// as it would have.
    pub fn cancel(&self) {
        // As in `set_status`: announced before any later change.
        let notifiers = lock(&self.notifiers);
        let mut i = lock(&self.inner);
        if !i.status.is_running() || i.committed {
            return;
        }
        i.status = MigrationStatus::Cancelling;
        if let Some(c) = &i.connect_cancel {
            c.cancel();
        }
        if let Some(c) = &i.canceller {
            c();
        }
        drop(i);
        self.pause.notify_all();
        let e = MigrationEvent::Status(MigrationStatus::Cancelling);
        notifiers.iter().for_each(|n| n(&e));
    }

    /// Waits for the migration thread to end.
    pub fn join(&self) {
        let t = lock(&self.inner).thread.take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    fn cancelling(&self) -> bool {
        lock(&self.inner).status == MigrationStatus::Cancelling
    }

    /// Ends the migration unsuccessfully: sections cancelled, vCPUs restarted if needed. With
    /// a return path, the destination's own reason replaces a transport error when it has
    /// one (it usually is why the transport failed).
    fn abort<H: MigrationHost>(
        &self,
        host: &H,
        was_running: bool,
        rp: Option<&SourceReturnPath>,
        error: Option<MigrationRunError>,
    ) {
        let error = match (error, rp) {
            (
                Some(
                    e @ (MigrationRunError::Send(_)
                    | MigrationRunError::Finish(_)
                    | MigrationRunError::Multifd(_)),
                ),
                Some(rp),
            ) if !self.cancelling() => Some(
                rp.destination_error(REASON_TIMEOUT)
                    .map_or(e, MigrationRunError::Destination),
            ),
            (e, _) => e,
        };
        if lock(&self.inner).throttle_pct != 0 {
            self.set_throttle(host, 0);
        }
        {
            let mut g = lock(host.big_lock());
            lock(host.registry()).cancel();
            host.aborted(&mut g, was_running);
        }
        let status = if self.cancelling() {
            MigrationStatus::Cancelled
        } else {
            MigrationStatus::Failed
        };
        self.ended(status, error);
    }

    /// Records how the migration ended and tells the notifiers.
    fn ended(&self, status: MigrationStatus, error: Option<MigrationRunError>) {
        {
            let mut i = lock(&self.inner);
            if let Some(e) = &error {
                log::warn!("migration failed: {e}");
            }
            i.error = error
                .filter(|_| status == MigrationStatus::Failed)
                .map(|e| e.to_string());
            i.total_time = i.start.map(|s| s.elapsed()).unwrap_or_default();
            i.timeline.end_ms = Some(ms(i.total_time));
            i.canceller = None;
            i.connect_cancel = None;
        }
        self.set_status(status);
    }

    /// Sends the buffered bytes outside the lock; on failure the sections put back what they
    /// had written.
    fn flush<H: MigrationHost>(
        &self,
        host: &H,
        w: &mut StreamWriter<BufferedOutput>,
        out: &mut Outputs,
    ) -> Result<u64, MigrationRunError> {
        self.flush_keeping(host, w, out, 0)
    }

    /// [`flush`](Self::flush) but for the last `keep` bytes of the main channel. The
    /// multifd channels (all of what was queued for them) are written at the same time, each
    /// on its own thread.
    fn flush_keeping<H: MigrationHost>(
        &self,
        host: &H,
        w: &mut StreamWriter<BufferedOutput>,
        out: &mut Outputs,
        keep: usize,
    ) -> Result<u64, MigrationRunError> {
        let t0 = Instant::now();
        let Outputs { main, multifd } = out;
        let result = match multifd {
            None => w
                .get_mut()
                .flush_keeping(main.as_mut(), keep)
                .map_err(MigrationRunError::from),
            Some(mf) => {
                let (main_result, mf_result) = std::thread::scope(|s| {
                    let side = s.spawn(|| mf.flush());
                    let m = w.get_mut().flush_keeping(main.as_mut(), keep);
                    let side = side.join().unwrap_or_else(|_| {
                        Err(MultifdError::Thread(io::Error::other(
                            "a multifd sender panicked",
                        )))
                    });
                    (m, side)
                });
                match (main_result, mf_result) {
                    (Ok(a), Ok(b)) => {
                        self.ram.transferred.fetch_add(b, Ordering::Relaxed);
                        Ok(a + b)
                    }
                    (Err(e), _) => Err(e.into()),
                    (_, Err(e)) => Err(e.into()),
                }
            }
        };
        let profile = &self.ram.profile;
        profile.add_since(&profile.send_ns, t0);
        let _g = lock(host.big_lock());
        let mut reg = lock(host.registry());
        match result {
            Ok(n) => {
                reg.flushed();
                lock(&self.inner).transferred += n;
                Ok(n)
            }
            Err(e) => {
                reg.flush_failed();
                Err(e)
            }
        }
    }

    /// Opens the channel — and with `multifd` the multifd channels — and, with the
    /// `return-path` capability on a two-way transport, the return path; `None` when the
    /// migration already ended (failed or cancelled).
    fn connect<H: MigrationHost>(
        &self,
        host: &H,
        connect: Connector,
        cancel: &ConnectCancel,
    ) -> Option<(Outputs, Option<SourceReturnPath>)> {
        let out = match connect(cancel) {
            Ok(out) => out,
            Err(e) => {
                self.abort(host, false, None, Some(MigrationRunError::Connect(e)));
                return None;
            }
        };
        let settings = self.multifd.settings();
        let multifd = if settings.enabled {
            let channels = (0..settings.channels)
                .map(|id| {
                    out.connect_channel(cancel).map_err(|source| match source {
                        TransportError::MultiChannelUnsupported => source.into(),
                        source => MultifdError::Connect { id, source },
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .and_then(|c| MultifdSender::new(self.multifd.clone(), c));
            match channels {
                Ok(m) => Some(m),
                Err(e) => {
                    let e = if cancel.is_cancelled() {
                        None
                    } else {
                        Some(e.into())
                    };
                    self.abort(host, false, None, e);
                    return None;
                }
            }
        } else {
            None
        };
        // A cancel (or a destination's failed load) shuts every channel down.
        let stopper = {
            let main = out.canceller();
            let side = multifd
                .as_ref()
                .map(MultifdSender::shutdown_handles)
                .unwrap_or_default();
            move || {
                if let Some(main) = &main {
                    main();
                }
                side.iter().for_each(ChannelStream::shutdown);
            }
        };
        let stopper: Arc<dyn Fn() + Send + Sync> = Arc::new(stopper);
        {
            // Connected: from now on a cancel shuts the channels down.
            let mut i = lock(&self.inner);
            i.connect_cancel = None;
            let s = stopper.clone();
            i.canceller = Some(Box::new(move || s()));
        }
        if self.cancelling() {
            self.abort(host, false, None, None);
            return None;
        }
        let reader = if self.return_path_enabled() {
            out.return_path()
        } else {
            None
        };
        let rp = match reader {
            None => None,
            Some(reader) => {
                // A destination that reports a failed load stops the stream at once.
                let stop = stopper.clone();
                let on_failure = Box::new(move || stop());
                match SourceReturnPath::spawn(reader, on_failure) {
                    Ok(rp) => Some(rp),
                    Err(e) => {
                        self.abort(
                            host,
                            false,
                            None,
                            Some(MigrationRunError::ReturnPathThread(e)),
                        );
                        return None;
                    }
                }
            }
        };
        Some((Outputs { main: out, multifd }, rp))
    }

    fn run<H: MigrationHost>(
        self: Arc<Self>,
        host: Arc<H>,
        connect: Connector,
        cancel: Arc<ConnectCancel>,
    ) {
        let start = lock(&self.inner).start.unwrap_or_else(Instant::now);
        let Some((mut out, rp)) = self.connect(host.as_ref(), connect, &cancel) else {
            return;
        };
        drop(cancel);
        let rp = rp.as_ref();
        let mut w = if self.integrity_enabled() {
            StreamWriter::with_integrity(BufferedOutput::new())
        } else {
            StreamWriter::new(BufferedOutput::new())
        };
        self.ram.profile.reset();
        let faults0 = crate::ram::thread_faults();

        // Setup: the return-path commands (as QEMU's migration_thread: open it, ping once)
        // and hopvm's switchover handshake, then every live section's begin, under the big
        // lock.
        let begun = {
            let _g = lock(host.big_lock());
            let commands = if rp.is_some() {
                w.header()
                    .and_then(|()| w.command(MIG_CMD_OPEN_RETURN_PATH, &[]))
                    .and_then(|()| w.command(return_path::MIG_CMD_PING, &1u32.to_be_bytes()))
                    .and_then(|()| w.command(return_path::MIG_CMD_X_HOPVM_SWITCHOVER, &[]))
                    .and_then(|()| match &out.multifd {
                        // hopvm's announcement, so that a destination set up otherwise
                        // refuses the stream instead of waiting for channels.
                        Some(_) => w.command(
                            MIG_CMD_X_HOPVM_MULTIFD,
                            &u32::from(self.multifd.settings().channels).to_be_bytes(),
                        ),
                        None => Ok(()),
                    })
                    .map_err(MigrationRunError::from)
            } else {
                Ok(())
            };
            commands.and_then(|()| {
                lock(host.registry())
                    .begin(&mut w)
                    .map_err(MigrationRunError::from)
            })
        };
        if let Err(e) = begun.and_then(|_| self.flush(host.as_ref(), &mut w, &mut out)) {
            self.abort(host.as_ref(), false, rp, Some(e));
            return;
        }
        {
            let mut i = lock(&self.inner);
            i.setup_time = start.elapsed();
            let setup_ms = ms(i.setup_time);
            i.timeline.setup_ms = Some(setup_ms);
            i.timeline.passes.push((1, setup_ms));
        }
        self.notify(MigrationEvent::Pass(1));
        self.set_status(MigrationStatus::Active);

        let mut limiter = RateLimiter::new(self.max_bandwidth(), Instant::now());
        let mut max_size = 0u64;
        let mut slot_bytes = 0u64;
        let mut slot_dirty = 0u64;
        let mut pass = self.ram.dirty_sync_count.load(Ordering::Relaxed);
        // auto-converge: the current dirty-rate period.
        let mut period_start = Instant::now();
        let mut period_dirty = 0u64;
        let mut period_xfer0 = self.ram.transferred.load(Ordering::Relaxed);
        let mut high_count = 0u32;
        let mut slot_pages0 = 0u64;
        loop {
            let mut new_throttle = None;
            if self.cancelling() {
                self.abort(host.as_ref(), false, rp, None);
                return;
            }
            limiter.set_bandwidth(self.max_bandwidth());
            if !limiter.exceeded() {
                let t0 = Instant::now();
                let mut g = lock(host.big_lock());
                let mut reg = lock(host.registry());
                self.ram.profile.add_since(&self.ram.profile.wait_ns, t0);
                let pending = reg.pending(max_size);
                let now_pass = self.ram.dirty_sync_count.load(Ordering::Relaxed);
                if now_pass != pass {
                    pass = now_pass;
                    let dirty = self.ram.last_sync_dirty.load(Ordering::Relaxed);
                    slot_dirty += dirty;
                    period_dirty += dirty;
                    if period_start.elapsed() >= THROTTLE_PERIOD {
                        let xfer = self.ram.transferred.load(Ordering::Relaxed);
                        let (on, params, now) = {
                            let i = lock(&self.inner);
                            (i.auto_converge, i.throttle_params, i.throttle_pct)
                        };
                        if on {
                            new_throttle = next_throttle(
                                &params,
                                now,
                                period_dirty * crate::ram::PAGE_SIZE,
                                xfer - period_xfer0,
                                &mut high_count,
                            );
                        }
                        period_start = Instant::now();
                        period_dirty = 0;
                        period_xfer0 = xfer;
                    }
                    lock(&self.inner)
                        .timeline
                        .passes
                        .push((pass, ms(start.elapsed())));
                    self.notify(MigrationEvent::Pass(pass));
                }
                if pending > 0 && pending >= max_size {
                    let budget = match limiter.bandwidth() {
                        0 => UNLIMITED_BATCH,
                        // A limit near u64::MAX (libvirt's "unlimited") still sends
                        // bounded batches.
                        _ => limiter
                            .xfer_limit()
                            .saturating_sub(limiter.used())
                            .clamp(1, UNLIMITED_BATCH),
                    };
                    if let Err(e) = reg.iterate(&mut w, budget) {
                        drop(reg);
                        drop(g);
                        self.abort(host.as_ref(), false, rp, Some(e.into()));
                        return;
                    }
                } else {
                    // Converged: stop the guest and send the rest. The registry lock is not
                    // held across stop_vm, which releases the big lock while it waits.
                    drop(reg);
                    let (g2, was_running) = host.stop_vm(g);
                    g = g2;
                    let stop = Instant::now();
                    if self.pause_before_switchover_enabled() {
                        // As QEMU: paused with the guest stopped and the big lock free
                        // (the monitor answers, `migrate_cancel` resumes the guest).
                        drop(g);
                        if !self.pause_before_switchover() {
                            self.abort(host.as_ref(), was_running, rp, None);
                            return;
                        }
                        g = lock(host.big_lock());
                    }
                    let precopy_bytes =
                        lock(&self.inner).transferred + w.get_ref().pending() as u64;
                    lock(&self.inner).timeline.stop_ms = Some(ms(stop - start));
                    let result = lock(host.registry()).complete(&mut w);
                    drop(g);
                    // The guest is stopped: whatever happens next, it runs at full speed.
                    if lock(&self.inner).throttle_pct != 0 {
                        self.set_throttle(host.as_ref(), 0);
                    }
                    // Without a return path the stream's tail waits until the migration
                    // is committed (`hand_over`): a cancel until then always wins safely.
                    let keep = if rp.is_none() { STREAM_TAIL } else { 0 };
                    let sent = result
                        .map_err(MigrationRunError::from)
                        .and_then(|_| self.flush_keeping(host.as_ref(), &mut w, &mut out, keep));
                    let final_pass = self.ram.dirty_sync_count.load(Ordering::Relaxed);
                    if final_pass != pass {
                        lock(&self.inner)
                            .timeline
                            .passes
                            .push((final_pass, ms(stop - start)));
                        self.notify(MigrationEvent::Pass(final_pass));
                    }
                    let outcome = match sent {
                        Err(e) => Switchover::Resume(Some(e)),
                        Ok(_) => match rp {
                            Some(rp) => self.handshake(rp, out),
                            None => self.hand_over(host.as_ref(), &mut w, out),
                        },
                    };
                    match outcome {
                        Switchover::Done => {
                            {
                                let mut g = lock(host.big_lock());
                                lock(host.registry()).finished();
                                host.completed(&mut g);
                            }
                            let mut i = lock(&self.inner);
                            i.downtime = stop.elapsed();
                            i.precopy_bytes = precopy_bytes;
                            i.downtime_bytes = i.transferred.saturating_sub(precopy_bytes);
                            i.total_time = start.elapsed();
                            i.timeline.end_ms = Some(ms(i.total_time));
                            i.canceller = None;
                            drop(i);
                            if std::env::var_os(crate::ram::PROFILE_ENV).is_some() {
                                let p = &self.ram.profile;
                                p.faults.store(
                                    crate::ram::thread_faults() - faults0,
                                    Ordering::Relaxed,
                                );
                                eprintln!(
                                    "hopvm: migration profile (source, {} ms): {}",
                                    start.elapsed().as_millis(),
                                    p.source_summary()
                                );
                            }
                            self.set_status(MigrationStatus::Completed);
                        }
                        Switchover::Resume(e) => self.abort(host.as_ref(), was_running, rp, e),
                        Switchover::Unknown => {
                            // Never resume a guest the destination may be running.
                            {
                                let mut g = lock(host.big_lock());
                                lock(host.registry()).finished();
                                host.completed(&mut g);
                            }
                            self.ended(
                                MigrationStatus::Failed,
                                Some(MigrationRunError::OutcomeUnknown),
                            );
                        }
                    }
                    return;
                }
            }
            if let Some(pct) = new_throttle {
                log::info!("auto-converge: throttling the vCPUs to {pct} %");
                self.set_throttle(host.as_ref(), pct);
            }
            match self.flush(host.as_ref(), &mut w, &mut out) {
                Ok(n) => {
                    limiter.record(n);
                    slot_bytes += n;
                }
                Err(e) => {
                    self.abort(host.as_ref(), false, rp, Some(e));
                    return;
                }
            }
            let now = Instant::now();
            if limiter.slot_over(now) {
                // What the sections still hold now, not before this slot's batches went out.
                let pending = self.ram.remaining_pages.load(Ordering::Relaxed)
                    * crate::ram::PAGE_SIZE
                    + self.block.counters.remaining.load(Ordering::Relaxed);
                let elapsed = now.duration_since(limiter.slot_start()).as_secs_f64();
                limiter.new_slot(now);
                let bandwidth = slot_bytes as f64 / elapsed.max(1e-6);
                max_size = (bandwidth * self.downtime_limit_ms() as f64 / 1e3) as u64;
                let pages = self.ram.normal.load(Ordering::Relaxed)
                    + self.ram.duplicate.load(Ordering::Relaxed);
                let mut i = lock(&self.inner);
                i.mbps = bandwidth * 8.0 / 1e6;
                i.pages_per_second =
                    (pages.saturating_sub(slot_pages0) as f64 / elapsed.max(1e-6)) as u64;
                slot_pages0 = pages;
                i.expected_downtime = if bandwidth > 0.0 {
                    Duration::from_secs_f64(pending as f64 / bandwidth)
                } else {
                    Duration::ZERO
                };
                i.timeline.slots.push(SlotRecord {
                    t_ms: ms(now - start),
                    bytes: slot_bytes,
                    pending,
                    dirty_pages: slot_dirty,
                    bandwidth,
                    max_size,
                    pass,
                });
                slot_bytes = 0;
                slot_dirty = 0;
            } else if limiter.exceeded() {
                std::thread::sleep(limiter.time_to_slot_end(now));
            }
        }
    }

    /// Without a return path: all of the stream but its last [`STREAM_TAIL`] bytes (the end
    /// of the VM description, without which no destination loads it) is with the transport.
    /// Unless a cancel came first, the migration commits — from here a cancel is too late —
    /// and the tail goes. A cancel before that point, or a tail that cannot be sent, leaves
    /// the destination an incomplete stream it refuses: then the guest resumes here.
    fn hand_over<H: MigrationHost>(
        &self,
        host: &H,
        w: &mut StreamWriter<BufferedOutput>,
        mut out: Outputs,
    ) -> Switchover {
        {
            let mut i = lock(&self.inner);
            if i.status == MigrationStatus::Cancelling {
                return Switchover::Resume(None);
            }
            i.committed = true;
            i.canceller = None;
        }
        if let Err(e) = self.flush(host, w, &mut out) {
            return Switchover::Resume(Some(e));
        }
        match out.finish() {
            Ok(()) => Switchover::Done,
            Err(e) => Switchover::Resume(Some(MigrationRunError::Finish(e))),
        }
    }

    /// With a return path: the switchover handshake ([`crate::return_path`]). The stream is
    /// sent; wait for the destination's verdict, then send the go-ahead and wait for STARTED.
    fn handshake(&self, rp: &SourceReturnPath, mut out: Outputs) -> Switchover {
        {
            // A cancel now wakes the wait instead of killing the channel, so that the
            // destination can be told to drop what it loaded.
            let waker = rp.waker();
            lock(&self.inner).canceller = Some(Box::new(move || waker.wake()));
        }
        let verdict = if self.cancelling() {
            Verdict::Woken
        } else {
            rp.wait_verdict()
        };
        let go = match verdict {
            Verdict::Loaded => {
                let mut i = lock(&self.inner);
                if i.status == MigrationStatus::Cancelling {
                    false
                } else {
                    // The last moment a cancel could win.
                    i.committed = true;
                    i.canceller = None;
                    true
                }
            }
            Verdict::Failed(why) => {
                return Switchover::Resume(Some(MigrationRunError::Destination(why)))
            }
            Verdict::Lost(why) => {
                return Switchover::Resume(Some(MigrationRunError::NoVerdict(why)))
            }
            Verdict::Woken => false,
        };
        if !go {
            let _ =
                return_path::send_command(out.main.as_mut(), return_path::MIG_CMD_X_HOPVM_ABORT);
            return Switchover::Resume(None);
        }
        // A write that fails queued nothing: the destination cannot have the go-ahead.
        if let Err(e) =
            return_path::send_command(out.main.as_mut(), return_path::MIG_CMD_X_HOPVM_GO)
        {
            return Switchover::Resume(Some(MigrationRunError::GoAhead(e)));
        }
        let _ = out.finish();
        if rp.wait_started(STARTED_TIMEOUT) {
            Switchover::Done
        } else {
            Switchover::Unknown
        }
    }
}

/// Where a running migration writes: the main channel and, with `multifd`, the multifd
/// channels.
struct Outputs {
    main: Box<dyn MigrationOutput>,
    multifd: Option<MultifdSender>,
}

impl Outputs {
    /// Closes every channel cleanly.
    fn finish(self) -> Result<(), TransportError> {
        if let Some(m) = self.multifd {
            m.finish();
        }
        self.main.finish()
    }
}

/// How a migration's switchover ended.
enum Switchover {
    /// The destination has the guest.
    Done,
    /// The destination does not run the guest: resume it here (with why, unless cancelled).
    Resume(Option<MigrationRunError>),
    /// The destination may run the guest: stay paused.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// QEMU's announce gaps: 50, 150, 250, 350 ms with the defaults; capped at `max`.
    #[test]
    fn announce_gaps() {
        let p = AnnounceParameters::default();
        let ms = |p: &AnnounceParameters, k| p.gap_after(k).as_millis();
        assert_eq!(
            (1..5).map(|k| ms(&p, k)).collect::<Vec<_>>(),
            [50, 150, 250, 350]
        );
        let capped = AnnounceParameters { max: 200, ..p };
        assert_eq!(ms(&capped, 3), 200);
        let huge = AnnounceParameters {
            step: u64::MAX,
            ..p
        };
        assert_eq!(ms(&huge, 3), 550);
    }

    /// A VMM with nothing but an empty registry.
    struct Host {
        big: Mutex<()>,
        registry: Mutex<Registry>,
    }

    impl MigrationHost for Host {
        type Locked = ();
        fn big_lock(&self) -> &Mutex<()> {
            &self.big
        }
        fn registry(&self) -> &Mutex<Registry> {
            &self.registry
        }
        fn stop_vm<'a>(&self, g: MutexGuard<'a, ()>) -> (MutexGuard<'a, ()>, bool) {
            (g, true)
        }
        fn aborted(&self, _: &mut (), _: bool) {}
        fn completed(&self, _: &mut ()) {}
    }

    /// An output that keeps what it is sent.
    struct Sink;

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl MigrationOutput for Sink {
        fn finish(self: Box<Self>) -> Result<(), TransportError> {
            Ok(())
        }
    }

    fn sink() -> Connector {
        Box::new(|_| Ok(Box::new(Sink) as Box<dyn MigrationOutput>))
    }

    fn host() -> Arc<Host> {
        Arc::new(Host {
            big: Mutex::new(()),
            registry: Mutex::new(Registry::new()),
        })
    }

    /// Issue 14: `migrate` right after a migration ended used to join the old thread while
    /// holding the state lock that the thread's last notifier takes.
    #[test]
    fn start_right_after_the_end_does_not_deadlock() {
        let m = Arc::new(Migration::new());
        let (ended_tx, ended_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let started_rx = Mutex::new(started_rx);
        let weak = Arc::downgrade(&m);
        m.add_notifier(move |e| {
            if *e == MigrationEvent::Status(MigrationStatus::Completed) {
                let _ = ended_tx.send(());
                // Give the next `start` time to take the state lock, then take it here as
                // the event notifier does (events_enabled).
                let _ = lock(&started_rx).recv_timeout(Duration::from_millis(100));
                if let Some(m) = weak.upgrade() {
                    let _ = m.events_enabled();
                }
            }
        });
        let h = host();
        for round in 0..5 {
            m.start(h.clone(), sink()).unwrap();
            ended_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("migration completes");
            let (done_tx, done_rx) = mpsc::channel();
            let (m2, h2) = (m.clone(), h.clone());
            std::thread::spawn(move || {
                // The previous migration's thread is still in its notifier: this start must
                // wait for it without blocking it.
                while m2.status().is_running() {
                    std::thread::yield_now();
                }
                let _ = done_tx.send(m2.start(h2, sink()));
            });
            let result = done_rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("round {round}: migrate after a migration deadlocked"));
            result.unwrap();
            let _ = started_tx.send(());
            ended_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the second migration completes");
            let _ = started_tx.send(());
            m.join();
        }
    }

    /// `pause-before-switchover`, as QEMU's `migration_maybe_pause`: `pre-switchover` until
    /// `migrate-continue` names that state, then `device` and `completed`; a cancel while
    /// paused ends in `cancelled` with the guest given back.
    #[test]
    fn pause_before_switchover_waits_for_continue_or_cancel() {
        use std::sync::atomic::AtomicBool;
        type S = MigrationStatus;
        struct Pausing {
            inner: Arc<Host>,
            resumed: AtomicBool,
        }
        impl MigrationHost for Pausing {
            type Locked = ();
            fn big_lock(&self) -> &Mutex<()> {
                self.inner.big_lock()
            }
            fn registry(&self) -> &Mutex<Registry> {
                self.inner.registry()
            }
            fn stop_vm<'a>(&self, g: MutexGuard<'a, ()>) -> (MutexGuard<'a, ()>, bool) {
                (g, true)
            }
            fn aborted(&self, _: &mut (), was_running: bool) {
                self.resumed.store(was_running, Ordering::SeqCst);
            }
            fn completed(&self, _: &mut ()) {}
        }
        let wait_for = |m: &Migration, want: MigrationStatus| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while m.status() != want {
                assert!(Instant::now() < deadline, "{:?}, not {want:?}", m.status());
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        for cancel in [false, true] {
            let m = Arc::new(Migration::new());
            m.set_pause_before_switchover_enabled(true);
            let seen = Arc::new(Mutex::new(Vec::new()));
            let s2 = seen.clone();
            m.add_notifier(move |e| {
                if let MigrationEvent::Status(s) = e {
                    lock(&s2).push(*s);
                }
            });
            assert_eq!(
                m.continue_from(MigrationStatus::PreSwitchover)
                    .unwrap_err()
                    .to_string(),
                "Migration not in expected state: none"
            );
            let h = Arc::new(Pausing {
                inner: host(),
                resumed: AtomicBool::new(false),
            });
            m.start(h.clone(), sink()).unwrap();
            wait_for(&m, MigrationStatus::PreSwitchover);
            // Still paused a while later; the wrong state is refused.
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(m.status(), MigrationStatus::PreSwitchover);
            assert_eq!(
                m.continue_from(MigrationStatus::Active),
                Err(ContinueError::NotInState(MigrationStatus::PreSwitchover))
            );
            if cancel {
                m.cancel();
                wait_for(&m, S::Cancelled);
                m.join();
                assert!(
                    h.resumed.load(Ordering::SeqCst),
                    "the guest was not given back"
                );
                assert_eq!(
                    *lock(&seen),
                    [
                        S::Setup,
                        S::Active,
                        S::PreSwitchover,
                        S::Cancelling,
                        S::Cancelled
                    ]
                );
            } else {
                m.continue_from(S::PreSwitchover).unwrap();
                wait_for(&m, S::Completed);
                m.join();
                assert!(!h.resumed.load(Ordering::SeqCst));
                assert_eq!(
                    *lock(&seen),
                    [
                        S::Setup,
                        S::Active,
                        S::PreSwitchover,
                        S::Device,
                        S::Completed
                    ]
                );
            }
        }
    }

    /// QEMU's rule: throttle after the second period in a row whose dirtying outran half the
    /// transfer; then step up by the increment (or, tail-slow, by what the rates call for), never
    /// past the maximum.
    #[test]
    fn throttle_steps_as_qemu() {
        let p = ThrottleParameters::default();
        let mut high = 0;
        // Dirtying below the threshold: nothing, and the count does not move.
        assert_eq!(next_throttle(&p, 0, 40, 100, &mut high), None);
        assert_eq!(high, 0);
        // First high period: not yet; second: the initial percentage.
        assert_eq!(next_throttle(&p, 0, 60, 100, &mut high), None);
        assert_eq!(next_throttle(&p, 0, 60, 100, &mut high), Some(20));
        assert_eq!(high, 0);
        assert_eq!(next_throttle(&p, 20, 60, 100, &mut high), None);
        assert_eq!(next_throttle(&p, 20, 60, 100, &mut high), Some(30));
        high = 1;
        assert_eq!(next_throttle(&p, 95, 600, 100, &mut high), Some(99));
        // Tail-slow: at 50 %, dirtying twice the threshold calls for 25 more, capped at 10;
        // just over it calls for less.
        let slow = ThrottleParameters {
            tailslow: true,
            ..p
        };
        high = 1;
        assert_eq!(next_throttle(&slow, 50, 100, 100, &mut high), Some(60));
        high = 1;
        assert_eq!(next_throttle(&slow, 50, 52, 100, &mut high), Some(50 + 1));
        let capped = ThrottleParameters { max: 40, ..p };
        high = 1;
        assert_eq!(next_throttle(&capped, 35, 100, 100, &mut high), Some(40));
    }
}
