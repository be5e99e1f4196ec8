/*
 * pcicfg: programs the chipset's configuration registers and moves an I/O
 * BAR, then keeps reading them back -- meant for live migration (the
 * destination must read what the source's guest wrote) and for comparing
 * configuration-space reads with QEMU's.
 *  - the PIRQ route control registers (pc: PIIX3 01.0 at 0x60; q35: ICH9 LPC
 *    1f.0 at 0x60 and 0x68), one route disabled;
 *  - four PAM registers of the host bridge (pc: 0x5a; q35: MCH 0x91) and its
 *    command register;
 *  - pci-testdev's I/O BAR (BAR 1), when there is one: moved to 0xd000, then
 *    0x1000, read at each place (the name of its selected test starts
 *    "portio-") and not at the old one, switched off and on in the command
 *    register, and left at 0x1000.
 * It prints "pcicfg: wrote ..." with the values read back, then every RTC
 * second "pass N ok <values>" after checking that every register still
 * holds what it wrote and that the BAR still decodes at 0x1000 (or
 * "MISMATCH ..." and exit status 1).  Command line: passes=N (stop after N
 * passes, as report lines; default: never stop).
 */
#include "lib/lib.h"
#include "lib/virtio.h"

#define NEW_BAR_1 0xd000
#define NEW_BAR_2 0x1000

struct chipset {
	bool q35;
	u8 isa; /* the ISA / LPC bridge's slot */
	u8 pam; /* the first PAM register written */
};

struct values {
	u32 pirq;   /* PIRQA-D */
	u32 pirq_e; /* PIRQE-H (q35) */
	u32 pam;    /* four PAM registers */
	u16 host_cmd;
	u32 bar;    /* pci-testdev's BAR 1 */
	u8 name;    /* the first byte of the selected test's name through the BAR */
};

static u8 cfg8(u8 slot, u8 reg)
{
	return pci_cfg_read(slot, reg) >> (8 * (reg & 3));
}

static void cfg_write8(u8 slot, u8 reg, u8 v)
{
	outl(0xcf8, 0x80000000u | (u32)slot << 11 | (reg & 0xfc));
	outb(0xcfc + (reg & 3), v);
}

static void cfg_write16(u8 slot, u8 reg, u16 v)
{
	outl(0xcf8, 0x80000000u | (u32)slot << 11 | (reg & 0xfc));
	outw(0xcfc + (reg & 2), v);
}

static u32 pam_read(const struct chipset *c)
{
	u32 v = 0;
	for (int i = 0; i < 4; i++)
		v |= (u32)cfg8(0, c->pam + i) << (8 * i);
	return v;
}

static void read_values(const struct chipset *c, int testdev, struct values *v)
{
	v->pirq = pci_cfg_read(c->isa, 0x60);
	v->pirq_e = c->q35 ? pci_cfg_read(c->isa, 0x68) : 0;
	v->pam = pam_read(c);
	v->host_cmd = pci_cfg_read(0, 0x04) & 0xffff;
	v->bar = testdev >= 0 ? pci_cfg_read(testdev, 0x14) : 0;
	v->name = testdev >= 0 ? inb(NEW_BAR_2 + 16) : 0;
}

static bool same(const struct values *a, const struct values *b)
{
	return a->pirq == b->pirq && a->pirq_e == b->pirq_e && a->pam == b->pam &&
	       a->host_cmd == b->host_cmd && a->bar == b->bar && a->name == b->name;
}

static void print_values(const struct values *v)
{
	printf("pirq=%08x pirq_e=%08x pam=%08x host_cmd=%04x bar1=%08x name=%c\n", v->pirq,
	       v->pirq_e, v->pam, v->host_cmd, v->bar, v->name ? v->name : '-');
}

/* Moves pci-testdev's I/O BAR to `port` and checks it answers there. */
static void move_bar(int slot, u32 from, u32 port)
{
	pci_cfg_write(slot, 0x14, port);
	u32 got = pci_cfg_read(slot, 0x14);
	outb(port, 0); /* select test 0 */
	u8 p = inb(port + 16), o = inb(port + 17);
	report(got == (port | 1) && p == 'p' && o == 'o', "i/o bar at 0x%x: bar reads 0x%x, name \"%c%c...\"",
	       port, got, p, o);
	u8 old = inb(from + 16);
	report(old == 0xff, "nothing at the old place 0x%x (reads 0x%x)", from, old);
}

static u8 rtc_seconds(void)
{
	return cmos_read(0x00);
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u64 passes = get_arg_u64("passes", 0);
	struct chipset c;
	u32 host = pci_cfg_read(0, 0);

	if (host == 0x29c08086) {
		c = (struct chipset){.q35 = true, .isa = 0x1f, .pam = 0x91};
	} else if (host == 0x12378086) {
		c = (struct chipset){.q35 = false, .isa = 1, .pam = 0x5a};
	} else {
		report_abort("unknown host bridge %08x", host);
	}
	printf("pcicfg: %s chipset, isa bridge %02x.0 (%08x)\n", c.q35 ? "q35" : "pc", c.isa,
	       pci_cfg_read(c.isa, 0));
	int testdev = -1;
	for (int s = 0; s < 32; s++)
		if (pci_cfg_read(s, 0) == 0x00051b36)
			testdev = s;

	/* What the guest writes. */
	struct values want = {0};
	want.pirq = 0x0a80050b;
	pci_cfg_write(c.isa, 0x60, want.pirq);
	if (c.q35) {
		want.pirq_e = 0x800e0a05;
		pci_cfg_write(c.isa, 0x68, want.pirq_e);
	}
	static const u8 pam[4] = {0x33, 0x33, 0x31, 0x13};
	for (int i = 0; i < 4; i++)
		cfg_write8(0, c.pam + i, pam[i]);
	want.pam = 0x13313333;
	want.host_cmd = 0x0006;
	cfg_write16(0, 0x04, want.host_cmd);

	if (testdev >= 0) {
		u32 boot = pci_cfg_read(testdev, 0x14) & ~3u;
		u16 cmd = pci_cfg_read(testdev, 0x04) & 0xffff;
		outb(boot, 0);
		report(inb(boot + 16) == 'p', "pci-testdev %02x.0: i/o bar at 0x%x from boot", testdev, boot);
		move_bar(testdev, boot, NEW_BAR_1);
		move_bar(testdev, NEW_BAR_1, NEW_BAR_2);
		cfg_write16(testdev, 0x04, cmd & ~1);
		u8 off = inb(NEW_BAR_2 + 16);
		cfg_write16(testdev, 0x04, cmd | 1);
		u8 on = inb(NEW_BAR_2 + 16);
		report(off == 0xff && on == 'p', "i/o decode off reads 0x%x, on again '%c'", off, on);
		want.bar = NEW_BAR_2 | 1;
		want.name = 'p';
	}
	struct values got;
	read_values(&c, testdev, &got);
	printf("pcicfg: wrote ");
	print_values(&got);
	report(same(&got, &want), "every register reads back what was written");

	u8 last = rtc_seconds();
	for (u64 pass = 1; !passes || pass <= passes; pass++) {
		while (rtc_seconds() == last)
			cpu_relax();
		last = rtc_seconds();
		read_values(&c, testdev, &got);
		bool ok = same(&got, &want);
		printf("pass %lu %s ", pass, ok ? "ok" : "MISMATCH");
		print_values(&got);
		if (!ok)
			exit(1);
	}
	report(true, "%lu passes read the same values back", passes);
	return report_summary();
}
