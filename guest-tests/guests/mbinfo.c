/*
 * mbinfo: the Multiboot v1 information structure, exactly:
 *  - flags: MEM, CMDLINE, MODS and MMAP set; nothing but those plus
 *    BOOT_DEVICE and BOOT_LOADER_NAME (hopvm: exactly MEM|CMDLINE|MODS|MMAP|
 *    BOOT_LOADER_NAME);
 *  - mem_lower = 639, mem_upper = (min(mem, 3 GiB) - 1 MiB) / KiB;
 *  - cmdline = "<argv[0]> <arguments>": argv[0] names this image, one space,
 *    the arguments verbatim (spaces=[a  b] keeps its two spaces, the last
 *    argument is "end"); the whole line is printed as `cmdline: "..."` for the
 *    manifest to match exactly;
 *  - one module with mod_size=N bytes whose CRC-32 is mod_crc=X, its string
 *    naming the file, page-aligned, in available RAM;
 *  - the memory map: entries of size >= 20 that exactly fill mmap_length,
 *    sorted, non-overlapping, non-empty, known types; page 0 available RAM,
 *    and actually usable;
 *  - the info structure, memory map, command line and module outside the
 *    image and in available RAM; when the loader is hopvm, the info structure
 *    page-aligned right after the image (QEMU puts it at 0x9500).
 * Command line: mem=<size> mod_size=N mod_crc=X (required), fw_reserved=KiB
 * (tolerance for firmware-reserved RAM, added by scripts/qemu-as-hopvm).
 */
#include "lib/lib.h"

#define MB_FLAG_BOOT_DEVICE (1u << 1)
#define MB_FLAG_MODS (1u << 3)
#define MB_FLAG_LOADER_NAME (1u << 9)
#define REQUIRED (MB_FLAG_MEM | MB_FLAG_CMDLINE | MB_FLAG_MODS | MB_FLAG_MMAP)
#define ALLOWED (REQUIRED | MB_FLAG_BOOT_DEVICE | MB_FLAG_LOADER_NAME)

struct mb_module {
	u32 start, end, string, reserved;
};

static u64 image_start, image_end;

static u32 crc32(const u8 *p, u64 n)
{
	u32 c = 0xffffffff;
	while (n--) {
		c ^= *p++;
		for (int k = 0; k < 8; k++)
			c = (c >> 1) ^ (0xedb88320u & -(c & 1));
	}
	return ~c;
}

static bool overlaps(u64 a, u64 alen, u64 b, u64 blen)
{
	return a < b + blen && b < a + alen;
}

/* Whether [addr, addr+len) lies within one available mmap entry. */
static bool in_available(u64 addr, u64 len)
{
	for (int i = 0; i < boot_info.nr_mmap; i++) {
		const struct mmap_entry *e = &boot_info.mmap[i];
		if (e->type == 1 && addr >= e->addr && addr + len <= e->addr + e->len)
			return true;
	}
	return false;
}

static void check_placement(const char *what, u64 addr, u64 len)
{
	report(addr && !overlaps(addr, len, image_start, image_end - image_start) &&
		       in_available(addr, len),
	       "%s [0x%lx, 0x%lx) is outside the image [0x%lx, 0x%lx) and in available RAM", what,
	       addr, addr + len, image_start, image_end);
}

static bool ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);
	return n >= m && memcmp(s + n - m, suffix, m) == 0;
}

static void check_cmdline(const char *cmd)
{
	printf("cmdline: \"%s\"\n", cmd);
	const char *sp = strchr(cmd, ' ');
	report(sp != NULL, "command line has argv[0] and arguments");
	if (!sp)
		return;
	char argv0[512];
	size_t n = (size_t)(sp - cmd);
	if (n >= sizeof(argv0))
		n = sizeof(argv0) - 1;
	memcpy(argv0, cmd, n);
	argv0[n] = 0;
	report(ends_with(argv0, "/mbinfo.elf") || strcmp(argv0, "mbinfo.elf") == 0,
	       "argv[0] \"%s\" names the image", argv0);
	const char *args = sp + 1;
	report(*args && *args != ' ', "exactly one space between argv[0] and the arguments");
	report(strstr(args, "spaces=[a  b]") != NULL, "arguments kept verbatim (\"spaces=[a  b]\")");
	/* The last argument is "end" (scripts/qemu-as-hopvm appends fw_reserved=). */
	const char *end = strstr(args, " end");
	bool tail_ok = end && (end[4] == 0 || strncmp(end + 4, " fw_reserved=", 13) == 0);
	report(tail_ok, "arguments end with \"end\", nothing appended by the loader");
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u64 mem = get_arg_size("mem", MiB, 0);
	u64 mod_size = get_arg_u64("mod_size", ~0ULL);
	u64 mod_crc = get_arg_u64("mod_crc", ~0ULL);
	u64 slack = get_arg_u64("fw_reserved", 0);
	const struct boot_info *bi = &boot_info;

	if (!mem || mod_size == ~0ULL || mod_crc == ~0ULL)
		report_abort("need mem=<size> mod_size=N mod_crc=X on the command line");
	image_start = (u64)__image_start;
	image_end = (u64)__image_end;

	report(mb_magic == 0x2BADB002, "EAX at entry 0x%x is the multiboot magic", mb_magic);
	u64 ip = mb_info_ptr;
	if (mb_magic != 0x2BADB002 || !ip)
		report_abort("no multiboot information");
	const struct mb_info *mbi = phys_ptr(ip);
	u32 flags = mbi->flags;
	const char *loader = (flags & MB_FLAG_LOADER_NAME) && mbi->boot_loader_name
				     ? (const char *)phys_ptr(mbi->boot_loader_name)
				     : "";
	bool hopvm = strcmp(loader, "hopvm") == 0;
	printf("info at 0x%lx, flags 0x%x, boot loader \"%s\", image [0x%lx, 0x%lx)\n", ip, flags,
	       loader, image_start, image_end);

	report((flags & REQUIRED) == REQUIRED, "flags 0x%x have MEM, CMDLINE, MODS and MMAP", flags);
	report((flags & ~ALLOWED) == 0, "flags 0x%x have nothing beyond those, BOOT_DEVICE and "
	       "BOOT_LOADER_NAME", flags);
	if (hopvm)
		report(flags == (REQUIRED | MB_FLAG_LOADER_NAME),
		       "hopvm: flags are exactly MEM|CMDLINE|MODS|MMAP|BOOT_LOADER_NAME (0x%x)", flags);
	if (flags & MB_FLAG_BOOT_DEVICE)
		report_info("boot_device 0x%x", mbi->boot_device);

	/* Memory sizes. */
	u64 low_top = mem < 3 * GiB ? mem : 3 * GiB;
	u64 upper = (low_top - MiB) / KiB;
	report(mbi->mem_lower == 639, "mem_lower = %u KiB (639)", mbi->mem_lower);
	report(mbi->mem_upper == upper ||
		       (slack && mbi->mem_upper <= upper && mbi->mem_upper + slack >= upper),
	       "mem_upper = %u KiB (expected %lu for mem=%lu MiB)", mbi->mem_upper, upper, mem / MiB);

	/* The memory map, walked raw. */
	u64 mp = mbi->mmap_addr, mend = mp + mbi->mmap_length;
	int n = 0, bad_size = 0, bad_type = 0, empty = 0, unsorted = 0, sizes20 = 0;
	u64 prev_end = 0;
	bool page0 = false;
	while (mp + 4 <= mend) {
		u32 size = *(const u32 *)phys_ptr(mp);
		if (size < 20 || mp + 4 + size > mend) {
			bad_size++;
			break;
		}
		u64 a = *(const u64 *)phys_ptr(mp + 4), l = *(const u64 *)phys_ptr(mp + 12);
		u32 t = *(const u32 *)phys_ptr(mp + 20);
		printf("  mmap [0x%016lx, 0x%016lx) type %u (entry size %u)\n", a, a + l, t, size);
		sizes20 += size == 20;
		bad_type += t < 1 || t > 5;
		empty += l == 0;
		unsorted += n > 0 && a < prev_end;
		if (t == 1 && a == 0 && l >= PAGE_SIZE)
			page0 = true;
		prev_end = a + l;
		n++;
		mp += 4 + size;
	}
	report(n > 0 && !bad_size && mp == mend,
	       "memory map: %d entries exactly fill mmap_length %u", n, mbi->mmap_length);
	report(bad_type == 0 && empty == 0, "memory map: known types, no empty entries");
	report(unsorted == 0, "memory map: sorted and non-overlapping");
	if (hopvm)
		report(sizes20 == n, "hopvm: every entry has size 20");
	report(page0, "memory map: page 0 is available RAM");

	/* Page 0 really is usable RAM. */
	volatile u8 *p0 = phys_ptr(0);
	static u8 saved[4096];
	u64 bad = 0;
	for (int i = 0; i < 4096; i++)
		saved[i] = p0[i];
	for (int i = 0; i < 4096; i++)
		p0[i] = (u8)(i * 7 + 3);
	for (int i = 0; i < 4096; i++)
		bad += p0[i] != (u8)(i * 7 + 3);
	for (int i = 0; i < 4096; i++)
		p0[i] = saved[i];
	report(bad == 0, "physical page 0 holds what is written to it (%lu bad bytes)", bad);

	/* Placement. */
	check_placement("info structure", ip, 88);
	check_placement("memory map", mbi->mmap_addr, mbi->mmap_length);
	if (hopvm) {
		report((ip & (PAGE_SIZE - 1)) == 0 && ip >= image_end,
		       "hopvm: info structure 0x%lx page-aligned after the image end 0x%lx", ip,
		       image_end);
	}

	/* Command line. */
	if ((flags & MB_FLAG_CMDLINE) && mbi->cmdline) {
		const char *cmd = phys_ptr(mbi->cmdline);
		check_placement("command line", mbi->cmdline, strlen(cmd) + 1);
		check_cmdline(cmd);
	} else {
		report(false, "command line present");
	}

	/* Module 0. */
	report(mbi->mods_count == 1, "mods_count = %u (1)", mbi->mods_count);
	if (mbi->mods_count >= 1 && mbi->mods_addr) {
		const struct mb_module *m = phys_ptr(mbi->mods_addr);
		u64 len = m->end - m->start;
		const char *name = m->string ? (const char *)phys_ptr(m->string) : "";
		printf("module 0: [0x%x, 0x%x) %lu bytes, string \"%s\"\n", m->start, m->end, len, name);
		check_placement("module list", mbi->mods_addr, 16 * mbi->mods_count);
		check_placement("module 0", m->start, len ? len : 1);
		report((m->start & (PAGE_SIZE - 1)) == 0, "module 0 starts page-aligned (0x%x)", m->start);
		report(len == mod_size, "module 0 is %lu bytes (mod_size=%lu)", len, mod_size);
		u32 c = len == mod_size ? crc32(phys_ptr(m->start), len) : 0;
		report(len == mod_size && c == mod_crc, "module 0 CRC-32 0x%x (mod_crc=0x%lx)", c, mod_crc);
		report(strstr(name, "mbinfo-module") != NULL, "module 0 string names the file");
		report(!overlaps(m->start, len, ip, 88) && !overlaps(m->start, len, mbi->mmap_addr,
								       mbi->mmap_length),
		       "module 0 does not overlap the info structure or the memory map");
	}
	(void)bi;
	return report_summary();
}
