/* C start-up: multiboot information, command line, high memory mapping. */
#include "lib.h"

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002

extern u64 pdpt[512];

struct boot_info boot_info;
int g_argc;
char *g_argv[64];
static char argbuf[4096];

static void copy_boot_info(void)
{
	struct boot_info *bi = &boot_info;

	bi->magic = mb_magic;
	if (mb_magic != MULTIBOOT_BOOTLOADER_MAGIC) {
		printf("WARNING: entry EAX=0x%x, not the multiboot magic 0x%x\n", mb_magic,
		       MULTIBOOT_BOOTLOADER_MAGIC);
		return;
	}
	const struct mb_info *mbi = (const struct mb_info *)(u64)mb_info_ptr;
	bi->flags = mbi->flags;
	if (mbi->flags & MB_FLAG_MEM) {
		bi->mem_lower = mbi->mem_lower;
		bi->mem_upper = mbi->mem_upper;
	}
	if ((mbi->flags & MB_FLAG_CMDLINE) && mbi->cmdline) {
		const char *s = (const char *)(u64)mbi->cmdline;
		size_t i;
		for (i = 0; i < sizeof(bi->cmdline) - 1 && s[i]; i++)
			bi->cmdline[i] = s[i];
		bi->cmdline[i] = '\0';
	}
	if (mbi->flags & MB_FLAG_MMAP) {
		u64 p = mbi->mmap_addr, end = p + mbi->mmap_length;
		while (p + 4 <= end) {
			u32 size = *(const u32 *)p;
			if (size < 20) {
				bi->mmap_bad_size = true;
				break;
			}
			if (bi->nr_mmap == MAX_MMAP) {
				bi->mmap_truncated = true;
				break;
			}
			struct mmap_entry *e = &bi->mmap[bi->nr_mmap++];
			e->addr = *(const u64 *)(p + 4);
			e->len = *(const u64 *)(p + 12);
			e->type = *(const u32 *)(p + 20);
			p += size + 4;
		}
	}
}

static void split_cmdline(void)
{
	char *s = argbuf;

	memcpy(argbuf, boot_info.cmdline, strlen(boot_info.cmdline) + 1);
	while (*s && g_argc < (int)ARRAY_SIZE(g_argv) - 1) {
		while (*s == ' ' || *s == '\t')
			*s++ = '\0';
		if (!*s)
			break;
		g_argv[g_argc++] = s;
		while (*s && *s != ' ' && *s != '\t')
			s++;
	}
	while (*s == ' ' || *s == '\t')
		*s++ = '\0';
	g_argv[g_argc] = NULL;
}

const char *get_arg(const char *key)
{
	size_t n = strlen(key);

	for (int i = 1; i < g_argc; i++) {
		if (strncmp(g_argv[i], key, n))
			continue;
		if (g_argv[i][n] == '=')
			return g_argv[i] + n + 1;
		if (g_argv[i][n] == '\0')
			return "";
	}
	return NULL;
}

u64 get_arg_u64(const char *key, u64 def)
{
	const char *v = get_arg(key);
	u64 n;

	if (!v)
		return def;
	if (!parse_u64(v, &n))
		report_abort("bad number in command line argument %s=%s", key, v);
	return n;
}

u64 get_arg_size(const char *key, u64 default_unit, u64 def)
{
	const char *v = get_arg(key);
	u64 n;

	if (!v)
		return def;
	if (!parse_size(v, default_unit, &n))
		report_abort("bad size in command line argument %s=%s", key, v);
	return n;
}

u64 mmap_ram_end(void)
{
	u64 end = 0;
	for (int i = 0; i < boot_info.nr_mmap; i++) {
		const struct mmap_entry *e = &boot_info.mmap[i];
		if (e->type == 1 && e->addr + e->len > end)
			end = e->addr + e->len;
	}
	return end;
}

/* Page directories for memory above 4 GiB: up to 32 GiB more (fully
 * written before use, so not zeroed at start-up). */
static u64 pd_pool[32][512] __attribute__((aligned(4096), section(".noinit")));
static int pd_pool_used;

void map_high_memory(u64 end)
{
	u64 gib;

	for (gib = 4; gib * GiB < end; gib++) {
		if (pdpt[gib] & 1)
			continue;
		if (pd_pool_used == (int)ARRAY_SIZE(pd_pool))
			report_abort("cannot map memory above %lu GiB", gib);
		u64 *pd = pd_pool[pd_pool_used++];
		for (int i = 0; i < 512; i++)
			pd[i] = (gib * GiB + (u64)i * 2 * MiB) | 0x83;
		pdpt[gib] = (u64)pd | 3;
	}
	write_cr3(read_cr3());
}

void lib_start(void)
{
	serial_init();
	idt_init();
	pic_mask_all();
	lapic_init();
	copy_boot_info();
	split_cmdline();
	exit(main(g_argc, g_argv));
}
