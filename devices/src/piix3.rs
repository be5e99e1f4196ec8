//! The PIIX3 PCI-to-ISA bridge (01.0, 8086:7000) of QEMU's `pc` machine: a configuration
//! header whose device-specific registers (0x40–0xff) the guest may write, as on QEMU, with
//! QEMU's power-on values — but for the PIRQ route control registers PIRQRCA–D (0x60–0x63),
//! which hold SeaBIOS's choice, 10, 10, 11, 11, because hopvm is the firmware.
//!
//! The route registers drive the machine's [`PirqRouter`]: a guest that rewrites them moves
//! PCI interrupts to the IRQs it names, and a migration restores them — and with them the
//! routing — in QEMU's `PIIX3` section. The reset control register 0xcf9 that QEMU keeps in
//! this device's section is in hopvm's `pci-host` section.

use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::pci::{PciConfig, PciConfigError, PciConfigState, PciDevice, PIRQ_IRQS};
use crate::pirq::PirqRouter;

/// PIRQRCA, the first PIRQ route control register.
pub const PIRQRC: usize = 0x60;

/// Everything the guest can observe of the PIIX3: its configuration space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Piix3State {
    /// The 256 configuration bytes.
    pub config: PciConfigState,
}

/// The PIIX3 ISA bridge.
pub struct Piix3 {
    config: PciConfig,
    router: Option<Arc<PirqRouter>>,
}

impl Default for Piix3 {
    fn default() -> Self {
        Self::new()
    }
}

impl Piix3 {
    /// The bridge at power-on, routing nothing (a bus without interrupts, for tests).
    pub fn new() -> Self {
        Self::with_router(None)
    }

    /// The bridge at power-on, its route registers driving `router`.
    pub fn with_router(router: Option<Arc<PirqRouter>>) -> Self {
        let mut config = PciConfig::new(0x8086, 0x7000, 0x06_01_00, 0x00);
        config.set_header_type(0x80);
        config.set_subsystem(0x1af4, 0x1100);
        config.set_wmask(0x40, 0xc0, 0xff);
        // QEMU's reset values of the registers that are not zero.
        for (reg, v) in [
            (0x4c, 0x4d),
            (0x4e, 0x03),
            (0x69, 0x02),
            (0x70, 0x80),
            (0x76, 0x0c),
            (0x77, 0x0c),
            (0x78, 0x02),
            (0xa0, 0x08),
            (0xa8, 0x0f),
        ] {
            config.write_readonly(reg, v);
        }
        for (i, irq) in PIRQ_IRQS.iter().enumerate() {
            config.write_readonly(PIRQRC + i, *irq);
        }
        let piix3 = Self { config, router };
        piix3.apply_routes();
        piix3
    }

    /// Hands the route registers to the router.
    fn apply_routes(&self) {
        if let Some(r) = &self.router {
            let v = self.config.u32(PIRQRC).to_le_bytes();
            r.set_routes(v);
        }
    }

    /// A snapshot of the configuration space.
    pub fn state(&self) -> Piix3State {
        Piix3State {
            config: self.config.state(),
        }
    }

    /// Applies a saved state, and the PIRQ routes in it; a space of the wrong size or with a
    /// read-only byte the device does not have is refused and nothing changes.
    pub fn restore(&mut self, state: &Piix3State) -> Result<(), PciConfigError> {
        self.config.restore(&state.config)?;
        self.apply_routes();
        Ok(())
    }
}

impl PciDevice for Piix3 {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_written(&mut self, offset: usize, len: usize) {
        if offset < PIRQRC + 4 && offset + len > PIRQRC {
            self.apply_routes();
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sync::lock;

    use super::*;

    #[test]
    fn pirq_routes_are_writable_ids_are_not() {
        let mut d = Piix3::new();
        assert_eq!(d.config().read_dword(PIRQRC / 4), 0x0b0b_0a0a);
        d.config_mut().write(PIRQRC, &0x8005_0b0au32.to_le_bytes());
        assert_eq!(d.config().read_dword(PIRQRC / 4), 0x8005_0b0a);
        d.config_mut().write(0, &[0; 4]);
        d.config_mut().write(0x0e, &[0]);
        assert_eq!(d.config().read_dword(0), 0x7000_8086);
        assert_eq!(d.config().read_dword(3) >> 16 & 0xff, 0x80);
    }

    #[test]
    fn route_writes_and_restores_reroute() {
        use crate::pirq::{RouteFormat, ISA_IRQS};
        use crate::testutil::RecordingIrq;
        let irqs: Vec<_> = (0..ISA_IRQS).map(|_| RecordingIrq::new()).collect();
        let router = PirqRouter::new(
            RouteFormat::Piix,
            irqs.iter().map(|(_, s)| s.clone()).collect(),
        );
        let (bus, _, piix3) = crate::pci::PciBus::pc_chipset(Some(router.clone()));
        // Slot 3's INTA# is PIRQC: IRQ 11 at boot.
        let line = router.line(crate::pci::intx_pirq(3, 1));
        line.set_level(true);
        assert!(irqs[11].0.level());
        bus.config_write(1, 0, PIRQRC + 2, &[0x05]);
        assert!(!irqs[11].0.level());
        assert!(irqs[5].0.level());
        // A restored state brings its routes: back to 11, then to 9.
        let mut state = Piix3::new().state();
        lock(&piix3).restore(&state).unwrap();
        assert!(irqs[11].0.level() && !irqs[5].0.level());
        state.config.bytes[PIRQRC + 2] = 9;
        lock(&piix3).restore(&state).unwrap();
        assert!(irqs[9].0.level() && !irqs[11].0.level());
        // A refused state changes no route.
        let mut bad = state;
        bad.config.bytes[PIRQRC + 2] = 4;
        bad.config.bytes[0] = 0;
        assert!(lock(&piix3).restore(&bad).is_err());
        assert_eq!(router.route(2), Some(9));
    }

    #[test]
    fn save_restore_round_trip_and_rejections() {
        let mut d = Piix3::new();
        d.config_mut().write(PIRQRC, &[0x05, 0x80, 0x0e, 0x09]);
        d.config_mut().write(0x4c, &[0x11]);
        let json = serde_json::to_string(&d.state()).unwrap();
        let state: Piix3State = serde_json::from_str(&json).unwrap();
        let mut e = Piix3::new();
        e.restore(&state).unwrap();
        assert_eq!(e.state(), d.state());
        assert_eq!(e.config().read_dword(PIRQRC / 4), 0x090e_8005);
        // The i440FX's IDs, the header type, a long space: refused, nothing changed.
        let fresh = Piix3::new().state();
        let mut f = Piix3::new();
        let mut bad = state.clone();
        bad.config.bytes[2] = 0x37;
        assert_eq!(f.restore(&bad), Err(PciConfigError::ReadOnly(2)));
        let mut bad = state.clone();
        bad.config.bytes[0x0e] = 0;
        assert_eq!(f.restore(&bad), Err(PciConfigError::ReadOnly(0x0e)));
        let mut bad = state;
        bad.config.bytes.push(0);
        assert_eq!(f.restore(&bad), Err(PciConfigError::Size(257)));
        assert_eq!(f.state(), fresh);
    }
}
