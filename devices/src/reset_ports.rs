//! The PC's two legacy reset registers: System Control Port A (0x92) and the PIIX reset
//! control register (0xcf9).
//!
//! Guests reboot through whichever of these they trust (Linux tries the keyboard controller,
//! ACPI, then 0xcf9; some firmware uses port 0x92), so both have to turn into a
//! [`VmRequest::Reset`]. QEMU's `port92` device in `hw/i386/pc.c` and the RCR of
//! `hw/isa/piix.c` are the reference.
//!
//! * [`Port92`]: register at [`PORT92_BASE`] (0x92) with length [`PORT92_LEN`] (1). Setting
//!   bit 0 (fast reset) when it was clear requests a reset; bit 1 (A20) and the other bits are
//!   kept and read back (KVM does not mask A20). A machine reset clears bit 0 again
//!   ([`Port92::reset`]); a VMM that keeps the device across a guest reboot must call it, or the
//!   next 0→1 transition will not be seen.
//! * [`ResetControl`] is not a bus device of its own: port 0xcf9 lies inside the PCI host's
//!   0xcf8–0xcff range, so [`PciHost`](crate::PciHost) embeds it and forwards byte accesses at
//!   0xcf9, as QEMU's PIIX overlays it on the configuration address register. A write with
//!   bit 2 set (0x06 warm, 0x0e cold) requests a reset; otherwise only bit 1 (the reset type)
//!   is kept and reads back.

use serde::{Deserialize, Serialize};

use crate::{BusDevice, VmRequest};

/// The port of System Control Port A.
pub const PORT92_BASE: u64 = 0x92;
/// The length of the port range [`Port92`] expects.
pub const PORT92_LEN: u64 = 1;
/// The port of the reset control register.
pub const RESET_CONTROL_PORT: u64 = 0xcf9;

/// Everything the guest can observe of a [`Port92`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port92State {
    /// The value last written (bit 0 fast reset, bit 1 A20 gate).
    pub outport: u8,
}

/// System Control Port A (0x92).
#[derive(Debug, Default)]
pub struct Port92 {
    s: Port92State,
}

impl Port92 {
    /// The port in its power-on state (all bits clear).
    pub fn new() -> Self {
        Self::default()
    }

    /// Machine reset: clears the fast-reset bit, as QEMU's `port92_reset`.
    pub fn reset(&mut self) {
        self.s.outport &= !1;
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> Port92State {
        self.s.clone()
    }

    /// Replaces the device's state with `state`.
    ///
    /// Every value of the register is one the guest can write, so this never fails; it returns
    /// a `Result` like every device's restore.
    pub fn restore(&mut self, state: &Port92State) -> Result<(), ResetPortsStateError> {
        self.s = state.clone();
        Ok(())
    }
}

impl BusDevice for Port92 {
    /// Every byte of a wider read returns the register, as QEMU's byte-split access does.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.s.outport);
    }

    /// Only the first byte of a wider write counts.
    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<VmRequest> {
        let &val = data.first()?;
        let old = self.s.outport;
        self.s.outport = val;
        (val & 1 != 0 && old & 1 == 0).then_some(VmRequest::Reset)
    }
}

/// Why a reset port's state cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResetPortsStateError {
    /// The 0xcf9 register holds bits other than bit 1.
    #[error("reset control register {0:#04x} holds bits other than bit 1")]
    ResetControl(u8),
}

/// Everything the guest can observe of a [`ResetControl`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetControlState {
    /// The register's value (only bit 1, the reset type, is kept).
    pub rcr: u8,
}

/// The PIIX reset control register at 0xcf9, embedded in [`PciHost`](crate::PciHost).
#[derive(Debug, Default)]
pub struct ResetControl {
    s: ResetControlState,
}

impl ResetControl {
    /// The register in its reset state (0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Machine reset: clears the register.
    pub fn reset(&mut self) {
        self.s.rcr = 0;
    }

    /// Reads the register.
    pub fn read(&self) -> u8 {
        self.s.rcr
    }

    /// Writes the register; bit 2 requests a reset (and leaves the register unchanged).
    pub fn write(&mut self, val: u8) -> Option<VmRequest> {
        if val & 4 != 0 {
            return Some(VmRequest::Reset);
        }
        self.s.rcr = val & 2;
        None
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> ResetControlState {
        self.s.clone()
    }

    /// Replaces the register's state with `state`; bits other than bit 1 (which the
    /// register never keeps) are rejected.
    pub fn restore(&mut self, state: &ResetControlState) -> Result<(), ResetPortsStateError> {
        if state.rcr & !2 != 0 {
            return Err(ResetPortsStateError::ResetControl(state.rcr));
        }
        self.s = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port92_resets_on_rising_bit0() {
        let mut p = Port92::new();
        assert_eq!(p.write(0, &[0x02]), None);
        let mut b = [0];
        p.read(0, &mut b);
        assert_eq!(b[0], 0x02);
        assert_eq!(p.write(0, &[0x03]), Some(VmRequest::Reset));
        // Still set: no new edge.
        assert_eq!(p.write(0, &[0x03]), None);
        p.reset();
        p.read(0, &mut b);
        assert_eq!(b[0], 0x02);
        assert_eq!(p.write(0, &[0x01, 0xff]), Some(VmRequest::Reset));
        assert_eq!(p.write(0, &[]), None);
        let mut w = [0; 2];
        p.read(0, &mut w);
        assert_eq!(w, [0x01, 0x01]);
    }

    #[test]
    fn reset_control() {
        let mut r = ResetControl::new();
        assert_eq!(r.write(0x02), None);
        assert_eq!(r.read(), 0x02);
        assert_eq!(r.write(0x0b), None);
        assert_eq!(r.read(), 0x02);
        assert_eq!(r.write(0x06), Some(VmRequest::Reset));
        assert_eq!(r.write(0x0e), Some(VmRequest::Reset));
        assert_eq!(r.read(), 0x02);
        r.reset();
        assert_eq!(r.read(), 0);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut p = Port92::new();
        p.write(0, &[0x03]);
        let json = serde_json::to_string(&p.state()).unwrap();
        let state: Port92State = serde_json::from_str(&json).unwrap();
        let mut q = Port92::new();
        q.restore(&state).unwrap();
        assert_eq!(q.state(), p.state());
        // Bit 0 is already set on both: no reset.
        assert_eq!(q.write(0, &[0x03]), p.write(0, &[0x03]));
        let (mut a, mut b) = ([0], [0]);
        p.read(0, &mut a);
        q.read(0, &mut b);
        assert_eq!(a, b);

        let mut r = ResetControl::new();
        r.write(0x02);
        let json = serde_json::to_string(&r.state()).unwrap();
        let state: ResetControlState = serde_json::from_str(&json).unwrap();
        let mut s = ResetControl::new();
        s.restore(&state).unwrap();
        assert_eq!(s.read(), 0x02);
    }

    #[test]
    fn restore_rejects_invalid_state() {
        let mut r = ResetControl::new();
        r.write(2);
        assert_eq!(
            r.restore(&ResetControlState { rcr: 4 }),
            Err(ResetPortsStateError::ResetControl(4))
        );
        assert_eq!(r.read(), 2);
        r.restore(&ResetControlState { rcr: 0 }).unwrap();
        assert_eq!(r.read(), 0);
    }
}
