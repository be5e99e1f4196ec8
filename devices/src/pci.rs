//! The PCI bus of QEMU's `pc` machine: configuration space, BARs, the i440FX host bridge and the
//! PIIX3 ISA bridge, and the MMIO window through which BARs are reached.
//!
//! * [`PciConfig`] is a type-0 configuration header with a write mask: a guest write only
//!   changes writable bits, so BAR sizing (write all ones, read back the size mask) and every
//!   nonsense write are handled by the same rule and can never panic.
//! * [`PciDevice`] is a function on the bus: its configuration space plus reads and writes of
//!   its BARs.
//! * [`PciBus`] holds the functions of bus 0 by device number. [`crate::PciHost`] (ports
//!   0xcf8–0xcff, configuration mechanism #1) reaches their configuration space and
//!   [`PciMmioWindow`] and [`PciIoWindow`] ([`BarWindow`]s the VMM's MMIO and port buses
//!   consult) dispatch accesses to whichever BAR decodes them, wherever the guest put it.
//! * 00.0 is the i440FX host bridge (8086:1237) and 01.0 the PIIX3 ISA bridge (8086:7000), as on
//!   QEMU's `pc` machine. PCI INTx lines are swizzled onto the PIIX3's four PIRQ lines and those
//!   are wired to ISA IRQs 10, 10, 11, 11 — what SeaBIOS programs into the PIIX3 and what
//!   [`intx_irq`] computes at boot; a guest that rewrites the routing registers reroutes them
//!   ([`crate::pirq`]).
//!
//! Lock order: `PciHost` / `PciMmioWindow` (a bus device) → `PciBus` → one function.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sync::lock;

use crate::BarWindow;

/// Where the MMIO window of the PCI hole starts (BARs are pre-assigned from here).
pub const PCI_MMIO_BASE: u64 = 0xe000_0000;
/// Where the window ends (the IOAPIC).
pub const PCI_MMIO_END: u64 = 0xfec0_0000;
/// Where I/O BARs are pre-assigned from (SeaBIOS's choice).
pub const PCI_IO_BASE: u64 = 0xc000;
/// The end of I/O space.
pub const PCI_IO_END: u64 = 0x1_0000;

/// Configuration space size of a conventional PCI function.
pub const CONFIG_SIZE: usize = 256;
/// Offsets in the type-0 header.
pub const VENDOR_ID: usize = 0x00;
/// Command register.
pub const COMMAND: usize = 0x04;
/// Status register.
pub const STATUS: usize = 0x06;
/// Revision ID; the class code follows (prog-if, subclass, class).
pub const REVISION_ID: usize = 0x08;
/// Header type.
pub const HEADER_TYPE: usize = 0x0e;
/// First BAR.
pub const BAR0: usize = 0x10;
/// Subsystem vendor ID.
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Capabilities pointer.
pub const CAPABILITIES_POINTER: usize = 0x34;
/// Interrupt line (written by firmware, read by drivers).
pub const INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin (1 = INTA#).
pub const INTERRUPT_PIN: usize = 0x3d;

/// Command register: I/O space decode.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decode.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master.
pub const COMMAND_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: capabilities list present.
const STATUS_CAP_LIST: u16 = 1 << 4;

/// The ISA IRQs the PIIX3's PIRQA–D lines are wired to (SeaBIOS's choice for `pc`).
pub const PIRQ_IRQS: [u8; 4] = [10, 10, 11, 11];

/// Errors restoring a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigError {
    /// The saved space is not 256 bytes.
    #[error("pci configuration space of {0} bytes (expected 256)")]
    Size(usize),
    /// A read-only byte differs from the device's.
    #[error("pci configuration byte {0:#x} is read-only and differs from the device's")]
    ReadOnly(usize),
}

/// The kind of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// Not implemented (reads as zero).
    None,
    /// 32-bit memory BAR.
    Memory32,
    /// 64-bit memory BAR (takes the next BAR register as its upper half).
    Memory64,
    /// I/O space BAR.
    Io,
}

/// A BAR's size and kind.
#[derive(Debug, Clone, Copy)]
struct Bar {
    kind: BarKind,
    size: u64,
}

/// A type-0 PCI configuration header, its capabilities and a write mask.
#[derive(Debug, Clone)]
pub struct PciConfig {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    bars: [Bar; 6],
    last_cap: Option<usize>,
    next_cap: usize,
}

/// The guest-visible state of a configuration space (its 256 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciConfigState {
    /// The configuration bytes.
    pub bytes: Vec<u8>,
}

impl PciConfig {
    /// A header with these IDs and class (`class` = class << 16 | subclass << 8 | prog-if).
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut c = Self {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            bars: [Bar {
                kind: BarKind::None,
                size: 0,
            }; 6],
            last_cap: None,
            next_cap: 0x40,
        };
        c.set_u16(VENDOR_ID, vendor);
        c.set_u16(VENDOR_ID + 2, device);
        c.bytes[REVISION_ID] = revision;
        c.set_u32(REVISION_ID, (class << 8) | u32::from(revision));
        let command = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE;
        c.wmask[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        c.wmask[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Sets the header type byte (0x80 = multi-function).
    pub fn set_header_type(&mut self, v: u8) {
        self.bytes[HEADER_TYPE] = v;
    }

    /// Sets the subsystem vendor and subsystem IDs.
    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.set_u16(SUBSYSTEM_VENDOR_ID, vendor);
        self.set_u16(SUBSYSTEM_VENDOR_ID + 2, id);
    }

    /// Sets the interrupt pin (1 = INTA#).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
    }

    /// Declares BAR `index` as a memory BAR of `size` bytes (a power of two ≥ 16; a 64-bit BAR
    /// also uses register `index + 1`).
    pub fn add_memory_bar(&mut self, index: usize, size: u64, is_64bit: bool) {
        assert!(size.is_power_of_two() && size >= 16 && index < 6 - usize::from(is_64bit));
        let mask = !(size - 1);
        let reg = BAR0 + 4 * index;
        let (kind, type_bits) = if is_64bit {
            (BarKind::Memory64, 0x4u32)
        } else {
            (BarKind::Memory32, 0)
        };
        self.bars[index] = Bar { kind, size };
        self.set_u32(reg, type_bits);
        self.wmask[reg..reg + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        if is_64bit {
            self.wmask[reg + 4..reg + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
    }

    /// Declares BAR `index` as an I/O BAR of `size` ports (a power of two ≥ 4).
    pub fn add_io_bar(&mut self, index: usize, size: u64) {
        assert!(size.is_power_of_two() && (4..=0x1_0000).contains(&size) && index < 6);
        let reg = BAR0 + 4 * index;
        self.bars[index] = Bar {
            kind: BarKind::Io,
            size,
        };
        self.set_u32(reg, 0x1);
        let mask = !(size as u32 - 1) & 0xffff_fffc;
        self.wmask[reg..reg + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Appends a capability (`body` starts with its ID byte; the next-pointer byte is filled
    /// in) whose bytes are writable as `wmask` says; returns its offset.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> usize {
        let off = self.next_cap;
        assert!(body.len() >= 2 && off + body.len() <= CONFIG_SIZE && wmask.len() <= body.len());
        self.bytes[off..off + body.len()].copy_from_slice(body);
        self.bytes[off + 1] = 0;
        self.wmask[off..off + wmask.len()].copy_from_slice(wmask);
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = off as u8;
                let status = self.u16(STATUS) | STATUS_CAP_LIST;
                self.set_u16(STATUS, status);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + body.len() + 3) & !3;
        off
    }

    /// Reads configuration dword `reg` (0–63); out-of-range reads are all ones.
    pub fn read_dword(&self, reg: usize) -> u32 {
        match self.bytes.get(reg * 4..reg * 4 + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0xffff_ffff,
        }
    }

    /// Writes `data` at byte `offset` of the space, only where the mask allows.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SIZE) else {
                return;
            };
            self.bytes[o] = (self.bytes[o] & !self.wmask[o]) | (b & self.wmask[o]);
        }
    }

    /// The little-endian u16 at `offset` (< 255).
    pub fn u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// The little-endian u32 at `offset` (< 253).
    pub fn u32(&self, offset: usize) -> u32 {
        let b = &self.bytes[offset..offset + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Makes bytes `[offset, offset + len)` writable by the guest as `mask` says (device
    /// side, at build time).
    pub fn set_wmask(&mut self, offset: usize, len: usize, mask: u8) {
        self.wmask[offset..offset + len].fill(mask);
    }

    /// Sets byte `offset`, whatever the mask (device side).
    pub fn write_readonly(&mut self, offset: usize, v: u8) {
        self.bytes[offset] = v;
    }

    /// Sets the u16 at `offset`, whatever the mask (device side).
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets the u32 at `offset`, whatever the mask (device side).
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16(COMMAND)
    }

    /// The address BAR `index` is programmed to (a port number for an I/O BAR).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index)?;
        let reg = BAR0 + 4 * index;
        let low = u64::from(self.u32(reg) & !0xf);
        match bar.kind {
            BarKind::None => None,
            BarKind::Io => Some(u64::from(self.u32(reg) & !0x3)),
            BarKind::Memory32 => Some(low),
            BarKind::Memory64 => Some(low | u64::from(self.u32(reg + 4)) << 32),
        }
    }

    /// The kind of BAR `index`.
    pub fn bar_kind(&self, index: usize) -> BarKind {
        self.bars.get(index).map_or(BarKind::None, |b| b.kind)
    }

    /// The size of BAR `index` (0 if none).
    pub fn bar_size(&self, index: usize) -> u64 {
        self.bars.get(index).map_or(0, |b| b.size)
    }

    /// Programs BAR `index` to `addr` (firmware-style pre-assignment; the address is masked
    /// to the BAR's alignment).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars.get(index).copied() else {
            return;
        };
        let reg = BAR0 + 4 * index;
        let align = if bar.kind == BarKind::Io { 4 } else { 16 };
        let addr = addr & !(bar.size.max(align) - 1);
        match bar.kind {
            BarKind::None => {}
            BarKind::Io => self.set_u32(reg, (addr as u32) | 0x1),
            BarKind::Memory32 => self.set_u32(reg, addr as u32),
            BarKind::Memory64 => {
                self.set_u32(reg, (addr as u32) | 0x4);
                self.set_u32(reg + 4, (addr >> 32) as u32);
            }
        }
    }

    /// The memory BAR (index, offset in it) that decodes `[addr, addr + len)`, if memory
    /// decode is on.
    pub fn decode(&self, addr: u64, len: u64) -> Option<(usize, u64)> {
        self.decode_in(false, addr, len)
    }

    /// The I/O BAR (index, offset in it) that decodes ports `[port, port + len)`, if I/O
    /// decode is on.
    pub fn decode_io(&self, port: u64, len: u64) -> Option<(usize, u64)> {
        self.decode_in(true, port, len)
    }

    /// Whether BAR `index` is decoded now (its space enabled, an address programmed): its
    /// address if so.
    pub fn bar_decoded(&self, index: usize) -> Option<u64> {
        let io = self.bar_kind(index) == BarKind::Io;
        let enable = if io { COMMAND_IO } else { COMMAND_MEMORY };
        if self.command() & enable == 0 || self.bar_size(index) == 0 {
            return None;
        }
        self.bar_address(index).filter(|&a| a != 0)
    }

    fn decode_in(&self, io: bool, addr: u64, len: u64) -> Option<(usize, u64)> {
        let enable = if io { COMMAND_IO } else { COMMAND_MEMORY };
        if self.command() & enable == 0 {
            return None;
        }
        (0..6).find_map(|i| {
            if (self.bar_kind(i) == BarKind::Io) != io {
                return None;
            }
            let size = self.bar_size(i);
            let base = self.bar_address(i)?;
            if size == 0 || base == 0 {
                return None;
            }
            let off = addr.checked_sub(base)?;
            (off.checked_add(len)? <= size).then_some((i, off))
        })
    }

    /// A snapshot of the configuration bytes.
    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            bytes: self.bytes.to_vec(),
        }
    }

    /// Checks `state` against this device's read-only bytes without applying it.
    pub fn check(&self, state: &PciConfigState) -> Result<(), PciConfigError> {
        if state.bytes.len() != CONFIG_SIZE {
            return Err(PciConfigError::Size(state.bytes.len()));
        }
        for (i, (&saved, &ours)) in state.bytes.iter().zip(&self.bytes).enumerate() {
            // Read-only bits the device itself changes (BAR type bits are fixed) are the
            // status register's; everything else must match.
            if (saved ^ ours) & !self.wmask[i] != 0 && !(STATUS..STATUS + 2).contains(&i) {
                return Err(PciConfigError::ReadOnly(i));
            }
        }
        Ok(())
    }

    /// Applies a checked state.
    pub fn restore(&mut self, state: &PciConfigState) -> Result<(), PciConfigError> {
        self.check(state)?;
        self.bytes.copy_from_slice(&state.bytes);
        Ok(())
    }
}

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &PciConfig;

    /// Its configuration space, for the bus's writes.
    fn config_mut(&mut self) -> &mut PciConfig;

    /// Called after the guest wrote configuration bytes `[offset, offset + len)` (BAR moves,
    /// command register, capability registers).
    fn config_written(&mut self, _offset: usize, _len: usize) {}

    /// Reads from BAR `bar` (memory or I/O) at `offset`.
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// Writes to BAR `bar` (memory or I/O) at `offset`.
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// A function shared between the bus and the VMM's typed handle.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// The ISA IRQ INTx pin `pin` (1 = INTA#) of device `slot` is wired to, through the PIIX3's
/// PIRQ swizzle and SeaBIOS's PIRQ → IRQ choice.
///
/// The swizzle is QEMU's PIIX3's: PIRQ = (device − 1 + pin − 1) mod 4.
pub fn intx_irq(slot: u8, pin: u8) -> u8 {
    PIRQ_IRQS[intx_pirq(slot, pin)]
}

/// The PIRQ line (0 = PIRQA) INTx pin `pin` (1 = INTA#) of device `slot` is swizzled onto:
/// (device − 1 + pin − 1) mod 4, QEMU's PIIX3 rule.
pub fn intx_pirq(slot: u8, pin: u8) -> usize {
    (usize::from(slot) + 3 + usize::from(pin.saturating_sub(1))) & 3
}

/// Bus 0: up to 32 single-function devices.
#[derive(Default)]
pub struct PciBus {
    slots: Vec<(u8, SharedPciDevice)>,
}

impl PciBus {
    /// The bus of QEMU's `pc`: the i440FX host bridge at 00.0 and the PIIX3 at 01.0.
    pub fn new_pc() -> Self {
        Self::pc_chipset(None).0
    }

    /// The bus of QEMU's `pc` with typed handles to its host bridge and PIIX3 (their
    /// migration sections); the PIIX3's route registers drive `router`, if any.
    pub fn pc_chipset(
        router: Option<Arc<crate::pirq::PirqRouter>>,
    ) -> (
        Self,
        Arc<Mutex<crate::i440fx::I440fx>>,
        Arc<Mutex<crate::piix3::Piix3>>,
    ) {
        let host = Arc::new(Mutex::new(crate::i440fx::I440fx::new()));
        let isa = Arc::new(Mutex::new(crate::piix3::Piix3::with_router(router)));
        let mut bus = Self::default();
        bus.insert(0, host.clone());
        bus.insert(1, isa.clone());
        (bus, host, isa)
    }

    /// The first free device number (from 2 on), if any.
    pub fn free_slot(&self) -> Option<u8> {
        (2..32u8).find(|s| self.slots.iter().all(|(d, _)| d != s))
    }

    /// Plugs `device` into `slot`; false if the slot is taken or out of range.
    pub fn insert(&mut self, slot: u8, device: SharedPciDevice) -> bool {
        if slot >= 32 || self.slots.iter().any(|(d, _)| *d == slot) {
            return false;
        }
        self.slots.push((slot, device));
        true
    }

    fn device(&self, slot: u8) -> Option<&SharedPciDevice> {
        self.slots.iter().find(|(d, _)| *d == slot).map(|(_, d)| d)
    }

    /// A configuration read of dword `reg` of device `slot` function `function` (bus 0).
    pub fn config_read(&self, slot: u8, function: u8, reg: usize) -> u32 {
        match self.device(slot).filter(|_| function == 0) {
            Some(d) => lock(d).config().read_dword(reg),
            None => 0xffff_ffff,
        }
    }

    /// A configuration write of `data` at byte `offset` of device `slot` function `function`.
    pub fn config_write(&self, slot: u8, function: u8, offset: usize, data: &[u8]) {
        if let Some(d) = self.device(slot).filter(|_| function == 0) {
            let mut d = lock(d);
            d.config_mut().write(offset, data);
            d.config_written(offset, data.len());
        }
    }

    /// Runs `f` with the function whose BAR (an I/O BAR if `io`, else a memory BAR) decodes
    /// `[addr, addr + len)`, that BAR's index and the offset in it; false if none does.
    fn on_bar(
        &self,
        io: bool,
        addr: u64,
        len: usize,
        f: impl FnOnce(&mut dyn PciDevice, usize, u64),
    ) -> bool {
        for (_, d) in &self.slots {
            let mut d = lock(d);
            let config = d.config();
            let hit = if io {
                config.decode_io(addr, len as u64)
            } else {
                config.decode(addr, len as u64)
            };
            if let Some((bar, off)) = hit {
                f(&mut *d, bar, off);
                return true;
            }
        }
        false
    }

    /// An MMIO read at guest-physical `addr`; false if no BAR decodes it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.on_bar(false, addr, data.len(), |d, bar, off| {
            d.bar_read(bar, off, data)
        })
    }

    /// An MMIO write at guest-physical `addr`; false if no BAR decodes it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.on_bar(false, addr, data.len(), |d, bar, off| {
            d.bar_write(bar, off, data)
        })
    }

    /// An I/O read at port `port`; false if no I/O BAR decodes it.
    pub fn io_read(&self, port: u64, data: &mut [u8]) -> bool {
        self.on_bar(true, port, data.len(), |d, bar, off| {
            d.bar_read(bar, off, data)
        })
    }

    /// An I/O write at port `port`; false if no I/O BAR decodes it.
    pub fn io_write(&self, port: u64, data: &[u8]) -> bool {
        self.on_bar(true, port, data.len(), |d, bar, off| {
            d.bar_write(bar, off, data)
        })
    }

    /// Every function's INTx wiring: (device number, pin, ISA IRQ), for the firmware tables.
    pub fn intx_routes(&self) -> Vec<(u8, u8, u8)> {
        self.slots
            .iter()
            .filter_map(|(slot, d)| {
                let pin = lock(d).config().read_dword(INTERRUPT_LINE / 4) >> 8 & 0xff;
                (pin != 0).then(|| (*slot, pin as u8, intx_irq(*slot, pin as u8)))
            })
            .collect()
    }

    /// Firmware-style set-up, as SeaBIOS does on `pc`: memory BARs placed upwards from
    /// [`PCI_MMIO_BASE`] and I/O BARs from [`PCI_IO_BASE`] (each aligned to its size),
    /// memory and I/O decode on, and the interrupt line of each function with an INTx pin set
    /// to its ISA IRQ. Returns the end of the I/O ports assigned (`PCI_IO_BASE` if none).
    pub fn assign_resources(&self) -> u64 {
        let mut next = PCI_MMIO_BASE;
        let mut next_io = PCI_IO_BASE;
        for (slot, d) in &self.slots {
            let mut d = lock(d);
            let c = d.config_mut();
            let mut any = false;
            for i in 0..6 {
                let size = c.bar_size(i);
                if size == 0 {
                    continue;
                }
                let (cursor, end) = if c.bar_kind(i) == BarKind::Io {
                    (&mut next_io, PCI_IO_END)
                } else {
                    (&mut next, PCI_MMIO_END)
                };
                let base = (*cursor + size - 1) & !(size - 1);
                if base + size > end {
                    log::warn!("pci 00:{slot:02x}.0: no room for bar {i} of {size:#x} bytes");
                    continue;
                }
                c.set_bar_address(i, base);
                *cursor = base + size;
                any = true;
            }
            if any {
                let cmd = c.command() | COMMAND_MEMORY | COMMAND_IO;
                c.set_u16(COMMAND, cmd);
            }
            let pin = c.read_dword(INTERRUPT_LINE / 4) >> 8 & 0xff;
            if pin != 0 {
                c.bytes[INTERRUPT_LINE] = intx_irq(*slot, pin as u8);
            }
            d.config_written(0, CONFIG_SIZE);
        }
        next_io
    }
}

/// The PCI memory space as the VMM's MMIO bus sees it: consulted for an address no fixed
/// device claims (RAM, the IOAPIC, the ECAM window, the IOMMU and pc-testdev's MMIO area
/// win, as QEMU maps its PCI address space below system memory, priority −1), it goes to
/// whichever memory BAR decodes it — wherever the guest placed it.
pub struct PciMmioWindow {
    bus: Arc<Mutex<PciBus>>,
}

impl PciMmioWindow {
    /// A window onto `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self { bus }
    }
}

impl BarWindow for PciMmioWindow {
    fn bar_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        lock(&self.bus).mmio_read(addr, data)
    }

    fn bar_write(&mut self, addr: u64, data: &[u8]) -> bool {
        lock(&self.bus).mmio_write(addr, data)
    }
}

/// The PCI I/O space as the VMM's port bus sees it: consulted *before* the fixed legacy
/// ports, so an I/O BAR decodes wherever the guest programs it in the PC's 64 KiB of ports,
/// and wins over a legacy port it overlaps — QEMU's rule (its BARs are mapped into the I/O
/// space at priority 1, ISA devices and the configuration ports at 0). A port no BAR
/// decodes goes on to the fixed devices.
pub struct PciIoWindow {
    bus: Arc<Mutex<PciBus>>,
}

impl PciIoWindow {
    /// A window onto `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self { bus }
    }
}

impl BarWindow for PciIoWindow {
    fn bar_read(&mut self, port: u64, data: &mut [u8]) -> bool {
        port < PCI_IO_END && lock(&self.bus).io_read(port, data)
    }

    fn bar_write(&mut self, port: u64, data: &[u8]) -> bool {
        port < PCI_IO_END && lock(&self.bus).io_write(port, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dummy {
        config: PciConfig,
        mem: Vec<u8>,
        written: Vec<(usize, usize)>,
    }

    impl PciDevice for Dummy {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.config
        }
        fn config_written(&mut self, offset: usize, len: usize) {
            self.written.push((offset, len));
        }
        fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.mem[o..o + data.len()]);
        }
        fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.mem[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn dummy() -> Arc<Mutex<Dummy>> {
        let mut config = PciConfig::new(0x1af4, 0x1042, 0x01_00_00, 1);
        config.add_memory_bar(0, 0x1000, false);
        config.add_memory_bar(2, 0x4000, true);
        config.set_interrupt_pin(1);
        Arc::new(Mutex::new(Dummy {
            config,
            mem: vec![0; 0x4000],
            written: Vec::new(),
        }))
    }

    #[test]
    fn pc_bus_ids_and_empty_slots() {
        let bus = PciBus::new_pc();
        assert_eq!(bus.config_read(0, 0, 0), 0x1237_8086);
        assert_eq!(bus.config_read(0, 0, 2) >> 8, 0x06_00_00);
        assert_eq!(bus.config_read(1, 0, 0), 0x7000_8086);
        assert_eq!(bus.config_read(1, 0, 3) >> 16 & 0xff, 0x80);
        assert_eq!(bus.config_read(1, 0, 0x60 / 4), 0x0b0b_0a0a);
        assert_eq!(bus.config_read(1, 1, 0), 0xffff_ffff);
        assert_eq!(bus.config_read(2, 0, 0), 0xffff_ffff);
        assert_eq!(bus.config_read(31, 0, 0), 0xffff_ffff);
        assert_eq!(bus.config_read(0, 0, 64), 0xffff_ffff);
        // The IDs are read-only.
        bus.config_write(0, 0, 0, &[0; 4]);
        assert_eq!(bus.config_read(0, 0, 0), 0x1237_8086);
        assert_eq!(bus.free_slot(), Some(2));
    }

    #[test]
    fn bar_sizing_assignment_and_decode() {
        let mut bus = PciBus::new_pc();
        let d = dummy();
        assert!(bus.insert(3, d.clone()));
        assert!(!bus.insert(3, dummy()), "slot taken");
        assert!(!bus.insert(32, dummy()));
        bus.assign_resources();
        // BAR0 (4 KiB) at the window's base, BAR2 (16 KiB, 64-bit) aligned after it.
        assert_eq!(bus.config_read(3, 0, 4), 0xe000_0000);
        assert_eq!(bus.config_read(3, 0, 6), 0xe000_4004);
        assert_eq!(bus.config_read(3, 0, 7), 0);
        assert_eq!(bus.config_read(3, 0, 5), 0, "unimplemented BAR");
        assert_eq!(bus.config_read(3, 0, 1) & 0x3, 0x3, "decode on");
        // INTA# of slot 3 → PIRQC → IRQ 11.
        assert_eq!(bus.config_read(3, 0, 15) & 0xffff, 0x010b);
        assert_eq!(bus.intx_routes(), [(3, 1, 11)]);
        // Sizing: all ones reads back the size mask with the type bits.
        bus.config_write(3, 0, 0x10, &[0xff; 4]);
        assert_eq!(bus.config_read(3, 0, 4), 0xffff_f000);
        bus.config_write(3, 0, 0x18, &[0xff; 4]);
        bus.config_write(3, 0, 0x1c, &[0xff; 4]);
        assert_eq!(bus.config_read(3, 0, 6), 0xffff_c004);
        assert_eq!(bus.config_read(3, 0, 7), 0xffff_ffff);
        // The guest places the BARs elsewhere.
        bus.config_write(3, 0, 0x10, &0xe010_0000u32.to_le_bytes());
        bus.config_write(3, 0, 0x18, &0xe020_0000u32.to_le_bytes());
        bus.config_write(3, 0, 0x1c, &[0; 4]);
        assert!(lock(&d).written.contains(&(0x1c, 4)));
        assert!(bus.mmio_write(0xe010_0010, &[1, 2, 3, 4]));
        let mut buf = [0u8; 4];
        assert!(bus.mmio_read(0xe010_0010, &mut buf));
        assert_eq!(buf, [1, 2, 3, 4]);
        assert!(bus.mmio_read(0xe020_0010, &mut buf));
        // Straddling a BAR's end or outside any BAR: not decoded.
        assert!(!bus.mmio_read(0xe010_0ffe, &mut buf));
        assert!(!bus.mmio_read(0xe000_0000, &mut buf));
        // Unaligned garbage in a BAR is masked to its alignment.
        bus.config_write(3, 0, 0x10, &0x1234_5678u32.to_le_bytes());
        assert_eq!(bus.config_read(3, 0, 4), 0x1234_5000);
        // A 64-bit BAR far above 4 GiB, and memory decode off.
        bus.config_write(3, 0, 0x1c, &[1, 0, 0, 0]);
        assert_eq!(lock(&d).config().bar_address(2), Some(0x1_e020_0000));
        bus.config_write(3, 0, 0x04, &[0, 0]);
        assert!(!bus.mmio_read(0x1_e020_0000, &mut buf));
        // Writes anywhere, of any size, never panic.
        for off in [0usize, 0x3f, 0xfe, 0xff, 0x100, usize::MAX] {
            bus.config_write(3, 0, off, &[0xff; 8]);
        }
    }

    /// A function with a 64-port I/O BAR (BAR 1) and a 4 KiB memory BAR (BAR 0) over the same
    /// scratch bytes.
    fn io_dummy() -> Arc<Mutex<Dummy>> {
        let mut config = PciConfig::new(0x1b36, 0x0005, 0xff_00_00, 0);
        config.add_memory_bar(0, 0x1000, false);
        config.add_io_bar(1, 0x40);
        Arc::new(Mutex::new(Dummy {
            config,
            mem: vec![0; 0x1000],
            written: Vec::new(),
        }))
    }

    #[test]
    fn io_bar_decodes_wherever_it_is_moved() {
        let mut bus = PciBus::new_pc();
        let d = io_dummy();
        assert!(bus.insert(3, d.clone()));
        assert_eq!(bus.assign_resources(), PCI_IO_BASE + 0x40);
        let bus = Arc::new(Mutex::new(bus));
        let mut io = PciIoWindow::new(bus.clone());
        let mut b = [0u8; 2];
        assert!(io.bar_write(PCI_IO_BASE + 2, &[0x5a, 0xa5]));
        for base in [0xd000u32, 0x1000, 0xffc0] {
            lock(&bus).config_write(3, 0, 0x14, &base.to_le_bytes());
            let base = u64::from(base);
            assert!(io.bar_read(base + 2, &mut b), "{base:#x}");
            assert_eq!(b, [0x5a, 0xa5]);
            assert!(io.bar_write(base + 0x3e, &[1, 2]));
            assert!(!io.bar_read(base + 0x3f, &mut b), "straddles the end");
            assert!(!io.bar_read(PCI_IO_BASE + 2, &mut b), "moved away");
        }
        // I/O decode off in the command register, then on again.
        lock(&bus).config_write(3, 0, COMMAND, &[COMMAND_MEMORY as u8]);
        assert!(!io.bar_read(0xffc0, &mut b));
        let mut m = [0u8; 2];
        assert!(
            lock(&bus).mmio_read(PCI_MMIO_BASE + 2, &mut m),
            "memory still on"
        );
        lock(&bus).config_write(3, 0, COMMAND, &[(COMMAND_IO | COMMAND_MEMORY) as u8]);
        assert!(io.bar_read(0xffc0, &mut b));
        // Port 0 (unprogrammed) and a BAR above the 64 KiB of ports: never decoded.
        lock(&bus).config_write(3, 0, 0x14, &0u32.to_le_bytes());
        assert!(!io.bar_read(0, &mut b));
        lock(&bus).config_write(3, 0, 0x14, &0x1_0000u32.to_le_bytes());
        assert_eq!(lock(&d).config().bar_address(1), Some(0x1_0000));
        assert!(!io.bar_read(0x1_0000, &mut b));
        assert!(!io.bar_read(0, &mut b));
        // A memory BAR moved out of the old window (below it, in the 32-bit hole) decodes.
        lock(&bus).config_write(3, 0, 0x10, &0xc000_0000u32.to_le_bytes());
        let mut mmio = PciMmioWindow::new(bus.clone());
        assert!(mmio.bar_read(0xc000_0002, &mut m));
        assert_eq!(m, [0x5a, 0xa5]);
        assert!(!mmio.bar_read(PCI_MMIO_BASE + 2, &mut m));
    }

    #[test]
    fn restored_config_space_decodes_its_bars() {
        let src = io_dummy();
        lock(&src)
            .config_mut()
            .write(0x14, &0x1000u32.to_le_bytes());
        lock(&src)
            .config_mut()
            .write(0x10, &0xd000_0000u32.to_le_bytes());
        lock(&src).config_mut().write(COMMAND, &[0x03]);
        let state = lock(&src).config().state();
        let mut bus = PciBus::new_pc();
        let d = io_dummy();
        assert!(bus.insert(5, d.clone()));
        bus.assign_resources();
        lock(&d).mem[4] = 0x77;
        lock(&d).config_mut().restore(&state).unwrap();
        let bus = Arc::new(Mutex::new(bus));
        let mut b = [0u8; 1];
        assert!(PciIoWindow::new(bus.clone()).bar_read(0x1004, &mut b));
        assert_eq!(b, [0x77]);
        assert!(!PciIoWindow::new(bus.clone()).bar_read(PCI_IO_BASE + 4, &mut b));
        assert!(PciMmioWindow::new(bus.clone()).bar_read(0xd000_0004, &mut b));
        assert!(!PciMmioWindow::new(bus).bar_read(PCI_MMIO_BASE + 4, &mut b));
    }

    #[test]
    fn intx_swizzle() {
        // As QEMU's PIIX3 with SeaBIOS's PIRQ A–D = 10, 10, 11, 11.
        assert_eq!(intx_irq(1, 1), 10);
        assert_eq!(intx_irq(2, 1), 10);
        assert_eq!(intx_irq(3, 1), 11);
        assert_eq!(intx_irq(4, 1), 11);
        assert_eq!(intx_irq(4, 3), 10);
        assert_eq!(intx_irq(0, 1), 11);
    }

    #[test]
    fn capabilities_chain() {
        let mut c = PciConfig::new(1, 2, 0, 0);
        let a = c.add_capability(&[0x11, 0, 1, 2, 3], &[0, 0, 0xff]);
        let b = c.add_capability(&[0x09, 0, 16], &[]);
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(c.bytes[CAPABILITIES_POINTER], 0x40);
        assert_eq!(c.bytes[0x41], 0x48);
        assert_eq!(c.bytes[0x49], 0);
        assert_ne!(c.u16(STATUS) & STATUS_CAP_LIST, 0);
        c.write(0x40, &[0xaa, 0xaa, 0xaa, 0xaa]);
        assert_eq!(&c.bytes[0x40..0x44], &[0x11, 0x48, 0xaa, 2]);
    }

    #[test]
    fn config_save_restore() {
        let d = dummy();
        let mut src = lock(&d);
        src.config_mut().write(0x10, &0xe000_1000u32.to_le_bytes());
        src.config_mut().write(0x04, &[0x06, 0]);
        let state = src.config().state();
        let json = serde_json::to_string(&state).unwrap();
        let state: PciConfigState = serde_json::from_str(&json).unwrap();
        let fresh = dummy();
        let mut dst = lock(&fresh);
        dst.config_mut().restore(&state).unwrap();
        assert_eq!(dst.config().state(), src.config().state());
        assert_eq!(dst.config().bar_address(0), Some(0xe000_1000));
        let mut bad = state.clone();
        bad.bytes[0] ^= 1;
        assert_eq!(
            dst.config_mut().restore(&bad),
            Err(PciConfigError::ReadOnly(0))
        );
        bad.bytes.pop();
        assert_eq!(
            dst.config_mut().restore(&bad),
            Err(PciConfigError::Size(255))
        );
    }
}
