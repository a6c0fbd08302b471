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
#include "rt.h"

#define VEC_QUEUE       0x40
#define POLL_LOOPS      20000000u

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

#define ST_ACKNOWLEDGE  1
#define ST_DRIVER       2
#define ST_DRIVER_OK    4
#define ST_FEATURES_OK  8
#define ST_NEEDS_RESET  0x40
#define ST_FAILED       0x80

#define F_BLK_RO        5
#define F_BLK_FLUSH     9
#define F_VERSION_1     32
#define NO_VECTOR       0xffff

#define T_IN            0
#define T_OUT           1
#define T_FLUSH         4
#define T_GET_ID        8
#define T_BOGUS         0x7f

#define VRING_DESC_F_NEXT   1
#define VRING_DESC_F_WRITE  2

#define QSIZE_MAX       16
#define WRITE_SECTORS   8
#define NBYTES          (WRITE_SECTORS * 512)

static u32 pdev;                /* our function, PCI_DEV(slot, fn) */

static int find_function(u16 vendor, u16 dev_a, u16 dev_b)
{
    for (int d = pci_next(-1); d >= 0; d = pci_next(d)) {
        u32 id = pci_read32(d, 0);
        if ((id & 0xffff) == vendor && ((id >> 16) == dev_a || (id >> 16) == dev_b)) {
            pdev = d;
            return 1;
        }
    }
    return 0;
}

/* Memory BARs of every function on bus 0 below 4 GiB, to find a hole for a BAR we move. */
static u32 lowest_mem_bar(void)
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

/* BAR b of our function as a 32-bit address; a 64-bit BAR above 4 GiB is moved below the
 * lowest memory BAR on the bus (and above 2 GiB), decoding off while it moves. */
static u32 bar_addr[6];

static void setup_bars(void)
{
    u16 cmd = pci_read16(pdev, 0x04);
    for (u32 b = 0; b < 6; b++) {
        u32 v = pci_read32(pdev, 0x10 + 4 * b);
        if (v & 1) {
            bar_addr[b] = v & ~3u;
            if (bar_addr[b])
                printf("vblk bar %u io %x\n", b, bar_addr[b]);
            continue;
        }
        int is64 = (v & 6) == 4;
#ifdef VBLK_FORCE_HIGH_BAR
        /* self-test of the move below: put 64-bit BARs at +4 GiB first (build with
         * defines={"VBLK_FORCE_HIGH_BAR": 1}) */
        if (is64 && (v & ~0xfu)) {
            pci_write16(pdev, 0x04, cmd & ~3);
            pci_write32(pdev, 0x10 + 4 * (b + 1), 1);
        }
#endif
        u32 hi = is64 ? pci_read32(pdev, 0x10 + 4 * (b + 1)) : 0;
        u32 lo = v & ~0xfu;
        if (hi) {
            pci_write16(pdev, 0x04, cmd & ~3);
            pci_write32(pdev, 0x10 + 4 * b, 0xffffffffu);
            pci_write32(pdev, 0x10 + 4 * (b + 1), 0xffffffffu);
            u32 size = ~(pci_read32(pdev, 0x10 + 4 * b) & ~0xfu) + 1;
            u32 target = (lowest_mem_bar() - size) & ~(size - 1);
            pci_write32(pdev, 0x10 + 4 * b, target);
            pci_write32(pdev, 0x10 + 4 * (b + 1), 0);
            pci_write16(pdev, 0x04, cmd);
            bar_addr[b] = pci_read32(pdev, 0x10 + 4 * b) & ~0xfu;
            printf("vblk bar %u addr %x moved from %x%08x size %x\n", b, bar_addr[b], hi, lo,
                   size);
        } else {
            bar_addr[b] = lo;
            if (lo)
                printf("vblk bar %u addr %x\n", b, lo);
        }
        if (is64)
            b++;
    }
    pci_write16(pdev, 0x04, pci_read16(pdev, 0x04) | 0x7);      /* I/O, memory, bus master */
}

/* ---- virtio-pci structures ---- */
static u32 common, notify_base, notify_mult, isr, devcfg;

static u8 cc_read8(u32 off) { return *(volatile u8 *)(common + off); }
static u16 cc_read16(u32 off) { return *(volatile u16 *)(common + off); }
static u32 cc_read32(u32 off) { return *(volatile u32 *)(common + off); }
static void cc_write8(u32 off, u8 v) { *(volatile u8 *)(common + off) = v; }
static void cc_write16(u32 off, u16 v) { *(volatile u16 *)(common + off) = v; }
static void cc_write32(u32 off, u32 v) { *(volatile u32 *)(common + off) = v; }
static void cc_write64(u32 off, u64 v) { cc_write32(off, (u32)v); cc_write32(off + 4, (u32)(v >> 32)); }

static int walk_caps(void)
{
    static const char *const names[] = { "?", "common", "notify", "isr", "device", "pci" };
    if (!(pci_read16(pdev, 0x06) & 0x10))
        return 0;
    u32 p = pci_read8(pdev, 0x34) & 0xfc;
    for (int n = 0; p && n < 48; n++) {
        u8 id = pci_read8(pdev, p), next = pci_read8(pdev, p + 1) & 0xfc;
        if (id == 0x09) {
            u8 type = pci_read8(pdev, p + 3), bar = pci_read8(pdev, p + 4);
            u32 off = pci_read32(pdev, p + 8), len = pci_read32(pdev, p + 12);
            if (type >= CAP_COMMON && type <= CAP_DEVICE && bar < 6 && bar_addr[bar]) {
                u32 addr = bar_addr[bar] + off;
                if (type == CAP_NOTIFY) {
                    notify_mult = pci_read32(pdev, p + 16);
                    if (!notify_base)
                        notify_base = addr;
                    printf("vblk cap notify bar %u off %x len %x mult %u\n", bar, off, len,
                           notify_mult);
                } else {
                    /* the first of each type is the one to use (4.1.4) */
                    u32 *slot = type == CAP_COMMON ? &common : type == CAP_ISR ? &isr : &devcfg;
                    if (!*slot)
                        *slot = addr;
                    printf("vblk cap %s bar %u off %x len %x\n", names[type], bar, off, len);
                }
            }
        }
        p = next;
    }
    return common && notify_base && isr && devcfg;
}

/* MSI-X table entry 0 -> LAPIC 0, vector VEC_QUEUE; MSI-X enabled, function unmasked. */
static int msix_setup(void)
{
    u32 p = pci_find_cap(pdev, 0x11);
    if (!p)
        return 0;
    u32 tbl = pci_read32(pdev, p + 4);
    msix_route(bar_addr[tbl & 7] + (tbl & ~7u), 0, VEC_QUEUE);
    pci_write16(pdev, p + 2, (pci_read16(pdev, p + 2) | 0x8000) & ~0x4000);
    return 1;
}

/* ---- the virtqueue ---- */
struct vdesc { u64 addr; u32 len; u16 flags, next; };
struct vavail { u16 flags, idx, ring[QSIZE_MAX], used_event; };
struct vused_elem { u32 id, len; };
struct vused { u16 flags, idx; struct vused_elem ring[QSIZE_MAX]; u16 avail_event; };

static struct vdesc desc[QSIZE_MAX] __attribute__((aligned(16)));
static struct vavail avail __attribute__((aligned(2)));
static struct vused used __attribute__((aligned(4)));
static u16 qsize, avail_idx, used_seen, notify_off;

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
    desc[d] = (struct vdesc){ (u32)&hdrs[r], sizeof hdrs[r], VRING_DESC_F_NEXT, d + 1 };
    for (int i = 0; i < nseg; i++) {
        d++;
        desc[d] = (struct vdesc){ (u32)segs[i].p, segs[i].len,
                                  VRING_DESC_F_NEXT | (device_writes ? VRING_DESC_F_WRITE : 0),
                                  d + 1 };
    }
    d++;
    desc[d] = (struct vdesc){ (u32)&status[r], 1, VRING_DESC_F_WRITE, 0 };
    avail.ring[avail_idx % qsize] = first;
    barrier();
    __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory");   /* ring before idx */
    avail.idx = ++avail_idx;
    barrier();
}

static void kick(void)
{
    __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory");   /* idx before the notify */
    *(volatile u16 *)(notify_base + notify_off * notify_mult) = 0;
}

/* Wait for `n` more used entries; returns the used length of the last one or -1. */
static u32 last_used_len;
static int wait_used(int n)
{
    for (u32 i = 0; i < POLL_LOOPS; i++) {
        barrier();
        u16 idx = *(volatile u16 *)&used.idx;
        if ((u16)(idx - used_seen) >= n) {
            barrier();
            last_used_len = used.ring[(u16)(used_seen + n - 1) % qsize].len;
            used_seen += n;
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
    kick();
    if (!wait_used(1)) {
        printf("vblk timeout type %u\n", type);
        last_used_len = 0;
        return 0xff;
    }
    return status[0];
}

static u8 pattern(u32 sector, u32 j) { return (u8)(sector * 31 + j * 7 + 0x5a); }

static void fail(const char *what)
{
    printf("vblk error %s\n", what);
    cc_write8(CC_STATUS, cc_read8(CC_STATUS) | ST_FAILED);
    poweroff();
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    if (!find_function(VIRTIO_VENDOR, 0x1001, 0x1042)) {
        printf("vblk error no virtio-blk function\n");
        return 0;
    }
    u32 id = pci_read32(pdev, 0);
    printf("vblk pci 00:%02x.%u id %04x:%04x\n", PCI_SLOT(pdev), PCI_FN(pdev), id & 0xffff,
           id >> 16);
    setup_bars();
    if (!walk_caps()) {
        printf("vblk error missing virtio capability\n");
        return 0;
    }

    /* 3.1.1: reset, ACKNOWLEDGE, DRIVER */
    cc_write8(CC_STATUS, 0);
    for (u32 i = 0; cc_read8(CC_STATUS) != 0; i++)
        if (i > POLL_LOOPS)
            fail("reset did not complete");
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE);
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);

    u64 dev_features;
    cc_write32(CC_DFSELECT, 0);
    dev_features = cc_read32(CC_DF);
    cc_write32(CC_DFSELECT, 1);
    dev_features |= (u64)cc_read32(CC_DF) << 32;
    u64 want = 1ull << F_VERSION_1 | 1ull << F_BLK_FLUSH | 1ull << F_BLK_RO;
    u64 accept = dev_features & want;
    printf("vblk features %llx accepted %llx\n", dev_features, accept);
    if (!(accept & 1ull << F_VERSION_1))
        fail("device does not offer VIRTIO_F_VERSION_1");
    cc_write32(CC_GFSELECT, 0);
    cc_write32(CC_GF, (u32)accept);
    cc_write32(CC_GFSELECT, 1);
    cc_write32(CC_GF, (u32)(accept >> 32));
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    int fok = (cc_read8(CC_STATUS) & ST_FEATURES_OK) != 0;
    printf("vblk features_ok %d\n", fok);
    if (!fok)
        fail("FEATURES_OK not accepted");

    /* interrupts: IDT, LAPIC, MSI-X entry 0 */
    irq_init("vblk error ");
    int have_msix = msix_setup();
    cc_write16(CC_MSIX_CONFIG, NO_VECTOR);

    /* queue 0 (4.1.5.1.3) */
    cc_write16(CC_Q_SELECT, 0);
    u16 qmax = cc_read16(CC_Q_SIZE);
    if (qmax == 0)
        fail("queue 0 not available");
    qsize = qmax < QSIZE_MAX ? qmax : QSIZE_MAX;
    while (qsize & (qsize - 1))         /* split rings: a power of two */
        qsize &= qsize - 1;
    cc_write16(CC_Q_SIZE, qsize);
    cc_write64(CC_Q_DESC, (u32)desc);
    cc_write64(CC_Q_DRIVER, (u32)&avail);
    cc_write64(CC_Q_DEVICE, (u32)&used);
    u16 vec = NO_VECTOR;
    if (have_msix) {
        cc_write16(CC_Q_MSIX, 0);
        vec = cc_read16(CC_Q_MSIX);
    }
    notify_off = cc_read16(CC_Q_NOTIFY_OFF);
    cc_write16(CC_Q_ENABLE, 1);
    printf("vblk queue size %u (max %u) msix vector %u num_queues %u\n", qsize, qmax,
           vec == NO_VECTOR ? 0xffffu : vec, cc_read16(CC_NUM_QUEUES));

    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    printf("vblk status %x\n", cc_read8(CC_STATUS));
    irq_enable();

    /* device configuration: capacity, read consistently across config_generation */
    u32 cap_lo, cap_hi;
    u8 gen;
    do {
        gen = cc_read8(CC_CFG_GEN);
        cap_lo = *(volatile u32 *)devcfg;
        cap_hi = *(volatile u32 *)(devcfg + 4);
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
    kick();
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
