/*
 * idle: prints "idle" and halts with interrupts enabled, forever — an idle guest for
 * migration benchmarks and demos (nothing but timer interrupts ever wakes it).
 * Command line: none.
 */
#include "lib/lib.h"

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	printf("idle\n");
	for (;;)
		asm volatile("sti; hlt");
	return 0;
}
