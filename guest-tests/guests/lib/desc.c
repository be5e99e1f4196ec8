/* IDT with a handler table; unexpected exceptions print state and exit(2). */
#include "lib.h"

struct idt_gate {
	u16 offset0;
	u16 selector;
	u8 ist;
	u8 type_attr;
	u16 offset1;
	u32 offset2;
	u32 reserved;
} __attribute__((packed));

struct desc_ptr {
	u16 limit;
	u64 base;
} __attribute__((packed));

extern char isr_stubs[];

static struct idt_gate idt[256] __attribute__((aligned(16)));
static struct desc_ptr idt_desc;
static handler_t handlers[256];

static const char *const exception_names[32] = {
	"#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow",
	"#BR bound range", "#UD invalid opcode", "#NM device not available",
	"#DF double fault", "coprocessor segment overrun", "#TS invalid TSS",
	"#NP segment not present", "#SS stack fault", "#GP general protection",
	"#PF page fault", "reserved 15", "#MF x87 error", "#AC alignment check",
	"#MC machine check", "#XM SIMD error", "#VE virtualization", "#CP control protection",
};

void load_idt(void)
{
	asm volatile("lidt %0" : : "m"(idt_desc));
}

void idt_init(void)
{
	for (int i = 0; i < 256; i++) {
		u64 addr = (u64)isr_stubs + 16 * (u64)i;
		idt[i].offset0 = (u16)addr;
		idt[i].selector = 0x08;
		idt[i].ist = 0;
		idt[i].type_attr = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
		idt[i].offset1 = (u16)(addr >> 16);
		idt[i].offset2 = (u32)(addr >> 32);
		idt[i].reserved = 0;
	}
	idt_desc.limit = sizeof(idt) - 1;
	idt_desc.base = (u64)idt;
	load_idt();
}

void set_handler(int vector, handler_t h)
{
	handlers[vector & 0xff] = h;
}

void isr_dispatch(struct ex_regs *r);
void isr_dispatch(struct ex_regs *r)
{
	u64 v = r->vector;
	handler_t h = handlers[v];

	if (h) {
		h(r);
		if (v >= 32 && v != 0xff)
			lapic_eoi();
		return;
	}
	if (v < 32) {
		printf("UNEXPECTED EXCEPTION %s (vector %lu) on cpu apic id %u\n",
		       exception_names[v] ? exception_names[v] : "reserved", v, lapic_id());
		printf("  rip=0x%lx cs=0x%lx rflags=0x%lx rsp=0x%lx error_code=0x%lx cr2=0x%lx\n",
		       r->rip, r->cs, r->rflags, r->rsp, r->error_code, read_cr2());
		printf("  rax=0x%lx rbx=0x%lx rcx=0x%lx rdx=0x%lx rsi=0x%lx rdi=0x%lx\n", r->rax,
		       r->rbx, r->rcx, r->rdx, r->rsi, r->rdi);
		exit(EXIT_EXCEPTION);
	}
	if (v == 0xff)
		return; /* spurious: no EOI */
	printf("WARNING: unexpected interrupt vector %lu\n", v);
	lapic_eoi();
}
