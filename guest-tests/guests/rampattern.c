/*
 * rampattern: writes an address-derived pattern into the first, middle and
 * last qword of every page of available RAM (per the multiboot memory map)
 * outside [0, 1 MiB) and the guest image (code, data, stacks, page tables),
 * then verifies them all.
 * Command line: stride=<n>[K|M|G] (distance between tested pages, default
 * 4K; e.g. stride=1M for a sparse run over a 4 GiB guest),
 * min_mem=<MiB> (fail unless at least that much RAM was tested).
 * RAM above 4 GiB is identity-mapped on demand.
 */
#include "lib/lib.h"

#define MAX_REPORT 10

static u64 stride;
static u64 pages, errors;

static inline u64 pat0(u64 a) { return a ^ 0x5a5aa5a5c3c33c3cULL; }
static inline u64 pat1(u64 a) { return (a * 0x9e3779b97f4a7c15ULL) ^ 0x0123456789abcdefULL; }
static inline u64 pat2(u64 a) { return ~a; }

static void check(u64 addr, u64 want)
{
	u64 got = *(volatile u64 *)addr;
	if (got != want) {
		if (errors < MAX_REPORT)
			printf("CORRUPT 0x%lx expected 0x%lx got 0x%lx\n", addr, want, got);
		errors++;
	}
}

/* Apply fn to every tested page; returns the number of pages. */
static u64 for_each_page(bool verify)
{
	u64 img0 = ALIGN_DOWN((u64)__image_start, PAGE_SIZE);
	u64 img1 = ALIGN_UP((u64)__image_end, PAGE_SIZE);
	u64 n = 0;

	for (int i = 0; i < boot_info.nr_mmap; i++) {
		const struct mmap_entry *e = &boot_info.mmap[i];
		if (e->type != 1)
			continue;
		u64 s = ALIGN_UP(e->addr, PAGE_SIZE), end = ALIGN_DOWN(e->addr + e->len, PAGE_SIZE);
		if (s < MiB)
			s = MiB;
		/* Start on a stride boundary so both passes visit the same pages. */
		s = ALIGN_UP(s, stride);
		u64 region_pages = 0;
		for (u64 p = s; p < end; p += stride) {
			if (p >= img0 && p < img1)
				continue;
			if (verify) {
				check(p, pat0(p));
				check(p + 2048, pat1(p));
				check(p + 4088, pat2(p));
			} else {
				*(volatile u64 *)p = pat0(p);
				*(volatile u64 *)(p + 2048) = pat1(p);
				*(volatile u64 *)(p + 4088) = pat2(p);
			}
			region_pages++;
		}
		if (region_pages)
			printf("%s [0x%lx, 0x%lx): %lu pages\n", verify ? "verified" : "wrote", s, end,
			       region_pages);
		n += region_pages;
	}
	return n;
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	stride = get_arg_size("stride", 1, PAGE_SIZE);
	u64 min_mem = get_arg_size("min_mem", MiB, 0);

	if (stride < PAGE_SIZE || (stride & (stride - 1)))
		report_abort("stride must be a power of two >= 4K");
	if (!(boot_info.flags & MB_FLAG_MMAP) || !boot_info.nr_mmap)
		report_abort("no multiboot memory map");
	u64 end = mmap_ram_end();
	map_high_memory(end);
	printf("RAM ends at 0x%lx; image [0x%lx, 0x%lx); stride 0x%lx\n", end, (u64)__image_start,
	       (u64)__image_end, stride);

	pages = for_each_page(false);
	u64 checked = for_each_page(true);
	report(checked == pages, "verified the same %lu pages that were written", pages);
	report(errors == 0, "%lu pages (%lu MiB spanned) hold their pattern, %lu bad qwords", pages,
	       pages * stride / MiB, errors);
	if (min_mem)
		report(pages * stride >= min_mem, "tested at least %lu MiB", min_mem / MiB);
	return report_summary();
}
