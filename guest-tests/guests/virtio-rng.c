/*
 * virtio-rng: the VMM's virtio-rng-pci driven by the guest's own driver
 * (lib/virtio.c): found on bus 0 (1af4:1044 modern or 1af4:1005
 * transitional), no features but VIRTIO_F_VERSION_1, one queue polled for
 * completion with MSI-X off.  Checks that a 64-byte buffer comes back full and
 * not all zeroes, that two of them differ, that a 1 MiB buffer is used (at
 * least partly: the device may give fewer bytes than asked), and that a chain
 * of two buffers is filled across both.
 * Command line: none.
 */
#include "lib/lib.h"
#include "lib/virtio.h"

#define TIMEOUT_MS 5000

static struct virtio_pci vp;
static struct virtq vq;
static u8 a[64], b[64];
static u8 big[1 * MiB] __attribute__((aligned(4096)));

static s64 fill(void *buf, u32 len)
{
	memset(buf, 0, len);
	vq.desc[0] = (struct vq_desc){(u64)buf, len, VQ_WRITE, 0};
	return virtq_run(&vq, TIMEOUT_MS);
}

static bool all_zero(const u8 *p, u64 n)
{
	for (u64 i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	int slot = pci_find_virtio(0x1044, 0x1005);
	if (slot < 0)
		report_abort("no virtio-rng (1af4:1044 or 1af4:1005) on bus 0");
	report_info("virtio-rng %04x at 00.%x", pci_cfg_read(slot, 0) >> 16, slot);
	if (!virtio_pci_probe(slot, &vp))
		return report_summary();
	report(virtio_negotiate(&vp, 0) >= 0, "VIRTIO_F_VERSION_1 negotiated");
	w16(vp.common + C_MSIX_CONFIG, VIRTIO_NO_VECTOR);
	bool q_ok = virtq_setup(&vp, 0, &vq, VIRTIO_NO_VECTOR);
	report(q_ok, "queue 0 of %u entries", vq.size);
	report(virtio_driver_ok(&vp) == 0xf, "DRIVER_OK");

	s64 la = fill(a, sizeof(a));
	s64 lb = fill(b, sizeof(b));
	report(la == 64 && !all_zero(a, 64), "64 random bytes (used length %ld)", la);
	report(lb == 64 && memcmp(a, b, 64) != 0, "a second buffer differs");
	s64 lbig = fill(big, sizeof(big));
	report(lbig > 0 && lbig <= (s64)sizeof(big) && !all_zero(big, lbig),
	       "1 MiB buffer: %ld random bytes", lbig);
	/* One chain of two writable buffers. */
	memset(a, 0, 64);
	memset(b, 0, 64);
	vq.desc[0] = (struct vq_desc){(u64)a, 32, VQ_WRITE | VQ_NEXT, 1};
	vq.desc[1] = (struct vq_desc){(u64)b, 32, VQ_WRITE, 0};
	s64 lc = virtq_run(&vq, TIMEOUT_MS);
	report(lc == 64 && !all_zero(a, 32) && !all_zero(b, 32), "a chain of two buffers: %ld bytes",
	       lc);
	w8(vp.common + C_STATUS, 0);
	return report_summary();
}
