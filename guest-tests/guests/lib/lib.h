/*
 * Shared runtime for hopvm test guests.
 *
 * Guests are freestanding 64-bit programs linked at 4 MiB and booted as
 * Multiboot v1 ELF32 images.  cstart.S switches to long mode with an
 * identity map of the first 4 GiB (2 MiB pages) and calls lib_start(), which
 * initialises the console, IDT and local APIC, copies the multiboot
 * information, parses the command line and finally calls the guest's
 * main(argc, argv).  main's return value is the exit code.
 *
 * Exit codes (written to isa-debug-exit at port 0xf4; the VMM then exits with
 * status (code << 1) | 1):
 *   0  pass           1  fail          2  unexpected exception / internal error
 *   77 skip (status 155)
 * Guest-specific codes are documented in each guest.
 *
 * Only plain integer instructions may be used (the test machine's instruction
 * emulator lacks SSE, XSAVE, CMPXCHG16B, POPCNT, MOVBE, INT3, ...).
 */
#ifndef HOPVM_GUEST_LIB_H
#define HOPVM_GUEST_LIB_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))
#define ALIGN_DOWN(x, a) ((x) & ~((u64)(a) - 1))
#define KiB ((u64)1024)
#define MiB (1024 * KiB)
#define GiB (1024 * MiB)
#define PAGE_SIZE ((u64)4096)

#define EXIT_PASS 0
#define EXIT_FAIL 1
#define EXIT_EXCEPTION 2
#define EXIT_SKIP 77

/* Trampoline page for AP start-up (SIPI vector 0x08). */
#define AP_TRAMPOLINE 0x8000
#define MAX_CPUS 32

/* ---- linker / cstart symbols ---- */
extern char __image_start[], __image_end[];

/* ---- port and MMIO access ---- */
static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { asm volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u16 inw(u16 port)
{
	u16 v;
	asm volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u32 inl(u16 port)
{
	u32 v;
	asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
/* Hide a constant address from gcc's bounds analysis (e.g. 0x40e). */
static inline void *phys_ptr(u64 addr)
{
	asm("" : "+r"(addr));
	return (void *)addr;
}
/* The Multiboot v1 information structure, and where cstart.S saved EAX and EBX. */
struct mb_info {
	u32 flags;
	u32 mem_lower;
	u32 mem_upper;
	u32 boot_device;
	u32 cmdline;
	u32 mods_count;
	u32 mods_addr;
	u32 syms[4];
	u32 mmap_length;
	u32 mmap_addr;
	u32 drives_length;
	u32 drives_addr;
	u32 config_table;
	u32 boot_loader_name;
} __attribute__((packed));
extern u32 mb_magic, mb_info_ptr;

/* CMOS / RTC registers (index 0x70, data 0x71). */
static inline u8 cmos_read(u8 reg)
{
	outb(0x70, reg);
	return inb(0x71);
}
static inline void cmos_write(u8 reg, u8 v)
{
	outb(0x70, reg);
	outb(0x71, v);
}
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return lo | ((u64)hi << 32);
}
static inline void wrmsr(u32 msr, u64 v)
{
	asm volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline u64 read_cr0(void) { u64 v; asm volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline u64 read_cr2(void) { u64 v; asm volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; asm volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline u64 read_cr4(void) { u64 v; asm volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { asm volatile("mov %0, %%cr3" : : "r"(v) : "memory"); }
static inline void write_cr4(u64 v) { asm volatile("mov %0, %%cr4" : : "r"(v) : "memory"); }

struct cpuid_result {
	u32 a, b, c, d;
};
static inline struct cpuid_result cpuid(u32 leaf, u32 subleaf)
{
	struct cpuid_result r;
	asm volatile("cpuid" : "=a"(r.a), "=b"(r.b), "=c"(r.c), "=d"(r.d) : "a"(leaf), "c"(subleaf));
	return r;
}

static inline void cli(void) { asm volatile("cli" : : : "memory"); }
static inline void sti(void) { asm volatile("sti" : : : "memory"); }
static inline void cpu_relax(void) { asm volatile("pause" : : : "memory"); }
static inline void barrier(void) { asm volatile("" : : : "memory"); }
/* Enable interrupts and halt until one arrives (sti's shadow makes it atomic). */
static inline void sti_hlt(void) { asm volatile("sti; hlt" : : : "memory"); }

/* ---- string.c ---- */
void *memset(void *s, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);
char *strstr(const char *haystack, const char *needle);
/* Parse an unsigned number (decimal or 0x hex); returns false on junk. */
bool parse_u64(const char *s, u64 *out);
/*
 * Parse a size "<n>[K|M|G|T][iB|B]"; a bare number is multiplied by
 * default_unit.  Returns false on junk or overflow.
 */
bool parse_size(const char *s, u64 default_unit, u64 *out);

/* ---- console (printf.c) ---- */
void serial_init(void);
void putchar(int c);
void puts(const char *s); /* no newline added */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* ---- exit / report (report.c) ---- */
void exit(int code) __attribute__((noreturn));
/* Print "PASS: msg" or "FAIL: msg" and count it. */
void report(bool pass, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void report_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Print "SKIP: msg", count it and go on (kvm-unit-tests' report_skip). */
void report_skipped(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Print "SKIP: msg" and exit with EXIT_SKIP. */
void report_skip(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
/* Print "ABORT: msg" and exit with EXIT_FAIL. */
void report_abort(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
/*
 * Print "SUMMARY: N tests, M failures" (", K skipped" when report_skipped was
 * used) and return the exit code (0 if nothing failed).
 */
int report_summary(void);
int report_failures(void);

/* ---- multiboot / command line (setup.c) ---- */
struct mmap_entry {
	u64 addr;
	u64 len;
	u32 type; /* 1 = available RAM */
};
#define MAX_MMAP 64
#define MB_FLAG_MEM (1u << 0)
#define MB_FLAG_CMDLINE (1u << 2)
#define MB_FLAG_MMAP (1u << 6)
struct boot_info {
	u32 magic;	/* EAX at entry (0x2BADB002 when booted via multiboot) */
	u32 flags;	/* multiboot info flags */
	u32 mem_lower;	/* KiB, valid if flags & MB_FLAG_MEM */
	u32 mem_upper;	/* KiB */
	int nr_mmap;	/* number of entries copied */
	bool mmap_truncated;
	bool mmap_bad_size; /* an entry had size < 20 */
	struct mmap_entry mmap[MAX_MMAP];
	char cmdline[4096];
};
extern struct boot_info boot_info;
extern int g_argc;
extern char *g_argv[];
/* Value of "key=value" ("" for a bare "key"), or NULL if absent. */
const char *get_arg(const char *key);
/* Numeric "key=n"; aborts on junk; returns def when absent. */
u64 get_arg_u64(const char *key, u64 def);
/* Size "key=n[KMG]" (bare numbers in default_unit); aborts on junk. */
u64 get_arg_size(const char *key, u64 default_unit, u64 def);
/* Highest end address of available RAM according to the mmap (0 if none). */
u64 mmap_ram_end(void);
/* Identity-map [4 GiB, end) with 2 MiB pages (no-op below 4 GiB). */
void map_high_memory(u64 end);

/* ---- interrupts (desc.c) ---- */
struct ex_regs {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rdi, rsi, rbp, rbx, rdx, rcx, rax;
	u64 vector, error_code;
	u64 rip, cs, rflags, rsp, ss;
};
typedef void (*handler_t)(struct ex_regs *regs);
/* Install a handler; for vectors >= 32 the LAPIC EOI is sent after it. */
void set_handler(int vector, handler_t h);
void idt_init(void);
void load_idt(void);

/* ---- local APIC / IOAPIC (apic.c) ---- */
#define APIC_ID 0x20
#define APIC_VERSION 0x30
#define APIC_TPR 0x80
#define APIC_EOI 0xb0
#define APIC_SVR 0xf0
#define APIC_ESR 0x280
#define APIC_ICR_LO 0x300
#define APIC_ICR_HI 0x310
#define APIC_LVT_TIMER 0x320
#define APIC_LVT_LINT0 0x350
#define APIC_LVT_LINT1 0x360
#define APIC_LVT_ERROR 0x370
#define APIC_TIMER_INITIAL 0x380
#define APIC_TIMER_CURRENT 0x390
#define APIC_TIMER_DIVIDE 0x3e0
#define APIC_LVT_MASKED (1u << 16)
#define APIC_TIMER_PERIODIC (1u << 17)
#define IOAPIC_DEFAULT_BASE 0xfec00000ULL
extern u64 lapic_base;
u32 lapic_read(u32 reg);
void lapic_write(u32 reg, u32 v);
u32 lapic_id(void);
void lapic_eoi(void);
void lapic_init(void);
/* Send an IPI: icr_lo is the low ICR word, dest the destination APIC id. */
void lapic_send_ipi(u32 dest, u32 icr_lo);
u32 ioapic_read(u64 base, u32 reg);
void ioapic_write(u64 base, u32 reg, u32 v);
/* Program redirection entry: fixed delivery, physical destination, edge, active high. */
void ioapic_route(u64 base, int pin, u8 vector, u8 dest_apic_id, bool masked);
/* Mask both 8259 PICs. */
void pic_mask_all(void);

/*
 * Wall-clock deadline using the (masked) LAPIC timer counting down at the
 * KVM/QEMU APIC bus rate of 1 GHz, divided by 16.  Independent of guest
 * speed.  Do not use while a test is using the LAPIC timer.
 */
void deadline_start(u32 ms);
bool deadline_passed(void);

/* ---- MP table and SMP (smp.c) ---- */
struct mp_cpu {
	u8 apic_id;
	bool bsp;
};
struct mp_irq {
	u8 irq_type;	/* 0 = INT, 1 = NMI, 2 = SMI, 3 = ExtINT */
	u16 flags;
	u8 src_bus;
	u8 src_irq;
	u8 dst_ioapic;
	u8 dst_pin;
};
struct mp_info {
	u64 fp_addr;		/* floating pointer structure */
	u64 table_addr;		/* configuration table */
	u32 lapic_addr;
	int ncpus;		/* enabled processors */
	struct mp_cpu cpus[MAX_CPUS];
	int nioapics;
	u8 ioapic_id;
	u32 ioapic_addr;
	int isa_bus;		/* bus id of the ISA bus, -1 if none */
	int nirqs;
	struct mp_irq irqs[64];
};
/* Locate and parse the MP table; prints what is wrong and returns false if unusable. */
bool mp_find(struct mp_info *mp);
/* IOAPIC pin that ISA IRQ `irq` is routed to per the MP table (-1 if not listed). */
int mp_isa_irq_pin(const struct mp_info *mp, int irq);

/* Filled by APs as they arrive: arrival order, APIC ids. */
extern volatile u32 ap_count;
extern volatile u32 ap_apic_ids[MAX_CPUS];
/* Optional function every AP runs after recording itself (then halts). */
extern void (*volatile ap_function)(u32 index);
/*
 * Start one AP with INIT + SIPI + SIPI (trampoline at AP_TRAMPOLINE) and wait
 * up to timeout_ms for it to increment ap_count.  Returns true if it arrived.
 */
bool smp_start_ap(u8 apic_id, u32 timeout_ms);

/* ---- fw_cfg (fwcfg.c): QEMU's legacy port I/O interface ---- */
#define FW_CFG_PORT_SEL 0x510	/* 16-bit selector */
#define FW_CFG_PORT_DATA 0x511	/* data, one byte per read */
#define FW_CFG_SIGNATURE 0x00	/* "QEMU" */
#define FW_CFG_ID 0x01		/* u32: bit 0 traditional interface, bit 1 DMA */
#define FW_CFG_RAM_SIZE 0x03	/* u64 */
#define FW_CFG_NB_CPUS 0x05	/* u16 */
#define FW_CFG_MAX_CPUS 0x0f	/* u16 */
#define FW_CFG_MAX_RAM 0x11	/* kvm-unit-tests' name; QEMU's FW_CFG_KERNEL_DATA */
#define FW_CFG_FILE_DIR 0x19
/* Select `key` and read `len` bytes of it. */
void fwcfg_read(u16 key, void *buf, size_t len);
/* Select `key` and read it as a little-endian number of `len` (<= 8) bytes. */
u64 fwcfg_read_le(u16 key, size_t len);
/* Whether the signature item reads "QEMU". */
bool fwcfg_present(void);
/* Boot CPUs (FW_CFG_NB_CPUS), as kvm-unit-tests' fwcfg_get_nb_cpus(). */
u16 fwcfg_nb_cpus(void);

/* Supplied by each guest. */
int main(int argc, char **argv);

#endif
