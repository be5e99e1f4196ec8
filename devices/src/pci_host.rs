//! PCI configuration mechanism #1: CONFIG_ADDRESS at 0xcf8 and CONFIG_DATA at 0xcfc–0xcff.
//!
//! CONFIG_DATA reaches the configuration space of the functions on [`PciBus`] bus 0 (the
//! i440FX host bridge at 00.0, the PIIX3 at 01.0, and whatever the VMM plugs in); an address
//! with the enable bit clear, another bus or an empty slot reads as all ones ("no device").
//! The latch behaves like QEMU's `hw/pci/pci_host.c`: only a 32-bit write at 0xcf8 sets it,
//! and reads of any width at 0xcf8–0xcfb return its low bytes.
//!
//! Register the device at [`PCI_HOST_BASE`] (0xcf8) with length [`PCI_HOST_LEN`] (8).
//!
//! # Port 0xcf9
//!
//! On a PIIX chipset the reset control register sits at 0xcf9, inside the address latch's
//! range, and takes precedence there: QEMU overlays it on the latch. So does this device: an
//! access *starting* at offset 1 goes to the embedded [`ResetControl`] (each byte of a wider
//! access separately, as QEMU splits it), while a 32-bit access at offset 0 still reaches the
//! latch. Writing 0x06 or 0x0e to 0xcf9 resets the machine.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sync::lock;

use crate::pci::PciBus;

use crate::reset_ports::{ResetControl, ResetControlState, ResetPortsStateError};
use crate::{fill_le, le_value, BusDevice, VmRequest};

/// The port the device expects to be registered at.
pub const PCI_HOST_BASE: u64 = 0xcf8;
/// The length of the port range the device expects (0xcf8–0xcff).
pub const PCI_HOST_LEN: u64 = 8;

/// Offset of CONFIG_DATA (0xcfc).
const DATA_OFFSET: u64 = 4;
/// Offset of the reset control register (0xcf9).
const RESET_CONTROL_OFFSET: u64 = 1;

/// Everything the guest can observe of a [`PciHost`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciHostState {
    /// The CONFIG_ADDRESS latch (0xcf8).
    pub config_address: u32,
    /// The reset control register (0xcf9).
    pub reset_control: ResetControlState,
}

/// The configuration ports of the PCI host bridge.
pub struct PciHost {
    config_address: u32,
    reset_control: ResetControl,
    bus: Arc<Mutex<PciBus>>,
}

impl Default for PciHost {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHost {
    /// The ports of a `pc` bus with only the host bridge and the PIIX3, with a cleared
    /// address latch and reset control register.
    pub fn new() -> Self {
        Self::with_bus(Arc::new(Mutex::new(PciBus::new_pc())))
    }

    /// The ports of `bus`.
    pub fn with_bus(bus: Arc<Mutex<PciBus>>) -> Self {
        Self {
            config_address: 0,
            reset_control: ResetControl::default(),
            bus,
        }
    }

    /// The bus behind CONFIG_DATA: (slot, function, byte offset) of the latched address, if
    /// it is enabled and names bus 0.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, usize)> {
        let a = self.config_address;
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        let slot = ((a >> 11) & 0x1f) as u8;
        let function = ((a >> 8) & 0x7) as u8;
        // The register's low two bits count too, ORed with the data port's byte offset, as
        // QEMU does (kvm-unit-tests reads the device ID with register 2 in the address).
        let offset = (a & 0xff) as usize | (data_offset - DATA_OFFSET) as usize;
        Some((slot, function, offset))
    }

    /// Machine reset: clears the reset control register (the latch keeps its value, as in
    /// QEMU).
    pub fn reset(&mut self) {
        self.reset_control.reset();
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> PciHostState {
        PciHostState {
            config_address: self.config_address,
            reset_control: self.reset_control.state(),
        }
    }

    /// Replaces the device's state with `state`.
    ///
    /// An invalid reset control register is rejected and the device is left as it was.
    pub fn restore(&mut self, state: &PciHostState) -> Result<(), ResetPortsStateError> {
        self.reset_control.restore(&state.reset_control)?;
        self.config_address = state.config_address;
        Ok(())
    }
}

impl BusDevice for PciHost {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == RESET_CONTROL_OFFSET {
            data.fill(self.reset_control.read());
        } else if offset < DATA_OFFSET {
            fill_le(data, u64::from(self.config_address));
        } else if let Some((slot, function, offset)) = self.target(offset) {
            let dword = lock(&self.bus).config_read(slot, function, offset / 4);
            fill_le(data, u64::from(dword >> (8 * (offset % 4))));
        } else {
            // No device answers: all ones.
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if offset == RESET_CONTROL_OFFSET {
            let mut request = None;
            for &b in data {
                request = request.or(self.reset_control.write(b));
            }
            return request;
        }
        if offset == 0 && data.len() == 4 {
            self.config_address = le_value(data) as u32;
        } else if offset >= DATA_OFFSET {
            if let Some((slot, function, offset)) = self.target(offset) {
                lock(&self.bus).config_write(slot, function, offset, data);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(p: &mut PciHost, off: u64, len: usize) -> u64 {
        let mut d = vec![0; len];
        p.read(off, &mut d);
        le_value(&d)
    }

    #[test]
    fn address_latch_and_empty_bus() {
        let mut p = PciHost::new();
        assert_eq!(rd(&mut p, 0, 4), 0);
        p.write(0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(rd(&mut p, 0, 4), 0x8000_0000);
        // Narrow writes to the latch are ignored, as in QEMU.
        p.write(3, &[0x01]);
        p.write(0, &[0x12, 0x34]);
        assert_eq!(rd(&mut p, 0, 4), 0x8000_0000);
        p.write(0, &0x8000_f804u32.to_le_bytes());
        assert_eq!(rd(&mut p, 0, 2), 0xf804);
        assert_eq!(rd(&mut p, 2, 1), 0x04);
        assert_eq!(rd(&mut p, 3, 1), 0x04);
        for (off, len) in [(4, 4), (4, 2), (6, 2), (4, 1), (7, 1)] {
            assert_eq!(rd(&mut p, off, len), (1u64 << (8 * len)) - 1);
        }
        assert_eq!(p.write(4, &[0; 4]), None);
        assert_eq!(rd(&mut p, 4, 4), 0xffff_ffff);
        // Odd widths and offsets do not panic.
        p.write(u64::MAX, &[1; 9]);
        let mut big = [0u8; 16];
        p.read(0, &mut big);
    }

    #[test]
    fn mechanism_1_reaches_the_bus() {
        let mut p = PciHost::new();
        // 00.0: the i440FX, dword and narrower reads at every lane.
        p.write(0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(rd(&mut p, 4, 4), 0x1237_8086);
        assert_eq!(rd(&mut p, 4, 2), 0x8086);
        assert_eq!(rd(&mut p, 6, 2), 0x1237);
        assert_eq!(rd(&mut p, 7, 1), 0x12);
        // The low two address bits pick the byte, ORed with the port's, as in QEMU: reg 0x0a
        // read through 0xcfc is the class code's subclass and class (06 00).
        p.write(0, &0x8000_000au32.to_le_bytes());
        assert_eq!(rd(&mut p, 4, 2), 0x0600);
        p.write(0, &0x8000_0002u32.to_le_bytes());
        assert_eq!(rd(&mut p, 4, 2), 0x1237, "kvm-unit-tests' device ID read");
        // 01.0: the PIIX3; 01.1 and other buses: nothing; enable bit clear: nothing.
        p.write(0, &0x8000_0800u32.to_le_bytes());
        assert_eq!(rd(&mut p, 4, 4), 0x7000_8086);
        p.write(0, &0x8000_0900u32.to_le_bytes());
        assert_eq!(rd(&mut p, 4, 4), 0xffff_ffff);
        p.write(0, &0x8001_0000u32.to_le_bytes());
        assert_eq!(rd(&mut p, 4, 4), 0xffff_ffff);
        p.write(0, &0x0000_0000u32.to_le_bytes());
        assert_eq!(rd(&mut p, 4, 4), 0xffff_ffff);
        // A byte write to the host bridge's interrupt line (0x3c) through port 0xcfc.
        p.write(0, &0x8000_003cu32.to_le_bytes());
        p.write(4, &[0x0b]);
        assert_eq!(rd(&mut p, 4, 1), 0x0b);
    }

    #[test]
    fn reset_control_at_cf9() {
        let mut p = PciHost::new();
        p.write(0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(rd(&mut p, 1, 1), 0);
        assert_eq!(p.write(1, &[0x02]), None);
        assert_eq!(rd(&mut p, 1, 1), 0x02);
        // The latch is unaffected, and a 32-bit access at 0xcf8 still reaches it.
        assert_eq!(rd(&mut p, 0, 4), 0x8000_0000);
        assert_eq!(p.write(0, &0x0000_0600u32.to_le_bytes()), None);
        assert_eq!(rd(&mut p, 0, 4), 0x0600);
        assert_eq!(rd(&mut p, 1, 1), 0x02);
        // Linux's sequence: read, write |2, write |6.
        let cf9 = rd(&mut p, 1, 1) as u8 & !0x06;
        assert_eq!(p.write(1, &[cf9 | 2]), None);
        assert_eq!(p.write(1, &[cf9 | 6]), Some(VmRequest::Reset));
        assert_eq!(p.write(1, &[0x0e]), Some(VmRequest::Reset));
        assert_eq!(p.write(1, &[0x00, 0x04]), Some(VmRequest::Reset));
        p.reset();
        assert_eq!(rd(&mut p, 1, 1), 0);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut p = PciHost::new();
        p.write(0, &0x8000_0810u32.to_le_bytes());
        p.write(1, &[0x02]);
        let json = serde_json::to_string(&p.state()).unwrap();
        let state: PciHostState = serde_json::from_str(&json).unwrap();
        let mut q = PciHost::new();
        q.restore(&state).unwrap();
        assert_eq!(q.state(), p.state());
        for (off, len) in [(0, 4), (1, 1), (2, 2), (4, 4)] {
            assert_eq!(rd(&mut p, off, len), rd(&mut q, off, len));
        }
    }

    #[test]
    fn restore_rejects_invalid_state() {
        let mut p = PciHost::new();
        let good = p.state();
        let mut bad = p.state();
        bad.config_address = 0x8000_0000;
        bad.reset_control.rcr = 0xff;
        assert_eq!(
            p.restore(&bad),
            Err(ResetPortsStateError::ResetControl(0xff))
        );
        assert_eq!(p.state(), good, "nothing applied");
    }
}
