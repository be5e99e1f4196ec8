//! An Intel VT-d IOMMU (QEMU's `-device intel-iommu`): DMA remapping with second-level page
//! tables (legacy-mode root and context tables) and interrupt remapping, for the q35 machine.
//!
//! Registers sit at 0xfed90000 like QEMU's, at the offsets of the VT-d specification; the DMAR
//! ACPI table describes one DRHD with `INCLUDE_PCI_ALL`. What is implemented:
//!
//! * **DMA remapping** (`GCMD.TE`): the root table latched by `GCMD.SRTP` (legacy format),
//!   context entries with translation type 0 (second-level page walk, 3 levels for 39-bit or 4
//!   for 48-bit address widths, 2 MiB and 1 GiB superpages) and 2 (pass-through). Nothing is
//!   cached: every DMA walks the tables, so the invalidations have nothing to drop.
//! * **Interrupt remapping** (`GCMD.IRE`, `GCMD.SIRTP`): remappable-format MSIs (and IOAPIC
//!   entries, which become MSIs) are looked up in the IRTE table; compatibility-format
//!   interrupts pass only with `GCMD.CFI`. xAPIC destinations only (`eim=off`); posted
//!   interrupts are refused (fault). PCI requesters are source-ID validated as the IRTE says;
//!   the IOAPIC's messages are not (they carry no requester ID, as on QEMU).
//! * **Invalidation**: register-based context and IOTLB invalidation and the queued
//!   invalidation interface (`GCMD.QIE`, 128-bit descriptors: context-cache, IOTLB, interrupt
//!   entry cache and wait descriptors with status write and interrupt flag). A descriptor of
//!   another type stops the queue with `FSTS.IQE`.
//! * **Faults**: one fault recording register (at 0x220); a primary fault sets `FSTS.PPF` and
//!   sends the fault event (`FEDATA`/`FEADDR`) unless `FECTL.IM`; a second fault before the
//!   first is cleared sets `FSTS.PFO`. Faults of context entries or IRTEs with their
//!   fault-processing-disable bit are not recorded.
//!
//! Not implemented (and not advertised in CAP/ECAP): scalable mode, first-level tables, the
//! device-TLB, page-request, protected memory regions, the advanced fault log, posted interrupts,
//! x2APIC (EIM), caching mode.
//!
//! Lock order: the IOMMU's mutex is a leaf but for guest RAM: it is taken under the big lock
//! (its registers), a PCI function (its DMA and MSIs) or the IOAPIC (remapping its messages).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sync::lock;

use crate::{fill_le, le_value, BusDevice, GuestRam, MsiTarget, VmRequest};

/// Where QEMU's q35 puts the VT-d registers.
pub const IOMMU_BASE: u64 = 0xfed9_0000;
/// Length of the register page.
pub const IOMMU_SIZE: u64 = 0x1000;

const REGS_SIZE: usize = 0x230;

const VER: usize = 0x00;
const CAP: usize = 0x08;
const ECAP: usize = 0x10;
const GCMD: usize = 0x18;
const GSTS: usize = 0x1c;
const RTADDR: usize = 0x20;
const CCMD: usize = 0x28;
const FSTS: usize = 0x34;
const FECTL: usize = 0x38;
const FEDATA: usize = 0x3c;
const FEADDR: usize = 0x40;
const FEUADDR: usize = 0x44;
const IQH: usize = 0x80;
const IQT: usize = 0x88;
const IQA: usize = 0x90;
const ICS: usize = 0x9c;
const IECTL: usize = 0xa0;
const IEDATA: usize = 0xa4;
const IEADDR: usize = 0xa8;
const IEUADDR: usize = 0xac;
const IRTA: usize = 0xb8;
const IVA: usize = 0x200;
const IOTLB: usize = 0x208;
const FRCD: usize = 0x220;

const GCMD_TE: u32 = 1 << 31;
const GCMD_SRTP: u32 = 1 << 30;
const GCMD_QIE: u32 = 1 << 26;
const GCMD_IRE: u32 = 1 << 25;
const GCMD_SIRTP: u32 = 1 << 24;
const GCMD_CFI: u32 = 1 << 23;

const FSTS_PFO: u32 = 1 << 0;
const FSTS_PPF: u32 = 1 << 1;
const FSTS_IQE: u32 = 1 << 4;
const INT_MASK: u32 = 1 << 31;
const INT_PENDING: u32 = 1 << 30;
const FRCD_F: u64 = 1 << 63;

const CAP_SAGAW_39: u64 = 0x2 << 8;
const CAP_SAGAW_48: u64 = 0x4 << 8;
const CAP_SLLPS: u64 = (1 << 34) | (1 << 35);
const CAP_PSI: u64 = 1 << 39;
const CAP_ND_64K: u64 = 6;
const CAP_FRO: u64 = ((FRCD / 16) as u64) << 24;
const ECAP_QI: u64 = 1 << 1;
const ECAP_IR: u64 = 1 << 3;
const ECAP_PT: u64 = 1 << 6;
const ECAP_IRO: u64 = ((IVA / 16) as u64) << 8;
const ECAP_MHMV: u64 = 0xf << 20;

const PTE_R: u64 = 1 << 0;
const PTE_W: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// VT-d fault reasons (the specification's appendix A), as recorded in `FRCD.FR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FaultReason {
    /// Root entry not present.
    RootNotPresent = 0x1,
    /// Context entry not present.
    ContextNotPresent = 0x2,
    /// Context entry invalid (translation type, address width).
    ContextInvalid = 0x3,
    /// Input address beyond the address width.
    AddressBeyondWidth = 0x4,
    /// Write to a page without write permission (or not present).
    Write = 0x5,
    /// Read of a page without read permission (or not present).
    Read = 0x6,
    /// A paging entry could not be read.
    PagingEntryAccess = 0x7,
    /// The root table could not be read.
    RootTableAccess = 0x8,
    /// The context table could not be read.
    ContextTableAccess = 0x9,
    /// A reserved bit set in a paging entry.
    PagingEntryReserved = 0xc,
    /// An interrupt request with reserved fields set.
    IrRequestReserved = 0x20,
    /// Interrupt index beyond the table.
    IrIndexOverflow = 0x21,
    /// IRTE not present.
    IrEntryNotPresent = 0x22,
    /// The IRTE could not be read.
    IrTableAccess = 0x23,
    /// Reserved or unsupported IRTE fields (posted interrupts).
    IrEntryReserved = 0x24,
    /// A compatibility-format interrupt while they are blocked.
    IrCompatBlocked = 0x25,
    /// Source-ID validation failed.
    IrSourceId = 0x26,
}

/// A DMA or interrupt that the IOMMU blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("vt-d fault {reason:?} (source {source_id:#06x}, address {address:#x})")]
pub struct IommuFault {
    /// Why.
    pub reason: FaultReason,
    /// Requester ID.
    pub source_id: u16,
    /// DMA address (or interrupt index << 48).
    pub address: u64,
    /// Recording suppressed by the context entry's or IRTE's fault-processing-disable bit.
    pub suppressed: bool,
}

/// Errors of the IOMMU's configuration and state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IntelIommuError {
    /// `aw-bits` other than 39 or 48.
    #[error("intel-iommu: aw-bits={0} is not supported (39 or 48)")]
    AwBits(u8),
    /// The saved registers are not the right size.
    #[error("intel-iommu state with {0} register bytes (expected {REGS_SIZE})")]
    Size(usize),
    /// A read-only identification register differs (another configuration).
    #[error("intel-iommu state has register {0:#x} of another configuration")]
    Config(usize),
    /// The saved queue head is not inside the queue.
    #[error("intel-iommu state has queue head {0:#x} past its queue")]
    QueueHead(u64),
}

/// What the guest asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuConfig {
    /// Guest address width: 39 (3-level tables) or 48 (also 4-level).
    pub aw_bits: u8,
    /// Interrupt remapping (`intremap=on`).
    pub intremap: bool,
}

impl Default for IommuConfig {
    fn default() -> Self {
        Self {
            aw_bits: 39,
            intremap: false,
        }
    }
}

/// The guest-visible state: the register file, the latched table pointers and the
/// invalidation queue head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntelIommuState {
    /// The registers, 0x000–0x22f, little-endian.
    pub regs: Vec<u8>,
    /// Root table address latched by the last SRTP.
    pub root: u64,
    /// Interrupt remapping table register latched by the last SIRTP.
    pub irta: u64,
}

/// The IOMMU.
pub struct IntelIommu {
    config: IommuConfig,
    regs: [u8; REGS_SIZE],
    wmask: [u8; REGS_SIZE],
    w1c: [u8; REGS_SIZE],
    root: u64,
    irta: u64,
    ram: Arc<dyn GuestRam>,
    /// Where fault and invalidation events go (not remapped).
    events: Arc<dyn MsiTarget>,
}

impl IntelIommu {
    /// An IOMMU after reset, walking tables in `ram` and sending its own event interrupts to
    /// `events`.
    pub fn new(
        config: IommuConfig,
        ram: Arc<dyn GuestRam>,
        events: Arc<dyn MsiTarget>,
    ) -> Result<Self, IntelIommuError> {
        let sagaw = match config.aw_bits {
            39 => CAP_SAGAW_39,
            48 => CAP_SAGAW_39 | CAP_SAGAW_48,
            n => return Err(IntelIommuError::AwBits(n)),
        };
        let mut s = Self {
            config,
            regs: [0; REGS_SIZE],
            wmask: [0; REGS_SIZE],
            w1c: [0; REGS_SIZE],
            root: 0,
            irta: 0,
            ram,
            events,
        };
        s.set(VER, 4, 0x10);
        let mgaw = u64::from(config.aw_bits - 1) << 16;
        s.set(
            CAP,
            8,
            CAP_ND_64K | sagaw | mgaw | CAP_FRO | CAP_SLLPS | CAP_PSI,
        );
        let ir = if config.intremap { ECAP_IR } else { 0 };
        s.set(ECAP, 8, ECAP_QI | ECAP_PT | ECAP_IRO | ECAP_MHMV | ir);
        s.mask(RTADDR, 8, !0xfff, 0);
        s.mask(CCMD, 8, 0xe000_0003_ffff_ffff, 0);
        s.mask(FSTS, 4, 0, u64::from(FSTS_PFO | FSTS_IQE | 0x60));
        s.set(FECTL, 4, u64::from(INT_MASK));
        s.mask(FECTL, 4, u64::from(INT_MASK), 0);
        s.mask(FEDATA, 4, 0xffff_ffff, 0);
        s.mask(FEADDR, 4, 0xffff_fffc, 0);
        s.mask(FEUADDR, 4, 0xffff_ffff, 0);
        s.mask(IQT, 8, 0x7fff0, 0);
        s.mask(IQA, 8, !0xff8, 0);
        s.mask(ICS, 4, 0, 1);
        s.set(IECTL, 4, u64::from(INT_MASK));
        s.mask(IECTL, 4, u64::from(INT_MASK), 0);
        s.mask(IEDATA, 4, 0xffff_ffff, 0);
        s.mask(IEADDR, 4, 0xffff_fffc, 0);
        s.mask(IEUADDR, 4, 0xffff_ffff, 0);
        if config.intremap {
            s.mask(IRTA, 8, !0xff0 & !(1 << 11), 0);
        }
        s.mask(IVA, 8, !0xf80, 0);
        s.mask(IOTLB, 8, 0xb003_ffff_0000_0000, 0);
        s.mask(FRCD + 8, 8, 0, FRCD_F);
        s.mask(GCMD, 4, 0xffff_ffff, 0);
        Ok(s)
    }

    fn set(&mut self, off: usize, len: usize, v: u64) {
        self.regs[off..off + len].copy_from_slice(&v.to_le_bytes()[..len]);
    }

    fn mask(&mut self, off: usize, len: usize, wmask: u64, w1c: u64) {
        self.wmask[off..off + len].copy_from_slice(&wmask.to_le_bytes()[..len]);
        self.w1c[off..off + len].copy_from_slice(&w1c.to_le_bytes()[..len]);
    }

    fn get(&self, off: usize, len: usize) -> u64 {
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(&self.regs[off..off + len]);
        u64::from_le_bytes(b)
    }

    fn get32(&self, off: usize) -> u32 {
        self.get(off, 4) as u32
    }

    fn status(&self) -> u32 {
        self.get32(GSTS)
    }

    /// The configuration it was built with.
    pub fn config(&self) -> IommuConfig {
        self.config
    }

    fn handle_gcmd(&mut self, cmd: u32) {
        let mut sts = self.status();
        if cmd & GCMD_SRTP != 0 {
            self.root = self.get(RTADDR, 8) & !0xfff;
            sts |= GCMD_SRTP;
        }
        if cmd & GCMD_SIRTP != 0 && self.config.intremap {
            self.irta = self.get(IRTA, 8);
            sts |= GCMD_SIRTP;
        }
        for bit in [GCMD_TE, GCMD_CFI, GCMD_IRE] {
            if bit != GCMD_TE && !self.config.intremap {
                continue;
            }
            if cmd & bit != 0 {
                sts |= bit;
            } else {
                sts &= !bit;
            }
        }
        if cmd & GCMD_QIE != 0 {
            sts |= GCMD_QIE;
        } else if sts & GCMD_QIE != 0 {
            // The queue can only be turned off once empty; its head then restarts at 0.
            if self.get(IQH, 8) == self.get(IQT, 8) {
                sts &= !GCMD_QIE;
                self.set(IQH, 8, 0);
            }
        }
        self.set(GSTS, 4, u64::from(sts));
        self.set(GCMD, 4, 0);
    }

    /// The DMA translation of `iova` for requester `sid` (one page's worth: the result is
    /// valid up to the end of the 4 KiB page holding `iova`).
    pub fn translate(&self, sid: u16, iova: u64, write: bool) -> Result<u64, IommuFault> {
        if self.status() & GCMD_TE == 0 {
            return Ok(iova);
        }
        let fault = |reason, suppressed| IommuFault {
            reason,
            source_id: sid,
            address: iova & !0xfff,
            suppressed,
        };
        let bus = u64::from(sid >> 8);
        let devfn = u64::from(sid & 0xff);
        let re = self
            .read_u64(self.root + bus * 16)
            .ok_or(fault(FaultReason::RootTableAccess, false))?;
        if re & 1 == 0 {
            return Err(fault(FaultReason::RootNotPresent, false));
        }
        let ctx = (re & PTE_ADDR) + devfn * 16;
        let (lo, hi) = match (self.read_u64(ctx), self.read_u64(ctx + 8)) {
            (Some(lo), Some(hi)) => (lo, hi),
            _ => return Err(fault(FaultReason::ContextTableAccess, false)),
        };
        if lo & 1 == 0 {
            return Err(fault(FaultReason::ContextNotPresent, false));
        }
        let fpd = lo & 2 != 0;
        match (lo >> 2) & 3 {
            0 => {}
            2 => return Ok(iova),
            _ => return Err(fault(FaultReason::ContextInvalid, fpd)),
        }
        let aw = hi & 7;
        let levels = match aw {
            1 => 3,
            2 if self.config.aw_bits >= 48 => 4,
            _ => return Err(fault(FaultReason::ContextInvalid, fpd)),
        };
        let width = 12 + 9 * levels;
        if iova >> width != 0 || iova >> self.config.aw_bits != 0 {
            return Err(fault(FaultReason::AddressBeyondWidth, fpd));
        }
        let denied = if write {
            FaultReason::Write
        } else {
            FaultReason::Read
        };
        let need = if write { PTE_W } else { PTE_R };
        let mut table = lo & PTE_ADDR;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let index = (iova >> shift) & 0x1ff;
            let pte = self
                .read_u64(table + index * 8)
                .ok_or(fault(FaultReason::PagingEntryAccess, fpd))?;
            if pte & need == 0 {
                return Err(fault(denied, fpd));
            }
            let leaf = level == 1 || pte & PTE_PS != 0;
            if leaf {
                if level > 3 {
                    return Err(fault(FaultReason::PagingEntryReserved, fpd));
                }
                let size_mask = (1u64 << shift) - 1;
                return Ok((pte & PTE_ADDR & !size_mask) | (iova & size_mask));
            }
            table = pte & PTE_ADDR;
        }
        Err(fault(FaultReason::PagingEntryReserved, fpd))
    }

    fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.ram.read(gpa, &mut b).then(|| u64::from_le_bytes(b))
    }

    /// Interrupt remapping of an MSI write (address, data) from `source` (`None`: the IOAPIC).
    /// Returns the compatibility-format message to deliver.
    pub fn remap(
        &self,
        source: Option<u16>,
        address: u64,
        data: u32,
    ) -> Result<(u64, u32), IommuFault> {
        if !self.config.intremap || self.status() & GCMD_IRE == 0 {
            return Ok((address, data));
        }
        let sid = source.unwrap_or(0);
        let fault = |reason, index: u64, suppressed| IommuFault {
            reason,
            source_id: sid,
            address: index << 48,
            suppressed,
        };
        if address & (1 << 4) == 0 {
            return if self.status() & GCMD_CFI != 0 {
                Ok((address, data))
            } else {
                Err(fault(FaultReason::IrCompatBlocked, 0, false))
            };
        }
        if address >> 32 != 0 {
            return Err(fault(FaultReason::IrRequestReserved, 0, false));
        }
        let handle = ((address >> 5) & 0x7fff) | ((address >> 2) & 1) << 15;
        let index = if address & (1 << 3) != 0 {
            handle + u64::from(data & 0xffff)
        } else {
            handle
        };
        let entries = 1u64 << ((self.irta & 0xf) + 1);
        if index >= entries {
            return Err(fault(FaultReason::IrIndexOverflow, index, false));
        }
        let at = (self.irta & !0xfff) + index * 16;
        let (lo, hi) = match (self.read_u64(at), self.read_u64(at + 8)) {
            (Some(lo), Some(hi)) => (lo, hi),
            _ => return Err(fault(FaultReason::IrTableAccess, index, false)),
        };
        let fpd = lo & 2 != 0;
        if lo & 1 == 0 {
            return Err(fault(FaultReason::IrEntryNotPresent, index, fpd));
        }
        // Posted (IM) and reserved bits 12–14 and 24–31.
        if lo & 0xff00_f000 != 0 {
            return Err(fault(FaultReason::IrEntryReserved, index, fpd));
        }
        if let Some(sid) = source {
            let want = (hi & 0xffff) as u16;
            let ok = match (hi >> 18) & 3 {
                0 => true,
                1 => {
                    let mask = [0xffff, 0xfffb, 0xfff9, 0xfff8][((hi >> 16) & 3) as usize];
                    want & mask == sid & mask
                }
                2 => (want >> 8..=want & 0xff).contains(&(sid >> 8)),
                _ => return Err(fault(FaultReason::IrEntryReserved, index, fpd)),
            };
            if !ok {
                return Err(fault(FaultReason::IrSourceId, index, fpd));
            }
        }
        let dest = (lo >> 40) & 0xff;
        let address = 0xfee0_0000 | dest << 12 | ((lo >> 3) & 1) << 3 | ((lo >> 2) & 1) << 2;
        let trigger = (lo >> 4) & 1;
        let data = ((lo >> 16) & 0xff) | ((lo >> 5) & 7) << 8 | trigger << 14 | trigger << 15;
        Ok((address, data as u32))
    }

    /// Records a fault (unless suppressed) and raises the fault event.
    pub fn record_fault(&mut self, f: &IommuFault) {
        log::debug!("intel-iommu: {f}");
        if f.suppressed {
            return;
        }
        let mut fsts = self.get32(FSTS);
        if self.get(FRCD + 8, 8) & FRCD_F != 0 {
            fsts |= FSTS_PFO;
            self.set(FSTS, 4, u64::from(fsts));
            return;
        }
        let read = matches!(f.reason, FaultReason::Read) as u64;
        self.set(FRCD, 8, f.address & !0xfff);
        self.set(
            FRCD + 8,
            8,
            u64::from(f.source_id) | (f.reason as u64) << 32 | read << 62 | FRCD_F,
        );
        self.set(FSTS, 4, u64::from(fsts | FSTS_PPF));
        self.raise_event(FECTL, FEDATA, FEADDR, FEUADDR);
    }

    fn raise_event(&mut self, ctl: usize, data: usize, addr: usize, uaddr: usize) {
        let c = self.get32(ctl);
        if c & INT_MASK != 0 {
            self.set(ctl, 4, u64::from(c | INT_PENDING));
        } else {
            let a = self.get(addr, 4) | self.get(uaddr, 4) << 32;
            self.events.send(a, self.get32(data));
            self.set(ctl, 4, u64::from(c & !INT_PENDING));
        }
    }

    fn unmasked(&mut self, ctl: usize, data: usize, addr: usize, uaddr: usize) {
        let c = self.get32(ctl);
        if c & INT_MASK == 0 && c & INT_PENDING != 0 {
            self.raise_event(ctl, data, addr, uaddr);
        }
    }

    /// Processes the invalidation queue from its head to its tail.
    fn process_queue(&mut self) {
        if self.status() & GCMD_QIE == 0 || self.get32(FSTS) & FSTS_IQE != 0 {
            return;
        }
        let iqa = self.get(IQA, 8);
        let entries = 256u64 << (iqa & 7);
        let base = iqa & !0xfff;
        let tail = (self.get(IQT, 8) >> 4) % entries;
        let mut head = (self.get(IQH, 8) >> 4) % entries;
        while head != tail {
            let at = base + head * 16;
            let ok = match (self.read_u64(at), self.read_u64(at + 8)) {
                (Some(lo), Some(hi)) => self.descriptor(lo, hi),
                _ => false,
            };
            if !ok {
                log::debug!("intel-iommu: invalidation queue error at entry {head}");
                let fsts = self.get32(FSTS) | FSTS_IQE;
                self.set(FSTS, 4, u64::from(fsts));
                self.record_queue_error();
                break;
            }
            head = (head + 1) % entries;
        }
        self.set(IQH, 8, head << 4);
    }

    fn record_queue_error(&mut self) {
        self.raise_event(FECTL, FEDATA, FEADDR, FEUADDR);
    }

    /// One 128-bit descriptor; false if it is invalid.
    fn descriptor(&mut self, lo: u64, hi: u64) -> bool {
        if lo & 0xe00 != 0 {
            return false;
        }
        match lo & 0xf {
            // Context-cache, IOTLB and interrupt-entry-cache invalidations: nothing is cached.
            1 | 2 | 4 => true,
            5 => {
                // Invalidation wait: status write, interrupt flag.
                if lo & (1 << 5) != 0 {
                    let status = ((lo >> 32) as u32).to_le_bytes();
                    if hi & 3 != 0 || !self.ram.write(hi, &status) {
                        return false;
                    }
                }
                if lo & (1 << 4) != 0 {
                    self.set(ICS, 4, 1);
                    self.raise_event(IECTL, IEDATA, IEADDR, IEUADDR);
                }
                true
            }
            _ => false,
        }
    }

    fn write_dword(&mut self, off: usize, v: u32) {
        let old = self.get32(off);
        let wm = u32::from_le_bytes(self.wmask[off..off + 4].try_into().unwrap_or([0; 4]));
        let w1c = u32::from_le_bytes(self.w1c[off..off + 4].try_into().unwrap_or([0; 4]));
        let new = ((old & !wm) | (v & wm)) & !(v & w1c);
        self.set(off, 4, u64::from(new));
        match off {
            GCMD => self.handle_gcmd(v),
            o if o == CCMD + 4 && v & (1 << 31) != 0 => {
                // Context invalidation done at once: actual granularity = requested.
                let g = (v >> 29) & 3;
                self.set(
                    CCMD + 4,
                    4,
                    u64::from((v & 0x7fff_ffff & !(3 << 27)) | g << 27),
                );
            }
            o if o == IOTLB + 4 && v & (1 << 31) != 0 => {
                let g = (v >> 28) & 3;
                self.set(
                    IOTLB + 4,
                    4,
                    u64::from((v & 0x3003_ffff & !(3 << 25)) | g << 25),
                );
            }
            IQT => self.process_queue(),
            FSTS if v & FSTS_IQE != 0 => self.process_queue(),
            o if o == FRCD + 12 && self.get(FRCD + 8, 8) & FRCD_F == 0 => {
                let fsts = self.get32(FSTS) & !FSTS_PPF;
                self.set(FSTS, 4, u64::from(fsts));
            }
            FECTL => self.unmasked(FECTL, FEDATA, FEADDR, FEUADDR),
            IECTL => self.unmasked(IECTL, IEDATA, IEADDR, IEUADDR),
            ICS if self.get32(ICS) & 1 == 0 => {
                let c = self.get32(IECTL) & !INT_PENDING;
                self.set(IECTL, 4, u64::from(c));
            }
            _ => {}
        }
    }

    /// A snapshot of the guest-visible state.
    pub fn state(&self) -> IntelIommuState {
        IntelIommuState {
            regs: self.regs.to_vec(),
            root: self.root,
            irta: self.irta,
        }
    }

    /// Applies a saved state (checked first; nothing changes on error).
    pub fn restore(&mut self, s: &IntelIommuState) -> Result<(), IntelIommuError> {
        if s.regs.len() != REGS_SIZE {
            return Err(IntelIommuError::Size(s.regs.len()));
        }
        for off in [VER, CAP, ECAP] {
            if s.regs[off..off + 8] != self.regs[off..off + 8] {
                return Err(IntelIommuError::Config(off));
            }
        }
        let iqa = u64::from_le_bytes(s.regs[IQA..IQA + 8].try_into().unwrap_or([0; 8]));
        let iqh = u64::from_le_bytes(s.regs[IQH..IQH + 8].try_into().unwrap_or([0; 8]));
        if iqh & 0xf != 0 || iqh >> 4 >= 256 << (iqa & 7) {
            return Err(IntelIommuError::QueueHead(iqh));
        }
        self.regs.copy_from_slice(&s.regs);
        self.root = s.root & !0xfff;
        self.irta = s.irta;
        Ok(())
    }
}

impl BusDevice for IntelIommu {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let off = offset as usize;
        let v = if off + data.len() <= REGS_SIZE && matches!(data.len(), 4 | 8) && off % 4 == 0 {
            self.get(off, data.len())
        } else {
            0
        };
        fill_le(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let off = offset as usize;
        if off + data.len() > REGS_SIZE || !matches!(data.len(), 4 | 8) || off % 4 != 0 {
            return None;
        }
        let v = le_value(data);
        self.write_dword(off, v as u32);
        if data.len() == 8 {
            self.write_dword(off + 4, (v >> 32) as u32);
        }
        None
    }
}

/// MSIs through the IOMMU's interrupt remapping on their way to `out`.
pub struct RemappedMsi {
    iommu: Arc<Mutex<IntelIommu>>,
    out: Arc<dyn MsiTarget>,
}

impl RemappedMsi {
    /// Remaps with `iommu`, delivers to `out`.
    pub fn new(iommu: Arc<Mutex<IntelIommu>>, out: Arc<dyn MsiTarget>) -> Self {
        Self { iommu, out }
    }
}

impl MsiTarget for RemappedMsi {
    fn translate(&self, source: Option<u16>, address: u64, data: u32) -> Option<(u64, u32)> {
        let mut iommu = lock(&self.iommu);
        match iommu.remap(source, address, data) {
            Ok(m) => Some(m),
            Err(f) => {
                iommu.record_fault(&f);
                None
            }
        }
    }

    fn send(&self, address: u64, data: u32) {
        self.out.send(address, data);
    }

    fn set_ioapic_route(&self, pin: u8, msi: Option<(u64, u32)>) {
        self.out.set_ioapic_route(pin, msi);
    }
}

/// Errors of a device's DMA.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DmaError {
    /// The IOMMU blocked it (the fault is recorded).
    #[error(transparent)]
    Fault(#[from] IommuFault),
    /// The (translated) address is not guest RAM.
    #[error("dma to {0:#x}, which is not guest ram")]
    NotRam(u64),
}

/// A PCI function's view of memory: through the IOMMU when there is one.
pub struct DmaSpace {
    ram: Arc<dyn GuestRam>,
    iommu: Option<Arc<Mutex<IntelIommu>>>,
}

impl DmaSpace {
    /// Memory as seen through `iommu` (or directly).
    pub fn new(ram: Arc<dyn GuestRam>, iommu: Option<Arc<Mutex<IntelIommu>>>) -> Self {
        Self { ram, iommu }
    }

    fn access(
        &self,
        sid: u16,
        addr: u64,
        len: usize,
        write: bool,
        mut op: impl FnMut(u64, std::ops::Range<usize>) -> bool,
    ) -> Result<(), DmaError> {
        let mut done = 0usize;
        while done < len {
            let a = addr.wrapping_add(done as u64);
            let chunk = ((0x1000 - (a & 0xfff)) as usize).min(len - done);
            let gpa = match &self.iommu {
                Some(iommu) => {
                    let mut iommu = lock(iommu);
                    iommu.translate(sid, a, write).inspect_err(|f| {
                        iommu.record_fault(f);
                    })?
                }
                None => a,
            };
            if !op(gpa, done..done + chunk) {
                return Err(DmaError::NotRam(gpa));
            }
            done += chunk;
        }
        Ok(())
    }

    /// A DMA read by requester `sid`.
    pub fn read(&self, sid: u16, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let ram = self.ram.clone();
        let len = buf.len();
        self.access(sid, addr, len, false, |gpa, r| ram.read(gpa, &mut buf[r]))
    }

    /// A DMA write by requester `sid`.
    pub fn write(&self, sid: u16, addr: u64, buf: &[u8]) -> Result<(), DmaError> {
        let ram = self.ram.clone();
        self.access(sid, addr, buf.len(), true, |gpa, r| ram.write(gpa, &buf[r]))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ioapic::tests::RecordingMsi;

    /// 1 MiB of guest RAM at 0.
    pub struct TestRam(pub Mutex<Vec<u8>>);

    impl TestRam {
        pub fn new() -> Arc<Self> {
            Arc::new(Self(Mutex::new(vec![0; 1 << 20])))
        }
        pub fn put(&self, gpa: u64, v: u64) {
            assert!(self.write(gpa, &v.to_le_bytes()));
        }
    }

    impl GuestRam for TestRam {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let m = self.0.lock().unwrap();
            let Some(s) = m.get(gpa as usize..gpa as usize + buf.len()) else {
                return false;
            };
            buf.copy_from_slice(s);
            true
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> bool {
            let mut m = self.0.lock().unwrap();
            let Some(s) = m.get_mut(gpa as usize..gpa as usize + buf.len()) else {
                return false;
            };
            s.copy_from_slice(buf);
            true
        }
    }

    pub fn iommu(ram: &Arc<TestRam>) -> (Arc<RecordingMsi>, IntelIommu) {
        let ev = Arc::new(RecordingMsi::default());
        let cfg = IommuConfig {
            aw_bits: 39,
            intremap: true,
        };
        (ev.clone(), IntelIommu::new(cfg, ram.clone(), ev).unwrap())
    }

    fn w32(i: &mut IntelIommu, off: usize, v: u32) {
        i.write(off as u64, &v.to_le_bytes());
    }
    fn w64(i: &mut IntelIommu, off: usize, v: u64) {
        i.write(off as u64, &v.to_le_bytes());
    }
    fn r32(i: &mut IntelIommu, off: usize) -> u32 {
        let mut b = [0; 4];
        i.read(off as u64, &mut b);
        u32::from_le_bytes(b)
    }
    fn r64(i: &mut IntelIommu, off: usize) -> u64 {
        let mut b = [0; 8];
        i.read(off as u64, &mut b);
        u64::from_le_bytes(b)
    }

    /// Root table at 0x1000, context table for bus 0 at 0x2000, device 00:03.0 with a
    /// 3-level table at 0x3000 → 0x4000 → 0x5000 mapping IOVA 0 to 0x8000 (rw) and IOVA
    /// 0x1000 to 0x9000 read-only; IOVA 0x4000_0000 as a 2 MiB page at 0x0 ... (level 2).
    pub fn setup_tables(ram: &TestRam, i: &mut IntelIommu) {
        ram.put(0x1000, 0x2000 | 1);
        let devfn = 3 << 3;
        ram.put(0x2000 + devfn * 16, 0x3000 | 1);
        ram.put(0x2000 + devfn * 16 + 8, 1 | 0x18 << 8);
        ram.put(0x3000, 0x4000 | 3);
        ram.put(0x4000, 0x5000 | 3);
        ram.put(0x5000, 0x8000 | 3);
        ram.put(0x5008, 0x9000 | 1);
        // IOVA 0x4000_0000 (level-3 index 1) → a 2 MiB page at 0 through level 2.
        ram.put(0x3008, 0x6000 | 3);
        ram.put(0x6000, PTE_PS | 3);
        w64(i, RTADDR, 0x1000);
        w32(i, GCMD, GCMD_SRTP);
        w32(i, GCMD, GCMD_TE);
    }

    #[test]
    fn identification_registers() {
        let ram = TestRam::new();
        let (_, mut i) = iommu(&ram);
        assert_eq!((r32(&mut i, VER) >> 3) & 0xf, 2);
        let cap = r64(&mut i, CAP);
        assert_ne!(cap & CAP_SAGAW_39, 0);
        assert_eq!(cap & CAP_SLLPS, CAP_SLLPS);
        assert_eq!((cap >> 16) & 0x3f, 38, "mgaw");
        assert_eq!(((cap >> 24) & 0x3ff) * 16, FRCD as u64);
        let ecap = r64(&mut i, ECAP);
        assert_eq!(ecap & (ECAP_QI | ECAP_IR), ECAP_QI | ECAP_IR);
        assert_eq!(((ecap >> 8) & 0x3ff) * 16, IVA as u64);
        assert_eq!(r32(&mut i, FSTS), 0);
        assert_eq!(r32(&mut i, FECTL), INT_MASK);
        // Read-only registers ignore writes; odd sizes and offsets never panic.
        w64(&mut i, CAP, 0);
        assert_eq!(r64(&mut i, CAP), cap);
        i.write(0x22e, &[1, 2, 3, 4]);
        i.write(0x1, &[1, 2, 3, 4]);
        i.write(0xfff, &[1]);
        let mut b = [0u8; 2];
        i.read(0x10, &mut b);
        assert_eq!(b, [0, 0]);
        assert!(IntelIommu::new(
            IommuConfig {
                aw_bits: 40,
                intremap: false
            },
            ram,
            Arc::new(RecordingMsi::default())
        )
        .is_err());
    }

    #[test]
    fn gcmd_latches_and_status() {
        let ram = TestRam::new();
        let (_, mut i) = iommu(&ram);
        w64(&mut i, RTADDR, 0x1234_5678);
        w32(&mut i, GCMD, GCMD_SRTP);
        assert_eq!(i.root, 0x1234_5000);
        assert_eq!(r32(&mut i, GSTS), GCMD_SRTP);
        w32(&mut i, GCMD, GCMD_SRTP | GCMD_QIE);
        w64(&mut i, IRTA, 0x7000 | 0xf);
        w32(&mut i, GCMD, GCMD_SRTP | GCMD_QIE | GCMD_SIRTP);
        w32(
            &mut i,
            GCMD,
            GCMD_SRTP | GCMD_QIE | GCMD_SIRTP | GCMD_TE | GCMD_IRE,
        );
        assert_eq!(
            r32(&mut i, GSTS),
            GCMD_SRTP | GCMD_QIE | GCMD_SIRTP | GCMD_TE | GCMD_IRE
        );
        assert_eq!(r32(&mut i, GCMD), 0, "gcmd reads as zero");
        // Register-based invalidations complete at once.
        w64(&mut i, CCMD, 1 << 63 | 1 << 61);
        assert_eq!(r64(&mut i, CCMD) >> 59, 0b0101);
        w64(&mut i, IOTLB, 1 << 63 | 1 << 60);
        assert_eq!(r64(&mut i, IOTLB) >> 57, 0b01001);
    }

    #[test]
    fn second_level_translation() {
        let ram = TestRam::new();
        let (_, mut i) = iommu(&ram);
        setup_tables(&ram, &mut i);
        let sid = 3 << 3;
        assert_eq!(i.translate(sid, 0x123, true), Ok(0x8123));
        assert_eq!(i.translate(sid, 0x1ff0, false), Ok(0x9ff0));
        assert_eq!(
            i.translate(sid, 0x4012_3456, true),
            Ok(0x12_3456),
            "2 MiB page"
        );
        let f = i.translate(sid, 0x1000, true).unwrap_err();
        assert_eq!((f.reason, f.address), (FaultReason::Write, 0x1000));
        assert_eq!(
            i.translate(sid, 0x2000, false).unwrap_err().reason,
            FaultReason::Read
        );
        assert_eq!(
            i.translate(sid, 1 << 39, false).unwrap_err().reason,
            FaultReason::AddressBeyondWidth
        );
        assert_eq!(
            i.translate(4 << 3, 0, false).unwrap_err().reason,
            FaultReason::ContextNotPresent
        );
        assert_eq!(
            i.translate(1 << 8, 0, false).unwrap_err().reason,
            FaultReason::RootNotPresent
        );
        // Pass-through context entries.
        ram.put(0x2000 + 16 * 5, 0x3000 | 2 << 2 | 1);
        assert_eq!(i.translate(5, 0xabc_d000, true), Ok(0xabc_d000));
        // Translation off: identity.
        w32(&mut i, GCMD, GCMD_SRTP);
        assert_eq!(i.translate(sid, 0x123, true), Ok(0x123));
    }

    #[test]
    fn nonsense_tables_fault_without_panic() {
        let ram = TestRam::new();
        let (ev, mut i) = iommu(&ram);
        // Root table outside RAM.
        w64(&mut i, RTADDR, 0xffff_ffff_f000);
        w32(&mut i, GCMD, GCMD_SRTP);
        w32(&mut i, GCMD, GCMD_TE);
        let f = i.translate(0, 0, false).unwrap_err();
        assert_eq!(f.reason, FaultReason::RootTableAccess);
        // Context table outside RAM, then a page table outside RAM, then garbage.
        ram.put(0x1000, 0xdead_beef_0000_1001);
        w64(&mut i, RTADDR, 0x1000);
        w32(&mut i, GCMD, GCMD_SRTP | GCMD_TE);
        assert_eq!(
            i.translate(0, 0, false).unwrap_err().reason,
            FaultReason::ContextTableAccess
        );
        ram.put(0x1000, 0x2000 | 1);
        ram.put(0x2000, 0x7fff_ffff_f000 | 1);
        ram.put(0x2008, 1);
        assert_eq!(
            i.translate(0, 0, false).unwrap_err().reason,
            FaultReason::PagingEntryAccess
        );
        ram.put(0x2008, 7); // reserved address width
        assert_eq!(
            i.translate(0, 0, false).unwrap_err().reason,
            FaultReason::ContextInvalid
        );
        ram.put(0x2000, 0x3000 | 1 << 2 | 1); // device-TLB type: unsupported
        assert_eq!(
            i.translate(0, 0, false).unwrap_err().reason,
            FaultReason::ContextInvalid
        );
        // Recording: the first fault sticks, the second overflows; unmasking sends the event.
        let f = i.translate(0, 0x5000, true).unwrap_err();
        i.record_fault(&f);
        assert_eq!(r32(&mut i, FSTS) & FSTS_PPF, FSTS_PPF);
        assert_eq!(r64(&mut i, FRCD + 8) >> 32 & 0xff, 0x3);
        assert_eq!(r32(&mut i, FECTL), INT_MASK | INT_PENDING);
        i.record_fault(&f);
        assert_eq!(r32(&mut i, FSTS) & FSTS_PFO, FSTS_PFO);
        w32(&mut i, FEADDR, 0xfee0_0000);
        w32(&mut i, FEDATA, 0x44);
        w32(&mut i, FECTL, 0);
        assert_eq!(*ev.sent.lock().unwrap(), [(0xfee0_0000, 0x44)]);
        // Clearing F clears PPF.
        w32(&mut i, FRCD + 12, 1 << 31);
        w32(&mut i, FSTS, FSTS_PFO);
        assert_eq!(r32(&mut i, FSTS), 0);
        // Suppressed (FPD) faults are not recorded.
        i.record_fault(&IommuFault {
            suppressed: true,
            ..f
        });
        assert_eq!(r32(&mut i, FSTS), 0);
    }

    fn irte(ram: &TestRam, base: u64, index: u64, lo: u64, hi: u64) {
        ram.put(base + index * 16, lo);
        ram.put(base + index * 16 + 8, hi);
    }

    #[test]
    fn interrupt_remapping() {
        let ram = TestRam::new();
        let (_, mut i) = iommu(&ram);
        // Not enabled: messages pass.
        assert_eq!(i.remap(Some(0x18), 0xfee0_0010, 0), Ok((0xfee0_0010, 0)));
        w64(&mut i, IRTA, 0x7000 | 3); // 16 entries
        w32(&mut i, GCMD, GCMD_SIRTP);
        w32(&mut i, GCMD, GCMD_IRE);
        // Index 1: vector 0xee, destination APIC 2 (xAPIC: bits 47:40), full SID check 0x18.
        irte(&ram, 0x7000, 1, 1 | 0xee << 16 | 2 << 40, 0x18 | 1 << 18);
        let msi = 0xfee0_0000 | 1 << 4 | 1 << 5;
        assert_eq!(i.remap(Some(0x18), msi, 0), Ok((0xfee0_2000, 0xee)));
        // The IOAPIC's requests are not source-checked.
        assert_eq!(i.remap(None, msi, 0), Ok((0xfee0_2000, 0xee)));
        let f = i.remap(Some(0x20), msi, 0).unwrap_err();
        assert_eq!((f.reason, f.address >> 48), (FaultReason::IrSourceId, 1));
        // Level-triggered, logical, lowest priority.
        irte(
            &ram,
            0x7000,
            2,
            1 | 1 << 4 | 1 << 2 | 1 << 5 | 0x30 << 16,
            0,
        );
        assert_eq!(
            i.remap(Some(0), 0xfee0_0000 | 1 << 4 | 2 << 5, 0),
            Ok((0xfee0_0004, 0xc130))
        );
        // Sub-handle with SHV.
        assert_eq!(
            i.remap(Some(0x18), 0xfee0_0000 | 1 << 4 | 1 << 3, 1),
            Ok((0xfee0_2000, 0xee))
        );
        // Beyond the table, not present, posted, compatibility format blocked / allowed.
        let idx = |n: u64| 0xfee0_0000 | 1 << 4 | (n & 0x7fff) << 5 | (n >> 15) << 2;
        for (n, reason) in [
            (16, FaultReason::IrIndexOverflow),
            (0xffff, FaultReason::IrIndexOverflow),
            (3, FaultReason::IrEntryNotPresent),
        ] {
            assert_eq!(i.remap(Some(0), idx(n), 0).unwrap_err().reason, reason);
        }
        irte(&ram, 0x7000, 4, 1 | 1 << 15, 0);
        assert_eq!(
            i.remap(Some(0), idx(4), 0).unwrap_err().reason,
            FaultReason::IrEntryReserved
        );
        assert_eq!(
            i.remap(Some(0), 0xfee0_0000, 0x30).unwrap_err().reason,
            FaultReason::IrCompatBlocked
        );
        w32(&mut i, GCMD, GCMD_IRE | GCMD_CFI);
        assert_eq!(i.remap(Some(0), 0xfee0_0000, 0x30), Ok((0xfee0_0000, 0x30)));
        // A table outside RAM.
        w64(&mut i, IRTA, 0xffff_ffff_f000 | 0xf);
        w32(&mut i, GCMD, GCMD_IRE | GCMD_SIRTP);
        assert_eq!(
            i.remap(Some(0), idx(1), 0).unwrap_err().reason,
            FaultReason::IrTableAccess
        );
    }

    #[test]
    fn invalidation_queue() {
        let ram = TestRam::new();
        let (ev, mut i) = iommu(&ram);
        w64(&mut i, IQA, 0xa000);
        w32(&mut i, GCMD, GCMD_QIE);
        // Context, IOTLB, IEC invalidations, then a wait with status write and interrupt.
        ram.put(0xa000, 1);
        ram.put(0xa010, 2);
        ram.put(0xa020, 4);
        ram.put(0xa030, 5 | 1 << 5 | 1 << 4 | 0x1234_5678 << 32);
        ram.put(0xa038, 0xb000);
        w32(&mut i, IECTL, 0);
        w32(&mut i, IEADDR, 0xfee0_0000);
        w32(&mut i, IEDATA, 0x55);
        w64(&mut i, IQT, 4 << 4);
        assert_eq!(r64(&mut i, IQH), 4 << 4);
        let mut b = [0; 4];
        assert!(ram.read(0xb000, &mut b));
        assert_eq!(u32::from_le_bytes(b), 0x1234_5678);
        assert_eq!(r32(&mut i, ICS), 1);
        assert_eq!(*ev.sent.lock().unwrap(), [(0xfee0_0000, 0x55)]);
        w32(&mut i, ICS, 1);
        assert_eq!(r32(&mut i, ICS), 0);
        // An unknown descriptor stops the queue at it with IQE.
        ram.put(0xa040, 0xf);
        w64(&mut i, IQT, 6 << 4);
        assert_eq!(r64(&mut i, IQH), 4 << 4);
        assert_eq!(r32(&mut i, FSTS) & FSTS_IQE, FSTS_IQE);
        // A wait whose status address is outside RAM is an error too.
        ram.put(0xa040, 5 | 1 << 5);
        ram.put(0xa048, 0xffff_ffff_0000);
        w32(&mut i, FSTS, FSTS_IQE);
        assert_eq!(r64(&mut i, IQH), 4 << 4);
        // Fixed: the queue goes on once IQE is cleared.
        ram.put(0xa048, 0xb000);
        ram.put(0xa050, 2);
        w32(&mut i, FSTS, FSTS_IQE);
        assert_eq!(r64(&mut i, IQH), 6 << 4);
        // Turned off once empty.
        w32(&mut i, GCMD, 0);
        assert_eq!(r32(&mut i, GSTS) & GCMD_QIE, 0);
    }

    #[test]
    fn dma_space_faults_and_not_ram() {
        let ram = TestRam::new();
        let (_, mut i) = iommu(&ram);
        setup_tables(&ram, &mut i);
        let iommu = Arc::new(Mutex::new(i));
        let dma = DmaSpace::new(ram.clone(), Some(iommu.clone()));
        dma.write(3 << 3, 0xffe, &[1, 2, 3, 4]).unwrap_err(); // second page read-only
        let mut b = [0u8; 4];
        assert!(ram.read(0x8ffe, &mut b[..2]));
        assert_eq!(&b[..2], &[1, 2], "first page written");
        assert_ne!(lock(&iommu).get32(FSTS) & FSTS_PPF, 0, "fault recorded");
        dma.read(3 << 3, 0x1000, &mut b).unwrap();
        // A mapping pointing outside RAM.
        ram.put(0x5010, 0x7fff_0000_0000 | 3);
        assert_eq!(
            dma.read(3 << 3, 0x2000, &mut b),
            Err(DmaError::NotRam(0x7fff_0000_0000))
        );
        let plain = DmaSpace::new(ram.clone(), None);
        plain.write(0, 0x100, &[9]).unwrap();
        assert!(plain.write(0, 1 << 40, &[9]).is_err());
    }

    /// A small deterministic generator for the fuzz test.
    pub struct XorShift(pub u64);

    impl XorShift {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_registers_tables_and_requests_never_panic() {
        let ram = TestRam::new();
        let (_, mut i) = iommu(&ram);
        let mut r = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            // Garbage in RAM where tables are likely to point (low MiB), garbage registers.
            let at = (r.next() % ((1 << 20) - 8)) & !7;
            ram.put(at, r.next() & 0x000f_ffff_ffff_ffff);
            let off = (r.next() % 0x240) & !3;
            let v = r.next();
            if round % 3 == 0 {
                i.write(off, &v.to_le_bytes());
            } else {
                i.write(off, &(v as u32).to_le_bytes());
            }
            let mut b = [0u8; 8];
            i.read(r.next() % 0x1000, &mut b[..(1 << (r.next() % 4))]);
            let sid = r.next() as u16;
            let iova = r.next() >> (r.next() % 64);
            if let Err(f) = i.translate(sid, iova, r.next() & 1 == 0) {
                i.record_fault(&f);
            }
            let msi = 0xfee0_0000 | (r.next() & 0xf_fffc);
            if let Err(f) = i.remap(Some(sid), msi, r.next() as u32) {
                i.record_fault(&f);
            }
        }
    }

    #[test]
    fn save_restore_and_rejects() {
        let ram = TestRam::new();
        let (_, mut i) = iommu(&ram);
        setup_tables(&ram, &mut i);
        let s = i.state();
        let s: IntelIommuState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        let (_, mut d) = iommu(&ram);
        d.restore(&s).unwrap();
        assert_eq!(d.state(), s);
        assert_eq!(d.translate(3 << 3, 0x10, false), Ok(0x8010));
        let mut bad = s.clone();
        bad.regs.pop();
        assert_eq!(d.restore(&bad), Err(IntelIommuError::Size(REGS_SIZE - 1)));
        let mut bad = s.clone();
        bad.regs[ECAP] ^= 1 << 3;
        assert_eq!(d.restore(&bad), Err(IntelIommuError::Config(ECAP)));
        let mut bad = s;
        bad.regs[IQH + 2] = 0xff;
        assert!(matches!(
            d.restore(&bad),
            Err(IntelIommuError::QueueHead(_))
        ));
    }
}
