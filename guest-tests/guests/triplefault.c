/*
 * triplefault: loads a zero-limit IDT and divides by zero: #DE cannot be
 * delivered -> #GP -> #DF -> triple fault -> VM shutdown.  With
 * --no-reboot the VMM exits with status 0.  Exit code 1 if still alive.
 */
#include "lib/lib.h"

int main(int argc, char **argv)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr = { 0, 0 };

	(void)argc;
	(void)argv;
	printf("about to triple fault\n");
	cli();
	asm volatile("lidt %0" : : "m"(idtr));
	asm volatile("xorl %%ecx, %%ecx\n\tdivl %%ecx" : : : "eax", "ecx", "edx", "memory");
	load_idt();
	printf("FAIL: still running after the triple fault\n");
	return 1;
}
