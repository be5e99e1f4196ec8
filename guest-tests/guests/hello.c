/*
 * hello: prints a greeting and its command line arguments, exits 0.
 * Command line: anything.
 */
#include "lib/lib.h"

int main(int argc, char **argv)
{
	printf("Hello from a hopvm test guest\n");
	printf("command line: \"%s\"\n", boot_info.cmdline);
	printf("argc=%d\n", argc);
	for (int i = 0; i < argc; i++)
		printf("argv[%d]=%s\n", i, argv[i]);
	return 0;
}
