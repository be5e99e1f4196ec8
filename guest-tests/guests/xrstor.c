/*
 * xrstor: executes XRSTOR, which the test machine's instruction emulator
 * cannot execute.  Prints "xrstor at 0x<rip>" first; the expected outcome on
 * the emulator is a VMM emulation failure (status 3) reported at that rip.
 * If XRSTOR does execute (real hardware), prints "xrstor executed" and exits
 * with code 21 (status 43).  Without CPUID XSAVE support: SKIP (code 77).
 */
#include "lib/lib.h"

#define XRSTOR_EXECUTED 21

void do_xrstor(void *area);
extern char xrstor_probe[];

/* XRSTOR (%rdi) with RFBM = x87 only; encoded 0f ae 2f. */
asm(".text\n"
    ".globl do_xrstor\n"
    "do_xrstor:\n"
    "	movl $1, %eax\n"
    "	xorl %edx, %edx\n"
    ".globl xrstor_probe\n"
    "xrstor_probe:\n"
    "	xrstor (%rdi)\n"
    "	ret\n");

static u8 xsave_area[4096] __attribute__((aligned(64)));

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	struct cpuid_result r = cpuid(1, 0);
	if (!(r.c & (1u << 26)))
		report_skip("CPUID.1:ECX.XSAVE is clear; cannot test XRSTOR");
	write_cr4(read_cr4() | (1u << 18)); /* OSXSAVE; XCR0 stays at its reset value 1 */
	printf("CR4.OSXSAVE enabled (cr4=0x%lx)\n", read_cr4());
	printf("xrstor at 0x%lx\n", (u64)xrstor_probe);
	do_xrstor(xsave_area);
	printf("xrstor executed\n");
	return XRSTOR_EXECUTED;
}
