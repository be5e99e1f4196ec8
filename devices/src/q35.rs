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
//! 11, which are also the IOAPIC pins); the ICH9's PIRQ routing registers start with that
//! wiring, and a guest that rewrites PIRQA–D reroutes ([`crate::pirq`]). The MCH's and the LPC
//! bridge's configuration spaces migrate in QEMU's `mch` and `ICH9LPC` sections.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sync::lock;

use crate::pci::{PciBus, PciConfig, PciConfigError, PciConfigState, PciDevice, PIRQ_IRQS};
use crate::pirq::PirqRouter;
use crate::{fill_le, le_value, BusDevice, VmRequest};

/// Where QEMU's q35 puts the ECAM window.
pub const ECAM_BASE: u64 = 0xb000_0000;
/// Its size: 256 buses of 1 MiB.
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// The LPC bridge's device number.
pub const LPC_SLOT: u8 = 0x1f;

/// The MCH's PCIEXBAR register (the ECAM window's base, size and enable).
pub const PCIEXBAR: usize = 0x60;
/// The MCH's SMRAM control register.
const MCH_SMRAM: usize = 0x9d;
/// The MCH's extended SMRAM control register.
const MCH_ESMRAMC: usize = 0x9e;
/// The LPC bridge's PIRQA–D route control registers; PIRQE–H are at [`PIRQE_ROUT`].
pub const PIRQA_ROUT: usize = 0x60;
/// PIRQE–H route control.
pub const PIRQE_ROUT: usize = 0x68;
/// The LPC bridge's ACPI PM base address (PMBASE) and its ACPI control register: the PM
/// block stays where hopvm put it, so they are read-only here.
const LPC_PMBASE: usize = 0x40;
/// The root complex base address (RCBA): hopvm has no root complex register block.
const LPC_RCBA: usize = 0xf0;

/// Everything the guest can observe of the MCH: its configuration space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MchState {
    /// The 256 configuration bytes.
    pub config: PciConfigState,
}

/// The Q35 MCH (00.0): its device-specific registers (0x40–0xff: PAM 0x90–0x96, SMRAM 0x9d,
/// …) are writable as on QEMU and read back what the guest wrote — but for PCIEXBAR, which
/// holds the fixed ECAM window (see the module's documentation). PAM and SMRAM change no
/// decoding on hopvm (no BIOS ROM, no SMM).
pub struct Mch {
    config: PciConfig,
}

impl Default for Mch {
    fn default() -> Self {
        Self::new()
    }
}

impl Mch {
    /// The MCH at power-on.
    pub fn new() -> Self {
        let mut config = PciConfig::new(0x8086, 0x29c0, 0x06_00_00, 0x00);
        config.set_subsystem(0x1af4, 0x1100);
        config.set_wmask(0x40, 0xc0, 0xff);
        config.set_wmask(PCIEXBAR, 8, 0);
        // PCIEXBAR: base | length 256 MiB (0) | enable.
        config.set_u32(PCIEXBAR, (ECAM_BASE as u32) | 1);
        // SMRAM and ESMRAMC at QEMU's reset values, writable where QEMU's are (D_OPEN, D_CLS,
        // D_LCK, G_SMRAME; H_SMRAME, TSEG_SZ, T_EN). Neither changes decoding on hopvm.
        config.write_readonly(MCH_SMRAM, 0x02);
        config.write_readonly(MCH_ESMRAMC, 0x38);
        config.set_wmask(MCH_SMRAM, 1, 0x78);
        config.set_wmask(MCH_ESMRAMC, 1, 0x87);
        Self { config }
    }

    /// A snapshot of the configuration space.
    pub fn state(&self) -> MchState {
        MchState {
            config: self.config.state(),
        }
    }

    /// Applies a saved state; a space of the wrong size, or with a read-only byte the device
    /// does not have (IDs, a moved or resized ECAM window), is refused and nothing changes.
    /// The ECAM window is fixed, so there is nothing to re-map.
    pub fn restore(&mut self, state: &MchState) -> Result<(), PciConfigError> {
        self.config.restore(&state.config)
    }
}

impl PciDevice for Mch {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}

/// Everything the guest can observe of the LPC bridge: its configuration space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ich9LpcState {
    /// The 256 configuration bytes.
    pub config: PciConfigState,
}

/// The ICH9 LPC/ISA bridge (1f.0): its device-specific registers are writable as on QEMU —
/// the PIRQ routes (0x60–0x63, 0x68–0x6b) among them; PIRQA–D drive the machine's
/// [`PirqRouter`] (INTx is swizzled onto those four only) — but for PMBASE / ACPI control (0x40–0x47) and RCBA (0xf0–0xf3), which
/// would move blocks hopvm keeps in place.
pub struct Ich9Lpc {
    config: PciConfig,
    router: Option<Arc<PirqRouter>>,
}

impl Default for Ich9Lpc {
    fn default() -> Self {
        Self::new()
    }
}

impl Ich9Lpc {
    /// The bridge at power-on, with SeaBIOS's PIRQ routes, routing nothing.
    pub fn new() -> Self {
        Self::with_router(None)
    }

    /// The bridge at power-on, its PIRQA–D route registers driving `router`.
    pub fn with_router(router: Option<Arc<PirqRouter>>) -> Self {
        let mut config = PciConfig::new(0x8086, 0x2918, 0x06_01_00, 0x02);
        config.set_header_type(0x80);
        config.set_subsystem(0x1af4, 0x1100);
        config.set_wmask(0x40, 0xc0, 0xff);
        config.set_wmask(LPC_PMBASE, 8, 0);
        config.set_wmask(LPC_RCBA, 4, 0);
        for (i, irq) in PIRQ_IRQS.iter().enumerate() {
            config.write_readonly(PIRQA_ROUT + i, *irq);
            config.write_readonly(PIRQE_ROUT + i, *irq);
        }
        let lpc = Self { config, router };
        lpc.apply_routes();
        lpc
    }

    /// Hands the PIRQA–D route registers to the router (INTx is swizzled onto A–D only).
    fn apply_routes(&self) {
        if let Some(r) = &self.router {
            r.set_routes(self.config.u32(PIRQA_ROUT).to_le_bytes());
        }
    }

    /// A snapshot of the configuration space.
    pub fn state(&self) -> Ich9LpcState {
        Ich9LpcState {
            config: self.config.state(),
        }
    }

    /// Applies a saved state, and the PIRQ routes in it; a space of the wrong size or with a
    /// read-only byte the device does not have (IDs, PMBASE, RCBA) is refused and nothing
    /// changes.
    pub fn restore(&mut self, state: &Ich9LpcState) -> Result<(), PciConfigError> {
        self.config.restore(&state.config)?;
        self.apply_routes();
        Ok(())
    }
}

impl PciDevice for Ich9Lpc {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_written(&mut self, offset: usize, len: usize) {
        if offset < PIRQA_ROUT + 4 && offset + len > PIRQA_ROUT {
            self.apply_routes();
        }
    }
}

/// Bus 0 of `q35`: the MCH at 00.0 and the LPC bridge at 1f.0.
pub fn new_bus() -> PciBus {
    new_chipset(None).0
}

/// Bus 0 of `q35` with typed handles to the MCH and the LPC bridge (their migration
/// sections); the LPC bridge's route registers drive `router`, if any.
pub fn new_chipset(
    router: Option<Arc<PirqRouter>>,
) -> (PciBus, Arc<Mutex<Mch>>, Arc<Mutex<Ich9Lpc>>) {
    let mch = Arc::new(Mutex::new(Mch::new()));
    let lpc = Arc::new(Mutex::new(Ich9Lpc::with_router(router)));
    let mut bus = PciBus::default();
    bus.insert(0, mch.clone());
    bus.insert(LPC_SLOT, lpc.clone());
    (bus, mch, lpc)
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
    fn writable_registers_and_fixed_ones() {
        let (bus, mch, lpc) = new_chipset(None);
        // PAM and SMRAM on the MCH, PIRQ routes on the LPC bridge: written and read back.
        bus.config_write(0, 0, 0x90, &[0x30, 0x33]);
        bus.config_write(0, 0, MCH_SMRAM, &[0xff, 0xff]);
        assert_eq!(bus.config_read(0, 0, 0x90 / 4) & 0xffff, 0x3330);
        // SMRAM keeps its C_BASE_SEG (0x02) and reserved bits, ESMRAMC its fixed 0x38.
        assert_eq!(bus.config_read(0, 0, 0x9c / 4) >> 8 & 0xffff, 0xbf7a);
        bus.config_write(LPC_SLOT, 0, PIRQE_ROUT, &0x8005_0b0au32.to_le_bytes());
        assert_eq!(bus.config_read(LPC_SLOT, 0, PIRQE_ROUT / 4), 0x8005_0b0a);
        // PCIEXBAR, PMBASE and RCBA stay.
        bus.config_write(0, 0, PCIEXBAR, &[0; 8]);
        bus.config_write(LPC_SLOT, 0, LPC_PMBASE, &[0xff; 8]);
        bus.config_write(LPC_SLOT, 0, LPC_RCBA, &[0xff; 4]);
        assert_eq!(bus.config_read(0, 0, PCIEXBAR / 4), 0xb000_0001);
        assert_eq!(bus.config_read(LPC_SLOT, 0, LPC_PMBASE / 4), 0);
        assert_eq!(bus.config_read(LPC_SLOT, 0, LPC_RCBA / 4), 0);
        assert_eq!(lock(&mch).state().config.bytes[0x90], 0x30);
        assert_eq!(lock(&lpc).state().config.bytes[PIRQE_ROUT + 3], 0x80);
    }

    #[test]
    fn save_restore_round_trip_and_rejections() {
        let (bus, mch, lpc) = new_chipset(None);
        bus.config_write(0, 0, 0x04, &[0x06]);
        bus.config_write(0, 0, 0x90, &[0x10, 0x11, 0x33]);
        bus.config_write(LPC_SLOT, 0, PIRQA_ROUT, &[0x05, 0x80, 0x0e, 0x09]);
        bus.config_write(LPC_SLOT, 0, 0xa0, &[0x42]);
        let mch_json = serde_json::to_string(&lock(&mch).state()).unwrap();
        let lpc_json = serde_json::to_string(&lock(&lpc).state()).unwrap();
        let (bus2, mch2, lpc2) = new_chipset(None);
        let ms: MchState = serde_json::from_str(&mch_json).unwrap();
        let ls: Ich9LpcState = serde_json::from_str(&lpc_json).unwrap();
        lock(&mch2).restore(&ms).unwrap();
        lock(&lpc2).restore(&ls).unwrap();
        for (slot, reg) in [(0, 1), (0, 0x24), (0x1f, 0x18), (0x1f, 0x28)] {
            assert_eq!(
                bus2.config_read(slot, 0, reg),
                bus.config_read(slot, 0, reg)
            );
        }
        assert_eq!(bus2.config_read(0x1f, 0, 0x18), 0x090e_8005);
        // A moved ECAM window, another device's IDs, PMBASE, a short space: refused.
        let fresh = (Mch::new().state(), Ich9Lpc::new().state());
        let (_, m3, l3) = new_chipset(None);
        let mut bad = ms.clone();
        bad.config.bytes[PCIEXBAR + 3] = 0xc0;
        assert_eq!(
            lock(&m3).restore(&bad),
            Err(PciConfigError::ReadOnly(PCIEXBAR + 3))
        );
        // An SMRAM with a C_BASE_SEG the MCH cannot hold.
        let mut bad = ms.clone();
        bad.config.bytes[MCH_SMRAM] = 0x03;
        assert_eq!(
            lock(&m3).restore(&bad),
            Err(PciConfigError::ReadOnly(MCH_SMRAM))
        );
        let mut bad = ms;
        bad.config.bytes.truncate(255);
        assert_eq!(lock(&m3).restore(&bad), Err(PciConfigError::Size(255)));
        let mut bad = ls.clone();
        bad.config.bytes[2] = 0x00;
        assert_eq!(lock(&l3).restore(&bad), Err(PciConfigError::ReadOnly(2)));
        let mut bad = ls;
        bad.config.bytes[LPC_PMBASE] = 0x01;
        assert_eq!(
            lock(&l3).restore(&bad),
            Err(PciConfigError::ReadOnly(LPC_PMBASE))
        );
        assert_eq!((lock(&m3).state(), lock(&l3).state()), fresh);
    }

    #[test]
    fn lpc_route_writes_and_restores_reroute() {
        use crate::pirq::{RouteFormat, ISA_IRQS};
        use crate::testutil::RecordingIrq;
        let irqs: Vec<_> = (0..ISA_IRQS).map(|_| RecordingIrq::new()).collect();
        let router = PirqRouter::new(
            RouteFormat::Ich9,
            irqs.iter().map(|(_, s)| s.clone()).collect(),
        );
        let (bus, _, lpc) = new_chipset(Some(router.clone()));
        let line = router.line(crate::pci::intx_pirq(2, 1));
        line.set_level(true);
        assert!(irqs[10].0.level());
        // IRQEN set: PIRQB goes nowhere; then to IRQ 3.
        bus.config_write(LPC_SLOT, 0, PIRQA_ROUT + 1, &[0x8a]);
        assert!(!irqs[10].0.level());
        bus.config_write(LPC_SLOT, 0, PIRQA_ROUT + 1, &[0x03]);
        assert!(irqs[3].0.level());
        // PIRQE–H are stored but no INTx is swizzled onto them.
        bus.config_write(LPC_SLOT, 0, PIRQE_ROUT, &[0x05; 4]);
        assert!(irqs[3].0.level() && !irqs[5].0.level());
        let state = Ich9Lpc::new().state();
        lock(&lpc).restore(&state).unwrap();
        assert!(irqs[10].0.level() && !irqs[3].0.level());
    }

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
