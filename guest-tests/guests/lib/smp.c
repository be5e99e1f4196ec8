/* MP table parsing and AP start-up via INIT / SIPI / SIPI. */
#include "lib.h"

extern char ap_tramp_start[], ap_tramp_end[];

volatile u32 ap_count;
volatile u32 ap_apic_ids[MAX_CPUS];
void (*volatile ap_function)(u32 index);

static u8 checksum(const void *p, size_t n)
{
	const u8 *b = p;
	u8 sum = 0;
	while (n--)
		sum += *b++;
	return sum;
}

static u64 scan_fp(u64 start, u64 len)
{
	for (u64 p = start; p + 16 <= start + len; p += 16) {
		const u8 *b = (const u8 *)p;
		if (memcmp(b, "_MP_", 4) == 0 && b[8] == 1 && checksum(b, 16) == 0)
			return p;
	}
	return 0;
}

int mp_isa_irq_pin(const struct mp_info *mp, int irq)
{
	for (int i = 0; i < mp->nirqs; i++) {
		const struct mp_irq *e = &mp->irqs[i];
		if (e->irq_type == 0 && e->src_bus == mp->isa_bus && e->src_irq == irq)
			return e->dst_pin;
	}
	return -1;
}

bool mp_find(struct mp_info *mp)
{
	u64 fp = 0;
	u16 ebda_seg = *(volatile u16 *)phys_ptr(0x40e);

	memset(mp, 0, sizeof(*mp));
	mp->isa_bus = -1;
	if (ebda_seg)
		fp = scan_fp((u64)ebda_seg << 4, 1024);
	if (!fp)
		fp = scan_fp(0x9fc00, 1024);
	if (!fp)
		fp = scan_fp(0xf0000, 0x10000);
	if (!fp) {
		printf("MP: no floating pointer structure found\n");
		return false;
	}
	mp->fp_addr = fp;
	const u8 *f = (const u8 *)fp;
	u32 table = *(const u32 *)(f + 4);
	if (!table) {
		printf("MP: floating pointer at 0x%lx has no configuration table (default config %u)\n",
		       fp, f[11]);
		return false;
	}
	mp->table_addr = table;
	const u8 *t = (const u8 *)(u64)table;
	u16 len = *(const u16 *)(t + 4);
	u16 count = *(const u16 *)(t + 34);
	if (memcmp(t, "PCMP", 4) != 0) {
		printf("MP: bad configuration table signature at 0x%x\n", table);
		return false;
	}
	if (checksum(t, len) != 0) {
		printf("MP: bad configuration table checksum\n");
		return false;
	}
	mp->lapic_addr = *(const u32 *)(t + 36);
	const u8 *e = t + 44, *end = t + len;
	for (u16 i = 0; i < count && e < end; i++) {
		switch (e[0]) {
		case 0: /* processor */
			if ((e[3] & 1) && mp->ncpus < MAX_CPUS) {
				mp->cpus[mp->ncpus].apic_id = e[1];
				mp->cpus[mp->ncpus].bsp = e[3] & 2;
				mp->ncpus++;
			} else if (e[3] & 1) {
				printf("MP: more than %d CPUs, ignoring apic id %u\n", MAX_CPUS, e[1]);
			}
			e += 20;
			break;
		case 1: /* bus */
			if (memcmp(e + 2, "ISA   ", 6) == 0 || memcmp(e + 2, "ISA", 3) == 0)
				mp->isa_bus = e[1];
			e += 8;
			break;
		case 2: /* IOAPIC */
			if (e[3] & 1) {
				if (!mp->nioapics) {
					mp->ioapic_id = e[1];
					mp->ioapic_addr = *(const u32 *)(e + 4);
				}
				mp->nioapics++;
			}
			e += 8;
			break;
		case 3: /* I/O interrupt assignment */
			if (mp->nirqs < (int)ARRAY_SIZE(mp->irqs)) {
				struct mp_irq *q = &mp->irqs[mp->nirqs++];
				q->irq_type = e[1];
				q->flags = *(const u16 *)(e + 2);
				q->src_bus = e[4];
				q->src_irq = e[5];
				q->dst_ioapic = e[6];
				q->dst_pin = e[7];
			}
			e += 8;
			break;
		case 4: /* local interrupt assignment */
			e += 8;
			break;
		default:
			printf("MP: unknown entry type %u at 0x%lx\n", e[0], (u64)e);
			return false;
		}
	}
	return true;
}

void ap_entry(u32 index);
void ap_entry(u32 index)
{
	load_idt();
	ap_apic_ids[index] = lapic_id();
	__atomic_fetch_add(&ap_count, 1, __ATOMIC_SEQ_CST);
	if (ap_function)
		ap_function(index);
}

bool smp_start_ap(u8 apic_id, u32 timeout_ms)
{
	static bool copied;
	u32 before = ap_count;

	if (!copied) {
		memcpy((void *)AP_TRAMPOLINE, ap_tramp_start, ap_tramp_end - ap_tramp_start);
		copied = true;
	}
	lapic_write(APIC_ESR, 0);
	/* INIT (assert), then two start-up IPIs with vector AP_TRAMPOLINE >> 12. */
	lapic_send_ipi(apic_id, 0x4500);
	lapic_send_ipi(apic_id, 0x4600 | (AP_TRAMPOLINE >> 12));
	lapic_send_ipi(apic_id, 0x4600 | (AP_TRAMPOLINE >> 12));
	deadline_start(timeout_ms);
	while (ap_count == before) {
		if (deadline_passed())
			return ap_count != before;
		cpu_relax();
	}
	return true;
}
