/* A small virtio 1.x (modern) virtio-pci block driver, as a test of a virtio-blk device model.
 * Virtio 1.2: 4.1 (PCI transport), 2.7 (split virtqueues), 5.2 (block device).
 *
 * What it does, each step printed as one "vblk ..." line (see the table at the end of this
 * comment):
 *   find the function (1af4:1001 transitional or 1af4:1042 modern) on bus 0 through 0xcf8,
 *   turn on I/O + memory decode and bus mastering, move 64-bit BARs that sit above 4 GiB to a
 *   free place below (this guest runs with paging off), walk the vendor capabilities, reset,
 *   ACKNOWLEDGE|DRIVER, accept VIRTIO_F_VERSION_1 (+ BLK_F_FLUSH and BLK_F_RO when offered),
 *   FEATURES_OK, queue 0 in guest RAM with MSI-X vector 0 -> LAPIC vector 0x40, DRIVER_OK;
 *   then requests, each completed by polling the used ring (interrupts are only counted):
 *     read sector 0;
 *     write sectors 1..WRITE_SECTORS with a pattern, header / 3 data buffers / status;
 *     read them back through 2 data buffers and compare;
 *     three one-sector reads posted together behind one notify (a batch);
 *     FLUSH, GET_ID, a read at sector == capacity (must fail), an unknown request type.
 *
 * The pattern written to sector s (1 <= s <= 8), byte j (0..511) is
 *     (s * 31 + j * 7 + 0x5a) & 0xff
 * so the host can check the image file. Against a read-only disk the write must fail with
 * VIRTIO_BLK_S_IOERR (the device offers VIRTIO_BLK_F_RO; the write is sent anyway, on purpose),
 * and then the readback reports a mismatch instead of "ok".
 *
 * Output (all numbers decimal unless said hex):
 *   vblk pci 00:SS.F id 1af4:DDDD
 *   vblk bar N addr HEX [moved from HEX]
 *   vblk cap common|notify|isr|device bar N off HEX len HEX [mult N]
 *   vblk features HEX (device, 64-bit hex) accepted HEX
 *   vblk features_ok 1
 *   vblk queue size N (max M) msix vector V
 *   vblk status HEX                       (device_status after DRIVER_OK)
 *   vblk capacity N                       (512-byte sectors)
 *   vblk ro 0|1
 *   vblk read0 status S len L sum HEX8 first HEX32   (sum: 32-bit sum of the 128 LE words)
 *   vblk write status S len L sectors N
 *   vblk readback ok | vblk readback mismatch at BYTE     (after "vblk readback status S len L")
 *   vblk batch status S S S ok|mismatch
 *   vblk flush status S len L
 *   vblk id status S "SERIAL"
 *   vblk oob status S                      (read at sector == capacity: 1 = IOERR)
 *   vblk unsupp status S                   (request type 0x7f: 2 = UNSUPP)
 *   vblk irqs N
 *   vblk done
 * A failure to set up prints "vblk error ..." and powers off without "vblk done". */
#define VQ_SIZE_MAX     16
#include "virtio_pci.h"

#define VEC_QUEUE       0x40
#define POLL_LOOPS      VP_POLL_LOOPS

#define F_BLK_RO        5
#define F_BLK_FLUSH     9

#define T_IN            0
#define T_OUT           1
#define T_FLUSH         4
#define T_GET_ID        8
#define T_BOGUS         0x7f

#define WRITE_SECTORS   8
#define NBYTES          (WRITE_SECTORS * 512)

/* ---- the virtqueue ---- */
static struct vq vq;

struct blk_hdr { u32 type, reserved; u64 sector; };

/* Request buffers: headers and status bytes per descriptor-chain slot. */
static struct blk_hdr hdrs[4] __attribute__((aligned(16)));
static volatile u8 status[4];
static u8 sector0[512] __attribute__((aligned(16)));
static u8 wbuf[NBYTES + 1024] __attribute__((aligned(16)));
static u8 rbuf[NBYTES + 1024] __attribute__((aligned(16)));
static u8 bbuf[3][512] __attribute__((aligned(16)));
static char idbuf[24] __attribute__((aligned(4)));

struct seg { void *p; u32 len; };

/* Build the chain header, segs..., status starting at descriptor `first` for request slot
 * `r`, and publish it in the avail ring (no notify). */
static void post(int r, u16 first, u32 type, u64 sector, const struct seg *segs, int nseg,
                 int device_writes)
{
    hdrs[r] = (struct blk_hdr){ type, 0, sector };
    status[r] = 0xee;
    u16 d = first;
    vq.desc[d] = (struct vdesc){ (u32)&hdrs[r], sizeof hdrs[r], VRING_DESC_F_NEXT, d + 1 };
    for (int i = 0; i < nseg; i++) {
        d++;
        vq.desc[d] = (struct vdesc){ (u32)segs[i].p, segs[i].len,
                                     VRING_DESC_F_NEXT | (device_writes ? VRING_DESC_F_WRITE : 0),
                                     d + 1 };
    }
    d++;
    vq.desc[d] = (struct vdesc){ (u32)&status[r], 1, VRING_DESC_F_WRITE, 0 };
    vq_publish(&vq, first);
}

/* Wait for `n` more used entries; returns the used length of the last one or -1. */
static u32 last_used_len;
static int wait_used(int n)
{
    for (u32 i = 0; i < POLL_LOOPS; i++) {
        barrier();
        u16 idx = *(volatile u16 *)&vq.used.idx;
        if ((u16)(idx - vq.used_seen) >= n) {
            barrier();
            last_used_len = vq.used.ring[(u16)(vq.used_seen + n - 1) % vq.size].len;
            vq.used_seen += n;
            return 1;
        }
        cpu_relax();
    }
    return 0;
}

/* One request on descriptors from 0, request slot 0; returns its status byte (0xff on a
 * timeout, printed as such). */
static u8 request(u32 type, u64 sector, const struct seg *segs, int nseg, int device_writes)
{
    post(0, 0, type, sector, segs, nseg, device_writes);
    vq_kick(&vq);
    if (!wait_used(1)) {
        printf("vblk timeout type %u\n", type);
        last_used_len = 0;
        return 0xff;
    }
    return status[0];
}

/* Our function's transport, the bring-up counter.c and vblk_failover.c share too: BARs (one
 * above 4 GiB moved below), all four virtio structures, each printed as a "vblk" line. */
static int map_device(void)
{
    vp_tag = "vblk";
    vp_verbose = 1;
    vp_map_bars(1);
    return vp_walk_caps() && vp_isr && vp_device;
}

static u8 pattern(u32 sector, u32 j) { return (u8)(sector * 31 + j * 7 + 0x5a); }

int main(const struct hvm_start_info *si)
{
    (void)si;
    vp_tag = "vblk";
    vp_probe("virtio-blk", 0x1001, 0x1042);
    if (!map_device()) {
        printf("vblk error missing virtio capability\n");
        return 0;
    }

    vp_begin();
    u64 dev_features = vp_device_features();
    u64 want = 1ull << F_VERSION_1 | 1ull << F_BLK_FLUSH | 1ull << F_BLK_RO;
    u64 accept = dev_features & want;
    printf("vblk features %llx accepted %llx\n", dev_features, accept);
    if (!(accept & 1ull << F_VERSION_1))
        vp_fail("device does not offer VIRTIO_F_VERSION_1");
    int fok = vp_features_ok(accept);
    printf("vblk features_ok %d\n", fok);
    if (!fok)
        vp_fail("FEATURES_OK not accepted");

    /* interrupts: IDT, LAPIC, MSI-X entry 0 */
    irq_init("vblk error ");
    int have_msix = vp_msix_setup(VEC_QUEUE);
    cc_write16(CC_MSIX_CONFIG, NO_VECTOR);

    if (!vp_queue_setup(&vq, 0, have_msix ? 0 : NO_VECTOR))
        vp_fail("queue 0 not available");
    printf("vblk queue size %u (max %u) msix vector %u num_queues %u\n", vq.size, vq.max,
           vq.vector, cc_read16(CC_NUM_QUEUES));

    vp_driver_ok();
    printf("vblk status %x\n", cc_read8(CC_STATUS));
    irq_enable();

    /* device configuration: capacity, read consistently across config_generation */
    u32 cap_lo, cap_hi;
    u8 gen;
    do {
        gen = cc_read8(CC_CFG_GEN);
        cap_lo = *(volatile u32 *)vp_device;
        cap_hi = *(volatile u32 *)(vp_device + 4);
    } while (gen != cc_read8(CC_CFG_GEN));
    u64 capacity = (u64)cap_hi << 32 | cap_lo;
    printf("vblk capacity %llu\n", capacity);
    printf("vblk ro %d\n", (dev_features >> F_BLK_RO) & 1 ? 1 : 0);

    /* read sector 0 */
    struct seg s0[1] = { { sector0, 512 } };
    u8 st = request(T_IN, 0, s0, 1, 1);
    printf("vblk read0 status %u len %u sum %08x first %02x%02x%02x%02x\n", st, last_used_len,
           sum_words(sector0, 512), sector0[0], sector0[1], sector0[2], sector0[3]);

    /* write sectors 1..8: header, 3 data buffers (1000 + 1560 + 1536 bytes, not contiguous,
     * not sector-aligned splits), status */
    u8 *wa = wbuf, *wb = wbuf + 1000 + 200, *wc = wbuf + 1000 + 200 + 1560 + 300;
    for (u32 j = 0; j < NBYTES; j++) {
        u8 v = pattern(1 + j / 512, j % 512);
        if (j < 1000)
            wa[j] = v;
        else if (j < 2560)
            wb[j - 1000] = v;
        else
            wc[j - 2560] = v;
    }
    struct seg sw[3] = { { wa, 1000 }, { wb, 1560 }, { wc, 1536 } };
    st = request(T_OUT, 1, sw, 3, 0);
    printf("vblk write status %u len %u sectors %u\n", st, last_used_len, WRITE_SECTORS);

    /* read back through 2 buffers (2560 + 1536), compare */
    memset(rbuf, 0xcc, sizeof rbuf);
    u8 *ra = rbuf, *rb = rbuf + 2560 + 512;
    struct seg sr[2] = { { ra, 2560 }, { rb, 1536 } };
    st = request(T_IN, 1, sr, 2, 1);
    printf("vblk readback status %u len %u\n", st, last_used_len);
    int bad = -1;
    for (u32 j = 0; j < NBYTES && bad < 0; j++) {
        u8 got = j < 2560 ? ra[j] : rb[j - 2560];
        if (got != pattern(1 + j / 512, j % 512))
            bad = (int)j;
    }
    if (bad < 0)
        printf("vblk readback ok\n");
    else
        printf("vblk readback mismatch at %d\n", bad);

    /* three reads (sectors 1, 2, 3) posted together, one notify */
    memset(bbuf, 0xcc, sizeof bbuf);
    for (int r = 0; r < 3; r++) {
        struct seg sb[1] = { { bbuf[r], 512 } };
        post(1 + r, (u16)(3 * r), T_IN, 1 + r, sb, 1, 1);
    }
    vq_kick(&vq);
    int ok = wait_used(3);
    int same = 1;
    for (int r = 0; r < 3; r++)
        for (u32 j = 0; j < 512; j++)
            if (bbuf[r][j] != pattern(1 + r, j))
                same = 0;
    if (!ok)
        printf("vblk timeout batch\n");
    printf("vblk batch status %u %u %u %s\n", status[1], status[2], status[3],
           same ? "ok" : "mismatch");

    /* FLUSH: header and status only */
    st = request(T_FLUSH, 0, 0, 0, 0);
    printf("vblk flush status %u len %u\n", st, last_used_len);

    /* GET_ID: 20 bytes, NUL-padded, not necessarily terminated */
    memset(idbuf, 0, sizeof idbuf);
    struct seg sid[1] = { { idbuf, 20 } };
    st = request(T_GET_ID, 0, sid, 1, 1);
    idbuf[20] = 0;
    for (int i = 0; i < 20 && idbuf[i]; i++)
        if (idbuf[i] < 0x20 || idbuf[i] > 0x7e || idbuf[i] == '"')
            idbuf[i] = '?';
    printf("vblk id status %u \"%s\"\n", st, idbuf);

    /* a read past the end: sector == capacity */
    st = request(T_IN, capacity, s0, 1, 1);
    printf("vblk oob status %u\n", st);

    /* an unknown request type */
    st = request(T_BOGUS, 0, 0, 0, 0);
    printf("vblk unsupp status %u\n", st);

    /* give a last interrupt time to land before counting */
    for (u32 i = 0; i < 10000; i++)
        cpu_relax();
    irq_disable();
    printf("vblk irqs %u spurious %u\n", irq_count[VEC_QUEUE], irq_count[VEC_SPURIOUS]);
    printf("vblk device status %x\n", cc_read8(CC_STATUS));
    printf("vblk done\n");
    return 0;
}
