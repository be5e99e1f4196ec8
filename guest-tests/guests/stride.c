/*
 * stride: the page-stride busy guest of the live-migration benchmark.
 *
 * Writes one 32-bit word into every 4 KiB page of a working set, over and
 * over, and verifies the previous value first: every page is dirtied once
 * per pass at the emulator's full speed, the hardest load for pre-copy (a
 * guest that rewrites every qword of a page dirties pages ~1000x slower).
 * The word of page p in generation g is f(g, p), never zero, so a page that
 * was not migrated (zero on a fresh destination) or a stale copy of an older
 * generation is caught by the next pass on the destination.
 *
 * Command line: ws=<size> (working set, default 16 MiB; n[K|M|G]; ws=max:
 * every page from the first 2 MiB boundary above the image to the end of
 * that RAM region), passes=N (exit 0 after N verified passes; default:
 * never stop).
 * Output: "stride: ..." (the range), "fill ok" after generation 0, then
 * "pass N ok" after each verified pass; on a mismatch "CORRUPT <addr>
 * expected <v> got <v>", "FAIL: ..." and exit code 1.
 */
#include "lib/lib.h"

static inline u32 value(u64 gen, u64 page)
{
	u32 v = (u32)(page >> 12) * 2654435761u + (u32)gen * 0x9e3779b9u;
	return v ? v : 1;
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u64 base = ALIGN_UP((u64)__image_end, 2 * MiB);
	u64 passes = get_arg_u64("passes", 0);
	const char *ws_arg = get_arg("ws");
	u64 end = 0;

	for (int i = 0; i < boot_info.nr_mmap; i++) {
		const struct mmap_entry *e = &boot_info.mmap[i];
		if (e->type == 1 && e->addr <= base && e->addr + e->len > base)
			end = ALIGN_DOWN(e->addr + e->len, PAGE_SIZE);
	}
	if (!end)
		report_abort("no RAM at 0x%lx", base);
	if (!ws_arg || strcmp(ws_arg, "max") != 0) {
		u64 want = base + ALIGN_UP(get_arg_size("ws", MiB, 16 * MiB), PAGE_SIZE);
		if (want > end)
			report_abort("working set [0x%lx, 0x%lx) is not inside available RAM", base,
				     want);
		end = want;
	}
	map_high_memory(end);
	printf("stride: working set [0x%lx, 0x%lx) (%lu KiB, %lu pages), passes=%lu%s\n", base,
	       end, (end - base) / KiB, (end - base) / PAGE_SIZE, passes,
	       passes ? "" : " (endless)");

	for (u64 p = base; p < end; p += PAGE_SIZE)
		*(volatile u32 *)p = value(0, p);
	printf("fill ok\n");

	for (u64 gen = 1; !passes || gen <= passes; gen++) {
		for (u64 p = base; p < end; p += PAGE_SIZE) {
			volatile u32 *w = (volatile u32 *)p;
			u32 want = value(gen - 1, p);
			u32 got = *w;
			if (got != want) {
				printf("CORRUPT 0x%lx expected 0x%x got 0x%x\n", p, want, got);
				printf("FAIL: memory corrupted (found in pass %lu)\n", gen);
				return 1;
			}
			*w = value(gen, p);
		}
		printf("pass %lu ok\n", gen);
	}
	printf("stride: %lu passes done\n", passes);
	return 0;
}
