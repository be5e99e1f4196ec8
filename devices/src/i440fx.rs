//! The i440FX host bridge (00.0, 8086:1237) of QEMU's `pc` machine: a configuration header
//! whose device-specific registers (0x40–0xff) the guest may write, as on QEMU — PAM0–PAM6
//! (0x59–0x5f) and SMRAM (0x72, 0x02 at power-on) among them.
//!
//! What they would control is fixed on hopvm: the 0xc0000–0xfffff area is always RAM (there is
//! no BIOS ROM to shadow, so PAM changes no decoding) and there is no SMM (SMRAM changes
//! nothing). The registers read back what the guest wrote, and migrate (QEMU's `I440FX`
//! section): a guest or firmware that keeps its chipset settings there finds them after a
//! migration.

use serde::{Deserialize, Serialize};

use crate::pci::{PciConfig, PciConfigError, PciConfigState, PciDevice};

/// First PAM register.
pub const PAM0: usize = 0x59;
/// The SMRAM control register.
pub const SMRAM: usize = 0x72;

/// Everything the guest can observe of the host bridge: its configuration space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I440fxState {
    /// The 256 configuration bytes.
    pub config: PciConfigState,
}

/// The i440FX host bridge.
pub struct I440fx {
    config: PciConfig,
}

impl Default for I440fx {
    fn default() -> Self {
        Self::new()
    }
}

impl I440fx {
    /// The host bridge at power-on.
    pub fn new() -> Self {
        let mut config = PciConfig::new(0x8086, 0x1237, 0x06_00_00, 0x02);
        // QEMU's default write mask for a conventional function's device-specific space.
        config.set_wmask(0x40, 0xc0, 0xff);
        config.write_readonly(SMRAM, 0x02);
        Self { config }
    }

    /// A snapshot of the configuration space.
    pub fn state(&self) -> I440fxState {
        I440fxState {
            config: self.config.state(),
        }
    }

    /// Applies a saved state; a space of the wrong size or with a read-only byte (an ID, the
    /// class) the device does not have is refused and nothing changes. Nothing else to
    /// re-apply: PAM and SMRAM control no decoding on hopvm.
    pub fn restore(&mut self, state: &I440fxState) -> Result<(), PciConfigError> {
        self.config.restore(&state.config)
    }
}

impl PciDevice for I440fx {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pam_and_smram_are_writable_ids_are_not() {
        let mut d = I440fx::new();
        assert_eq!(d.config().read_dword(0), 0x1237_8086);
        assert_eq!(d.config().read_dword(SMRAM / 4) >> 16 & 0xff, 0x02);
        d.config_mut().write(PAM0, &[0x30, 0x33, 0x33]);
        d.config_mut().write(SMRAM, &[0x0a]);
        d.config_mut().write(0, &[0; 4]);
        assert_eq!(d.config().read_dword(0), 0x1237_8086);
        assert_eq!(d.config().u32(PAM0 - 1) >> 8, 0x33_3330);
        assert_eq!(d.config().read_dword(SMRAM / 4) >> 16 & 0xff, 0x0a);
    }

    #[test]
    fn save_restore_round_trip_and_rejections() {
        let mut d = I440fx::new();
        d.config_mut()
            .write(PAM0, &[0x10, 0x11, 0x22, 0x33, 0x30, 0x03, 0x31]);
        d.config_mut().write(SMRAM, &[0x4a]);
        d.config_mut().write(0x04, &[0x07, 0x00]);
        let json = serde_json::to_string(&d.state()).unwrap();
        let state: I440fxState = serde_json::from_str(&json).unwrap();
        let mut e = I440fx::new();
        e.restore(&state).unwrap();
        assert_eq!(e.state(), d.state());
        for reg in 0..64 {
            assert_eq!(e.config().read_dword(reg), d.config().read_dword(reg));
        }
        // Another device's IDs, a short space, unknown fields: refused, nothing changed.
        let fresh = I440fx::new().state();
        let mut f = I440fx::new();
        let mut bad = state.clone();
        bad.config.bytes[2] = 0x29;
        assert_eq!(f.restore(&bad), Err(PciConfigError::ReadOnly(2)));
        let mut bad = state.clone();
        bad.config.bytes[0x0b] = 0x01;
        assert_eq!(f.restore(&bad), Err(PciConfigError::ReadOnly(0x0b)));
        let mut bad = state.clone();
        bad.config.bytes.truncate(64);
        assert_eq!(f.restore(&bad), Err(PciConfigError::Size(64)));
        // The command register holds four bits: a state with others set could not be.
        let mut bad = state;
        bad.config.bytes[0x04] = 0xff;
        assert_eq!(f.restore(&bad), Err(PciConfigError::ReadOnly(0x04)));
        assert_eq!(f.state(), fresh);
        assert!(serde_json::from_str::<I440fxState>(r#"{"config":{"bytes":[]},"x":1}"#).is_err());
    }
}
