//! QEMU's PCI test device (`-device pci-testdev`, 1b36:0005), the one kvm-unit-tests' `pci`
//! and `vmexit` tests drive: a 4 KiB memory BAR 0 and a 256-port I/O BAR 1, each showing the
//! header of the selected test:
//!
//! | offset | field |
//! |---|---|
//! | 0 | `test` (write: select test *n* of this BAR's type; read: the test's global index) |
//! | 1 | `width` of the writes to make (1) |
//! | 4 | `offset` (u32) in the BAR where to write |
//! | 8 | `data` to write |
//! | 12 | `count` (u32) of the writes the device saw |
//! | 16 | `name`, NUL-terminated |
//!
//! Six tests, three per BAR, named as QEMU names them: `mmio-no-eventfd`,
//! `mmio-wildcard-eventfd`, `mmio-datamatch-eventfd`, `portio-no-eventfd`,
//! `portio-wildcard-eventfd`, `portio-datamatch-eventfd`. "no-eventfd" counts the writes of
//! `data` at `offset` in the device; the eventfd tests register a KVM ioeventfd there (any
//! write, or 1-byte writes of `data`) through [`IoEventFds`], so those writes never leave the
//! kernel and `count` stays 0 — writes the ioeventfd does not catch reach the device and count.
//! Like QEMU's, the device handles every access one byte at a time (a wider write is a
//! sequence of byte writes), a test number of 3 or more deselects the test, and with no test
//! selected every read returns 0. Selecting a test resets its count.
//!
//! Difference from QEMU: its wildcard ioeventfd catches 1-byte writes only; hopvm's (KVM's
//! length-0 ioeventfd, what kvm-ioctls registers without a datamatch) catches writes of any
//! width. The guests of both only write bytes.
//!
//! Lock order: the device's mutex (under the PCI bus's) → the [`IoEventFds`] registry.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::pci::{PciConfig, PciConfigError, PciConfigState, PciDevice};
use crate::{IoEvent, IoEventFds, IoSpace};

/// Red Hat's vendor ID.
pub const VENDOR_ID: u16 = 0x1b36;
/// The test device's ID.
pub const DEVICE_ID: u16 = 0x0005;
/// BAR 0's size (memory).
pub const MEM_BAR_SIZE: u64 = 4096;
/// BAR 1's size (I/O ports).
pub const IO_BAR_SIZE: u64 = 256;
/// How many tests each BAR offers.
pub const TESTS_PER_BAR: u8 = 3;
/// The tests' names, by global index (BAR 0's first).
pub const TEST_NAMES: [&str; 6] = [
    "mmio-no-eventfd",
    "mmio-wildcard-eventfd",
    "mmio-datamatch-eventfd",
    "portio-no-eventfd",
    "portio-wildcard-eventfd",
    "portio-datamatch-eventfd",
];

const DATAMATCH: u8 = 0xfa;
const NOMATCH: u8 = 0xce;
const HEADER_SIZE: usize = 16;
const COUNT: usize = 12;

/// Errors restoring the device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciTestdevStateError {
    /// The configuration space does not fit this device.
    #[error("pci-testdev: {0}")]
    Config(#[source] PciConfigError),
    /// A test index past the last.
    #[error("pci-testdev: test {0} does not exist (0-5)")]
    Test(u8),
    /// A count with no test selected.
    #[error("pci-testdev: count {0} with no test selected")]
    Count(u32),
}

/// The guest-visible state of the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciTestdevState {
    /// Configuration space.
    pub config: PciConfigState,
    /// The selected test's global index (0–5), if any.
    pub test: Option<u8>,
    /// Its count of writes.
    pub count: u32,
}

/// The test at global index `t`: what its header says.
struct Test {
    space: IoSpace,
    offset: u32,
    data: u8,
    wildcard: bool,
    eventfd: bool,
}

fn test(t: u8) -> Test {
    let mem = t < TESTS_PER_BAR;
    let kind = t % TESTS_PER_BAR;
    let base = if mem {
        MEM_BAR_SIZE / 2
    } else {
        IO_BAR_SIZE / 2
    };
    Test {
        space: if mem { IoSpace::Mmio } else { IoSpace::Pio },
        offset: base as u32 + u32::from(t),
        data: if kind == 1 { NOMATCH } else { DATAMATCH },
        wildcard: kind == 1,
        eventfd: kind != 0,
    }
}

/// The PCI test device.
pub struct PciTestdev {
    config: PciConfig,
    test: Option<u8>,
    count: u32,
    ioevents: Option<Arc<dyn IoEventFds>>,
    registered: Option<IoEvent>,
}

impl PciTestdev {
    /// A device whose eventfd tests register through `ioevents` (`None`: the device counts
    /// those writes itself).
    pub fn new(ioevents: Option<Arc<dyn IoEventFds>>) -> Self {
        // Class 0xff (unassigned), no interrupt pin, as QEMU's.
        let mut config = PciConfig::new(VENDOR_ID, DEVICE_ID, 0xff_00_00, 0);
        config.set_subsystem(0x1af4, 0x1100);
        config.add_memory_bar(0, MEM_BAR_SIZE, false);
        config.add_io_bar(1, IO_BAR_SIZE);
        Self {
            config,
            test: None,
            count: 0,
            ioevents,
            registered: None,
        }
    }

    /// The selected test's name and count, if any.
    pub fn current(&self) -> Option<(&'static str, u32)> {
        self.test.map(|t| (TEST_NAMES[usize::from(t)], self.count))
    }

    /// The ioeventfd registered now, if any.
    pub fn registered(&self) -> Option<IoEvent> {
        self.registered
    }

    /// The ioeventfd the selected test wants where its BAR is decoded now.
    fn wanted(&self) -> Option<IoEvent> {
        let t = test(self.test?);
        if !t.eventfd {
            return None;
        }
        let bar = if t.space == IoSpace::Mmio { 0 } else { 1 };
        let base = self.config.bar_decoded(bar)?;
        Some(IoEvent {
            space: t.space,
            addr: base + u64::from(t.offset),
            datamatch: (!t.wildcard).then_some(t.data),
        })
    }

    /// Moves the ioeventfd to where the selected test and its BAR want it (or removes it).
    fn sync_ioevents(&mut self) {
        let Some(reg) = self.ioevents.clone() else {
            return;
        };
        let want = self.wanted();
        if want == self.registered {
            return;
        }
        if let Some(old) = self.registered.take() {
            if let Err(e) = reg.remove(old) {
                log::warn!(
                    "pci-testdev: cannot remove the ioeventfd at {:#x}: {e}",
                    old.addr
                );
            }
        }
        if let Some(new) = want {
            match reg.add(new) {
                Ok(()) => self.registered = Some(new),
                Err(e) => log::warn!(
                    "pci-testdev: cannot register an ioeventfd at {:#x} ({e}): the device counts \
                     those writes",
                    new.addr
                ),
            }
        }
    }

    /// Deselects the test (a machine reset, or a test number past the last).
    pub fn reset(&mut self) {
        self.test = None;
        self.count = 0;
        self.sync_ioevents();
    }

    fn header_byte(&self, addr: u64) -> u8 {
        let Some(t) = self.test else {
            return 0;
        };
        let name = TEST_NAMES[usize::from(t)].as_bytes();
        let h = test(t);
        let Ok(addr) = usize::try_from(addr) else {
            return 0;
        };
        // QEMU returns 0 from the buffer's last byte (the name's NUL) on.
        if addr >= HEADER_SIZE + name.len() {
            return 0;
        }
        match addr {
            0 => t,
            1 => 1,
            4..=7 => h.offset.to_le_bytes()[addr - 4],
            8 => h.data,
            COUNT..=15 => self.count.to_le_bytes()[addr - COUNT],
            HEADER_SIZE.. => name[addr - HEADER_SIZE],
            _ => 0,
        }
    }

    fn byte_write(&mut self, space: IoSpace, addr: u64, v: u8) {
        if addr == 0 {
            self.test = None;
            self.count = 0;
            if v < TESTS_PER_BAR {
                let first = if space == IoSpace::Mmio {
                    0
                } else {
                    TESTS_PER_BAR
                };
                self.test = Some(first + v);
            }
            self.sync_ioevents();
            return;
        }
        let Some(t) = self.test.map(test) else {
            return;
        };
        if addr != u64::from(t.offset) || (!t.wildcard && v != t.data) {
            return;
        }
        self.count = self.count.wrapping_add(1);
    }

    /// A snapshot of the guest-visible state.
    pub fn state(&self) -> PciTestdevState {
        PciTestdevState {
            config: self.config.state(),
            test: self.test,
            count: self.count,
        }
    }

    /// Applies a saved state (checked first; nothing changes on error) and registers the
    /// ioeventfd its test wants.
    pub fn restore(&mut self, s: &PciTestdevState) -> Result<(), PciTestdevStateError> {
        self.config
            .check(&s.config)
            .map_err(PciTestdevStateError::Config)?;
        match s.test {
            Some(t) if usize::from(t) >= TEST_NAMES.len() => {
                return Err(PciTestdevStateError::Test(t))
            }
            None if s.count != 0 => return Err(PciTestdevStateError::Count(s.count)),
            _ => {}
        }
        self.config
            .restore(&s.config)
            .map_err(PciTestdevStateError::Config)?;
        self.test = s.test;
        self.count = s.count;
        self.sync_ioevents();
        Ok(())
    }
}

impl Drop for PciTestdev {
    fn drop(&mut self) {
        self.test = None;
        self.sync_ioevents();
    }
}

impl PciDevice for PciTestdev {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, _offset: usize, _len: usize) {
        // A BAR moved or decoding was switched: the ioeventfd follows.
        self.sync_ioevents();
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.header_byte(offset.saturating_add(i as u64));
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let space = if bar == 0 {
            IoSpace::Mmio
        } else {
            IoSpace::Pio
        };
        for (i, &v) in data.iter().enumerate() {
            self.byte_write(space, offset.saturating_add(i as u64), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{PciBus, COMMAND, PCI_IO_BASE, PCI_MMIO_BASE};
    use std::sync::Mutex;

    /// Records the registered ioeventfds; refuses them when `fail` is set.
    #[derive(Default)]
    struct Registry {
        live: Mutex<Vec<IoEvent>>,
        fail: bool,
    }

    impl IoEventFds for Registry {
        fn add(&self, e: IoEvent) -> std::io::Result<()> {
            if self.fail {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let mut l = self.live.lock().unwrap();
            assert!(!l.contains(&e), "registered twice");
            l.push(e);
            Ok(())
        }
        fn remove(&self, e: IoEvent) -> std::io::Result<()> {
            let mut l = self.live.lock().unwrap();
            let i = l.iter().position(|x| *x == e).expect("not registered");
            l.remove(i);
            Ok(())
        }
    }

    fn placed(reg: Option<Arc<dyn IoEventFds>>) -> PciTestdev {
        let mut d = PciTestdev::new(reg);
        d.config_mut().set_bar_address(0, PCI_MMIO_BASE);
        d.config_mut().set_bar_address(1, PCI_IO_BASE);
        d.config_mut().write(COMMAND, &[0x3, 0]);
        d.config_written(COMMAND, 2);
        d
    }

    fn rb(d: &mut PciTestdev, bar: usize, off: u64) -> u8 {
        let mut b = [0u8];
        d.bar_read(bar, off, &mut b);
        b[0]
    }

    fn r32(d: &mut PciTestdev, bar: usize, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(bar, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn name(d: &mut PciTestdev, bar: usize) -> String {
        (16..)
            .map(|o| rb(d, bar, o))
            .take_while(|&c| c != 0)
            .map(char::from)
            .collect()
    }

    /// Runs test `n` of `bar` as a guest would: select, read the header, write `data` at
    /// `offset` 16 times; the name and final count.
    fn run(d: &mut PciTestdev, bar: usize, n: u8) -> (String, u32, u8, u32) {
        d.bar_write(bar, 0, &[n]);
        assert_eq!(r32(d, bar, 12), 0, "count reset");
        let width = rb(d, bar, 1);
        let data = rb(d, bar, 8);
        let off = r32(d, bar, 4);
        for _ in 0..16 {
            d.bar_write(bar, off.into(), &[data]);
        }
        (name(d, bar), r32(d, bar, 12), width, off)
    }

    #[test]
    fn ids_and_bars() {
        let mut bus = PciBus::new_pc();
        let d = Arc::new(Mutex::new(PciTestdev::new(None)));
        assert!(bus.insert(3, d.clone()));
        let io_end = bus.assign_resources();
        assert_eq!(io_end, PCI_IO_BASE + IO_BAR_SIZE);
        assert_eq!(bus.config_read(3, 0, 0), 0x0005_1b36);
        assert_eq!(bus.config_read(3, 0, 2) >> 8, 0xff_00_00);
        assert_eq!(bus.config_read(3, 0, 0x3c / 4) >> 8 & 0xff, 0, "no pin");
        assert_eq!(bus.config_read(3, 0, 4), PCI_MMIO_BASE as u32);
        assert_eq!(bus.config_read(3, 0, 5), PCI_IO_BASE as u32 | 1);
        // Sizing the I/O BAR.
        bus.config_write(3, 0, 0x14, &u32::MAX.to_le_bytes());
        assert_eq!(bus.config_read(3, 0, 5), !(IO_BAR_SIZE as u32 - 1) | 1);
        bus.config_write(3, 0, 0x14, &(0xd000u32).to_le_bytes());
        // Through the bus: the I/O BAR at its new place, the memory BAR.
        let mut b = [0u8; 1];
        assert!(bus.io_write(0xd000, &[0]));
        assert!(bus.io_read(0xd010, &mut b));
        assert_eq!(b[0], b'p');
        assert!(!bus.io_read(PCI_IO_BASE, &mut b), "moved away");
        assert!(bus.mmio_write(PCI_MMIO_BASE, &[2]));
        assert!(bus.mmio_read(PCI_MMIO_BASE + 16, &mut b));
        assert_eq!(b[0], b'm');
        // I/O decode off.
        bus.config_write(3, 0, 4, &[0x2, 0]);
        assert!(!bus.io_read(0xd000, &mut b));
    }

    #[test]
    fn every_test_counts_in_the_device_without_ioeventfds() {
        let mut d = placed(None);
        for (bar, base) in [(0usize, 2048u32), (1, 128)] {
            for n in 0..3u8 {
                let g = usize::from(n) + 3 * bar;
                let (name, count, width, off) = run(&mut d, bar, n);
                assert_eq!(name, TEST_NAMES[g]);
                assert_eq!((count, width, off), (16, 1, base + g as u32));
                assert_eq!(rb(&mut d, bar, 0), g as u8, "test reads its global index");
                assert_eq!(d.current(), Some((TEST_NAMES[g], 16)));
            }
        }
    }

    #[test]
    fn eventfd_tests_register_and_follow_the_bar() {
        let reg = Arc::new(Registry::default());
        let mut d = placed(Some(reg.clone()));
        let live = |r: &Registry| r.live.lock().unwrap().clone();
        run(&mut d, 0, 0);
        assert!(live(&reg).is_empty(), "no-eventfd registers nothing");
        // Writes the registry takes never reach the device in a VM; here they do, and count.
        run(&mut d, 0, 1);
        let wild = IoEvent {
            space: IoSpace::Mmio,
            addr: PCI_MMIO_BASE + 2049,
            datamatch: None,
        };
        assert_eq!(live(&reg), [wild]);
        run(&mut d, 1, 2);
        let dm = IoEvent {
            space: IoSpace::Pio,
            addr: PCI_IO_BASE + 133,
            datamatch: Some(0xfa),
        };
        assert_eq!(live(&reg), [dm]);
        // The BAR moves: so does the ioeventfd; decode off removes it.
        d.config_mut().write(0x14, &0xd001u32.to_le_bytes());
        d.config_written(0x14, 4);
        assert_eq!(live(&reg)[0].addr, 0xd000 + 133);
        d.config_mut().write(COMMAND, &[0x2, 0]);
        d.config_written(COMMAND, 2);
        assert!(live(&reg).is_empty());
        d.config_mut().write(COMMAND, &[0x3, 0]);
        d.config_written(COMMAND, 2);
        assert_eq!(live(&reg).len(), 1);
        // A bad test number deselects; a reset too; dropping the device unregisters.
        d.bar_write(1, 0, &[3]);
        assert!(live(&reg).is_empty());
        assert_eq!(d.current(), None);
        d.bar_write(0, 0, &[1]);
        d.reset();
        assert!(live(&reg).is_empty());
        d.bar_write(0, 0, &[2]);
        assert_eq!(live(&reg).len(), 1);
        drop(d);
        assert!(live(&reg).is_empty());
        // A registry that refuses: the device counts.
        let reg = Arc::new(Registry {
            fail: true,
            ..Default::default()
        });
        let mut d = placed(Some(reg));
        assert_eq!(run(&mut d, 0, 1).1, 16);
        assert_eq!(d.registered(), None);
    }

    #[test]
    fn datamatch_ignores_other_values_and_wider_writes_are_bytes() {
        let mut d = placed(None);
        for (n, off) in [(0u8, 2048u64), (2, 2050)] {
            d.bar_write(0, 0, &[n]);
            d.bar_write(0, off, &[0xfb]);
            d.bar_write(0, off + 1, &[0xfa]);
            assert_eq!(r32(&mut d, 0, 12), 0);
            // A 4-byte write is four byte writes: its low byte lands on the offset.
            d.bar_write(0, off, &0x1122_33fau32.to_le_bytes());
            d.bar_write(0, off, &0xfa00u16.to_le_bytes());
            assert_eq!(r32(&mut d, 0, 12), 1);
        }
        // Wildcard: any value at the offset counts.
        d.bar_write(1, 0, &[1]);
        d.bar_write(1, 132, &[0]);
        d.bar_write(1, 132, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(r32(&mut d, 1, 12), 2);
        // A 4-byte write at 0 selects by its low byte.
        d.bar_write(0, 0, &0x0000_0100u32.to_le_bytes());
        assert_eq!(d.current(), Some(("mmio-no-eventfd", 0)));
    }

    #[test]
    fn bad_test_numbers_read_as_zero() {
        let mut d = placed(None);
        for n in [3u8, 4, 0x80, 0xff] {
            d.bar_write(0, 0, &[1]);
            d.bar_write(0, 0, &[n]);
            assert_eq!(d.current(), None);
            for off in [0u64, 1, 4, 8, 12, 16, 2049, 4095] {
                assert_eq!(rb(&mut d, 0, off), 0, "test {n}, offset {off}");
            }
            d.bar_write(0, 2048, &[0xfa]);
            assert_eq!(d.current(), None);
        }
        // Past the header and its name: 0 (QEMU drops its NUL's byte too).
        d.bar_write(0, 0, &[0]);
        let len = 16 + "mmio-no-eventfd".len();
        assert_eq!(rb(&mut d, 0, len as u64 - 1), b'd');
        assert_eq!(rb(&mut d, 0, len as u64), 0);
        assert_eq!(r32(&mut d, 0, 4094), 0);
    }

    #[test]
    fn random_accesses_never_panic() {
        let reg = Arc::new(Registry::default());
        let mut d = placed(Some(reg.clone()));
        let mut r = crate::intel_iommu::tests::XorShift(0x1234_5678_9abc_def1);
        for _ in 0..20_000 {
            let bar = (r.next() % 3) as usize;
            let off = match r.next() % 3 {
                0 => r.next() % 32,
                1 => 2040 + r.next() % 16,
                _ => r.next(),
            };
            let len = 1 << (r.next() % 4);
            let v = if r.next() % 2 == 0 {
                r.next() % 4
            } else {
                r.next()
            };
            d.bar_write(bar, off, &v.to_le_bytes()[..len]);
            let mut b = [0u8; 8];
            d.bar_read(bar, r.next(), &mut b[..len]);
            if r.next() % 16 == 0 {
                d.config_mut()
                    .write((r.next() % 0x100) as usize, &v.to_le_bytes()[..len]);
                d.config_written(0, 4);
            }
            assert!(reg.live.lock().unwrap().len() <= 1);
            assert_eq!(d.registered(), d.wanted());
        }
    }

    #[test]
    fn save_restore_and_rejects() {
        let mut d = placed(None);
        run(&mut d, 1, 0);
        let s: PciTestdevState =
            serde_json::from_str(&serde_json::to_string(&d.state()).unwrap()).unwrap();
        assert_eq!((s.test, s.count), (Some(3), 16));
        let reg = Arc::new(Registry::default());
        let mut e = PciTestdev::new(Some(reg.clone()));
        e.restore(&s).unwrap();
        assert_eq!(e.state(), s);
        assert_eq!(name(&mut e, 1), "portio-no-eventfd");
        assert!(reg.live.lock().unwrap().is_empty());
        // An eventfd test is registered again on restore.
        d.bar_write(0, 0, &[2]);
        e.restore(&d.state()).unwrap();
        assert_eq!(reg.live.lock().unwrap().len(), 1);
        let mut bad = s.clone();
        bad.test = Some(6);
        assert_eq!(e.restore(&bad), Err(PciTestdevStateError::Test(6)));
        let mut bad = s.clone();
        bad.test = None;
        assert_eq!(e.restore(&bad), Err(PciTestdevStateError::Count(16)));
        let mut bad = s;
        bad.config.bytes[2] = 0;
        assert!(matches!(
            e.restore(&bad),
            Err(PciTestdevStateError::Config(_))
        ));
        assert_eq!(
            e.current(),
            Some(("mmio-datamatch-eventfd", 0)),
            "unchanged"
        );
        assert!(serde_json::from_str::<PciTestdevState>(
            r#"{"config":{"bytes":[]},"test":null,"count":0,"x":1}"#
        )
        .is_err());
    }
}
