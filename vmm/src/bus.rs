//! Port I/O and MMIO dispatch: an address range → device map.
//!
//! A vCPU thread that exits for I/O takes the big lock and asks the bus for the device behind the
//! address. Accesses nobody claims behave as on a PC with nothing there: reads return all ones,
//! writes vanish, and each such address is logged once so a misbehaving guest cannot flood the
//! log.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use devices::{BarWindow, BusDevice, VmRequest};

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// First address of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length or wrapping range.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// First address of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A device shared between the bus and whoever needs its typed handle (state save, input).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// How many distinct unclaimed addresses are logged before the bus stays quiet.
const MAX_LOGGED_UNCLAIMED: usize = 64;

/// Whether a bus's [`BarWindow`] is asked before or after its fixed devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowPriority {
    /// Before: a BAR wins over a fixed device it overlaps (QEMU's PCI I/O BARs, priority 1).
    Above,
    /// After: only what no fixed device claims (QEMU's PCI memory space, priority −1).
    Below,
}

/// A shared BAR window.
pub type SharedWindow = Arc<Mutex<dyn BarWindow>>;

/// One address space (port I/O or MMIO).
pub struct Bus {
    name: &'static str,
    entries: BTreeMap<u64, Entry>,
    window: Option<(SharedWindow, WindowPriority)>,
    logged: HashSet<u64>,
}

impl Bus {
    /// An empty bus; `name` appears in log lines ("pio", "mmio").
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            entries: BTreeMap::new(),
            window: None,
            logged: HashSet::new(),
        }
    }

    /// Dispatches to `window` too (the PCI bus's BARs), before or after the fixed devices.
    /// Lock order: the window (then its PCI bus and a function) is taken under the big lock
    /// and released before a fixed device's lock.
    pub fn set_window(&mut self, window: SharedWindow, priority: WindowPriority) {
        self.window = Some((window, priority));
    }

    fn window_read(&self, priority: WindowPriority, addr: u64, data: &mut [u8]) -> bool {
        matches!(&self.window, Some((w, p)) if *p == priority && lock(w).bar_read(addr, data))
    }

    fn window_write(&self, priority: WindowPriority, addr: u64, data: &[u8]) -> bool {
        matches!(&self.window, Some((w, p)) if *p == priority && lock(w).bar_write(addr, data))
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let before = self.entries.range(..end).next_back();
        if before.is_some_and(|(b, e)| b + e.len > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + size as u64 <= entry.len).then_some((offset, &entry.device))
    }

    fn log_unclaimed(&mut self, what: &str, addr: u64, size: usize) {
        if self.logged.len() < MAX_LOGGED_UNCLAIMED && self.logged.insert(addr) {
            log::info!(
                "{} {what} of {size} bytes at {addr:#x}: no device",
                self.name
            );
        }
    }

    /// Reads from the device at `addr`; unclaimed addresses read as all ones.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        if self.window_read(WindowPriority::Above, addr, data) {
            return;
        }
        match self.find(addr, data.len()) {
            Some((offset, device)) => lock(device).read(offset, data),
            None if self.window_read(WindowPriority::Below, addr, data) => {}
            None => {
                data.fill(0xff);
                self.log_unclaimed("read", addr, data.len());
            }
        }
    }

    /// Writes to the device at `addr`; unclaimed writes are dropped.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Option<VmRequest> {
        if self.window_write(WindowPriority::Above, addr, data) {
            return None;
        }
        match self.find(addr, data.len()) {
            Some((offset, device)) => lock(device).write(offset, data),
            None if self.window_write(WindowPriority::Below, addr, data) => None,
            None => {
                self.log_unclaimed("write", addr, data.len());
                None
            }
        }
    }
}

/// Locks a device (or any mutex), ignoring poisoning: hopvm's one lock helper, re-exported
/// here for the core's callers.
pub use vmm_sync::lock;

/// A port that swallows writes and reads as zero (port 0x80, the POST-code port).
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) -> Option<VmRequest> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(Vec<u8>);

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
            (data == [0xee]).then_some(VmRequest::Reset)
        }
    }

    fn scratch(len: usize) -> SharedDevice {
        Arc::new(Mutex::new(Scratch(vec![0; len])))
    }

    #[test]
    fn dispatch_and_unclaimed() {
        let mut bus = Bus::new("pio");
        bus.insert(0x10, 4, scratch(4)).unwrap();
        assert_eq!(bus.write(0x12, &[7, 8]), None);
        let mut d = [0u8; 2];
        bus.read(0x12, &mut d);
        assert_eq!(d, [7, 8]);
        // Straddling the end of the device is unclaimed.
        let mut d = [0u8; 4];
        bus.read(0x12, &mut d);
        assert_eq!(d, [0xff; 4]);
        bus.read(0x100, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(bus.write(0x10, &[0xee]), Some(VmRequest::Reset));
        assert_eq!(bus.write(0x100, &[0xee]), None);
    }

    /// A window decoding `[base, base + 4)` as a scratch register.
    struct Window(u64, Vec<u8>);

    impl BarWindow for Window {
        fn bar_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
            let Some(o) = addr
                .checked_sub(self.0)
                .filter(|o| o + data.len() as u64 <= 4)
            else {
                return false;
            };
            data.copy_from_slice(&self.1[o as usize..o as usize + data.len()]);
            true
        }
        fn bar_write(&mut self, addr: u64, data: &[u8]) -> bool {
            let Some(o) = addr
                .checked_sub(self.0)
                .filter(|o| o + data.len() as u64 <= 4)
            else {
                return false;
            };
            self.1[o as usize..o as usize + data.len()].copy_from_slice(data);
            true
        }
    }

    #[test]
    fn window_above_and_below_the_fixed_devices() {
        for priority in [WindowPriority::Above, WindowPriority::Below] {
            let mut bus = Bus::new("pio");
            bus.insert(0x10, 4, scratch(4)).unwrap();
            bus.write(0x10, &[1, 2, 3, 4]);
            // The window overlaps the device's upper half and the two ports after it.
            bus.set_window(Arc::new(Mutex::new(Window(0x12, vec![9; 4]))), priority);
            let mut d = [0u8; 2];
            bus.read(0x12, &mut d);
            let want = if priority == WindowPriority::Above {
                [9, 9]
            } else {
                [3, 4]
            };
            assert_eq!(d, want, "{priority:?}: who wins on overlap");
            // Where no device is, the window answers either way.
            bus.read(0x14, &mut d);
            assert_eq!(d, [9, 9], "{priority:?}");
            assert_eq!(bus.write(0x14, &[0xee, 5]), None);
            bus.read(0x14, &mut d);
            assert_eq!(d, [0xee, 5]);
            // Outside both: unclaimed.
            bus.read(0x40, &mut d);
            assert_eq!(d, [0xff; 2]);
            // The fixed device below the window still gets what the window does not decode.
            bus.read(0x10, &mut d);
            assert_eq!(d, [1, 2]);
        }
    }

    #[test]
    fn overlaps_rejected() {
        let mut bus = Bus::new("pio");
        bus.insert(0x10, 4, scratch(4)).unwrap();
        assert!(bus.insert(0x13, 1, scratch(1)).is_err());
        assert!(bus.insert(0x0e, 4, scratch(4)).is_err());
        assert!(bus.insert(0x0c, 8, scratch(8)).is_err());
        bus.insert(0x14, 1, scratch(1)).unwrap();
        bus.insert(0x0c, 4, scratch(4)).unwrap();
        assert!(bus.insert(0x20, 0, scratch(1)).is_err());
        assert!(bus.insert(u64::MAX, 2, scratch(1)).is_err());
    }
}
