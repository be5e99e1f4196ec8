/*
 * acpi: the ACPI tables a PC firmware (SeaBIOS under QEMU, hopvm itself)
 * leaves for the OS, checked the way an OS finds them:
 *  - the RSDP ("RSD PTR ", 16-byte aligned) in 0xE0000-0xFFFFF, its checksum
 *    (and the extended one for revision >= 2);
 *  - the RSDT (and XSDT if present): signature, checksum, every table they
 *    list with a valid header and checksum, the same tables in both;
 *  - FADT ("FACP"): FACS (signature, length >= 64, 64-byte aligned) and DSDT
 *    (signature, checksum) pointers, X_ fields agreeing when set, the PM
 *    timer block (port 0x608, length 4);
 *  - MADT ("APIC"): local APIC address 0xfee00000, one enabled local APIC per
 *    CPU (cpus=N) with distinct ids including the running CPU's, the IOAPIC at
 *    0xfec00000 with GSI base 0, the IRQ 0 -> GSI 2 interrupt source override,
 *    well-formed entries;
 *  - no table in memory the multiboot memory map reports as available;
 *  - the PM timer: 24-bit (unless the FADT says 32), never going backwards,
 *    advancing at 3.579545 MHz (+-10%) against the LAPIC timer.
 * Command line: cpus=N (required).
 */
#include "lib/lib.h"

#define PM_TIMER_HZ 3579545ULL

struct acpi_header {
	char sig[4];
	u32 length;
	u8 revision;
	u8 checksum;
	char oem_id[6];
	char oem_table_id[8];
	u32 oem_revision;
	u32 creator_id;
	u32 creator_revision;
} __attribute__((packed));

static u8 sum_bytes(const void *p, u64 n)
{
	const u8 *b = p;
	u8 s = 0;
	while (n--)
		s += *b++;
	return s;
}

static u64 find_rsdp(void)
{
	for (u64 p = 0xe0000; p < 0x100000; p += 16) {
		const u8 *b = phys_ptr(p);
		if (memcmp(b, "RSD PTR ", 8) == 0 && sum_bytes(b, 20) == 0)
			return p;
	}
	return 0;
}

/* Whether [addr, addr+len) overlaps RAM the multiboot mmap calls available. */
static bool in_available_ram(u64 addr, u64 len)
{
	for (int i = 0; i < boot_info.nr_mmap; i++) {
		const struct mmap_entry *e = &boot_info.mmap[i];
		if (e->type == 1 && addr < e->addr + e->len && e->addr < addr + len)
			return true;
	}
	return false;
}

static int nr_tables;
static u64 tables[64];
static u64 facp, madt;
static bool tables_in_ram;

/* Checks a table's header and checksum; returns its length, 0 if unusable. */
static u32 check_table(u64 addr, const char *what)
{
	if (!addr || addr >= 4 * GiB) {
		report(false, "%s at 0x%lx: address valid", what, addr);
		return 0;
	}
	const struct acpi_header *h = phys_ptr(addr);
	char sig[5] = { h->sig[0], h->sig[1], h->sig[2], h->sig[3], 0 };
	if (h->length < sizeof(*h) || h->length > 16 * MiB) {
		report(false, "%s \"%s\" at 0x%lx: length %u sane", what, sig, addr, h->length);
		return 0;
	}
	char oem[7], oemt[9];
	memcpy(oem, h->oem_id, 6);
	oem[6] = 0;
	memcpy(oemt, h->oem_table_id, 8);
	oemt[8] = 0;
	printf("  %s at 0x%08lx: length %u revision %u oem \"%s\" \"%s\"\n", sig, addr, h->length,
	       h->revision, oem, oemt);
	report(sum_bytes(h, h->length) == 0, "%s \"%s\" checksum", what, sig);
	if (in_available_ram(addr, h->length)) {
		printf("  %s lies in RAM the memory map reports as available\n", sig);
		tables_in_ram = true;
	}
	return h->length;
}

static void check_madt(u64 addr, u64 cpus)
{
	const u8 *t = phys_ptr(addr);
	const struct acpi_header *h = (const void *)t;
	u32 lapic_addr = *(const u32 *)(t + 36);
	u32 flags = *(const u32 *)(t + 40);
	u8 ids[256];
	int nlapic = 0, nioapic = 0;
	u32 ioapic_id = 0;
	bool distinct = true, bsp_found = false, ioapic_ok = false, iso0 = false, bad_entry = false;
	u32 bsp = lapic_id();

	report(lapic_addr == 0xfee00000, "MADT local APIC address 0x%x", lapic_addr);
	report_info("MADT flags 0x%x (PCAT_COMPAT %s)", flags, (flags & 1) ? "set" : "clear");
	u32 off = 44;
	while (off + 2 <= h->length) {
		u8 type = t[off], len = t[off + 1];
		if (len < 2 || off + len > h->length) {
			printf("  MADT entry at +%u: type %u length %u runs past the table\n", off, type, len);
			bad_entry = true;
			break;
		}
		const u8 *e = t + off;
		switch (type) {
		case 0: /* processor local APIC */
			if (len != 8) {
				bad_entry = true;
				break;
			}
			printf("  local APIC: processor %u apic id %u flags 0x%x\n", e[2], e[3],
			       *(const u32 *)(e + 4));
			if (*(const u32 *)(e + 4) & 1) {
				for (int i = 0; i < nlapic; i++)
					if (ids[i] == e[3])
						distinct = false;
				if (nlapic < (int)sizeof(ids))
					ids[nlapic] = e[3];
				nlapic++;
				if (e[3] == bsp)
					bsp_found = true;
			}
			break;
		case 1: /* IOAPIC */
			if (len != 12) {
				bad_entry = true;
				break;
			}
			printf("  IOAPIC: id %u address 0x%x GSI base %u\n", e[2], *(const u32 *)(e + 4),
			       *(const u32 *)(e + 8));
			nioapic++;
			if (*(const u32 *)(e + 4) == IOAPIC_DEFAULT_BASE && *(const u32 *)(e + 8) == 0) {
				ioapic_ok = true;
				ioapic_id = e[2];
			}
			break;
		case 2: /* interrupt source override */
			if (len != 10) {
				bad_entry = true;
				break;
			}
			printf("  override: bus %u irq %u -> GSI %u flags 0x%x\n", e[2], e[3],
			       *(const u32 *)(e + 4), *(const u16 *)(e + 8));
			if (e[2] == 0 && e[3] == 0 && *(const u32 *)(e + 4) == 2)
				iso0 = true;
			break;
		case 4: /* local APIC NMI */
			printf("  local APIC NMI: processor 0x%x LINT%u\n", e[2], e[5]);
			break;
		default:
			printf("  entry type %u length %u\n", type, len);
			break;
		}
		off += len;
	}
	report(!bad_entry && off == h->length, "MADT entries well formed and fill the table (%u of %u bytes)",
	       off, h->length);
	report((u64)nlapic == cpus, "MADT lists %d enabled local APICs, cpus=%lu", nlapic, cpus);
	report(distinct, "MADT local APIC ids are distinct");
	report(bsp_found, "MADT lists the running CPU's APIC id %u", bsp);
	report(nioapic >= 1 && ioapic_ok, "MADT IOAPIC at 0x%llx with GSI base 0 (%d IOAPICs)",
	       IOAPIC_DEFAULT_BASE, nioapic);
	/* Linux uses the register's id when they differ, so only tell. */
	u32 reg_id = (ioapic_read(IOAPIC_DEFAULT_BASE, 0) >> 24) & 0xff;
	report_info("MADT IOAPIC id %u, the IOAPIC's ID register reads %u%s", ioapic_id, reg_id,
		    ioapic_id == reg_id ? "" : " (they differ)");
	report(iso0, "MADT overrides ISA IRQ 0 -> GSI 2");
}

static void check_pm_timer(u16 port, bool ext)
{
	u32 mask = ext ? 0xffffffffu : 0xffffffu;
	u32 prev = inl(port), first = prev, over = 0, back = 0;

	for (int i = 0; i < 2000; i++) {
		u32 v = inl(port);
		if (v & ~mask)
			over++;
		if (((v - prev) & mask) > mask / 2)
			back++;
		prev = v;
	}
	report(over == 0, "PM timer values fit %d bits (%u reads over)", ext ? 32 : 24, over);
	report(back == 0, "PM timer never went backwards in 2000 reads (%u)", back);
	report(prev != first, "PM timer advances (0x%x -> 0x%x)", first, prev);

	/*
	 * Rate against the LAPIC timer (62.5 MHz after divide-by-16) over
	 * ~100 ms: each PM timer read is bracketed by two LAPIC reads, and a
	 * measurement whose bracket is wider than 1 ms (the vCPU was scheduled
	 * out) is retried.
	 */
	u64 pm = 0, lapic_ticks = 0, expect = 0;
	for (int attempt = 0; attempt < 5; attempt++) {
		deadline_start(300);
		u32 a0 = lapic_read(APIC_TIMER_CURRENT);
		u32 t0 = inl(port);
		u32 b0 = lapic_read(APIC_TIMER_CURRENT);
		while (lapic_read(APIC_TIMER_CURRENT) + 100 * 62500u > b0)
			cpu_relax();
		u32 a1 = lapic_read(APIC_TIMER_CURRENT);
		u32 t1 = inl(port);
		u32 b1 = lapic_read(APIC_TIMER_CURRENT);
		pm = (t1 - t0) & mask;
		/* The timer counts down: elapsed = midpoint0 - midpoint1. */
		lapic_ticks = ((u64)a0 + b0) / 2 - ((u64)a1 + b1) / 2;
		expect = PM_TIMER_HZ * lapic_ticks / 62500000ULL;
		if (a0 - b0 <= 62500 && a1 - b1 <= 62500 && b1 != 0)
			break;
		printf("  PM timer rate: measurement disturbed (brackets %u/%u LAPIC ticks), again\n",
		       a0 - b0, a1 - b1);
	}
	printf("  PM timer: %lu ticks in %lu LAPIC ticks (expected about %lu)\n", pm, lapic_ticks,
	       expect);
	report(pm * 10 >= expect * 9 && pm * 10 <= expect * 11,
	       "PM timer runs at 3.579545 MHz +-10%% (%lu ticks in ~100 ms, expected %lu)", pm,
	       expect);
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u64 cpus = get_arg_u64("cpus", 0);

	if (!cpus)
		report_abort("missing cpus=N on the command line");

	u64 rsdp = find_rsdp();
	report(rsdp != 0, "RSDP found in 0xE0000-0xFFFFF at 0x%lx", rsdp);
	if (!rsdp)
		return report_summary();
	const u8 *r = phys_ptr(rsdp);
	char oem[7];
	memcpy(oem, r + 9, 6);
	oem[6] = 0;
	u8 rev = r[15];
	u32 rsdt = *(const u32 *)(r + 16);
	u64 xsdt = 0;
	printf("RSDP: revision %u oem \"%s\" RSDT 0x%x\n", rev, oem, rsdt);
	if (rev >= 2) {
		u32 len = *(const u32 *)(r + 20);
		xsdt = *(const u64 *)(r + 24);
		report(len >= 36 && sum_bytes(r, len) == 0, "RSDP extended checksum (length %u)", len);
		printf("RSDP: XSDT 0x%lx\n", xsdt);
	}

	u32 rsdt_len = check_table(rsdt, "RSDT");
	if (!rsdt_len)
		return report_summary();
	report(memcmp(phys_ptr(rsdt), "RSDT", 4) == 0, "RSDT signature");
	report((rsdt_len - 36) % 4 == 0, "RSDT length %u holds whole 32-bit entries", rsdt_len);
	for (u32 off = 36; off + 4 <= rsdt_len && nr_tables < (int)ARRAY_SIZE(tables); off += 4) {
		u64 a = *(const u32 *)((const u8 *)phys_ptr(rsdt) + off);
		tables[nr_tables++] = a;
		if (!check_table(a, "RSDT entry"))
			continue;
		const char *sig = phys_ptr(a);
		if (memcmp(sig, "FACP", 4) == 0 && !facp)
			facp = a;
		if (memcmp(sig, "APIC", 4) == 0 && !madt)
			madt = a;
	}
	if (xsdt) {
		u32 xlen = check_table(xsdt, "XSDT");
		if (xlen) {
			report(memcmp(phys_ptr(xsdt), "XSDT", 4) == 0, "XSDT signature");
			int n = 0, missing = 0;
			for (u32 off = 36; off + 8 <= xlen; off += 8, n++) {
				u64 a = *(const u64 *)((const u8 *)phys_ptr(xsdt) + off);
				bool found = false;
				for (int i = 0; i < nr_tables; i++)
					found |= tables[i] == a;
				missing += !found;
			}
			report(n == nr_tables && missing == 0, "XSDT lists the RSDT's %d tables (%d, %d not in the RSDT)",
			       nr_tables, n, missing);
		}
	}
	report(facp != 0, "FADT (\"FACP\") listed in the RSDT");
	report(madt != 0, "MADT (\"APIC\") listed in the RSDT");

	if (facp) {
		const u8 *f = phys_ptr(facp);
		const struct acpi_header *fh = (const void *)f;
		u32 facs = *(const u32 *)(f + 36);
		u32 dsdt = *(const u32 *)(f + 40);
		u32 pm_tmr = *(const u32 *)(f + 76);
		u8 pm_tmr_len = f[91];
		u32 flags = fh->length >= 116 ? *(const u32 *)(f + 112) : 0;
		printf("FADT: revision %u length %u FACS 0x%x DSDT 0x%x PM_TMR_BLK 0x%x len %u flags 0x%x SCI %u\n",
		       fh->revision, fh->length, facs, dsdt, pm_tmr, pm_tmr_len, flags,
		       *(const u16 *)(f + 46));
		report(fh->length >= 116, "FADT length %u >= 116 (ACPI 1.0)", fh->length);
		if (fh->length >= 148) {
			u64 xfacs = *(const u64 *)(f + 132), xdsdt = *(const u64 *)(f + 140);
			report(!xfacs || !facs || xfacs == facs, "FADT X_FIRMWARE_CTRL 0x%lx agrees with FACS 0x%x",
			       xfacs, facs);
			report(!xdsdt || xdsdt == dsdt, "FADT X_DSDT 0x%lx agrees with DSDT 0x%x", xdsdt, dsdt);
			if (!facs)
				facs = (u32)xfacs;
		}
		if (fh->length >= 220) {
			const u8 *gas = f + 208; /* X_PM_TMR_BLK */
			u64 xaddr = *(const u64 *)(gas + 4);
			report(!xaddr || (gas[0] == 1 && xaddr == pm_tmr),
			       "FADT X_PM_TMR_BLK (space %u address 0x%lx) agrees with PM_TMR_BLK", gas[0], xaddr);
		}

		/* FACS: no checksum, 64-byte aligned, at least 64 bytes. */
		if (facs) {
			const u8 *fa = phys_ptr(facs);
			u32 flen = *(const u32 *)(fa + 4);
			report(memcmp(fa, "FACS", 4) == 0 && flen >= 64 && (facs & 63) == 0,
			       "FACS at 0x%x: signature, length %u >= 64, 64-byte aligned", facs, flen);
			if (in_available_ram(facs, flen >= 64 ? flen : 64))
				tables_in_ram = true;
		} else {
			report(false, "FADT points to a FACS");
		}
		if (check_table(dsdt, "DSDT"))
			report(memcmp(phys_ptr(dsdt), "DSDT", 4) == 0, "DSDT signature");

		report(pm_tmr == 0x608, "PM timer block at port 0x%x (expected 0x608)", pm_tmr);
		report(pm_tmr_len == 4, "PM timer block length %u", pm_tmr_len);
		if (pm_tmr && pm_tmr < 0x10000)
			check_pm_timer((u16)pm_tmr, flags & (1u << 8));
	}
	if (madt)
		check_madt(madt, cpus);
	report(!tables_in_ram, "no ACPI table lies in RAM the memory map reports as available");
	return report_summary();
}
