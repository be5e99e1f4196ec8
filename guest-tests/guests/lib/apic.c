/* Local APIC (xAPIC MMIO), IOAPIC, 8259 masking and a LAPIC-timer deadline. */
#include "lib.h"

#define MSR_APIC_BASE 0x1b

u64 lapic_base = 0xfee00000;

u32 lapic_read(u32 reg)
{
	return mmio_read32(lapic_base + reg);
}

void lapic_write(u32 reg, u32 v)
{
	mmio_write32(lapic_base + reg, v);
}

u32 lapic_id(void)
{
	return lapic_read(APIC_ID) >> 24;
}

void lapic_eoi(void)
{
	lapic_write(APIC_EOI, 0);
}

void lapic_init(void)
{
	u64 base = rdmsr(MSR_APIC_BASE);

	if (!(base & (1 << 11))) {
		base |= 1 << 11; /* global enable */
		wrmsr(MSR_APIC_BASE, base);
	}
	lapic_base = base & ~0xfffULL & ((1ULL << 52) - 1);
	lapic_write(APIC_SVR, 0x1ff); /* software enable, spurious vector 0xff */
	lapic_write(APIC_TPR, 0);
	lapic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	lapic_write(APIC_LVT_LINT0, APIC_LVT_MASKED);
	lapic_write(APIC_LVT_ERROR, APIC_LVT_MASKED);
}

void lapic_send_ipi(u32 dest, u32 icr_lo)
{
	lapic_write(APIC_ICR_HI, dest << 24);
	lapic_write(APIC_ICR_LO, icr_lo);
	/* Wait for the delivery status bit to clear (bounded). */
	for (int i = 0; i < 100000 && (lapic_read(APIC_ICR_LO) & (1 << 12)); i++)
		cpu_relax();
}

u32 ioapic_read(u64 base, u32 reg)
{
	mmio_write32(base, reg);
	return mmio_read32(base + 0x10);
}

void ioapic_write(u64 base, u32 reg, u32 v)
{
	mmio_write32(base, reg);
	mmio_write32(base + 0x10, v);
}

void ioapic_route(u64 base, int pin, u8 vector, u8 dest_apic_id, bool masked)
{
	ioapic_write(base, 0x10 + 2 * pin + 1, (u32)dest_apic_id << 24);
	ioapic_write(base, 0x10 + 2 * pin, vector | (masked ? (1u << 16) : 0));
}

void pic_mask_all(void)
{
	outb(0xa1, 0xff);
	outb(0x21, 0xff);
}

void deadline_start(u32 ms)
{
	lapic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	lapic_write(APIC_TIMER_DIVIDE, 0x3); /* divide by 16: 62.5 MHz at a 1 GHz bus */
	lapic_write(APIC_TIMER_INITIAL, ms > 68000 ? 0xffffffffu : ms * 62500u);
}

bool deadline_passed(void)
{
	return lapic_read(APIC_TIMER_CURRENT) == 0;
}
