//! PCI interrupt routing: the PIRQ lines of the PIIX3 (`pc`) or the ICH9 LPC bridge (`q35`)
//! onto ISA IRQs, as their route control registers say.
//!
//! Each PCI function's INTx pin is swizzled onto one of PIRQA–D ([`crate::pci::intx_pirq`]);
//! the function gets a [`PirqRouter::line`] for it. A PIRQ is asserted while any function on
//! it asserts its pin, and an ISA IRQ while any PIRQ routed to it is asserted (QEMU's
//! `pic_levels`). When the guest rewrites a route register — or a migration restores it —
//! [`PirqRouter::set_routes`] moves every asserted level from the old IRQ to the new one, as
//! QEMU's `piix_write_config` / `ich9_lpc_pic_irq` do.
//!
//! A route register's format: the PIIX3 routes to IRQ `v` for `v` < 16 and disables the PIRQ
//! otherwise (QEMU's rule); the ICH9 disables it when bit 7 (IRQEN) is set and otherwise
//! routes to IRQ `v & 0xf`.
//!
//! Lock order: a function's lock (or a virtio core lock) → the router → the interrupt
//! controller behind the ISA line (the IOAPIC under `kernel-irqchip=split`, else KVM).

use std::sync::{Arc, Mutex};

use vmm_sync::lock;

use crate::pci::PIRQ_IRQS;
use crate::{IrqLine, SharedIrq};

/// The number of PIRQ lines INTx is swizzled onto.
pub const PIRQS: usize = 4;
/// The number of ISA IRQs.
pub const ISA_IRQS: usize = 16;

/// How a route control register names its IRQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteFormat {
    /// PIIX3: IRQ `v` if `v` < 16, else disabled.
    Piix,
    /// ICH9: disabled if bit 7 is set, else IRQ `v & 0xf`.
    Ich9,
}

impl RouteFormat {
    /// The ISA IRQ a route register value names, if it routes at all.
    pub fn irq(self, v: u8) -> Option<u8> {
        match self {
            Self::Piix => (usize::from(v) < ISA_IRQS).then_some(v),
            Self::Ich9 => (v & 0x80 == 0).then_some(v & 0xf),
        }
    }
}

struct Routing {
    routes: [Option<u8>; PIRQS],
    /// Each line's (PIRQ, level).
    lines: Vec<(usize, bool)>,
    /// The level last driven on each ISA IRQ.
    driven: [bool; ISA_IRQS],
}

impl Routing {
    fn pirq_level(&self, pirq: usize) -> bool {
        self.lines.iter().any(|&(p, high)| p == pirq && high)
    }

    fn irq_level(&self, irq: u8) -> bool {
        (0..PIRQS).any(|p| self.routes[p] == Some(irq) && self.pirq_level(p))
    }
}

/// The PIRQ → ISA IRQ router of a machine.
pub struct PirqRouter {
    format: RouteFormat,
    isa: Vec<SharedIrq>,
    state: Mutex<Routing>,
}

impl PirqRouter {
    /// A router driving `isa` (ISA IRQs 0–15, in order) with SeaBIOS's routes (10, 10, 11, 11).
    pub fn new(format: RouteFormat, isa: Vec<SharedIrq>) -> Arc<Self> {
        assert_eq!(isa.len(), ISA_IRQS);
        Arc::new(Self {
            format,
            isa,
            state: Mutex::new(Routing {
                routes: PIRQ_IRQS.map(Some),
                lines: Vec::new(),
                driven: [false; ISA_IRQS],
            }),
        })
    }

    /// A new INTx line on PIRQ `pirq` (0 = PIRQA; taken modulo 4).
    pub fn line(self: &Arc<Self>, pirq: usize) -> SharedIrq {
        let mut s = lock(&self.state);
        s.lines.push((pirq % PIRQS, false));
        Arc::new(PirqLine {
            router: self.clone(),
            index: s.lines.len() - 1,
        })
    }

    /// The ISA IRQ PIRQ `pirq` is routed to now, if any.
    pub fn route(&self, pirq: usize) -> Option<u8> {
        lock(&self.state).routes.get(pirq).copied().flatten()
    }

    /// Takes the route control registers PIRQA–D (their raw bytes) and moves the asserted
    /// levels to the IRQs they name.
    pub fn set_routes(&self, regs: [u8; PIRQS]) {
        let mut s = lock(&self.state);
        s.routes = regs.map(|v| self.format.irq(v));
        for irq in 0..ISA_IRQS as u8 {
            let level = s.irq_level(irq);
            if level != s.driven[usize::from(irq)] {
                s.driven[usize::from(irq)] = level;
                self.isa[usize::from(irq)].set_level(level);
            }
        }
    }

    fn set_line(&self, index: usize, high: bool) {
        let mut s = lock(&self.state);
        let pirq = s.lines[index].0;
        s.lines[index].1 = high;
        if let Some(irq) = s.routes[pirq] {
            let level = s.irq_level(irq);
            s.driven[usize::from(irq)] = level;
            self.isa[usize::from(irq)].set_level(level);
        }
    }
}

/// One function's INTx pin, as a router line.
struct PirqLine {
    router: Arc<PirqRouter>,
    index: usize,
}

impl IrqLine for PirqLine {
    fn set_level(&self, high: bool) {
        self.router.set_line(self.index, high);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::RecordingIrq;

    fn router(format: RouteFormat) -> (Arc<PirqRouter>, Vec<Arc<RecordingIrq>>) {
        let irqs: Vec<_> = (0..ISA_IRQS)
            .map(|_| Arc::new(RecordingIrq::default()))
            .collect();
        let lines = irqs.iter().map(|i| i.clone() as SharedIrq).collect();
        (PirqRouter::new(format, lines), irqs)
    }

    #[test]
    fn levels_follow_the_routes() {
        let (r, irqs) = router(RouteFormat::Piix);
        let a = r.line(0);
        let a2 = r.line(4);
        let c = r.line(2);
        a.set_level(true);
        assert!(irqs[10].level());
        // Two functions on PIRQA: the IRQ stays up until both are low.
        a2.set_level(true);
        a.set_level(false);
        assert!(irqs[10].level());
        a2.set_level(false);
        assert!(!irqs[10].level());
        // PIRQA and PIRQC both to IRQ 5 (shared), PIRQC asserted: 11 drops, 5 rises.
        c.set_level(true);
        assert!(irqs[11].level());
        r.set_routes([5, 10, 5, 11]);
        assert!(!irqs[11].level());
        assert!(irqs[5].level());
        assert_eq!(r.route(0), Some(5));
        // Disabled (>= 16): the level goes nowhere until a route comes back.
        r.set_routes([5, 10, 0x80, 11]);
        assert!(!irqs[5].level());
        assert_eq!(r.route(2), None);
        r.set_routes([5, 10, 9, 11]);
        assert!(irqs[9].level());
        c.set_level(false);
        assert!(!irqs[9].level());
    }

    #[test]
    fn ich9_route_format() {
        assert_eq!(RouteFormat::Ich9.irq(0x0b), Some(11));
        assert_eq!(RouteFormat::Ich9.irq(0x8b), None);
        assert_eq!(RouteFormat::Ich9.irq(0x1b), Some(11));
        assert_eq!(RouteFormat::Piix.irq(0x0f), Some(15));
        assert_eq!(RouteFormat::Piix.irq(0x10), None);
        let (r, irqs) = router(RouteFormat::Ich9);
        let b = r.line(1);
        b.set_level(true);
        assert!(irqs[10].level());
        r.set_routes([0x80, 0x87, 0x80, 0x80]);
        assert!(!irqs[10].level());
        r.set_routes([0x80, 0x07, 0x80, 0x80]);
        assert!(irqs[7].level());
    }
}
