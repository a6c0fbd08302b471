/* A small virtio 1.x (modern) virtio-pci network driver, as a test of a virtio-net device
 * model. Virtio 1.2: 4.1 (PCI transport), 2.7 (split virtqueues), 5.1 (network device).
 *
 * It binds 1af4:1000 (transitional) or 1af4:1041, accepts VERSION_1, MAC, STATUS, MRG_RXBUF,
 * CSUM, CTRL_VQ and MQ, sets up every queue (two pairs when offered, then the control queue),
 * asks for two pairs (VQ_PAIRS_SET), posts 1024-byte receive buffers (a full-size frame
 * takes two: mergeable), and then, polling the used rings (no interrupts):
 *   sends a "hello" frame on pair 0 (broadcast, ethertype 0x88b5, payload pattern below),
 *   sends a UDP datagram 10.77.0.2:5555 -> 10.77.0.1:9000 on pair 1 with only the
 *     pseudo-header sum in its checksum and NEEDS_CSUM (checksum offload),
 *   sends a 1514-byte frame on pair 1 split over three buffers,
 *   then echoes ECHO_FRAMES received frames (from either receive queue, merged over
 *     num_buffers buffers) back on pair 0 with the ethertype 0x88b5 changed to 0x88b6.
 *
 * Payload byte j of the frames it makes is (j * 7 + seed) & 0xff, seed 1 for hello, 3 for
 * the 1514-byte frame; the UDP payload is 64 bytes "hvframe virtio-net checksum offload ..."
 * (see udp_payload).
 *
 * Output, one "vnet ..." line per step:
 *   vnet pci 00:SS.F id 1af4:DDDD
 *   vnet features HEX accepted HEX
 *   vnet mac XX:XX:XX:XX:XX:XX status S pairs N
 *   vnet queues N
 *   vnet mq ack A
 *   vnet tx hello len L | vnet tx udp len L | vnet tx big len L
 *   vnet rx q Q len L bufs B sum HEX     (per echoed frame)
 *   vnet done
 * A failure prints "vnet error ..." and powers off without "vnet done". */
#include "rt.h"

#define POLL_LOOPS      20000000u
#define VIRTIO_VENDOR   0x1af4

#define CAP_COMMON      1
#define CAP_NOTIFY      2
#define CAP_ISR         3
#define CAP_DEVICE      4

#define CC_DFSELECT     0x00
#define CC_DF           0x04
#define CC_GFSELECT     0x08
#define CC_GF           0x0c
#define CC_MSIX_CONFIG  0x10
#define CC_NUM_QUEUES   0x12
#define CC_STATUS       0x14
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
#define ST_FAILED       0x80

#define F_CSUM          0
#define F_MAC           5
#define F_MRG_RXBUF     15
#define F_STATUS        16
#define F_CTRL_VQ       17
#define F_MQ            22
#define F_VERSION_1     32
#define NO_VECTOR       0xffff

#define VRING_DESC_F_NEXT   1
#define VRING_DESC_F_WRITE  2

#define QSIZE           16
#define MAXQ            5
#define RXBUF           1024
#define ECHO_FRAMES     4
#define HDR_F_NEEDS_CSUM 1

static u32 pdev;

static int find_function(void)
{
    for (int d = pci_next(-1); d >= 0; d = pci_next(d)) {
        u32 id = pci_read32(d, 0);
        if ((id & 0xffff) == VIRTIO_VENDOR && ((id >> 16) == 0x1000 || (id >> 16) == 0x1041)) {
            pdev = d;
            return 1;
        }
    }
    return 0;
}

/* BARs as programmed (direct boot: hvframe placed them below 4 GiB or above; this guest
 * only uses ones below 4 GiB, paging being off). */
static u32 bar_addr[6];

static void setup_bars(void)
{
    for (u32 b = 0; b < 6; b++) {
        u32 v = pci_read32(pdev, 0x10 + 4 * b);
        if (v & 1) {
            bar_addr[b] = v & ~3u;
            continue;
        }
        int is64 = (v & 6) == 4;
        u32 hi = is64 ? pci_read32(pdev, 0x10 + 4 * (b + 1)) : 0;
        bar_addr[b] = hi ? 0 : v & ~0xfu;
        if (is64)
            b++;
    }
    pci_write16(pdev, 0x04, pci_read16(pdev, 0x04) | 0x7);
}

static u32 common, notify_base, notify_mult, devcfg;

static u8 cc_read8(u32 off) { return *(volatile u8 *)(common + off); }
static u16 cc_read16(u32 off) { return *(volatile u16 *)(common + off); }
static u32 cc_read32(u32 off) { return *(volatile u32 *)(common + off); }
static void cc_write8(u32 off, u8 v) { *(volatile u8 *)(common + off) = v; }
static void cc_write16(u32 off, u16 v) { *(volatile u16 *)(common + off) = v; }
static void cc_write32(u32 off, u32 v) { *(volatile u32 *)(common + off) = v; }
static void cc_write64(u32 off, u64 v) { cc_write32(off, (u32)v); cc_write32(off + 4, (u32)(v >> 32)); }

static int walk_caps(void)
{
    u32 p = pci_read8(pdev, 0x34) & 0xfc;
    for (int n = 0; p && n < 48; n++) {
        u8 id = pci_read8(pdev, p), next = pci_read8(pdev, p + 1) & 0xfc;
        if (id == 0x09) {
            u8 type = pci_read8(pdev, p + 3), bar = pci_read8(pdev, p + 4);
            u32 off = pci_read32(pdev, p + 8);
            if (bar < 6 && bar_addr[bar]) {
                u32 addr = bar_addr[bar] + off;
                if (type == CAP_NOTIFY && !notify_base) {
                    notify_base = addr;
                    notify_mult = pci_read32(pdev, p + 16);
                } else if (type == CAP_COMMON && !common) {
                    common = addr;
                } else if (type == CAP_DEVICE && !devcfg) {
                    devcfg = addr;
                }
            }
        }
        p = next;
    }
    return common && notify_base && devcfg;
}

/* ---- virtqueues ---- */
struct vdesc { u64 addr; u32 len; u16 flags, next; };
struct vavail { u16 flags, idx, ring[QSIZE], used_event; };
struct vused_elem { u32 id, len; };
struct vused { u16 flags, idx; struct vused_elem ring[QSIZE]; u16 avail_event; };

struct vq {
    struct vdesc desc[QSIZE] __attribute__((aligned(16)));
    struct vavail avail __attribute__((aligned(2)));
    struct vused used __attribute__((aligned(4)));
    u16 size, avail_idx, used_seen, notify_off, next_desc;
};
static struct vq vqs[MAXQ];
static int nqueues, pairs;

struct net_hdr { u8 flags, gso_type; u16 hdr_len, gso_size, csum_start, csum_offset, num_buffers; };

static void mb(void) { __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory"); }

static void publish(struct vq *q, u16 head)
{
    q->avail.ring[q->avail_idx % q->size] = head;
    mb();
    q->avail.idx = ++q->avail_idx;
    mb();
}

static void kick(int qi)
{
    mb();
    *(volatile u16 *)(notify_base + vqs[qi].notify_off * notify_mult) = (u16)qi;
}

/* The next used element of q, or 0 after POLL_LOOPS. */
static int next_used(struct vq *q, struct vused_elem *e, u32 loops)
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

static void fail(const char *what)
{
    printf("vnet error %s\n", what);
    cc_write8(CC_STATUS, cc_read8(CC_STATUS) | ST_FAILED);
    poweroff();
}

static void setup_queue(int qi)
{
    struct vq *q = &vqs[qi];
    cc_write16(CC_Q_SELECT, (u16)qi);
    u16 qmax = cc_read16(CC_Q_SIZE);
    if (qmax == 0)
        fail("queue not available");
    q->size = qmax < QSIZE ? qmax : QSIZE;
    cc_write16(CC_Q_SIZE, q->size);
    cc_write64(CC_Q_DESC, (u32)q->desc);
    cc_write64(CC_Q_DRIVER, (u32)&q->avail);
    cc_write64(CC_Q_DEVICE, (u32)&q->used);
    cc_write16(CC_Q_MSIX, NO_VECTOR);
    q->notify_off = cc_read16(CC_Q_NOTIFY_OFF);
    cc_write16(CC_Q_ENABLE, 1);
}

/* ---- transmit ---- */
static struct net_hdr txhdr[MAXQ] __attribute__((aligned(16)));
static u8 txbuf[2][2048] __attribute__((aligned(16)));

/* One frame on transmit queue qi, split over `pieces` buffers after its header; waits for it. */
static void send(int qi, const struct net_hdr *h, const u8 *frame, u32 len, u32 pieces)
{
    struct vq *q = &vqs[qi];
    txhdr[qi] = *h;
    q->desc[0] = (struct vdesc){ (u32)&txhdr[qi], sizeof(struct net_hdr), VRING_DESC_F_NEXT, 1 };
    u32 step = (len + pieces - 1) / pieces, d = 1;
    for (u32 off = 0; off < len; off += step, d++) {
        u32 n = len - off < step ? len - off : step;
        q->desc[d] = (struct vdesc){ (u32)(frame + off), n,
                                     off + n < len ? VRING_DESC_F_NEXT : 0, (u16)(d + 1) };
    }
    publish(q, 0);
    kick(qi);
    struct vused_elem e;
    if (!next_used(q, &e, POLL_LOOPS))
        fail("transmit timeout");
}

static u8 mac[6];
static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

static u32 eth(u8 *f, const u8 *dst, u16 type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, mac, 6);
    f[12] = (u8)(type >> 8);
    f[13] = (u8)type;
    return 14;
}

static u16 fold(u32 s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (u16)s;
}

static u32 sum16(const u8 *p, u32 n)
{
    u32 s = 0;
    for (u32 i = 0; i + 1 < n; i += 2)
        s += (u32)p[i] << 8 | p[i + 1];
    if (n & 1)
        s += (u32)p[n - 1] << 8;
    return s;
}

static const char udp_payload[] = "hvframe virtio-net checksum offload: the host completes this.";

static u32 udp_frame(u8 *f)
{
    static const u8 src[4] = { 10, 77, 0, 2 }, dst[4] = { 10, 77, 0, 1 };
    u32 plen = sizeof udp_payload, ulen = 8 + plen;
    u32 n = eth(f, bcast, 0x0800);
    u8 *ip = f + n, *udp = ip + 20;
    u8 iph[20] = { 0x45, 0, (u8)((20 + ulen) >> 8), (u8)(20 + ulen), 0, 1, 0, 0, 64, 17, 0, 0 };
    memcpy(iph + 12, src, 4);
    memcpy(iph + 16, dst, 4);
    u16 ic = (u16)~fold(sum16(iph, 20));
    iph[10] = (u8)(ic >> 8);
    iph[11] = (u8)ic;
    memcpy(ip, iph, 20);
    udp[0] = 5555 >> 8; udp[1] = 5555 & 0xff; udp[2] = 9000 >> 8; udp[3] = 9000 & 0xff;
    udp[4] = (u8)(ulen >> 8); udp[5] = (u8)ulen;
    /* The pseudo-header sum only: the device (or the host) finishes it (NEEDS_CSUM). */
    u8 pseudo[12];
    memcpy(pseudo, src, 4);
    memcpy(pseudo + 4, dst, 4);
    pseudo[8] = 0; pseudo[9] = 17; pseudo[10] = (u8)(ulen >> 8); pseudo[11] = (u8)ulen;
    u16 ps = fold(sum16(pseudo, 12));
    udp[6] = (u8)(ps >> 8);
    udp[7] = (u8)ps;
    memcpy(udp + 8, udp_payload, plen);
    return n + 20 + ulen;
}

/* ---- receive ---- */
static u8 rxbuf[2][QSIZE][RXBUF] __attribute__((aligned(16)));
static u8 frame[4096] __attribute__((aligned(16)));

static void post_rx(int pair, u16 head)
{
    struct vq *q = &vqs[2 * pair];
    q->desc[head] = (struct vdesc){ (u32)rxbuf[pair][head], RXBUF, VRING_DESC_F_WRITE, 0 };
    publish(q, head);
}

/* A whole received frame (merged over num_buffers buffers) from either receive queue into
 * `frame`; returns its length (0: nothing within the polling budget). */
static u32 receive(int *which, u32 *bufs)
{
    for (u32 round = 0; round < POLL_LOOPS / 1000; round++) {
        for (int p = 0; p < pairs; p++) {
            struct vq *q = &vqs[2 * p];
            struct vused_elem e;
            if (!next_used(q, &e, 1))
                continue;
            const u8 *b = rxbuf[p][e.id % QSIZE];
            const struct net_hdr *h = (const struct net_hdr *)b;
            u32 nbuf = h->num_buffers, len = e.len - sizeof(struct net_hdr);
            memcpy(frame, b + sizeof(struct net_hdr), len);
            post_rx(p, (u16)(e.id % QSIZE));
            for (u32 k = 1; k < nbuf; k++) {
                if (!next_used(q, &e, POLL_LOOPS))
                    fail("merged buffer missing");
                if (len + e.len <= sizeof frame)
                    memcpy(frame + len, rxbuf[p][e.id % QSIZE], e.len);
                len += e.len;
                post_rx(p, (u16)(e.id % QSIZE));
            }
            kick(2 * p);
            *which = 2 * p;
            *bufs = nbuf;
            return len;
        }
        cpu_relax();
    }
    return 0;
}

static u8 ctrl_cmd[4] __attribute__((aligned(4)));
static volatile u8 ctrl_ack;

int main(const struct hvm_start_info *si)
{
    (void)si;
    if (!find_function())
        fail("no virtio-net function");
    u32 id = pci_read32(pdev, 0);
    printf("vnet pci 00:%02x.%u id %04x:%04x\n", PCI_SLOT(pdev), PCI_FN(pdev), id & 0xffff,
           id >> 16);
    setup_bars();
    if (!walk_caps())
        fail("missing virtio capability");

    cc_write8(CC_STATUS, 0);
    for (u32 i = 0; cc_read8(CC_STATUS) != 0; i++)
        if (i > POLL_LOOPS)
            fail("reset did not complete");
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE);
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
    cc_write32(CC_DFSELECT, 0);
    u64 dev = cc_read32(CC_DF);
    cc_write32(CC_DFSELECT, 1);
    dev |= (u64)cc_read32(CC_DF) << 32;
    u64 want = 1ull << F_VERSION_1 | 1ull << F_MAC | 1ull << F_STATUS | 1ull << F_MRG_RXBUF
               | 1ull << F_CSUM | 1ull << F_CTRL_VQ | 1ull << F_MQ;
    u64 acc = dev & want;
    printf("vnet features %llx accepted %llx\n", dev, acc);
    if (!(acc & 1ull << F_VERSION_1) || !(acc & 1ull << F_MRG_RXBUF) || !(acc & 1ull << F_CTRL_VQ))
        fail("device lacks VERSION_1, MRG_RXBUF or CTRL_VQ");
    cc_write32(CC_GFSELECT, 0);
    cc_write32(CC_GF, (u32)acc);
    cc_write32(CC_GFSELECT, 1);
    cc_write32(CC_GF, (u32)(acc >> 32));
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    if (!(cc_read8(CC_STATUS) & ST_FEATURES_OK))
        fail("FEATURES_OK not accepted");
    cc_write16(CC_MSIX_CONFIG, NO_VECTOR);

    for (int i = 0; i < 6; i++)
        mac[i] = *(volatile u8 *)(devcfg + i);
    u16 link = *(volatile u16 *)(devcfg + 6);
    u16 maxpairs = (acc & 1ull << F_MQ) ? *(volatile u16 *)(devcfg + 8) : 1;
    pairs = maxpairs >= 2 ? 2 : 1;
    printf("vnet mac %02x:%02x:%02x:%02x:%02x:%02x status %u pairs %u\n", mac[0], mac[1],
           mac[2], mac[3], mac[4], mac[5], link, maxpairs);

    nqueues = cc_read16(CC_NUM_QUEUES);
    int ctrlq = (acc & 1ull << F_MQ) ? 2 * maxpairs : 2;
    if (ctrlq >= nqueues)
        fail("no control queue");
    /* Our queues: the pairs we use, and the control queue (kept at index 4 of vqs). */
    for (int i = 0; i < 2 * pairs; i++)
        setup_queue(i);
    struct vq *cq = &vqs[MAXQ - 1];
    cc_write16(CC_Q_SELECT, (u16)ctrlq);
    u16 cmax = cc_read16(CC_Q_SIZE);
    cq->size = cmax < QSIZE ? cmax : QSIZE;
    cc_write16(CC_Q_SIZE, cq->size);
    cc_write64(CC_Q_DESC, (u32)cq->desc);
    cc_write64(CC_Q_DRIVER, (u32)&cq->avail);
    cc_write64(CC_Q_DEVICE, (u32)&cq->used);
    cc_write16(CC_Q_MSIX, NO_VECTOR);
    cq->notify_off = cc_read16(CC_Q_NOTIFY_OFF);
    cc_write16(CC_Q_ENABLE, 1);
    printf("vnet queues %u\n", nqueues);

    for (int p = 0; p < pairs; p++)
        for (u16 h = 0; h < QSIZE && h < vqs[2 * p].size; h++)
            post_rx(p, h);
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);

    if (pairs == 2) {
        /* VIRTIO_NET_CTRL_MQ, VQ_PAIRS_SET 2 */
        ctrl_cmd[0] = 4; ctrl_cmd[1] = 0; ctrl_cmd[2] = 2; ctrl_cmd[3] = 0;
        ctrl_ack = 0xee;
        cq->desc[0] = (struct vdesc){ (u32)ctrl_cmd, 4, VRING_DESC_F_NEXT, 1 };
        cq->desc[1] = (struct vdesc){ (u32)&ctrl_ack, 1, VRING_DESC_F_WRITE, 0 };
        publish(cq, 0);
        mb();
        *(volatile u16 *)(notify_base + cq->notify_off * notify_mult) = (u16)ctrlq;
        struct vused_elem e;
        if (!next_used(cq, &e, POLL_LOOPS))
            fail("control queue timeout");
        printf("vnet mq ack %u\n", ctrl_ack);
    }
    for (int p = 0; p < pairs; p++)
        kick(2 * p);

    struct net_hdr plain = { 0, 0, 0, 0, 0, 0, 0 };
    u8 *f = txbuf[0];
    u32 n = eth(f, bcast, 0x88b5);
    for (u32 j = 0; j < 100; j++)
        f[n + j] = (u8)(j * 7 + 1);
    send(1, &plain, f, n + 100, 1);
    printf("vnet tx hello len %u\n", n + 100);

    int txq2 = pairs == 2 ? 3 : 1;
    n = udp_frame(txbuf[1]);
    struct net_hdr csum = { HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0 };
    send(txq2, &csum, txbuf[1], n, 2);
    printf("vnet tx udp len %u\n", n);

    f = txbuf[0];
    n = eth(f, bcast, 0x88b5);
    for (u32 j = 0; n + j < 1514; j++)
        f[n + j] = (u8)(j * 7 + 3);
    send(txq2, &plain, f, 1514, 3);
    printf("vnet tx big len %u\n", 1514);

    for (int k = 0; k < ECHO_FRAMES; k++) {
        int q;
        u32 bufs;
        u32 len = receive(&q, &bufs);
        if (!len)
            fail("nothing received");
        if (len > sizeof frame)
            fail("frame too long");
        printf("vnet rx q %u len %u bufs %u sum %x\n", q, len, bufs, sum_words(frame, len & ~3u));
        if (frame[12] == 0x88 && frame[13] == 0xb5)
            frame[13] = 0xb6;
        send(1, &plain, frame, len, 2);
    }
    printf("vnet done\n");
    return 0;
}
