/*
 * exitcode: exits with the code given as code=N (so the VMM exits with
 * status (N << 1) | 1, e.g. code=42 -> 85).
 */
#include "lib/lib.h"

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	if (!get_arg("code"))
		report_abort("missing code=N on the command line");
	u64 code = get_arg_u64("code", 0);
	printf("exiting with code %lu\n", code);
	return (int)code;
}
