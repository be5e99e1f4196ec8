/* QEMU fw_cfg, legacy port I/O interface (selector 0x510, data 0x511). */
#include "lib.h"

void fwcfg_read(u16 key, void *buf, size_t len)
{
	u8 *b = buf;

	outw(FW_CFG_PORT_SEL, key);
	for (size_t i = 0; i < len; i++)
		b[i] = inb(FW_CFG_PORT_DATA);
}

u64 fwcfg_read_le(u16 key, size_t len)
{
	u8 b[8] = { 0 };
	u64 v = 0;

	if (len > sizeof(b))
		len = sizeof(b);
	fwcfg_read(key, b, len);
	for (size_t i = len; i-- > 0;)
		v = (v << 8) | b[i];
	return v;
}

bool fwcfg_present(void)
{
	u8 sig[4];

	fwcfg_read(FW_CFG_SIGNATURE, sig, sizeof(sig));
	return memcmp(sig, "QEMU", 4) == 0;
}

u16 fwcfg_nb_cpus(void)
{
	return (u16)fwcfg_read_le(FW_CFG_NB_CPUS, 2);
}
