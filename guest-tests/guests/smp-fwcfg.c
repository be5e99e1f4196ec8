/*
 * smp-fwcfg: SMP bring-up the way kvm-unit-tests' smp_init() does it: the
 * BSP learns the CPU count from fw_cfg (key 0x05, not the MP table), sends
 * INIT (assert, de-assert) and one STARTUP IPI to "all excluding self" and
 * waits until that many CPUs run.  Checks the count against cpus=N, that no
 * extra CPU turns up afterwards, that the APs' APIC ids are distinct and not
 * the BSP's, and that every AP ran the function handed to it.
 * Command line: cpus=N (required), timeout_ms=T (default 5000).
 */
#include "lib/lib.h"

#define ICR_ALLBUT (3u << 18)
#define ICR_ASSERT (1u << 14)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)

extern char ap_tramp_start[], ap_tramp_end[];

static volatile u32 ran[MAX_CPUS];
static volatile u32 ran_apic_id[MAX_CPUS];

static void ap_work(u32 index)
{
	ran_apic_id[index] = lapic_id();
	__atomic_store_n(&ran[index], 1, __ATOMIC_RELEASE);
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u64 cpus = get_arg_u64("cpus", 0);
	u32 timeout = (u32)get_arg_u64("timeout_ms", 5000);
	u32 bsp = lapic_id();

	if (!cpus)
		report_abort("missing cpus=N on the command line");
	if (!fwcfg_present())
		report_abort("no fw_cfg device (signature is not \"QEMU\")");
	u16 nb = fwcfg_nb_cpus();
	report(nb == cpus, "fw_cfg boot CPU count %u equals cpus=%lu", nb, cpus);
	if (nb < 1 || nb > MAX_CPUS)
		report_abort("fw_cfg CPU count %u out of range 1..%d", nb, MAX_CPUS);

	memcpy((void *)AP_TRAMPOLINE, ap_tramp_start, ap_tramp_end - ap_tramp_start);
	ap_function = ap_work;
	lapic_write(APIC_ESR, 0);
	lapic_send_ipi(0, ICR_ALLBUT | ICR_INIT | ICR_ASSERT);
	lapic_send_ipi(0, ICR_ALLBUT | ICR_INIT);
	lapic_send_ipi(0, ICR_ALLBUT | ICR_STARTUP | (AP_TRAMPOLINE >> 12));

	deadline_start(timeout);
	while (ap_count + 1 < nb && !deadline_passed())
		cpu_relax();
	u32 online = ap_count + 1;
	report(online == nb, "%u CPUs online after INIT/SIPI to all-but-self (fw_cfg says %u)",
	       online, nb);

	/* Every AP that came up has also run ap_work by now (or will shortly). */
	deadline_start(timeout);
	u32 n = ap_count;
	for (u32 i = 0; i < n && i < MAX_CPUS; i++)
		while (!__atomic_load_n(&ran[i], __ATOMIC_ACQUIRE) && !deadline_passed())
			cpu_relax();
	u32 nran = 0;
	for (u32 i = 0; i < n && i < MAX_CPUS; i++)
		nran += ran[i];
	report(nran == n, "every AP ran its function (%u of %u)", nran, n);

	/* No latecomers: give stray CPUs 100 ms. */
	deadline_start(100);
	while (!deadline_passed())
		cpu_relax();
	report(ap_count + 1 == nb, "no further CPU arrived (%u APs)", ap_count);

	bool distinct = true;
	n = ap_count;
	printf("BSP apic id %u, APs:", bsp);
	for (u32 i = 0; i < n && i < MAX_CPUS; i++) {
		printf(" %u", ap_apic_ids[i]);
		if (ap_apic_ids[i] == bsp || ap_apic_ids[i] != ran_apic_id[i])
			distinct = false;
		for (u32 j = 0; j < i; j++)
			if (ap_apic_ids[j] == ap_apic_ids[i])
				distinct = false;
	}
	printf("\n");
	report(distinct, "AP APIC ids are distinct and differ from the BSP's");
	u32 esr;
	lapic_write(APIC_ESR, 0);
	esr = lapic_read(APIC_ESR);
	report(esr == 0, "LAPIC error status 0x%x after the broadcast IPIs", esr);
	report_info("%u CPUs running", ap_count + 1);
	return report_summary();
}
