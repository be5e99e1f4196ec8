/*
 * pci-testdev: QEMU's PCI test device (1b36:0005) driven through both BARs.
 * Each BAR shows the selected test's header: test (u8, write selects), width
 * (u8), offset (u32 at 4), data (u8 at 8), count (u32 at 12), name (at 16).
 * For every test of BAR 0 (memory) and BAR 1 (I/O ports) the guest selects
 * it, checks the count starts at 0, writes the data at the offset 16 times
 * with the width asked and prints "<name>: N of 16 writes counted".  The
 * device counts them itself ("no-eventfd", N = 16) or leaves them to a KVM
 * ioeventfd that swallows them (N = 0); either passes, and the count is
 * printed for the comparison with QEMU.  Writes of another value at a
 * datamatch test's offset are never counted.  The test after the last reads
 * as all zeroes.  Each BAR must offer three tests.
 * Command line: none.
 */
#include "lib/lib.h"

#define WRITES 16

struct bar {
	const char *kind;
	bool io;
	u64 base;
};

static u8 rd8(const struct bar *b, u32 off)
{
	if (b->io)
		return inb(b->base + off);
	return *(volatile u8 *)(b->base + off);
}

static u32 rd32(const struct bar *b, u32 off)
{
	if (b->io)
		return inl(b->base + off);
	return *(volatile u32 *)(b->base + off);
}

static void wr(const struct bar *b, u32 off, u32 v, u8 width)
{
	if (b->io) {
		if (width == 1)
			outb(b->base + off, v);
		else if (width == 2)
			outw(b->base + off, v);
		else
			outl(b->base + off, v);
		return;
	}
	if (width == 1)
		*(volatile u8 *)(b->base + off) = v;
	else if (width == 2)
		*(volatile u16 *)(b->base + off) = v;
	else
		*(volatile u32 *)(b->base + off) = v;
}

static u32 cfg(u8 slot, u8 reg)
{
	outl(0xcf8, 0x80000000u | (u32)slot << 11 | (reg & 0xfc));
	return inl(0xcfc);
}

static void read_name(const struct bar *b, char *name, int max)
{
	int i;
	for (i = 0; i < max - 1; i++) {
		name[i] = rd8(b, 16 + i);
		if (!name[i])
			break;
	}
	name[i] = 0;
}

static bool has_prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return false;
	return true;
}

static bool contains(const char *s, const char *w)
{
	for (; *s; s++)
		if (has_prefix(s, w))
			return true;
	return false;
}

/* Runs every test of one BAR; returns how many it offers. */
static int run_bar(const struct bar *b)
{
	int n;
	for (n = 0; n < 256; n++) {
		wr(b, 0, n, 1);
		u32 count = rd32(b, 12);
		u8 width = rd8(b, 1);
		if (width != 1 && width != 2 && width != 4) {
			bool zero = count == 0 && width == 0 && rd32(b, 4) == 0 && rd8(b, 8) == 0 &&
				    rd8(b, 16) == 0;
			report(zero, "%s test %d: no such test, reads as zero", b->kind, n);
			break;
		}
		u8 data = rd8(b, 8);
		u32 off = rd32(b, 4);
		char name[64];
		read_name(b, name, sizeof(name));
		bool sane = count == 0 && has_prefix(name, b->io ? "portio-" : "mmio-");
		for (int i = 0; i < WRITES; i++)
			wr(b, off, data, width);
		count = rd32(b, 12);
		report(sane && (count == 0 || count == WRITES), "%s: %u of %d writes counted", name,
		       count, WRITES);
		if (!contains(name, "wildcard")) {
			/* Reselect (count back to 0), then the wrong value. */
			wr(b, 0, n, 1);
			for (int i = 0; i < WRITES; i++)
				wr(b, off, data ^ 1, width);
			count = rd32(b, 12);
			report(count == 0, "%s: writes of 0x%x not counted (count %u)", name, data ^ 1, count);
		}
	}
	/* Deselect. */
	wr(b, 0, 0xff, 1);
	return n;
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	int slot = -1;
	for (int s = 0; s < 32; s++)
		if (cfg(s, 0) == 0x00051b36u)
			slot = s;
	if (slot < 0)
		report_abort("no pci-testdev (1b36:0005) on bus 0");
	u32 bar0 = cfg(slot, 0x10), bar1 = cfg(slot, 0x14);
	report_info("pci-testdev at 00.%x: bar0 0x%x, bar1 0x%x", slot, bar0, bar1);
	report((bar0 & 1) == 0 && (bar1 & 1) == 1 && (cfg(slot, 4) & 3) == 3,
	       "bar 0 memory, bar 1 i/o, both decoded");
	struct bar mem = {"mem", false, bar0 & ~0xfu};
	struct bar io = {"io", true, bar1 & ~0x3u};
	report(run_bar(&mem) == 3, "3 memory tests");
	report(run_bar(&io) == 3, "3 port tests");
	return report_summary();
}
