/* virtio-net's data path, run on the queue workers with the GIL released.
 *
 * vnet_tx_cycle serves a transmit queue: each chain (a virtio_net_hdr, then the frame) goes
 * to the backend descriptor of its queue pair. vnet_rx_cycle serves a receive queue: frames
 * read from that descriptor go into the driver's receive buffers, merged over several
 * buffers with MRG_RXBUF. Both come back to Python only for what Python must decide: an
 * invalid ring (NEEDS_RESET), an interrupt the irqfd gate cannot send, a thread waiting for
 * the queue. How each returned, and what its queue waits for next, is in `wait`:
 * virtio_net.py turns that into the descriptors the worker polls (VirtioDevice.queue_waits),
 * so a receive queue with no buffers never wakes for input it cannot place, and a transmit
 * queue whose backend is full waits for room instead of spinning.
 *
 * Backends frame frames two ways (backend.py): VNET_HDR (a tap: one read or write is one
 * frame after a 12-byte virtio_net_hdr) and BE32 (a byte stream: a 4-byte big-endian length,
 * then the frame). Stream frames arrive in pieces: a reassembly buffer per descriptor,
 * bounded by the backend's max_frame, holds them; a frame announced longer than that is
 * skipped whole and counted. A partial stream write keeps the frame's rest in the
 * descriptor's transmit buffer, sent before anything else.
 *
 * Every guest value is checked: chains are walked by the core (RAM, loops, indirect tables);
 * headers are copied once and validated (offloads not negotiated, checksum offsets outside
 * the frame, runts, oversize frames are dropped and counted). Nothing is ever truncated: a
 * frame either fits the buffers it is given or is dropped whole.
 *
 * struct vnet_hdr and the VNET_* numbers are generated from hvframe_virtio_net.layout.
 */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/uio.h>

HV_PLUGIN_API(vnet_bind)

enum { VNET_FRAMING_VNET_HDR = 1, VNET_FRAMING_BE32 = 2 };
/* What a queue waits for after a cycle (virtio_net.py polls accordingly). */
enum { VNET_WAIT_KICK = 0,          /* its doorbell */
       VNET_WAIT_INPUT = 1,         /* receive: backend input (buffers are there, or unknown) */
       VNET_WAIT_RING = 2,          /* receive: buffers (notifications on), input is waiting */
       VNET_WAIT_GONE = 3,          /* the backend's far side went away */
       VNET_WAIT_OUTPUT = 4 };      /* transmit: room on the backend descriptor */

#define VNET_RX_MAX_CHAINS 256      /* receive buffers one merged frame may take */
#define VNET_RX_MAX_IOV 1024
#define VNET_TX_MAX_IOV 1024        /* Linux's IOV_MAX */
#define VNET_TX_COPY_MAX 4096       /* frames up to this go out copied, in one write() (past
                                     * 4-8 KiB the copy costs more than writev's path) */
#define VNET_NOTIFY_EVERY 16        /* frames between interrupt checks in a long batch: a
                                     * publish's worth, so the interrupt a driver asked for
                                     * at some used index goes out with the publish that
                                     * passes it (every 64, a transmit queue whose driver
                                     * waits for 3/4 of the ring ran dry before the late
                                     * interrupt let it refill: stream tx 0.74-0.82 of raw
                                     * tap, 0.87-0.92 with 16, 2026-12-05) */
#define VNET_RX_PUBLISH 16          /* receive chains placed before used.idx is published
                                     * (sooner when input runs out or a cycle ends, and
                                     * after half a ring shorter than 32: publish_at) */
#define VNET_TX_PUBLISH 16          /* transmit chains sent before used.idx is published */
#define VNET_MAC_TABLE 64
#define VNET_PREFETCH_MAX 1536      /* bytes of the next buffer brought into the cache */
#define VNET_PREFETCH_MIN 512       /* ... after a frame at least this long */
#define VNET_MAX_DOORBELLS 6        /* a queue's doorbells a native sleep watches */
#define VNET_POLL_GROW_START 4000   /* ns: the first poll window after none (QEMU's) */

/* A worker's poll for the driver's next batch, adapted as QEMU's iothreads and KVM's halt
 * polling adapt theirs: a wait longer than the longest window (poll_ns) halves the window (the
 * poll was CPU spent for nothing, and kept the core from a thread woken on it: the vCPU the
 * cycle just interrupted, in the datapath benchmark 30 us of a 500 us round), a shorter wait
 * the window did not cover doubles it, up to poll_ns. Traffic that keeps coming polls at the
 * full window; a queue used in bursts far apart stops polling. */
struct vnet_poll {
    uint64_t window;                /* ns, 0 at first: it grows when waits are short */
    uint64_t since;                 /* when the queue went idle (CLOCK_MONOTONIC ns), or 0 */
};

/* One backend descriptor, shared by the queue pairs it serves. */
struct vnet_port {
    int fd;
    int framing;
    uint32_t max_frame;
    int gone;                       /* EOF or a fatal error: the far side went away */
    int hup;                        /* hang-up seen with input still to read */
    int moved;                      /* a reconnection replaced it (Python has the new one) */
    /* BE32 receive: bytes [rx_start, rx_end) of rx_buf (rx_cap bytes) are unparsed */
    uint8_t *rx_buf;
    uint32_t rx_cap, rx_start, rx_end;
    uint32_t rx_skip;               /* bytes of an oversize frame still to discard */
    /* BE32 transmit: tx_buf[tx_off, tx_len) is the rest of a frame partly written */
    uint8_t *tx_buf;
    uint32_t tx_cap, tx_off, tx_len;
    int tx_lock;                    /* queue pairs sharing the descriptor write in turn */
    uint64_t rx_oversize, rx_runt, rx_truncated, tx_partial;
};

/* The receive filter (CTRL_RX, CTRL_MAC): Python writes it, receive queues read it. */
struct vnet_filter {
    uint8_t mac[6];
    uint8_t promisc, allmulti, alluni;
    uint32_t n_uni, n_multi;
    uint8_t uni[64][6];
    uint8_t multi[64][6];
};

/* What the driver negotiated, as both directions need it. */
struct vnet_feat {
    uint32_t hdr_len;               /* 12, or 10 for a legacy driver without MRG_RXBUF */
    uint8_t mrg_rxbuf;
    uint8_t csum, host_tso4, host_tso6, host_ecn;           /* guest -> backend */
    uint8_t guest_csum, guest_tso4, guest_tso6, guest_ecn;  /* backend -> guest (acked) */
    uint32_t rx_max_plain;          /* longest unsegmented frame for the driver (MTU) */
};

struct vnet_rxq {
    struct vnet_port *port;
    struct vnet_filter *filter;
    struct vnet_feat *feat;
    uint8_t *bounce;                /* VNET_HDR reads: header at 0, frame at 12 */
    uint32_t bounce_cap;
    int wait;
    uint32_t served;                /* frames placed in the last cycle */
    struct vnet_poll poll;          /* for buffers, after a cycle that used up the ring */
    uint16_t kick_at;               /* avail_event as this cycle last set it */
    /* the frame in hand (waiting for buffers): a virtio header and the frame's bytes */
    int have_frame;
    uint8_t hdr[12];
    const uint8_t *frame;
    uint32_t frame_len;
    uint64_t frames, bytes, drop_filtered, drop_bad, drop_too_big, bad_buffers;
    /* chains placed (or given back empty) but not yet in the used ring: heads[0, pend) */
    uint32_t pend;
    /* scratch of one placement */
    struct hv_chain ch;
    struct iovec iov[VNET_RX_MAX_IOV];
    uint16_t heads[VNET_RX_PUBLISH + VNET_RX_MAX_CHAINS];
    uint32_t lens[VNET_RX_PUBLISH + VNET_RX_MAX_CHAINS];
};

struct vnet_txq {
    struct vnet_port *port;
    struct vnet_feat *feat;
    uint8_t *bounce;                /* a frame copied whole: a small one (one write()), or
                                     * a chain with too many pieces for one writev */
    uint32_t bounce_cap;
    int wait;
    uint32_t served;
    uint32_t repoll;
    struct vnet_poll poll;          /* for the driver's next batch */
    uint64_t frames, bytes, drop_bad, drop_oversize, drop_error, drop_gone;
    /* chains sent but not yet in the used ring: heads[0, pend) (as struct vnet_rxq's) */
    uint32_t pend;
    uint16_t heads[VNET_TX_PUBLISH];
    uint32_t lens[VNET_TX_PUBLISH];
    struct hv_chain ch;
    struct iovec iov[VNET_TX_MAX_IOV + 1];
};

/* ---- helpers --------------------------------------------------------------------------- */

static void port_lock(struct vnet_port *p)
{
    while (__atomic_exchange_n(&p->tx_lock, 1, __ATOMIC_ACQUIRE))
        sched_yield();
}

static void port_unlock(struct vnet_port *p)
{
    __atomic_store_n(&p->tx_lock, 0, __ATOMIC_RELEASE);
}

static int fatal_errno(int e)
{
    /* The descriptor no longer leads anywhere (tap deleted, peer closed). */
    return e == EBADFD || e == EPIPE || e == ECONNRESET || e == ENOTCONN || e == ENODEV
           || e == ENXIO || e == EBADF;
}

/* The queue goes idle: the window to poll for (the caller polls if it is not 0). */
static uint64_t poll_start(struct vnet_poll *pl, uint64_t max_ns)
{
    if (pl->window > max_ns)
        pl->window = max_ns;
    pl->since = hv_now_ns();
    return pl->window;
}

/* Work came back: the poll found it (no change), or a kick after a sleep did (adapt). */
static void poll_found(struct vnet_poll *pl, uint64_t max_ns, int polled)
{
    if (!pl->since)
        return;
    uint64_t waited = hv_now_ns() - pl->since;
    pl->since = 0;
    if (polled || waited <= pl->window)
        return;
    if (waited > max_ns)
        pl->window /= 2;
    else if (pl->window < max_ns) {
        pl->window = pl->window ? pl->window * 2 : VNET_POLL_GROW_START;
        if (pl->window > max_ns)
            pl->window = max_ns;
    }
}

/* Copy n bytes from a chain's readable buffers, starting `skip` bytes in, to dst. */
static uint32_t gather(const struct hv_chain *ch, uint64_t skip, uint8_t *dst, uint32_t n)
{
    uint32_t got = 0;
    for (int i = 0; i < ch->nr && got < n; i++) {
        size_t len = ch->iov[i].iov_len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        size_t k = len - skip;
        if (k > n - got)
            k = n - got;
        memcpy(dst + got, (uint8_t *)ch->iov[i].iov_base + skip, k);
        got += (uint32_t)k;
        skip = 0;
    }
    return got;
}

/* The Internet checksum of [start, len) stored at start+offset (NEEDS_CSUM done by us):
 * 0 or -1 when the offsets do not lie in the frame. */
static int complete_csum(uint8_t *frame, uint32_t len, uint32_t start, uint32_t offset)
{
    if (start >= len || offset > len - start || len - start - offset < 2)
        return -1;
    uint64_t sum = 0;
    uint32_t i = start;
    for (; i + 1 < len; i += 2)
        sum += (uint32_t)frame[i] << 8 | frame[i + 1];
    if (i < len)
        sum += (uint32_t)frame[i] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    uint16_t c = (uint16_t)~sum;
    if (c == 0)
        c = 0xFFFF;                 /* 0 means "no checksum" to UDP; 0xFFFF is the same sum */
    frame[start + offset] = (uint8_t)(c >> 8);
    frame[start + offset + 1] = (uint8_t)c;
    return 0;
}

/* The offloads a header asks for, against what was negotiated for that direction. */
static int hdr_allowed(const struct vnet_hdr *h, int csum, int tso4, int tso6, int ecn)
{
    if ((h->flags & VNET_HDR_F_NEEDS_CSUM) && !csum)
        return 0;
    uint8_t gso = h->gso_type & ~VNET_GSO_ECN;
    if ((h->gso_type & VNET_GSO_ECN) && !ecn)
        return 0;
    if (gso == VNET_GSO_NONE)
        return !(h->gso_type & VNET_GSO_ECN);
    if (gso == VNET_GSO_TCPV4)
        return tso4 && h->gso_size != 0;
    if (gso == VNET_GSO_TCPV6)
        return tso6 && h->gso_size != 0;
    return 0;                       /* UFO and anything else: never offered */
}

/* ---- receive --------------------------------------------------------------------------- */

enum { FETCH_FRAME, FETCH_AGAIN, FETCH_GONE, FETCH_DROPPED };

static int filter_pass(const struct vnet_filter *f, const uint8_t *dst)
{
    if (f->promisc)
        return 1;
    if (dst[0] & 1) {
        if (memcmp(dst, "\xff\xff\xff\xff\xff\xff", 6) == 0 || f->allmulti)
            return 1;
        uint32_t n = f->n_multi < VNET_MAC_TABLE ? f->n_multi : VNET_MAC_TABLE;
        for (uint32_t i = 0; i < n; i++)
            if (memcmp(dst, f->multi[i], 6) == 0)
                return 1;
        return 0;
    }
    if (memcmp(dst, f->mac, 6) == 0 || f->alluni)
        return 1;
    uint32_t n = f->n_uni < VNET_MAC_TABLE ? f->n_uni : VNET_MAC_TABLE;
    for (uint32_t i = 0; i < n; i++)
        if (memcmp(dst, f->uni[i], 6) == 0)
            return 1;
    return 0;
}

/* Read one frame from a tap into the bounce buffer. */
static int fetch_vnet_hdr(struct vnet_rxq *rq)
{
    struct vnet_port *p = rq->port;
    if (p->gone)
        return FETCH_GONE;
    ssize_t n;
    do
        n = read(p->fd, rq->bounce, rq->bounce_cap);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return FETCH_AGAIN;
        if (errno == EFAULT || errno == EINVAL || errno == EMSGSIZE) {
            p->rx_oversize++;       /* longer than our buffer: the kernel dropped it */
            return FETCH_DROPPED;
        }
        p->gone = 1;
        return FETCH_GONE;
    }
    if (n == 0) {
        p->gone = 1;
        return FETCH_GONE;
    }
    if ((size_t)n < sizeof(struct vnet_hdr) + VNET_ETH_HLEN) {
        p->rx_runt++;
        return FETCH_DROPPED;
    }
    uint32_t len = (uint32_t)n - (uint32_t)sizeof(struct vnet_hdr);
    if (len > p->max_frame) {
        p->rx_oversize++;
        return FETCH_DROPPED;
    }
    memcpy(rq->hdr, rq->bounce, sizeof(struct vnet_hdr));
    rq->frame = rq->bounce + sizeof(struct vnet_hdr);
    rq->frame_len = len;
    return FETCH_FRAME;
}

/* Parse (reading more as needed) one frame from a byte stream. */
static int fetch_be32(struct vnet_rxq *rq)
{
    struct vnet_port *p = rq->port;
    for (;;) {
        uint32_t avail = p->rx_end - p->rx_start;
        if (p->rx_skip) {
            uint32_t k = avail < p->rx_skip ? avail : p->rx_skip;
            p->rx_start += k;
            p->rx_skip -= k;
            avail -= k;
            if (!p->rx_skip)
                continue;           /* skipped whole: what follows may be a frame */
        } else if (avail >= VNET_STREAM_LEN_SIZE) {
            const uint8_t *b = p->rx_buf + p->rx_start;
            uint32_t len = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
            if (len > p->max_frame) {
                p->rx_oversize++;   /* skipped whole: the stream stays in step */
                p->rx_start += VNET_STREAM_LEN_SIZE;
                p->rx_skip = len;
                continue;
            }
            if (avail - VNET_STREAM_LEN_SIZE >= len) {
                p->rx_start += VNET_STREAM_LEN_SIZE + len;
                if (len < VNET_ETH_HLEN) {
                    p->rx_runt++;
                    return FETCH_DROPPED;
                }
                memset(rq->hdr, 0, sizeof(rq->hdr));
                rq->frame = b + VNET_STREAM_LEN_SIZE;
                rq->frame_len = len;
                return FETCH_FRAME;
            }
        }
        if (p->gone) {
            /* No more input will come (the far side went, or the link is down and what was
             * read before is delivered): a frame's beginning without its end is lost. */
            if (p->rx_end > p->rx_start && !p->rx_skip)
                p->rx_truncated++;
            p->rx_start = p->rx_end = p->rx_skip = 0;
            return FETCH_GONE;
        }
        /* Need more: make room at the end (the unparsed rest moves to the front). */
        if (p->rx_start) {
            memmove(p->rx_buf, p->rx_buf + p->rx_start, p->rx_end - p->rx_start);
            p->rx_end -= p->rx_start;
            p->rx_start = 0;
        }
        if (p->rx_end == p->rx_cap)
            return FETCH_AGAIN;     /* cannot happen with rx_cap > max_frame + 4 */
        ssize_t n;
        do
            n = read(p->fd, p->rx_buf + p->rx_end, p->rx_cap - p->rx_end);
        while (n < 0 && errno == EINTR);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return FETCH_AGAIN;
        if (n <= 0) {
            /* EOF or an error: what is left of a frame is lost, and counted. */
            if (p->rx_end > p->rx_start || p->rx_skip)
                p->rx_truncated++;
            p->rx_start = p->rx_end = p->rx_skip = 0;
            p->gone = 1;
            return FETCH_GONE;
        }
        p->rx_end += (uint32_t)n;
    }
}

/* A stream's far side hung up while the frame in hand waits for buffers: read what it sent
 * before going, as far as the stream buffer's free end holds it (the frame in hand lies in
 * the buffer, so nothing moves), to be delivered when the driver posts buffers. What does
 * not fit goes with the connection when the link goes down. */
static void stream_read_rest(struct vnet_port *p)
{
    if (p->framing != VNET_FRAMING_BE32)
        return;
    while (p->rx_end < p->rx_cap) {
        ssize_t n = read(p->fd, p->rx_buf + p->rx_end, p->rx_cap - p->rx_end);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        p->rx_end += (uint32_t)n;
    }
}

/* A fetched frame: the receive filter and the MTU the driver was promised; 1 to deliver,
 * 0 dropped (counted). */
static int rx_accept(struct vnet_rxq *rq, const uint8_t *dst)
{
    const struct vnet_feat *f = rq->feat;
    const struct vnet_hdr *h = (const struct vnet_hdr *)rq->hdr;
    if (!filter_pass(rq->filter, dst)) {
        rq->drop_filtered++;
        return 0;
    }
    if ((h->gso_type & ~VNET_GSO_ECN) == VNET_GSO_NONE && rq->frame_len > f->rx_max_plain) {
        rq->drop_too_big++;         /* longer than the MTU the driver was promised */
        return 0;
    }
    return 1;
}

/* The frame in hand's header against the receive offloads the driver has now: checked
 * before every placement, not once at fetch, because a frame waiting for buffers may outlive
 * a CTRL_GUEST_OFFLOADS_SET that turned its offloads off (5.1.6.5.6.1). Idempotent; 1 to
 * place, 0 dropped (counted). */
static int rx_offloads(struct vnet_rxq *rq)
{
    const struct vnet_feat *f = rq->feat;
    struct vnet_hdr *h = (struct vnet_hdr *)rq->hdr;
    if ((h->flags & VNET_HDR_F_NEEDS_CSUM) && !f->guest_csum && h->gso_type == VNET_GSO_NONE) {
        /* The backend still has offloads the driver turned off: finish the checksum. */
        if (complete_csum((uint8_t *)rq->frame, rq->frame_len, h->csum_start, h->csum_offset)) {
            rq->drop_bad++;
            return 0;
        }
        h->flags &= ~VNET_HDR_F_NEEDS_CSUM;
    }
    if (!hdr_allowed(h, f->guest_csum, f->guest_tso4, f->guest_tso6, f->guest_ecn)) {
        rq->drop_bad++;
        return 0;
    }
    if (!f->guest_csum)
        h->flags = 0;               /* no DATA_VALID either (5.1.6.4.1) */
    h->flags &= VNET_HDR_F_NEEDS_CSUM | VNET_HDR_F_DATA_VALID;
    if ((h->flags & VNET_HDR_F_NEEDS_CSUM)
        && (h->csum_start >= rq->frame_len
            || (uint32_t)h->csum_offset + 2 > rq->frame_len - h->csum_start)) {
        rq->drop_bad++;
        return 0;
    }
    return 1;
}

enum { PLACE_DONE, PLACE_DROPPED, PLACE_RING_EMPTY, PLACE_INVALID };

/* How many consumed chains a queue holds back before publishing them: `batch`, or half a
 * ring shorter than two batches (so that the chains looked at ahead of the held ones never
 * run past the ring's end). */
static uint32_t publish_at(const struct hv_vq *q, uint32_t batch)
{
    uint32_t half = q->size / 2 ? q->size / 2 : 1;
    return half < batch ? half : batch;
}

/* The used ring gets what was placed: one used.idx store (and one cache line handed to the
 * driver's CPU) for up to VNET_RX_PUBLISH frames, not one each. Called before anything that
 * reads used_idx or last_avail_idx (interrupt checks, notifications, the end of a cycle). */
static void rx_publish(struct vnet_rxq *rq, struct hv_vq *q)
{
    hv->vq_push_n(q, rq->heads, rq->lens, rq->pend);
    rq->pend = 0;
}

/* Put the frame in hand into receive buffers: PLACE_DONE (placed; its chains reach the used
 * ring with the next rx_publish), PLACE_DROPPED (it can never fit: counted), PLACE_RING_EMPTY
 * (not enough buffers yet: keep it) or PLACE_INVALID. */
static int rx_place(struct vnet_rxq *rq, struct hv_vq *q)
{
    const struct vnet_feat *f = rq->feat;
    uint32_t hdr_len = f->hdr_len;
    uint64_t need = (uint64_t)hdr_len + rq->frame_len;
    uint64_t have = 0;
    uint32_t nchains = 0, niov = 0;

    while (have < need) {
        if (nchains == VNET_RX_MAX_CHAINS || (!f->mrg_rxbuf && nchains == 1)
            || nchains >= q->size) {
            rq->drop_too_big++;     /* the driver's buffers cannot hold it */
            return PLACE_DROPPED;
        }
        int rc = hv->vq_peek_at(q, rq->pend + nchains, &rq->ch);
        if (rc == HV_VQ_STOP_EMPTY)
            return PLACE_RING_EMPTY;
        if (rc != HV_VQ_CHAIN) {
            q->stop = rc == HV_VQ_STOP_UNSUPPORTED ? HV_VQ_STOP_UNSUPPORTED : HV_VQ_STOP_INVALID;
            return PLACE_INVALID;
        }
        struct hv_chain *ch = &rq->ch;
        if (nchains == 0 && ch->wlen < hdr_len) {
            /* No room even for the header: give the buffer back empty (the driver's
             * mistake, counted); the frame waits for the next one. */
            rq->heads[rq->pend] = ch->head;
            rq->lens[rq->pend] = 0;
            if (++rq->pend >= publish_at(q, VNET_RX_PUBLISH))
                rx_publish(rq, q);
            rq->bad_buffers++;
            continue;
        }
        if (ch->n - ch->nr > VNET_RX_MAX_IOV - (int)niov) {
            rq->drop_too_big++;
            return PLACE_DROPPED;
        }
        uint64_t room = need - have;
        uint32_t take = ch->wlen < room ? (uint32_t)ch->wlen : (uint32_t)room;
        memcpy(rq->iov + niov, ch->iov + ch->nr, sizeof(struct iovec) * (size_t)(ch->n - ch->nr));
        niov += (uint32_t)(ch->n - ch->nr);
        rq->heads[rq->pend + nchains] = ch->head;
        rq->lens[rq->pend + nchains] = take;
        nchains++;
        have += ch->wlen;
    }
    /* Header (num_buffers now known), then the frame, across the saved buffers. */
    struct vnet_hdr *h = (struct vnet_hdr *)rq->hdr;
    h->num_buffers = (uint16_t)nchains;
    const uint8_t *src[2] = { rq->hdr, rq->frame };
    uint32_t left[2] = { hdr_len, rq->frame_len };
    int s = 0;
    for (uint32_t i = 0; i < niov && s < 2; i++) {
        uint8_t *dst = rq->iov[i].iov_base;
        size_t room = rq->iov[i].iov_len;
        while (room && s < 2) {
            size_t k = left[s] < room ? left[s] : room;
            memcpy(dst, src[s], k);
            dst += k;
            room -= k;
            src[s] += k;
            left[s] -= (uint32_t)k;
            if (!left[s])
                s++;
        }
    }
    rq->pend += nchains;
    if (rq->pend >= publish_at(q, VNET_RX_PUBLISH))
        rx_publish(rq, q);
    rq->frames++;
    rq->bytes += rq->frame_len;
    return PLACE_DONE;
}

/* avail_event, after the used ring (virtio 1.2, 2.7.10): the driver kicks once avail.idx
 * passes it. */
static uint16_t *avail_event(const struct hv_vq *q)
{
    return (uint16_t *)(q->used + HV_VRING_USED_RING_OFF
                        + sizeof(struct hv_vring_used_elem) * q->size);
}

/* Send the interrupt for what was pushed if the driver wants one: 0, or 1 when the gate is
 * shut and Python must send it (HV_VQ_CYCLE_NOTIFY). */
static int owe_interrupt(struct hv_vq *q, const struct hv_irq_gate *irq)
{
    return hv->vq_needs_notification(q) && !hv->irq_gate_fire(irq);
}

/* A receive queue's used ring brought up to date, then its interrupt (as owe_interrupt). */
static int rx_owe_interrupt(struct vnet_rxq *rq, struct hv_vq *q, const struct hv_irq_gate *irq)
{
    rx_publish(rq, q);
    return owe_interrupt(q, irq);
}

/* Bring the next receive buffer into the cache, for writing, while the next read() runs:
 * copying a frame into a cold buffer of the driver's took 0.2-0.4 us of the 1.8-2.2 us a
 * 1514-byte frame cost here, 0.07 us with this (2026-12-02). The chain is only looked at
 * (rx_place walks it again, as the driver may have changed it meanwhile). */
static void rx_prefetch_next(struct vnet_rxq *rq, struct hv_vq *q)
{
    if (rq->frame_len < VNET_PREFETCH_MIN)
        return;                     /* small frames (and the next is likely alike): a few
                                     * lines, cheaper to miss than the extra walk */
    if (hv->vq_peek_at(q, rq->pend, &rq->ch) != HV_VQ_CHAIN || rq->ch.n == rq->ch.nr)
        return;
    const uint8_t *b = rq->ch.iov[rq->ch.nr].iov_base;
    size_t len = rq->ch.iov[rq->ch.nr].iov_len;
    if (len > VNET_PREFETCH_MAX)
        len = VNET_PREFETCH_MAX;
    for (size_t off = 0; off < len; off += 64)
        __builtin_prefetch(b + off, 1, 3);
}

int vnet_rx_cycle(struct hv_vq *q, struct vnet_rxq *rq, const struct hv_irq_gate *irq)
{
    struct vnet_port *p = rq->port;
    rq->served = 0;
    rq->pend = 0;                   /* every return below published what it placed */
    q->stop = hv->vq_begin(q);
    if (q->stop)
        return HV_VQ_CYCLE_PYTHON;
    if (!p || p->fd < 0) {
        rq->wait = VNET_WAIT_GONE;
        return HV_VQ_CYCLE_IDLE;
    }
    hv->vq_set_notifications(q, 0);
    uint32_t since_check = 0;
    for (;;) {
        if (q->yield_req) {
            rx_publish(rq, q);
            hv->vq_set_notifications(q, 1);
            rq->wait = VNET_WAIT_INPUT;
            return owe_interrupt(q, irq) ? HV_VQ_CYCLE_NOTIFY : HV_VQ_CYCLE_YIELD;
        }
        if (!rq->have_frame) {
            /* Into a buffer of ours first, then into the driver's: the frame's length decides
             * how many of its buffers it takes (reading straight into the first one, spilling
             * into ours, measured slower here twice: 256 frames of 1514 bytes placed in
             * 590-850 us that way against 500-740 us through ours, 2026-12-02). */
            int got = p->framing == VNET_FRAMING_BE32 ? fetch_be32(rq) : fetch_vnet_hdr(rq);
            if (got == FETCH_DROPPED) {
                /* Input dropped as fast as it comes must not keep placed frames from the
                 * driver (nothing else publishes until a frame is placed or input ends). */
                rx_publish(rq, q);
                continue;
            }
            if (got != FETCH_FRAME) {
                rq->wait = got == FETCH_GONE ? VNET_WAIT_GONE : VNET_WAIT_INPUT;
                break;
            }
            if (!rx_accept(rq, rq->frame)) {
                rx_publish(rq, q);          /* as for FETCH_DROPPED */
                continue;
            }
            rq->have_frame = 1;
        }
        if (!rx_offloads(rq)) {
            rq->have_frame = 0;
            rx_publish(rq, q);              /* as for FETCH_DROPPED */
            continue;
        }
        int rc = rx_place(rq, q);
        if (rc == PLACE_INVALID) {
            rx_owe_interrupt(rq, q, irq);   /* the used entries so far go with the reset */
            return HV_VQ_CYCLE_PYTHON;
        }
        if (rc == PLACE_RING_EMPTY) {
            /* (A merged frame needing more of a short ring than the held-back chains leave
             * ends here too: notifications are off after a placement, so it looks again.) */
            rx_publish(rq, q);
            if (!q->notifications || (q->event_idx && rq->kick_at != q->shadow_avail)) {
                /* Ask for a kick, then look again: buffers posted meanwhile came without.
                 * With EVENT_IDX the kick is asked for at the next buffer after those seen
                 * (not after the last consumed: a frame waiting for more merged buffers
                 * than are posted would never be kicked for the rest). */
                hv->vq_set_notifications(q, 1);
                if (q->event_idx) {
                    rq->kick_at = q->shadow_avail;   /* ours: the guest may rewrite it */
                    __atomic_store_n(avail_event(q), rq->kick_at, __ATOMIC_RELAXED);
                }
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                continue;
            }
            rq->wait = VNET_WAIT_RING;
            /* Hang-up with input still unread: the worker must not wake for it (it would
             * at once again); the input waits for buffers, the link goes down. */
            struct pollfd pf = { .fd = p->fd, .events = 0 };
            if (poll(&pf, 1, 0) == 1 && (pf.revents & (POLLHUP | POLLERR))) {
                p->hup = 1;
                stream_read_rest(p);
            }
            break;
        }
        rq->have_frame = 0;
        if (rc == PLACE_DONE) {
            rx_prefetch_next(rq, q);
            rq->served++;
            if (q->notifications)
                hv->vq_set_notifications(q, 0);
            if (++since_check == VNET_NOTIFY_EVERY) {
                since_check = 0;
                if (rx_owe_interrupt(rq, q, irq)) {
                    rq->wait = VNET_WAIT_INPUT;
                    return HV_VQ_CYCLE_NOTIFY;
                }
            }
        }
    }
    return rx_owe_interrupt(rq, q, irq) ? HV_VQ_CYCLE_NOTIFY : HV_VQ_CYCLE_IDLE;
}

/* A queue worker's sleep between cycles: poll() on the queue's doorbells (read when they
 * fire), the worker's wake-up fd and, if port_events, the backend descriptor. SLEEP_SERVE:
 * serve again; SLEEP_PYTHON: the worker is wanted in Python (wake-up fd readable, left
 * unread for the worker to read) or a descriptor failed; SLEEP_PORT: the backend hung up or
 * failed (one more cycle, then Python). */
enum { SLEEP_SERVE, SLEEP_PYTHON, SLEEP_PORT };

/* Whether the worker's wake-up fd is readable now (left unread for the worker). */
static int wake_pending(int wake_fd)
{
    struct pollfd pfd = { .fd = wake_fd, .events = POLLIN };
    return poll(&pfd, 1, 0) != 0;
}

static int worker_sleep(const int *doorbells, int ndoorbells, int wake_fd, int port_fd,
                        short port_events, int watch_port)
{
    struct pollfd pfd[VNET_MAX_DOORBELLS + 2];
    int n = 0;
    for (int i = 0; i < ndoorbells; i++)
        pfd[n++] = (struct pollfd){ .fd = doorbells[i], .events = POLLIN };
    pfd[n++] = (struct pollfd){ .fd = wake_fd, .events = POLLIN };
    int port_at = -1;
    if (watch_port) {
        port_at = n;
        pfd[n++] = (struct pollfd){ .fd = port_fd, .events = port_events };
    }
    int r = poll(pfd, (nfds_t)n, -1);
    if (r < 0)
        return errno == EINTR ? SLEEP_SERVE : SLEEP_PYTHON;
    if (pfd[ndoorbells].revents)
        return SLEEP_PYTHON;
    for (int i = 0; i < ndoorbells; i++) {
        if (pfd[i].revents & (POLLNVAL | POLLERR))
            return SLEEP_PYTHON;            /* a doorbell closed: the machine is going */
        if (pfd[i].revents & POLLIN) {
            uint64_t v;
            if (read(pfd[i].fd, &v, sizeof(v)) < 0 && errno != EAGAIN && errno != EINTR)
                return SLEEP_PYTHON;
        }
    }
    if (port_at >= 0 && (pfd[port_at].revents & (POLLNVAL | POLLERR | POLLHUP)))
        return SLEEP_PORT;
    return SLEEP_SERVE;
}

/* A receive queue's worker, natively: serve (vnet_rx_cycle), then sleep in poll() on the
 * queue's doorbells, the backend descriptor (as rq->wait asks: input while buffers are
 * posted, hang-up only while they are not) and the worker's wake-up fd, and serve again,
 * without coming back to Python (or taking the GIL) between a kick and the frames it lets
 * in. Before sleeping, a cycle that filled the ring's last buffer with input still waiting
 * polls avail.idx for its window (struct vnet_poll, at most poll_ns): under traffic the
 * driver's refill follows at once, with no kick and no wake-up. Comes back with the cycle's
 * code when it is not IDLE; with IDLE when the wake-up fd is readable (left unread: the
 * worker reads it), another thread asks for the queue, the port went away or hung up, or a
 * descriptor failed. */
int vnet_rx_run(struct hv_vq *q, struct vnet_rxq *rq, const struct hv_irq_gate *irq,
                const int *doorbells, int ndoorbells, int wake_fd, uint64_t poll_ns)
{
    if (ndoorbells < 0 || ndoorbells > VNET_MAX_DOORBELLS)
        return vnet_rx_cycle(q, rq, irq);
    for (;;) {
        int rc = vnet_rx_cycle(q, rq, irq);
        if (rc != HV_VQ_CYCLE_IDLE)
            return rc;
        struct vnet_port *p = rq->port;
        if (!p || p->fd < 0 || p->gone || p->hup || q->yield_req)
            return rc;
        if (rq->wait == VNET_WAIT_RING && rq->served && poll_ns
            && q->shadow_avail == q->last_avail_idx) {
            uint64_t window = poll_start(&rq->poll, poll_ns);
            if (window && hv->vq_poll_avail(q, window)) {
                poll_found(&rq->poll, poll_ns, 1);
                /* Under steady traffic this path never sleeps: the wake-up fd is looked at
                 * here too, so a stop, pause or reset is not put off behind the traffic. */
                if (wake_pending(wake_fd))
                    return HV_VQ_CYCLE_IDLE;
                continue;
            }
        }
        int watch = rq->wait == VNET_WAIT_INPUT || rq->wait == VNET_WAIT_RING;
        int s = worker_sleep(doorbells, ndoorbells, wake_fd, p->fd,
                             rq->wait == VNET_WAIT_INPUT ? POLLIN : 0, watch);
        if (s == SLEEP_PYTHON)
            return HV_VQ_CYCLE_IDLE;
        poll_found(&rq->poll, poll_ns, 0);      /* the refill's kick, after a sleep */
        if (s == SLEEP_PORT)
            /* One more cycle reads what is left and notes the hang-up; Python takes the
             * link down (never a loop on a descriptor that stays ready). */
            return vnet_rx_cycle(q, rq, irq);
    }
}

/* Whether anything read from the backend is still here: a frame in hand, or stream bytes
 * not parsed yet (what was read before the link went down, to be delivered; the cycle that
 * finds only the beginning of a frame counts it truncated). (On the queue's worker.) */
int vnet_rx_held(const struct vnet_rxq *rq)
{
    const struct vnet_port *p = rq->port;
    return rq->have_frame || (p && p->framing == VNET_FRAMING_BE32 && p->rx_end > p->rx_start);
}

/* A port given up (a reconnection replaced it): the frame in hand and every complete frame
 * left in its stream buffer are dropped, returned as a count for the caller's counter; the
 * beginning of one is counted as truncated. (On the queue's worker, between cycles.) */
uint32_t vnet_rx_discard(struct vnet_rxq *rq)
{
    uint32_t dropped = rq->have_frame ? 1 : 0;
    rq->have_frame = 0;
    rq->wait = VNET_WAIT_INPUT;
    struct vnet_port *p = rq->port;
    if (!p || p->framing != VNET_FRAMING_BE32)
        return dropped;
    for (;;) {
        uint32_t avail = p->rx_end - p->rx_start;
        if (p->rx_skip) {
            uint32_t k = avail < p->rx_skip ? avail : p->rx_skip;
            p->rx_start += k;
            p->rx_skip -= k;
            if (p->rx_skip)
                break;
            continue;
        }
        if (avail < VNET_STREAM_LEN_SIZE)
            break;
        const uint8_t *b = p->rx_buf + p->rx_start;
        uint32_t len = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
        if (len > p->max_frame) {
            p->rx_oversize++;
            p->rx_start += VNET_STREAM_LEN_SIZE;
            p->rx_skip = len;
            continue;
        }
        if (avail - VNET_STREAM_LEN_SIZE < len)
            break;
        p->rx_start += VNET_STREAM_LEN_SIZE + len;
        dropped++;
    }
    if (p->rx_end > p->rx_start && !p->rx_skip)
        p->rx_truncated++;
    p->rx_start = p->rx_end = p->rx_skip = 0;
    return dropped;
}

/* Reset: the frame in hand is dropped (counted by the caller) and the scratch forgotten. */
int vnet_rx_drop_pending(struct vnet_rxq *rq)
{
    int had = rq->have_frame;
    rq->have_frame = 0;
    rq->wait = VNET_WAIT_INPUT;
    return had;
}

/* ---- transmit -------------------------------------------------------------------------- */

enum { SEND_OK, SEND_DROPPED, SEND_AGAIN, SEND_GONE, SEND_MOVED };

/* Write the rest of a partly written stream frame: SEND_OK when nothing is left. */
static int flush_pending(struct vnet_port *p)
{
    while (p->tx_off < p->tx_len) {
        ssize_t n = write(p->fd, p->tx_buf + p->tx_off, p->tx_len - p->tx_off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return SEND_AGAIN;
        if (n <= 0) {
            p->tx_off = p->tx_len = 0;
            p->gone = 1;
            return SEND_GONE;
        }
        p->tx_off += (uint32_t)n;
    }
    p->tx_off = p->tx_len = 0;
    return SEND_OK;
}

static int send_be32(struct vnet_txq *tq, const struct vnet_hdr *h, const struct hv_chain *ch,
                     uint32_t len)
{
    struct vnet_port *p = tq->port;
    port_lock(p);
    int rc = flush_pending(p);
    if (rc != SEND_OK)
        goto out;
    uint8_t *b = p->tx_buf;
    b[0] = (uint8_t)(len >> 24);
    b[1] = (uint8_t)(len >> 16);
    b[2] = (uint8_t)(len >> 8);
    b[3] = (uint8_t)len;
    gather(ch, tq->feat->hdr_len, b + VNET_STREAM_LEN_SIZE, len);
    if ((h->flags & VNET_HDR_F_NEEDS_CSUM)
        && complete_csum(b + VNET_STREAM_LEN_SIZE, len, h->csum_start, h->csum_offset)) {
        tq->drop_bad++;
        rc = SEND_DROPPED;
        goto out;
    }
    uint32_t total = len + VNET_STREAM_LEN_SIZE;
    ssize_t n;
    do
        n = write(p->fd, b, total);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        rc = SEND_AGAIN;            /* nothing written: the chain stays available */
    } else if (n <= 0) {
        p->gone = 1;
        rc = SEND_GONE;
    } else {
        if ((uint32_t)n < total) {  /* the rest goes before anything else */
            p->tx_off = (uint32_t)n;
            p->tx_len = total;
            p->tx_partial++;
        }
        rc = SEND_OK;
    }
out:
    port_unlock(p);
    return rc;
}

/* A tap write's outcome (n, errno as it left them). */
static int send_result(struct vnet_txq *tq, ssize_t n)
{
    if (n >= 0)
        return SEND_OK;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return SEND_AGAIN;
    if (fatal_errno(errno)) {
        tq->port->gone = 1;
        return SEND_GONE;
    }
    tq->drop_error++;               /* EIO (interface down), EINVAL (the kernel refused it) */
    return SEND_DROPPED;
}

static int send_vnet_hdr(struct vnet_txq *tq, struct vnet_hdr *h, const struct hv_chain *ch,
                         uint32_t len)
{
    struct vnet_port *p = tq->port;
    uint32_t hdr_len = tq->feat->hdr_len;
    h->num_buffers = 0;
    if (len <= VNET_TX_COPY_MAX && sizeof(*h) + len <= tq->bounce_cap) {
        /* Header and frame copied into one buffer, one write(): a single-buffer write
         * takes the kernel's cheaper path (measured 0.08-0.1 us a frame less than the
         * writev of header and frame, here, 2026-12-02), more than the copy costs. */
        memcpy(tq->bounce, h, sizeof(*h));
        gather(ch, hdr_len, tq->bounce + sizeof(*h), len);
        ssize_t n;
        do
            n = write(p->fd, tq->bounce, sizeof(*h) + len);
        while (n < 0 && errno == EINTR);
        return send_result(tq, n);
    }
    tq->iov[0].iov_base = h;
    tq->iov[0].iov_len = sizeof(*h);
    int cnt = 1;
    /* The frame: the readable buffers after the guest's header. */
    uint64_t skip = hdr_len;
    for (int i = 0; i < ch->nr; i++) {
        size_t l = ch->iov[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        if (cnt == VNET_TX_MAX_IOV) {
            cnt = -1;
            break;
        }
        tq->iov[cnt].iov_base = (uint8_t *)ch->iov[i].iov_base + skip;
        tq->iov[cnt].iov_len = l - skip;
        cnt++;
        skip = 0;
    }
    if (cnt < 0) {                  /* too many pieces for one writev: one piece */
        if (len > tq->bounce_cap) {
            tq->drop_oversize++;
            return SEND_DROPPED;
        }
        gather(ch, hdr_len, tq->bounce, len);
        tq->iov[1].iov_base = tq->bounce;
        tq->iov[1].iov_len = len;
        cnt = 2;
    }
    ssize_t n;
    do
        n = writev(p->fd, tq->iov, cnt);
    while (n < 0 && errno == EINTR);
    return send_result(tq, n);
}

/* One transmit chain: validated, then written to the backend. */
static int tx_send(struct vnet_txq *tq, const struct hv_chain *ch)
{
    const struct vnet_feat *f = tq->feat;
    struct vnet_port *p = tq->port;
    struct vnet_hdr h;
    memset(&h, 0, sizeof(h));
    if (ch->rlen < (uint64_t)f->hdr_len + VNET_ETH_HLEN) {
        tq->drop_bad++;
        return SEND_DROPPED;
    }
    gather(ch, 0, (uint8_t *)&h, f->hdr_len);   /* copied once: the guest cannot change it */
    uint64_t len = ch->rlen - f->hdr_len;
    if (len > p->max_frame) {
        tq->drop_oversize++;
        return SEND_DROPPED;
    }
    int stream = p->framing == VNET_FRAMING_BE32;
    if (!hdr_allowed(&h, f->csum, f->host_tso4 && !stream, f->host_tso6 && !stream,
                     f->host_ecn && !stream)) {
        tq->drop_bad++;
        return SEND_DROPPED;
    }
    if (p->gone) {
        /* Gone and replaced: the frame waits for the new connection, which the worker
         * takes up in Python, instead of being dropped on the old one. */
        if (__atomic_load_n(&p->moved, __ATOMIC_ACQUIRE))
            return SEND_MOVED;
        tq->drop_gone++;
        return SEND_DROPPED;
    }
    int rc = stream ? send_be32(tq, &h, ch, (uint32_t)len)
                    : send_vnet_hdr(tq, &h, ch, (uint32_t)len);
    if (rc == SEND_OK) {
        tq->frames++;
        tq->bytes += len;
    } else if (rc == SEND_GONE) {
        tq->drop_gone++;
    }
    return rc;
}

/* As rx_publish, for a transmit queue. */
static void tx_publish(struct vnet_txq *tq, struct hv_vq *q)
{
    hv->vq_push_n(q, tq->heads, tq->lens, tq->pend);
    tq->pend = 0;
}

static int tx_owe_interrupt(struct vnet_txq *tq, struct hv_vq *q, const struct hv_irq_gate *irq)
{
    tx_publish(tq, q);
    return owe_interrupt(q, irq);
}

int vnet_tx_cycle(struct hv_vq *q, struct vnet_txq *tq, const struct hv_irq_gate *irq,
                  uint64_t poll_ns)
{
    struct vnet_port *p = tq->port;
    int owed = tq->repoll != 0;
    tq->repoll = 0;
    tq->served = 0;
    tq->pend = 0;                   /* every return below published what it sent */
    q->stop = hv->vq_begin(q);
    if (q->stop)
        return HV_VQ_CYCLE_PYTHON;
    if (!p || p->fd < 0)
        return HV_VQ_CYCLE_PYTHON;  /* no backend: Python drops what comes */
    hv->vq_set_notifications(q, 0);
    poll_found(&tq->poll, poll_ns, 0);          /* a kick (or room) after the last sleep */
    uint32_t batch = 0, since_check = 0;
    for (;;) {
        if (q->yield_req) {
            tx_publish(tq, q);
            hv->vq_set_notifications(q, 1);
            tq->wait = VNET_WAIT_KICK;
            return owe_interrupt(q, irq) ? HV_VQ_CYCLE_NOTIFY : HV_VQ_CYCLE_YIELD;
        }
        if (p->framing == VNET_FRAMING_BE32 && __atomic_load_n(&p->tx_len, __ATOMIC_RELAXED)) {
            port_lock(p);
            int rc = flush_pending(p);
            port_unlock(p);
            if (rc == SEND_AGAIN) {
                tq->wait = VNET_WAIT_OUTPUT;    /* kicks stay off: room is what we need */
                return tx_owe_interrupt(tq, q, irq) ? HV_VQ_CYCLE_NOTIFY : HV_VQ_CYCLE_IDLE;
            }
        }
        int rc = hv->vq_peek_at(q, tq->pend, &tq->ch);
        if (rc == HV_VQ_STOP_EMPTY) {
            if (tx_owe_interrupt(tq, q, irq)) {
                tq->repoll = batch || owed;
                tq->wait = VNET_WAIT_KICK;
                return HV_VQ_CYCLE_NOTIFY;
            }
            if ((batch || owed) && poll_ns) {
                uint64_t window = poll_start(&tq->poll, poll_ns);
                if (window && hv->vq_poll_avail(q, window)) {
                    poll_found(&tq->poll, poll_ns, 1);
                    batch = owed = 0;
                    continue;
                }
            }
            batch = owed = 0;
            hv->vq_set_notifications(q, 1);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            rc = hv->vq_peek_at(q, 0, &tq->ch);     /* published above */
            if (rc == HV_VQ_STOP_EMPTY) {
                tq->wait = VNET_WAIT_KICK;
                return HV_VQ_CYCLE_IDLE;
            }
            poll_found(&tq->poll, poll_ns, 1);  /* came as the poll ended: covered */
            hv->vq_set_notifications(q, 0);
        }
        if (rc != HV_VQ_CHAIN) {
            q->stop = rc;
            tx_owe_interrupt(tq, q, irq);
            return HV_VQ_CYCLE_PYTHON;  /* invalid: NEEDS_RESET; too long: Python drops it */
        }
        int sr = tx_send(tq, &tq->ch);
        if (sr == SEND_MOVED) {
            tx_publish(tq, q);
            hv->vq_set_notifications(q, 1);
            tq->wait = VNET_WAIT_KICK;
            return owe_interrupt(q, irq) ? HV_VQ_CYCLE_NOTIFY : HV_VQ_CYCLE_YIELD;
        }
        if (sr == SEND_AGAIN) {
            tq->wait = VNET_WAIT_OUTPUT;
            return tx_owe_interrupt(tq, q, irq) ? HV_VQ_CYCLE_NOTIFY : HV_VQ_CYCLE_IDLE;
        }
        tq->heads[tq->pend] = tq->ch.head;
        tq->lens[tq->pend] = 0;
        if (++tq->pend >= publish_at(q, VNET_TX_PUBLISH))
            tx_publish(tq, q);
        tq->served++;
        batch++;
        if (++since_check == VNET_NOTIFY_EVERY) {
            since_check = 0;
            if (tx_owe_interrupt(tq, q, irq)) {
                tq->repoll = 1;
                tq->wait = VNET_WAIT_KICK;
                return HV_VQ_CYCLE_NOTIFY;
            }
        }
    }
}

/* A transmit queue's worker, natively, as vnet_rx_run: serve (vnet_tx_cycle, which polls
 * for the driver's next batch itself), then sleep in poll() on the doorbells, the wake-up
 * fd and, while the backend is full, the backend's room (POLLOUT). */
int vnet_tx_run(struct hv_vq *q, struct vnet_txq *tq, const struct hv_irq_gate *irq,
                uint64_t poll_ns, const int *doorbells, int ndoorbells, int wake_fd)
{
    if (ndoorbells < 0 || ndoorbells > VNET_MAX_DOORBELLS)
        return vnet_tx_cycle(q, tq, irq, poll_ns);
    for (;;) {
        int rc = vnet_tx_cycle(q, tq, irq, poll_ns);
        if (rc != HV_VQ_CYCLE_IDLE)
            return rc;
        struct vnet_port *p = tq->port;
        if (!p || p->fd < 0 || p->gone || q->yield_req)
            return rc;
        int s = worker_sleep(doorbells, ndoorbells, wake_fd, p->fd, POLLOUT,
                             tq->wait == VNET_WAIT_OUTPUT);
        if (s == SLEEP_PYTHON)
            return HV_VQ_CYCLE_IDLE;
        if (s == SLEEP_PORT)
            return vnet_tx_cycle(q, tq, irq, poll_ns);
    }
}
