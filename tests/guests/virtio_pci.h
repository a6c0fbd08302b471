/* The virtio 1.x PCI transport shared by the virtio test guests (virtio_blk.c, virtio_net.c,
 * virtio_rng.c). Virtio 1.2: 4.1 (PCI transport), 3.1.1 (driver initialisation), 2.7 (split
 * virtqueues).
 *
 * A guest defines VQ_SIZE_MAX (ring entries of each struct vq) before including this, sets
 * vp_tag to the prefix of its console lines, and then:
 *     vp_probe(name, transitional id, modern id)
 *                              the function on bus 0 -> vp_dev, its "<tag> pci" line
 *     vp_map_bars(move_high)   BAR addresses; decoding and bus mastering on
 *     vp_walk_caps()           the first common/notify/isr/device structures
 *     vp_begin()               reset, ACKNOWLEDGE, DRIVER
 *     vp_device_features(), vp_features_ok(accepted)
 *     vp_msix_setup(vector)    MSI-X table entry 0 -> LAPIC `vector`
 *     vp_queue_setup(q, index, msix entry), per queue
 *     vp_driver_ok()
 *     vp_restart_polled(q)     all of the above from the reset on, for VERSION_1 and polling
 *     vq_publish, vq_kick, vq_next_used on the split rings
 * With vp_verbose set, vp_map_bars and vp_walk_caps print what they find as
 * "<tag> bar ..." and "<tag> cap ..." lines. vp_fail prints "<tag> error <what>", marks the
 * device FAILED when its common configuration is known, and powers off. */
#ifndef VIRTIO_PCI_H
#define VIRTIO_PCI_H

#include "rt.h"

#ifndef VQ_SIZE_MAX
#error "define VQ_SIZE_MAX (entries of each virtqueue) before including virtio_pci.h"
#endif

#define VIRTIO_VENDOR   0x1af4

/* virtio-pci capability types (4.1.4) */
#define CAP_COMMON      1
#define CAP_NOTIFY      2
#define CAP_ISR         3
#define CAP_DEVICE      4

/* common configuration structure offsets (4.1.4.3) */
#define CC_DFSELECT     0x00
#define CC_DF           0x04
#define CC_GFSELECT     0x08
#define CC_GF           0x0c
#define CC_MSIX_CONFIG  0x10
#define CC_NUM_QUEUES   0x12
#define CC_STATUS       0x14
#define CC_CFG_GEN      0x15
#define CC_Q_SELECT     0x16
#define CC_Q_SIZE       0x18
#define CC_Q_MSIX       0x1a
#define CC_Q_ENABLE     0x1c
#define CC_Q_NOTIFY_OFF 0x1e
#define CC_Q_DESC       0x20
#define CC_Q_DRIVER     0x28
#define CC_Q_DEVICE     0x30

/* device status (2.1) */
#define ST_ACKNOWLEDGE  1
#define ST_DRIVER       2
#define ST_DRIVER_OK    4
#define ST_FEATURES_OK  8
#define ST_NEEDS_RESET  0x40
#define ST_FAILED       0x80

#define F_VERSION_1     32
#define NO_VECTOR       0xffff

#define VRING_DESC_F_NEXT   1
#define VRING_DESC_F_WRITE  2

#define VP_POLL_LOOPS   20000000u

struct vdesc { u64 addr; u32 len; u16 flags, next; };
struct vavail { u16 flags, idx, ring[VQ_SIZE_MAX], used_event; };
struct vused_elem { u32 id, len; };
struct vused { u16 flags, idx; struct vused_elem ring[VQ_SIZE_MAX]; u16 avail_event; };

/* One split virtqueue in guest RAM and the driver's view of it. */
struct vq {
    struct vdesc desc[VQ_SIZE_MAX] __attribute__((aligned(16)));
    struct vavail avail __attribute__((aligned(2)));
    struct vused used __attribute__((aligned(4)));
    u16 index;                  /* queue number: what a notify writes */
    u16 size, max;              /* ring entries in use; the device's maximum */
    u16 vector;                 /* MSI-X entry the device took, NO_VECTOR for none */
    u16 avail_idx, used_seen, notify_off;
};

static const char *vp_tag = "virtio";
static int vp_verbose;
static u32 vp_dev;                      /* our function, PCI_DEV(slot, fn) */
static u32 vp_bar[6];                   /* usable BAR addresses (0: none, or above 4 GiB) */
static u32 vp_common, vp_notify_base, vp_notify_mult, vp_isr, vp_device;

static inline u8 cc_read8(u32 off) { return *(volatile u8 *)(vp_common + off); }
static inline u16 cc_read16(u32 off) { return *(volatile u16 *)(vp_common + off); }
static inline u32 cc_read32(u32 off) { return *(volatile u32 *)(vp_common + off); }
static inline void cc_write8(u32 off, u8 v) { *(volatile u8 *)(vp_common + off) = v; }
static inline void cc_write16(u32 off, u16 v) { *(volatile u16 *)(vp_common + off) = v; }
static inline void cc_write32(u32 off, u32 v) { *(volatile u32 *)(vp_common + off) = v; }
static inline void cc_write64(u32 off, u64 v)
{
    cc_write32(off, (u32)v);
    cc_write32(off + 4, (u32)(v >> 32));
}

/* A full barrier: ring contents before the index, the index before the notify. */
static inline void vp_mb(void) { __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory"); }

static inline __attribute__((noreturn)) void vp_fail(const char *what)
{
    printf("%s error %s\n", vp_tag, what);
    if (vp_common)
        cc_write8(CC_STATUS, cc_read8(CC_STATUS) | ST_FAILED);
    poweroff();
}

/* The first function on bus 0 with the virtio vendor and one of the two device ids. */
static inline int vp_find(u16 dev_a, u16 dev_b)
{
    for (int d = pci_next(-1); d >= 0; d = pci_next(d)) {
        u32 id = pci_read32(d, 0);
        if ((id & 0xffff) == VIRTIO_VENDOR && ((id >> 16) == dev_a || (id >> 16) == dev_b)) {
            vp_dev = d;
            return 1;
        }
    }
    return 0;
}

/* vp_find, then "<tag> pci 00:SS.F id VVVV:DDDD"; "<tag> error no <what> function" and a
 * power-off when there is none. */
static inline void vp_probe(const char *what, u16 dev_a, u16 dev_b)
{
    if (!vp_find(dev_a, dev_b)) {
        printf("%s error no %s function\n", vp_tag, what);
        poweroff();
    }
    u32 id = pci_read32(vp_dev, 0);
    printf("%s pci 00:%02x.%u id %04x:%04x\n", vp_tag, PCI_SLOT(vp_dev), PCI_FN(vp_dev),
           id & 0xffff, id >> 16);
}

/* Memory BARs of every function on bus 0 below 4 GiB, to find a hole for a BAR we move. */
static inline u32 vp_lowest_mem_bar(void)
{
    u32 low = 0xFEC00000u;      /* IOAPIC: nothing above this is ours to take */
    for (int d = pci_next(-1); d >= 0; d = pci_next(d)) {
        if ((pci_read32(d, 0x0c) >> 16 & 0x7f) != 0)    /* bridges: skip */
            continue;
        for (u32 b = 0; b < 6; b++) {
            u32 v = pci_read32(d, 0x10 + 4 * b);
            if (v & 1)
                continue;
            u32 hi = 0;
            if ((v & 6) == 4) {
                hi = pci_read32(d, 0x10 + 4 * (b + 1));
                b++;
            }
            u32 a = v & ~0xfu;
            if (!hi && a >= 0x80000000u && a < low)
                low = a;
        }
    }
    return low;
}

/* vp_bar[] from our function's BARs, then I/O, memory decode and bus mastering on. This guest
 * runs with paging off, so a 64-bit BAR above 4 GiB is unusable as it is: with `move_high`
 * it is moved below the lowest memory BAR on the bus (and above 2 GiB), decoding off while
 * it moves; without, it is left alone and reads as 0. */
static inline void vp_map_bars(int move_high)
{
    u16 cmd = pci_read16(vp_dev, 0x04);
    for (u32 b = 0; b < 6; b++) {
        u32 v = pci_read32(vp_dev, 0x10 + 4 * b);
        if (v & 1) {
            vp_bar[b] = v & ~3u;
            if (vp_verbose && vp_bar[b])
                printf("%s bar %u io %x\n", vp_tag, b, vp_bar[b]);
            continue;
        }
        int is64 = (v & 6) == 4;
#ifdef VIRTIO_PCI_FORCE_HIGH_BAR
        /* self-test of the move below: put 64-bit BARs at +4 GiB first (build with
         * defines={"VIRTIO_PCI_FORCE_HIGH_BAR": 1}) */
        if (move_high && is64 && (v & ~0xfu)) {
            pci_write16(vp_dev, 0x04, cmd & ~3);
            pci_write32(vp_dev, 0x10 + 4 * (b + 1), 1);
        }
#endif
        u32 hi = is64 ? pci_read32(vp_dev, 0x10 + 4 * (b + 1)) : 0;
        u32 lo = v & ~0xfu;
        if (hi && move_high) {
            pci_write16(vp_dev, 0x04, cmd & ~3);
            pci_write32(vp_dev, 0x10 + 4 * b, 0xffffffffu);
            pci_write32(vp_dev, 0x10 + 4 * (b + 1), 0xffffffffu);
            u32 size = ~(pci_read32(vp_dev, 0x10 + 4 * b) & ~0xfu) + 1;
            u32 target = (vp_lowest_mem_bar() - size) & ~(size - 1);
            pci_write32(vp_dev, 0x10 + 4 * b, target);
            pci_write32(vp_dev, 0x10 + 4 * (b + 1), 0);
            pci_write16(vp_dev, 0x04, cmd);
            vp_bar[b] = pci_read32(vp_dev, 0x10 + 4 * b) & ~0xfu;
            if (vp_verbose)
                printf("%s bar %u addr %x moved from %x%08x size %x\n", vp_tag, b, vp_bar[b],
                       hi, lo, size);
        } else {
            vp_bar[b] = hi ? 0 : lo;
            if (vp_verbose && vp_bar[b])
                printf("%s bar %u addr %x\n", vp_tag, b, lo);
        }
        if (is64)
            b++;
    }
    pci_write16(vp_dev, 0x04, pci_read16(vp_dev, 0x04) | 0x7);    /* I/O, memory, bus master */
}

/* The vendor capabilities (4.1.4): the first structure of each type is the one to use.
 * 1 when the common configuration and notify structures were found. */
static inline int vp_walk_caps(void)
{
    static const char *const names[] = { "?", "common", "notify", "isr", "device" };
    if (!(pci_read16(vp_dev, 0x06) & 0x10))
        return 0;
    u32 p = pci_read8(vp_dev, 0x34) & 0xfc;
    for (int n = 0; p && n < 48; n++) {         /* bounded: a looping list must not hang us */
        u8 id = pci_read8(vp_dev, p), next = pci_read8(vp_dev, p + 1) & 0xfc;
        if (id == 0x09) {
            u8 type = pci_read8(vp_dev, p + 3), bar = pci_read8(vp_dev, p + 4);
            u32 off = pci_read32(vp_dev, p + 8), len = pci_read32(vp_dev, p + 12);
            if (type >= CAP_COMMON && type <= CAP_DEVICE && bar < 6 && vp_bar[bar]) {
                u32 *slot = type == CAP_COMMON ? &vp_common : type == CAP_NOTIFY ? &vp_notify_base
                            : type == CAP_ISR ? &vp_isr : &vp_device;
                u32 mult = type == CAP_NOTIFY ? pci_read32(vp_dev, p + 16) : 0;
                if (!*slot) {
                    *slot = vp_bar[bar] + off;
                    if (type == CAP_NOTIFY)
                        vp_notify_mult = mult;
                }
                if (vp_verbose && type == CAP_NOTIFY)
                    printf("%s cap notify bar %u off %x len %x mult %u\n", vp_tag, bar, off, len,
                           mult);
                else if (vp_verbose)
                    printf("%s cap %s bar %u off %x len %x\n", vp_tag, names[type], bar, off,
                           len);
            }
        }
        p = next;
    }
    return vp_common && vp_notify_base;
}

/* 3.1.1 steps 1-3: reset (waiting for it to complete), ACKNOWLEDGE, DRIVER. */
static inline void vp_begin(void)
{
    cc_write8(CC_STATUS, 0);
    for (u32 i = 0; cc_read8(CC_STATUS) != 0; i++)
        if (i > VP_POLL_LOOPS)
            vp_fail("reset did not complete");
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE);
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
}

static inline u64 vp_device_features(void)
{
    cc_write32(CC_DFSELECT, 0);
    u64 f = cc_read32(CC_DF);
    cc_write32(CC_DFSELECT, 1);
    return f | (u64)cc_read32(CC_DF) << 32;
}

/* Write the accepted features and set FEATURES_OK; 1 if the device kept FEATURES_OK. */
static inline int vp_features_ok(u64 accepted)
{
    cc_write32(CC_GFSELECT, 0);
    cc_write32(CC_GF, (u32)accepted);
    cc_write32(CC_GFSELECT, 1);
    cc_write32(CC_GF, (u32)(accepted >> 32));
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    return (cc_read8(CC_STATUS) & ST_FEATURES_OK) != 0;
}

static inline void vp_driver_ok(void)
{
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
}

/* MSI-X table entry 0 -> LAPIC 0, `vector`; MSI-X enabled, function unmasked. 0 if the
 * function has no MSI-X capability. */
static inline int vp_msix_setup(u32 vector)
{
    u32 p = pci_find_cap(vp_dev, 0x11);
    if (!p)
        return 0;
    msix_route(pci_msix_table(vp_dev, p), 0, vector);
    pci_write16(vp_dev, p + 2, (pci_read16(vp_dev, p + 2) | 0x8000) & ~0x4000);
    return 1;
}

/* Queue `index` (4.1.5.1.3): the device's size capped at VQ_SIZE_MAX (a power of two, as split
 * rings need), the ring addresses, MSI-X entry `msix` (NO_VECTOR: none; q->vector is what the
 * device kept), its notify offset; then enabled. Returns q->size, 0 when the device has no
 * such queue or reads as all-ones (gone away); nothing is then written but the select. */
static inline u16 vp_queue_setup(struct vq *q, u16 index, u16 msix)
{
    q->index = index;
    q->avail_idx = q->used_seen = 0;
    cc_write16(CC_Q_SELECT, index);
    q->max = cc_read16(CC_Q_SIZE);
    if (q->max == 0 || q->max == 0xffff)
        return q->size = 0;
    q->size = q->max < VQ_SIZE_MAX ? q->max : VQ_SIZE_MAX;
    while (q->size & (q->size - 1))
        q->size &= q->size - 1;
    cc_write16(CC_Q_SIZE, q->size);
    cc_write64(CC_Q_DESC, (u32)q->desc);
    cc_write64(CC_Q_DRIVER, (u32)&q->avail);
    cc_write64(CC_Q_DEVICE, (u32)&q->used);
    cc_write16(CC_Q_MSIX, msix);
    q->vector = cc_read16(CC_Q_MSIX);
    q->notify_off = cc_read16(CC_Q_NOTIFY_OFF);
    cc_write16(CC_Q_ENABLE, 1);
    return q->size;
}

/* A polling driver's quick (re)start with VIRTIO_F_VERSION_1 alone: reset, giving up after a
 * few polls (a device whose backend is away may stay in NEEDS_RESET), ACKNOWLEDGE|DRIVER,
 * FEATURES_OK, queue 0 with cleared rings and no MSI-X vector, DRIVER_OK. 1 when the device
 * took DRIVER_OK without NEEDS_RESET; 0 to try again later. */
static inline int vp_restart_polled(struct vq *q)
{
    cc_write8(CC_STATUS, 0);
    for (u32 i = 0; cc_read8(CC_STATUS) != 0; i++)
        if (i > 50)
            return 0;
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
    if (!vp_features_ok(1ull << F_VERSION_1))
        return 0;
    for (u32 i = 0; i < sizeof q->used; i++)      /* nothing left of the run before the reset */
        ((volatile u8 *)&q->used)[i] = 0;
    for (u32 i = 0; i < sizeof q->avail; i++)
        ((volatile u8 *)&q->avail)[i] = 0;
    if (!vp_queue_setup(q, 0, NO_VECTOR))
        return 0;
    vp_driver_ok();
    return (cc_read8(CC_STATUS) & (ST_DRIVER_OK | ST_NEEDS_RESET)) == ST_DRIVER_OK;
}

/* Make the chain at `head` available to the device (no notify). */
static inline void vq_publish(struct vq *q, u16 head)
{
    q->avail.ring[q->avail_idx % q->size] = head;
    vp_mb();
    q->avail.idx = ++q->avail_idx;
    vp_mb();
}

static inline void vq_kick(struct vq *q)
{
    vp_mb();
    *(volatile u16 *)(vp_notify_base + q->notify_off * vp_notify_mult) = q->index;
}

/* The next used element of q into *e: 1, or 0 after `loops` polls. */
static inline int vq_next_used(struct vq *q, struct vused_elem *e, u32 loops)
{
    for (u32 i = 0; i < loops; i++) {
        barrier();
        if (*(volatile u16 *)&q->used.idx != q->used_seen) {
            barrier();
            *e = q->used.ring[q->used_seen % q->size];
            q->used_seen++;
            return 1;
        }
        cpu_relax();
    }
    return 0;
}

#endif
