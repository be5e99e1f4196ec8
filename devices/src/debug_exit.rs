//! QEMU's `isa-debug-exit`: lets a test guest end the VMM with an exit status of its choosing.
//!
//! Test kernels (kvm-unit-tests, our own guest tests) finish by writing a value to this port;
//! the VMM then exits with status `(value << 1) | 1`, exactly as QEMU's
//! `hw/misc/debugexit.c` calls `exit((val << 1) | 1)`. The odd status keeps a guest-requested
//! exit distinguishable from a clean VMM shutdown (status 0), so a test passes with status 1
//! when it writes 0.
//!
//! The VMM chooses base and size; the conventional ones are [`DEBUG_EXIT_BASE`] (0xf4) and
//! [`DEBUG_EXIT_LEN`] (4). A write of width 1, 2 or 4 at any offset ends the VM; its bytes are
//! taken little-endian. Like QEMU, which only accepts accesses of 1–4 bytes, other widths are
//! ignored. Reads return 0. The device has no state; [`DebugExitState`] exists so that every
//! device can be saved and restored alike.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};

use crate::{le_value, BusDevice, VmRequest};

/// The conventional base port (`-device isa-debug-exit,iobase=0xf4,iosize=4`).
pub const DEBUG_EXIT_BASE: u64 = 0xf4;
/// The conventional length of the port range.
pub const DEBUG_EXIT_LEN: u64 = 4;

/// The (empty) guest-visible state of a [`DebugExit`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugExitState {}

/// QEMU's `isa-debug-exit` device.
#[derive(Debug, Default)]
pub struct DebugExit {}

impl DebugExit {
    /// A new debug-exit device.
    pub fn new() -> Self {
        Self {}
    }

    /// A snapshot of the device's (empty) state.
    pub fn state(&self) -> DebugExitState {
        DebugExitState {}
    }

    /// Restores a snapshot; there is nothing to restore.
    ///
    /// The device has no state, so this never fails; it returns a `Result` like every
    /// device's restore.
    pub fn restore(&mut self, _state: &DebugExitState) -> Result<(), Infallible> {
        Ok(())
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<VmRequest> {
        match data.len() {
            1 | 2 | 4 => Some(VmRequest::Exit(((le_value(data) << 1) | 1) as i32)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_like_qemu() {
        let mut d = DebugExit::new();
        assert_eq!(d.write(0, &[0]), Some(VmRequest::Exit(1)));
        assert_eq!(d.write(0, &[1]), Some(VmRequest::Exit(3)));
        assert_eq!(d.write(3, &[0x7f]), Some(VmRequest::Exit(0xff)));
        assert_eq!(d.write(0, &[0x34, 0x12]), Some(VmRequest::Exit(0x2469)));
        assert_eq!(
            d.write(0, &[0xff, 0xff, 0xff, 0xff]),
            Some(VmRequest::Exit(-1))
        );
        assert_eq!(d.write(0, &[1; 8]), None);
        assert_eq!(d.write(0, &[]), None);
        let mut b = [0xaa; 4];
        d.read(1, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn save_restore_round_trip() {
        let d = DebugExit::new();
        let json = serde_json::to_string(&d.state()).unwrap();
        let state: DebugExitState = serde_json::from_str(&json).unwrap();
        let mut e = DebugExit::new();
        e.restore(&state).unwrap();
        assert_eq!(e.state(), d.state());
        assert_eq!(e.write(0, &[5]), Some(VmRequest::Exit(11)));
    }
}
