/* virtio-blk READ/WRITE served natively, with the GIL released.
 *
 * hv_vblk_serve() consumes available chains of a split virtqueue the way
 * hvframe.virtio.virtqueue.VirtQueue.pop() does (the same validations, in the same ring
 * state) and answers IN/OUT requests the way VirtioBlk.handle_chain() and BlockBackend do.
 * Whatever it cannot or must not decide (another request type, an invalid chain, an
 * O_DIRECT bounce, an oversized chain) it leaves available, its state untouched, for the
 * Python path, which then serves the chain or raises VirtqueueError.
 *
 * Every guest value is hostile: guest addresses are translated through the RAM region
 * list only, with overflow-safe range checks, and each descriptor is copied once before use
 * so the guest cannot change it between check and use.
 *
 * Included into the cffi module after hvcore.c (one translation unit).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Layouts; tests check them against the construct declarations (the source of truth). */
struct hv_vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct hv_vring_used_elem { uint32_t id; uint32_t len; };
struct hv_vblk_req_hdr { uint32_t type; uint32_t reserved; uint64_t sector; };

#define HV_VRING_DESC_F_NEXT 1
#define HV_VRING_DESC_F_WRITE 2
#define HV_VRING_DESC_F_INDIRECT 4
#define HV_VRING_AVAIL_IDX_OFF 2
#define HV_VRING_AVAIL_RING_OFF 4
#define HV_VRING_AVAIL_ELEM_SIZE 2
#define HV_VRING_USED_IDX_OFF 2
#define HV_VRING_USED_RING_OFF 4
#define HV_VRING_EVENT_SIZE 2
#define HV_VRING_FLAGS_OFF 0           /* avail.flags and used.flags */
#define HV_VRING_AVAIL_F_NO_INTERRUPT 1
#define HV_VRING_USED_F_NO_NOTIFY 1
#define HV_VRING_MAX_SIZE 32768

#define HV_VBLK_T_IN 0
#define HV_VBLK_T_OUT 1
#define HV_VBLK_S_OK 0
#define HV_VBLK_S_IOERR 1
#define HV_VBLK_SECTOR 512
#define HV_VBLK_MAX_SEGS 1024      /* buffers per chain served natively (also IOV_MAX) */
#define HV_VQ_MAX_REGIONS 4

/* Why hv_vblk_serve stopped. */
enum {
    HV_VBLK_STOP_EMPTY = 0,        /* nothing (more) available */
    HV_VBLK_STOP_MAX,              /* served `max` chains */
    HV_VBLK_STOP_TYPE,             /* next chain is not IN/OUT (or has no header/status) */
    HV_VBLK_STOP_UNSUPPORTED,      /* next chain needs the Python path (bounce, too long) */
    HV_VBLK_STOP_INVALID,          /* next chain or avail.idx is invalid: Python raises */
    HV_VBLK_STOP_STATE,            /* bad hv_vq / hv_blk set-up (a VMM bug) */
};

struct hv_ram_region { uint64_t gpa; uint64_t size; uint64_t host_offset; };

/* A VirtQueue's state; hvframe.virtio.native copies it in and out around each call. */
struct hv_vq {
    void *mem;                     /* host base of guest RAM */
    uint64_t mem_size;
    uint32_t nregions;
    struct hv_ram_region regions[HV_VQ_MAX_REGIONS];
    uint64_t desc_addr, avail_addr, used_addr;   /* guest-physical */
    uint32_t size;
    uint32_t max_chain;            /* 0: no cap */
    uint8_t event_idx, indirect, notifications;
    uint16_t last_avail_idx, shadow_avail, used_idx;
    uint16_t signalled_used;       /* used_idx at the last interrupt decision */
    int stop;                      /* HV_VBLK_STOP_* of the last call */
    uint32_t served;               /* chains hv_vq_cycle served in its last call */
    uint32_t repoll;               /* hv_vq_cycle returned NOTIFY after a batch: poll next */
    volatile int yield_req;          /* set by another thread that wants the queue: hv_vq_cycle
                                    * returns after the batch in hand */
};

/* An MSI-X vector as a queue worker sees it: Python keeps `open` true only while the vector
 * may fire (enabled, unmasked, routed to the irqfd `fd`); otherwise the worker asks Python. */
struct hv_irq_gate { int fd; int open; };

typedef int (*hv_vq_serve_fn)(struct hv_vq *q, const void *ctx, int max);

enum { HV_VQ_CYCLE_IDLE = 0, HV_VQ_CYCLE_PYTHON, HV_VQ_CYCLE_NOTIFY, HV_VQ_CYCLE_YIELD };

struct hv_blk {
    int fd;                        /* < 0: closed */
    int readonly, direct, write_through;
    uint32_t logical_sector;
    uint64_t size;                 /* disk bytes */
    int wb_errno;                  /* a write-through fdatasync failed (Python clears it) */
};

/* Host pointer of [gpa, gpa+len) when it lies inside one RAM region, else NULL. Shared by
 * every native path that follows guest addresses (virtqueues here, AHCI in ahci_fast.c). */
static uint8_t *ram_translate(void *mem, const struct hv_ram_region *regions, uint32_t n,
                              uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < n; i++) {
        const struct hv_ram_region *r = &regions[i];
        if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len)
            return (uint8_t *)mem + r->host_offset + (gpa - r->gpa);
    }
    return NULL;
}

/* Whether a RAM region list fits the host mapping it is said to be in. */
static int ram_regions_ok(const void *mem, uint64_t mem_size, const struct hv_ram_region *regions,
                          uint32_t n)
{
    if (!mem || n == 0 || n > HV_VQ_MAX_REGIONS)
        return 0;
    for (uint32_t i = 0; i < n; i++)
        if (regions[i].host_offset > mem_size || regions[i].size > mem_size - regions[i].host_offset)
            return 0;
    return 1;
}

static uint8_t *vq_translate(const struct hv_vq *q, uint64_t gpa, uint64_t len)
{
    return ram_translate(q->mem, q->regions, q->nregions, gpa, len);
}

struct vq_ctx {
    const struct hv_vq *q;
    uint8_t *desc, *avail, *used;
    uint32_t mask;
};

struct vblk_chain {
    struct iovec iov[HV_VBLK_MAX_SEGS];   /* non-empty buffers: readable, then writable */
    int n, nr;                            /* stored buffers, of which readable */
    uint64_t rlen;
};

/* VirtQueue._walk: 0, HV_VBLK_STOP_INVALID or HV_VBLK_STOP_UNSUPPORTED. */
static int vq_walk(const struct vq_ctx *c, uint16_t head, struct vblk_chain *ch)
{
    const struct hv_vq *q = c->q;
    const uint8_t *table = c->desc;
    uint32_t entries = q->size, idx = head, steps = 0, total = 0, nwritable = 0;
    uint64_t rlen = 0, wlen = 0;
    int in_indirect = 0;

    ch->n = ch->nr = 0;
    if (head >= q->size)
        return HV_VBLK_STOP_INVALID;
    for (;;) {
        struct hv_vring_desc d;
        if (++steps > entries)
            return HV_VBLK_STOP_INVALID;          /* a loop */
        memcpy(&d, table + sizeof(d) * idx, sizeof(d));   /* idx < entries here */
        if (d.flags & HV_VRING_DESC_F_INDIRECT) {
            if (in_indirect || !q->indirect || (d.flags & HV_VRING_DESC_F_NEXT))
                return HV_VBLK_STOP_INVALID;
            if (d.len == 0 || d.len % sizeof(d))
                return HV_VBLK_STOP_INVALID;
            table = vq_translate(q, d.addr, d.len);
            if (!table)
                return HV_VBLK_STOP_INVALID;
            entries = d.len / sizeof(d);
            if (entries > 0x10000)
                entries = 0x10000;                  /* `next` is 16-bit */
            in_indirect = 1;
            idx = 0;
            steps = 0;
            continue;
        }
        if (q->max_chain && ++total > q->max_chain)
            return HV_VBLK_STOP_INVALID;
        uint8_t *p = vq_translate(q, d.addr, d.len);
        if (!p)
            return HV_VBLK_STOP_INVALID;
        if (d.flags & HV_VRING_DESC_F_WRITE) {
            nwritable++;
            wlen += d.len;
            if (wlen > 0xFFFFFFFFu)
                return HV_VBLK_STOP_INVALID;
        } else {
            if (nwritable)
                return HV_VBLK_STOP_INVALID;      /* readable after writable */
            rlen += d.len;
            if (rlen > 0xFFFFFFFFu)
                return HV_VBLK_STOP_INVALID;
        }
        if (d.len) {
            if (ch->n == HV_VBLK_MAX_SEGS)
                return HV_VBLK_STOP_UNSUPPORTED;
            ch->iov[ch->n].iov_base = p;
            ch->iov[ch->n].iov_len = d.len;
            ch->n++;
            if (!(d.flags & HV_VRING_DESC_F_WRITE))
                ch->nr++;
        }
        if (!(d.flags & HV_VRING_DESC_F_NEXT)) {
            ch->rlen = rlen;
            return 0;
        }
        if (d.next >= entries)
            return HV_VBLK_STOP_INVALID;
        idx = d.next;
    }
}

/* BlockBackend._preadv_all / _pwritev_all: 0 or an errno. Consumes iov. */
static int vblk_rw_all(int fd, struct iovec *iov, int cnt, uint64_t off, int write)
{
    while (cnt > 0) {
        int chunk = cnt < HV_VBLK_MAX_SEGS ? cnt : HV_VBLK_MAX_SEGS;
        ssize_t n = write ? pwritev(fd, iov, chunk, (off_t)off)
                          : preadv(fd, iov, chunk, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO;                             /* end of file / no progress */
        off += (uint64_t)n;
        size_t left = (size_t)n;
        while (cnt > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0 && left) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

static int vblk_needs_bounce(struct hv_blk *b, const struct iovec *iov, int cnt)
{
    if (!b->direct)
        return 0;
    for (int i = 0; i < cnt; i++)
        if ((uintptr_t)iov[i].iov_base % b->logical_sector || iov[i].iov_len % b->logical_sector)
            return 1;
    return 0;
}

/* BlockBackend._check: whether [off, off+len) is a valid request (else IOERR). */
static int vblk_range_ok(struct hv_blk *b, uint64_t sector, uint64_t len)
{
    if (sector > UINT64_MAX / HV_VBLK_SECTOR)
        return 0;
    uint64_t off = sector * HV_VBLK_SECTOR;
    if (off % b->logical_sector || len % b->logical_sector)
        return 0;
    return len <= b->size && off <= b->size - len;
}

/* One validated IN/OUT chain: the status and the used length, or -1 to leave it to Python
 * (an O_DIRECT bounce) with nothing done. */
static int64_t vblk_request(struct hv_blk *b, struct vblk_chain *ch, uint32_t type,
                            uint64_t sector, uint8_t *status)
{
    struct iovec *data;
    int cnt;
    uint64_t total = 0;

    if (type == HV_VBLK_T_IN) {
        /* Device-writable buffers less the status byte (the last one). */
        data = ch->iov + ch->nr;
        cnt = ch->n - ch->nr;
        if (--ch->iov[ch->n - 1].iov_len == 0)
            cnt--;
    } else {
        /* Device-readable buffers after the 16-byte header. */
        size_t skip = sizeof(struct hv_vblk_req_hdr);
        int i = 0;
        while (i < ch->nr && skip >= ch->iov[i].iov_len)
            skip -= ch->iov[i++].iov_len;
        data = ch->iov + i;
        cnt = ch->nr - i;
        if (cnt > 0 && skip) {
            data->iov_base = (uint8_t *)data->iov_base + skip;
            data->iov_len -= skip;
        }
    }
    for (int i = 0; i < cnt; i++)
        total += data[i].iov_len;
    if (total % HV_VBLK_SECTOR)
        goto ioerr;
    if (type == HV_VBLK_T_OUT && b->readonly)
        goto ioerr;
    if (!vblk_range_ok(b, sector, total))
        goto ioerr;
    if (vblk_needs_bounce(b, data, cnt))
        return -1;
    if (type == HV_VBLK_T_IN) {
        if (total && vblk_rw_all(b->fd, data, cnt, sector * HV_VBLK_SECTOR, 0))
            goto ioerr;
        *status = HV_VBLK_S_OK;
        return (int64_t)total + 1;
    }
    if (total && vblk_rw_all(b->fd, data, cnt, sector * HV_VBLK_SECTOR, 1))
        goto ioerr;
    if (b->write_through) {
        int rc;
        do
            rc = fdatasync(b->fd);
        while (rc < 0 && errno == EINTR);
        if (rc < 0) {
            /* The kernel reports a lost write-back once: Python keeps it (sticky). */
            b->wb_errno = errno;
            goto ioerr;
        }
    }
    *status = HV_VBLK_S_OK;
    return 1;
ioerr:
    *status = HV_VBLK_S_IOERR;
    return 1;
}

/* Check the set-up and map the rings; 0 or HV_VBLK_STOP_STATE. */
static int vq_setup(const struct hv_vq *q, struct vq_ctx *c)
{
    if (!ram_regions_ok(q->mem, q->mem_size, q->regions, q->nregions))
        return HV_VBLK_STOP_STATE;
    if (q->size == 0 || q->size > HV_VRING_MAX_SIZE || (q->size & (q->size - 1)))
        return HV_VBLK_STOP_STATE;
    uint64_t ev = q->event_idx ? HV_VRING_EVENT_SIZE : 0;
    c->q = q;
    c->mask = q->size - 1;
    c->desc = vq_translate(q, q->desc_addr, (uint64_t)sizeof(struct hv_vring_desc) * q->size);
    c->avail = vq_translate(q, q->avail_addr,
                            HV_VRING_AVAIL_RING_OFF + (uint64_t)HV_VRING_AVAIL_ELEM_SIZE * q->size + ev);
    c->used = vq_translate(q, q->used_addr,
                           HV_VRING_USED_RING_OFF
                           + (uint64_t)sizeof(struct hv_vring_used_elem) * q->size + ev);
    if (!c->desc || !c->avail || !c->used)
        return HV_VBLK_STOP_STATE;
    /* The aligned 16/32-bit ring accesses below need aligned host addresses. */
    if ((uintptr_t)c->desc % 16 || (uintptr_t)c->avail % 2 || (uintptr_t)c->used % 4)
        return HV_VBLK_STOP_STATE;
    return 0;
}

int hv_vblk_serve(struct hv_vq *q, struct hv_blk *b, int max)
{
    struct vq_ctx c;
    struct vblk_chain ch;
    int served = 0;

    q->stop = vq_setup(q, &c);
    if (q->stop)
        return 0;
    if (b->fd < 0 || !(b->logical_sector == 512 || b->logical_sector == 1024
                       || b->logical_sector == 2048 || b->logical_sector == 4096)) {
        q->stop = HV_VBLK_STOP_STATE;
        return 0;
    }
    uint16_t *avail_idx = (uint16_t *)(c.avail + HV_VRING_AVAIL_IDX_OFF);
    uint16_t *used_idx = (uint16_t *)(c.used + HV_VRING_USED_IDX_OFF);
    uint16_t *avail_event = (uint16_t *)(c.used + HV_VRING_USED_RING_OFF
                                         + sizeof(struct hv_vring_used_elem) * q->size);
    for (;;) {
        if (served >= max) {
            q->stop = HV_VBLK_STOP_MAX;
            return served;
        }
        if (q->shadow_avail == q->last_avail_idx) {
            /* Load avail.idx before the ring entries it covers (acquire). */
            uint16_t idx = __atomic_load_n(avail_idx, __ATOMIC_ACQUIRE);
            if ((uint16_t)(idx - q->last_avail_idx) > q->size) {
                q->stop = HV_VBLK_STOP_INVALID;   /* more than a queue ahead */
                return served;
            }
            q->shadow_avail = idx;
            if (idx == q->last_avail_idx) {
                q->stop = HV_VBLK_STOP_EMPTY;
                return served;
            }
        }
        uint16_t head;
        memcpy(&head, c.avail + HV_VRING_AVAIL_RING_OFF
                      + HV_VRING_AVAIL_ELEM_SIZE * (q->last_avail_idx & c.mask), sizeof(head));
        int rc = vq_walk(&c, head, &ch);
        if (rc) {
            q->stop = rc;
            return served;
        }
        /* No header or no status byte: handle_chain's own answers, left to Python. */
        if (ch.rlen < sizeof(struct hv_vblk_req_hdr) || ch.n == ch.nr) {
            q->stop = HV_VBLK_STOP_TYPE;
            return served;
        }
        struct hv_vblk_req_hdr h;
        uint8_t *hp = (uint8_t *)&h;
        size_t got = 0;
        for (int i = 0; i < ch.nr && got < sizeof(h); i++) {
            size_t k = ch.iov[i].iov_len;
            if (k > sizeof(h) - got)
                k = sizeof(h) - got;
            memcpy(hp + got, ch.iov[i].iov_base, k);
            got += k;
        }
        if (h.type != HV_VBLK_T_IN && h.type != HV_VBLK_T_OUT) {
            q->stop = HV_VBLK_STOP_TYPE;
            return served;
        }
        struct iovec *last = &ch.iov[ch.n - 1];
        uint8_t *status = (uint8_t *)last->iov_base + last->iov_len - 1;
        int64_t used_len = vblk_request(b, &ch, h.type, h.sector, status);
        if (used_len < 0) {
            q->stop = HV_VBLK_STOP_UNSUPPORTED;
            return served;
        }
        /* VirtQueue.pop's bookkeeping, then push: element before index (release store). */
        q->last_avail_idx++;
        if (q->event_idx && q->notifications)
            __atomic_store_n(avail_event, q->last_avail_idx, __ATOMIC_RELAXED);
        struct hv_vring_used_elem e = { head, (uint32_t)used_len };
        memcpy(c.used + HV_VRING_USED_RING_OFF + sizeof(e) * (q->used_idx & c.mask), &e,
               sizeof(e));
        q->used_idx++;
        __atomic_store_n(used_idx, q->used_idx, __ATOMIC_RELEASE);
        served++;
    }
}

/* ---- the queue worker's cycle ---------------------------------------------------------- */

/* Busy-poll until avail.idx differs from last_avail_idx (1), `ns` nanoseconds pass or another
 * thread asks for the queue (0). Catches the driver's next batch without a sleep/wake-up
 * round trip (adaptive polling, as QEMU's iothreads do). */
static int vq_poll_avail(struct hv_vq *q, const struct vq_ctx *c, uint64_t ns)
{
    struct timespec t0, t;
    const uint16_t *idx = (const uint16_t *)(c->avail + HV_VRING_AVAIL_IDX_OFF);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned i = 1;; i++) {
        if (__atomic_load_n(idx, __ATOMIC_ACQUIRE) != q->last_avail_idx)
            return 1;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (i % 64 == 0) {
            if (q->yield_req)
                return 0;
            clock_gettime(CLOCK_MONOTONIC, &t);
            uint64_t el = (uint64_t)(t.tv_sec - t0.tv_sec) * 1000000000u
                          + (uint64_t)t.tv_nsec - (uint64_t)t0.tv_nsec;
            if (el >= ns)
                return 0;
        }
    }
}

/* VirtQueue.disable_notifications / enable_notifications (the latter without the re-read). */
static void vq_set_notifications(struct hv_vq *q, const struct vq_ctx *c, int on)
{
    q->notifications = (uint8_t)on;
    if (q->event_idx) {
        /* Off: avail_event simply stops advancing. */
        if (on) {
            uint16_t *ev = (uint16_t *)(c->used + HV_VRING_USED_RING_OFF
                                        + sizeof(struct hv_vring_used_elem) * q->size);
            __atomic_store_n(ev, q->last_avail_idx, __ATOMIC_RELAXED);
        }
        return;
    }
    uint16_t *flags = (uint16_t *)(c->used + HV_VRING_FLAGS_OFF);
    uint16_t f = __atomic_load_n(flags, __ATOMIC_RELAXED);
    f = on ? (uint16_t)(f & ~HV_VRING_USED_F_NO_NOTIFY) : (uint16_t)(f | HV_VRING_USED_F_NO_NOTIFY);
    __atomic_store_n(flags, f, __ATOMIC_RELAXED);
}

/* VirtQueue.needs_notification: interrupt the driver for what was pushed since last time? */
static int vq_needs_notification(struct hv_vq *q, const struct vq_ctx *c)
{
    uint16_t old = q->signalled_used, now = q->used_idx;
    q->signalled_used = now;
    if (old == now)
        return 0;
    /* used.idx is stored before used_event / avail.flags is loaded (store-load: full fence). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (q->event_idx) {
        uint16_t used_event = __atomic_load_n(
            (const uint16_t *)(c->avail + HV_VRING_AVAIL_RING_OFF
                               + HV_VRING_AVAIL_ELEM_SIZE * q->size), __ATOMIC_RELAXED);
        return (uint16_t)(now - used_event - 1) < (uint16_t)(now - old);
    }
    uint16_t flags = __atomic_load_n((const uint16_t *)(c->avail + HV_VRING_FLAGS_OFF),
                                     __ATOMIC_RELAXED);
    return !(flags & HV_VRING_AVAIL_F_NO_INTERRUPT);
}

/* Raise the queue's interrupt through its irqfd if Python says the vector may fire now. */
static int irq_gate_fire(const struct hv_irq_gate *g)
{
    if (!g || !__atomic_load_n(&g->open, __ATOMIC_ACQUIRE))
        return 0;
    int fd = g->fd;
    if (fd < 0)
        return 0;
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(fd, &one, sizeof(one));
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof(one);
}

/* A queue worker's whole service loop while only native requests arrive, GIL released:
 * serve every available chain with `serve`, interrupt the driver (irqfd) when the ring asks
 * for it, poll `poll_ns` for the next batch, and re-enable notifications once idle.
 * Returns HV_VQ_CYCLE_IDLE (nothing available, notifications on: sleep until a kick),
 * HV_VQ_CYCLE_PYTHON (the next chain is for the Python path; q->stop says why; notifications
 * off), HV_VQ_CYCLE_NOTIFY (interrupt the driver, the gate being shut, then call again) or
 * HV_VQ_CYCLE_YIELD (another thread asked for the queue: notifications on, work may remain).
 * q->served counts the chains served. */
int hv_vq_cycle(struct hv_vq *q, hv_vq_serve_fn serve, const void *ctx,
                const struct hv_irq_gate *irq, uint64_t poll_ns)
{
    struct vq_ctx c;
    /* Handed back for an interrupt right after a batch, the poll for the next one is owed. */
    int owed = q->repoll != 0;
    q->repoll = 0;
    q->served = 0;
    q->stop = vq_setup(q, &c);
    if (q->stop)
        return HV_VQ_CYCLE_PYTHON;
    for (;;) {
        vq_set_notifications(q, &c, 0);
        uint32_t batch = 0;
        do {
            int n = serve(q, ctx, (int)q->size);
            batch += (uint32_t)n;
        } while (q->stop == HV_VBLK_STOP_MAX);
        q->served += batch;
        if (q->stop != HV_VBLK_STOP_EMPTY)
            return HV_VQ_CYCLE_PYTHON;
        /* The batch is complete: tell the driver before looking for more. */
        if (vq_needs_notification(q, &c) && !irq_gate_fire(irq)) {
            q->repoll = batch || owed;
            return HV_VQ_CYCLE_NOTIFY;
        }
        if ((batch || owed) && poll_ns && !q->yield_req && vq_poll_avail(q, &c, poll_ns)) {
            owed = 0;
            continue;
        }
        owed = 0;
        vq_set_notifications(q, &c, 1);
        if (q->yield_req)
            return HV_VQ_CYCLE_YIELD;
        /* Notifications on before avail.idx is re-read (store-load: full fence); anything
         * that arrived meanwhile came without a kick. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n((const uint16_t *)(c.avail + HV_VRING_AVAIL_IDX_OFF),
                            __ATOMIC_ACQUIRE) == q->last_avail_idx)
            return HV_VQ_CYCLE_IDLE;
    }
}

/* hv_vq_cycle's server for virtio-blk. */
int hv_vblk_serve_ctx(struct hv_vq *q, const void *blk, int max)
{
    return hv_vblk_serve(q, (struct hv_blk *)(uintptr_t)blk, max);
}
