/*
 * A minimal virtio 1.x PCI driver for test guests: PCI configuration
 * mechanism #1, the virtio vendor capabilities, the common configuration
 * registers and one split virtqueue of VQ_SIZE descriptors that is polled
 * for completion (interrupts are the guest's business).  Works with modern
 * (1af4:104x) and transitional (1af4:10xx) devices through their modern
 * interface.  Structures above 4 GiB are not supported (guests map 4 GiB).
 */
#ifndef HOPVM_GUEST_VIRTIO_H
#define HOPVM_GUEST_VIRTIO_H

#include "lib.h"

#define VIRTIO_VENDOR 0x1af4
#define VQ_SIZE 16
#define VIRTIO_NO_VECTOR 0xffff

/* Common configuration offsets. */
#define C_DFSELECT 0x00
#define C_DF 0x04
#define C_GFSELECT 0x08
#define C_GF 0x0c
#define C_MSIX_CONFIG 0x10
#define C_NUM_QUEUES 0x12
#define C_STATUS 0x14
#define C_Q_SELECT 0x16
#define C_Q_SIZE 0x18
#define C_Q_MSIX 0x1a
#define C_Q_ENABLE 0x1c
#define C_Q_NOFF 0x1e
#define C_Q_DESC 0x20
#define C_Q_AVAIL 0x28
#define C_Q_USED 0x30

/* Descriptor flags. */
#define VQ_NEXT 1
#define VQ_WRITE 2

static inline u8 r8(u64 a) { return *(volatile u8 *)a; }
static inline u16 r16(u64 a) { return *(volatile u16 *)a; }
static inline u32 r32(u64 a) { return *(volatile u32 *)a; }
static inline void w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void w16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void w64(u64 a, u64 v)
{
	w32(a, (u32)v);
	w32(a + 4, (u32)(v >> 32));
}

u32 pci_cfg_read(u8 slot, u8 reg);
void pci_cfg_write(u8 slot, u8 reg, u32 v);
/* The address memory BAR `i` of `slot` is programmed to (64-bit BARs included). */
u64 pci_bar_addr(u8 slot, u8 i);
/* The first device on bus 0 with vendor 1af4 and one of the two device IDs, or -1. */
int pci_find_virtio(u16 modern_id, u16 transitional_id);

struct virtio_pci {
	u8 slot;
	u64 common, notify, isr, devcfg;
	u32 notify_mult;
	u8 msix_cap;	/* 0 if none */
	u8 common_bar;	/* the BAR holding the common configuration */
};

/*
 * Finds the vendor capabilities of `slot` and turns on memory decode and bus
 * mastering; false (with a FAIL line) if one of common, notify, ISR, device
 * configuration or MSI-X is missing.
 */
bool virtio_pci_probe(u8 slot, struct virtio_pci *vp);

struct vq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct virtq {
	struct vq_desc desc[VQ_SIZE] __attribute__((aligned(16)));
	volatile u16 avail[2 + VQ_SIZE + 1] __attribute__((aligned(2)));
	volatile u32 used[1 + 2 * VQ_SIZE + 1] __attribute__((aligned(4)));
	u16 size;	/* VQ_SIZE, or the device's maximum if smaller */
	u16 avail_idx, used_seen;
	u64 notify;	/* this queue's notification address */
};

/*
 * Device reset, ACKNOWLEDGE + DRIVER, accepts `features_lo` (masked with the
 * device's) and VIRTIO_F_VERSION_1, FEATURES_OK; returns the accepted low
 * feature word, or -1 if the device refused.  The caller sets up queues and
 * then calls virtio_driver_ok().
 */
s64 virtio_negotiate(const struct virtio_pci *vp, u32 features_lo);
/*
 * Queue `index` of VQ_SIZE entries at `q` (fewer if the device's maximum is
 * smaller: QEMU's virtio-rng has 8), with MSI-X vector `vector`.
 */
bool virtq_setup(const struct virtio_pci *vp, u16 index, struct virtq *q, u16 vector);
/* DRIVER_OK; returns the status read back. */
u8 virtio_driver_ok(const struct virtio_pci *vp);
/* Makes the chain starting at descriptor `head` available and notifies. */
void virtq_post(struct virtq *q, u16 head);
/*
 * Waits up to timeout_ms for the device to use the next chain; returns the
 * used length, or -1 on timeout.
 */
s64 virtq_poll(struct virtq *q, u32 timeout_ms);
/* virtq_post of descriptor 0, then virtq_poll. */
s64 virtq_run(struct virtq *q, u32 timeout_ms);

#endif
