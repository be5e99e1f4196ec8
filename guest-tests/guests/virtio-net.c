/*
 * virtio-net: the VMM's virtio-net-pci on a tap, driven by the guest's own
 * driver (lib/virtio.c): found on bus 0 (1af4:1041 modern or 1af4:1000
 * transitional), VIRTIO_NET_F_MAC and VIRTIO_NET_F_STATUS negotiated, the MAC
 * and link status read from the configuration space, a receive queue with
 * RXBUFS posted buffers and a transmit queue, both polled.  Every receive
 * completion is checked: it names a buffer the driver posted and the device
 * has not returned since ("delivered twice" otherwise).
 *
 * Default mode: the guest broadcasts an Ethernet frame of type 0x88b5 (local
 * experimental) with the payload "hopvm-ping <seed>" once a second until a
 * frame of that type with "hopvm-pong <seed>" arrives (the host test answers
 * through the tap), up to 30 times; frames of other types are ignored.
 *
 * announce=1: VIRTIO_NET_F_CTRL_VQ and VIRTIO_NET_F_GUEST_ANNOUNCE are
 * negotiated too and the control queue set up; after "net: ready" the guest
 * waits (up to 120 s) for VIRTIO_NET_S_ANNOUNCE in the configuration status
 * (the VMM's self-announce after a migration, or QMP announce-self), checks
 * the ISR's configuration-change bit, acknowledges with
 * VIRTIO_NET_CTRL_ANNOUNCE_ACK (VIRTIO_NET_OK, the bit clears; a later round
 * of the same announcement may set it again, which is acknowledged too), checks that
 * an unknown command class gets VIRTIO_NET_ERR,
 * prints "net: announce acknowledged", then does the ping exchange.
 *
 * rpc=1: requests "hopvm-req <seed> <n>" (n = 0, 1, 2 …) to the host, one at
 * a time, each retransmitted every 300 ms until the reply "hopvm-rsp <seed>
 * <n> C|S" arrives; a reply to an earlier request (the answer to a
 * retransmission) is counted and ignored, a reply to a request not yet sent
 * is a failure; "S" ends the run.  Meant to keep packets in flight while the
 * VM migrates: the host side is a responder that executes each request once
 * and answers retransmissions again.  Prints "net: rpc <n>" every 16
 * requests and "net: completed <n> requests, <r> retransmissions, <d>
 * duplicate replies" at the end.
 *
 * hostile=1: before the ping exchange, nonsense in the transmit queue (a
 * buffer beyond RAM, an absurd length, a descriptor loop, a next index beyond
 * the queue, an available index 1000 ahead) and writes to the configuration
 * space: each chain is either completed or the device flags
 * DEVICE_NEEDS_RESET (the guest then resets and sets it up again), a valid
 * frame goes out afterwards, and the configuration space is unchanged.
 *
 * mrg=1: VIRTIO_NET_F_MRG_RXBUF negotiated and receive buffers of 128 bytes:
 * a frame comes in as many buffers as it takes (num_buffers in the first
 * one's header), which the guest puts together; the host's pong is then
 * longer than one buffer and its contents are checked.
 *
 * Command line: seed=N, mac=XX:XX:XX:XX:XX:XX (the MAC expected in the
 * configuration space; default 52:54:00:12:34:56), announce=1, rpc=1,
 * hostile=1, mrg=1.
 */
#include "lib/lib.h"
#include "lib/virtio.h"

#define HDR 12
#define ETHERTYPE 0x88b5
#define TRIES 30
#define RXBUFS 16
#define F_MRG_RXBUF 15
#define MRG_BUF 128
#define F_MAC 5
#define F_STATUS 16
#define F_CTRL_VQ 17
#define F_GUEST_ANNOUNCE 21
#define S_ANNOUNCE 2

static struct virtio_pci vp;
static struct virtq rxq, txq, ctrlq;
static u8 rxbufs[RXBUFS][HDR + 1514] __attribute__((aligned(64)));
static bool posted[RXBUFS];
static u8 txbuf[HDR + 64] __attribute__((aligned(64)));
static u8 mac[6];
static int twice;	/* completions of a buffer not posted */
static bool mrg;	/* VIRTIO_NET_F_MRG_RXBUF: buffers of MRG_BUF bytes, frames over several */
static u8 frame[HDR + 1514];
static int frame_bufs;	/* how many buffers the last frame took */

static void post_rx(u16 i)
{
	rxq.desc[i] = (struct vq_desc){(u64)rxbufs[i], mrg ? MRG_BUF : sizeof(rxbufs[i]), VQ_WRITE, 0};
	posted[i] = true;
	virtq_post(&rxq, i);
}

/*
 * The next received frame within timeout_ms: its length (-1 on timeout) and
 * in *buf the buffer, which the caller gives back with post_rx(*id).
 */
static s64 rx_next(u32 timeout_ms, u16 *id, const u8 **buf)
{
	for (;;) {
		deadline_start(timeout_ms);
		while ((u16)(rxq.used[0] >> 16) == rxq.used_seen) {
			if (deadline_passed())
				return -1;
			cpu_relax();
		}
		u32 slot = 1 + 2 * (rxq.used_seen % rxq.size);
		u32 i = rxq.used[slot];
		s64 len = rxq.used[slot + 1];
		rxq.used_seen++;
		if (i >= RXBUFS || !posted[i]) {
			twice++;
			continue;
		}
		posted[i] = false;
		*id = (u16)i;
		*buf = rxbufs[i];
		return len;
	}
}

/*
 * The next received frame within timeout_ms, copied into `frame` (its buffers
 * posted again): its length, or -1 on timeout or a malformed merge.  With
 * MRG_RXBUF the first buffer's num_buffers says how many buffers follow.
 */
static s64 rx_frame(u32 timeout_ms)
{
	u16 id;
	const u8 *b;
	s64 len = rx_next(timeout_ms, &id, &b);
	if (len < 0)
		return -1;
	u16 n = mrg ? (u16)(b[10] | b[11] << 8) : 1;
	s64 total = 0;
	bool ok = n >= 1;
	for (u16 i = 0; ok; i++) {
		if (total + len > (s64)sizeof(frame))
			ok = false;
		else
			memcpy(frame + total, b, (u64)len);
		total += len;
		post_rx(id);
		if (i + 1 >= n)
			break;
		len = rx_next(1000, &id, &b);
		ok = len >= 0;
	}
	if (!ok)
		report(false, "received frame of %ld bytes in %u buffer(s)", total, n);
	frame_bufs = n;
	return ok ? total : -1;
}

/* Sends an 0x88b5 frame to `dst` with `payload`. */
static bool send_frame(const u8 *dst, const char *payload)
{
	memset(txbuf, 0, sizeof(txbuf));
	u8 *f = txbuf + HDR;
	memcpy(f, dst, 6);
	memcpy(f + 6, mac, 6);
	f[12] = ETHERTYPE >> 8;
	f[13] = ETHERTYPE & 0xff;
	memcpy(f + 14, payload, strlen(payload) + 1);
	txq.desc[0] = (struct vq_desc){(u64)txbuf, HDR + 60, 0, 0};
	return virtq_run(&txq, 5000) >= 0;
}

/* Whether `r` (a received frame of `len` bytes with its header) is ours with `text` first. */
static bool ours(const u8 *r, s64 len, const char *text)
{
	r += HDR;
	return len >= HDR + 14 + (s64)strlen(text) && r[12] == (ETHERTYPE >> 8) &&
	       r[13] == (ETHERTYPE & 0xff) && memcmp(r, mac, 6) == 0 &&
	       memcmp(r + 14, text, strlen(text)) == 0;
}

static void ping_pong(u32 seed)
{
	char ping[32], pong[32];
	snprintf(ping, sizeof(ping), "hopvm-ping %u", seed);
	snprintf(pong, sizeof(pong), "hopvm-pong %u", seed);
	static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	bool got = false;
	int sent = 0, other = 0;
	for (int t = 0; t < TRIES && !got; t++) {
		if (send_frame(bcast, ping))
			sent++;
		/* Frames for a second, then ping again. */
		for (;;) {
			s64 len = rx_frame(1000);
			if (len < 0)
				break;
			got = ours(frame, len, pong);
			if (got && mrg) {
				/* Past the text, the host's pattern: byte i is i * 7. */
				bool same = true;
				for (s64 i = HDR + 14 + (s64)strlen(pong) + 1; i < len; i++)
					same = same && frame[i] == (u8)((i - HDR) * 7);
				report(same && frame_bufs > 1, "pong of %ld bytes intact in %d buffers",
				       len, frame_bufs);
			}
			if (got)
				break;
			other++;
		}
	}
	report(sent > 0, "transmitted %d ping frame(s)", sent);
	report(got, "received the host's pong for seed %u (%d other frame(s) ignored)", seed, other);
}

/* One control command: class, command, `len` bytes of data; the device's ack byte or -1. */
static int ctrl(u8 class, u8 cmd, const u8 *data, u32 len)
{
	static u8 hdr[2], body[16], ack;
	hdr[0] = class;
	hdr[1] = cmd;
	memcpy(body, data, len);
	ack = 0xee;
	u16 n = 0;
	ctrlq.desc[n] = (struct vq_desc){(u64)hdr, 2, VQ_NEXT, (u16)(n + 1)};
	n++;
	if (len) {
		ctrlq.desc[n] = (struct vq_desc){(u64)body, len, VQ_NEXT, (u16)(n + 1)};
		n++;
	}
	ctrlq.desc[n] = (struct vq_desc){(u64)&ack, 1, VQ_WRITE, 0};
	if (virtq_run(&ctrlq, 5000) < 0)
		return -1;
	return ack;
}

static void guest_announce(void)
{
	bool seen = false;
	for (int s = 0; s < 120 && !seen; s++) {
		deadline_start(1000);
		while (!(seen = r16(vp.devcfg + 6) & S_ANNOUNCE) && !deadline_passed())
			cpu_relax();
	}
	report(seen, "VIRTIO_NET_S_ANNOUNCE set by the device");
	if (!seen)
		return;
	report(r8(vp.isr) & 2, "configuration change in the ISR");
	report(ctrl(3, 0, 0, 0) == 0, "ANNOUNCE_ACK answered VIRTIO_NET_OK");
	/* A later round of the same announcement may ask again: acknowledge each. */
	int acks = 1;
	for (int s = 0; s < 200 && (r16(vp.devcfg + 6) & S_ANNOUNCE); s++) {
		if (ctrl(3, 0, 0, 0) == 0)
			acks++;
		deadline_start(10);
		while (!deadline_passed())
			cpu_relax();
	}
	report(!(r16(vp.devcfg + 6) & S_ANNOUNCE), "VIRTIO_NET_S_ANNOUNCE cleared by the ack(s) (%d)",
	       acks);
	report(ctrl(42, 0, 0, 0) == 1, "an unknown command class answered VIRTIO_NET_ERR");
	printf("net: announce acknowledged\n");
}

static void rpc(u32 seed)
{
	static const u8 host[6] = {2, 0, 0, 0, 0, 0x99};
	char req[48], rsp[48];
	u32 n = 0, retrans = 0, dup = 0, bad = 0;
	bool stop = false;
	while (!stop && n < 1000000 && bad == 0) {
		snprintf(req, sizeof(req), "hopvm-req %u %u", seed, n);
		snprintf(rsp, sizeof(rsp), "hopvm-rsp %u %u ", seed, n);
		send_frame(host, req);
		bool answered = false;
		while (!answered) {
			u16 id;
			const u8 *r;
			s64 len = rx_next(300, &id, &r);
			if (len < 0) {
				retrans++;
				break;
			}
			char prefix[24];
			snprintf(prefix, sizeof(prefix), "hopvm-rsp %u ", seed);
			if (ours(r, len, rsp)) {
				answered = true;
				stop = r[HDR + 14 + strlen(rsp)] == 'S';
			} else if (ours(r, len, prefix)) {
				/* A reply to another request: an earlier one's (retransmitted). */
				const char *p = (const char *)r + HDR + 14 + strlen(prefix);
				u32 m = 0;
				while (*p >= '0' && *p <= '9')
					m = m * 10 + (u32)(*p++ - '0');
				if (m < n)
					dup++;
				else
					bad++;
			}
			post_rx(id);
		}
		if (answered) {
			n++;
			if (n % 16 == 0)
				printf("net: rpc %u\n", n);
		}
	}
	report(bad == 0, "no reply to a request not yet sent");
	report(stop, "the host ended the run");
	printf("net: completed %u requests, %u retransmissions, %u duplicate replies\n", n, retrans,
	       dup);
}

/* Negotiates `want`, checks MAC and link, sets the queues up, DRIVER_OK, posts RXBUFS buffers. */
static void device_init(u32 want, const char *want_mac)
{
	char mac_text[24];
	s64 features = virtio_negotiate(&vp, want);
	report(features == want, "VERSION_1 and features %x negotiated (%lx)", want, features);
	for (int i = 0; i < 6; i++)
		mac[i] = r8(vp.devcfg + i);
	snprintf(mac_text, sizeof(mac_text), "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2],
		 mac[3], mac[4], mac[5]);
	report(strcmp(mac_text, want_mac ? want_mac : "52:54:00:12:34:56") == 0, "MAC %s", mac_text);
	report(r16(vp.devcfg + 6) & 1, "link up");
	w16(vp.common + C_MSIX_CONFIG, VIRTIO_NO_VECTOR);
	bool ctrl_q = want & (1u << F_CTRL_VQ);
	bool queues = virtq_setup(&vp, 0, &rxq, VIRTIO_NO_VECTOR) &&
		      virtq_setup(&vp, 1, &txq, VIRTIO_NO_VECTOR) &&
		      (!ctrl_q || virtq_setup(&vp, 2, &ctrlq, VIRTIO_NO_VECTOR));
	report(queues, ctrl_q ? "receive, transmit and control queues" : "receive and transmit queues");
	report(virtio_driver_ok(&vp) == 0xf, "DRIVER_OK");
	memset(posted, 0, sizeof(posted));
	for (u16 i = 0; i < RXBUFS; i++)
		post_rx(i);
}

/*
 * Nonsense in the transmit queue, one case at a time: the device must either
 * complete the chain (dropping the frame) or flag DEVICE_NEEDS_RESET; the
 * driver then resets it if needed, and a valid frame goes out afterwards.
 */
static void hostile(const char *want_mac)
{
	static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	static const char *names[] = {"address beyond RAM", "absurd length", "descriptor loop",
				      "next beyond the queue", "avail index jump"};
	for (int c = 0; c < 5; c++) {
		switch (c) {
		case 0:
			txq.desc[0] = (struct vq_desc){0x1000000000ull, 60, 0, 0};
			break;
		case 1:
			txq.desc[0] = (struct vq_desc){(u64)txbuf, 0xfffff000u, 0, 0};
			break;
		case 2:
			txq.desc[0] = (struct vq_desc){(u64)txbuf, 60, VQ_NEXT, 1};
			txq.desc[1] = (struct vq_desc){(u64)txbuf, 60, VQ_NEXT, 0};
			break;
		case 3:
			txq.desc[0] = (struct vq_desc){(u64)txbuf, 60, VQ_NEXT, 200};
			break;
		}
		s64 used;
		if (c == 4) {
			txq.avail_idx += 1000;
			txq.avail[1] = txq.avail_idx;
			barrier();
			w16(txq.notify, 0);
			used = virtq_poll(&txq, 1000);
		} else {
			used = virtq_run(&txq, 1000);
		}
		bool needs_reset = r8(vp.common + C_STATUS) & 0x40;
		report(used >= 0 || needs_reset, "%s: chain completed (%d) or DEVICE_NEEDS_RESET (%d)",
		       names[c], used >= 0, needs_reset);
		if (needs_reset || used < 0)
			device_init((1u << F_MAC) | (1u << F_STATUS), want_mac);
		report(send_frame(bcast, "hopvm-hostile"), "%s: the device works afterwards", names[c]);
	}
	/* The configuration space is the device's: writes change nothing. */
	for (int i = 0; i < 8; i++)
		w8(vp.devcfg + i, 0xa5);
	bool same = r16(vp.devcfg + 6) == 1;
	for (int i = 0; i < 6; i++)
		same = same && r8(vp.devcfg + i) == mac[i];
	report(same, "configuration space writes ignored");
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u32 seed = (u32)get_arg_u64("seed", 1);
	const char *want_mac = get_arg("mac");
	bool announce = get_arg_u64("announce", 0) != 0;
	bool rpc_mode = get_arg_u64("rpc", 0) != 0;
	bool hostile_mode = get_arg_u64("hostile", 0) != 0;
	mrg = get_arg_u64("mrg", 0) != 0;

	int slot = pci_find_virtio(0x1041, 0x1000);
	if (slot < 0)
		report_abort("no virtio-net (1af4:1041 or 1af4:1000) on bus 0");
	report_info("virtio-net %04x at 00.%x", pci_cfg_read(slot, 0) >> 16, slot);
	if (!virtio_pci_probe(slot, &vp))
		return report_summary();
	u32 want = (1u << F_MAC) | (1u << F_STATUS);
	if (announce)
		want |= (1u << F_CTRL_VQ) | (1u << F_GUEST_ANNOUNCE);
	if (mrg)
		want |= 1u << F_MRG_RXBUF;
	device_init(want, want_mac);
	printf("net: ready\n");

	if (announce)
		guest_announce();
	if (hostile_mode)
		hostile(want_mac);
	if (rpc_mode)
		rpc(seed);
	else
		ping_pong(seed);
	report(twice == 0, "no receive buffer completed twice (%d)", twice);
	w8(vp.common + C_STATUS, 0);
	return report_summary();
}
