/* A virtio 1.x virtio-pci entropy driver that asks as Linux's virtio-rng does: one
 * device-writable buffer per request, one kick, wait for the queue's interrupt (MSI-X entry 0
 * -> LAPIC vector 0x40), take the used length. Virtio 1.2: 4.1 (PCI), 2.7 (split rings), 5.4.
 *
 * Finds 1af4:1005 (transitional) or 1af4:1044 (modern), walks the vendor capabilities,
 * reset, ACKNOWLEDGE|DRIVER, VIRTIO_F_VERSION_1 only, FEATURES_OK, queue 0, DRIVER_OK; then
 * REQUESTS requests of REQ_BYTES each (a request the device answers short is asked again
 * for the rest, as Linux's hwrng reader does).
 * Output:
 *   vrng pci 00:SS.F id 1af4:DDDD
 *   vrng features_ok 1
 *   vrng request I len L                (each used entry)
 *   vrng got N bytes distinct D          (D: distinct byte values among the N)
 *   vrng bytes not all the same | ALL THE SAME
 *   vrng irqs N
 *   vrng done
 * "vrng error ..." and a power-off on a failure to set up. */
#include "rt.h"

#define VEC_QUEUE       0x40
#define WAIT_LOOPS      20000000u
#define REQUESTS        8
#define REQ_BYTES       64
#define QSIZE_MAX       8

#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0c
#define CC_MSIX_CONFIG 0x10
#define CC_STATUS 0x14
#define CC_Q_SELECT 0x16
#define CC_Q_SIZE 0x18
#define CC_Q_MSIX 0x1a
#define CC_Q_ENABLE 0x1c
#define CC_Q_NOTIFY_OFF 0x1e
#define CC_Q_DESC 0x20
#define CC_Q_DRIVER 0x28
#define CC_Q_DEVICE 0x30
#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8
#define ST_FAILED 0x80
#define F_VERSION_1 32
#define VRING_DESC_F_WRITE 2

struct vdesc { u64 addr; u32 len; u16 flags, next; };
struct vavail { u16 flags, idx, ring[QSIZE_MAX], used_event; };
struct vused { u16 flags, idx; struct { u32 id, len; } ring[QSIZE_MAX]; u16 avail_event; };
static struct vdesc desc[QSIZE_MAX] __attribute__((aligned(16)));
static struct vavail avail __attribute__((aligned(2)));
static struct vused used __attribute__((aligned(4)));
static u8 pool[REQUESTS * REQ_BYTES] __attribute__((aligned(16)));

static u32 common, notify;
static u16 qsize;

static void cc_w8(u32 o, u8 v) { *(volatile u8 *)(common + o) = v; }
static void cc_w16(u32 o, u16 v) { *(volatile u16 *)(common + o) = v; }
static void cc_w32(u32 o, u32 v) { *(volatile u32 *)(common + o) = v; }
static u8 cc_r8(u32 o) { return *(volatile u8 *)(common + o); }
static u16 cc_r16(u32 o) { return *(volatile u16 *)(common + o); }
static u32 cc_r32(u32 o) { return *(volatile u32 *)(common + o); }

static void fail(const char *what)
{
    printf("vrng error %s\n", what);
    if (common)
        cc_w8(CC_STATUS, cc_r8(CC_STATUS) | ST_FAILED);
    poweroff();
}

/* Linux's virtio-rng: one in-buffer, kick, sleep until the callback; returns the used len. */
static u32 request(u8 *buf, u32 len)
{
    static u16 avail_idx, used_seen;
    static u32 irqs_seen;
    desc[0] = (struct vdesc){ (u32)buf, len, VRING_DESC_F_WRITE, 0 };
    avail.ring[avail_idx % qsize] = 0;
    __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory");
    avail.idx = ++avail_idx;
    __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory");
    *(volatile u16 *)notify = 0;
    for (u32 i = 0; *(volatile u16 *)&used.idx == used_seen; i++) {
        irq_wait(VEC_QUEUE, irqs_seen + 1, WAIT_LOOPS / 100);
        if (i > 100)
            fail("request timed out");
    }
    irqs_seen = irq_count[VEC_QUEUE];
    barrier();
    return used.ring[used_seen++ % qsize].len;
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    int dev = pci_find_device(0x1af4, 0x1005);
    if (dev < 0)
        dev = pci_find_device(0x1af4, 0x1044);
    if (dev < 0)
        fail("no virtio-rng function");
    u32 id = pci_read32(dev, 0);
    printf("vrng pci 00:%02x.%u id %04x:%04x\n", PCI_SLOT(dev), PCI_FN(dev), id & 0xffff,
           id >> 16);
    pci_write16(dev, 0x04, pci_read16(dev, 0x04) | 0x7);
    u32 notify_mult = 0;
    for (u32 p = pci_read8(dev, 0x34) & 0xfc; p; p = pci_read8(dev, p + 1) & 0xfc) {
        if (pci_read8(dev, p) != 0x09)
            continue;
        u8 type = pci_read8(dev, p + 3), bar = pci_read8(dev, p + 4);
        u32 addr = pci_bar_mem(dev, bar) + pci_read32(dev, p + 8);
        if (type == CAP_COMMON && !common)
            common = addr;
        if (type == CAP_NOTIFY && !notify) {
            notify = addr;
            notify_mult = pci_read32(dev, p + 16);
        }
    }
    if (!common || !notify)
        fail("missing virtio capability");

    cc_w8(CC_STATUS, 0);
    for (u32 i = 0; cc_r8(CC_STATUS); i++)
        if (i > WAIT_LOOPS)
            fail("reset did not complete");
    cc_w8(CC_STATUS, ST_ACK);
    cc_w8(CC_STATUS, ST_ACK | ST_DRIVER);
    cc_w32(CC_DFSELECT, 1);
    if (!(cc_r32(CC_DF) & 1u << (F_VERSION_1 - 32)))
        fail("no VIRTIO_F_VERSION_1");
    cc_w32(CC_GFSELECT, 0);
    cc_w32(CC_GF, 0);
    cc_w32(CC_GFSELECT, 1);
    cc_w32(CC_GF, 1u << (F_VERSION_1 - 32));
    cc_w8(CC_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
    int fok = (cc_r8(CC_STATUS) & ST_FEATURES_OK) != 0;
    printf("vrng features_ok %d\n", fok);
    if (!fok)
        fail("FEATURES_OK not accepted");

    irq_init("vrng error ");
    u32 msix = pci_find_cap(dev, 0x11);
    if (!msix)
        fail("no MSI-X");
    msix_route(pci_msix_table(dev, msix), 0, VEC_QUEUE);
    pci_write16(dev, msix + 2, (pci_read16(dev, msix + 2) | 0x8000) & ~0x4000);
    cc_w16(CC_MSIX_CONFIG, 0xffff);

    cc_w16(CC_Q_SELECT, 0);
    u16 qmax = cc_r16(CC_Q_SIZE);
    qsize = qmax < QSIZE_MAX ? qmax : QSIZE_MAX;
    if (!qsize)
        fail("queue 0 not available");
    cc_w16(CC_Q_SIZE, qsize);
    cc_w32(CC_Q_DESC, (u32)desc);
    cc_w32(CC_Q_DESC + 4, 0);
    cc_w32(CC_Q_DRIVER, (u32)&avail);
    cc_w32(CC_Q_DRIVER + 4, 0);
    cc_w32(CC_Q_DEVICE, (u32)&used);
    cc_w32(CC_Q_DEVICE + 4, 0);
    cc_w16(CC_Q_MSIX, 0);
    if (cc_r16(CC_Q_MSIX) != 0)
        fail("queue vector refused");
    notify += cc_r16(CC_Q_NOTIFY_OFF) * notify_mult;
    cc_w16(CC_Q_ENABLE, 1);
    cc_w8(CC_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    irq_enable();

    u32 got = 0;
    for (int r = 0; got < sizeof pool; r++) {
        u32 len = request(pool + got, REQ_BYTES - got % REQ_BYTES);
        printf("vrng request %d len %u\n", r, len);
        if (len > REQ_BYTES)
            fail("device wrote past the buffer");
        got += len;
    }
    u8 seen[256] = { 0 };
    u32 distinct = 0;
    for (u32 i = 0; i < got; i++)
        if (!seen[pool[i]]++)
            distinct++;
    printf("vrng got %u bytes distinct %u\n", got, distinct);
    printf("vrng bytes %s\n", distinct > 1 ? "not all the same" : "ALL THE SAME");
    irq_disable();
    printf("vrng irqs %u\n", irq_count[VEC_QUEUE]);
    printf("vrng done\n");
    return 0;
}
