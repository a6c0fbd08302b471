/* The core's native API for plugins (hvframe_native.h): guest RAM, the split virtqueue,
 * interrupt gates and file I/O, with no knowledge of any device.
 *
 * The virtqueue code consumes available chains the way hvframe.virtio.virtqueue.VirtQueue.pop()
 * does (the same validations, in the same ring state). Whatever a device's chain server
 * declines, and any invalid chain, is left available with the state untouched, for the Python
 * path, which then serves the chain or raises VirtqueueError.
 *
 * Every guest value is hostile: guest addresses are translated through the RAM region list
 * only, with overflow-safe range checks, and each descriptor is copied once before use so the
 * guest cannot change it between check and use.
 *
 * Included into the cffi module after hvcore.c (one translation unit).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include "hvframe_native.h"

_Static_assert(HV_RAM_MAX_REGIONS == sizeof(((struct hv_ram *)0)->regions)
               / sizeof(struct hv_ram_region), "hv_ram regions");
_Static_assert(HV_CHAIN_MAX_SEGS == sizeof(((struct hv_chain *)0)->iov) / sizeof(struct iovec),
               "hv_chain iov");

/* ---- guest RAM ------------------------------------------------------------------------- */

static uint8_t *ram_translate(const struct hv_ram *ram, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < ram->nregions && i < HV_RAM_MAX_REGIONS; i++) {
        const struct hv_ram_region *r = &ram->regions[i];
        if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len)
            return (uint8_t *)ram->mem + r->host_offset + (gpa - r->gpa);
    }
    return NULL;
}

static int ram_ok(const struct hv_ram *ram)
{
    if (!ram->mem || ram->nregions == 0 || ram->nregions > HV_RAM_MAX_REGIONS)
        return 0;
    for (uint32_t i = 0; i < ram->nregions; i++) {
        const struct hv_ram_region *r = &ram->regions[i];
        if (r->host_offset > ram->mem_size || r->size > ram->mem_size - r->host_offset)
            return 0;
    }
    return 1;
}

/* ---- the split virtqueue --------------------------------------------------------------- */

static uint16_t *vq_avail_idx(const struct hv_vq *q)
{
    return (uint16_t *)(q->avail + HV_VRING_AVAIL_IDX_OFF);
}

/* avail_event: after the used ring; used_event: after the available ring. */
static uint16_t *vq_avail_event(const struct hv_vq *q)
{
    return (uint16_t *)(q->used + HV_VRING_USED_RING_OFF
                        + sizeof(struct hv_vring_used_elem) * q->size);
}

static int vq_begin(struct hv_vq *q)
{
    q->desc = q->avail = q->used = NULL;
    if (!ram_ok(&q->ram))
        return HV_VQ_STOP_STATE;
    if (q->size == 0 || q->size > HV_VRING_MAX_SIZE || (q->size & (q->size - 1)))
        return HV_VQ_STOP_STATE;
    uint64_t ev = q->event_idx ? HV_VRING_EVENT_SIZE : 0;
    uint8_t *desc = ram_translate(&q->ram, q->desc_addr,
                                  (uint64_t)sizeof(struct hv_vring_desc) * q->size);
    uint8_t *avail = ram_translate(&q->ram, q->avail_addr, HV_VRING_AVAIL_RING_OFF
                                   + (uint64_t)HV_VRING_AVAIL_ELEM_SIZE * q->size + ev);
    uint8_t *used = ram_translate(&q->ram, q->used_addr, HV_VRING_USED_RING_OFF
                                  + (uint64_t)sizeof(struct hv_vring_used_elem) * q->size + ev);
    if (!desc || !avail || !used)
        return HV_VQ_STOP_STATE;
    /* The aligned 16/32-bit ring accesses below need aligned host addresses. */
    if ((uintptr_t)desc % 16 || (uintptr_t)avail % 2 || (uintptr_t)used % 4)
        return HV_VQ_STOP_STATE;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    return 0;
}

/* VirtQueue._walk of the chain at `head`: HV_VQ_CHAIN, HV_VQ_STOP_INVALID or
 * HV_VQ_STOP_UNSUPPORTED. */
static int vq_walk(const struct hv_vq *q, uint16_t head, struct hv_chain *ch)
{
    const uint8_t *table = q->desc;
    uint32_t entries = q->size, idx = head, steps = 0, total = 0, nwritable = 0;
    uint64_t rlen = 0, wlen = 0;
    int in_indirect = 0;

    ch->head = head;
    ch->n = ch->nr = 0;
    ch->table = NULL;
    ch->table_len = 0;
    if (head >= q->size)
        return HV_VQ_STOP_INVALID;
    for (;;) {
        struct hv_vring_desc d;
        if (++steps > entries)
            return HV_VQ_STOP_INVALID;            /* a loop */
        memcpy(&d, table + sizeof(d) * idx, sizeof(d));   /* idx < entries here */
        if (d.flags & HV_VRING_DESC_F_INDIRECT) {
            /* One level only: an indirect table naming another is invalid. */
            if (in_indirect || !q->indirect || (d.flags & HV_VRING_DESC_F_NEXT))
                return HV_VQ_STOP_INVALID;
            if (d.len == 0 || d.len % sizeof(d))
                return HV_VQ_STOP_INVALID;
            table = ram_translate(&q->ram, d.addr, d.len);
            if (!table)
                return HV_VQ_STOP_INVALID;
            entries = d.len / sizeof(d);
            if (entries > 0x10000)
                entries = 0x10000;                  /* `next` is 16-bit */
            ch->table = table;
            ch->table_len = entries * (uint32_t)sizeof(d);
            in_indirect = 1;
            idx = 0;
            steps = 0;
            continue;
        }
        if (q->max_chain && ++total > q->max_chain)
            return HV_VQ_STOP_INVALID;
        uint8_t *p = ram_translate(&q->ram, d.addr, d.len);
        if (!p)
            return HV_VQ_STOP_INVALID;
        if (d.flags & HV_VRING_DESC_F_WRITE) {
            nwritable++;
            wlen += d.len;
            if (wlen > 0xFFFFFFFFu)
                return HV_VQ_STOP_INVALID;
        } else {
            if (nwritable)
                return HV_VQ_STOP_INVALID;        /* readable after writable */
            rlen += d.len;
            if (rlen > 0xFFFFFFFFu)
                return HV_VQ_STOP_INVALID;
        }
        if (d.len) {
            if (ch->n == HV_CHAIN_MAX_SEGS)
                return HV_VQ_STOP_UNSUPPORTED;
            ch->iov[ch->n].iov_base = p;
            ch->iov[ch->n].iov_len = d.len;
            ch->n++;
            if (!(d.flags & HV_VRING_DESC_F_WRITE))
                ch->nr++;
        }
        if (!(d.flags & HV_VRING_DESC_F_NEXT)) {
            ch->rlen = rlen;
            ch->wlen = wlen;
            return HV_VQ_CHAIN;
        }
        if (d.next >= entries)
            return HV_VQ_STOP_INVALID;
        idx = d.next;
    }
}

static int vq_peek(struct hv_vq *q, struct hv_chain *ch)
{
    if (q->shadow_avail == q->last_avail_idx) {
        /* Load avail.idx before the ring entries it covers (acquire). */
        uint16_t idx = __atomic_load_n(vq_avail_idx(q), __ATOMIC_ACQUIRE);
        if ((uint16_t)(idx - q->last_avail_idx) > q->size)
            return HV_VQ_STOP_INVALID;          /* more than a queue ahead */
        q->shadow_avail = idx;
        if (idx == q->last_avail_idx)
            return HV_VQ_STOP_EMPTY;
    }
    uint16_t head;
    memcpy(&head, q->avail + HV_VRING_AVAIL_RING_OFF
                  + HV_VRING_AVAIL_ELEM_SIZE * (q->last_avail_idx & (q->size - 1)), sizeof(head));
    return vq_walk(q, head, ch);
}

/* The chain `ahead` places after the next available one, not consumed. */
static int vq_peek_at(struct hv_vq *q, uint32_t ahead, struct hv_chain *ch)
{
    if (ahead >= q->size)
        return HV_VQ_STOP_EMPTY;
    if ((uint16_t)(q->shadow_avail - q->last_avail_idx) <= ahead) {
        uint16_t idx = __atomic_load_n(vq_avail_idx(q), __ATOMIC_ACQUIRE);
        if ((uint16_t)(idx - q->last_avail_idx) > q->size)
            return HV_VQ_STOP_INVALID;          /* more than a queue ahead */
        q->shadow_avail = idx;
        if ((uint16_t)(idx - q->last_avail_idx) <= ahead)
            return HV_VQ_STOP_EMPTY;
    }
    uint16_t head;
    memcpy(&head, q->avail + HV_VRING_AVAIL_RING_OFF + HV_VRING_AVAIL_ELEM_SIZE
                  * ((uint16_t)(q->last_avail_idx + ahead) & (q->size - 1)), sizeof(head));
    return vq_walk(q, head, ch);
}

/* n chains consumed and returned together; used.idx published once, after the elements. */
static void vq_push_n(struct hv_vq *q, const uint16_t *heads, const uint32_t *lens, uint32_t n)
{
    if (n == 0)
        return;
    q->last_avail_idx = (uint16_t)(q->last_avail_idx + n);
    if (q->event_idx && q->notifications)
        __atomic_store_n(vq_avail_event(q), q->last_avail_idx, __ATOMIC_RELAXED);
    for (uint32_t i = 0; i < n; i++) {
        struct hv_vring_used_elem e = { heads[i], lens[i] };
        memcpy(q->used + HV_VRING_USED_RING_OFF
               + sizeof(e) * ((uint16_t)(q->used_idx + i) & (q->size - 1)), &e, sizeof(e));
    }
    q->used_idx = (uint16_t)(q->used_idx + n);
    __atomic_store_n((uint16_t *)(q->used + HV_VRING_USED_IDX_OFF), q->used_idx,
                     __ATOMIC_RELEASE);
}

/* VirtQueue.pop's bookkeeping, then push: the element before the index (release store). */
static void vq_push(struct hv_vq *q, const struct hv_chain *ch, uint32_t used_len)
{
    q->last_avail_idx++;
    if (q->event_idx && q->notifications)
        __atomic_store_n(vq_avail_event(q), q->last_avail_idx, __ATOMIC_RELAXED);
    struct hv_vring_used_elem e = { ch->head, used_len };
    memcpy(q->used + HV_VRING_USED_RING_OFF + sizeof(e) * (q->used_idx & (q->size - 1)), &e,
           sizeof(e));
    q->used_idx++;
    __atomic_store_n((uint16_t *)(q->used + HV_VRING_USED_IDX_OFF), q->used_idx,
                     __ATOMIC_RELEASE);
}

/* Serve up to `max` chains with fn, which sees each valid chain once; stops at the first
 * chain fn declines or that is invalid, leaving it available. Needs vq_begin first. */
static int vq_serve_begun(struct hv_vq *q, hv_chain_fn fn, void *ctx, int max)
{
    struct hv_chain ch;
    int served = 0;
    for (;;) {
        if (served >= max) {
            q->stop = HV_VQ_STOP_MAX;
            return served;
        }
        int rc = vq_peek(q, &ch);
        if (rc != HV_VQ_CHAIN) {
            q->stop = rc;
            return served;
        }
        int64_t used_len = fn(ctx, q, &ch);
        if (used_len < 0) {
            q->stop = (int)-used_len;
            if (q->stop != HV_VQ_STOP_UNSUPPORTED && q->stop != HV_VQ_STOP_STATE)
                q->stop = HV_VQ_STOP_DECLINED;
            return served;
        }
        vq_push(q, &ch, used_len > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)used_len);
        served++;
    }
}

/* The serve loop, for plugins (hv_api.vq_serve) and Python (NativeQueue.serve). */
int hv_vq_serve(struct hv_vq *q, hv_chain_fn fn, void *ctx, int max)
{
    q->stop = vq_begin(q);
    if (q->stop)
        return 0;
    return vq_serve_begun(q, fn, ctx, max);
}

/* A device's batch server in place of the serve loop; what it says is checked, not trusted:
 * a count out of range or a stop code that is no stop is a device bug (HV_VQ_STOP_STATE). */
static int vq_serve_batch_begun(struct hv_vq *q, hv_batch_fn fn, void *ctx, int max)
{
    q->stop = HV_VQ_STOP_STATE;
    if (!fn)
        return 0;
    int served = fn(ctx, q, max);
    if (served < 0 || served > max) {
        q->stop = HV_VQ_STOP_STATE;
        return 0;
    }
    /* MAX short of max would have the cycle call again at once, for ever. */
    if (q->stop < HV_VQ_STOP_EMPTY || q->stop > HV_VQ_STOP_STATE
        || (q->stop == HV_VQ_STOP_MAX && served != max))
        q->stop = HV_VQ_STOP_STATE;
    return served;
}

/* The batch server's serve loop, for Python (NativeQueue.serve_batch). */
int hv_vq_serve_batch(struct hv_vq *q, hv_batch_fn fn, void *ctx, int max)
{
    q->stop = vq_begin(q);
    if (q->stop)
        return 0;
    return vq_serve_batch_begun(q, fn, ctx, max);
}

/* Busy-poll until avail.idx differs from last_avail_idx (1), `ns` nanoseconds pass or another
 * thread asks for the queue (0). Catches the driver's next batch without a sleep/wake-up
 * round trip (adaptive polling, as QEMU's iothreads do). Every 64 looks it yields the CPU:
 * the thread that would end the poll (the driver's vCPU) is often runnable on this very CPU,
 * as the driver's kick woke the worker onto the driver's CPU and preempted it there, and it
 * waited out the whole window behind the spin (KVM's halt polling stops on
 * single_task_running() for the same reason). With nothing else to run the yield is one system call. Streaming receive, its
 * worker and the driver on one CPU, spent 9% of the worker's time here: 1.38-1.43 million
 * frames/s without the yield, 1.62-1.65 million with it (2026-12-05). */
static int vq_poll_avail(struct hv_vq *q, uint64_t ns)
{
    const uint16_t *idx = vq_avail_idx(q);
    uint64_t t0 = hv_now_ns();
    for (unsigned i = 1;; i++) {
        if (__atomic_load_n(idx, __ATOMIC_ACQUIRE) != q->last_avail_idx)
            return 1;
        hv_cpu_relax();
        if (i % 64 == 0) {
            if (q->yield_req)
                return 0;
            if (hv_now_ns() - t0 >= ns)
                return 0;
            sched_yield();
        }
    }
}

/* VirtQueue.disable_notifications / enable_notifications (the latter without the re-read). */
static void vq_set_notifications(struct hv_vq *q, int on)
{
    q->notifications = (uint8_t)on;
    if (q->event_idx) {
        /* Off: avail_event simply stops advancing. */
        if (on)
            __atomic_store_n(vq_avail_event(q), q->last_avail_idx, __ATOMIC_RELAXED);
        return;
    }
    uint16_t *flags = (uint16_t *)(q->used + HV_VRING_FLAGS_OFF);
    uint16_t f = __atomic_load_n(flags, __ATOMIC_RELAXED);
    f = on ? (uint16_t)(f & ~HV_VRING_USED_F_NO_NOTIFY) : (uint16_t)(f | HV_VRING_USED_F_NO_NOTIFY);
    __atomic_store_n(flags, f, __ATOMIC_RELAXED);
}

/* VirtQueue.needs_notification: interrupt the driver for what was pushed since last time?
 * EVENT_IDX's test is done in 16-bit arithmetic, so it holds across index wrap-around. */
static int vq_needs_notification(struct hv_vq *q)
{
    uint16_t old = q->signalled_used, now = q->used_idx;
    q->signalled_used = now;
    if (old == now)
        return 0;
    /* used.idx is stored before used_event / avail.flags is loaded (store-load: full fence). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (q->event_idx) {
        uint16_t used_event = __atomic_load_n(
            (const uint16_t *)(q->avail + HV_VRING_AVAIL_RING_OFF
                               + HV_VRING_AVAIL_ELEM_SIZE * q->size), __ATOMIC_RELAXED);
        return (uint16_t)(now - used_event - 1) < (uint16_t)(now - old);
    }
    uint16_t flags = __atomic_load_n((const uint16_t *)(q->avail + HV_VRING_FLAGS_OFF),
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
 * serve every available chain with fn, interrupt the driver (irqfd) when the ring asks for
 * it, poll `poll_ns` for the next batch, and re-enable notifications once idle.
 * Returns HV_VQ_CYCLE_IDLE (nothing available, notifications on: sleep until a kick),
 * HV_VQ_CYCLE_PYTHON (the next chain is for the Python path; q->stop says why; notifications
 * off), HV_VQ_CYCLE_NOTIFY (interrupt the driver, the gate being shut, then call again) or
 * HV_VQ_CYCLE_YIELD (another thread asked for the queue: notifications on, work may remain).
 * q->served counts the chains served. */
static int vq_cycle(struct hv_vq *q, hv_chain_fn fn, hv_batch_fn batch_fn, void *ctx,
                    const struct hv_irq_gate *irq, uint64_t poll_ns)
{
    /* Handed back for an interrupt right after a batch, the poll for the next one is owed. */
    int owed = q->repoll != 0;
    q->repoll = 0;
    q->served = 0;
    q->stop = vq_begin(q);
    if (q->stop)
        return HV_VQ_CYCLE_PYTHON;
    for (;;) {
        vq_set_notifications(q, 0);
        uint32_t batch = 0;
        do
            batch += (uint32_t)(batch_fn ? vq_serve_batch_begun(q, batch_fn, ctx, (int)q->size)
                                         : vq_serve_begun(q, fn, ctx, (int)q->size));
        while (q->stop == HV_VQ_STOP_MAX);
        q->served += batch;
        if (q->stop != HV_VQ_STOP_EMPTY)
            return HV_VQ_CYCLE_PYTHON;
        /* The batch is complete: tell the driver before looking for more. */
        if (vq_needs_notification(q) && !irq_gate_fire(irq)) {
            q->repoll = batch || owed;
            return HV_VQ_CYCLE_NOTIFY;
        }
        if ((batch || owed) && poll_ns && !q->yield_req && vq_poll_avail(q, poll_ns)) {
            owed = 0;
            continue;
        }
        owed = 0;
        vq_set_notifications(q, 1);
        if (q->yield_req)
            return HV_VQ_CYCLE_YIELD;
        /* Notifications on before avail.idx is re-read (store-load: full fence); anything
         * that arrived meanwhile came without a kick. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(vq_avail_idx(q), __ATOMIC_ACQUIRE) == q->last_avail_idx)
            return HV_VQ_CYCLE_IDLE;
    }
}

int hv_vq_cycle(struct hv_vq *q, hv_chain_fn fn, void *ctx, const struct hv_irq_gate *irq,
                uint64_t poll_ns)
{
    return vq_cycle(q, fn, NULL, ctx, irq, poll_ns);
}

/* hv_vq_cycle with a batch server (hv_batch_fn) in place of the chain server. */
int hv_vq_cycle_batch(struct hv_vq *q, hv_batch_fn fn, void *ctx, const struct hv_irq_gate *irq,
                      uint64_t poll_ns)
{
    if (!fn) {
        q->served = 0;
        q->repoll = 0;
        q->stop = HV_VQ_STOP_STATE;
        return HV_VQ_CYCLE_PYTHON;
    }
    return vq_cycle(q, NULL, fn, ctx, irq, poll_ns);
}


/* ---- file I/O -------------------------------------------------------------------------- */

/* Drop the first n bytes of the iovec array *iov (*cnt entries): whole entries, then the
 * front of a partly done one. */
static void iov_consume(struct iovec **iov, int *cnt, size_t n)
{
    while (*cnt > 0 && n >= (*iov)->iov_len) {
        n -= (*iov)->iov_len;
        (*iov)++;
        (*cnt)--;
    }
    if (*cnt > 0 && n) {
        (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + n;
        (*iov)->iov_len -= n;
    }
}

static int file_rw(int fd, struct iovec *iov, int cnt, uint64_t off, int write)
{
    while (cnt > 0) {
        int chunk = cnt < HV_CHAIN_MAX_SEGS ? cnt : HV_CHAIN_MAX_SEGS;
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
        iov_consume(&iov, &cnt, (size_t)n);
    }
    return 0;
}

static int file_datasync(int fd)
{
    int rc;
    do
        rc = fdatasync(fd);
    while (rc < 0 && errno == EINTR);
    return rc < 0 ? errno : 0;
}

static int file_read_cached(int fd, struct iovec *iov, int cnt, uint64_t off)
{
#ifdef RWF_NOWAIT
    while (cnt > 0) {
        int chunk = cnt < HV_CHAIN_MAX_SEGS ? cnt : HV_CHAIN_MAX_SEGS;
        ssize_t n = preadv2(fd, iov, chunk, (off_t)off, RWF_NOWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* EOPNOTSUPP: a file system without NOWAIT reads; either way, not now */
            return errno == EOPNOTSUPP || errno == EINVAL ? EAGAIN : errno;
        }
        iov_consume(&iov, &cnt, (size_t)n);
        if (cnt > 0)
            return EAGAIN;          /* a short read: the rest is not cached (or past EOF) */
        off += (uint64_t)n;
    }
    return 0;
#else
    (void)fd; (void)iov; (void)cnt; (void)off;
    return EAGAIN;
#endif
}

/* ---- eventfds ------------------------------------------------------------------------- */

/* Wait for an eventfd (opened EFD_NONBLOCK) the way a halted vCPU waits for an interrupt
 * under KVM: spin up to spin_ns (KVM's halt polling), then sleep up to timeout_ms (< 0:
 * forever). Returns the count read, 0 on timeout, or -errno. Called without the GIL. */
int64_t hv_eventfd_wait(int fd, uint64_t spin_ns, int timeout_ms)
{
    uint64_t count;
    uint64_t t0 = hv_now_ns();
    for (unsigned i = 0;; i++) {
        if (read(fd, &count, sizeof(count)) == (ssize_t)sizeof(count))
            return (int64_t)count;
        if (errno != EAGAIN && errno != EINTR)
            return -errno;
        if (i % 16 == 15 && hv_now_ns() - t0 >= spin_ns)
            break;
    }
    for (;;) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        int r = poll(&p, 1, timeout_ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            return 0;
        if (read(fd, &count, sizeof(count)) == (ssize_t)sizeof(count))
            return (int64_t)count;
        if (errno != EAGAIN && errno != EINTR)
            return -errno;
    }
}

/* ---- the table ------------------------------------------------------------------------- */

/* Until set, the API's py_call answers like an empty bus. */
static uint64_t py_call_unset(int handle, uint64_t offset, uint32_t size, uint64_t value,
                              int is_write)
{
    (void)handle; (void)offset; (void)size; (void)value;
    return is_write ? 0 : ~0ULL;
}

/* Not const: py_call lives in the exit-dispatch module and is filled in at import
 * (hv_api_set_py_call, from hvframe.core_native), before any plugin is bound. */
static struct hv_api api = {
    .version = HV_API_VERSION,
    .size = sizeof(struct hv_api),
    .ram_translate = ram_translate,
    .ram_ok = ram_ok,
    .vq_begin = vq_begin,
    .vq_peek = vq_peek,
    .vq_push = vq_push,
    .vq_serve = hv_vq_serve,
    .vq_needs_notification = vq_needs_notification,
    .vq_set_notifications = vq_set_notifications,
    .irq_gate_fire = irq_gate_fire,
    .file_rw = file_rw,
    .file_datasync = file_datasync,
    .file_read_cached = file_read_cached,
    .eventfd_wait = hv_eventfd_wait,
    .vq_peek_at = vq_peek_at,
    .vq_push_n = vq_push_n,
    .vq_poll_avail = vq_poll_avail,
    .py_call = py_call_unset,
};

const struct hv_api *hv_api(void)
{
    return &api;
}

void hv_api_set_py_call(hv_py_call_fn fn)
{
    api.py_call = fn ? fn : py_call_unset;
}
