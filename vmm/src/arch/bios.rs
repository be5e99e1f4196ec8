//! The legacy PC state a BIOS leaves behind when it hands over to a kernel.
//!
//! hopvm boots kernels without firmware, but some guests — kvm-unit-tests' `realmode` test
//! among them — rely on what SeaBIOS would have set up: the PICs initialised with vector bases
//! 0x08 (master) and 0x70 (slave) and only the timer and cascade unmasked, PIT channel 0
//! ticking at 18.2 Hz into IRQ 0, and a real-mode interrupt vector table whose timer entry
//! sends the PIC an EOI and returns, so that a real-mode `sti; hlt` wakes up again. This module
//! writes that IVT with tiny handler stubs in the BIOS area and programs the in-kernel PIC and
//! PIT accordingly.

use kvm_bindings::{
    kvm_irqchip, kvm_pic_state, kvm_pit_state2, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// Errors setting up the legacy state.
#[derive(Debug, thiserror::Error)]
pub enum BiosError {
    /// Guest memory too small.
    #[error("cannot write the interrupt vector table: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// KVM refused the PIC or PIT state.
    #[error("kvm {0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// The real-mode segment of the handler stubs.
const STUB_SEGMENT: u16 = 0xf000;
/// Offset of the stubs in that segment: they live at 0xff000, inside the reserved BIOS area
/// and clear of the ACPI tables (0xe0000) and the MP table (EBDA).
const STUB_OFFSET: u16 = 0xf000;

/// `iret`.
const STUB_IRET: &[u8] = &[0xcf];
/// `push ax; mov al, 0x20; out 0x20, al; pop ax; iret` — EOI the master PIC.
const STUB_EOI_MASTER: &[u8] = &[0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf];
/// `push ax; mov al, 0x20; out 0xa0, al; out 0x20, al; pop ax; iret` — EOI both PICs.
const STUB_EOI_BOTH: &[u8] = &[0x50, 0xb0, 0x20, 0xe6, 0xa0, 0xe6, 0x20, 0x58, 0xcf];
/// The timer: count the tick in the BIOS data area (0x46c, as a BIOS does), then EOI.
/// `push ds; push ax; xor ax, ax; mov ds, ax; inc word [0x46c]; jnz +4;
///  inc word [0x46e]; mov al, 0x20; out 0x20, al; pop ax; pop ds; iret`
const STUB_TIMER: &[u8] = &[
    0x1e, 0x50, 0x31, 0xc0, 0x8e, 0xd8, 0xff, 0x06, 0x6c, 0x04, 0x75, 0x04, 0xff, 0x06, 0x6e, 0x04,
    0xb0, 0x20, 0xe6, 0x20, 0x58, 0x1f, 0xcf,
];

/// The master PIC's vector base, as SeaBIOS leaves it.
pub const PIC_MASTER_BASE: u8 = 0x08;
/// The slave PIC's vector base.
pub const PIC_SLAVE_BASE: u8 = 0x70;

/// Writes the real-mode IVT and its handler stubs.
pub fn write_ivt(mem: &GuestMemoryMmap) -> Result<(), BiosError> {
    let base = (u64::from(STUB_SEGMENT) << 4) + u64::from(STUB_OFFSET);
    let mut stubs = Vec::new();
    let mut place = |code: &[u8]| {
        let offset = STUB_OFFSET + stubs.len() as u16;
        stubs.extend_from_slice(code);
        offset
    };
    let iret = place(STUB_IRET);
    let eoi_master = place(STUB_EOI_MASTER);
    let eoi_both = place(STUB_EOI_BOTH);
    let timer = place(STUB_TIMER);
    mem.write_slice(&stubs, GuestAddress(base))
        .map_err(BiosError::Write)?;

    let mut ivt = [0u8; 256 * 4];
    for (vector, entry) in ivt.chunks_exact_mut(4).enumerate() {
        let vector = vector as u8;
        let offset = match vector {
            v if v == PIC_MASTER_BASE => timer,
            v if (PIC_MASTER_BASE + 1..PIC_MASTER_BASE + 8).contains(&v) => eoi_master,
            v if (PIC_SLAVE_BASE..PIC_SLAVE_BASE + 8).contains(&v) => eoi_both,
            _ => iret,
        };
        entry[..2].copy_from_slice(&offset.to_le_bytes());
        entry[2..].copy_from_slice(&STUB_SEGMENT.to_le_bytes());
    }
    mem.write_slice(&ivt, GuestAddress(0))
        .map_err(BiosError::Write)
}

fn pic(base: u8, imr: u8, elcr_mask: u8) -> kvm_pic_state {
    kvm_pic_state {
        irq_base: base,
        imr,
        init4: 1,
        elcr_mask,
        ..Default::default()
    }
}

/// Programs the PICs (bases 0x08 / 0x70; timer and cascade unmasked) and starts PIT channel 0
/// in mode 3 with the BIOS's 18.2 Hz divisor (when the VM has a PIT: `pit`).
pub fn program_pic_and_pit(vm: &VmFd, pit: bool) -> Result<(), BiosError> {
    for (chip_id, state) in [
        (KVM_IRQCHIP_PIC_MASTER, pic(PIC_MASTER_BASE, 0xfa, 0xf8)),
        (KVM_IRQCHIP_PIC_SLAVE, pic(PIC_SLAVE_BASE, 0xff, 0xde)),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        chip.chip.pic = state;
        vm.set_irqchip(&chip)
            .map_err(|e| BiosError::Kvm("set irqchip", e))?;
    }
    if !pit {
        return Ok(());
    }
    let mut pit: kvm_pit_state2 = vm.get_pit2().map_err(|e| BiosError::Kvm("get pit", e))?;
    let ch0 = &mut pit.channels[0];
    ch0.count = 0x1_0000; // a written count of 0 means 65536: 1193182 Hz / 65536 = 18.2 Hz
    ch0.mode = 3;
    ch0.rw_mode = 3; // low byte, then high byte
    ch0.read_state = 3;
    ch0.write_state = 3;
    ch0.gate = 1;
    vm.set_pit2(&pit).map_err(|e| BiosError::Kvm("set pit", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, Layout};

    #[test]
    fn ivt_points_at_the_stubs() {
        let mem = create_guest_memory(&Layout::new(2 << 20)).unwrap();
        write_ivt(&mem).unwrap();
        let entry = |v: u64| -> (u16, u16) {
            let off: u16 = mem.read_obj(GuestAddress(v * 4)).unwrap();
            let seg: u16 = mem.read_obj(GuestAddress(v * 4 + 2)).unwrap();
            (seg, off)
        };
        let code_at = |(seg, off): (u16, u16), len: usize| {
            let mut b = vec![0u8; len];
            mem.read_slice(&mut b, GuestAddress((u64::from(seg) << 4) + u64::from(off)))
                .unwrap();
            b
        };
        assert_eq!(code_at(entry(8), STUB_TIMER.len()), STUB_TIMER);
        assert_eq!(code_at(entry(9), STUB_EOI_MASTER.len()), STUB_EOI_MASTER);
        assert_eq!(code_at(entry(0x70), STUB_EOI_BOTH.len()), STUB_EOI_BOTH);
        assert_eq!(code_at(entry(0x10), 1), STUB_IRET);
        assert_eq!(entry(0xff).0, STUB_SEGMENT);
    }
}
