/*
 * timer: PIT channel 0 at 100 Hz routed through the IOAPIC (ISA IRQ0, pin 2
 * per the MP table) to the BSP's LAPIC, then the LAPIC timer in one-shot and
 * periodic mode.  Waits with sti;hlt, so it does not depend on guest speed.
 * Command line: ticks=N (interrupts to count per mode, default 5).
 */
#include "lib/lib.h"

#define PIT_VECTOR 0x30
#define LAPIC_TIMER_VECTOR 0x40
#define PIT_HZ 100
#define PIT_FREQ 1193182
/* 10 ms at the 1 GHz APIC bus used by KVM and QEMU, divided by 16. */
#define LAPIC_COUNT 625000

static volatile u32 pit_ticks, lapic_ticks;
static struct mp_info mp;

static void pit_handler(struct ex_regs *r)
{
	(void)r;
	pit_ticks++;
}

static void lapic_timer_handler(struct ex_regs *r)
{
	(void)r;
	lapic_ticks++;
}

static void wait_for(volatile u32 *counter, u32 target)
{
	for (;;) {
		cli();
		if (*counter >= target)
			break;
		sti_hlt();
	}
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u32 n = (u32)get_arg_u64("ticks", 5);
	u64 ioapic = IOAPIC_DEFAULT_BASE;
	int pin = 2;
	u32 bsp = lapic_id();

	if (mp_find(&mp)) {
		int p = mp_isa_irq_pin(&mp, 0);
		report(p == 2, "MP table routes ISA IRQ0 to IOAPIC pin %d (expected 2)", p);
		if (mp.ioapic_addr) {
			report(mp.ioapic_addr == IOAPIC_DEFAULT_BASE, "MP table IOAPIC at 0x%x",
			       mp.ioapic_addr);
			ioapic = mp.ioapic_addr;
		}
	} else {
		report_info("no MP table; assuming IRQ0 on IOAPIC pin 2 at 0x%lx", ioapic);
	}
	u32 ver = ioapic_read(ioapic, 1);
	printf("IOAPIC version 0x%x, %u redirection entries\n", ver & 0xff, ((ver >> 16) & 0xff) + 1);
	report(((ver >> 16) & 0xff) + 1 >= 24, "IOAPIC has at least 24 pins");

	set_handler(PIT_VECTOR, pit_handler);
	set_handler(LAPIC_TIMER_VECTOR, lapic_timer_handler);

	/* PIT channel 0, lobyte/hibyte, mode 2 (rate generator), 100 Hz. */
	u16 divisor = (PIT_FREQ + PIT_HZ / 2) / PIT_HZ;
	outb(0x43, 0x34);
	outb(0x40, divisor & 0xff);
	outb(0x40, divisor >> 8);
	ioapic_route(ioapic, pin, PIT_VECTOR, (u8)bsp, false);
	printf("waiting for %u PIT interrupts (IOAPIC pin %d -> vector 0x%x)...\n", n, pin, PIT_VECTOR);
	wait_for(&pit_ticks, n);
	report(pit_ticks >= n, "PIT: %u interrupts via the IOAPIC", pit_ticks);

	/* LAPIC timer one-shot: fires once, current count ends at 0. */
	lapic_write(APIC_TIMER_DIVIDE, 0x3);
	lapic_write(APIC_LVT_TIMER, LAPIC_TIMER_VECTOR);
	lapic_write(APIC_TIMER_INITIAL, LAPIC_COUNT);
	printf("waiting for the LAPIC one-shot timer...\n");
	wait_for(&lapic_ticks, 1);
	report(lapic_ticks == 1, "LAPIC one-shot timer fired");
	report(lapic_read(APIC_TIMER_CURRENT) == 0, "LAPIC one-shot current count is 0 after expiry");
	u32 p0 = pit_ticks;
	printf("waiting 3 PIT ticks to check the one-shot does not re-fire...\n");
	wait_for(&pit_ticks, p0 + 3);
	report(lapic_ticks == 1, "LAPIC one-shot timer fired exactly once (%u)", lapic_ticks);

	/* LAPIC timer periodic. */
	u32 l0 = lapic_ticks;
	p0 = pit_ticks;
	lapic_write(APIC_LVT_TIMER, LAPIC_TIMER_VECTOR | APIC_TIMER_PERIODIC);
	lapic_write(APIC_TIMER_INITIAL, LAPIC_COUNT);
	printf("waiting for %u LAPIC periodic timer interrupts...\n", n);
	wait_for(&lapic_ticks, l0 + n);
	u32 cur = lapic_read(APIC_TIMER_CURRENT);
	u32 got = lapic_ticks - l0;
	report(got >= n, "LAPIC periodic timer: %u interrupts", got);
	report(cur != 0 && cur <= LAPIC_COUNT, "LAPIC periodic timer still counting (current %u)", cur);
	report_info("%u PIT ticks (10 ms each) during %u LAPIC periodic ticks (10 ms nominal)",
		    pit_ticks - p0, got);

	lapic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	lapic_write(APIC_TIMER_INITIAL, 0);
	ioapic_route(ioapic, pin, PIT_VECTOR, (u8)bsp, true);
	cli();
	return report_summary();
}
