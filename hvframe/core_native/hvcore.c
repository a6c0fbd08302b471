/* hvframe native exit-dispatch core.
 *
 * Each vCPU thread calls hv_vcpu_run(), which loops on KVM_RUN with the GIL released (cffi
 * releases it around the call) and routes port and MMIO exits by address range. A range is
 * served either by a C function or by a Python handler reached through the cffi
 * direct call into the interpreter (py_call), which takes the GIL only for that call.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <time.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/kvm.h>
#include "hvcore.h"

static uint64_t py_call(int handle, uint64_t offset, uint32_t size, uint64_t value, int is_write);

static inline uint64_t size_mask(uint32_t size)
{
    return size >= 8 ? ~0ULL : ((1ULL << (size * 8)) - 1);
}

/* ---- buses ------------------------------------------------------------------------------ */

struct hv_bus *hv_bus_new(void)
{
    struct hv_bus *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    pthread_rwlock_init(&b->lock, NULL);
    return b;
}

void hv_bus_free(struct hv_bus *b)
{
    if (!b)
        return;
    pthread_rwlock_destroy(&b->lock);
    free(b->ranges);
    free(b);
}

/* Index of the first range whose base is > addr. */
static int upper_bound(const struct hv_bus *b, uint64_t addr)
{
    int lo = 0, hi = b->count;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (b->ranges[mid].base <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* 0, -EINVAL (empty or wrapping range), -EEXIST (overlap), -ENOMEM. */
int hv_bus_add(struct hv_bus *b, uint64_t base, uint64_t len, int py_handle,
               hv_native_fn fn, void *opaque, struct hv_access *acc)
{
    if (len == 0 || base + len - 1 < base || (py_handle < 0 && !fn))
        return -EINVAL;
    int rc = 0;
    pthread_rwlock_wrlock(&b->lock);
    int i = upper_bound(b, base);
    if (i > 0) {
        const struct hv_range *prev = &b->ranges[i - 1];
        if (prev->base + prev->len - 1 >= base)
            rc = -EEXIST;
    }
    if (!rc && i < b->count && b->ranges[i].base <= base + len - 1)
        rc = -EEXIST;
    if (!rc && b->count == b->cap) {
        int ncap = b->cap ? b->cap * 2 : 16;
        struct hv_range *n = realloc(b->ranges, ncap * sizeof(*n));
        if (!n)
            rc = -ENOMEM;
        else {
            b->ranges = n;
            b->cap = ncap;
        }
    }
    if (!rc) {
        memmove(&b->ranges[i + 1], &b->ranges[i], (b->count - i) * sizeof(*b->ranges));
        b->ranges[i] = (struct hv_range){ base, len, py_handle, fn, opaque, acc };
        b->count++;
    }
    pthread_rwlock_unlock(&b->lock);
    return rc;
}

/* Remove the range that starts at base: 0 or -ENOENT. */
int hv_bus_remove(struct hv_bus *b, uint64_t base)
{
    int rc = -ENOENT;
    pthread_rwlock_wrlock(&b->lock);
    int i = upper_bound(b, base) - 1;
    if (i >= 0 && b->ranges[i].base == base) {
        memmove(&b->ranges[i], &b->ranges[i + 1], (b->count - i - 1) * sizeof(*b->ranges));
        b->count--;
        rc = 0;
    }
    pthread_rwlock_unlock(&b->lock);
    return rc;
}

/* Find the owner of addr; the range is copied so that the handler runs unlocked and may
 * itself add or remove ranges (a BAR write moving its own device, say). */
static int bus_lookup(struct hv_bus *b, uint64_t addr, struct hv_range *out)
{
    int found = 0;
    pthread_rwlock_rdlock(&b->lock);
    int i = upper_bound(b, addr) - 1;
    if (i >= 0 && addr - b->ranges[i].base < b->ranges[i].len) {
        *out = b->ranges[i];
        __atomic_add_fetch(&b->ranges[i].hits, 1, __ATOMIC_RELAXED);
        found = 1;
    }
    pthread_rwlock_unlock(&b->lock);
    return found;
}

static inline uint64_t range_call(const struct hv_range *r, uint64_t off, uint32_t size,
                                  uint64_t value, int is_write)
{
    if (r->py_handle >= 0)
        return py_call(r->py_handle, off, size, value, is_write);
    return r->fn(r->opaque, off, size, value, is_write);
}

/* One unit [uoff, uoff+usize) of which the guest touched bytes [lo, hi): a whole-unit call,
 * or a partial one resolved by the unit's rule. Returns the unit's value read (reads). */
static uint64_t unit_access(const struct hv_range *r, struct hv_access *a, uint64_t uoff,
                            uint32_t usize, uint64_t lo, uint64_t hi, uint64_t part,
                            int is_write, int partial)
{
    uint32_t shift = 8 * (uint32_t)(lo - uoff);
    uint64_t lanes = size_mask((uint32_t)(hi - lo)) << shift;
    if (!is_write)
        return range_call(r, uoff, usize, 0, 0) & size_mask(usize);
    if (lo == uoff && hi == uoff + usize) {
        range_call(r, uoff, usize, part, 1);
        return 0;
    }
    switch (partial) {
    case HV_PARTIAL_MERGE: {
        uint64_t old = range_call(r, uoff, usize, 0, 0);
        range_call(r, uoff, usize, ((old & ~lanes) | ((part << shift) & lanes)) & size_mask(usize), 1);
        break;
    }
    case HV_PARTIAL_ZERO:
        range_call(r, uoff, usize, (part << shift) & lanes, 1);
        break;
    default:
        __atomic_add_fetch(&a->dropped, 1, __ATOMIC_RELAXED);
    }
    return 0;
}

/* The guest access [off, off+size) in the pieces the range's rules allow: cut at field
 * bounds, or into the largest naturally aligned sizes the handler takes; a piece smaller
 * than any of those widens to the aligned unit around it. Bytes past the range's end read
 * as ones and are not written. Returns the value read, assembled little-endian. */
static uint64_t adapted_access(const struct hv_range *r, uint64_t off, uint32_t size,
                               uint64_t value, int is_write)
{
    struct hv_access *a = r->acc;
    uint64_t end = off + size, stop = end < r->len ? end : r->len, pos = off, result = 0;
    uint32_t nf = 0;
    __atomic_add_fetch(&a->adapted, 1, __ATOMIC_RELAXED);
    if (a->nfields) {   /* the first field that ends after off */
        uint32_t lo_i = 0, hi_i = a->nfields;
        while (lo_i < hi_i) {
            uint32_t mid = (lo_i + hi_i) / 2;
            if (a->fields[mid].off + a->fields[mid].size <= off)
                lo_i = mid + 1;
            else
                hi_i = mid;
        }
        nf = lo_i;
    }
    while (pos < stop) {
        uint64_t uoff, lo = pos, hi;
        uint32_t usize;
        int partial = a->partial;
        if (a->nfields) {
            if (nf >= a->nfields || a->fields[nf].off >= stop)
                break;   /* nothing declared there: reads zero, writes ignored */
            const struct hv_field *f = &a->fields[nf++];
            if (f->off > pos)
                lo = pos = f->off;
            uoff = f->off;
            usize = f->size;
            partial = f->partial;
        } else {
            usize = 0;
            for (uint32_t s = 8; s >= 1; s >>= 1)
                if ((a->sizes & s) && !(pos & (s - 1)) && pos + s <= stop) {
                    usize = s;
                    break;
                }
            if (!usize) {   /* widen to the smallest declared size's aligned unit */
                usize = 8;
                for (uint32_t s = 1; s <= 8; s <<= 1)
                    if (a->sizes & s) {
                        usize = s;
                        break;
                    }
            }
            uoff = pos & ~(uint64_t)(usize - 1);
        }
        hi = uoff + usize < stop ? uoff + usize : stop;
        uint32_t at = 8 * (uint32_t)(lo - off);   /* where these bytes sit in the guest value */
        uint64_t part = at < 64 ? (value >> at) & size_mask((uint32_t)(hi - lo)) : 0;
        uint64_t v = unit_access(r, a, uoff, usize, lo, hi, part, is_write, partial);
        if (!is_write)
            result |= ((v >> (8 * (lo - uoff))) & size_mask((uint32_t)(hi - lo))) << at;
        pos = hi;
    }
    if (!is_write && stop < end)   /* bytes past the range's end */
        result |= size_mask(size) & ~size_mask((uint32_t)(stop - off));
    return result;
}

/* One access: the value read (masked to size; all ones when unclaimed) or 0 for writes. */
uint64_t hv_bus_dispatch(struct hv_bus *b, uint64_t addr, uint32_t size, uint64_t value,
                         int is_write)
{
    struct hv_range r;
    uint64_t mask = size_mask(size);
    if (!bus_lookup(b, addr, &r)) {
        __atomic_add_fetch(&b->unclaimed, 1, __ATOMIC_RELAXED);
        return is_write ? 0 : mask;
    }
    uint64_t off = addr - r.base;
    uint64_t v;
    const struct hv_access *a = r.acc;
    if (!a || (!a->nfields && (a->sizes & size) && !(size & (size - 1)) && off + size <= r.len &&
               !(a->aligned && (off & (size - 1)))))
        v = range_call(&r, off, size, value & mask, is_write);
    else
        v = adapted_access(&r, off, size, value & mask, is_write);
    return is_write ? 0 : (v & mask);
}

/* Accesses routed to the range that starts at base so far (0 if there is none). */
uint64_t hv_bus_hits(struct hv_bus *b, uint64_t base)
{
    uint64_t n = 0;
    pthread_rwlock_rdlock(&b->lock);
    int i = upper_bound(b, base) - 1;
    if (i >= 0 && b->ranges[i].base == base)
        n = __atomic_load_n(&b->ranges[i].hits, __ATOMIC_RELAXED);
    pthread_rwlock_unlock(&b->lock);
    return n;
}

int hv_bus_count(struct hv_bus *b)
{
    pthread_rwlock_rdlock(&b->lock);
    int n = b->count;
    pthread_rwlock_unlock(&b->lock);
    return n;
}

/* ---- Python handlers ------------------------------------------------------------------ */

/* The per-exit path into Python: take the GIL and call the device's bound read or write
 * method directly with vectorcall. This touches far less interpreter state than a generic
 * cffi callback, which matters because every exit arrives with caches cold from KVM_RUN.
 * Anything unusual (an exception, a bad return value) is handed to the Python hook set by
 * hv_py_set_failed, which reports it; the access is answered like an empty bus. */
static PyObject **py_readers, **py_writers;
static int py_cap;
static PyObject *py_failed;   /* failed(handle, offset, is_write, exception) -> None */

/* Called from Python (without the GIL, as cffi calls are): objects are passed as id(). */
int hv_py_set_handler(int handle, uintptr_t reader, uintptr_t writer)
{
    int rc = 0;
    PyGILState_STATE g = PyGILState_Ensure();
    if (handle >= py_cap) {
        int ncap = py_cap ? py_cap : 64;
        while (ncap <= handle)
            ncap *= 2;
        PyObject **r = PyMem_Calloc(ncap, sizeof(*r)), **w = PyMem_Calloc(ncap, sizeof(*w));
        if (!r || !w) {
            PyMem_Free(r);
            PyMem_Free(w);
            rc = -ENOMEM;
            goto out;
        }
        if (py_cap) {
            memcpy(r, py_readers, py_cap * sizeof(*r));
            memcpy(w, py_writers, py_cap * sizeof(*w));
        }
        /* Old arrays are leaked on purpose: a vCPU may be reading them right now. */
        py_readers = r;
        py_writers = w;
        __atomic_store_n(&py_cap, ncap, __ATOMIC_RELEASE);
    }
    PyObject *old_r = py_readers[handle], *old_w = py_writers[handle];
    PyObject *nr = (PyObject *)reader, *nw = (PyObject *)writer;
    Py_XINCREF(nr);
    Py_XINCREF(nw);
    py_readers[handle] = nr;
    py_writers[handle] = nw;
    Py_XDECREF(old_r);
    Py_XDECREF(old_w);
out:
    PyGILState_Release(g);
    return rc;
}

void hv_py_set_failed(uintptr_t fn)
{
    PyGILState_STATE g = PyGILState_Ensure();
    Py_XINCREF((PyObject *)fn);
    Py_XSETREF(py_failed, (PyObject *)fn);
    PyGILState_Release(g);
}

static void py_report(int handle, uint64_t offset, int is_write)
{
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (exc && tb)
        PyException_SetTraceback(exc, tb);
    if (py_failed) {
        PyObject *r = PyObject_CallFunction(py_failed, "iKiO", handle, (unsigned long long)offset,
                                            is_write, exc ? exc : Py_None);
        Py_XDECREF(r);
    }
    PyErr_Clear();
    Py_XDECREF(type);
    Py_XDECREF(exc);
    Py_XDECREF(tb);
}

/* The call itself; the caller holds the GIL. */
static uint64_t py_call_locked(int handle, uint64_t offset, uint32_t size, uint64_t value, int is_write)
{
    uint64_t result = is_write ? 0 : ~0ULL;
    PyObject *fn = NULL;
    if (handle < py_cap)
        fn = is_write ? py_writers[handle] : py_readers[handle];
    if (!fn)
        goto out;
    PyObject *args[3];
    args[0] = PyLong_FromUnsignedLongLong(offset);
    args[1] = PyLong_FromLong(size);
    args[2] = is_write ? PyLong_FromUnsignedLongLong(value) : NULL;
    PyObject *r = NULL;
    /* Our own reference for the call: another thread may replace this table entry (a device
     * unmapped while the GIL is switched away mid-call). */
    Py_INCREF(fn);
    if (args[0] && args[1] && (!is_write || args[2]))
        r = PyObject_Vectorcall(fn, args, is_write ? 3 : 2, NULL);
    Py_DECREF(fn);
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    Py_XDECREF(args[2]);
    if (!r) {
        py_report(handle, offset, is_write);
        goto out;
    }
    if (!is_write) {
        if (PyLong_Check(r))
            result = PyLong_AsUnsignedLongLongMask(r);
        else {
            PyErr_Format(PyExc_TypeError, "read() returned %.50s, not an int", Py_TYPE(r)->tp_name);
            py_report(handle, offset, is_write);
        }
    }
    Py_DECREF(r);
out:
    return result;
}

/* Each calling thread's Python thread state, looked up once: attaching it directly is
 * cheaper than PyGILState_Ensure's bookkeeping on every exit. Callers never hold the GIL
 * here (cffi releases it around every call into this module). */
static __thread PyThreadState *thread_state;

static uint64_t py_call(int handle, uint64_t offset, uint32_t size, uint64_t value, int is_write)
{
    PyThreadState *ts = thread_state;
    if (!ts)
        ts = thread_state = PyGILState_GetThisThreadState();
    if (!ts) {  /* a thread Python has never seen */
        PyGILState_STATE g = PyGILState_Ensure();
        uint64_t result = py_call_locked(handle, offset, size, value, is_write);
        PyGILState_Release(g);
        return result;
    }
    PyEval_RestoreThread(ts);
    uint64_t result = py_call_locked(handle, offset, size, value, is_write);
    PyEval_SaveThread();
    return result;
}

/* py_call for native handlers outside this module (struct hv_api's py_call, set at import by
 * hvframe.core_native): a plugin's register handler passes what it does not serve on. */
uint64_t hv_py_dispatch(int handle, uint64_t offset, uint32_t size, uint64_t value, int is_write)
{
    return py_call(handle, offset, size, value, is_write);
}

/* ---- native handlers ---------------------------------------------------------------------- */

/* Accepts writes, reads as zero: a placeholder for ports that must answer but mean nothing. */
uint64_t hv_native_sink(void *opaque, uint64_t offset, uint32_t size, uint64_t value, int is_write)
{
    (void)opaque; (void)offset; (void)size; (void)value; (void)is_write;
    return 0;
}

/* For the exit-cost benchmark: takes and drops the GIL as a Python handler's exit does, and
 * calls nothing -- what the GIL alone adds to an exit. */
uint64_t hv_native_gil_only(void *opaque, uint64_t offset, uint32_t size, uint64_t value,
                            int is_write)
{
    (void)opaque; (void)offset; (void)size; (void)value; (void)is_write;
    PyThreadState *ts = thread_state;
    if (!ts)
        ts = thread_state = PyGILState_GetThisThreadState();
    if (ts) {
        PyEval_RestoreThread(ts);
        PyEval_SaveThread();
    }
    return 0;
}

/* ---- synthetic exits -------------------------------------------------------------------- */

/* Feed n accesses to one bus exactly as the KVM loop would: for the synthetic backend and
 * device benchmarks. Reads are stored back into values[]. */
void hv_synthetic_exits(struct hv_bus *b, const uint64_t *addrs, const uint8_t *sizes,
                        uint64_t *values, const uint8_t *is_write, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t v = hv_bus_dispatch(b, addrs[i], sizes[i], values[i], is_write[i]);
        if (!is_write[i])
            values[i] = v;
    }
}

/* ---- vCPU run loop ---------------------------------------------------------------------- */

static int kick_signal;

static void kick_handler(int sig)
{
    (void)sig; /* only there to interrupt KVM_RUN with EINTR */
}

/* Install the signal used to kick vCPUs out of KVM_RUN; returns the signal number. */
int hv_init(void)
{
    if (!kick_signal) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = kick_handler; /* no SA_RESTART: KVM_RUN must see EINTR */
        sigemptyset(&sa.sa_mask);
        kick_signal = SIGRTMIN + 4;
        if (sigaction(kick_signal, &sa, NULL) < 0)
            return -errno;
    }
    return kick_signal;
}

struct hv_vcpu *hv_vcpu_new(int fd, int index, size_t run_size, struct hv_bus *pio,
                            struct hv_bus *mmio)
{
    struct hv_vcpu *v = calloc(1, sizeof(*v));
    if (!v)
        return NULL;
    v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (v->run == MAP_FAILED) {
        free(v);
        return NULL;
    }
    v->fd = fd;
    v->index = index;
    v->run_size = run_size;
    v->pio = pio;
    v->mmio = mmio;
    return v;
}

void hv_vcpu_free(struct hv_vcpu *v)
{
    if (!v)
        return;
    munmap(v->run, v->run_size);
    free(v);
}

/* ---- coalesced writes ------------------------------------------------------------------- */

/* Map the VM's coalesced ring through a vCPU fd (the page after kvm_run). */
struct hv_coalesced *hv_coalesced_new(int vcpu_fd, struct hv_bus *pio, struct hv_bus *mmio)
{
    long page = sysconf(_SC_PAGESIZE);
    struct hv_coalesced *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->ring = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
                   page * KVM_COALESCED_MMIO_PAGE_OFFSET);
    if (c->ring == MAP_FAILED) {
        free(c);
        return NULL;
    }
    c->ring_size = page;
    c->max = (page - sizeof(struct kvm_coalesced_mmio_ring)) / sizeof(struct kvm_coalesced_mmio);
    c->pio = pio;
    c->mmio = mmio;
    pthread_mutex_init(&c->lock, NULL);
    return c;
}

void hv_coalesced_free(struct hv_coalesced *c)
{
    if (!c)
        return;
    munmap(c->ring, c->ring_size);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

/* Hand every buffered write to its bus, oldest first; returns how many. KVM writes an entry
 * and then moves `last` on (with a barrier); the entry is copied out, handed on, and only
 * then does `first` move on and free its slot: a drainer that finds first == last without
 * the lock (a vCPU's exit, pause(), close()) may then rely on every write having been handled,
 * not merely taken by another drainer still handing it on. The caller must hold no device
 * lock (a write may reach any handler). */
int hv_coalesced_drain(struct hv_coalesced *c)
{
    struct kvm_coalesced_mmio_ring *r = c->ring;
    if (__atomic_load_n(&r->first, __ATOMIC_RELAXED) == __atomic_load_n(&r->last, __ATOMIC_ACQUIRE))
        return 0;
    int n = 0;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        uint32_t first = r->first;
        if (first == __atomic_load_n(&r->last, __ATOMIC_ACQUIRE) || first >= c->max)
            break;
        struct kvm_coalesced_mmio e = r->coalesced_mmio[first];
        uint32_t len = e.len <= 8 ? e.len : 8;
        uint64_t val = 0;
        memcpy(&val, e.data, len);
        if (len)
            hv_bus_dispatch(e.pio ? c->pio : c->mmio, e.phys_addr, len, val, 1);
        __atomic_store_n(&r->first, (first + 1) % c->max, __ATOMIC_RELEASE);
        n++;
    }
    c->drained += n;
    pthread_mutex_unlock(&c->lock);
    return n;
}

/* Ask the vCPU to leave hv_vcpu_run: safe from any thread, and before the loop starts. */
void hv_vcpu_stop(struct hv_vcpu *v)
{
    struct kvm_run *run = v->run;
    v->stop = 1;
    __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (v->thread_valid && kick_signal)
        pthread_kill(v->thread, kick_signal);
}

static void handle_io(struct hv_vcpu *v, struct kvm_run *run)
{
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint32_t size = run->io.size;
    int is_write = run->io.direction == KVM_EXIT_IO_OUT;
    /* String I/O (rep ins/outs) arrives as count elements for the same port. */
    for (uint32_t i = 0; i < run->io.count; i++, data += size) {
        uint64_t val = 0;
        if (is_write) {
            memcpy(&val, data, size);
            hv_bus_dispatch(v->pio, run->io.port, size, val, 1);
        } else {
            val = hv_bus_dispatch(v->pio, run->io.port, size, 0, 0);
            memcpy(data, &val, size);
        }
    }
}

static void handle_mmio(struct hv_vcpu *v, struct kvm_run *run)
{
    uint32_t len = run->mmio.len;
    if (len == 0 || len > 8)
        return;
    uint64_t val = 0;
    if (run->mmio.is_write) {
        memcpy(&val, run->mmio.data, len);
        hv_bus_dispatch(v->mmio, run->mmio.phys_addr, len, val, 1);
    } else {
        val = hv_bus_dispatch(v->mmio, run->mmio.phys_addr, len, 0, 0);
        memcpy(run->mmio.data, &val, len);
    }
}

/* Run until something needs the VMM's attention; returns an HV_EXIT_* code. */
int hv_vcpu_run(struct hv_vcpu *v)
{
    struct kvm_run *run = v->run;
    v->thread = pthread_self();
    __atomic_store_n(&v->thread_valid, 1, __ATOMIC_SEQ_CST);
    int result;
    /* An I/O or MMIO exit was answered and KVM has not yet been re-entered: the guest's
     * instruction is only complete (RAX written, RIP past it) after the next KVM_RUN. */
    int completion_pending = 0;
    for (;;) {
        if (v->stop && !completion_pending) {
            result = HV_EXIT_STOPPED;
            break;
        }
        if (v->stop)
            /* Leaving for a pause or a checkpoint: KVM finishes the instruction and returns
             * EINTR at once, so the registers read meanwhile are consistent and a restored
             * guest does not repeat the access. */
            __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        int rc = ioctl(v->fd, KVM_RUN, 0);
        completion_pending = 0;
        if (v->coalesced)
            hv_coalesced_drain(v->coalesced);     /* what the guest wrote before this exit */
        if (rc < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
                if (v->stop) {
                    result = HV_EXIT_STOPPED;
                    break;
                }
                continue;
            }
            v->last_errno = errno;
            result = HV_EXIT_ERROR;
            break;
        }
        v->last_exit_reason = run->exit_reason;
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            v->exits_io++;
            handle_io(v, run);
            completion_pending = 1;
            continue;
        case KVM_EXIT_MMIO:
            v->exits_mmio++;
            handle_mmio(v, run);
            completion_pending = 1;
            continue;
        case KVM_EXIT_INTR:
            v->exits_other++;
            continue;
        case KVM_EXIT_HLT:
            result = HV_EXIT_HLT;
            break;
        case KVM_EXIT_SHUTDOWN:
            result = HV_EXIT_SHUTDOWN;
            break;
        case KVM_EXIT_INTERNAL_ERROR: {
            v->internal_suberror = run->internal.suberror;
            uint32_t n = run->internal.ndata;
            if (n > 16)
                n = 16;
            v->internal_ndata = n;
            memcpy(v->internal_data, run->internal.data, n * sizeof(uint64_t));
            result = HV_EXIT_INTERNAL;
            break;
        }
        case KVM_EXIT_SYSTEM_EVENT:
            v->event_type = run->system_event.type;
            result = HV_EXIT_SYSTEM_EVENT;
            break;
        case KVM_EXIT_FAIL_ENTRY:
            v->fail_reason = run->fail_entry.hardware_entry_failure_reason;
            result = HV_EXIT_FAIL_ENTRY;
            break;
        default:
            result = HV_EXIT_UNKNOWN;
            break;
        }
        break;
    }
    __atomic_store_n(&v->thread_valid, 0, __ATOMIC_SEQ_CST);
    return result;
}

/* ---- the floor -------------------------------------------------------------------------- */

/* The thinnest possible exit loop, for benchmarks: answers every port read with all ones,
 * drops every write, and returns when the guest writes stop_port (or on any other exit).
 * *exits counts the port exits taken. */
int hv_floor_run(int fd, void *run_area, uint16_t stop_port, uint64_t *exits)
{
    struct kvm_run *run = run_area;
    uint64_t n = 0;
    for (;;) {
        if (ioctl(fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            *exits = n;
            return -errno;
        }
        if (run->exit_reason != KVM_EXIT_IO) {
            *exits = n;
            return (int)run->exit_reason;
        }
        n++;
        if (run->io.direction == KVM_EXIT_IO_IN)
            memset((uint8_t *)run + run->io.data_offset, 0xff, run->io.size * run->io.count);
        else if (run->io.port == stop_port) {
            *exits = n;
            return 0;
        }
    }
}

/* ---- ioctl helpers for the Python side -------------------------------------------------- */

int hv_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int hv_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int hv_irq_line(int vm_fd, uint32_t irq, int level)
{
    struct kvm_irq_level l;
    memset(&l, 0, sizeof(l));
    l.irq = irq;
    l.level = level;
    return hv_ioctl(vm_fd, KVM_IRQ_LINE, &l);
}

/* fallocate(2) for the block backend (punch holes, zero ranges), which Python's os module
 * does not wrap: 0, or the errno of the failure (EINTR retried). */
int hv_fallocate(int fd, int mode, int64_t offset, int64_t length)
{
    while (fallocate(fd, mode, (off_t)offset, (off_t)length) != 0) {
        if (errno != EINTR)
            return errno;
    }
    return 0;
}
