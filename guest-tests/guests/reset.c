/*
 * reset: reboots the machine twice and counts the boots in CMOS RAM, which a
 * PC keeps across a reset (QEMU does; so must hopvm).  Byte 0x4e is used: no
 * firmware or VMM touches it (QEMU's own 0x38 holds SeaBIOS's boot order).
 *   boot 1 (marker not 0xa1/0xa2): writes 0xa1, resets through the PIIX
 *          reset control register (port 0xcf9 <- 0x06);
 *   boot 2 (marker 0xa1): writes 0xa2, resets through System Control Port A
 *          (port 0x92, bit 0 from 0 to 1);
 *   boot 3 (marker 0xa2): clears the marker and exits 0.
 * A reset that does not happen within 3 s is a failure (exit 1).  Must run
 * without --no-reboot (manifest: no_reboot = false).  Command line: none.
 */
#include "lib/lib.h"

#define MARK_REG 0x4e
#define MARK_1 0xa1
#define MARK_2 0xa2

static int wait_for_reset(const char *how)
{
	deadline_start(3000);
	while (!deadline_passed())
		cpu_relax();
	report(false, "the machine reset through %s within 3 s", how);
	return report_summary();
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u8 mark = cmos_read(MARK_REG);

	switch (mark) {
	case MARK_2:
		printf("boot 3 (CMOS 0x%x = 0x%x)\n", MARK_REG, mark);
		report(true, "boot 3: the CMOS marker survived the reset through port 0x92");
		cmos_write(MARK_REG, 0);
		report(cmos_read(MARK_REG) == 0, "boot 3: marker cleared");
		return report_summary();
	case MARK_1: {
		printf("boot 2 (CMOS 0x%x = 0x%x)\n", MARK_REG, mark);
		report(true, "boot 2: the CMOS marker survived the reset through port 0xcf9");
		cmos_write(MARK_REG, MARK_2);
		u8 p92 = inb(0x92);
		report_info("boot 2: port 0x92 reads 0x%x", p92);
		report((p92 & 1) == 0, "boot 2: port 0x92 fast-reset bit clear after the reset");
		printf("boot 2: resetting through port 0x92\n");
		outb(0x92, p92 & ~1);
		outb(0x92, p92 | 1);
		return wait_for_reset("port 0x92");
	}
	default:
		printf("boot 1 (CMOS 0x%x = 0x%x)\n", MARK_REG, mark);
		cmos_write(MARK_REG, MARK_1);
		report(cmos_read(MARK_REG) == MARK_1, "boot 1: CMOS byte 0x%x holds the marker 0x%x",
		       MARK_REG, MARK_1);
		printf("boot 1: resetting through port 0xcf9\n");
		outb(0xcf9, 0x06);
		return wait_for_reset("port 0xcf9");
	}
}
