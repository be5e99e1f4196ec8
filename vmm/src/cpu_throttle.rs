//! Slowing the vCPUs down while a migration does not converge (QEMU's `cpu-throttle.c`, which
//! the `auto-converge` capability drives).
//!
//! At throttle percentage `p`, every vCPU runs a 10 ms time slice and then sleeps
//! `p / (100 − p)` of a slice, so it is off the CPU `p` % of the time. A timer thread
//! (`cpu-throttle`, alive only while `p > 0`) ticks once per period — run slice plus sleep — and
//! kicks every vCPU out of `KVM_RUN`; each vCPU that sees a new tick sleeps its share before it
//! re-enters the guest. The sleep holds no lock (neither the big lock nor the vCPU's own) and
//! ends early when the vCPUs are paused or stopped, or the throttle is switched off, so a
//! throttled guest stops, migrates and resumes as promptly as any other.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sync::lock;

/// The run slice between two sleeps (QEMU's `CPU_THROTTLE_TIMESLICE_NS`).
pub const TIMESLICE: Duration = Duration::from_millis(10);
/// Highest percentage accepted (QEMU's `CPU_THROTTLE_PCT_MAX`).
pub const MAX_PERCENTAGE: u32 = 99;

/// The throttle state shared by the timer thread and the vCPU threads.
#[derive(Default)]
pub struct CpuThrottle {
    percentage: AtomicU32,
    /// Ticks of the timer so far; a vCPU sleeps once per tick it sees.
    ticks: AtomicU64,
    /// Whether the timer thread runs; guards its start.
    timer: Mutex<bool>,
    /// Wakes the timer (percentage changed) and sleeping vCPUs (pause, stop, switch-off).
    wake: Condvar,
}

impl CpuThrottle {
    /// The current percentage (0: off).
    pub fn percentage(&self) -> u32 {
        self.percentage.load(Ordering::Relaxed)
    }

    /// How long a vCPU sleeps per tick at `pct`.
    pub fn sleep_per_tick(pct: u32) -> Duration {
        let pct = pct.min(MAX_PERCENTAGE);
        TIMESLICE * pct / (100 - pct)
    }

    /// Sets the percentage (clamped to 1–99; 0 switches throttling off) and starts the timer
    /// thread if it is not running; `kick` gets every vCPU out of `KVM_RUN`.
    pub fn set(self: &Arc<Self>, pct: u32, kick: impl Fn() + Send + 'static) {
        let pct = if pct == 0 {
            0
        } else {
            pct.clamp(1, MAX_PERCENTAGE)
        };
        self.percentage.store(pct, Ordering::Relaxed);
        let mut running = lock(&self.timer);
        self.wake.notify_all();
        if pct == 0 || *running {
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(String::from("cpu-throttle"))
            .spawn(move || me.tick(kick));
        match spawned {
            Ok(_) => *running = true,
            Err(e) => log::warn!("cannot start the cpu-throttle thread: {e}"),
        }
    }

    /// The timer thread: one tick per period while the percentage is above zero.
    fn tick(&self, kick: impl Fn()) {
        let mut running = lock(&self.timer);
        loop {
            let pct = self.percentage();
            if pct == 0 {
                *running = false;
                return;
            }
            let period = TIMESLICE + Self::sleep_per_tick(pct);
            let deadline = Instant::now() + period;
            // Wait out the period; a change of percentage starts a new one.
            let mut changed = false;
            while !changed {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                running = vmm_sync::wait_timeout(&self.wake, running, deadline - now).0;
                changed = self.percentage() != pct;
            }
            if !changed {
                self.ticks.fetch_add(1, Ordering::Relaxed);
                kick();
            }
        }
    }

    /// Called by a vCPU thread between two `KVM_RUN`s: if a tick came since `seen`, sleeps
    /// this tick's share, ending early once `interrupted()` (paused or stopped) or the
    /// throttle is off.
    pub fn throttle_vcpu(&self, seen: &mut u64, interrupted: impl Fn() -> bool) {
        let ticks = self.ticks.load(Ordering::Relaxed);
        if ticks == *seen {
            return;
        }
        *seen = ticks;
        let pct = self.percentage();
        if pct == 0 {
            return;
        }
        let deadline = Instant::now() + Self::sleep_per_tick(pct);
        let mut g = lock(&self.timer);
        loop {
            let now = Instant::now();
            if now >= deadline || interrupted() || self.percentage() == 0 {
                return;
            }
            g = vmm_sync::wait_timeout(&self.wake, g, deadline - now).0;
        }
    }

    /// Wakes sleeping vCPUs (they are being paused or stopped).
    pub fn wake(&self) {
        let _g = lock(&self.timer);
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_share_matches_the_percentage() {
        assert_eq!(CpuThrottle::sleep_per_tick(0), Duration::ZERO);
        assert_eq!(CpuThrottle::sleep_per_tick(50), TIMESLICE);
        assert_eq!(CpuThrottle::sleep_per_tick(20), TIMESLICE / 4);
        assert_eq!(CpuThrottle::sleep_per_tick(99), TIMESLICE * 99);
        assert_eq!(CpuThrottle::sleep_per_tick(150), TIMESLICE * 99);
    }

    #[test]
    fn ticks_while_on_and_stops_when_off() {
        let t = Arc::new(CpuThrottle::default());
        let (tx, rx) = std::sync::mpsc::channel();
        t.set(50, move || {
            let _ = tx.send(());
        });
        assert_eq!(t.percentage(), 50);
        // Two kicks arrive: the timer runs.
        rx.recv_timeout(Duration::from_secs(10)).expect("a tick");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("another tick");
        // A vCPU that saw no tick does not sleep; one that did is woken by a pause at once.
        let mut seen = t.ticks.load(Ordering::Relaxed);
        t.throttle_vcpu(&mut seen, || false);
        let mut stale = 0;
        let start = Instant::now();
        t.throttle_vcpu(&mut stale, || true);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_ne!(stale, 0);
        t.set(0, || {});
        assert_eq!(t.percentage(), 0);
        // The timer ends: its sender is dropped with the closure.
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(()) => continue,
                Err(e) => {
                    assert_eq!(e, std::sync::mpsc::RecvTimeoutError::Disconnected);
                    break;
                }
            }
        }
        assert!(!*lock(&t.timer));
        assert_eq!(CpuThrottle::default().percentage(), 0);
        assert_eq!(t.percentage(), 0, "off stays off");
        t.set(100, || {});
        assert_eq!(t.percentage(), MAX_PERCENTAGE, "clamped");
        t.set(0, || {});
    }
}
