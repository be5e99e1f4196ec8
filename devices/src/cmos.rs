//! MC146818 real-time clock and its 128 bytes of CMOS RAM (ports 0x70/0x71).
//!
//! Guests read the wall-clock time at boot from the RTC, and firmware-less boots still find the
//! PC's memory-size bytes in CMOS RAM where BIOSes left them. QEMU's `hw/rtc/mc146818rtc.c`
//! (the clock) and `pc_cmos_init` in `hw/i386/pc.c` (the memory bytes) are the reference.
//!
//! # Ports
//!
//! Register the device at [`CMOS_BASE`] (0x70) with length [`CMOS_PORT_LEN`] (2). Even offsets
//! take the register index (bit 7, the NMI mask on a real PC, is dropped as QEMU does: KVM
//! delivers NMIs regardless) and read as 0xff; odd offsets access the selected register. Wider
//! accesses are split into byte accesses at consecutive offsets.
//!
//! # Time keeping
//!
//! The clock is the host's UTC clock plus an offset the guest controls: writing a time or date
//! register (or leaving SET mode, or leaving divider reset) recomputes the offset from the
//! registers. Only the offset is state, never the wall time, so a migrated guest keeps its
//! clock — including any time it set itself — provided both hosts keep UTC. The time registers
//! are recomputed from the clock on every read while the clock runs, in BCD or binary (status B
//! bit 2) and 12- or 24-hour format (bit 1), and freeze while SET (B bit 7) or divider reset
//! (A bits 6:5 = 11) stops the clock. Calendar conversion is done here (proleptic Gregorian, no
//! external crate); the century byte is at 0x32 with the IBM PS/2 alias at 0x37.
//!
//! Status A reports the update-in-progress bit during the last 244 µs of each second, as QEMU
//! does. Status D always reads 0x80 (valid RAM and time).
//!
//! # Interrupts (IRQ 8)
//!
//! Status C's flags are brought up to date whenever the guest touches the RTC and by a timer
//! thread: UF once a second boundary has passed (clock running), AF when a second matching the
//! alarm registers (0xC0–0xFF meaning "don't care") has passed, PF when a periodic-interrupt
//! period (status A rate bits) has passed while PIE is set — as in QEMU, PF only counts with
//! PIE. IRQF is set when a flag is enabled in status B, and the interrupt line follows IRQF:
//! it goes high when IRQF is set and low when the guest reads status C (which clears it) or
//! disables the interrupt in status B. The timer thread sleeps until the next *enabled* event
//! (none while IRQF is already set), so an idle RTC costs nothing; guests that merely poll
//! status C do not need it.
//!
//! The thread holds the device's internal lock while it drives the line, so
//! [`IrqLine::set_level`](crate::IrqLine::set_level) must not wait for the VMM's big lock
//! (a plain `KVM_IRQ_LINE` ioctl is fine). It ends when the [`Cmos`] is dropped.
//!
//! # Left out
//!
//! The square wave output, QEMU's lost-tick reinjection of periodic interrupts, and the other
//! CMOS RAM bytes QEMU fills in (floppy and disk types, boot order; they matter to SeaBIOS
//! only) are not emulated. The equipment byte 0x14 is set like QEMU's (FPU and PS/2 mouse
//! present). No CMOS checksum is kept, as in QEMU.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{BusDevice, SharedIrq, VmRequest};

/// The port the device expects to be registered at.
pub const CMOS_BASE: u64 = 0x70;
/// The RTC's ISA interrupt.
pub const CMOS_IRQ: u32 = 8;
/// The length of the port range the device expects (0x70–0x71).
pub const CMOS_PORT_LEN: u64 = 2;
/// The size of CMOS RAM, clock registers included.
pub const CMOS_SIZE: usize = 128;

const NS_PER_SEC: i128 = 1_000_000_000;
/// How long UIP is set before each update (8 periods of the 32768 Hz time base), in ns.
const UIP_HOLD_NS: i128 = 8 * NS_PER_SEC / 32768;

const RTC_SECONDS: u8 = 0x00;
const RTC_SECONDS_ALARM: u8 = 0x01;
const RTC_MINUTES: u8 = 0x02;
const RTC_MINUTES_ALARM: u8 = 0x03;
const RTC_HOURS: u8 = 0x04;
const RTC_HOURS_ALARM: u8 = 0x05;
const RTC_DAY_OF_WEEK: u8 = 0x06;
const RTC_DAY_OF_MONTH: u8 = 0x07;
const RTC_MONTH: u8 = 0x08;
const RTC_YEAR: u8 = 0x09;
const RTC_REG_A: u8 = 0x0a;
const RTC_REG_B: u8 = 0x0b;
const RTC_REG_C: u8 = 0x0c;
const RTC_REG_D: u8 = 0x0d;
const RTC_CENTURY: u8 = 0x32;
const RTC_IBM_PS2_CENTURY: u8 = 0x37;

const REG_A_UIP: u8 = 0x80;
const REG_B_SET: u8 = 0x80;
const REG_B_PIE: u8 = 0x40;
const REG_B_AIE: u8 = 0x20;
const REG_B_UIE: u8 = 0x10;
const REG_B_DM: u8 = 0x04;
const REG_B_24H: u8 = 0x02;
const REG_C_UF: u8 = 0x10;
const REG_C_AF: u8 = 0x20;
const REG_C_PF: u8 = 0x40;
const REG_C_IRQF: u8 = 0x80;
const REG_C_MASK: u8 = 0x70;
const REG_D_VRT: u8 = 0x80;

/// The equipment byte QEMU sets: FPU present, PS/2 mouse installed.
const REG_EQUIPMENT_BYTE: usize = 0x14;
const EQUIPMENT: u8 = 0x02 | 0x04;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Everything the guest can observe of a [`Cmos`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmosState {
    /// The selected register (0–127).
    pub index: u8,
    /// The 128 bytes of CMOS RAM, clock registers included (time registers as last computed).
    pub data: Vec<u8>,
    /// Guest RTC time minus host UTC time, in nanoseconds.
    pub offset_ns: i128,
    /// Guest RTC time (ns since the epoch) up to which status C's flags have been computed.
    pub flags_ns: i128,
}

/// The host clock: UTC nanoseconds since the Unix epoch.
type Clock = Box<dyn Fn() -> i128 + Send>;

fn host_utc_ns() -> i128 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// Days since 1970-01-01 → (year, month 1–12, day 1–31), proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Seconds since the epoch of a broken-down UTC time; like QEMU's `mktimegm`, out-of-range
/// fields (a guest can write anything) are folded in arithmetically rather than rejected.
fn seconds_from_civil(year: i64, month: i64, day: i64, hour: i64, min: i64, sec: i64) -> i64 {
    let (mut y, mut m) = (year, month);
    if m < 3 {
        m += 12;
        y -= 1;
    }
    let days = day + (153 * m - 457) / 5 + 365 * y + y.div_euclid(4) - y.div_euclid(100)
        + y.div_euclid(400)
        - 719_469;
    86_400 * days + 3600 * hour + 60 * min + sec
}

/// An MC146818 RTC with CMOS RAM; register it at [`CMOS_BASE`] with length [`CMOS_PORT_LEN`].
pub struct Cmos {
    shared: Arc<Shared>,
    timer: Option<JoinHandle<()>>,
}

/// What the device and its timer thread share.
struct Shared {
    rtc: Mutex<Rtc>,
    /// Wakes the timer thread: settings changed, status C was read, or the device is dropped.
    wake: Condvar,
}

/// The device proper.
struct Rtc {
    s: CmosState,
    clock: Clock,
    irq: SharedIrq,
    irq_level: bool,
    /// Tells the timer thread to end.
    stop: bool,
}

impl Cmos {
    /// A CMOS whose clock shows the host's UTC time and whose RAM describes the memory layout
    /// as QEMU's `pc_cmos_init` does: `mem_below_4g` and `mem_above_4g` bytes of RAM below
    /// and above 4 GiB, and `cpus` boot CPUs. `irq` is IRQ 8, driven by a timer thread
    /// started here (if the thread cannot be started, flags are still computed on access).
    pub fn new(mem_below_4g: u64, mem_above_4g: u64, cpus: u8, irq: SharedIrq) -> Self {
        let mut cmos =
            Self::with_clock(mem_below_4g, mem_above_4g, cpus, irq, Box::new(host_utc_ns));
        let shared = cmos.shared.clone();
        match std::thread::Builder::new()
            .name("rtc-timer".into())
            .spawn(move || timer_loop(&shared))
        {
            Ok(handle) => cmos.timer = Some(handle),
            Err(e) => log::warn!("cmos: cannot start the RTC timer thread, no IRQ 8: {e}"),
        }
        cmos
    }

    fn with_clock(
        mem_below_4g: u64,
        mem_above_4g: u64,
        cpus: u8,
        irq: SharedIrq,
        clock: Clock,
    ) -> Self {
        let rtc = Rtc::new(mem_below_4g, mem_above_4g, cpus, irq, clock);
        Self {
            shared: Arc::new(Shared {
                rtc: Mutex::new(rtc),
                wake: Condvar::new(),
            }),
            timer: None,
        }
    }

    /// Whether the alarm has gone off with alarm interrupts enabled — what wakes a machine
    /// suspended to RAM (the flag stays set until the guest reads status C).
    pub fn alarm_fired(&self) -> bool {
        vmm_sync::lock(&self.shared.rtc).alarm_fired()
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> CmosState {
        vmm_sync::lock(&self.shared.rtc).s.clone()
    }

    /// Replaces the device's state with `state` and drives IRQ 8 to the level status C's IRQF
    /// bit gives; the clock goes on from the host's UTC time plus the saved offset.
    ///
    /// A RAM image that is not exactly 128 bytes, a register index past 127 or a clock more
    /// than about 18 000 years from the epoch is rejected and the device is left as it was.
    pub fn restore(&mut self, state: &CmosState) -> Result<(), CmosStateError> {
        state.validate()?;
        let mut rtc = vmm_sync::lock(&self.shared.rtc);
        rtc.s = state.clone();
        rtc.irq_level = rtc.reg(RTC_REG_C) & REG_C_IRQF != 0;
        rtc.irq.set_level(rtc.irq_level);
        drop(rtc);
        self.shared.wake.notify_all();
        Ok(())
    }
}

/// How far from the epoch (either way, in ns) a restored clock may be: beyond any date the
/// RTC's registers can show (years 0–9999), far inside i128 arithmetic.
const MAX_CLOCK_NS: i128 = 1 << 69;

/// Why a [`CmosState`] cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmosStateError {
    /// CMOS RAM is not 128 bytes.
    #[error("cmos ram of {0} bytes, the device has {CMOS_SIZE}")]
    RamSize(usize),
    /// The selected register is past the 128 bytes.
    #[error("register index {0:#04x} is past the 128 registers")]
    Index(u8),
    /// A clock offset or flag time out of range.
    #[error("{field} {value} ns is out of range")]
    Clock {
        /// `offset_ns` or `flags_ns`.
        field: &'static str,
        /// Its value.
        value: i128,
    },
}

impl CmosState {
    /// Checks the state against what the device can reach (see [`Cmos::restore`]).
    pub fn validate(&self) -> Result<(), CmosStateError> {
        if self.data.len() != CMOS_SIZE {
            return Err(CmosStateError::RamSize(self.data.len()));
        }
        if usize::from(self.index) >= CMOS_SIZE {
            return Err(CmosStateError::Index(self.index));
        }
        for (field, value) in [("offset_ns", self.offset_ns), ("flags_ns", self.flags_ns)] {
            if !(-MAX_CLOCK_NS..=MAX_CLOCK_NS).contains(&value) {
                return Err(CmosStateError::Clock { field, value });
            }
        }
        Ok(())
    }
}

impl Drop for Cmos {
    fn drop(&mut self) {
        vmm_sync::lock(&self.shared.rtc).stop = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self.timer.take() {
            if handle.join().is_err() {
                log::warn!("cmos: the RTC timer thread panicked");
            }
        }
    }
}

/// The timer thread: keeps status C (and so IRQ 8) up to date while an interrupt is enabled.
///
/// It takes only the inner `rtc` mutex, not the VMM's big lock: every other path to the RTC's
/// state takes that mutex too, `KVM_IRQ_LINE` is serialised by KVM, and restore re-derives the
/// line from IRQF (see `docs/architecture.md`, "The RTC timer thread and the big lock").
fn timer_loop(shared: &Shared) {
    let mut rtc = vmm_sync::lock(&shared.rtc);
    while !rtc.stop {
        rtc.sync_flags();
        rtc = match rtc.next_event_in() {
            Some(timeout) => vmm_sync::wait_timeout(&shared.wake, rtc, timeout).0,
            None => vmm_sync::wait(&shared.wake, rtc),
        };
    }
}

impl Rtc {
    fn new(mem_below_4g: u64, mem_above_4g: u64, cpus: u8, irq: SharedIrq, clock: Clock) -> Self {
        let mut data = vec![0u8; CMOS_SIZE];
        data[usize::from(RTC_REG_A)] = 0x26;
        data[usize::from(RTC_REG_B)] = REG_B_24H;
        data[usize::from(RTC_REG_D)] = REG_D_VRT;
        data[REG_EQUIPMENT_BYTE] = EQUIPMENT;

        let mut set16 = |lo: usize, val: u64| {
            data[lo] = val as u8;
            data[lo + 1] = (val >> 8) as u8;
        };
        // Base memory (KiB in the first MiB).
        set16(0x15, (mem_below_4g / KIB).min(640));
        // Extended memory above 1 MiB, in KiB.
        let ext = (mem_below_4g.saturating_sub(MIB) / KIB).min(65535);
        set16(0x17, ext);
        set16(0x30, ext);
        // Memory between 16 MiB and 4 GiB, in 64 KiB units.
        set16(
            0x34,
            (mem_below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(65535),
        );
        // Memory above 4 GiB, in 64 KiB units (three bytes).
        let high = mem_above_4g / (64 * KIB);
        data[0x5b] = high as u8;
        data[0x5c] = (high >> 8) as u8;
        data[0x5d] = (high >> 16) as u8;
        data[0x5f] = cpus.saturating_sub(1);

        let mut rtc = Self {
            s: CmosState {
                index: 0,
                data,
                offset_ns: 0,
                flags_ns: 0,
            },
            clock,
            irq,
            irq_level: false,
            stop: false,
        };
        rtc.s.flags_ns = rtc.guest_ns();
        rtc.update_time();
        rtc
    }

    /// Drives IRQ 8 to follow status C's IRQF bit.
    fn update_line(&mut self) {
        let level = self.reg(RTC_REG_C) & REG_C_IRQF != 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    /// See [`Cmos::alarm_fired`].
    fn alarm_fired(&mut self) -> bool {
        self.sync_flags();
        self.reg(RTC_REG_C) & REG_C_AF != 0 && self.reg(RTC_REG_B) & REG_B_AIE != 0
    }

    fn reg(&self, index: u8) -> u8 {
        self.s.data.get(usize::from(index)).copied().unwrap_or(0)
    }

    fn set_reg(&mut self, index: u8, val: u8) {
        if let Some(b) = self.s.data.get_mut(usize::from(index)) {
            *b = val;
        }
    }

    fn guest_ns(&self) -> i128 {
        (self.clock)() + self.s.offset_ns
    }

    /// The clock runs: not in SET mode and the divider is in a normal time-base setting.
    fn running(&self) -> bool {
        self.reg(RTC_REG_B) & REG_B_SET == 0 && self.reg(RTC_REG_A) & 0x70 <= 0x20
    }

    fn encode(&self, a: i64) -> u8 {
        if self.reg(RTC_REG_B) & REG_B_DM != 0 {
            a as u8
        } else {
            (((a / 10) << 4) | (a % 10)) as u8
        }
    }

    fn decode(&self, a: u8) -> i64 {
        if a & 0xc0 == 0xc0 {
            -1
        } else if self.reg(RTC_REG_B) & REG_B_DM != 0 {
            i64::from(a)
        } else {
            i64::from(a >> 4) * 10 + i64::from(a & 0x0f)
        }
    }

    /// Decodes an hours register (or the hours alarm) to 0–23 in the current format.
    fn hours_from_reg(&self, raw: u8) -> i64 {
        let hour = self.decode(raw & 0x7f);
        if self.reg(RTC_REG_B) & REG_B_24H != 0 {
            hour
        } else {
            hour % 12 + if raw & 0x80 != 0 { 12 } else { 0 }
        }
    }

    /// Writes the guest's current time into the time registers (QEMU's `rtc_update_time`).
    fn update_time(&mut self) {
        if self.reg(RTC_REG_B) & REG_B_SET != 0 {
            return;
        }
        let secs = self.guest_ns().div_euclid(NS_PER_SEC) as i64;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (hour, min, sec) = (sod / 3600, sod / 60 % 60, sod % 60);
        let (year, month, day) = civil_from_days(days);
        let weekday = (days + 4).rem_euclid(7) + 1;

        self.set_reg(RTC_SECONDS, self.encode(sec));
        self.set_reg(RTC_MINUTES, self.encode(min));
        let hours = if self.reg(RTC_REG_B) & REG_B_24H != 0 {
            self.encode(hour)
        } else {
            let h12 = if hour % 12 == 0 { 12 } else { hour % 12 };
            self.encode(h12) | if hour >= 12 { 0x80 } else { 0 }
        };
        self.set_reg(RTC_HOURS, hours);
        self.set_reg(RTC_DAY_OF_WEEK, self.encode(weekday));
        self.set_reg(RTC_DAY_OF_MONTH, self.encode(day));
        self.set_reg(RTC_MONTH, self.encode(month));
        self.set_reg(RTC_YEAR, self.encode(year.rem_euclid(100)));
        self.set_reg(RTC_CENTURY, self.encode(year.div_euclid(100)));
    }

    /// Sets the guest's clock from the time registers, `phase_ns` into the second they show
    /// (QEMU's `rtc_set_time`).
    fn set_time(&mut self, phase_ns: i128) {
        let year = self.decode(self.reg(RTC_YEAR)) + self.decode(self.reg(RTC_CENTURY)) * 100;
        let secs = seconds_from_civil(
            year,
            self.decode(self.reg(RTC_MONTH)),
            self.decode(self.reg(RTC_DAY_OF_MONTH)),
            self.hours_from_reg(self.reg(RTC_HOURS)),
            self.decode(self.reg(RTC_MINUTES)),
            self.decode(self.reg(RTC_SECONDS)),
        );
        let guest = i128::from(secs) * NS_PER_SEC + phase_ns;
        self.s.offset_ns = guest - (self.clock)();
        self.s.flags_ns = guest;
    }

    /// How far the guest clock is into its current second.
    fn phase_ns(&self) -> i128 {
        self.guest_ns().rem_euclid(NS_PER_SEC)
    }

    fn update_in_progress(&self) -> bool {
        self.running() && self.phase_ns() >= NS_PER_SEC - UIP_HOLD_NS
    }

    /// The first second in `(from, to]` (guest seconds) that the alarm registers match.
    fn next_alarm(&self, from: i64, to: i64) -> Option<i64> {
        let dont_care = |r: u8| self.reg(r) & 0xc0 == 0xc0;
        let want_s =
            (!dont_care(RTC_SECONDS_ALARM)).then(|| self.decode(self.reg(RTC_SECONDS_ALARM)));
        let want_m =
            (!dont_care(RTC_MINUTES_ALARM)).then(|| self.decode(self.reg(RTC_MINUTES_ALARM)));
        let want_h =
            (!dont_care(RTC_HOURS_ALARM)).then(|| self.hours_from_reg(self.reg(RTC_HOURS_ALARM)));
        // Any alarm that can match does so within a day.
        let mut t = from.max(to - 2 * 86_400) + 1;
        while t <= to {
            let sod = t.rem_euclid(86_400);
            let (h, m, s) = (sod / 3600, sod / 60 % 60, sod % 60);
            if want_h.is_some_and(|w| w != h) {
                t += 3600 - sod % 3600;
            } else if want_m.is_some_and(|w| w != m) {
                t += 60 - s;
            } else if want_s.is_some_and(|w| w != s) {
                t += 1;
            } else {
                return Some(t);
            }
        }
        None
    }

    /// How long until the next event whose interrupt is enabled, if IRQF is not set already.
    fn next_event_in(&self) -> Option<Duration> {
        if self.reg(RTC_REG_C) & REG_C_IRQF != 0 {
            return None;
        }
        let b = self.reg(RTC_REG_B);
        let now = self.guest_ns();
        let now_sec = now.div_euclid(NS_PER_SEC) as i64;
        let mut next: Option<i128> = None;
        let mut consider = |t: i128| next = Some(next.map_or(t, |n| n.min(t)));
        if self.running() {
            if b & REG_B_UIE != 0 {
                consider(i128::from(now_sec + 1) * NS_PER_SEC);
            }
            if b & REG_B_AIE != 0 {
                if let Some(t) = self.next_alarm(now_sec, now_sec + 2 * 86_400) {
                    consider(i128::from(t) * NS_PER_SEC);
                }
            }
        }
        let period = self.periodic_ticks();
        if period > 0 {
            let ticks = (now * 32768).div_euclid(NS_PER_SEC).div_euclid(period) + 1;
            // Round up so that the boundary has passed when the thread wakes.
            let ns = (ticks * period * NS_PER_SEC + 32767).div_euclid(32768);
            consider(ns);
        }
        let wait = next? - now;
        Some(Duration::from_nanos(
            wait.clamp(0, i128::from(u64::MAX)) as u64
        ))
    }

    /// The periodic interrupt period in 32768 Hz ticks, 0 if off (QEMU's
    /// `rtc_periodic_clock_ticks`: only while PIE is set).
    fn periodic_ticks(&self) -> i128 {
        if self.reg(RTC_REG_B) & REG_B_PIE == 0 {
            return 0;
        }
        let code = self.reg(RTC_REG_A) & 0x0f;
        match code {
            0 => 0,
            1 | 2 => 1 << (code + 6),
            _ => 1 << (code - 1),
        }
    }

    /// Brings status C's flags up to the present (see the module documentation).
    fn sync_flags(&mut self) {
        let now = self.guest_ns();
        let last = self.s.flags_ns;
        self.s.flags_ns = now;
        if now <= last {
            return;
        }
        let mut irqs = 0;
        let (last_sec, now_sec) = (
            last.div_euclid(NS_PER_SEC) as i64,
            now.div_euclid(NS_PER_SEC) as i64,
        );
        if self.running() && now_sec > last_sec {
            irqs |= REG_C_UF;
            if self.next_alarm(last_sec, now_sec).is_some() {
                irqs |= REG_C_AF;
            }
        }
        let period = self.periodic_ticks();
        if period > 0 {
            let tick = |ns: i128| (ns * 32768).div_euclid(NS_PER_SEC).div_euclid(period);
            if tick(now) > tick(last) {
                irqs |= REG_C_PF;
            }
        }
        let mut c = self.reg(RTC_REG_C) | irqs;
        if c & self.reg(RTC_REG_B) & REG_C_MASK != 0 {
            c |= REG_C_IRQF;
        }
        self.set_reg(RTC_REG_C, c);
        self.update_line();
    }

    fn read_data(&mut self) -> u8 {
        self.sync_flags();
        if self.s.index == RTC_IBM_PS2_CENTURY {
            self.s.index = RTC_CENTURY;
        }
        match self.s.index {
            RTC_SECONDS | RTC_MINUTES | RTC_HOURS | RTC_DAY_OF_WEEK | RTC_DAY_OF_MONTH
            | RTC_MONTH | RTC_YEAR | RTC_CENTURY => {
                if self.running() {
                    self.update_time();
                }
                self.reg(self.s.index)
            }
            RTC_REG_A => {
                let uip = if self.update_in_progress() {
                    REG_A_UIP
                } else {
                    0
                };
                self.reg(RTC_REG_A) | uip
            }
            RTC_REG_C => {
                let ret = self.reg(RTC_REG_C);
                self.set_reg(RTC_REG_C, 0);
                self.update_line();
                ret
            }
            index => self.reg(index),
        }
    }

    fn write_data(&mut self, val: u8) {
        self.sync_flags();
        if self.s.index == RTC_IBM_PS2_CENTURY {
            self.s.index = RTC_CENTURY;
        }
        match self.s.index {
            RTC_SECONDS | RTC_MINUTES | RTC_HOURS | RTC_DAY_OF_WEEK | RTC_DAY_OF_MONTH
            | RTC_MONTH | RTC_YEAR | RTC_CENTURY => {
                if self.running() {
                    // Bring the other fields up to date so that the new time is built from
                    // the current date and time, not from values of the last read.
                    let phase = self.phase_ns();
                    self.update_time();
                    self.set_reg(self.s.index, val);
                    self.set_time(phase);
                } else {
                    self.set_reg(self.s.index, val);
                }
            }
            RTC_REG_A => {
                let a = self.reg(RTC_REG_A);
                if val & 0x60 == 0x60 {
                    // Divider reset: the clock stops with the registers showing the time.
                    if self.running() {
                        self.update_time();
                    }
                } else if a & 0x60 == 0x60 && val & 0x70 <= 0x20 {
                    // The first update after the divider reset is removed comes half a
                    // second later.
                    if self.reg(RTC_REG_B) & REG_B_SET == 0 {
                        self.set_time(NS_PER_SEC / 2);
                    }
                }
                // UIP is read-only (and computed when A is read).
                self.set_reg(RTC_REG_A, val & !REG_A_UIP);
            }
            RTC_REG_B => {
                let mut val = val;
                let b = self.reg(RTC_REG_B);
                if val & REG_B_SET != 0 {
                    // SET mode stops the clock with the registers showing the time.
                    if self.running() {
                        self.update_time();
                    }
                    val &= !REG_B_UIE;
                } else if b & REG_B_SET != 0 && self.reg(RTC_REG_A) & 0x70 <= 0x20 {
                    // Leaving SET mode starts the clock at the time in the registers.
                    let phase = self.phase_ns();
                    self.set_time(phase);
                }
                let mut c = self.reg(RTC_REG_C);
                if val & c & REG_C_MASK != 0 {
                    c |= REG_C_IRQF;
                } else {
                    c &= !REG_C_IRQF;
                }
                self.set_reg(RTC_REG_C, c);
                self.set_reg(RTC_REG_B, val);
                self.update_line();
            }
            // Status C and D are read-only.
            RTC_REG_C | RTC_REG_D => {}
            index => self.set_reg(index, val),
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut rtc = vmm_sync::lock(&self.shared.rtc);
        let mut wake = false;
        for (i, b) in data.iter_mut().enumerate() {
            *b = if offset.wrapping_add(i as u64) & 1 == 0 {
                0xff
            } else {
                // Reading status C may re-arm the timer.
                wake |= rtc.s.index == RTC_REG_C;
                rtc.read_data()
            };
        }
        drop(rtc);
        if wake {
            self.shared.wake.notify_all();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let mut rtc = vmm_sync::lock(&self.shared.rtc);
        let mut wake = false;
        for (i, &b) in data.iter().enumerate() {
            if offset.wrapping_add(i as u64) & 1 == 0 {
                rtc.s.index = b & 0x7f;
            } else {
                wake = true;
                rtc.write_data(b);
            }
        }
        drop(rtc);
        if wake {
            self.shared.wake.notify_all();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::testutil::RecordingIrq;

    /// 2024-02-29 13:45:56 UTC, a Thursday.
    const T0: i64 = 1_709_214_356;

    struct Rig {
        cmos: Cmos,
        now: Arc<AtomicI64>,
        irq: Arc<RecordingIrq>,
    }

    fn rig_with(now: &Arc<AtomicI64>, mem_below_4g: u64, cpus: u8) -> Rig {
        let n = now.clone();
        let (irq, line) = RecordingIrq::new();
        let cmos = Cmos::with_clock(
            mem_below_4g,
            0,
            cpus,
            line,
            Box::new(move || i128::from(n.load(Ordering::SeqCst))),
        );
        Rig {
            cmos,
            now: now.clone(),
            irq,
        }
    }

    fn rig_at(secs: i64) -> Rig {
        rig_with(
            &Arc::new(AtomicI64::new(secs * 1_000_000_000)),
            512 * MIB,
            2,
        )
    }

    fn null_irq() -> SharedIrq {
        RecordingIrq::new().1
    }

    impl Rig {
        fn advance_ms(&self, ms: i64) {
            self.now.fetch_add(ms * 1_000_000, Ordering::SeqCst);
        }
        fn read(&mut self, index: u8) -> u8 {
            self.cmos.write(0, &[index]);
            let mut b = [0];
            self.cmos.read(1, &mut b);
            b[0]
        }
        fn write(&mut self, index: u8, val: u8) {
            assert_eq!(self.cmos.write(0, &[index, val]), None);
        }
        fn time(&mut self) -> [u8; 8] {
            [0x09, 0x08, 0x07, 0x06, 0x04, 0x02, 0x00, 0x32].map(|i| self.read(i))
        }
    }

    #[test]
    fn calendar_conversion() {
        for (days, ymd) in [
            (0, (1970, 1, 1)),
            (-1, (1969, 12, 31)),
            (11_016, (2000, 2, 29)),
            (19_782, (2024, 2, 29)),
            (-719_468, (0, 3, 1)),
        ] {
            assert_eq!(civil_from_days(days), ymd);
            assert_eq!(
                seconds_from_civil(ymd.0, ymd.1, ymd.2, 0, 0, 0),
                days * 86_400
            );
        }
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(seconds_from_civil(y, m, d, 0, 0, 0), days * 86_400);
        }
    }

    #[test]
    fn defaults_and_memory_bytes() {
        let mut r = rig_at(T0);
        assert_eq!(r.read(0x0a), 0x26);
        assert_eq!(r.read(0x0b), 0x02);
        assert_eq!(r.read(0x0d), 0x80);
        assert_eq!([r.read(0x15), r.read(0x16)], [0x80, 0x02]);
        assert_eq!([r.read(0x17), r.read(0x18)], [0xff, 0xff]);
        assert_eq!([r.read(0x30), r.read(0x31)], [0xff, 0xff]);
        assert_eq!([r.read(0x34), r.read(0x35)], [0x00, 0x1f]);
        assert_eq!([r.read(0x5b), r.read(0x5c), r.read(0x5d)], [0, 0, 0]);
        assert_eq!(r.read(0x5f), 1);
        assert_eq!(r.read(0x14), 0x06);

        let mut c = Cmos::new(3 * 1024 * MIB, 2 * 1024 * MIB, 1, null_irq());
        let mut rd = |i: u8| {
            c.write(0, &[i]);
            let mut b = [0];
            c.read(1, &mut b);
            b[0]
        };
        assert_eq!([rd(0x34), rd(0x35)], [0x00, 0xbf]);
        assert_eq!([rd(0x5b), rd(0x5c), rd(0x5d)], [0x00, 0x80, 0x00]);
        assert_eq!(rd(0x5f), 0);

        let small = Cmos::new(8 * MIB, 0, 0, null_irq()).state().data;
        assert_eq!(&small[0x15..0x19], &[0x80, 0x02, 0x00, 0x1c]);
        assert_eq!(&small[0x34..0x36], &[0, 0]);
    }

    #[test]
    fn time_in_bcd_binary_and_12_hour() {
        let mut r = rig_at(T0);
        assert_eq!(r.time(), [0x24, 0x02, 0x29, 0x05, 0x13, 0x45, 0x56, 0x20]);
        r.advance_ms(1000);
        assert_eq!(r.read(0x00), 0x57);
        r.write(0x0b, 0x06);
        assert_eq!(r.time(), [24, 2, 29, 5, 13, 45, 57, 20]);
        r.write(0x0b, 0x04);
        assert_eq!(r.read(0x04), 0x80 | 1);
        r.write(0x0b, 0x00);
        assert_eq!(r.read(0x04), 0x81);
        // The PS/2 alias of the century byte.
        assert_eq!(r.read(0x37), 0x20);
    }

    #[test]
    fn guest_sets_the_clock() {
        let mut r = rig_at(T0);
        // SET mode, write 1999-12-31 23:59:58, leave SET mode.
        r.write(0x0b, 0x82);
        for (i, v) in [
            (0x09, 0x99),
            (0x08, 0x12),
            (0x07, 0x31),
            (0x04, 0x23),
            (0x02, 0x59),
            (0x00, 0x58),
            (0x32, 0x19),
        ] {
            r.write(i, v);
        }
        r.advance_ms(5000);
        // Frozen while SET.
        assert_eq!(r.read(0x00), 0x58);
        r.write(0x0b, 0x02);
        assert_eq!(r.time(), [0x99, 0x12, 0x31, 0x06, 0x23, 0x59, 0x58, 0x19]);
        r.advance_ms(2000);
        assert_eq!(r.time(), [0x00, 0x01, 0x01, 0x07, 0x00, 0x00, 0x00, 0x20]);
        let offset = r.cmos.state().offset_ns;
        assert_eq!(offset, i128::from(946_684_798 - T0 - 5) * NS_PER_SEC);
        // Writing one register while running keeps the rest of the time.
        r.write(0x02, 0x30);
        assert_eq!(r.time(), [0x00, 0x01, 0x01, 0x07, 0x00, 0x30, 0x00, 0x20]);
    }

    #[test]
    fn divider_reset_stops_the_clock() {
        let mut r = rig_at(T0);
        r.write(0x0a, 0x66);
        r.advance_ms(3000);
        assert_eq!(r.read(0x00), 0x56);
        assert_eq!(r.read(0x0a), 0x66);
        r.write(0x0a, 0x26);
        r.advance_ms(499);
        assert_eq!(r.read(0x00), 0x56);
        r.advance_ms(1);
        assert_eq!(r.read(0x00), 0x57);
    }

    #[test]
    fn uip_and_status_c() {
        let mut r = rig_at(T0);
        assert_eq!(r.read(0x0a) & 0x80, 0);
        r.advance_ms(999);
        assert_eq!(r.read(0x0a) & 0x80, 0);
        r.now.fetch_add(800_000, Ordering::SeqCst);
        assert_eq!(r.read(0x0a), 0xa6);
        assert_eq!(r.read(0x0c), 0);
        r.now.fetch_add(200_000, Ordering::SeqCst);
        assert_eq!(r.read(0x0a), 0x26);
        assert_eq!(r.read(0x0c), REG_C_UF);
        assert_eq!(r.read(0x0c), 0);
        // Update interrupts enabled: IRQF too.
        r.write(0x0b, 0x12);
        r.advance_ms(1000);
        assert_eq!(r.read(0x0c), REG_C_UF | REG_C_IRQF);
        assert_eq!(r.irq.rising_edges(), 1);
        assert!(!r.irq.level());
        // Alarm at hh:46:10 (any hour).
        r.write(0x0b, 0x22);
        r.write(0x01, 0x10);
        r.write(0x03, 0x46);
        r.write(0x05, 0xc0);
        r.advance_ms(10_000);
        assert_eq!(r.read(0x0c) & REG_C_AF, 0);
        r.advance_ms(4000);
        assert_eq!(r.read(0x0c), REG_C_UF | REG_C_AF | REG_C_IRQF);
        r.advance_ms(3_600_000 * 30);
        assert_eq!(r.read(0x0c), REG_C_UF | REG_C_AF | REG_C_IRQF);
        // Periodic flag with PIE: 1024 Hz.
        r.write(0x0b, 0x42);
        r.read(0x0c);
        r.advance_ms(1);
        assert_eq!(r.read(0x0c), REG_C_PF | REG_C_IRQF);
        // Status C and D are read-only.
        r.write(0x0c, 0xff);
        r.write(0x0d, 0x00);
        assert_eq!(r.read(0x0c), 0);
        assert_eq!(r.read(0x0d), 0x80);
    }

    #[test]
    fn irq_follows_irqf() {
        let mut r = rig_at(T0);
        r.advance_ms(1000);
        // UF is set but not enabled: no interrupt.
        r.read(0x0a);
        assert!(!r.irq.level());
        // Enabling it while the flag is set raises the line at once.
        r.write(0x0b, 0x12);
        assert!(r.irq.level());
        assert_eq!(r.read(0x0c), REG_C_UF | REG_C_IRQF);
        assert!(!r.irq.level());
        r.advance_ms(1000);
        assert!(!r.irq.level());
        r.read(0x00);
        assert!(r.irq.level());
        // Disabling the interrupt lowers it again.
        r.write(0x0b, 0x02);
        assert!(!r.irq.level());
        assert_eq!(r.irq.rising_edges(), 2);
        // Without a timer thread nothing happens between accesses.
        assert_eq!(vmm_sync::lock(&r.cmos.shared.rtc).next_event_in(), None);
        r.write(0x0b, 0x12);
        r.read(0x0c);
        assert_eq!(
            vmm_sync::lock(&r.cmos.shared.rtc).next_event_in(),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn timer_thread_delivers_periodic_interrupts() {
        let (irq, line) = RecordingIrq::new();
        let mut c = Cmos::new(64 * MIB, 0, 1, line);
        let wait_for = |level: bool| {
            let start = Instant::now();
            while irq.level() != level {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "IRQ 8 never {level}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let mut rd = |i: u8| {
            c.write(0, &[i]);
            let mut b = [0];
            c.read(1, &mut b);
            b[0]
        };
        assert_eq!(rd(0x0a), 0x26);
        // 1024 Hz periodic interrupt.
        c.write(0, &[0x0b, 0x42]);
        wait_for(true);
        c.write(0, &[0x0c]);
        let mut b = [0];
        c.read(1, &mut b);
        assert_eq!(b[0] & (REG_C_PF | REG_C_IRQF), REG_C_PF | REG_C_IRQF);
        assert!(!irq.level());
        wait_for(true);
        c.write(0, &[0x0b, 0x02]);
        assert!(!irq.level());
        drop(c);
    }

    #[test]
    fn ram_and_index() {
        let mut r = rig_at(T0);
        r.write(0x40, 0xab);
        assert_eq!(r.read(0x40), 0xab);
        // Bit 7 of the index (NMI mask) is dropped.
        r.write(0xc0, 0xcd);
        assert_eq!(r.read(0x40), 0xcd);
        let mut b = [0; 2];
        r.cmos.read(0, &mut b);
        assert_eq!(b, [0xff, 0xcd]);
        // Garbage in the time registers does not panic.
        for i in 0..=0x0d {
            r.write(i, 0xff);
            r.time();
        }
        r.write(0x0b, 0x02);
        r.write(0x0a, 0x26);
        for v in 0..=255 {
            for i in [0x00, 0x04, 0x07, 0x08, 0x09, 0x32] {
                r.write(i, v);
                r.time();
            }
        }
    }

    #[test]
    fn save_restore_round_trip() {
        let mut r = rig_at(T0);
        r.write(0x00, 0x10);
        r.write(0x0b, 0x16);
        r.write(0x50, 0x5a);
        r.write(0x01, 0xc0);
        r.advance_ms(1500);
        let state = r.cmos.state();
        let json = serde_json::to_string(&state).unwrap();
        let state: CmosState = serde_json::from_str(&json).unwrap();

        // A different host starts with a different RAM layout; the state replaces it.
        let mut t = rig_with(&r.now, 64 * MIB, 8);
        t.cmos.restore(&state).unwrap();
        assert_eq!(t.cmos.state(), r.cmos.state());
        assert_eq!(t.irq.level(), r.irq.level());
        for i in (0..0x80).filter(|&i| i != 0x0c) {
            assert_eq!(r.read(i), t.read(i), "index {i:#x}");
        }
        r.advance_ms(2000);
        assert_eq!(r.read(0x0c), t.read(0x0c));
        assert_eq!(r.time(), t.time());
    }

    #[test]
    fn restore_rejects_invalid_state() {
        let mut r = rig_at(T0);
        r.write(0x50, 0x5a);
        let good = r.cmos.state();
        let cases = [
            (
                CmosState {
                    data: vec![0; 129],
                    ..good.clone()
                },
                CmosStateError::RamSize(129),
            ),
            (
                CmosState {
                    data: vec![0; 127],
                    ..good.clone()
                },
                CmosStateError::RamSize(127),
            ),
            (
                CmosState {
                    index: 0x80,
                    ..good.clone()
                },
                CmosStateError::Index(0x80),
            ),
            (
                CmosState {
                    offset_ns: i128::MAX,
                    ..good.clone()
                },
                CmosStateError::Clock {
                    field: "offset_ns",
                    value: i128::MAX,
                },
            ),
            (
                CmosState {
                    flags_ns: i128::MIN,
                    ..good.clone()
                },
                CmosStateError::Clock {
                    field: "flags_ns",
                    value: i128::MIN,
                },
            ),
        ];
        for (bad, want) in cases {
            assert_eq!(r.cmos.restore(&bad), Err(want.clone()), "{want}");
            assert_eq!(r.cmos.state(), good);
        }
        assert_eq!(r.read(0x50), 0x5a);
    }
}
