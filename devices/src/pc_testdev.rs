//! QEMU's `pc-testdev`: scratch registers, an IRQ-line driver and a page-flush hook for tests.
//!
//! kvm-unit-tests (emulator, ioapic, … tests) use this device to check that port I/O and MMIO
//! reach userspace with the right width and data, to toggle interrupt lines from inside the
//! guest, and to make the host drop a page mapping. QEMU's `hw/misc/pc-testdev.c` is the
//! reference. The device lives at several address ranges, so it is split into three bus devices,
//! each to be registered on its own:
//!
//! | struct | bus | base | length | what |
//! |---|---|---|---|---|
//! | [`PcTestdevPorts`] | port I/O | 0xe0 | 12 | 0xe0–0xe3 scratch, 0xe4 flush page, 0xe8–0xeb byte-wise scratch |
//! | [`PcTestdevIrq`] | port I/O | 0x2000 | 24 | byte write at 0x2000 + n sets ISA/GSI line n |
//! | [`PcTestdevMmio`] | MMIO | 0xff00_0000 | 0x10000 | 64 KiB scratch memory |
//!
//! # Ports 0xe0–0xeb
//!
//! 0xe0–0xe3 is a 32-bit register accessed in byte lanes: an aligned 1-, 2- or 4-byte access at
//! 0xe0 + k touches bytes k.. of it. 0xe8–0xeb is the *same* register (QEMU backs both ranges
//! with one `ioport_data`), accessed one byte at a time: a wider access there is split into
//! byte accesses. Unaligned accesses are invalid in QEMU and do nothing here (reads return 0).
//! A 32-bit write at 0xe4 asks the VMM to flush the page containing the written guest-physical
//! address: it returns [`VmRequest::FlushPage`] with the page-aligned address (QEMU does
//! `mprotect(PROT_NONE)` and back on its mapping of the page). Other accesses to 0xe4–0xe7 do
//! nothing; reads there return 0 (QEMU aborts).
//!
//! # Interrupt lines 0x2000–0x2017
//!
//! A byte write of v to 0x2000 + n drives line n to `v != 0`, on every write (no edge
//! detection: the test decides). The lines are given to [`PcTestdevIrq::new`] in order; writes
//! for lines not given are ignored. Reads return 0, wider writes are ignored (QEMU accepts only
//! bytes).
//!
//! # MMIO 0xff000000–0xff00ffff
//!
//! Plain memory: aligned accesses of 1, 2, 4 or 8 bytes read and write it little-endian.
//! Unaligned accesses do nothing (reads return 0), as in QEMU.

use serde::{Deserialize, Serialize};

use crate::{fill_le, le_value, BusDevice, SharedIrq, VmRequest};

/// Where [`PcTestdevPorts`] expects to be registered.
pub const PC_TESTDEV_PORTS_BASE: u64 = 0xe0;
/// The length of [`PcTestdevPorts`]'s port range (0xe0–0xeb).
pub const PC_TESTDEV_PORTS_LEN: u64 = 12;
/// Where [`PcTestdevIrq`] expects to be registered.
pub const PC_TESTDEV_IRQ_BASE: u64 = 0x2000;
/// The length of [`PcTestdevIrq`]'s port range: one port per line.
pub const PC_TESTDEV_IRQ_LEN: u64 = 24;
/// Where [`PcTestdevMmio`] expects to be registered (MMIO).
pub const PC_TESTDEV_MMIO_BASE: u64 = 0xff00_0000;
/// The length of [`PcTestdevMmio`]'s MMIO range.
pub const PC_TESTDEV_MMIO_LEN: u64 = 0x1_0000;

/// Offset of the flush-page register (0xe4) in [`PcTestdevPorts`].
const FLUSH_OFFSET: u64 = 4;
/// Offset of the byte-wise view of the scratch register (0xe8).
const BYTE_SCRATCH_OFFSET: u64 = 8;

/// Whether an access of `len` bytes at `offset` is naturally aligned with a power-of-two width.
fn aligned(offset: u64, len: usize) -> bool {
    len.is_power_of_two() && offset % len as u64 == 0
}

/// Why a pc-testdev state cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcTestdevStateError {
    /// Levels of lines past the 24 interrupt lines.
    #[error("interrupt levels {0:#010x} name lines past the device's 24")]
    IrqLevels(u32),
    /// The MMIO window's memory is not 64 KiB.
    #[error("mmio memory of {0} bytes, the window has 65536")]
    MmioSize(usize),
}

/// Everything the guest can observe of a [`PcTestdevPorts`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcTestdevPortsState {
    /// The 32-bit scratch register behind 0xe0–0xe3 and 0xe8–0xeb.
    pub ioport_data: u32,
}

/// pc-testdev's ports 0xe0–0xeb.
#[derive(Debug, Default)]
pub struct PcTestdevPorts {
    s: PcTestdevPortsState,
}

impl PcTestdevPorts {
    /// The ports with a cleared scratch register.
    pub fn new() -> Self {
        Self::default()
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> PcTestdevPortsState {
        self.s.clone()
    }

    /// Replaces the device's state with `state`.
    ///
    /// Every value of the register is valid, so this never fails; it returns a `Result` like
    /// every device's restore.
    pub fn restore(&mut self, state: &PcTestdevPortsState) -> Result<(), PcTestdevStateError> {
        self.s = state.clone();
        Ok(())
    }

    /// QEMU's `test_ioport_read`: `len` bytes from lane `lane`.
    fn lane_read(&self, lane: u64, len: usize) -> u64 {
        let shift = (lane & 3) * 8;
        let mask = lane_mask(len) << shift;
        (u64::from(self.s.ioport_data) & mask) >> shift
    }

    /// QEMU's `test_ioport_write`.
    fn lane_write(&mut self, lane: u64, len: usize, value: u64) {
        let shift = (lane & 3) * 8;
        let mask = lane_mask(len) << shift;
        let data = (u64::from(self.s.ioport_data) & !mask) | ((value << shift) & mask);
        self.s.ioport_data = data as u32;
    }
}

/// The mask of a `len`-byte lane (at most 4 bytes).
fn lane_mask(len: usize) -> u64 {
    (1u64 << (8 * len.min(4))) - 1
}

impl BusDevice for PcTestdevPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        match offset {
            0..FLUSH_OFFSET if aligned(offset, len) && len <= 4 => {
                fill_le(data, self.lane_read(offset, len));
            }
            BYTE_SCRATCH_OFFSET..=11 if aligned(offset, len) && len <= 4 => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = self.lane_read(offset + i as u64, 1) as u8;
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let len = data.len();
        match offset {
            0..FLUSH_OFFSET if aligned(offset, len) && len <= 4 => {
                self.lane_write(offset, len, le_value(data));
            }
            FLUSH_OFFSET if len == 4 => {
                return Some(VmRequest::FlushPage(le_value(data) & !0xfff));
            }
            BYTE_SCRATCH_OFFSET..=11 if aligned(offset, len) && len <= 4 => {
                for (i, b) in data.iter().enumerate() {
                    self.lane_write(offset + i as u64, 1, u64::from(*b));
                }
            }
            _ => {}
        }
        None
    }
}

/// Everything the guest can observe of a [`PcTestdevIrq`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcTestdevIrqState {
    /// Bit n set: line n was last driven high by the device.
    pub levels: u32,
}

/// pc-testdev's interrupt-line ports 0x2000–0x2017.
pub struct PcTestdevIrq {
    s: PcTestdevIrqState,
    lines: Vec<SharedIrq>,
}

impl PcTestdevIrq {
    /// The ports driving `lines`: `lines[n]` is the line written through port 0x2000 + n
    /// (ISA IRQ / GSI n). At most 24 are used.
    pub fn new(lines: Vec<SharedIrq>) -> Self {
        Self {
            s: PcTestdevIrqState::default(),
            lines,
        }
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> PcTestdevIrqState {
        self.s.clone()
    }

    /// Replaces the device's state with `state` and raises the lines it had raised. Lines that
    /// were low are left alone: they may be shared with other devices.
    ///
    /// Levels of lines past the 24 the device has are rejected.
    pub fn restore(&mut self, state: &PcTestdevIrqState) -> Result<(), PcTestdevStateError> {
        if state.levels >> PC_TESTDEV_IRQ_LEN != 0 {
            return Err(PcTestdevStateError::IrqLevels(state.levels));
        }
        self.s = state.clone();
        for (n, line) in self
            .lines
            .iter()
            .enumerate()
            .take(PC_TESTDEV_IRQ_LEN as usize)
        {
            if self.s.levels & (1 << n) != 0 {
                line.set_level(true);
            }
        }
        Ok(())
    }
}

impl BusDevice for PcTestdevIrq {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if let [v] = data {
            if offset < PC_TESTDEV_IRQ_LEN {
                let level = *v != 0;
                let bit = 1u32 << offset;
                if level {
                    self.s.levels |= bit;
                } else {
                    self.s.levels &= !bit;
                }
                if let Some(line) = usize::try_from(offset).ok().and_then(|n| self.lines.get(n)) {
                    line.set_level(level);
                }
            }
        }
        None
    }
}

/// Everything the guest can observe of a [`PcTestdevMmio`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PcTestdevMmioState {
    /// The 64 KiB of scratch memory.
    pub mem: Vec<u8>,
}

/// pc-testdev's 64 KiB MMIO scratch area at 0xff000000.
#[derive(Debug)]
pub struct PcTestdevMmio {
    s: PcTestdevMmioState,
}

impl PcTestdevMmio {
    /// The scratch area, zeroed.
    pub fn new() -> Self {
        Self {
            s: PcTestdevMmioState {
                mem: vec![0; PC_TESTDEV_MMIO_LEN as usize],
            },
        }
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> PcTestdevMmioState {
        self.s.clone()
    }

    /// Replaces the memory with `state`'s, padded or truncated to 64 KiB.
    ///
    /// Memory of any size but the device's 64 KiB is rejected.
    pub fn restore(&mut self, state: &PcTestdevMmioState) -> Result<(), PcTestdevStateError> {
        if state.mem.len() != PC_TESTDEV_MMIO_LEN as usize {
            return Err(PcTestdevStateError::MmioSize(state.mem.len()));
        }
        self.s = state.clone();
        Ok(())
    }

    /// The bytes an access covers, if it is valid.
    fn range(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        if len > 8 || !aligned(offset, len) {
            return None;
        }
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.s.mem.len()).then_some(start..end)
    }
}

impl Default for PcTestdevMmio {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for PcTestdevMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.range(offset, data.len()) {
            Some(r) => data.copy_from_slice(&self.s.mem[r]),
            None => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if let Some(r) = self.range(offset, data.len()) {
            self.s.mem[r].copy_from_slice(data);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testutil::RecordingIrq;

    fn rd(d: &mut dyn BusDevice, off: u64, len: usize) -> u64 {
        let mut b = vec![0; len];
        d.read(off, &mut b);
        le_value(&b)
    }

    #[test]
    fn scratch_register_lanes() {
        let mut p = PcTestdevPorts::new();
        p.write(0, &0x1234_5678u32.to_le_bytes());
        assert_eq!(rd(&mut p, 0, 4), 0x1234_5678);
        assert_eq!(rd(&mut p, 1, 1), 0x56);
        assert_eq!(rd(&mut p, 2, 2), 0x1234);
        p.write(3, &[0xab]);
        p.write(0, &[0xcd, 0xef]);
        assert_eq!(rd(&mut p, 0, 4), 0xab34_efcd);
        // The byte-wise view is the same register.
        assert_eq!(rd(&mut p, 8, 4), 0xab34_efcd);
        assert_eq!(rd(&mut p, 9, 1), 0xef);
        p.write(8, &0x0102_0304u32.to_le_bytes());
        assert_eq!(rd(&mut p, 0, 4), 0x0102_0304);
        p.write(11, &[0xff]);
        assert_eq!(rd(&mut p, 0, 4), 0xff02_0304);
        // Unaligned accesses are invalid.
        p.write(1, &[0, 0]);
        assert_eq!(rd(&mut p, 0, 4), 0xff02_0304);
        assert_eq!(rd(&mut p, 1, 2), 0);
        assert_eq!(rd(&mut p, 2, 4), 0);
    }

    #[test]
    fn flush_page() {
        let mut p = PcTestdevPorts::new();
        assert_eq!(
            p.write(4, &0x0012_3456u32.to_le_bytes()),
            Some(VmRequest::FlushPage(0x0012_3000))
        );
        assert_eq!(p.write(4, &[1]), None);
        assert_eq!(p.write(5, &[0; 2]), None);
        assert_eq!(rd(&mut p, 4, 4), 0);
        assert_eq!(rd(&mut p, 0, 4), 0);
    }

    #[test]
    fn irq_lines() {
        let recs: Vec<Arc<RecordingIrq>> = (0..16).map(|_| RecordingIrq::new().0).collect();
        let lines: Vec<SharedIrq> = recs.iter().map(|r| r.clone() as SharedIrq).collect();
        let mut d = PcTestdevIrq::new(lines);
        d.write(0x0e, &[1]);
        assert!(recs[0x0e].level());
        d.write(0x0e, &[1]);
        assert_eq!(*recs[0x0e].levels.lock().unwrap(), [true, true]);
        d.write(0x0e, &[0]);
        assert!(!recs[0x0e].level());
        // Beyond the lines given, or wide writes: ignored (but no panic).
        d.write(0x17, &[1]);
        d.write(0x18, &[1]);
        d.write(0x01, &[1, 1]);
        assert!(recs[1].levels.lock().unwrap().is_empty());
        assert_eq!(d.state().levels, 1 << 0x17);
        assert_eq!(rd(&mut d, 0, 1), 0);
    }

    #[test]
    fn mmio_scratch() {
        let mut m = PcTestdevMmio::new();
        m.write(0x10, &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(rd(&mut m, 0x10, 8), 0x1122_3344_5566_7788);
        assert_eq!(rd(&mut m, 0x14, 4), 0x1122_3344);
        assert_eq!(rd(&mut m, 0x11, 1), 0x77);
        m.write(0xffff, &[0x5a]);
        assert_eq!(rd(&mut m, 0xffff, 1), 0x5a);
        // Unaligned or out of range: nothing.
        m.write(0x11, &[1, 2]);
        assert_eq!(rd(&mut m, 0x10, 8), 0x1122_3344_5566_7788);
        assert_eq!(rd(&mut m, 0x11, 2), 0);
        m.write(0xfffc, &[1; 8]);
        m.write(0x10000, &[1]);
        assert_eq!(rd(&mut m, u64::MAX, 1), 0);
        assert_eq!(rd(&mut m, 0xfff8, 8), 0x5a << 56);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut p = PcTestdevPorts::new();
        p.write(0, &0xdead_beefu32.to_le_bytes());
        let state: PcTestdevPortsState =
            serde_json::from_str(&serde_json::to_string(&p.state()).unwrap()).unwrap();
        let mut q = PcTestdevPorts::new();
        q.restore(&state).unwrap();
        for (off, len) in [(0, 4), (1, 1), (2, 2), (8, 4), (11, 1)] {
            assert_eq!(rd(&mut p, off, len), rd(&mut q, off, len));
        }

        let (r, line) = RecordingIrq::new();
        let mut d = PcTestdevIrq::new(vec![line]);
        d.write(0, &[1]);
        let state: PcTestdevIrqState =
            serde_json::from_str(&serde_json::to_string(&d.state()).unwrap()).unwrap();
        let (r2, line2) = RecordingIrq::new();
        let mut e = PcTestdevIrq::new(vec![line2]);
        e.restore(&state).unwrap();
        assert_eq!(e.state(), d.state());
        assert_eq!(r2.level(), r.level());

        let mut m = PcTestdevMmio::new();
        m.write(0x100, &[1, 2, 3, 4]);
        m.write(0xfff0, &[9; 8]);
        let state: PcTestdevMmioState =
            serde_json::from_str(&serde_json::to_string(&m.state()).unwrap()).unwrap();
        let mut n = PcTestdevMmio::new();
        n.restore(&state).unwrap();
        assert_eq!(n.state(), m.state());
        for off in [0x100, 0xfff0, 0x200] {
            assert_eq!(rd(&mut m, off, 8), rd(&mut n, off, 8));
        }
    }

    #[test]
    fn restore_rejects_invalid_state() {
        let (_, line) = RecordingIrq::new();
        let mut irq = PcTestdevIrq::new(vec![line]);
        assert_eq!(
            irq.restore(&PcTestdevIrqState { levels: 1 << 24 }),
            Err(PcTestdevStateError::IrqLevels(1 << 24))
        );
        assert_eq!(irq.state(), PcTestdevIrqState::default());
        let mut mmio = PcTestdevMmio::new();
        let good = mmio.state();
        for len in [0, 0xffff, 0x1_0001] {
            assert_eq!(
                mmio.restore(&PcTestdevMmioState { mem: vec![0; len] }),
                Err(PcTestdevStateError::MmioSize(len))
            );
            assert_eq!(mmio.state(), good);
        }
    }
}
