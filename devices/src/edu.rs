//! QEMU's educational PCI device (`-device edu`, 1234:11e8), as its specification
//! (QEMU's docs/specs/edu.rst) describes it: a 1 MiB memory BAR with an identification
//! register, a liveness check, a factorial unit, interrupt raise/acknowledge registers and a DMA
//! engine with a 4 KiB buffer seen at 0x40000; INTA# or one MSI vector (64-bit, no masking).
//!
//! Differences from QEMU's model, all invisible to a driver that polls as the specification
//! says: the factorial and the DMA complete at once (QEMU uses a thread and a 100 ms timer),
//! so the "computing" and "DMA running" bits read as 0 by the time the guest looks. A DMA
//! transfer whose device-side range lies outside the buffer is ignored (QEMU aborts), and one
//! the IOMMU blocks or that points outside guest RAM stops where it failed (the IOMMU records
//! its fault); either way the command completes and raises its interrupt if asked.
//!
//! Lock order: the device's mutex (under the PCI bus's) → its DMA space (the IOMMU) and its
//! interrupt line (the IOAPIC) or MSI target (the IOMMU).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::intel_iommu::DmaSpace;
use crate::pci::{PciConfig, PciConfigError, PciConfigState, PciDevice, COMMAND_INTX_DISABLE};
use crate::{fill_le, le_value, MsiTarget, SharedIrq};

/// QEMU's vendor ID.
pub const VENDOR_ID: u16 = 0x1234;
/// The edu device ID.
pub const DEVICE_ID: u16 = 0x11e8;
/// BAR 0's size.
pub const BAR_SIZE: u64 = 1 << 20;
/// Where the DMA buffer appears in the device's address space.
pub const DMA_START: u64 = 0x40000;
/// The DMA buffer's size.
pub const DMA_SIZE: u64 = 4096;

const ID: u32 = 0x0100_00ed;
const STATUS_IRQ_FACT: u32 = 0x80;
const CMD_START: u64 = 0x1;
const CMD_FROM_DEVICE: u64 = 0x2;
const CMD_IRQ: u64 = 0x4;
const IRQ_FACT: u32 = 0x1;
const IRQ_DMA: u32 = 0x100;

const MSI_CAP_ID: u8 = 0x05;
const MSI_ENABLE: u16 = 1;
const MSI_64BIT: u16 = 1 << 7;

/// Errors restoring the device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EduStateError {
    /// The configuration space does not fit this device.
    #[error("edu: {0}")]
    Config(#[source] PciConfigError),
    /// The DMA buffer is not 4 KiB.
    #[error("edu: dma buffer of {0} bytes (expected 4096)")]
    Buffer(usize),
    /// A DMA command still marked as running (transfers complete at once).
    #[error("edu: dma command {0:#x} still running")]
    DmaRunning(u64),
}

/// The guest-visible state of the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EduState {
    /// Configuration space.
    pub config: PciConfigState,
    /// The liveness register's last write.
    pub liveness: u32,
    /// The factorial register.
    pub factorial: u32,
    /// The status register.
    pub status: u32,
    /// The interrupt status register.
    pub irq_status: u32,
    /// DMA source, destination, count, command.
    pub dma: [u64; 4],
    /// The DMA buffer.
    pub buffer: Vec<u8>,
}

/// The edu device.
pub struct Edu {
    config: PciConfig,
    msi_cap: usize,
    bdf: u16,
    liveness: u32,
    factorial: u32,
    status: u32,
    irq_status: u32,
    dma: [u64; 4],
    buffer: Vec<u8>,
    intx: SharedIrq,
    msi: Arc<dyn MsiTarget>,
    dma_space: DmaSpace,
}

/// `n!` in 32 bits, wrapping (from 34! on the product has 32 factors of two: 0).
pub fn factorial(n: u32) -> u32 {
    if n >= 34 {
        return 0;
    }
    (1..=n).fold(1u32, |acc, k| acc.wrapping_mul(k))
}

impl Edu {
    /// A device at requester ID `bdf` (bus << 8 | device << 3 | function), with its INTA#
    /// line, its MSI target and its view of memory.
    pub fn new(bdf: u16, intx: SharedIrq, msi: Arc<dyn MsiTarget>, dma_space: DmaSpace) -> Self {
        let mut config = PciConfig::new(VENDOR_ID, DEVICE_ID, 0x00_ff_00, 0x10);
        config.set_subsystem(0x1af4, 0x1100);
        config.set_interrupt_pin(1);
        config.add_memory_bar(0, BAR_SIZE, false);
        // MSI: control (64-bit capable, one vector), address low/high, data.
        let body = [
            MSI_CAP_ID,
            0,
            MSI_64BIT as u8,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        let wmask = [
            0, 0, 0x71, 0, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        let msi_cap = config.add_capability(&body, &wmask);
        Self {
            config,
            msi_cap,
            bdf,
            liveness: 0,
            factorial: 1,
            status: 0,
            irq_status: 0,
            dma: [0; 4],
            buffer: vec![0; DMA_SIZE as usize],
            intx,
            msi,
            dma_space,
        }
    }

    fn msi_enabled(&self) -> bool {
        self.config.u16(self.msi_cap + 2) & MSI_ENABLE != 0
    }

    fn intx_level(&self) -> bool {
        !self.msi_enabled()
            && self.irq_status != 0
            && self.config.command() & COMMAND_INTX_DISABLE == 0
    }

    fn raise(&mut self, bits: u32) {
        self.irq_status |= bits;
        if self.irq_status == 0 {
            return;
        }
        if self.msi_enabled() {
            let c = self.msi_cap;
            let address =
                u64::from(self.config.u32(c + 4)) | u64::from(self.config.u32(c + 8)) << 32;
            let data = u32::from(self.config.u16(c + 12));
            self.msi.deliver(Some(self.bdf), address, data);
        } else {
            self.intx.set_level(self.intx_level());
        }
    }

    fn ack(&mut self, bits: u32) {
        self.irq_status &= !bits;
        if !self.msi_enabled() {
            self.intx.set_level(self.intx_level());
        }
    }

    fn run_dma(&mut self) {
        let [src, dst, count, cmd] = self.dma;
        let from_device = cmd & CMD_FROM_DEVICE != 0;
        let (dev_addr, ram_addr) = if from_device { (src, dst) } else { (dst, src) };
        let in_buffer = dev_addr
            .checked_sub(DMA_START)
            .zip(dev_addr.checked_add(count))
            .filter(|&(off, end)| off < DMA_SIZE && end <= DMA_START + DMA_SIZE);
        match in_buffer {
            None => log::warn!(
                "edu: dma of {count:#x} bytes at device address {dev_addr:#x} is outside \
                 its buffer: ignored"
            ),
            Some((off, _)) => {
                let range = off as usize..(off + count) as usize;
                let mastering = self.config.command() & crate::pci::COMMAND_MASTER != 0;
                let result = if !mastering {
                    log::debug!("edu: dma with bus mastering off: ignored");
                    Ok(())
                } else if from_device {
                    self.dma_space
                        .write(self.bdf, ram_addr, &self.buffer[range])
                } else {
                    self.dma_space
                        .read(self.bdf, ram_addr, &mut self.buffer[range])
                };
                if let Err(e) = result {
                    log::warn!("edu: dma at {ram_addr:#x}: {e}");
                }
            }
        }
        self.dma[3] &= !CMD_START;
        if cmd & CMD_IRQ != 0 {
            self.raise(IRQ_DMA);
        }
    }

    fn mmio_read(&mut self, offset: u64, len: usize) -> u64 {
        if len != 4 && (offset < 0x80 || len != 8) {
            return u64::MAX;
        }
        match offset {
            0x00 => u64::from(ID),
            0x04 => u64::from(!self.liveness),
            0x08 => u64::from(self.factorial),
            0x20 => u64::from(self.status),
            0x24 => u64::from(self.irq_status),
            0x80 | 0x88 | 0x90 | 0x98 => self.dma[((offset - 0x80) / 8) as usize],
            _ => u64::MAX,
        }
    }

    fn mmio_write(&mut self, offset: u64, len: usize, v: u64) {
        if len != 4 && (offset < 0x80 || len != 8) {
            return;
        }
        let v32 = v as u32;
        // The factorial and DMA complete within the write: "computing" and "DMA running"
        // are never set when the next write comes.
        match offset {
            0x04 => self.liveness = v32,
            0x08 => {
                self.factorial = factorial(v32);
                if self.status & STATUS_IRQ_FACT != 0 {
                    self.raise(IRQ_FACT);
                }
            }
            0x20 => self.status = v32 & STATUS_IRQ_FACT,
            0x60 => self.raise(v32),
            0x64 => self.ack(v32),
            0x80 | 0x88 | 0x90 => self.dma[((offset - 0x80) / 8) as usize] = v,
            0x98 => {
                self.dma[3] = v;
                if v & CMD_START != 0 {
                    self.run_dma();
                }
            }
            _ => {}
        }
    }

    /// A snapshot of the guest-visible state.
    pub fn state(&self) -> EduState {
        EduState {
            config: self.config.state(),
            liveness: self.liveness,
            factorial: self.factorial,
            status: self.status,
            irq_status: self.irq_status,
            dma: self.dma,
            buffer: self.buffer.clone(),
        }
    }

    /// Applies a saved state (checked first; nothing changes on error).
    pub fn restore(&mut self, s: &EduState) -> Result<(), EduStateError> {
        self.config
            .check(&s.config)
            .map_err(EduStateError::Config)?;
        if s.buffer.len() != DMA_SIZE as usize {
            return Err(EduStateError::Buffer(s.buffer.len()));
        }
        if s.dma[3] & CMD_START != 0 {
            return Err(EduStateError::DmaRunning(s.dma[3]));
        }
        self.config
            .restore(&s.config)
            .map_err(EduStateError::Config)?;
        self.liveness = s.liveness;
        self.factorial = s.factorial;
        self.status = s.status & STATUS_IRQ_FACT;
        self.irq_status = s.irq_status;
        self.dma = s.dma;
        self.buffer.copy_from_slice(&s.buffer);
        self.intx.set_level(self.intx_level());
        Ok(())
    }
}

impl PciDevice for Edu {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, _offset: usize, _len: usize) {
        // MSI enable and INTx disable both change what the INTx line shows.
        self.intx.set_level(self.intx_level());
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        let v = self.mmio_read(offset, data.len());
        fill_le(data, v);
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        self.mmio_write(offset, data.len(), le_value(data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intel_iommu::tests::{iommu, setup_tables, TestRam};
    use crate::ioapic::tests::RecordingMsi;
    use crate::testutil::RecordingIrq;
    use crate::{BusDevice, GuestRam};
    use std::sync::Mutex;

    fn edu(
        iommu: Option<Arc<Mutex<crate::intel_iommu::IntelIommu>>>,
        ram: &Arc<TestRam>,
    ) -> (Arc<RecordingIrq>, Arc<RecordingMsi>, Edu) {
        let (irq, shared) = RecordingIrq::new();
        let msi = Arc::new(RecordingMsi::default());
        let mut e = Edu::new(
            3 << 3,
            shared,
            msi.clone(),
            DmaSpace::new(ram.clone(), iommu),
        );
        e.config_mut().write(0x04, &[0x06, 0]); // memory + bus master
        (irq, msi, e)
    }

    fn w(e: &mut Edu, off: u64, v: u64, len: usize) {
        e.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn r(e: &mut Edu, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        e.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    #[test]
    fn registers() {
        let ram = TestRam::new();
        let (_, _, mut e) = edu(None, &ram);
        assert_eq!(e.config().read_dword(0), 0x11e8_1234);
        assert_eq!(r(&mut e, 0, 4), 0x0100_00ed);
        assert_eq!(
            r(&mut e, 0, 2),
            0xffff,
            "registers below 0x80 are 32-bit only"
        );
        w(&mut e, 4, 0x1234, 4);
        assert_eq!(r(&mut e, 4, 4), 0xffff_edcb);
        w(&mut e, 8, 5, 4);
        assert_eq!(r(&mut e, 8, 4), 120);
        w(&mut e, 8, 13, 4);
        assert_eq!(r(&mut e, 8, 4), u64::from(factorial(12).wrapping_mul(13)));
        w(&mut e, 8, u32::MAX.into(), 4);
        assert_eq!(r(&mut e, 8, 4), 0);
        assert_eq!(r(&mut e, 0x20, 4), 0);
        w(&mut e, 0x80, 0x1234_5678_9abc, 8);
        assert_eq!(r(&mut e, 0x80, 8), 0x1234_5678_9abc);
        assert_eq!(r(&mut e, 0x1000, 4), 0xffff_ffff);
        assert_eq!(factorial(0), 1);
        assert_eq!(factorial(34), 0);
        assert_ne!(factorial(33), 0);
    }

    #[test]
    fn intx_and_msi() {
        let ram = TestRam::new();
        let (irq, msi, mut e) = edu(None, &ram);
        w(&mut e, 0x60, 1, 4);
        assert!(irq.level());
        assert_eq!(r(&mut e, 0x24, 4), 1);
        w(&mut e, 0x64, 1, 4);
        assert!(!irq.level());
        // Factorial interrupt.
        w(&mut e, 0x20, 0x80, 4);
        w(&mut e, 8, 3, 4);
        assert_eq!(r(&mut e, 0x24, 4), IRQ_FACT as u64);
        assert!(irq.level());
        w(&mut e, 0x64, 1, 4);
        // INTx disable.
        e.config_mut().write(0x04, &[0x06, 0x04]);
        e.config_written(4, 2);
        w(&mut e, 0x60, 2, 4);
        assert!(!irq.level());
        w(&mut e, 0x64, 2, 4);
        // MSI: address 0xfee00010, data 0x41.
        let c = e.msi_cap;
        e.config_mut().write(c + 4, &0xfee0_0010u32.to_le_bytes());
        e.config_mut().write(c + 12, &0x41u16.to_le_bytes());
        e.config_mut().write(c + 2, &[1]);
        e.config_written(c + 2, 1);
        w(&mut e, 0x60, 4, 4);
        assert_eq!(*msi.sent.lock().unwrap(), [(0xfee0_0010, 0x41)]);
        assert!(!irq.level());
    }

    #[test]
    fn dma_through_the_iommu() {
        let ram = TestRam::new();
        let (_, mut i) = iommu(&ram);
        setup_tables(&ram, &mut i);
        let i = Arc::new(Mutex::new(i));
        let (irq, _, mut e) = edu(Some(i.clone()), &ram);
        ram.put(0x8000, 0x1234_5678);
        // IOVA 0 → buffer offset 0, then buffer → IOVA 4 (both in page 0x8000).
        for (src, dst, cmd) in [(0, DMA_START, 1), (DMA_START, 4, 3 | 4)] {
            w(&mut e, 0x80, src, 8);
            w(&mut e, 0x88, dst, 8);
            w(&mut e, 0x90, 4, 8);
            w(&mut e, 0x98, cmd, 4);
            assert_eq!(r(&mut e, 0x98, 4) & 1, 0, "done");
        }
        let mut b = [0u8; 8];
        assert!(ram.read(0x8000, &mut b));
        assert_eq!(u64::from_le_bytes(b), 0x1234_5678_1234_5678);
        assert_eq!(r(&mut e, 0x24, 4), IRQ_DMA as u64);
        assert!(irq.level());
        // To a read-only IOVA: blocked, fault recorded, nothing written, no panic.
        w(&mut e, 0x80, DMA_START, 8);
        w(&mut e, 0x88, 0x1000, 8);
        w(&mut e, 0x98, 3, 4);
        assert!(ram.read(0x9000, &mut b));
        assert_eq!(b, [0; 8]);
        let mut f = [0u8; 4];
        i.lock().unwrap().read(0x34, &mut f);
        assert_eq!(f[0] & 2, 2, "primary fault pending");
        // Outside the buffer: ignored.
        w(&mut e, 0x80, DMA_START + 4000, 8);
        w(&mut e, 0x90, 200, 8);
        w(&mut e, 0x98, 3, 4);
        w(&mut e, 0x80, u64::MAX, 8);
        w(&mut e, 0x98, 3, 4);
        assert_eq!(r(&mut e, 0x98, 4) & 1, 0);
    }

    #[test]
    fn random_accesses_never_panic() {
        let ram = TestRam::new();
        let (_, mut i) = iommu(&ram);
        setup_tables(&ram, &mut i);
        let (_, _, mut e) = edu(Some(Arc::new(Mutex::new(i))), &ram);
        let mut r = crate::intel_iommu::tests::XorShift(0xdead_beef_cafe_f00d);
        for _ in 0..20_000 {
            let off = if r.next() % 2 == 0 {
                0x80 + r.next() % 0x20
            } else {
                r.next() % BAR_SIZE
            };
            let len = 1 << (r.next() % 4);
            let v = match r.next() % 3 {
                0 => DMA_START + r.next() % 0x1100,
                1 => r.next() % 0x3000,
                _ => r.next(),
            };
            e.bar_write(0, off, &v.to_le_bytes()[..len]);
            let mut b = [0u8; 8];
            e.bar_read(0, r.next() % BAR_SIZE, &mut b[..len]);
            e.config_mut()
                .write((r.next() % 0x100) as usize, &v.to_le_bytes()[..len]);
            e.config_written(0, 4);
        }
    }

    #[test]
    fn save_restore_and_rejects() {
        let ram = TestRam::new();
        let (_, _, mut e) = edu(None, &ram);
        w(&mut e, 4, 7, 4);
        w(&mut e, 0x60, 1, 4);
        e.buffer[5] = 9;
        let s: EduState =
            serde_json::from_str(&serde_json::to_string(&e.state()).unwrap()).unwrap();
        let (irq, _, mut d) = edu(None, &ram);
        d.restore(&s).unwrap();
        assert_eq!(d.state(), s);
        assert!(irq.level());
        let mut bad = s.clone();
        bad.buffer.pop();
        assert_eq!(d.restore(&bad), Err(EduStateError::Buffer(4095)));
        let mut bad = s.clone();
        bad.dma[3] = 1;
        assert_eq!(d.restore(&bad), Err(EduStateError::DmaRunning(1)));
        let mut bad = s;
        bad.config.bytes[0] = 0;
        assert!(matches!(d.restore(&bad), Err(EduStateError::Config(_))));
    }
}
