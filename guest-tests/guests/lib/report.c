/* Exit via isa-debug-exit and kvm-unit-tests style PASS/FAIL reporting. */
#include "lib.h"

#define DEBUG_EXIT_PORT 0xf4

static int tests, failures, skipped;

void exit(int code)
{
	printf("EXIT: code=%d\n", code);
	/* The VMM exits with status (code << 1) | 1. */
	outl(DEBUG_EXIT_PORT, (u32)code);
	/* No debug-exit device: stop here. */
	for (;;)
		asm volatile("cli; hlt");
}

static void vreport(const char *prefix, const char *fmt, va_list ap)
{
	char buf[512];
	vsnprintf(buf, sizeof(buf), fmt, ap);
	printf("%s: %s\n", prefix, buf);
}

void report(bool pass, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	tests++;
	if (!pass)
		failures++;
	vreport(pass ? "PASS" : "FAIL", fmt, ap);
	va_end(ap);
}

void report_info(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport("INFO", fmt, ap);
	va_end(ap);
}

void report_skipped(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	skipped++;
	vreport("SKIP", fmt, ap);
	va_end(ap);
}

void report_skip(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport("SKIP", fmt, ap);
	va_end(ap);
	exit(EXIT_SKIP);
}

void report_abort(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vreport("ABORT", fmt, ap);
	va_end(ap);
	exit(EXIT_FAIL);
}

int report_failures(void)
{
	return failures;
}

int report_summary(void)
{
	if (skipped)
		printf("SUMMARY: %d tests, %d failures, %d skipped\n", tests, failures, skipped);
	else
		printf("SUMMARY: %d tests, %d failures\n", tests, failures);
	return failures ? EXIT_FAIL : EXIT_PASS;
}
