//! The ACPI PM1 event and control registers of PIIX4's power-management block (ports
//! 0x600–0x605), which the FADT points the guest at.
//!
//! Status bits are write-1-to-clear and the enable register masks them; the machine is always
//! in ACPI mode, so SCI_EN reads as 1. Writing SLP_EN with SLP_TYP 0 (the DSDT's `\_S5_`) powers
//! the machine off; SLP_TYP 1 (`\_S3_`) suspends it to RAM: the VMM stops the vCPUs and, when
//! a wake event comes (the RTC alarm with RTC_EN set, or QMP `system_wakeup`), resets them and
//! enters the FACS waking vector as firmware would, with WAK_STS set here.

use serde::{Deserialize, Serialize};

use crate::{fill_le, le_value, BusDevice, VmRequest};

/// PM1 control: SCI_EN.
const SCI_EN: u16 = 1 << 0;
/// PM1 control: SLP_EN (write-only: starts the sleep).
const SLP_EN: u16 = 1 << 13;
/// PM1 control: the SLP_TYP field.
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 7 << SLP_TYP_SHIFT;
/// SLP_TYP that means soft-off (the DSDT's `\_S5_`).
const SLP_TYP_S5: u16 = 0;
/// SLP_TYP that means suspend to RAM (the DSDT's `\_S3_`).
const SLP_TYP_S3: u16 = 1;
/// PM1 status: WAK_STS, set when the machine wakes.
const WAK_STS: u16 = 1 << 15;
/// PM1 status / enable: the RTC alarm (RTC_STS / RTC_EN).
const RTC_BIT: u16 = 1 << 10;

/// Everything the guest can observe of the PM1 block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcpiPmState {
    /// PM1 status (offset 0).
    pub status: u16,
    /// PM1 enable (offset 2).
    pub enable: u16,
    /// PM1 control (offset 4), without SLP_EN.
    pub control: u16,
}

/// Why an [`AcpiPmState`] cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcpiPmStateError {
    /// PM1 status has bits that the device never sets.
    #[error("pm1 status {0:#06x} has bits the device never sets")]
    Status(u16),
    /// PM1 control lacks SCI_EN or holds SLP_EN.
    #[error("pm1 control {0:#06x} lacks SCI_EN or holds SLP_EN")]
    Control(u16),
}

/// PM1a event (status, enable) and control registers, registered at 0x600 with length 6.
#[derive(Debug, Default)]
pub struct AcpiPm {
    s: AcpiPmState,
}

impl AcpiPm {
    /// The registers after power-on: SCI_EN set.
    pub fn new() -> Self {
        Self {
            s: AcpiPmState {
                control: SCI_EN,
                ..Default::default()
            },
        }
    }

    /// The guest-visible state.
    pub fn state(&self) -> AcpiPmState {
        self.s.clone()
    }

    /// Restores a state from [`AcpiPm::state`].
    ///
    /// Status bits other than WAK_STS and RTC_STS, or a control word without SCI_EN or with
    /// SLP_EN (which never reads back), are rejected and the device is left as it was.
    pub fn restore(&mut self, state: &AcpiPmState) -> Result<(), AcpiPmStateError> {
        if state.status & !(WAK_STS | RTC_BIT) != 0 {
            return Err(AcpiPmStateError::Status(state.status));
        }
        if state.control & SCI_EN == 0 || state.control & SLP_EN != 0 {
            return Err(AcpiPmStateError::Control(state.control));
        }
        self.s = state.clone();
        Ok(())
    }

    /// Whether the guest enabled waking up on the RTC alarm (PM1_EN.RTC_EN).
    pub fn rtc_wake_enabled(&self) -> bool {
        self.s.enable & RTC_BIT != 0
    }

    /// The machine woke from a sleep state: WAK_STS, and RTC_STS when the alarm woke it.
    pub fn wake(&mut self, by_rtc: bool) {
        self.s.status |= WAK_STS | if by_rtc { RTC_BIT } else { 0 };
    }

    fn regs(&self) -> [u8; 6] {
        let mut r = [0u8; 6];
        r[0..2].copy_from_slice(&self.s.status.to_le_bytes());
        r[2..4].copy_from_slice(&self.s.enable.to_le_bytes());
        r[4..6].copy_from_slice(&self.s.control.to_le_bytes());
        r
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.regs();
        let mut value = 0u64;
        for (i, b) in (offset..offset + data.len() as u64).enumerate() {
            let byte = regs.get(b as usize).copied().unwrap_or(0);
            value |= u64::from(byte) << (8 * i);
        }
        fill_le(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let value = le_value(data);
        let mut request = None;
        for (i, addr) in (offset..offset + data.len() as u64).enumerate() {
            let byte = (value >> (8 * i)) as u8;
            let (reg, shift) = (addr / 2, (addr % 2) * 8);
            let bits = u16::from(byte) << shift;
            match reg {
                0 => self.s.status &= !bits,
                1 => self.s.enable = (self.s.enable & !(0xff << shift)) | bits,
                2 => {
                    let control = (self.s.control & !(0xff << shift)) | bits;
                    self.s.control = (control & !SLP_EN) | SCI_EN;
                    if control & SLP_EN != 0 {
                        let typ = (control & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
                        match typ {
                            SLP_TYP_S5 => request = Some(VmRequest::PowerOff),
                            SLP_TYP_S3 => request = Some(VmRequest::Suspend),
                            _ => log::warn!("acpi sleep type {typ} is not in the dsdt: ignored"),
                        }
                    }
                }
                _ => {}
            }
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_power_off() {
        let mut pm = AcpiPm::new();
        let mut d = [0u8; 2];
        pm.read(4, &mut d);
        assert_eq!(u16::from_le_bytes(d), SCI_EN);
        assert_eq!(pm.write(2, &0x0121u16.to_le_bytes()), None);
        pm.read(2, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0x0121);
        // S3: suspend; the VMM wakes the machine later.
        assert_eq!(
            pm.write(4, &(SLP_EN | (1 << SLP_TYP_SHIFT)).to_le_bytes()),
            Some(VmRequest::Suspend)
        );
        pm.write(2, &RTC_BIT.to_le_bytes());
        assert!(pm.rtc_wake_enabled());
        pm.wake(true);
        pm.read(0, &mut d);
        assert_eq!(u16::from_le_bytes(d), WAK_STS | RTC_BIT);
        // Write 1 to clear.
        pm.write(0, &(WAK_STS | RTC_BIT).to_le_bytes());
        pm.read(0, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0);
        // S5: power off, also through a byte write of the high half.
        assert_eq!(
            pm.write(5, &[(SLP_EN >> 8) as u8]),
            Some(VmRequest::PowerOff)
        );
    }

    #[test]
    fn state_round_trip() {
        let mut pm = AcpiPm::new();
        pm.write(2, &0x0400u16.to_le_bytes());
        let mut fresh = AcpiPm::new();
        fresh.restore(&pm.state()).unwrap();
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        pm.read(2, &mut a);
        fresh.read(2, &mut b);
        assert_eq!(a, b);
        assert_eq!(fresh.state(), pm.state());
    }

    #[test]
    fn restore_rejects_invalid_state() {
        let mut pm = AcpiPm::new();
        let good = pm.state();
        for (bad, want) in [
            (
                AcpiPmState {
                    status: 1,
                    ..good.clone()
                },
                AcpiPmStateError::Status(1),
            ),
            (
                AcpiPmState {
                    control: 0,
                    ..good.clone()
                },
                AcpiPmStateError::Control(0),
            ),
            (
                AcpiPmState {
                    control: SCI_EN | SLP_EN,
                    ..good.clone()
                },
                AcpiPmStateError::Control(SCI_EN | SLP_EN),
            ),
        ] {
            assert_eq!(pm.restore(&bad), Err(want));
            assert_eq!(pm.state(), good);
        }
    }
}
