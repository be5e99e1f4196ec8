/* A minimal virtio 1.x PCI driver for test guests: see virtio.h. */
#include "virtio.h"

u32 pci_cfg_read(u8 slot, u8 reg)
{
	outl(0xcf8, 0x80000000u | (u32)slot << 11 | (reg & 0xfc));
	return inl(0xcfc);
}

void pci_cfg_write(u8 slot, u8 reg, u32 v)
{
	outl(0xcf8, 0x80000000u | (u32)slot << 11 | (reg & 0xfc));
	outl(0xcfc, v);
}

u64 pci_bar_addr(u8 slot, u8 i)
{
	u32 lo = pci_cfg_read(slot, 0x10 + 4 * i);
	u64 a = lo & ~0xfu;
	if ((lo & 7) == 4)
		a |= (u64)pci_cfg_read(slot, 0x14 + 4 * i) << 32;
	return a;
}

int pci_find_virtio(u16 modern_id, u16 transitional_id)
{
	for (int s = 0; s < 32; s++) {
		u32 id = pci_cfg_read(s, 0);
		if (id == ((u32)modern_id << 16 | VIRTIO_VENDOR) ||
		    id == ((u32)transitional_id << 16 | VIRTIO_VENDOR))
			return s;
	}
	return -1;
}

bool virtio_pci_probe(u8 slot, struct virtio_pci *vp)
{
	memset(vp, 0, sizeof(*vp));
	vp->slot = slot;
	for (u8 p = pci_cfg_read(slot, 0x34) & 0xfc; p; p = (pci_cfg_read(slot, p) >> 8) & 0xfc) {
		u32 d = pci_cfg_read(slot, p);
		if ((d & 0xff) == 0x11)
			vp->msix_cap = p;
		if ((d & 0xff) != 0x09)
			continue;
		u8 type = d >> 24;
		u8 bar = pci_cfg_read(slot, p + 4) & 0xff;
		if (bar > 5)
			continue;
		u64 addr = pci_bar_addr(slot, bar) + pci_cfg_read(slot, p + 8);
		if (type == 1) {
			vp->common = addr;
			vp->common_bar = bar;
		} else if (type == 2) {
			vp->notify = addr;
			vp->notify_mult = pci_cfg_read(slot, p + 16);
		} else if (type == 3) {
			vp->isr = addr;
		} else if (type == 4) {
			vp->devcfg = addr;
		}
	}
	bool ok = vp->common && vp->notify && vp->isr && vp->devcfg && vp->msix_cap;
	report(ok, "capabilities: common %lx notify %lx (x%u) isr %lx device %lx msi-x at %x",
	       vp->common, vp->notify, vp->notify_mult, vp->isr, vp->devcfg, vp->msix_cap);
	if (ok && (vp->common | vp->notify | vp->isr | vp->devcfg) >> 32)
		report_abort("virtio structures above 4 GiB (this guest maps only the first 4 GiB)");
	pci_cfg_write(slot, 0x04, pci_cfg_read(slot, 0x04) | 0x6); /* memory decode, bus master */
	return ok;
}

s64 virtio_negotiate(const struct virtio_pci *vp, u32 features_lo)
{
	w8(vp->common + C_STATUS, 0);
	w8(vp->common + C_STATUS, 1);
	w8(vp->common + C_STATUS, 3);
	w32(vp->common + C_DFSELECT, 1);
	u32 hi = r32(vp->common + C_DF);
	w32(vp->common + C_DFSELECT, 0);
	u32 lo = r32(vp->common + C_DF) & features_lo;
	if (!(hi & 1))
		return -1;
	w32(vp->common + C_GFSELECT, 0);
	w32(vp->common + C_GF, lo);
	w32(vp->common + C_GFSELECT, 1);
	w32(vp->common + C_GF, 1);
	w8(vp->common + C_STATUS, 0xb);
	return r8(vp->common + C_STATUS) == 0xb ? (s64)lo : -1;
}

bool virtq_setup(const struct virtio_pci *vp, u16 index, struct virtq *q, u16 vector)
{
	memset(q, 0, sizeof(*q));
	w16(vp->common + C_Q_SELECT, index);
	u16 max = r16(vp->common + C_Q_SIZE);
	if (max == 0)
		return false;
	q->size = max < VQ_SIZE ? max : VQ_SIZE;
	w16(vp->common + C_Q_SIZE, q->size);
	w16(vp->common + C_Q_MSIX, vector);
	w64(vp->common + C_Q_DESC, (u64)q->desc);
	w64(vp->common + C_Q_AVAIL, (u64)q->avail);
	w64(vp->common + C_Q_USED, (u64)q->used);
	q->notify = vp->notify + (u64)r16(vp->common + C_Q_NOFF) * vp->notify_mult;
	w16(vp->common + C_Q_ENABLE, 1);
	return r16(vp->common + C_Q_SIZE) == q->size && r16(vp->common + C_Q_MSIX) == vector;
}

u8 virtio_driver_ok(const struct virtio_pci *vp)
{
	w8(vp->common + C_STATUS, 0xf);
	return r8(vp->common + C_STATUS);
}

void virtq_post(struct virtq *q, u16 head)
{
	/* used_event (read with VIRTIO_RING_F_EVENT_IDX): interrupt after the next completion. */
	q->avail[2 + q->size] = q->used_seen;
	q->avail[2 + q->avail_idx % q->size] = head;
	barrier();
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
	barrier();
	w16(q->notify, 0);
}

s64 virtq_run(struct virtq *q, u32 timeout_ms)
{
	virtq_post(q, 0);
	return virtq_poll(q, timeout_ms);
}

s64 virtq_poll(struct virtq *q, u32 timeout_ms)
{
	deadline_start(timeout_ms);
	while ((u16)(q->used[0] >> 16) == q->used_seen) {
		if (deadline_passed())
			return -1;
		cpu_relax();
	}
	u32 len = q->used[1 + 2 * (q->used_seen % q->size) + 1];
	q->used_seen++;
	return len;
}
