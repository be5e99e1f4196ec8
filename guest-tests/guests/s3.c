/*
 * s3: suspend to RAM and wake on the RTC alarm, the way kvm-unit-tests' s3
 * test does it: put a real-mode resume routine at 0x1000, point the FACS
 * firmware waking vector at it, enable PM1_EN.RTC_EN and an RTC alarm that
 * fires every second, then write SLP_TYP=S3|SLP_EN to PM1a control.  The
 * firmware (hopvm) must stop the machine and, on the alarm, enter the waking
 * vector in real mode; the resume routine exits through isa-debug-exit with
 * the word at physical address 0x500 (free conventional memory, which a BIOS
 * resume path leaves alone, unlike the IVT at 0 that kvm-unit-tests uses),
 * which is 0 only if nothing ran after the sleep request.
 * Command line: none.
 */
#include "lib/lib.h"

extern char resume_start[], resume_end[];

/* The word the resume routine exits with. */
#define MARK 0x500

/* The resume routine: real mode, entered at the waking vector. */
asm(".pushsection .text\n"
    ".global resume_start\n"
    ".global resume_end\n"
    ".code16\n"
    "resume_start:\n"
    "xor %ax, %ax\n"          /* the firmware's DS is unspecified */
    "mov %ax, %ds\n"
    "mov 0x500, %eax\n"
    "mov $0xf4, %dx\n"
    "out %eax, %dx\n"
    "1: hlt\n"
    "jmp 1b\n"
    "resume_end:\n"
    ".code64\n"
    ".popsection\n");

static const u8 *find_table(const char *sig)
{
	for (u64 p = 0xe0000; p < 0x100000; p += 16) {
		const char *c = phys_ptr(p);
		if (memcmp(c, "RSD PTR ", 8))
			continue;
		u32 rsdt = *(const u32 *)(c + 16);
		u32 len = *(const u32 *)phys_ptr(rsdt + 4);
		for (u32 off = 36; off + 4 <= len; off += 4) {
			u32 t = *(const u32 *)phys_ptr(rsdt + off);
			if (!memcmp(phys_ptr(t), sig, 4))
				return phys_ptr(t);
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	/* Under SeaBIOS (QEMU) the resume goes through the BIOS's own S3 path,
	 * which changes low memory the check relies on: that is firmware behaviour,
	 * not the VMM's, so only a firmware-less loader (hopvm) is judged here. */
	const struct mb_info *mbi = phys_ptr(mb_info_ptr);
	const char *loader = (mbi->flags & (1u << 9)) && mbi->boot_loader_name
				     ? (const char *)phys_ptr(mbi->boot_loader_name)
				     : "";
	if (strcmp(loader, "hopvm"))
		report_skip("s3 resume is checked only without firmware (loader \"%s\")", loader);

	const u8 *fadt = find_table("FACP");
	if (!fadt)
		report_abort("no FADT");
	u32 facs = *(const u32 *)(fadt + 36);
	u16 pm1a_evt = *(const u32 *)(fadt + 56);
	u16 pm1a_cnt = *(const u32 *)(fadt + 64);
	report(!memcmp(phys_ptr(facs), "FACS", 4), "FACS at 0x%x", facs);

	u8 *vec = phys_ptr(0x1000);
	for (char *c = resume_start; c < resume_end; c++)
		*vec++ = *c;
	*(volatile u32 *)phys_ptr(facs + 12) = 0x1000;

	outw(pm1a_evt + 2, 0x400);              /* PM1_EN.RTC_EN */
	cmos_read(0x0c);                         /* clear status C */
	cmos_write(0x01, 0xc0);                  /* alarm: any second */
	cmos_write(0x03, 0xc0);
	cmos_write(0x05, 0xc0);
	cmos_write(0x0b, cmos_read(0x0b) | 0x20); /* AIE */

	printf("suspending to RAM through PM1a control 0x%x\n", pm1a_cnt);
	*(volatile u32 *)phys_ptr(MARK) = 0;
	outw(pm1a_cnt, 0x2400);                  /* SLP_TYP = 1 (S3) | SLP_EN */
	*(volatile u32 *)phys_ptr(MARK) = 1;
	printf("FAIL: still running after the sleep request\n");
	return 1;
}
