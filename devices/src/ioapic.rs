//! The IOAPIC in userspace, for `kernel-irqchip=split` (the LAPICs stay in KVM).
//!
//! 24 pins, version 0x20 (with the EOI register at 0x40), at 0xfec00000 like QEMU's. Every
//! redirection entry is turned into an MSI message the way QEMU's IOAPIC does it: vector,
//! delivery mode and trigger mode into the data, entry bits 48–63 into address bits 4–19 and
//! the destination mode into address bit 2. A compatibility-format entry therefore becomes the
//! plain MSI for its destination, and a remappable-format entry (bit 48 set, interrupt index in
//! bits 49–63 and 11) becomes a remappable MSI that the IOMMU looks up in its interrupt
//! remapping table ([`crate::MsiTarget::translate`]).
//!
//! Edge-triggered pins deliver on a rising edge (a masked pin keeps the edge pending until it is
//! unmasked); level-triggered pins deliver while asserted and remote IRR is clear, set remote IRR,
//! and deliver again after the EOI of their vector (the LAPIC's EOI, reported by KVM as
//! `KVM_EXIT_IOAPIC_EOI`, or a write of the EOI register) if still asserted. The pin polarity bit
//! is stored but not applied, as in QEMU and KVM: device models drive their lines active-high.
//! ExtINT entries are not delivered (there is no PIC under `kernel-irqchip=split` in hopvm).
//!
//! Lock order: the IOAPIC's mutex is taken under a device's (its interrupt line) or the big lock
//! (its registers); it calls the [`crate::MsiTarget`], i.e. the IOMMU, under it.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sync::lock;

use crate::{fill_le, le_value, BusDevice, IrqLine, MsiTarget, VmRequest};

/// Number of pins.
pub const PINS: usize = 24;
/// Where QEMU's (and hopvm's) IOAPIC sits.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Its MMIO length.
pub const IOAPIC_SIZE: u64 = 0x1000;

const VERSION: u32 = 0x20;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_TABLE: u32 = 0x10;

const MASKED: u64 = 1 << 16;
const TRIGGER_LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const DELIVERY_STATUS: u64 = 1 << 12;
/// Bits of an entry's low dword the guest cannot write (delivery status, remote IRR).
const RO_LOW: u64 = DELIVERY_STATUS | REMOTE_IRR;
const DELIVERY_EXTINT: u64 = 7;

/// Errors restoring an IOAPIC.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IoapicStateError {
    /// Not 24 redirection entries.
    #[error("ioapic state with {0} redirection entries (expected 24)")]
    Entries(usize),
    /// The register select points past the last register.
    #[error("ioapic register select {0:#x} is past the redirection table")]
    Select(u32),
    /// An ID beyond the register's 4 bits.
    #[error("ioapic id {0:#x} does not fit the 4-bit id register")]
    Id(u8),
    /// Remote IRR set on an edge-triggered entry.
    #[error("ioapic pin {0} has remote irr set but is edge-triggered")]
    RemoteIrr(usize),
}

/// The guest-visible state of the IOAPIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoapicState {
    /// The ID register's ID (bits 24–27).
    pub id: u8,
    /// IOREGSEL.
    pub select: u32,
    /// The redirection table.
    pub entries: Vec<u64>,
    /// Input levels of the pins (bit per pin).
    pub lines: u32,
    /// Interrupts requested and not yet delivered (edges pending behind a mask, asserted
    /// levels).
    pub irr: u32,
}

/// The IOAPIC.
pub struct Ioapic {
    id: u8,
    select: u32,
    entries: [u64; PINS],
    lines: u32,
    irr: u32,
    routes: [Option<(u64, u32)>; PINS],
    target: Arc<dyn MsiTarget>,
}

impl Ioapic {
    /// An IOAPIC after reset (every entry masked) delivering to `target`.
    pub fn new(target: Arc<dyn MsiTarget>) -> Self {
        Self {
            id: 0,
            select: 0,
            entries: [MASKED; PINS],
            lines: 0,
            irr: 0,
            routes: [None; PINS],
            target,
        }
    }

    /// The MSI message (address, data) redirection entry `entry` makes, as QEMU forms it.
    pub fn entry_message(entry: u64) -> (u64, u32) {
        let vector = entry & 0xff;
        let delivery = (entry >> 8) & 7;
        let dest_mode = (entry >> 11) & 1;
        let trigger = (entry >> 15) & 1;
        let dest_idx = (entry >> 48) & 0xffff;
        let address = 0xfee0_0000 | dest_idx << 4 | dest_mode << 2;
        // Level-triggered messages carry the assert bit (14) as well.
        let data = vector | delivery << 8 | trigger << 14 | trigger << 15;
        (address, data as u32)
    }

    /// Drives input pin `pin` (out-of-range pins are ignored).
    pub fn set_pin(&mut self, pin: usize, high: bool) {
        if pin >= PINS {
            return;
        }
        let bit = 1u32 << pin;
        let was = self.lines & bit != 0;
        if high {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        if self.entries[pin] & TRIGGER_LEVEL != 0 {
            if high {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if high && !was {
            self.irr |= bit;
        }
        self.service();
    }

    /// The EOI of `vector` (from a LAPIC or the EOI register): level entries with that vector
    /// and remote IRR set may deliver again.
    pub fn eoi(&mut self, vector: u8) {
        for e in self.entries.iter_mut() {
            if *e & 0xff == u64::from(vector) && *e & REMOTE_IRR != 0 {
                *e &= !REMOTE_IRR;
            }
        }
        self.service();
    }

    /// Delivers every deliverable pending interrupt.
    fn service(&mut self) {
        for pin in 0..PINS {
            let bit = 1u32 << pin;
            let entry = self.entries[pin];
            if self.irr & bit == 0 || entry & MASKED != 0 {
                continue;
            }
            let level = entry & TRIGGER_LEVEL != 0;
            if level {
                if entry & REMOTE_IRR != 0 {
                    continue;
                }
                self.entries[pin] |= REMOTE_IRR;
            } else {
                self.irr &= !bit;
            }
            if (entry >> 8) & 7 == DELIVERY_EXTINT {
                log::debug!("ioapic pin {pin}: extint entry not delivered (no pic)");
                continue;
            }
            let (address, data) = Self::entry_message(entry);
            let Some(msg) = self.target.translate(None, address, data) else {
                continue;
            };
            if level {
                self.update_route(pin, Some(msg));
            }
            self.target.send(msg.0, msg.1);
        }
    }

    /// Tells the target which message a level-triggered pin sends, when it changed.
    fn update_route(&mut self, pin: usize, msg: Option<(u64, u32)>) {
        if self.routes[pin] != msg {
            self.routes[pin] = msg;
            self.target.set_ioapic_route(pin as u8, msg);
        }
    }

    /// Recomputes the route of `pin` after its entry changed.
    fn entry_changed(&mut self, pin: usize) {
        let entry = self.entries[pin];
        let msg = if entry & TRIGGER_LEVEL != 0 && entry & MASKED == 0 {
            let (address, data) = Self::entry_message(entry);
            self.target.translate(None, address, data)
        } else {
            None
        };
        self.update_route(pin, msg);
        // An entry turned edge-triggered forgets a stale remote IRR; one turned level follows
        // the input level.
        let bit = 1u32 << pin;
        if entry & TRIGGER_LEVEL == 0 {
            self.entries[pin] &= !REMOTE_IRR;
        } else if self.lines & bit != 0 {
            self.irr |= bit;
        } else {
            self.irr &= !bit;
        }
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARB => u32::from(self.id) << 24,
            REG_VERSION => VERSION | ((PINS as u32 - 1) << 16),
            r if (REG_TABLE..REG_TABLE + 2 * PINS as u32).contains(&r) => {
                let e = self.entries[((r - REG_TABLE) / 2) as usize];
                if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, v: u32) {
        match self.select {
            REG_ID => self.id = ((v >> 24) & 0xf) as u8,
            r if (REG_TABLE..REG_TABLE + 2 * PINS as u32).contains(&r) => {
                let pin = ((r - REG_TABLE) / 2) as usize;
                let old = self.entries[pin];
                self.entries[pin] = if r & 1 == 0 {
                    (old & (0xffff_ffff_0000_0000 | RO_LOW)) | (u64::from(v) & !RO_LOW)
                } else {
                    (old & 0xffff_ffff) | u64::from(v) << 32
                };
                self.entry_changed(pin);
                self.service();
            }
            _ => {}
        }
    }

    /// A snapshot of the guest-visible state.
    pub fn state(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            select: self.select,
            entries: self.entries.to_vec(),
            lines: self.lines,
            irr: self.irr,
        }
    }

    /// Applies a saved state (checked first; nothing changes on error).
    pub fn restore(&mut self, s: &IoapicState) -> Result<(), IoapicStateError> {
        let entries: [u64; PINS] = s
            .entries
            .as_slice()
            .try_into()
            .map_err(|_| IoapicStateError::Entries(s.entries.len()))?;
        if s.select > 0xff {
            return Err(IoapicStateError::Select(s.select));
        }
        if s.id > 0xf {
            return Err(IoapicStateError::Id(s.id));
        }
        if let Some(pin) =
            (0..PINS).find(|&p| entries[p] & REMOTE_IRR != 0 && entries[p] & TRIGGER_LEVEL == 0)
        {
            return Err(IoapicStateError::RemoteIrr(pin));
        }
        self.id = s.id;
        self.select = s.select;
        self.entries = entries;
        self.lines = s.lines & ((1 << PINS) - 1);
        self.irr = s.irr & ((1 << PINS) - 1);
        for pin in 0..PINS {
            self.routes[pin] = None;
            let entry = self.entries[pin];
            let msg = (entry & TRIGGER_LEVEL != 0 && entry & MASKED == 0).then(|| {
                let (a, d) = Self::entry_message(entry);
                self.target.translate(None, a, d)
            });
            self.update_route(pin, msg.flatten());
        }
        Ok(())
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0x00 => self.select,
            0x10 => self.read_register(),
            _ => 0,
        };
        fill_le(data, u64::from(v));
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let v = le_value(data) as u32;
        match offset {
            0x00 => self.select = v & 0xff,
            0x10 => self.write_register(v),
            0x40 => self.eoi(v as u8),
            _ => {}
        }
        None
    }
}

/// One input pin of a shared IOAPIC, as a device's interrupt line.
pub struct IoapicPin {
    ioapic: Arc<Mutex<Ioapic>>,
    pin: usize,
}

impl IoapicPin {
    /// Pin `pin` of `ioapic`.
    pub fn new(ioapic: Arc<Mutex<Ioapic>>, pin: usize) -> Self {
        Self { ioapic, pin }
    }
}

impl IrqLine for IoapicPin {
    fn set_level(&self, high: bool) {
        lock(&self.ioapic).set_pin(self.pin, high);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A message: (address, data).
    type Msg = (u64, u32);

    /// Records messages and routes; translation is the identity.
    #[derive(Default)]
    pub struct RecordingMsi {
        pub sent: Mutex<Vec<(u64, u32)>>,
        pub routes: Mutex<Vec<(u8, Option<Msg>)>>,
    }

    impl MsiTarget for RecordingMsi {
        fn translate(&self, _s: Option<u16>, a: u64, d: u32) -> Option<(u64, u32)> {
            Some((a, d))
        }
        fn send(&self, a: u64, d: u32) {
            self.sent.lock().unwrap().push((a, d));
        }
        fn set_ioapic_route(&self, pin: u8, msi: Option<(u64, u32)>) {
            self.routes.lock().unwrap().push((pin, msi));
        }
    }

    fn write_entry(io: &mut Ioapic, pin: u32, e: u64) {
        io.write(0, &(REG_TABLE + 2 * pin).to_le_bytes());
        io.write(0x10, &(e as u32).to_le_bytes());
        io.write(0, &(REG_TABLE + 2 * pin + 1).to_le_bytes());
        io.write(0x10, &((e >> 32) as u32).to_le_bytes());
    }

    fn read_reg(io: &mut Ioapic, r: u32) -> u32 {
        io.write(0, &r.to_le_bytes());
        let mut b = [0; 4];
        io.read(0x10, &mut b);
        u32::from_le_bytes(b)
    }

    fn ioapic() -> (Arc<RecordingMsi>, Ioapic) {
        let t = Arc::new(RecordingMsi::default());
        (t.clone(), Ioapic::new(t))
    }

    #[test]
    fn registers_after_reset() {
        let (_, mut io) = ioapic();
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0020);
        assert_eq!(read_reg(&mut io, REG_TABLE), MASKED as u32);
        io.write(0, &REG_ID.to_le_bytes());
        io.write(0x10, &0xff00_0000u32.to_le_bytes());
        assert_eq!(read_reg(&mut io, REG_ID), 0x0f00_0000);
        assert_eq!(read_reg(&mut io, 0x50), 0, "past the table");
        // Remote IRR and delivery status are read-only.
        write_entry(&mut io, 3, 0x5000 | 0x30);
        assert_eq!(read_reg(&mut io, REG_TABLE + 6), 0x30);
    }

    #[test]
    fn edge_delivery_and_masked_edge_pending() {
        let (t, mut io) = ioapic();
        write_entry(&mut io, 10, 0x0300_0000_0000_0041);
        io.set_pin(10, true);
        io.set_pin(10, true); // no new edge
        io.set_pin(10, false);
        assert_eq!(*t.sent.lock().unwrap(), [(0xfee0_3000, 0x41)]);
        // Masked: the edge waits for the unmask.
        write_entry(&mut io, 10, MASKED | 0x42);
        io.set_pin(10, true);
        assert_eq!(t.sent.lock().unwrap().len(), 1);
        write_entry(&mut io, 10, 0x42);
        assert_eq!(t.sent.lock().unwrap()[1], (0xfee0_0000, 0x42));
        // Out-of-range pins are ignored.
        io.set_pin(24, true);
        io.set_pin(usize::MAX, true);
    }

    #[test]
    fn level_remote_irr_and_eoi() {
        let (t, mut io) = ioapic();
        write_entry(&mut io, 5, TRIGGER_LEVEL | 0x51);
        assert_eq!(
            t.routes.lock().unwrap().last(),
            Some(&(5, Some((0xfee0_0000, 0xc051))))
        );
        io.set_pin(5, true);
        assert_eq!(
            read_reg(&mut io, REG_TABLE + 10) as u64 & REMOTE_IRR,
            REMOTE_IRR
        );
        assert_eq!(t.sent.lock().unwrap().len(), 1);
        io.eoi(0x50); // another vector
        assert_eq!(t.sent.lock().unwrap().len(), 1);
        io.eoi(0x51); // still asserted: again
        assert_eq!(t.sent.lock().unwrap().len(), 2);
        io.set_pin(5, false);
        io.write(0x40, &[0x51, 0, 0, 0]); // EOI register
        assert_eq!(read_reg(&mut io, REG_TABLE + 10) as u64 & REMOTE_IRR, 0);
        assert_eq!(t.sent.lock().unwrap().len(), 2);
    }

    #[test]
    fn remappable_entry_message() {
        // Interrupt index 1, remappable format (kvm-unit-tests' vtd_setup_ioapic_irq).
        let e = 0xed | 1u64 << 48 | 1u64 << 49;
        assert_eq!(Ioapic::entry_message(e), (0xfee0_0030, 0xed));
        // Index bit 15 sits in entry bit 11 → address bit 2.
        assert_eq!(Ioapic::entry_message(1 << 11).0, 0xfee0_0004);
    }

    #[test]
    fn random_accesses_never_panic() {
        let (_, mut io) = ioapic();
        let mut r = crate::intel_iommu::tests::XorShift(0x1234_5678_9abc_def1);
        for _ in 0..20_000 {
            let v = r.next();
            let len = 1 << (r.next() % 4);
            match r.next() % 4 {
                0 => io.write(r.next() % 0x1000, &v.to_le_bytes()[..len]),
                1 => io
                    .write(0, &[(v % 0x40) as u8])
                    .and(io.write(0x10, &v.to_le_bytes()[..len])),
                2 => {
                    io.set_pin((v % 30) as usize, v & 0x100 != 0);
                    None
                }
                _ => {
                    io.eoi(v as u8);
                    None
                }
            };
            let mut b = [0u8; 8];
            io.read(r.next() % 0x1000, &mut b[..len]);
        }
    }

    #[test]
    fn save_restore_and_rejects() {
        let (_, mut io) = ioapic();
        write_entry(&mut io, 2, TRIGGER_LEVEL | 0x22);
        io.set_pin(2, true);
        let s = io.state();
        let json = serde_json::to_string(&s).unwrap();
        let s: IoapicState = serde_json::from_str(&json).unwrap();
        let (_, mut dst) = ioapic();
        dst.restore(&s).unwrap();
        assert_eq!(dst.state(), io.state());
        let mut bad = s.clone();
        bad.entries.pop();
        assert_eq!(dst.restore(&bad), Err(IoapicStateError::Entries(23)));
        let mut bad = s.clone();
        bad.id = 0x10;
        assert_eq!(dst.restore(&bad), Err(IoapicStateError::Id(0x10)));
        let mut bad = s.clone();
        bad.entries[7] = REMOTE_IRR;
        assert_eq!(dst.restore(&bad), Err(IoapicStateError::RemoteIrr(7)));
        let mut bad = s;
        bad.select = 0x100;
        assert_eq!(dst.restore(&bad), Err(IoapicStateError::Select(0x100)));
    }
}
