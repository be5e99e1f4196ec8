/*
 * memmap: checks the multiboot memory map and mem_lower/mem_upper against
 * the VM layout for RAM size M (mem=<MiB> or mem=<n>[K|M|G], required):
 *   available RAM exactly [0, 0x9fc00), [1 MiB, min(M, 3 GiB)) and, when
 *   M > 3 GiB, [4 GiB, 4 GiB + M - 3 GiB); nothing available in
 *   [0x9fc00, 1 MiB) or [3 GiB, 4 GiB).
 * fw_reserved=<KiB> (default 0) tolerates that much expected RAM missing
 * (firmware such as SeaBIOS reserves the top of low RAM); the available
 * entries must then still lie inside the expected ranges.
 */
#include "lib/lib.h"

#define LOW_END 0x9fc00ULL
#define HIGH_START (4 * GiB)
#define HOLE_START (3 * GiB)

struct range {
	u64 start, end;
};

static u64 overlap(u64 a0, u64 a1, u64 b0, u64 b1)
{
	u64 s = a0 > b0 ? a0 : b0, e = a1 < b1 ? a1 : b1;
	return e > s ? e - s : 0;
}

static const char *type_name(u32 t)
{
	switch (t) {
	case 1: return "available";
	case 2: return "reserved";
	case 3: return "ACPI reclaimable";
	case 4: return "ACPI NVS";
	case 5: return "bad";
	default: return "other";
	}
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	const struct boot_info *bi = &boot_info;
	u64 m = get_arg_size("mem", MiB, 0);
	u64 slack = get_arg_u64("fw_reserved", 0) * KiB;

	if (!m)
		report_abort("missing mem=<MiB> on the command line");
	u64 low_top = m < HOLE_START ? m : HOLE_START;
	struct range expected[3] = {
		{ 0, LOW_END },
		{ MiB, low_top },
		{ HIGH_START, HIGH_START + (m > HOLE_START ? m - HOLE_START : 0) },
	};
	int nexp = m > HOLE_START ? 3 : 2;
	u64 expected_total = m - (MiB - LOW_END);
	printf("RAM %lu MiB: expecting %lu bytes (0x%lx) available\n", m / MiB, expected_total,
	       expected_total);
	for (int i = 0; i < nexp; i++)
		printf("  expected available [0x%lx, 0x%lx)\n", expected[i].start, expected[i].end);

	report(bi->magic == 0x2BADB002, "booted by a multiboot loader");
	report(bi->flags & MB_FLAG_MEM, "multiboot flags 0x%x has mem_lower/mem_upper", bi->flags);
	report(bi->flags & MB_FLAG_MMAP, "multiboot flags 0x%x has a memory map", bi->flags);
	report(!bi->mmap_bad_size && !bi->mmap_truncated, "memory map entries well formed (%d)",
	       bi->nr_mmap);

	/* mem_lower: KiB below 640 KiB (0x9fc00 = 639 KiB; 640 also accepted). */
	report(bi->mem_lower == 639 || bi->mem_lower == 640, "mem_lower = %u KiB (639 or 640)",
	       bi->mem_lower);
	u64 upper = (low_top - MiB) / KiB;
	report(bi->mem_upper == upper || (slack && bi->mem_upper <= upper &&
					  bi->mem_upper + slack / KiB >= upper),
	       "mem_upper = %u KiB (expected %lu)", bi->mem_upper, upper);

	u64 total = 0, high_total = 0, bad_hole = 0, bad_low = 0, outside = 0, ovl = 0;
	for (int i = 0; i < bi->nr_mmap; i++) {
		const struct mmap_entry *e = &bi->mmap[i];
		u64 s = e->addr, end = e->addr + e->len;
		printf("  mmap [0x%016lx, 0x%016lx) %s (%u)\n", s, end, type_name(e->type), e->type);
		if (e->type != 1)
			continue;
		total += e->len;
		if (s >= HIGH_START)
			high_total += e->len;
		bad_hole += overlap(s, end, HOLE_START, HIGH_START);
		bad_low += overlap(s, end, LOW_END, MiB);
		u64 inside = 0;
		for (int j = 0; j < nexp; j++)
			inside += overlap(s, end, expected[j].start, expected[j].end);
		outside += e->len - inside;
		for (int j = 0; j < i; j++) {
			const struct mmap_entry *f = &bi->mmap[j];
			if (f->type == 1)
				ovl += overlap(s, end, f->addr, f->addr + f->len);
		}
	}
	report(ovl == 0, "available entries do not overlap each other");
	report(bad_hole == 0, "nothing available in [3 GiB, 4 GiB) (0xfec00000/0xfee00000/0xff000000)");
	report(bad_low == 0, "nothing available in [0x9fc00, 1 MiB)");
	report(outside == 0, "all available RAM is within the expected ranges (%lu bytes outside)",
	       outside);
	if (slack)
		report(total <= expected_total && total + slack >= expected_total,
		       "total available 0x%lx within %lu KiB of 0x%lx", total, slack / KiB,
		       expected_total);
	else
		report(total == expected_total, "total available 0x%lx equals 0x%lx", total,
		       expected_total);

	/* Each expected range is covered (up to the slack). */
	for (int j = 0; j < nexp; j++) {
		u64 covered = 0;
		for (int i = 0; i < bi->nr_mmap; i++) {
			const struct mmap_entry *e = &bi->mmap[i];
			if (e->type == 1)
				covered += overlap(e->addr, e->addr + e->len, expected[j].start,
						   expected[j].end);
		}
		u64 want = expected[j].end - expected[j].start;
		report(covered == want || (slack && covered + slack >= want),
		       "range [0x%lx, 0x%lx) available (0x%lx of 0x%lx bytes)", expected[j].start,
		       expected[j].end, covered, want);
	}
	if (m > HOLE_START)
		report(high_total == m - HOLE_START, "RAM above 4 GiB: 0x%lx bytes (expected 0x%lx)",
		       high_total, m - HOLE_START);
	else
		report(high_total == 0, "no RAM above 4 GiB (found 0x%lx bytes)", high_total);
	return report_summary();
}
