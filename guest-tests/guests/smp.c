/*
 * smp: finds the CPUs in the MP table, starts every AP with INIT/SIPI/SIPI
 * and checks that each one arrives (records its APIC id and increments a
 * counter).  Command line: cpus=N (expected CPU count; required),
 * timeout_ms=T (per-AP arrival timeout, default 3000), dump (hex dump of the
 * MP configuration table).
 */
#include "lib/lib.h"

static struct mp_info mp;

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u64 expected = get_arg_u64("cpus", 0);
	u32 timeout = (u32)get_arg_u64("timeout_ms", 3000);
	u32 bsp = lapic_id();

	if (!expected)
		report_abort("missing cpus=N on the command line");
	if (!mp_find(&mp))
		report_abort("no usable MP table");
	printf("MP table: floating pointer at 0x%lx, config table at 0x%lx, %d cpus, lapic 0x%x\n",
	       mp.fp_addr, mp.table_addr, mp.ncpus, mp.lapic_addr);
	if (get_arg("dump")) {
		const u8 *t = (const u8 *)mp.table_addr;
		u16 len = *(const u16 *)(t + 4);
		for (u16 i = 0; i < len; i++)
			printf("%02x%s", t[i], (i % 16 == 15) ? "\n" : " ");
		printf("\n");
	}
	int nbsp = 0;
	for (int i = 0; i < mp.ncpus; i++) {
		printf("  cpu %d: apic id %u%s\n", i, mp.cpus[i].apic_id, mp.cpus[i].bsp ? " (BSP)" : "");
		if (mp.cpus[i].bsp) {
			nbsp++;
			report(mp.cpus[i].apic_id == bsp, "MP table BSP apic id %u is the running CPU (%u)",
			       mp.cpus[i].apic_id, bsp);
		}
	}
	report(nbsp == 1, "MP table lists exactly one BSP (%d)", nbsp);
	report((u64)mp.ncpus == expected, "MP table CPU count %d equals cpus=%lu", mp.ncpus, expected);

	int started = 0;
	for (int i = 0; i < mp.ncpus; i++) {
		u8 id = mp.cpus[i].apic_id;
		if (id == bsp)
			continue;
		printf("starting AP apic id %u\n", id);
		bool ok = smp_start_ap(id, timeout);
		report(ok, "AP apic id %u arrived", id);
		if (ok)
			started++;
	}

	u32 n = ap_count;
	printf("%u APs arrived:", n);
	for (u32 i = 0; i < n && i < MAX_CPUS; i++)
		printf(" %u", ap_apic_ids[i]);
	printf("\n");
	report(n + 1 == expected, "%u CPUs running (BSP + %u APs), expected %lu", n + 1, n, expected);

	/* Every MP-table AP arrived exactly once, and nothing else did. */
	bool ids_ok = true;
	for (int i = 0; i < mp.ncpus; i++) {
		int seen = 0;
		for (u32 j = 0; j < n && j < MAX_CPUS; j++)
			if (ap_apic_ids[j] == mp.cpus[i].apic_id)
				seen++;
		if (seen != (mp.cpus[i].apic_id == bsp ? 0 : 1)) {
			printf("apic id %u arrived %d times\n", mp.cpus[i].apic_id, seen);
			ids_ok = false;
		}
	}
	report(ids_ok, "arrived APIC ids match the MP table");
	return report_summary();
}
