/*
 * fwcfg: QEMU's fw_cfg legacy port interface (selector 0x510, data 0x511),
 * as kvm-unit-tests' lib/x86/fwcfg.c uses it: signature "QEMU", interface
 * id (bit 0, traditional interface), RAM size (key 0x03) equal to mem=,
 * boot CPUs (key 0x05) equal to cpus=, max CPUs (key 0x0f) >= cpus,
 * unknown and out-of-range keys read 0, reads past an item's end read 0,
 * re-selecting a key rewinds it.  Key 0x11 (kvm-unit-tests' FW_CFG_MAX_RAM,
 * QEMU's KERNEL_DATA) and the file directory are only printed.
 * Command line: mem=<size> (bare number = MiB) and cpus=N, both required.
 */
#include "lib/lib.h"

static bool all_zero(const u8 *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (b[i])
			return false;
	return true;
}

static u32 be32(const u8 *b)
{
	return ((u32)b[0] << 24) | ((u32)b[1] << 16) | ((u32)b[2] << 8) | b[3];
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u64 mem = get_arg_size("mem", MiB, 0);
	u64 cpus = get_arg_u64("cpus", 0);
	u8 buf[16];

	if (!mem || !cpus)
		report_abort("need mem=<size> and cpus=N on the command line");

	fwcfg_read(FW_CFG_SIGNATURE, buf, 4);
	report(memcmp(buf, "QEMU", 4) == 0, "signature (key 0x00) is \"QEMU\" (read %02x %02x %02x %02x)",
	       buf[0], buf[1], buf[2], buf[3]);
	if (memcmp(buf, "QEMU", 4) != 0)
		report_abort("no fw_cfg device at 0x510");

	/* Reading past the end of an item returns zeros. */
	fwcfg_read(FW_CFG_SIGNATURE, buf, 8);
	report(memcmp(buf, "QEMU", 4) == 0 && all_zero(buf + 4, 4),
	       "reading past the signature's end reads 0 (%02x %02x %02x %02x)", buf[4], buf[5], buf[6],
	       buf[7]);

	/* Selecting a key rewinds: two bytes, re-select, the whole item again. */
	fwcfg_read(FW_CFG_SIGNATURE, buf, 2);
	fwcfg_read(FW_CFG_SIGNATURE, buf, 4);
	report(memcmp(buf, "QEMU", 4) == 0, "re-selecting a key rewinds to its first byte");

	u32 id = (u32)fwcfg_read_le(FW_CFG_ID, 4);
	report(id & 1, "interface id (key 0x01) 0x%x has the traditional interface bit", id);
	report((id & ~3u) == 0, "interface id 0x%x has no unknown feature bits", id);

	u64 ram = fwcfg_read_le(FW_CFG_RAM_SIZE, 8);
	report(ram == mem, "RAM size (key 0x03) 0x%lx equals mem= 0x%lx (%lu MiB)", ram, mem,
	       mem / MiB);

	u16 nb = fwcfg_nb_cpus();
	report(nb == cpus, "boot CPUs (key 0x05) %u equals cpus=%lu", nb, cpus);
	u16 max = (u16)fwcfg_read_le(FW_CFG_MAX_CPUS, 2);
	report(max >= nb && max >= cpus, "max CPUs (key 0x0f) %u >= boot CPUs %u", max, nb);

	/* Keys that name no item read as zeros (QEMU defines nothing at 0x1a-0x1f). */
	static const u16 unknown[] = { 0x1a, 0x1f, 0x3fff, 0x7fff };
	for (size_t i = 0; i < ARRAY_SIZE(unknown); i++) {
		memset(buf, 0xa5, sizeof(buf));
		fwcfg_read(unknown[i], buf, sizeof(buf));
		report(all_zero(buf, sizeof(buf)), "unknown key 0x%x reads 16 zero bytes", unknown[i]);
	}
	/* A known key still works after an unknown one was selected. */
	report(fwcfg_read_le(FW_CFG_RAM_SIZE, 8) == ram, "RAM size reads the same after unknown keys");

	u64 max_ram = fwcfg_read_le(FW_CFG_MAX_RAM, 8);
	report_info("key 0x11 (kvm-unit-tests' MAX_RAM, QEMU's KERNEL_DATA) reads 0x%lx", max_ram);

	/* The directory: a big-endian u32 count, then 64-byte entries. */
	fwcfg_read(FW_CFG_FILE_DIR, buf, 4);
	u32 nfiles = be32(buf);
	report_info("file directory (key 0x19): %u files", nfiles);
	for (u32 i = 0; i < nfiles && i < 32; i++) {
		u8 e[64];
		for (u32 j = 0; j < 64; j++)
			e[j] = inb(FW_CFG_PORT_DATA);
		e[63] = 0;
		report_info("  file key 0x%02x size %u \"%s\"", ((u32)e[4] << 8) | e[5], be32(e),
			    (const char *)e + 8);
	}
	return report_summary();
}
