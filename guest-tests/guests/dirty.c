/*
 * dirty: endlessly rewrites a working set and checks before each rewrite
 * that every qword still holds what was last written.  Meant for live
 * migration tests.  Each page is filled with v = f(generation, page address)
 * using rep stosq and verified with repe scasq.
 * Command line: ws=<MiB> (working set, default 16; n[K|M|G] also accepted),
 * passes=N (stop with exit 0 after N verified passes; default: never stop).
 * Output: "fill ok", then "pass N ok" after each verified pass; on a
 * mismatch "CORRUPT <addr> expected <v> got <v>" and exit code 1.
 * inject=N (self-test of the checker): after pass N (0 = the initial fill)
 * flip one qword in the middle of the working set, so the next pass must
 * report CORRUPT.
 * The working set starts at the first 2 MiB boundary above the image.
 */
#include "lib/lib.h"

static inline u64 value(u64 gen, u64 page)
{
	return page ^ ((gen + 1) * 0x9e3779b97f4a7c15ULL);
}

/* Returns the address of the first qword != v in the page, or 0. */
static u64 verify_page(u64 page, u64 v)
{
	u64 rdi = page, rcx = 512;
	bool equal;
	asm volatile("cld\n\trepe scasq"
		     : "+D"(rdi), "+c"(rcx), "=@ccz"(equal)
		     : "a"(v)
		     : "memory");
	return equal ? 0 : rdi - 8;
}

static void fill_page(u64 page, u64 v)
{
	u64 rdi = page, rcx = 512;
	asm volatile("cld\n\trep stosq" : "+D"(rdi), "+c"(rcx) : "a"(v) : "memory");
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u64 ws = get_arg_size("ws", MiB, 16 * MiB);
	u64 passes = get_arg_u64("passes", 0);
	bool inject = get_arg("inject") != NULL;
	u64 inject_after = get_arg_u64("inject", 0);
	u64 base = ALIGN_UP((u64)__image_end, 2 * MiB);
	u64 end = base + ALIGN_UP(ws, PAGE_SIZE);

	bool inside = false;
	for (int i = 0; i < boot_info.nr_mmap; i++) {
		const struct mmap_entry *e = &boot_info.mmap[i];
		if (e->type == 1 && e->addr <= base && e->addr + e->len >= end)
			inside = true;
	}
	if (!inside)
		report_abort("working set [0x%lx, 0x%lx) is not inside available RAM", base, end);
	map_high_memory(end);
	printf("dirty: working set [0x%lx, 0x%lx) (%lu KiB, %lu pages), passes=%lu%s\n", base, end,
	       (end - base) / KiB, (end - base) / PAGE_SIZE, passes, passes ? "" : " (endless)");

	for (u64 p = base; p < end; p += PAGE_SIZE)
		fill_page(p, value(0, p));
	printf("fill ok\n");
	u64 victim = base + ALIGN_DOWN((end - base) / 2, PAGE_SIZE) + 8 * 77;
	if (inject && inject_after == 0) {
		printf("injecting corruption at 0x%lx\n", victim);
		*(volatile u64 *)victim ^= 1ULL << 33;
	}

	for (u64 gen = 1; !passes || gen <= passes; gen++) {
		for (u64 p = base; p < end; p += PAGE_SIZE) {
			u64 want = value(gen - 1, p);
			u64 bad = verify_page(p, want);
			if (bad) {
				printf("CORRUPT 0x%lx expected 0x%lx got 0x%lx\n", bad, want,
				       *(volatile u64 *)bad);
				printf("FAIL: memory corrupted (found in pass %lu)\n", gen);
				return 1;
			}
			fill_page(p, value(gen, p));
		}
		printf("pass %lu ok\n", gen);
		if (inject && inject_after == gen) {
			printf("injecting corruption at 0x%lx\n", victim);
			*(volatile u64 *)victim ^= 1ULL << 33;
		}
	}
	printf("dirty: %lu passes done\n", passes);
	return 0;
}
