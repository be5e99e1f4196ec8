/*
 * virtio-blk: a tiny virtio 1.x PCI driver of its own, run against the VMM's
 * virtio-blk-pci (hopvm's or QEMU's):
 *  - PCI through configuration mechanism #1: the i440FX host bridge at 00.0,
 *    the first virtio-blk on bus 0 (1af4:1042 modern, as hopvm's, or 1af4:1001
 *    transitional, as QEMU's `-drive if=virtio` on `pc`; both are driven through
 *    their modern interface), BAR sizing, the interrupt line firmware wrote
 *    and the MP table's entry for the slot's INTA#;
 *  - the vendor capabilities (common, notify, ISR, device configuration; BAR
 *    and offset of each) and the MSI-X capability;
 *  - feature negotiation (VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH), one queue
 *    of 16 descriptors, MSI-X vector 0 to the boot CPU's LAPIC;
 *  - writes a pattern over the whole disk in 64 KiB requests, reads it all back
 *    and compares, zeroes and discards a few sectors when the device offers
 *    it (then writes the pattern back), flushes, asks GET_ID, and checks that
 *    a request past the end fails with VIRTIO_BLK_S_IOERR;
 *  - bad input: rings outside guest RAM → DEVICE_NEEDS_RESET, reset recovers;
 *  - INTx: with MSI-X off, a request's interrupt arrives through the IOAPIC
 *    pin of the interrupt line (level-triggered), and the ISR says "queue".
 * The pattern word at disk byte offset o is (o * 2654435761) ^ seed (32 bits,
 * little-endian), so the host can check the image afterwards.
 * With readonly: the disk must offer VIRTIO_BLK_F_RO and fail a write with
 * IOERR; the host has written the pattern, which is only read and verified.
 * With migrate: between the write and the read phase the guest prints "Now
 * migrate the VM, then press a key to continue..." and waits (60 s) for a byte
 * on COM1 (the runner's `migrate = yes` migrates it live, then sends one), so
 * the reads and the rest run on the destination's device.
 * With bench=N: after set-up, N 4 KiB reads and N 64 KiB writes are timed
 * with the ACPI PM timer (port 0x608, 3.579545 MHz, as on QEMU's pc) and
 * printed as "BENCH: <what>: <ns> ns/request" lines (used by the virtio_blk
 * benchmark); the checks then run as usual.
 * With writer: instead of the whole-disk checks, the guest keeps writing whole
 * 512-byte blocks in a pseudo-random order over the first span=SIZE bytes (default:
 * the whole disk, at most 4 MiB), each block's content naming the block and its
 * generation (how many times it was written), printing "writer: N writes" every 16
 * writes, until a
 * byte arrives on COM1 (after "Now migrate the VM, then press a key to
 * continue..."; the host migrates it meanwhile, writes in flight); then it reads
 * back every block it wrote and checks it holds its last generation — a write
 * lost, or an old one done again, shows. With span=0 it writes nothing and only
 * waits for the key (an idle guest with a disk of any size).
 * Command line: seed=N (pattern seed), disk=SIZE (expected capacity, bytes),
 * readonly, migrate, bench=N, writer, span=SIZE.
 */
#include "lib/lib.h"
#include "lib/virtio.h"

#define VIRTIO_BLK_MODERN 0x1042
#define VIRTIO_BLK_TRANSITIONAL 0x1001
#define MSI_VECTOR 0x50
#define INTX_VECTOR 0x51
#define QSIZE VQ_SIZE
#define CHUNK (64 * KiB)
#define TIMEOUT_MS 5000

struct req_header {
	u32 type;
	u32 reserved;
	u64 sector;
};

static struct virtio_pci vp;
static struct virtq vq;
static struct req_header hdr;
static volatile u8 status;
static u8 buf[CHUNK] __attribute__((aligned(4096)));
static volatile u32 irqs;

static void msi_handler(struct ex_regs *r)
{
	(void)r;
	irqs++;
}

/*
 * INTx is level-triggered: reading the ISR lowers the line before the handler's EOI. An
 * interrupt whose ISR reads 0 is not this device's (a shared line's spurious delivery, which a
 * driver must tolerate, as Linux's vp_interrupt does): counted apart, so that the test still
 * fails on a second signal (ISR set again) or a line left high (a storm of them).
 */
static volatile u32 intx_irqs, intx_isr, intx_spurious;
static void intx_handler(struct ex_regs *r)
{
	(void)r;
	u8 isr = r8(vp.isr);
	intx_isr |= isr;
	if (isr)
		intx_irqs++;
	else
		intx_spurious++;
}

/* Queues one request (header, optional data, status) and waits for it; returns the status. */
static int request(u32 type, u64 sector, void *data, u32 len, bool device_writes)
{
	int n = 1;
	hdr = (struct req_header){type, 0, sector};
	status = 0xff;
	vq.desc[0] = (struct vq_desc){(u64)&hdr, sizeof(hdr), VQ_NEXT, 1};
	if (len) {
		vq.desc[1] = (struct vq_desc){(u64)data, len,
					      (u16)(VQ_NEXT | (device_writes ? VQ_WRITE : 0)), 2};
		n = 2;
	}
	vq.desc[n] = (struct vq_desc){(u64)&status, 1, VQ_WRITE, 0};
	return virtq_run(&vq, TIMEOUT_MS) < 0 ? -1 : status;
}

static u32 pm_timer(void) { return inl(0x608) & 0xffffff; }

/* N requests of `len` bytes (reads or writes), timed one by one; prints ns per request. */
static void bench(const char *what, u32 type, u32 len, u64 n, u64 capacity)
{
	u64 ticks = 0;
	int bad = 0;
	for (u64 i = 0; i < n; i++) {
		u64 sector = (i * (len / 512)) % (capacity - len / 512 + 1);
		u32 t0 = pm_timer();
		bad |= request(type, sector, buf, len, type == 0) != 0;
		ticks += (pm_timer() - t0) & 0xffffff;
	}
	printf("BENCH: %s: %llu ns/request\n", what, ticks * 1000000000ull / 3579545 / n);
	report(!bad, "%lu %s requests", n, what);
}

static u32 pattern(u64 off, u32 seed) { return (u32)(off * 2654435761u) ^ seed; }

#define WBLOCK 512
#define WMAX_BLOCKS 8192
static u32 gens[WMAX_BLOCKS];

/* Word i of block b at generation g. */
static u32 wpattern(u64 b, u32 g, u64 i, u32 seed)
{
	return ((u32)(b << 16 | (g & 0xffff)) * 2654435761u + (u32)i * 0x9e3779b1u) ^ seed ^ g;
}

static int writer(u64 disk, u32 seed)
{
	u64 span = get_arg_size("span", 1, disk);
	u64 nblk = (span < disk ? span : disk) / WBLOCK;
	if (nblk > WMAX_BLOCKS)
		nblk = WMAX_BLOCKS;
	u32 *w = (u32 *)buf;
	u32 x = seed | 1;
	u64 writes = 0;
	int bad = 0;
	printf("writer: %lu blocks of %u bytes\n", nblk, WBLOCK);
	printf("Now migrate the VM, then press a key to continue...\n");
	u8 last = cmos_read(0);
	for (int left = 300; !(inb(0x3fd) & 1) && left > 0 && !bad;) {
		if (!nblk) {
			/* span=0: an idle guest with a disk (the block migration benchmark). */
			u8 now = cmos_read(0);
			if (now != last) {
				last = now;
				left--;
			}
			cpu_relax();
			continue;
		}
		x = x * 1103515245u + 12345u;
		u64 b = (x >> 8) % nblk;
		u32 g = gens[b] + 1;
		for (u64 i = 0; i < WBLOCK / 4; i++)
			w[i] = wpattern(b, g, i, seed);
		int st = request(1, b * (WBLOCK / 512), buf, WBLOCK, false);
		if (st != 0) {
			printf("write of block %lu: status %d\n", b, st);
			bad = 1;
			break;
		}
		gens[b] = g;
		if (++writes % 16 == 0)
			printf("writer: %lu writes\n", writes);
		u8 now = cmos_read(0);
		if (now != last) {
			last = now;
			left--;
		}
	}
	report(!bad, "%lu writes of %u bytes, none failed", writes, WBLOCK);
	if (!(inb(0x3fd) & 1))
		report_abort("no key on COM1 within 300 s (was the VM migrated and a key sent?)");
	printf("key 0x%02x received\n", inb(0x3f8));
	u64 written = 0, wrong = 0;
	for (u64 b = 0; b < nblk; b++) {
		if (!gens[b])
			continue;
		written++;
		memset(buf, 0, WBLOCK);
		int st = request(0, b * (WBLOCK / 512), buf, WBLOCK, true);
		u64 i = 0;
		while (st == 0 && i < WBLOCK / 4 && w[i] == wpattern(b, gens[b], i, seed))
			i++;
		if (st != 0 || i < WBLOCK / 4) {
			if (wrong < 8)
				printf("block %lu (generation %u): status %d, word %lu is %08x\n", b,
				       gens[b], st, i, i < WBLOCK / 4 ? w[i] : 0);
			wrong++;
		}
	}
	report((written > 0 || !nblk) && wrong == 0, "writer: verified %lu blocks (%lu writes), %lu wrong", written,
	       writes, wrong);
	report(request(4, 0, 0, 0, false) == 0, "flush");
	return report_summary();
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u32 seed = (u32)get_arg_u64("seed", 0x12345678);
	u64 disk = get_arg_size("disk", 1, 1 * MiB);
	bool ro = get_arg("readonly") != NULL;
	int slot = -1;

	lapic_init();
	set_handler(MSI_VECTOR, msi_handler);

	report(pci_cfg_read(0, 0) == 0x12378086, "host bridge 8086:1237 at 00.0 (read %08x)", pci_cfg_read(0, 0));
	for (int s = 0; s < 32 && slot < 0; s++)
		if (pci_cfg_read(s, 0) == ((u32)VIRTIO_BLK_MODERN << 16 | VIRTIO_VENDOR) ||
		    pci_cfg_read(s, 0) == ((u32)VIRTIO_BLK_TRANSITIONAL << 16 | VIRTIO_VENDOR))
			slot = s;
	if (slot < 0)
		report_abort("no virtio-blk (1af4:1042 or 1af4:1001) on bus 0");
	report_info("virtio-blk %04x at 00.%x, interrupt line %u", pci_cfg_read(slot, 0) >> 16, slot,
		    pci_cfg_read(slot, 0x3c) & 0xff);
	/* The MP table routes the slot's INTA# to the IOAPIC pin of its interrupt line. */
	static struct mp_info mp;
	int mp_pin = -1;
	if (mp_find(&mp))
		for (int i = 0; i < mp.nirqs; i++)
			if (mp.irqs[i].irq_type == 0 && mp.irqs[i].src_bus != mp.isa_bus &&
			    mp.irqs[i].src_irq == (u8)(slot << 2))
				mp_pin = mp.irqs[i].dst_pin;
	report(mp_pin == (int)(pci_cfg_read(slot, 0x3c) & 0xff), "MP table: INTA# of 00.%x at IOAPIC pin %d",
	       slot, mp_pin);

	if (!virtio_pci_probe(slot, &vp))
		return report_summary();
	u8 msix_cap = vp.msix_cap;

	/* Size the BAR of the vp.common configuration, put it back. */
	u8 cbar = vp.common_bar;
	u8 breg = 0x10 + 4 * cbar;
	u32 bar = pci_cfg_read(slot, breg);
	pci_cfg_write(slot, breg, 0xffffffff);
	u32 mask = pci_cfg_read(slot, breg);
	pci_cfg_write(slot, breg, bar);
	u32 bar_size = ~(mask & ~0xfu) + 1;
	report(pci_bar_addr(slot, cbar) != 0 && (bar & 1) == 0 && bar_size >= 0x4000 &&
		       pci_cfg_read(slot, breg) == bar,
	       "BAR %u: memory at %lx, %x bytes", cbar, pci_bar_addr(slot, cbar), bar_size);

	/* Reset, acknowledge, features. */
	w8(vp.common + C_STATUS, 0);
	report(r8(vp.common + C_STATUS) == 0, "reset");
	w8(vp.common + C_STATUS, 1);
	w8(vp.common + C_STATUS, 3);
	w32(vp.common + C_DFSELECT, 1);
	u32 hi = r32(vp.common + C_DF);
	w32(vp.common + C_DFSELECT, 0);
	u32 lo = r32(vp.common + C_DF);
	report(hi & 1, "device offers VIRTIO_F_VERSION_1 (features %08x%08x)", hi, lo);
	report_info("VIRTIO_RING_F_EVENT_IDX %s", (lo & (1u << 29)) ? "negotiated" : "not offered");
	report(!!(lo & (1u << 5)) == ro, "VIRTIO_BLK_F_RO %s", ro ? "offered" : "not offered");
	w32(vp.common + C_GFSELECT, 0);
	/* RO, FLUSH, DISCARD, WRITE_ZEROES and EVENT_IDX (used_event is kept by virtq_post, and
	 * every request is kicked: a driver may always notify). */
	u32 accepted = lo & ((1u << 5) | (1u << 9) | (1u << 13) | (1u << 14) | (1u << 29));
	w32(vp.common + C_GF, accepted);
	w32(vp.common + C_GFSELECT, 1);
	w32(vp.common + C_GF, 1);
	w8(vp.common + C_STATUS, 0xb);
	report(r8(vp.common + C_STATUS) == 0xb, "FEATURES_OK accepted");
	u64 capacity = r32(vp.devcfg) | (u64)r32(vp.devcfg + 4) << 32;
	report(capacity * 512 == disk, "capacity %lu sectors (%lu bytes expected)", capacity, disk);

	/* MSI-X vector 0 → this CPU, vector MSI_VECTOR. */
	u32 table = pci_cfg_read(slot, msix_cap + 4);
	u64 msix_table = pci_bar_addr(slot, table & 7) + (table & ~7u);
	pci_cfg_write(slot, msix_cap, pci_cfg_read(slot, msix_cap) | (1u << 31));
	w64(msix_table, 0xfee00000u | lapic_id() << 12);
	w32(msix_table + 8, MSI_VECTOR);
	w32(msix_table + 12, 0);
	w16(vp.common + C_MSIX_CONFIG, 0xffff);

	/* Queue 0. */
	w16(vp.common + C_Q_SELECT, 0);
	u16 qmax = r16(vp.common + C_Q_SIZE);
	w16(vp.common + C_Q_SIZE, QSIZE);
	w16(vp.common + C_Q_MSIX, 0);
	report(qmax >= QSIZE && r16(vp.common + C_Q_SIZE) == QSIZE && r16(vp.common + C_Q_MSIX) == 0,
	       "queue 0: max %u, size %u, msi-x vector 0", qmax, QSIZE);
	w64(vp.common + C_Q_DESC, (u64)vq.desc);
	w64(vp.common + C_Q_AVAIL, (u64)vq.avail);
	w64(vp.common + C_Q_USED, (u64)vq.used);
	vq.notify = vp.notify + (u64)r16(vp.common + C_Q_NOFF) * vp.notify_mult;
	vq.size = QSIZE;
	w16(vp.common + C_Q_ENABLE, 1);
	w8(vp.common + C_STATUS, 0xf);
	report(r8(vp.common + C_STATUS) == 0xf, "DRIVER_OK");
	sti();

	u64 bench_n = get_arg_u64("bench", 0);
	if (bench_n && capacity >= 128) {
		bench("read 4 KiB", 0, 4096, bench_n, capacity);
		bench("write 64 KiB", 1, CHUNK, bench_n, capacity);
		u32 t0 = pm_timer();
		request(4, 0, 0, 0, false);
		printf("BENCH: flush: %llu ns/request\n",
		       (u64)((pm_timer() - t0) & 0xffffff) * 1000000000ull / 3579545);
	}

	if (get_arg("writer"))
		return writer(disk, seed);

	/* The whole disk: write, then read back. */
	u64 chunks = disk / CHUNK;
	int bad = 0;
	if (ro) {
		memset(buf, 0, CHUNK);
		report(request(1, 0, buf, CHUNK, false) == 1, "write to a read-only disk: IOERR");
	}
	for (u64 c = 0; c < chunks && !bad && !ro; c++) {
		u32 *w = (u32 *)buf;
		for (u64 i = 0; i < CHUNK / 4; i++)
			w[i] = pattern(c * CHUNK + i * 4, seed);
		int st = request(1, c * CHUNK / 512, buf, CHUNK, false);
		if (st != 0) {
			printf("write of chunk %lu: status %d\n", c, st);
			bad = 1;
		}
	}
	if (!ro)
		report(!bad, "wrote %lu KiB in %lu requests", chunks * CHUNK / KiB, chunks);
	if (get_arg("migrate")) {
		printf("Now migrate the VM, then press a key to continue...\n");
		/* Counted in RTC seconds: the LAPIC timer's deadline does not survive QEMU's
		 * migration. */
		u8 last = cmos_read(0);
		for (int left = 60; !(inb(0x3fd) & 1) && left > 0;) {
			u8 now = cmos_read(0);
			if (now != last) {
				last = now;
				left--;
			}
			cpu_relax();
		}
		if (!(inb(0x3fd) & 1))
			report_abort("no key on COM1 within 60 s (was the VM migrated and a key sent?)");
		printf("key 0x%02x received\n", inb(0x3f8));
	}
	for (u64 c = 0; c < chunks && !bad; c++) {
		memset(buf, 0, CHUNK);
		int st = request(0, c * CHUNK / 512, buf, CHUNK, true);
		u32 *w = (u32 *)buf;
		for (u64 i = 0; i < CHUNK / 4 && st == 0; i++)
			if (w[i] != pattern(c * CHUNK + i * 4, seed)) {
				printf("chunk %lu word %lu: %08x\n", c, i, w[i]);
				st = -2;
			}
		if (st != 0) {
			printf("read of chunk %lu: status %d\n", c, st);
			bad = 1;
		}
	}
	report(!bad, "read back and verified %lu KiB", chunks * CHUNK / KiB);
	if (!bad && (accepted & (1u << 14))) {
		/* WRITE_ZEROES over sectors 8-23 (unmap allowed), then chunk 0 read back. */
		static struct { u64 sector; u32 count, flags; } seg;
		seg.sector = 8, seg.count = 16, seg.flags = 1;
		int st = request(13, 0, &seg, sizeof(seg), false);
		memset(buf, 0xff, CHUNK);
		int rd = request(0, 0, buf, CHUNK, true);
		u32 *w = (u32 *)buf;
		int wrong = 0;
		for (u64 i = 0; i < CHUNK / 4; i++) {
			u64 off = i * 4;
			u32 want = (off >= 8 * 512 && off < 24 * 512) ? 0 : pattern(off, seed);
			wrong += w[i] != want;
		}
		report(st == 0 && rd == 0 && !wrong, "write-zeroes: sectors 8-23 read back as zeroes");
		/* DISCARD sectors 128-135 (the data is then unspecified), then both chunks rewritten. */
		seg.sector = 128, seg.count = 8, seg.flags = 0;
		if (accepted & (1u << 13))
			report(request(11, 0, &seg, sizeof(seg), false) == 0, "discard");
		for (u64 c = 0; c < 2 && c < chunks; c++) {
			for (u64 i = 0; i < CHUNK / 4; i++)
				w[i] = pattern(c * CHUNK + i * 4, seed);
			bad |= request(1, c * CHUNK / 512, buf, CHUNK, false) != 0;
		}
		report(!bad, "pattern rewritten over the zeroed and discarded sectors");
	}
	report(request(4, 0, 0, 0, false) == 0, "flush");
	memset(buf, 0, 20);
	report(request(8, 0, buf, 20, true) == 0, "get-id: '%s'", (char *)buf);
	report(request(0, capacity, buf, 512, true) == 1, "read past the end: IOERR");
	deadline_start(TIMEOUT_MS);
	while (irqs != vq.used_seen && !deadline_passed())
		cpu_relax();
	report(irqs == vq.used_seen, "MSI-X: %u interrupts for %u requests", irqs, vq.used_seen);
	cli();

	/* Bad input: rings outside RAM. */
	w8(vp.common + C_STATUS, 0);
	w8(vp.common + C_STATUS, 3);
	w32(vp.common + C_GFSELECT, 1);
	w32(vp.common + C_GF, 1);
	w8(vp.common + C_STATUS, 0xb);
	w16(vp.common + C_Q_SELECT, 0);
	w16(vp.common + C_Q_SIZE, QSIZE);
	w64(vp.common + C_Q_DESC, 0xd0000000ull);
	w64(vp.common + C_Q_AVAIL, (u64)vq.avail);
	w64(vp.common + C_Q_USED, (u64)vq.used);
	vq.used[0] = 0;
	vq.avail[2] = 0;
	vq.avail[1] = 1; /* one request, whose descriptor is not in RAM */
	w16(vp.common + C_Q_ENABLE, 1);
	w8(vp.common + C_STATUS, 0xf);
	/* hopvm refuses the rings at DRIVER_OK, QEMU when the notification makes it look. */
	w16(vq.notify, 0);
	deadline_start(TIMEOUT_MS);
	while (!(r8(vp.common + C_STATUS) & 0x40) && !deadline_passed())
		cpu_relax();
	report(r8(vp.common + C_STATUS) & 0x40, "rings outside RAM: DEVICE_NEEDS_RESET (status %x)",
	       r8(vp.common + C_STATUS));
	w8(vp.common + C_STATUS, 0);
	report(r8(vp.common + C_STATUS) == 0 && r16(vp.common + C_Q_ENABLE) == 0, "reset recovers");

	/* INTx: MSI-X off, the slot's line through the IOAPIC, level-triggered. */
	u8 line = pci_cfg_read(slot, 0x3c) & 0xff;
	pic_mask_all();
	set_handler(INTX_VECTOR, intx_handler);
	ioapic_write(IOAPIC_DEFAULT_BASE, 0x10 + 2 * line + 1, lapic_id() << 24);
	ioapic_write(IOAPIC_DEFAULT_BASE, 0x10 + 2 * line, INTX_VECTOR | (1u << 15));
	pci_cfg_write(slot, msix_cap, pci_cfg_read(slot, msix_cap) & ~(1u << 31));
	pci_cfg_write(slot, 0x04, pci_cfg_read(slot, 0x04) & ~(1u << 10)); /* INTx enabled */
	w8(vp.common + C_STATUS, 3);
	w32(vp.common + C_GFSELECT, 1);
	w32(vp.common + C_GF, 1);
	w8(vp.common + C_STATUS, 0xb);
	w16(vp.common + C_Q_SELECT, 0);
	w16(vp.common + C_Q_SIZE, QSIZE);
	w16(vp.common + C_Q_MSIX, 0xffff);
	w64(vp.common + C_Q_DESC, (u64)vq.desc);
	w64(vp.common + C_Q_AVAIL, (u64)vq.avail);
	w64(vp.common + C_Q_USED, (u64)vq.used);
	vq.used[0] = 0;
	vq.avail[1] = 0;
	vq.avail_idx = vq.used_seen = 0;
	w16(vp.common + C_Q_ENABLE, 1);
	w8(vp.common + C_STATUS, 0xf);
	sti();
	int st = request(0, 0, buf, 512, true);
	deadline_start(TIMEOUT_MS);
	while (intx_irqs == 0 && !deadline_passed())
		cpu_relax();
	cli();
	report(st == 0 && intx_irqs == 1 && intx_isr == 1 && intx_spurious <= 1,
	       "INTx: %u interrupt(s) on IOAPIC pin %u, ISR %x (%u with ISR 0)", intx_irqs, line,
	       intx_isr, intx_spurious);
	ioapic_write(IOAPIC_DEFAULT_BASE, 0x10 + 2 * line, 1u << 16);
	w8(vp.common + C_STATUS, 0);

	return report_summary();
}
