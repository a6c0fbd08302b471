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
#define VQ_SIZE_MAX     8
#include "virtio_pci.h"

#define VEC_QUEUE       0x40
#define WAIT_LOOPS      VP_POLL_LOOPS
#define REQUESTS        8
#define REQ_BYTES       64

static struct vq vq;
static u8 pool[REQUESTS * REQ_BYTES] __attribute__((aligned(16)));

/* Linux's virtio-rng: one in-buffer, kick, sleep until the callback; returns the used len. */
static u32 request(u8 *buf, u32 len)
{
    static u32 irqs_seen;
    vq.desc[0] = (struct vdesc){ (u32)buf, len, VRING_DESC_F_WRITE, 0 };
    vq_publish(&vq, 0);
    vq_kick(&vq);
    for (u32 i = 0; *(volatile u16 *)&vq.used.idx == vq.used_seen; i++) {
        irq_wait(VEC_QUEUE, irqs_seen + 1, WAIT_LOOPS / 100);
        if (i > 100)
            vp_fail("request timed out");
    }
    irqs_seen = irq_count[VEC_QUEUE];
    barrier();
    return vq.used.ring[vq.used_seen++ % vq.size].len;
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    vp_tag = "vrng";
    vp_probe("virtio-rng", 0x1005, 0x1044);
    vp_map_bars(0);
    if (!vp_walk_caps())
        vp_fail("missing virtio capability");

    vp_begin();
    u64 accept = vp_device_features() & 1ull << F_VERSION_1;
    if (!accept)
        vp_fail("no VIRTIO_F_VERSION_1");
    int fok = vp_features_ok(accept);
    printf("vrng features_ok %d\n", fok);
    if (!fok)
        vp_fail("FEATURES_OK not accepted");

    irq_init("vrng error ");
    if (!vp_msix_setup(VEC_QUEUE))
        vp_fail("no MSI-X");
    cc_write16(CC_MSIX_CONFIG, NO_VECTOR);

    if (!vp_queue_setup(&vq, 0, 0))
        vp_fail("queue 0 not available");
    if (vq.vector != 0)
        vp_fail("queue vector refused");
    vp_driver_ok();
    irq_enable();

    u32 got = 0;
    for (int r = 0; got < sizeof pool; r++) {
        u32 len = request(pool + got, REQ_BYTES - got % REQ_BYTES);
        printf("vrng request %d len %u\n", r, len);
        if (len > REQ_BYTES)
            vp_fail("device wrote past the buffer");
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
