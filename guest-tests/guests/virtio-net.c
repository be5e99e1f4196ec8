/*
 * virtio-net: the VMM's virtio-net-pci on a tap, driven by the guest's own
 * driver (lib/virtio.c): found on bus 0 (1af4:1041 modern or 1af4:1000
 * transitional), VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS negotiated, the MAC
 * and link status read from the configuration space, a receive queue with one
 * posted buffer and a transmit queue, both polled.  The guest broadcasts an
 * Ethernet frame of type 0x88b5 (local experimental) with the payload
 * "hopvm-ping <seed>" once a second until a frame of that type with
 * "hopvm-pong <seed>" arrives (the host test answers through the tap), up to
 * 30 times; frames of other types are ignored.
 * Command line: seed=N, mac=XX:XX:XX:XX:XX:XX (the MAC expected in the
 * configuration space; default 52:54:00:12:34:56).
 */
#include "lib/lib.h"
#include "lib/virtio.h"

#define HDR 12
#define ETHERTYPE 0x88b5
#define TRIES 30

static struct virtio_pci vp;
static struct virtq rxq, txq;
static u8 rxbuf[HDR + 1514] __attribute__((aligned(64)));
static u8 txbuf[HDR + 64] __attribute__((aligned(64)));

static void post_rx(void)
{
	rxq.desc[0] = (struct vq_desc){(u64)rxbuf, sizeof(rxbuf), VQ_WRITE, 0};
	virtq_post(&rxq, 0);
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u32 seed = (u32)get_arg_u64("seed", 1);
	const char *want_mac = get_arg("mac");
	char ping[32], pong[32], mac_text[24];
	snprintf(ping, sizeof(ping), "hopvm-ping %u", seed);
	snprintf(pong, sizeof(pong), "hopvm-pong %u", seed);

	int slot = pci_find_virtio(0x1041, 0x1000);
	if (slot < 0)
		report_abort("no virtio-net (1af4:1041 or 1af4:1000) on bus 0");
	report_info("virtio-net %04x at 00.%x", pci_cfg_read(slot, 0) >> 16, slot);
	if (!virtio_pci_probe(slot, &vp))
		return report_summary();
	s64 features = virtio_negotiate(&vp, (1u << 5) | (1u << 16));
	report(features == ((1u << 5) | (1u << 16)), "VERSION_1, MAC and STATUS negotiated (%lx)",
	       features);
	u8 mac[6];
	for (int i = 0; i < 6; i++)
		mac[i] = r8(vp.devcfg + i);
	snprintf(mac_text, sizeof(mac_text), "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2],
		 mac[3], mac[4], mac[5]);
	report(strcmp(mac_text, want_mac ? want_mac : "52:54:00:12:34:56") == 0, "MAC %s", mac_text);
	report(r16(vp.devcfg + 6) & 1, "link up");
	w16(vp.common + C_MSIX_CONFIG, VIRTIO_NO_VECTOR);
	bool queues = virtq_setup(&vp, 0, &rxq, VIRTIO_NO_VECTOR) &&
		      virtq_setup(&vp, 1, &txq, VIRTIO_NO_VECTOR);
	report(queues, "receive and transmit queues");
	report(virtio_driver_ok(&vp) == 0xf, "DRIVER_OK");
	printf("net: ready\n");

	/* The frame: virtio-net header (zeroes), broadcast, our MAC, type, payload. */
	memset(txbuf, 0, sizeof(txbuf));
	u8 *f = txbuf + HDR;
	memset(f, 0xff, 6);
	memcpy(f + 6, mac, 6);
	f[12] = ETHERTYPE >> 8;
	f[13] = ETHERTYPE & 0xff;
	memcpy(f + 14, ping, strlen(ping) + 1);
	post_rx();
	bool got = false;
	int sent = 0, other = 0;
	for (int t = 0; t < TRIES && !got; t++) {
		txq.desc[0] = (struct vq_desc){(u64)txbuf, HDR + 60, 0, 0};
		if (virtq_run(&txq, 5000) >= 0)
			sent++;
		/* Frames for a second, then ping again. */
		for (;;) {
			s64 len = virtq_poll(&rxq, 1000);
			if (len < 0)
				break;
			const u8 *r = rxbuf + HDR;
			if (len >= HDR + 14 + (s64)strlen(pong) && r[12] == (ETHERTYPE >> 8) &&
			    r[13] == (ETHERTYPE & 0xff) && memcmp(r, mac, 6) == 0 &&
			    memcmp(r + 14, pong, strlen(pong)) == 0) {
				got = true;
				break;
			}
			other++;
			post_rx();
		}
	}
	report(sent > 0, "transmitted %d ping frame(s)", sent);
	report(got, "received the host's pong for seed %u (%d other frame(s) ignored)", seed, other);
	w8(vp.common + C_STATUS, 0);
	return report_summary();
}
