/* Declared register blocks served natively (issue 11 part 3).
 *
 * A device declares a block of registers (hvframe/regblock.py, from a construct Struct) and
 * each register's access semantics; the block is a bus range whose native function is
 * hv_regblock_access with the block as opaque. An access that needs no Python is answered
 * here without the GIL; anything else -- an undeclared offset, an access of another size
 * than the register's, a register the device has switched to Python, a full FIFO whose
 * policy says so -- is passed to the device's Python handler through py_call (hvcore.c,
 * which this file is compiled with in one translation unit).
 *
 * Semantics of a register (enum below), for accesses of exactly its offset and size:
 *   STORAGE    read: the stored value; write: stores the bits of write_mask
 *   READ_ONLY  read: the stored value; write: ignored
 *   W1C        read: the stored value; write: each 1 in write_mask & value clears that bit
 *   PY_VALUE   read: the value Python keeps current (hv_regblock_update); write: Python
 *   FIFO       write: one entry into a bounded ring (a data port); read: Python
 *   PYTHON     every access goes to Python
 * Any register may also reflect a FIFO's state in its reads: room_bits read as set while the
 * FIFO has room, empty_bits while it is empty (a line status register's "transmitter
 * ready" bits, say).
 *
 * Concurrency: each block has one small mutex, taken by every native write and every call
 * from Python that changes the block (values, native on/off, FIFO take). It is the innermost
 * lock of all: nothing is called and nothing waits while it is held, and it is never held
 * across py_call. So a write is atomic against other vCPUs and against the device's own
 * updates: a device that switches a register to Python and then takes the FIFO knows no
 * native write is half done. Native reads take no lock: the fields they read (value, native,
 * a FIFO's head and tail) are stored atomically under the mutex and loaded atomically, and a
 * read has no side effect, so one that races a change returns the state just before it. A full FIFO never blocks: its policy either passes the write
 * to Python (which may drain the ring itself, or drop and count) or drops and counts here.
 * The consumer of a FIFO (a device thread) sleeps in hv_regblock_fifo_wait on an eventfd
 * that a push signals (a non-blocking write, under the mutex so that hv_regblock_close
 * cannot close it meanwhile) only when the consumer said it is waiting, so steady output
 * costs the vCPU no system call.
 */
#include <sys/eventfd.h>

enum { HV_REG_STORAGE = 0, HV_REG_READ_ONLY = 1, HV_REG_W1C = 2, HV_REG_PY_VALUE = 3,
       HV_REG_FIFO = 4, HV_REG_PYTHON = 5, HV_REG_KINDS = 6 };
enum { HV_FIFO_FULL_PYTHON = 0, HV_FIFO_FULL_DROP = 1 };

#define HV_REGBLOCK_MAX_LEN (1u << 16)
#define HV_REGBLOCK_MAX_REGS 255     /* index[] holds register numbers + 1 in a byte */
#define HV_REGBLOCK_MAX_FIFOS 8
#define HV_FIFO_MAX_ENTRIES (1u << 24)

struct hv_reg {
    uint32_t offset, size, kind;
    int32_t fifo;                    /* FIFO it feeds (FIFO kind) or reflects (bits); -1 none */
    uint64_t value, write_mask, room_bits, empty_bits;
    uint32_t native;                 /* 0: the device has switched it to Python */
};

struct hv_fifo {
    uint8_t *buf;
    uint32_t cap;                    /* entries, a power of two */
    uint32_t width;                  /* bytes per entry: the data port's size */
    uint32_t full_policy;
    uint64_t head, tail;             /* entries pushed / taken since creation */
    uint64_t dropped;
    int efd;
    int waiting;                     /* the consumer sleeps on efd */
};

struct hv_regblock {
    pthread_mutex_t lock;
    int py_handle;                   /* the device's Python handler; -1: none (all ones) */
    uint32_t len, nregs, nfifos;
    uint8_t *index;                  /* offset -> register number + 1, 0 where none starts */
    struct hv_reg *regs;
    struct hv_fifo fifos[HV_REGBLOCK_MAX_FIFOS];
    uint64_t served;                 /* accesses answered here */
    uint64_t passed;                 /* accesses passed to Python */
};

void hv_regblock_free(struct hv_regblock *rb)
{
    if (!rb)
        return;
    for (uint32_t f = 0; f < rb->nfifos; f++) {
        free(rb->fifos[f].buf);
        if (rb->fifos[f].efd >= 0)
            close(rb->fifos[f].efd);
    }
    pthread_mutex_destroy(&rb->lock);
    free(rb->index);
    free(rb->regs);
    free(rb);
}

struct hv_regblock *hv_regblock_new(uint32_t len, uint32_t nregs, uint32_t nfifos)
{
    if (!len || len > HV_REGBLOCK_MAX_LEN || nregs > HV_REGBLOCK_MAX_REGS
        || nfifos > HV_REGBLOCK_MAX_FIFOS)
        return NULL;
    struct hv_regblock *rb = calloc(1, sizeof(*rb));
    if (!rb)
        return NULL;
    pthread_mutex_init(&rb->lock, NULL);
    rb->py_handle = -1;
    rb->len = len;
    rb->nregs = nregs;
    rb->nfifos = nfifos;
    for (uint32_t f = 0; f < HV_REGBLOCK_MAX_FIFOS; f++)
        rb->fifos[f].efd = -1;
    rb->index = calloc(len, 1);
    rb->regs = calloc(nregs ? nregs : 1, sizeof(*rb->regs));
    if (!rb->index || !rb->regs) {
        hv_regblock_free(rb);
        return NULL;
    }
    for (uint32_t i = 0; i < nregs; i++)
        rb->regs[i].fifo = -1;
    return rb;
}

/* Set-up, before the block is on a bus. 0 or -EINVAL / -ENOMEM / -errno. */
int hv_regblock_def_fifo(struct hv_regblock *rb, uint32_t f, uint32_t cap, uint32_t width,
                         uint32_t full_policy)
{
    if (f >= rb->nfifos || rb->fifos[f].buf || !cap || cap > HV_FIFO_MAX_ENTRIES
        || (cap & (cap - 1)) || !(width == 1 || width == 2 || width == 4 || width == 8)
        || full_policy > HV_FIFO_FULL_DROP)
        return -EINVAL;
    struct hv_fifo *q = &rb->fifos[f];
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0)
        return -errno;
    q->buf = malloc((size_t)cap * width);
    if (!q->buf)
        return -ENOMEM;
    q->cap = cap;
    q->width = width;
    q->full_policy = full_policy;
    return 0;
}

int hv_regblock_def_reg(struct hv_regblock *rb, uint32_t i, uint32_t offset, uint32_t size,
                        uint32_t kind, int32_t fifo, uint64_t value, uint64_t write_mask,
                        uint64_t room_bits, uint64_t empty_bits, uint32_t native)
{
    if (i >= rb->nregs || rb->regs[i].size || offset >= rb->len || size > rb->len - offset
        || !(size == 1 || size == 2 || size == 4 || size == 8) || kind >= HV_REG_KINDS
        || rb->index[offset])
        return -EINVAL;
    if (fifo >= 0 && ((uint32_t)fifo >= rb->nfifos || !rb->fifos[fifo].buf))
        return -EINVAL;
    if (kind == HV_REG_FIFO && (fifo < 0 || rb->fifos[fifo].width != size))
        return -EINVAL;
    if ((room_bits | empty_bits) && fifo < 0)
        return -EINVAL;
    rb->regs[i] = (struct hv_reg){ offset, size, kind, fifo, value, write_mask, room_bits,
                                   empty_bits, native ? 1 : 0 };
    rb->index[offset] = (uint8_t)(i + 1);
    return 0;
}

void hv_regblock_set_handler(struct hv_regblock *rb, int py_handle)
{
    __atomic_store_n(&rb->py_handle, py_handle, __ATOMIC_RELEASE);
}

/* ---- the exit path ------------------------------------------------------------------- */

static inline uint32_t fifo_level(const struct hv_fifo *q)
{
    /* Tail first: both only grow, so a push and a take racing this never make it negative;
     * at worst it is briefly too high, which clamps to full (the guest polls again). */
    uint64_t tail = __atomic_load_n(&q->tail, __ATOMIC_ACQUIRE);
    uint64_t head = __atomic_load_n(&q->head, __ATOMIC_ACQUIRE);
    uint64_t n = head - tail;
    return n > q->cap ? q->cap : (uint32_t)n;
}

/* What a read of r returns (no lock needed, see the top of this file). */
static uint64_t reg_value(const struct hv_regblock *rb, const struct hv_reg *r)
{
    uint64_t v = __atomic_load_n(&r->value, __ATOMIC_ACQUIRE);
    if (r->fifo >= 0) {
        const struct hv_fifo *q = &rb->fifos[r->fifo];
        uint32_t level = fifo_level(q);
        v &= ~(r->room_bits | r->empty_bits);
        if (level < q->cap)
            v |= r->room_bits;
        if (level == 0)
            v |= r->empty_bits;
    }
    return v;
}

/* Push one entry (lock held): 1 stored, 0 dropped, -1 full and left to Python. *wake is
 * set when the consumer must be signalled (after the lock is dropped). */
static int fifo_push(struct hv_fifo *q, uint64_t value, int *wake)
{
    if (fifo_level(q) >= q->cap) {
        if (q->full_policy == HV_FIFO_FULL_PYTHON)
            return -1;
        q->dropped++;
        return 0;
    }
    uint8_t *slot = q->buf + (size_t)(q->head & (q->cap - 1)) * q->width;
    switch (q->width) {     /* little-endian host: the low bytes of value */
    case 1: *slot = (uint8_t)value; break;
    case 2: memcpy(slot, &value, 2); break;
    case 4: memcpy(slot, &value, 4); break;
    default: memcpy(slot, &value, 8); break;
    }
    __atomic_store_n(&q->head, q->head + 1, __ATOMIC_RELEASE);
    if (q->waiting) {
        q->waiting = 0;
        *wake = 1;
    }
    return 1;
}

/* (lock held, so that hv_regblock_close cannot close the fd under it) A non-blocking write:
 * it never waits. */
static void fifo_signal(struct hv_fifo *q)
{
    uint64_t one = 1;
    if (q->efd < 0)
        return;
    ssize_t r = write(q->efd, &one, sizeof(one));
    (void)r;    /* EAGAIN: the counter is saturated, a wake-up is pending anyway */
}

/* The bus's native function for a register block (opaque: the block). */
uint64_t hv_regblock_access(void *opaque, uint64_t offset, uint32_t size, uint64_t value,
                            int is_write)
{
    struct hv_regblock *rb = opaque;
    if (offset < rb->len && rb->index[offset]) {
        struct hv_reg *r = &rb->regs[rb->index[offset] - 1];
        if (r->size == size && !is_write) {
            /* The polled status read: no lock, no side effect. */
            if (r->kind != HV_REG_FIFO && r->kind != HV_REG_PYTHON
                && __atomic_load_n(&r->native, __ATOMIC_ACQUIRE)) {
                __atomic_add_fetch(&rb->served, 1, __ATOMIC_RELAXED);
                return reg_value(rb, r);
            }
        } else if (r->size == size) {
            int served = 1, wake = 0;
            pthread_mutex_lock(&rb->lock);
            if (!r->native)
                served = 0;
            else {
                switch (r->kind) {
                case HV_REG_STORAGE:
                    __atomic_store_n(&r->value, (r->value & ~r->write_mask)
                                     | (value & r->write_mask), __ATOMIC_RELEASE);
                    break;
                case HV_REG_READ_ONLY:
                    break;
                case HV_REG_W1C:
                    __atomic_store_n(&r->value, r->value & ~(value & r->write_mask),
                                     __ATOMIC_RELEASE);
                    break;
                case HV_REG_FIFO:
                    served = fifo_push(&rb->fifos[r->fifo], value, &wake) >= 0;
                    break;
                default:
                    served = 0;
                }
            }
            if (wake)
                fifo_signal(&rb->fifos[r->fifo]);
            pthread_mutex_unlock(&rb->lock);
            if (served) {
                __atomic_add_fetch(&rb->served, 1, __ATOMIC_RELAXED);
                return 0;
            }
        }
    }
    __atomic_add_fetch(&rb->passed, 1, __ATOMIC_RELAXED);
    int h = __atomic_load_n(&rb->py_handle, __ATOMIC_ACQUIRE);
    if (h < 0)
        return is_write ? 0 : ~0ULL;
    return py_call(h, offset, size, value, is_write);
}

/* ---- the device's side (from Python; cffi calls these without the GIL) ------------------ */

static int reg_ok(const struct hv_regblock *rb, uint32_t i)
{
    return i < rb->nregs && rb->regs[i].size;
}

/* The value a native read of register i would return now. */
uint64_t hv_regblock_read(struct hv_regblock *rb, uint32_t i)
{
    if (!reg_ok(rb, i))
        return 0;
    pthread_mutex_lock(&rb->lock);
    uint64_t v = reg_value(rb, &rb->regs[i]);
    pthread_mutex_unlock(&rb->lock);
    return v;
}

/* Clear, then set bits of the stored value, in one step against native accesses; returns
 * the new stored value. update(i, ~0, v) stores v. */
uint64_t hv_regblock_update(struct hv_regblock *rb, uint32_t i, uint64_t clear, uint64_t set)
{
    if (!reg_ok(rb, i))
        return 0;
    pthread_mutex_lock(&rb->lock);
    struct hv_reg *r = &rb->regs[i];
    uint64_t v = (r->value & ~clear) | set;
    __atomic_store_n(&r->value, v, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&rb->lock);
    return v;
}

/* Switch registers (bit i of mask: register i) between native (on) and Python (off), all in
 * one step: once this returns, no native access to them is in progress. */
void hv_regblock_set_native(struct hv_regblock *rb, uint64_t mask, int on)
{
    pthread_mutex_lock(&rb->lock);
    for (uint32_t i = 0; i < rb->nregs && i < 64; i++)
        if (mask & (1ULL << i))
            __atomic_store_n(&rb->regs[i].native, on ? 1u : 0u, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&rb->lock);
}

/* Bit i set: register i is served natively. */
uint64_t hv_regblock_native_mask(struct hv_regblock *rb)
{
    uint64_t m = 0;
    pthread_mutex_lock(&rb->lock);
    for (uint32_t i = 0; i < rb->nregs && i < 64; i++)
        if (rb->regs[i].native)
            m |= 1ULL << i;
    pthread_mutex_unlock(&rb->lock);
    return m;
}

/* Take up to max entries (oldest first) into out (max * width bytes); returns how many. */
uint32_t hv_regblock_fifo_take(struct hv_regblock *rb, uint32_t f, uint8_t *out, uint32_t max)
{
    if (f >= rb->nfifos || !rb->fifos[f].buf)
        return 0;
    struct hv_fifo *q = &rb->fifos[f];
    pthread_mutex_lock(&rb->lock);
    uint32_t n = fifo_level(q);
    if (n > max)
        n = max;
    uint32_t start = (uint32_t)(q->tail & (q->cap - 1));
    uint32_t first = q->cap - start < n ? q->cap - start : n;
    memcpy(out, q->buf + (size_t)start * q->width, (size_t)first * q->width);
    memcpy(out + (size_t)first * q->width, q->buf, (size_t)(n - first) * q->width);
    __atomic_store_n(&q->tail, q->tail + n, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&rb->lock);
    return n;
}

/* Entries in FIFO f now. */
uint32_t hv_regblock_fifo_level(struct hv_regblock *rb, uint32_t f)
{
    if (f >= rb->nfifos)
        return 0;
    pthread_mutex_lock(&rb->lock);
    uint32_t n = fifo_level(&rb->fifos[f]);
    pthread_mutex_unlock(&rb->lock);
    return n;
}

/* (the FIFO's consumer) Wait until FIFO f holds an entry, up to timeout_ms (< 0: forever)
 * or a kick: the level (0 on timeout or kick), or -errno. */
int64_t hv_regblock_fifo_wait(struct hv_regblock *rb, uint32_t f, int timeout_ms)
{
    if (f >= rb->nfifos || !rb->fifos[f].buf)
        return -EINVAL;
    struct hv_fifo *q = &rb->fifos[f];
    pthread_mutex_lock(&rb->lock);
    uint32_t n = fifo_level(q);
    int efd = q->efd;
    q->waiting = n == 0 && efd >= 0;
    pthread_mutex_unlock(&rb->lock);
    if (n)
        return n;
    if (efd < 0)
        return -EBADF;      /* closed: nobody will signal */
    struct pollfd p = { .fd = efd, .events = POLLIN };
    int r;
    do
        r = poll(&p, 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    int err = r < 0 ? errno : 0;
    uint64_t count;
    ssize_t got = read(efd, &count, sizeof(count));        /* reset the eventfd */
    (void)got;
    pthread_mutex_lock(&rb->lock);
    q->waiting = 0;
    n = fifo_level(q);
    pthread_mutex_unlock(&rb->lock);
    return err ? -(int64_t)err : (int64_t)n;
}

/* Wake FIFO f's consumer out of hv_regblock_fifo_wait (to stop it, say). */
void hv_regblock_fifo_kick(struct hv_regblock *rb, uint32_t f)
{
    if (f >= rb->nfifos || !rb->fifos[f].buf)
        return;
    pthread_mutex_lock(&rb->lock);
    fifo_signal(&rb->fifos[f]);
    pthread_mutex_unlock(&rb->lock);
}

/* Give back the FIFOs' eventfds when the device closes (after their consumers stopped): the
 * block itself may still be reached by a vCPU until its range is gone, and stays valid. */
void hv_regblock_close(struct hv_regblock *rb)
{
    pthread_mutex_lock(&rb->lock);
    for (uint32_t f = 0; f < rb->nfifos; f++) {
        if (rb->fifos[f].efd >= 0)
            close(rb->fifos[f].efd);
        rb->fifos[f].efd = -1;
        rb->fifos[f].waiting = 0;
    }
    pthread_mutex_unlock(&rb->lock);
}

/* FIFO f's counters: entries pushed, taken and dropped since the block was made. */
void hv_regblock_fifo_counts(struct hv_regblock *rb, uint32_t f, uint64_t *pushed,
                             uint64_t *taken, uint64_t *dropped)
{
    *pushed = *taken = *dropped = 0;
    if (f >= rb->nfifos)
        return;
    pthread_mutex_lock(&rb->lock);
    *pushed = rb->fifos[f].head;
    *taken = rb->fifos[f].tail;
    *dropped = rb->fifos[f].dropped;
    pthread_mutex_unlock(&rb->lock);
}
