/*
 * pci-fuzz: a guest that writes nonsense everywhere on the PCI bus and must
 * come out alive.  For every function on bus 0: random values of every width
 * at every configuration offset (BARs moved anywhere, sized, decode switched
 * on and off, MSI-X enabled with garbage), and random MMIO writes of every
 * width over the first 32 KiB of each memory BAR as it was placed by
 * firmware; configuration accesses to absent functions and other buses too.
 * Then every function's header is put back as firmware left it, and the
 * first virtio device must still reset (status 0) and accept its features.
 * The VMM must neither panic nor stop the vCPU, and nothing may reach RAM:
 * a RAM canary must be intact.
 * Command line: seed=N, rounds=N (default 3).
 */
#include "lib/lib.h"
#include "lib/virtio.h"

static u64 rng_state;
static u64 rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static u8 canary[64 * 1024] __attribute__((aligned(4096)));

static void cfg_write_width(u8 bus, u8 slot, u8 fn, u8 reg, u32 v, int width)
{
	outl(0xcf8, 0x80000000u | (u32)bus << 16 | (u32)slot << 11 | (u32)fn << 8 | (reg & 0xfc));
	u16 port = 0xcfc + (reg & 3);
	if (width == 1)
		outb(port, (u8)v);
	else if (width == 2)
		outw(port & ~1, (u16)v);
	else
		outl(0xcfc, v);
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	rng_state = get_arg_u64("seed", 1) * 0x9e3779b97f4a7c15ull | 1;
	u64 rounds = get_arg_u64("rounds", 3);
	u32 saved[32][64];
	u64 bars[32][6];
	bool present[32];
	int n = 0;

	for (u64 i = 0; i < sizeof(canary); i++)
		canary[i] = (u8)(i * 31 + 7);
	for (int s = 0; s < 32; s++) {
		present[s] = pci_cfg_read(s, 0) != 0xffffffff;
		if (!present[s])
			continue;
		n++;
		for (int r = 0; r < 64; r++)
			saved[s][r] = pci_cfg_read(s, r * 4);
		for (int b = 0; b < 6; b++)
			bars[s][b] = (saved[s][4 + b] & 1) ? 0 : (saved[s][4 + b] & ~0xfu);
	}
	report(n >= 2, "%d functions on bus 0", n);
	int vslot = pci_find_virtio(0x1042, 0x1001);

	for (u64 round = 0; round < rounds; round++) {
		for (int s = 0; s < 32; s++) {
			if (!present[s])
				continue;
			for (int k = 0; k < 400; k++) {
				u8 reg = rnd() & 0xff;
				int width = 1 << (rnd() % 3);
				cfg_write_width(0, s, 0, reg & ~(width - 1), (u32)rnd(), width);
				if ((rnd() & 7) == 0)
					pci_cfg_read(s, rnd() & 0xfc);
			}
			/* MMIO where the BARs were: decode may be on or off now. */
			for (int b = 0; b < 6; b++) {
				u64 base = bars[s][b];
				if (!base || base >= 4 * GiB || base < 0xe0000000ull)
					continue;
				for (int k = 0; k < 300; k++) {
					u64 a = base + (rnd() % 0x8000);
					int width = 1 << (rnd() % 3);
					a &= ~(u64)(width - 1);
					if (width == 1)
						*(volatile u8 *)a = (u8)rnd();
					else if (width == 2)
						*(volatile u16 *)a = (u16)rnd();
					else
						*(volatile u32 *)a = (u32)rnd();
					if ((rnd() & 3) == 0)
						(void)*(volatile u32 *)(a & ~3ull);
				}
			}
		}
		/* Absent functions and other buses. */
		for (int k = 0; k < 200; k++)
			cfg_write_width(1 + (rnd() & 0xfe), rnd() & 31, rnd() & 7, rnd() & 0xfc, (u32)rnd(),
					4);
		printf("round %lu done\n", round + 1);
	}
	report(true, "%lu rounds of random configuration and MMIO writes survived", rounds);

	/* Firmware's header back (the command register last, so decode comes on at the old BARs). */
	for (int s = 0; s < 32; s++) {
		if (!present[s])
			continue;
		for (int r = 4; r < 64; r++)
			if (r != 1)
				pci_cfg_write(s, r * 4, saved[s][r]);
		pci_cfg_write(s, 0x04, saved[s][1] & 0xffff);
	}
	bool same = true;
	for (int s = 0; s < 32; s++)
		if (present[s] && pci_cfg_read(s, 0) != saved[s][0])
			same = false;
	report(same, "IDs unchanged");
	u64 bad = 0;
	for (u64 i = 0; i < sizeof(canary); i++)
		bad += canary[i] != (u8)(i * 31 + 7);
	report(bad == 0, "RAM canary intact (%lu bytes changed)", bad);
	if (vslot >= 0) {
		struct virtio_pci vp;
		if (virtio_pci_probe(vslot, &vp)) {
			w8(vp.common + C_STATUS, 0);
			report(r8(vp.common + C_STATUS) == 0, "virtio device resets after the storm");
			report(virtio_negotiate(&vp, 0) >= 0, "and negotiates its features again");
			w8(vp.common + C_STATUS, 0);
		}
	}
	return report_summary();
}
