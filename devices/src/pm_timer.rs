//! ACPI power-management timer: a free-running 24-bit counter at 3.579545 MHz.
//!
//! Linux uses the PM timer to calibrate the TSC and as a clocksource when nothing better is
//! available, and kvm-unit-tests reads it too; both only need a counter that advances at the
//! right rate and never goes backwards. The counter is derived from the host's monotonic clock,
//! as QEMU's `acpi_pm_tmr_get` derives it from the virtual clock.
//!
//! Register the device at [`PM_TIMER_BASE`] (0x608, offset 8 of the PIIX4 PM I/O block at
//! 0x600, where QEMU puts it and where the ACPI FADT must point) with length
//! [`PM_TIMER_LEN`] (4). The timer is meant to be read with 32-bit accesses; like QEMU (whose
//! region implements only 4-byte reads and ignores the offset), a read of any width at any
//! offset returns the low bytes of the counter. Writes are ignored. No SCI is raised on
//! counter overflow (QEMU's TMR_STS/TMR_EN live in the PM1 event block, not here).
//!
//! # Migration
//!
//! The state is the VM's timer clock (nanoseconds since the device was created) at the moment
//! of the snapshot; [`PmTimer::restore`] continues from there on the destination's monotonic
//! clock. So the counter stays monotonic across hosts whose monotonic clocks are unrelated, and
//! it does not advance while the VM is not running between snapshot and restore — as QEMU's
//! virtual clock.

use std::convert::Infallible;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::{fill_le, BusDevice, VmRequest};

/// The port the device expects to be registered at.
pub const PM_TIMER_BASE: u64 = 0x608;
/// The length of the port range the device expects.
pub const PM_TIMER_LEN: u64 = 4;
/// The timer's frequency in Hz.
pub const PM_TIMER_FREQUENCY: u64 = 3_579_545;

/// A monotonic clock in nanoseconds from an arbitrary origin.
type Clock = Box<dyn Fn() -> u64 + Send>;

/// Everything the guest can observe of a [`PmTimer`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmTimerState {
    /// The timer's clock at the snapshot, in nanoseconds.
    pub clock_ns: u64,
}

/// The ACPI PM timer; register it at [`PM_TIMER_BASE`] with length [`PM_TIMER_LEN`].
pub struct PmTimer {
    clock: Clock,
    /// Host clock reading that corresponds to `start_ns` of the timer's clock.
    base: u64,
    /// The timer's clock at `base`.
    start_ns: u64,
}

impl PmTimer {
    /// A timer whose clock starts at 0 now.
    pub fn new() -> Self {
        let origin = Instant::now();
        Self::with_clock(Box::new(move || {
            u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
        }))
    }

    fn with_clock(clock: Clock) -> Self {
        let base = clock();
        Self {
            clock,
            base,
            start_ns: 0,
        }
    }

    fn clock_ns(&self) -> u64 {
        self.start_ns
            .wrapping_add((self.clock)().saturating_sub(self.base))
    }

    /// The 24-bit counter value now.
    pub fn counter(&self) -> u32 {
        let ticks = u128::from(self.clock_ns()) * u128::from(PM_TIMER_FREQUENCY) / 1_000_000_000;
        (ticks & 0xff_ffff) as u32
    }

    /// A snapshot of the timer's clock.
    pub fn state(&self) -> PmTimerState {
        PmTimerState {
            clock_ns: self.clock_ns(),
        }
    }

    /// Continues the timer from the snapshot's clock value.
    ///
    /// Every clock value is valid (the counter wraps), so this never fails; it returns a
    /// `Result` like every device's restore.
    pub fn restore(&mut self, state: &PmTimerState) -> Result<(), Infallible> {
        self.base = (self.clock)();
        self.start_ns = state.clock_ns;
        Ok(())
    }
}

impl Default for PmTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for PmTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        fill_le(data, u64::from(self.counter()));
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) -> Option<VmRequest> {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::le_value;

    fn timer_at(host: &Arc<AtomicU64>) -> PmTimer {
        let h = host.clone();
        PmTimer::with_clock(Box::new(move || h.load(Ordering::SeqCst)))
    }

    fn rd(t: &mut PmTimer) -> u64 {
        let mut d = [0; 4];
        t.read(0, &mut d);
        le_value(&d)
    }

    #[test]
    fn counts_at_3_58_mhz_and_wraps_at_24_bits() {
        let host = Arc::new(AtomicU64::new(5_000_000_000));
        let mut t = timer_at(&host);
        assert_eq!(rd(&mut t), 0);
        host.fetch_add(1_000_000_000, Ordering::SeqCst);
        assert_eq!(rd(&mut t), PM_TIMER_FREQUENCY);
        // 2^24 ticks ≈ 4.687 s.
        host.fetch_add(4_000_000_000, Ordering::SeqCst);
        assert_eq!(rd(&mut t), (5 * PM_TIMER_FREQUENCY) & 0xff_ffff);
        // Narrow reads return the low bytes; writes do nothing.
        let mut b = [0; 2];
        t.read(1, &mut b);
        assert_eq!(le_value(&b), (5 * PM_TIMER_FREQUENCY) & 0xffff);
        assert_eq!(t.write(0, &[0xff; 4]), None);
        assert_eq!(rd(&mut t), (5 * PM_TIMER_FREQUENCY) & 0xff_ffff);
    }

    #[test]
    fn real_clock_is_monotonic() {
        let mut t = PmTimer::new();
        let a = rd(&mut t);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = rd(&mut t);
        assert!(b > a);
    }

    #[test]
    fn save_restore_round_trip() {
        let host = Arc::new(AtomicU64::new(1_000));
        let mut t = timer_at(&host);
        host.fetch_add(1_234_567_890, Ordering::SeqCst);
        let before = rd(&mut t);
        let json = serde_json::to_string(&t.state()).unwrap();
        let state: PmTimerState = serde_json::from_str(&json).unwrap();

        // The destination's monotonic clock is unrelated (here: far behind).
        let host2 = Arc::new(AtomicU64::new(7));
        let mut u = timer_at(&host2);
        u.restore(&state).unwrap();
        assert_eq!(rd(&mut u), before);
        assert_eq!(u.state(), t.state());
        host2.fetch_add(1_000_000, Ordering::SeqCst);
        host.fetch_add(1_000_000, Ordering::SeqCst);
        assert_eq!(rd(&mut u), rd(&mut t));
        assert!(rd(&mut u) > before);
    }
}
