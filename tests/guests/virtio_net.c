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
#define QSIZE           16
#define VQ_SIZE_MAX     QSIZE
#include "virtio_pci.h"

#define POLL_LOOPS      VP_POLL_LOOPS

#define F_CSUM          0
#define F_MAC           5
#define F_MRG_RXBUF     15
#define F_STATUS        16
#define F_CTRL_VQ       17
#define F_MQ            22

#define MAXQ            5
#define RXBUF           1024
#define ECHO_FRAMES     4
#define HDR_F_NEEDS_CSUM 1

/* ---- virtqueues ---- */
static struct vq vqs[MAXQ];
static int nqueues, pairs;

struct net_hdr { u8 flags, gso_type; u16 hdr_len, gso_size, csum_start, csum_offset, num_buffers; };

static void setup_queue(struct vq *q, int qi)
{
    if (!vp_queue_setup(q, (u16)qi, NO_VECTOR))
        vp_fail("queue not available");
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
    vq_publish(q, 0);
    vq_kick(q);
    struct vused_elem e;
    if (!vq_next_used(q, &e, POLL_LOOPS))
        vp_fail("transmit timeout");
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
    vq_publish(q, head);
}

/* A whole received frame (merged over num_buffers buffers) from either receive queue into
 * `frame`; returns its length (0: nothing within the polling budget). */
static u32 receive(int *which, u32 *bufs)
{
    for (u32 round = 0; round < POLL_LOOPS / 1000; round++) {
        for (int p = 0; p < pairs; p++) {
            struct vq *q = &vqs[2 * p];
            struct vused_elem e;
            if (!vq_next_used(q, &e, 1))
                continue;
            const u8 *b = rxbuf[p][e.id % QSIZE];
            const struct net_hdr *h = (const struct net_hdr *)b;
            u32 nbuf = h->num_buffers, len = e.len - sizeof(struct net_hdr);
            memcpy(frame, b + sizeof(struct net_hdr), len);
            post_rx(p, (u16)(e.id % QSIZE));
            for (u32 k = 1; k < nbuf; k++) {
                if (!vq_next_used(q, &e, POLL_LOOPS))
                    vp_fail("merged buffer missing");
                if (len + e.len <= sizeof frame)
                    memcpy(frame + len, rxbuf[p][e.id % QSIZE], e.len);
                len += e.len;
                post_rx(p, (u16)(e.id % QSIZE));
            }
            vq_kick(q);
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
    vp_tag = "vnet";
    vp_probe("virtio-net", 0x1000, 0x1041);
    vp_map_bars(0);
    if (!vp_walk_caps() || !vp_device)
        vp_fail("missing virtio capability");

    vp_begin();
    u64 dev = vp_device_features();
    u64 want = 1ull << F_VERSION_1 | 1ull << F_MAC | 1ull << F_STATUS | 1ull << F_MRG_RXBUF
               | 1ull << F_CSUM | 1ull << F_CTRL_VQ | 1ull << F_MQ;
    u64 acc = dev & want;
    printf("vnet features %llx accepted %llx\n", dev, acc);
    if (!(acc & 1ull << F_VERSION_1) || !(acc & 1ull << F_MRG_RXBUF) || !(acc & 1ull << F_CTRL_VQ))
        vp_fail("device lacks VERSION_1, MRG_RXBUF or CTRL_VQ");
    if (!vp_features_ok(acc))
        vp_fail("FEATURES_OK not accepted");
    cc_write16(CC_MSIX_CONFIG, NO_VECTOR);

    for (int i = 0; i < 6; i++)
        mac[i] = *(volatile u8 *)(vp_device + i);
    u16 link = *(volatile u16 *)(vp_device + 6);
    u16 maxpairs = (acc & 1ull << F_MQ) ? *(volatile u16 *)(vp_device + 8) : 1;
    pairs = maxpairs >= 2 ? 2 : 1;
    printf("vnet mac %02x:%02x:%02x:%02x:%02x:%02x status %u pairs %u\n", mac[0], mac[1],
           mac[2], mac[3], mac[4], mac[5], link, maxpairs);

    nqueues = cc_read16(CC_NUM_QUEUES);
    int ctrlq = (acc & 1ull << F_MQ) ? 2 * maxpairs : 2;
    if (ctrlq >= nqueues)
        vp_fail("no control queue");
    /* Our queues: the pairs we use, and the control queue (kept at index 4 of vqs). */
    for (int i = 0; i < 2 * pairs; i++)
        setup_queue(&vqs[i], i);
    struct vq *cq = &vqs[MAXQ - 1];
    setup_queue(cq, ctrlq);
    printf("vnet queues %u\n", nqueues);

    for (int p = 0; p < pairs; p++)
        for (u16 h = 0; h < QSIZE && h < vqs[2 * p].size; h++)
            post_rx(p, h);
    vp_driver_ok();

    if (pairs == 2) {
        /* VIRTIO_NET_CTRL_MQ, VQ_PAIRS_SET 2 */
        ctrl_cmd[0] = 4; ctrl_cmd[1] = 0; ctrl_cmd[2] = 2; ctrl_cmd[3] = 0;
        ctrl_ack = 0xee;
        cq->desc[0] = (struct vdesc){ (u32)ctrl_cmd, 4, VRING_DESC_F_NEXT, 1 };
        cq->desc[1] = (struct vdesc){ (u32)&ctrl_ack, 1, VRING_DESC_F_WRITE, 0 };
        vq_publish(cq, 0);
        vq_kick(cq);
        struct vused_elem e;
        if (!vq_next_used(cq, &e, POLL_LOOPS))
            vp_fail("control queue timeout");
        printf("vnet mq ack %u\n", ctrl_ack);
    }
    for (int p = 0; p < pairs; p++)
        vq_kick(&vqs[2 * p]);

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
            vp_fail("nothing received");
        if (len > sizeof frame)
            vp_fail("frame too long");
        printf("vnet rx q %u len %u bufs %u sum %x\n", q, len, bufs, sum_words(frame, len & ~3u));
        if (frame[12] == 0x88 && frame[13] == 0xb5)
            frame[13] = 0xb6;
        send(1, &plain, frame, len, 2);
    }
    printf("vnet done\n");
    return 0;
}
