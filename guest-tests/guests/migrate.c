/*
 * migrate: a kvm-unit-tests style live-migration test.  Sets up state, prints
 * "Now migrate the VM, then press a key to continue...", waits (up to
 * wait_s=N seconds, default 60) for a byte on COM1 -- the runner migrates the
 * VM and then types a newline into the destination -- and checks that the
 * state survived:
 *  - RAM: a 1 MiB pattern at 16 MiB and a variable in the image;
 *  - general registers r8-r15 and rbx, live across the wait;
 *  - CR0, CR3, CR4, EFER, the GDT and IDT registers; TSC not going backwards;
 *  - LAPIC TPR, LVT LINT0 and timer divide; an IOAPIC redirection entry;
 *    the 8259 masks;
 *  - device state: the UART's scratch register, LCR and IER, a CMOS RAM byte;
 *  - interrupts still work: a LAPIC one-shot timer interrupt after the wait.
 * Run through the runner's `migrate = yes` (without it nobody types the key
 * and the wait times out).  Command line: wait_s=N.
 */
#include "lib/lib.h"

#define COM1 0x3f8
#define PATTERN_BASE (16 * MiB)
#define PATTERN_LEN (1 * MiB)
#define CMOS_REG 0x4d
#define TIMER_VECTOR 0x41
#define IOAPIC_PIN 7

struct dtr {
	u16 limit;
	u64 base;
} __attribute__((packed));

static volatile u64 image_var = 0x1234567890abcdefULL;
static volatile u32 timer_ticks;

static u64 pattern(u64 i)
{
	return (i * 0x9E3779B97F4A7C15ULL) ^ (i << 17) ^ 0xa5a5a5a5a5a5a5a5ULL;
}

static u64 rdtsc(void)
{
	u32 lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return lo | ((u64)hi << 32);
}

static void timer_handler(struct ex_regs *r)
{
	(void)r;
	timer_ticks++;
}

/* RTC seconds register (changes once a second; the clock is the host's). */
static u8 rtc_seconds(void)
{
	return cmos_read(0x00);
}

/*
 * Loads r8-r15 and rbx with known values, polls COM1's LSR for a received
 * byte for up to `seconds` RTC second changes, then stores the registers to
 * regs[0..8] and returns the byte, or -1 on timeout.  (Not bounded by the
 * LAPIC timer: its state is part of what is migrated.)
 */
static int wait_key(u64 regs[9], u32 seconds)
{
	u64 key;
	u8 last = rtc_seconds();

	asm volatile("movabs $0x0808080808080808, %%r8\n\t"
		     "movabs $0x0909090909090909, %%r9\n\t"
		     "movabs $0x1010101010101010, %%r10\n\t"
		     "movabs $0x1111111111111111, %%r11\n\t"
		     "movabs $0x1212121212121212, %%r12\n\t"
		     "movabs $0x1313131313131313, %%r13\n\t"
		     "movabs $0x1414141414141414, %%r14\n\t"
		     "movabs $0x1515151515151515, %%r15\n\t"
		     "movabs $0x0b0b0b0b0b0b0b0b, %%rbx\n"
		     "1:\tmovw $0x3fd, %%dx\n\t"
		     "inb %%dx, %%al\n\t"
		     "testb $1, %%al\n\t"
		     "jnz 3f\n\t"
		     "xorl %%eax, %%eax\n\t" /* RTC seconds */
		     "outb %%al, $0x70\n\t"
		     "inb $0x71, %%al\n\t"
		     "cmpb %[last], %%al\n\t"
		     "je 6f\n\t"
		     "movb %%al, %[last]\n\t"
		     "decl %[left]\n\t"
		     "jz 4f\n"
		     "6:\tmovl $2000, %%ecx\n"
		     "2:\tpause\n\t"
		     "decl %%ecx\n\t"
		     "jnz 2b\n\t"
		     "jmp 1b\n"
		     "3:\tmovw $0x3f8, %%dx\n\t"
		     "xorl %%eax, %%eax\n\t"
		     "inb %%dx, %%al\n\t"
		     "jmp 5f\n"
		     "4:\tmovq $-1, %%rax\n"
		     "5:\tmovq %%r8, 0(%[regs])\n\t"
		     "movq %%r9, 8(%[regs])\n\t"
		     "movq %%r10, 16(%[regs])\n\t"
		     "movq %%r11, 24(%[regs])\n\t"
		     "movq %%r12, 32(%[regs])\n\t"
		     "movq %%r13, 40(%[regs])\n\t"
		     "movq %%r14, 48(%[regs])\n\t"
		     "movq %%r15, 56(%[regs])\n\t"
		     "movq %%rbx, 64(%[regs])"
		     : "=a"(key), [last] "+m"(last), [left] "+S"(seconds)
		     : [regs] "D"(regs)
		     : "rbx", "rcx", "rdx", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
		       "memory", "cc");
	return (int)(s64)key;
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u64 wait_s = get_arg_u64("wait_s", 60);
	volatile u64 *pat = phys_ptr(PATTERN_BASE);
	struct dtr gdtr, idtr, gdtr2, idtr2;

	if (!wait_s)
		wait_s = 1;
	for (u64 i = 0; i < PATTERN_LEN / 8; i++)
		pat[i] = pattern(i);

	/* Device and interrupt controller state. */
	outb(COM1 + 7, 0x5a); /* scratch register */
	u8 lcr = inb(COM1 + 3), ier = inb(COM1 + 1);
	cmos_write(CMOS_REG, 0xc3);
	lapic_write(APIC_TPR, 0x20);
	lapic_write(APIC_LVT_LINT0, APIC_LVT_MASKED | 0x33);
	lapic_write(APIC_TIMER_DIVIDE, 0xa); /* divide by 128 */
	ioapic_write(IOAPIC_DEFAULT_BASE, 0x10 + 2 * IOAPIC_PIN + 1, 0x01000000);
	ioapic_write(IOAPIC_DEFAULT_BASE, 0x10 + 2 * IOAPIC_PIN, (1u << 16) | (1u << 15) | 0x77);
	u32 redir_lo = ioapic_read(IOAPIC_DEFAULT_BASE, 0x10 + 2 * IOAPIC_PIN);
	u32 redir_hi = ioapic_read(IOAPIC_DEFAULT_BASE, 0x10 + 2 * IOAPIC_PIN + 1);
	u8 imr1 = inb(0x21), imr2 = inb(0xa1);
	u64 cr0 = read_cr0(), cr3 = read_cr3(), cr4 = read_cr4(), efer = rdmsr(0xc0000080);
	asm volatile("sgdt %0; sidt %1" : "=m"(gdtr), "=m"(idtr));

	printf("migrate: state set up (1 MiB pattern at 0x%lx, UART scratch 0x5a, CMOS 0x%x = 0xc3)\n",
	       PATTERN_BASE, CMOS_REG);
	printf("Now migrate the VM, then press a key to continue...\n");
	u64 tsc0 = rdtsc();
	u64 regs[9];
	int key = wait_key(regs, (u32)wait_s);
	u64 tsc1 = rdtsc();
	if (key < 0)
		report_abort("no key on COM1 within %lu s (was the VM migrated and a key sent?)", wait_s);
	printf("key 0x%02x received, checking state\n", key);

	static const u64 want[9] = {
		0x0808080808080808ULL, 0x0909090909090909ULL, 0x1010101010101010ULL,
		0x1111111111111111ULL, 0x1212121212121212ULL, 0x1313131313131313ULL,
		0x1414141414141414ULL, 0x1515151515151515ULL, 0x0b0b0b0b0b0b0b0bULL,
	};
	int bad_regs = 0;
	for (int i = 0; i < 9; i++)
		if (regs[i] != want[i]) {
			printf("  register %d: 0x%lx, expected 0x%lx\n", i, regs[i], want[i]);
			bad_regs++;
		}
	report(bad_regs == 0, "r8-r15 and rbx kept their values across the wait");

	u64 bad = 0, first = 0;
	for (u64 i = 0; i < PATTERN_LEN / 8; i++)
		if (pat[i] != pattern(i)) {
			if (!bad)
				first = PATTERN_BASE + 8 * i;
			bad++;
		}
	report(bad == 0, "1 MiB RAM pattern intact (%lu bad qwords, first at 0x%lx)", bad, first);
	report(image_var == 0x1234567890abcdefULL, "variable in the image intact");

	asm volatile("sgdt %0; sidt %1" : "=m"(gdtr2), "=m"(idtr2));
	report(read_cr0() == cr0 && read_cr3() == cr3 && read_cr4() == cr4 &&
		       rdmsr(0xc0000080) == efer,
	       "CR0 0x%lx, CR3 0x%lx, CR4 0x%lx, EFER 0x%lx unchanged", cr0, cr3, cr4, efer);
	report(gdtr.base == gdtr2.base && gdtr.limit == gdtr2.limit && idtr.base == idtr2.base &&
		       idtr.limit == idtr2.limit,
	       "GDTR and IDTR unchanged");
	report(tsc1 >= tsc0, "TSC did not go backwards (0x%lx -> 0x%lx)", tsc0, tsc1);

	u32 tpr = lapic_read(APIC_TPR), lint0 = lapic_read(APIC_LVT_LINT0);
	u32 div = lapic_read(APIC_TIMER_DIVIDE);
	report(tpr == 0x20 && lint0 == (APIC_LVT_MASKED | 0x33) && (div & 0xb) == 0xa,
	       "LAPIC TPR 0x%x, LVT LINT0 0x%x, timer divide 0x%x unchanged", tpr, lint0, div);
	u32 lo2 = ioapic_read(IOAPIC_DEFAULT_BASE, 0x10 + 2 * IOAPIC_PIN);
	u32 hi2 = ioapic_read(IOAPIC_DEFAULT_BASE, 0x10 + 2 * IOAPIC_PIN + 1);
	report(lo2 == redir_lo && hi2 == redir_hi, "IOAPIC pin %d entry 0x%08x%08x unchanged (0x%08x%08x)",
	       IOAPIC_PIN, redir_hi, redir_lo, hi2, lo2);
	u8 m1 = inb(0x21), m2 = inb(0xa1);
	report(m1 == imr1 && m2 == imr2, "8259 masks 0x%x/0x%x unchanged (0x%x/0x%x)", imr1, imr2, m1,
	       m2);
	u8 scr = inb(COM1 + 7), lcr2 = inb(COM1 + 3), ier2 = inb(COM1 + 1);
	report(scr == 0x5a && lcr2 == lcr && ier2 == ier,
	       "UART scratch 0x%x (0x5a), LCR 0x%x (0x%x), IER 0x%x (0x%x)", scr, lcr2, lcr, ier2, ier);
	u8 cm = cmos_read(CMOS_REG);
	report(cm == 0xc3, "CMOS RAM byte 0x%x = 0x%x (0xc3)", CMOS_REG, cm);
	cmos_write(CMOS_REG, 0);

	/* Interrupts still work: a LAPIC one-shot timer (10 ms). */
	lapic_write(APIC_TPR, 0);
	set_handler(TIMER_VECTOR, timer_handler);
	lapic_write(APIC_TIMER_DIVIDE, 0x3);
	lapic_write(APIC_LVT_TIMER, TIMER_VECTOR);
	lapic_write(APIC_TIMER_INITIAL, 625000);
	/* Wait with IF=1 for the interrupt, bounded by 2-3 RTC seconds. */
	u8 sec = rtc_seconds();
	int changes = 0;
	sti();
	while (!timer_ticks && changes < 3) {
		u8 now = rtc_seconds();
		if (now != sec) {
			sec = now;
			changes++;
		}
		cpu_relax();
	}
	cli();
	lapic_write(APIC_LVT_TIMER, APIC_LVT_MASKED);
	report(timer_ticks == 1, "LAPIC timer interrupt delivered after the migration (%u)",
	       timer_ticks);
	return report_summary();
}
