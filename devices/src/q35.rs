//! QEMU's `q35` machine's PCI side: the Q35 MCH host bridge (00.0, 8086:29c0), the ICH9 LPC
//! bridge (1f.0, 8086:2918) and the PCI Express enhanced configuration access mechanism (ECAM,
//! "MMCONFIG") at 0xb0000000 as QEMU places it, described by the MCFG ACPI table.
//!
//! Configuration mechanism #1 (ports 0xcf8/0xcfc, [`crate::PciHost`]) works as on `pc`. The ECAM
//! window reaches bus 0 only (there are no bridges): the other buses read as empty. Functions
//! are conventional PCI ones with 256 bytes of configuration space: the extended space
//! (0x100–0xfff) reads as all ones, which tells an OS there is none. The MCH's PCIEXBAR register
//! (0x60) reads back the fixed window (enabled, 256 buses) and ignores writes: the guest cannot
//! move or resize it. INTx is wired as on hopvm's `pc` (the PIRQ swizzle onto ISA IRQs 10 and
//! 11, which are also the IOAPIC pins); the ICH9's PIRQ routing registers read back that wiring.

use std::sync::{Arc, Mutex};

use vmm_sync::lock;

use crate::pci::{PciBus, PciConfig, PciDevice, PIRQ_IRQS};
use crate::{fill_le, le_value, BusDevice, VmRequest};

/// Where QEMU's q35 puts the ECAM window.
pub const ECAM_BASE: u64 = 0xb000_0000;
/// Its size: 256 buses of 1 MiB.
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// The LPC bridge's device number.
pub const LPC_SLOT: u8 = 0x1f;

/// The Q35 MCH (00.0).
struct Mch {
    config: PciConfig,
}

impl PciDevice for Mch {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}

/// The ICH9 LPC/ISA bridge (1f.0).
struct Lpc {
    config: PciConfig,
}

impl PciDevice for Lpc {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}

/// Bus 0 of `q35`: the MCH at 00.0 and the LPC bridge at 1f.0.
pub fn new_bus() -> PciBus {
    let mut mch = PciConfig::new(0x8086, 0x29c0, 0x06_00_00, 0x00);
    mch.set_subsystem(0x1af4, 0x1100);
    // PCIEXBAR: base | length 256 MiB (0) | enable.
    mch.set_u32(0x60, (ECAM_BASE as u32) | 1);
    let mut lpc = PciConfig::new(0x8086, 0x2918, 0x06_01_00, 0x02);
    lpc.set_header_type(0x80);
    lpc.set_subsystem(0x1af4, 0x1100);
    // PIRQA–D route control (0x60–0x63) and PIRQE–H (0x68–0x6b).
    for (i, irq) in PIRQ_IRQS.iter().enumerate() {
        lpc.write_readonly(0x60 + i, *irq);
        lpc.write_readonly(0x68 + i, *irq);
    }
    let mut bus = PciBus::default();
    bus.insert(0, Arc::new(Mutex::new(Mch { config: mch })));
    bus.insert(LPC_SLOT, Arc::new(Mutex::new(Lpc { config: lpc })));
    bus
}

/// The ECAM window onto a bus.
pub struct PciEcam {
    bus: Arc<Mutex<PciBus>>,
}

impl PciEcam {
    /// A window onto `bus` (bus 0).
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self { bus }
    }

    /// (device, function, register offset) of a window offset on bus 0.
    fn decode(offset: u64) -> Option<(u8, u8, usize)> {
        (offset >> 20 == 0).then_some((
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            (offset & 0xfff) as usize,
        ))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match Self::decode(offset) {
            Some((dev, func, reg)) if reg + data.len() <= crate::pci::CONFIG_SIZE => {
                let dword = lock(&self.bus).config_read(dev, func, reg / 4);
                let wide = u64::from(dword)
                    | if reg % 4 + data.len() > 4 {
                        u64::from(lock(&self.bus).config_read(dev, func, reg / 4 + 1)) << 32
                    } else {
                        0
                    };
                wide >> (8 * (reg % 4))
            }
            _ => u64::MAX,
        };
        fill_le(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if let Some((dev, func, reg)) = Self::decode(offset) {
            if reg + data.len() <= crate::pci::CONFIG_SIZE {
                let _ = le_value(data);
                lock(&self.bus).config_write(dev, func, reg, data);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_ecam() {
        let bus = Arc::new(Mutex::new(new_bus()));
        let mut ecam = PciEcam::new(bus.clone());
        let mut b = [0u8; 4];
        ecam.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x29c0_8086);
        ecam.read(0x1f << 15, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x2918_8086);
        assert_eq!(
            lock(&bus).config_read(0x1f, 0, 0),
            0x2918_8086,
            "cf8 sees the same"
        );
        ecam.read(0x60, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xb000_0001);
        ecam.write(0x60, &[0; 4]);
        ecam.read(0x60, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xb000_0001, "pciexbar is fixed");
        ecam.read((0x1f << 15) | 0x60, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0b0b_0a0a);
        // Byte and word reads, an empty slot, another bus, the extended space.
        let mut w = [0u8; 2];
        ecam.read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x29c0);
        let mut one = [0u8; 1];
        ecam.read(0xe | (0x1f << 15), &mut one);
        assert_eq!(one[0], 0x80);
        ecam.read(3 << 15, &mut b);
        assert_eq!(b, [0xff; 4]);
        ecam.read(1 << 20, &mut b);
        assert_eq!(b, [0xff; 4]);
        ecam.read(0x100, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Writes: the command register is writable, the IDs are not; nonsense never panics.
        ecam.write(4, &[6, 0]);
        ecam.read(4, &mut b);
        assert_eq!(b[0], 6);
        ecam.write(0, &[0; 4]);
        ecam.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x29c0_8086);
        ecam.write(ECAM_SIZE - 1, &[0xff]);
        ecam.write(0xffe, &[0xff; 4]);
        ecam.read(0xffe, &mut b);
    }
}
