"""Raw tap reads and writes in a C loop: the reference the network benchmarks compare with.

The device's data path is C (one read() or writev() per frame, no interpreter in between), so
the raw side it is measured against must be C too: a Python loop of os.write()/os.read()
adds the interpreter's call overhead (and os.read's allocation of a bytes object) to every
frame, which measured here 0.3-0.5 us a frame on 1.2-1.4 us of syscall: 25-40% more time on
the raw side, all of it in the device's favour (2026-12-02, benchmarks/test_virtio_net_datapath.py).

The driver's side of a device round is C here too (``Driver``): a guest's driver is compiled
code, and under KVM its kick is a store of avail.idx and a write that KVM's ioeventfd turns
into a doorbell eventfd signal without leaving the kernel. Driven from Python (a guest-memory
write through a memoryview, the kick matched against the ioeventfds by the synthetic machine,
the wait's used.idx checks) the same round charged the device 45-150 us of interpreter work
on a 500-700 us round, most of it cold after the benchmark's setup (2026-12-02,
benchmarks/test_virtio_net_datapath.py).

``loops()`` builds the loops once per process with cffi (into a temporary directory; a C
compiler is needed, as for the plugins' native modules) and returns their ``lib``, or raises
pytest's skip with the reason when it cannot.
"""
from __future__ import annotations

import errno
import functools
import importlib.util
import os
import sys
import tempfile

import pytest

_CDEF = """
long hv_raw_write_n(int fd, const unsigned char *buf, size_t len, int n, size_t stride,
                    int copies, int first);
long hv_raw_read_n(int fd, unsigned char *buf, size_t cap, int n, size_t stride, int copies,
                   int first);
long hv_raw_block_n(int fd, const int64_t *offsets, int n, unsigned char *bufs, size_t size,
                    int depth, int write);
struct hv_rig_halt { uint64_t poll_ns, max_ns, grow, grow_start, shrink; };
int hv_rig_round(uint16_t *avail_idx, uint16_t value, int doorbell_fd, const uint16_t *used_idx,
                 uint16_t *used_event, const uint16_t *avail_event, int irq_fd,
                 struct hv_rig_halt *h, int timeout_ms);
int hv_rig_wait(struct hv_rig_halt *h, int irq_fd, int timeout_ms);
int hv_rig_batches(uint16_t *avail_idx, uint16_t *avail_ring, uint16_t ring_size,
                   const uint16_t *entries, int sets, int depth, unsigned char *hdr_dst,
                   const unsigned char *hdrs, size_t hdr_len, int batches, int doorbell_fd,
                   const uint16_t *used_idx, uint16_t *used_event, const uint16_t *avail_event,
                   int irq_fd, struct hv_rig_halt *h, int timeout_ms);
int hv_rig_stream(uint16_t *avail_idx, uint32_t total, uint16_t ring_size, int doorbell_fd,
                  const uint16_t *used_idx, uint16_t *used_event, const uint16_t *avail_event,
                  int irq_fd, struct hv_rig_halt *h, int timeout_ms, int delayed);
void *hv_rig_lock_file(int fd, size_t size);
void hv_rig_unlock_file(void *addr, size_t size);
"""

_SOURCE = r"""
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/uio.h>

/* The first size bytes of fd mapped and locked in memory (mlock): its pages stay in the page
 * cache until hv_rig_unlock_file. The mapping, or NULL with errno set. */
void *hv_rig_lock_file(int fd, size_t size)
{
    void *a = mmap(NULL, size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (a == MAP_FAILED)
        return NULL;
    if (mlock(a, size) < 0) {
        int e = errno;
        munmap(a, size);
        errno = e;
        return NULL;
    }
    return a;
}

void hv_rig_unlock_file(void *addr, size_t size)
{
    munmap(addr, size);
}

/* n write()s of len bytes, the i-th from copy (first + i) % copies, at buf + copy * stride:
 * n, or -errno of the first that failed. */
long hv_raw_write_n(int fd, const unsigned char *buf, size_t len, int n, size_t stride,
                    int copies, int first)
{
    for (int i = 0; i < n; i++) {
        ssize_t k = write(fd, buf + (size_t)((first + i) % copies) * stride, len);
        if (k < 0 && errno == EINTR) {
            i--;
            continue;
        }
        if (k < 0)
            return -errno;
    }
    return n;
}

/* n read()s of cap bytes (each read is one frame of a tap), the i-th into buffer
 * (first + i) % copies, stride bytes apart from buf, waiting for input if the descriptor is
 * non-blocking and empty (2 s at most): the bytes read, or -errno. */
long hv_raw_read_n(int fd, unsigned char *buf, size_t cap, int n, size_t stride, int copies,
                   int first)
{
    long total = 0;
    for (int i = 0; i < n; i++) {
        ssize_t k = read(fd, buf + (size_t)((first + i) % copies) * stride, cap);
        if (k < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd p = { .fd = fd, .events = POLLIN };
            if (errno == EAGAIN && poll(&p, 1, 2000) == 0)
                return -ETIMEDOUT;          /* a frame the round counted on never came */
            i--;
            continue;
        }
        if (k < 0)
            return -errno;
        if ((size_t)k > cap)
            return -EMSGSIZE;               /* a tap says the whole frame's length: cut short */
        total += k;
    }
    return total;
}

/* n preadv()s (write: pwritev()s) of size bytes at offsets[i], the i-th into (from) buffer
 * i % depth of bufs: n, or -errno of the first that failed or came short. */
long hv_raw_block_n(int fd, const int64_t *offsets, int n, unsigned char *bufs, size_t size,
                    int depth, int write)
{
    for (int i = 0; i < n; i++) {
        struct iovec v = { bufs + (size_t)(i % depth) * size, size };
        ssize_t k = write ? pwritev(fd, &v, 1, offsets[i]) : preadv(fd, &v, 1, offsets[i]);
        if (k < 0 && errno == EINTR) {
            i--;
            continue;
        }
        if (k < 0)
            return -errno;
        if ((size_t)k != size)
            return -EIO;
    }
    return n;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static long switches(void)
{
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    return ru.ru_nvcsw + ru.ru_nivcsw;
}

/* KVM's halt polling (virt/kvm/kvm_main.c, kvm_vcpu_halt), for the rig's vCPU. */
struct hv_rig_halt {
    uint64_t poll_ns;               /* this vCPU's poll, adapted after each halt */
    uint64_t max_ns, grow, grow_start, shrink;   /* the host's module parameters */
};

/* A halted vCPU waiting for its interrupt (the irqfd's eventfd, non-blocking). KVM polls for
 * h->poll_ns first, but only while no other task wants the CPU (single_task_running()):
 * here a sched_yield() between looks hands the CPU to such a task (a queue worker woken on
 * this CPU), and once one ran the vCPU blocks, as KVM's would. Then the poll adapts as KVM's
 * does: a halt longer than the maximum shrinks it, a short one it did not cover grows it.
 * 0, or -errno (-ETIMEDOUT). */
static int halt(struct hv_rig_halt *h, int irq_fd, int timeout_ms)
{
    uint64_t count, t0 = now_ns();
    int rc = 1;
    if (h->poll_ns) {
        long sw0 = switches();
        for (unsigned i = 0;; i++) {
            if (read(irq_fd, &count, sizeof(count)) == (ssize_t)sizeof(count)) {
                rc = 0;
                break;
            }
            if (errno != EAGAIN && errno != EINTR)
                return -errno;
            sched_yield();
            if (i % 16 == 15 && (now_ns() - t0 >= h->poll_ns || switches() != sw0))
                break;
        }
    }
    while (rc > 0) {
        struct pollfd p = { .fd = irq_fd, .events = POLLIN };
        int r = poll(&p, 1, timeout_ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            return -ETIMEDOUT;
        if (read(irq_fd, &count, sizeof(count)) == (ssize_t)sizeof(count))
            rc = 0;
        else if (errno != EAGAIN && errno != EINTR)
            return -errno;
    }
    uint64_t halt_ns = now_ns() - t0;
    if (halt_ns <= h->poll_ns)
        ;
    else if (h->poll_ns && halt_ns > h->max_ns)
        h->poll_ns = h->shrink ? h->poll_ns / h->shrink : 0;
    else if (h->poll_ns < h->max_ns && halt_ns < h->max_ns && h->grow) {
        h->poll_ns *= h->grow;
        if (h->poll_ns < h->grow_start)
            h->poll_ns = h->grow_start;
        if (h->poll_ns > h->max_ns)
            h->poll_ns = h->max_ns;
    }
    return 0;
}

/* Whether a driver that moved avail.idx from old to new must kick (virtio 1.2, 2.7.10:
 * the device asked to be kicked once avail.idx passes avail_event). */
static int need_kick(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* One round of a driver (split ring, EVENT_IDX), from the buffers' publication to their
 * use: avail.idx = value (release), the kick if the device asked for one (avail_event, as
 * virtqueue_kick_prepare decides; a write of the queue's doorbell eventfd, what KVM's
 * ioeventfd does for the guest's notify write), then until used.idx reaches value:
 * used_event = value - 1 (one interrupt, for the last), look again, halt. 0 or -errno. */
int hv_rig_round(uint16_t *avail_idx, uint16_t value, int doorbell_fd, const uint16_t *used_idx,
                 uint16_t *used_event, const uint16_t *avail_event, int irq_fd,
                 struct hv_rig_halt *h, int timeout_ms)
{
    uint64_t one = 1;
    uint16_t old = __atomic_load_n(avail_idx, __ATOMIC_RELAXED);
    __atomic_store_n(avail_idx, value, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (need_kick(__atomic_load_n(avail_event, __ATOMIC_RELAXED), value, old))
        while (write(doorbell_fd, &one, sizeof(one)) < 0)
            if (errno != EINTR)
                return -errno;
    for (;;) {
        if (__atomic_load_n(used_idx, __ATOMIC_ACQUIRE) == value)
            return 0;
        __atomic_store_n(used_event, (uint16_t)(value - 1), __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(used_idx, __ATOMIC_ACQUIRE) == value)
            return 0;
        int rc = halt(h, irq_fd, timeout_ms);
        if (rc < 0)
            return rc;
    }
}

/* A halt on its own (for a driver whose rounds are Python): 0 or -errno. */
int hv_rig_wait(struct hv_rig_halt *h, int irq_fd, int timeout_ms)
{
    return halt(h, irq_fd, timeout_ms);
}

/* `batches` rounds of a driver, one after the other: each copies its requests' headers
 * (hdr_len bytes, the next of hdrs; none when hdr_len is 0) to hdr_dst, puts `depth` entries
 * in the available ring (set b % sets of `entries`, `sets` batches' worth; the batch must not
 * wrap inside the ring), then is an hv_rig_round. What Linux's virtio-blk driver does per
 * batch, in C: driven from Python the copies and the call cost 2-4 us a batch, with the
 * device's worker polling meanwhile. 0 or -errno. */
int hv_rig_batches(uint16_t *avail_idx, uint16_t *avail_ring, uint16_t ring_size,
                   const uint16_t *entries, int sets, int depth, unsigned char *hdr_dst,
                   const unsigned char *hdrs, size_t hdr_len, int batches, int doorbell_fd,
                   const uint16_t *used_idx, uint16_t *used_event, const uint16_t *avail_event,
                   int irq_fd, struct hv_rig_halt *h, int timeout_ms)
{
    uint16_t idx = __atomic_load_n(avail_idx, __ATOMIC_RELAXED);
    if (depth <= 0 || sets <= 0 || ring_size % depth || idx % depth)
        return -EINVAL;                     /* (a batch would wrap inside the ring) */
    for (int b = 0; b < batches; b++) {
        if (hdr_len)
            memcpy(hdr_dst, hdrs + (size_t)b * hdr_len, hdr_len);
        memcpy(avail_ring + idx % ring_size, entries + (size_t)(b % sets) * (size_t)depth,
               sizeof(uint16_t) * (size_t)depth);
        idx = (uint16_t)(idx + depth);
        int rc = hv_rig_round(avail_idx, idx, doorbell_fd, used_idx, used_event, avail_event,
                              irq_fd, h, timeout_ms);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Traffic through the ring as Linux's virtio_net driver keeps it going under load (NAPI):
 * `total` buffers through a ring of ring_size, whose descriptors and available slots are
 * written once (slot i holds descriptor i). The driver posts what fits, kicks only when the
 * device asked (avail_event), and reposts what the device used once more than a refill's
 * worth (32, half a NAPI budget: virtnet_receive's threshold) is free; while it finds work
 * it keeps interrupts off (used_event = 0, as virtqueue_disable_cb writes), and once it has
 * caught up it asks for one at the next used buffer (virtqueue_enable_cb_prepare), looks
 * again and halts. No per-buffer work: this driver catches up more often than a guest that
 * builds an skb per frame, so the device sends it more interrupts, not fewer. 0 or -errno. */
int hv_rig_stream(uint16_t *avail_idx, uint32_t total, uint16_t ring_size, int doorbell_fd,
                  const uint16_t *used_idx, uint16_t *used_event, const uint16_t *avail_event,
                  int irq_fd, struct hv_rig_halt *h, int timeout_ms, int delayed)
{
    const uint16_t refill = ring_size > 64 ? 32 : ring_size / 2 ? ring_size / 2 : 1;
    uint16_t start = __atomic_load_n(used_idx, __ATOMIC_ACQUIRE);
    uint16_t avail = __atomic_load_n(avail_idx, __ATOMIC_RELAXED);
    if (avail != start)
        return -EINVAL;                     /* buffers left over from before */
    uint32_t posted = 0, done = 0;
    uint64_t one = 1;
    int first = 1;
    while (done < total) {
        uint16_t used = __atomic_load_n(used_idx, __ATOMIC_ACQUIRE);
        uint32_t progress = (uint16_t)(used - (uint16_t)(start + done));
        done += progress;
        uint32_t in_ring = posted - done;
        uint32_t room = ring_size - in_ring;
        if (posted < total && (first || room > refill)) {
            uint32_t n = total - posted < room ? total - posted : room;
            uint16_t old = avail;
            avail = (uint16_t)(avail + n);
            posted += n;
            __atomic_store_n(avail_idx, avail, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (first || need_kick(__atomic_load_n(avail_event, __ATOMIC_RELAXED), avail, old))
                while (write(doorbell_fd, &one, sizeof(one)) < 0)
                    if (errno != EINTR)
                        return -errno;
            first = 0;
            continue;
        }
        if (progress || done == total)
            continue;                       /* "processed" what came: look again */
        /* An interrupt at the next used buffer (receive: virtqueue_enable_cb_prepare), or,
         * `delayed`, once three quarters of those in the ring are used (transmit, whose
         * completions only free buffers: virtqueue_enable_cb_delayed). */
        uint16_t at = delayed ? (uint16_t)(used + (posted - done) * 3 / 4) : used;
        __atomic_store_n(used_event, at, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if ((uint16_t)(__atomic_load_n(used_idx, __ATOMIC_ACQUIRE) - used)
                <= (uint16_t)(at - used)) {
            int rc = halt(h, irq_fd, timeout_ms);
            if (rc < 0)
                return rc;
        }
        __atomic_store_n(used_event, 0, __ATOMIC_RELAXED);      /* off while polling */
    }
    return 0;
}
"""


@functools.lru_cache(maxsize=None)
def _build():
    try:
        from cffi import FFI
        ffi = FFI()
        ffi.cdef(_CDEF)
        ffi.set_source("_hv_rawloop", _SOURCE)
        out = tempfile.mkdtemp(prefix="hv-rawloop-")
        path = ffi.compile(tmpdir=out, verbose=False)
    except Exception as e:                      # no compiler, no headers
        return None, f"cannot build the C raw loop: {e}"
    spec = importlib.util.spec_from_file_location("_hv_rawloop", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules.setdefault("_hv_rawloop", mod)
    return mod, None


def loops():
    """(ffi, lib) of the C loops; skips the calling test when they cannot be built."""
    mod, why = _build()
    if mod is None:
        pytest.skip(why)
    return mod.ffi, mod.lib


def write_n(fd: int, data: bytes, n: int) -> None:
    """n write()s of data to fd, in C."""
    _, lib = loops()
    rc = lib.hv_raw_write_n(fd, data, len(data), n, 0, 1, 0)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))


def _aligned(n: int) -> int:
    """n rounded up to a cache line (64 bytes): buffers side by side share none."""
    return (n + 63) & ~63


class Frames:
    """`copies` copies of one frame, `stride` bytes apart (default: the frame's length,
    64-byte aligned), written n at a time in turn (the i-th write from copy i % copies): the
    raw side of a device round whose chains each hold their own copy, as far apart as the
    device's, so that both read as much memory (a 64 KiB TSO segment from one buffer stays in
    the cache; from 256 buffers, as the device's ring holds them, it does not)."""

    def __init__(self, data: bytes, copies: int, stride: int | None = None):
        ffi, self._lib = loops()
        self.len, self.copies = len(data), copies
        self.stride = _aligned(len(data)) if stride is None else stride
        if self.stride < len(data):
            raise ValueError(f"stride {self.stride} is less than the frame ({len(data)} bytes)")
        self._buf = ffi.new("unsigned char[]", self.stride * copies)
        view = ffi.buffer(self._buf)
        for i in range(copies):
            view[i * self.stride:i * self.stride + len(data)] = data
        self.next = 0

    def write_n(self, fd: int, n: int) -> None:
        rc = self._lib.hv_raw_write_n(fd, self._buf, self.len, n, self.stride, self.copies,
                                      self.next)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        self.next = (self.next + n) % self.copies


class Reader:
    """n read()s of cap bytes from fd, in C, the i-th into buffer i % copies (in turn across
    calls); read_n returns the bytes read. Several buffers are the raw side of a receive
    round whose frames each land in a buffer of their own, as the device's do in the ring's
    buffers: one buffer stays in the cache, which no ring of `copies` buffers can (the
    receive counterpart of Frames)."""

    def __init__(self, cap: int = 70000, copies: int = 1):
        ffi, self._lib = loops()
        self._stride = _aligned(cap)
        self._buf = ffi.new("unsigned char[]", self._stride * copies)
        self._cap, self._copies, self._next = cap, copies, 0

    def read_n(self, fd: int, n: int) -> int:
        rc = self._lib.hv_raw_read_n(fd, self._buf, self._cap, n, self._stride, self._copies,
                                     self._next)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        self._next = (self._next + n) % self._copies
        return rc


class PageCacheLock:
    """A file's pages held in the page cache (mapped and mlock()ed) until close().

    Block benchmarks compare the device with the raw backend on page-cache reads. This
    project's hosts run DAMON's proactive reclaim (a kdamond whose scheme pages out memory
    idle for a minute, page cache included), which drops part of an image between rounds:
    seen 2026-12-04, 243 of 256 MiB left cached, and rounds of 4 KiB reads then took 40-110
    ms against 11 ms, on whichever side met the missing pages first. ``locked`` says whether
    the lock was had (mlock needs root or RLIMIT_MEMLOCK room), ``why`` why not."""

    def __init__(self, path):
        ffi, self._lib = loops()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._size = os.fstat(fd).st_size
            self._addr = self._lib.hv_rig_lock_file(fd, self._size)
        finally:
            os.close(fd)
        self.locked = self._addr != ffi.NULL
        self.why = "" if self.locked else os.strerror(ffi.errno)

    def close(self) -> None:
        if self.locked:
            self._lib.hv_rig_unlock_file(self._addr, self._size)
            self.locked = False


def locked_image(path):
    """The image fixture's generator tail: path, its pages locked in the page cache for the
    module's benchmarks (PageCacheLock); says so when the lock cannot be had."""
    try:
        lock = PageCacheLock(path)
        why = lock.why
    except pytest.skip.Exception as e:      # no C loops here; a benchmark without them runs on
        lock, why = None, str(e)
    if lock is None or not lock.locked:
        print(f"\n{path}: not locked in the page cache ({why}): rounds may read from disk")
    try:
        yield path
    finally:
        if lock is not None:
            lock.close()


class BlockLoop:
    """preadv/pwritev of `size` bytes at each of `offsets` in turn, from C, into (or from) as
    many buffers as the queue depth (the i-th request's is i % depth): the raw side of a block
    device round, without the interpreter's 0.2-0.3 us a call (a Python loop of os.preadv
    took 1.21x the C loop's time for 4 KiB reads here, 2026-12-04)."""

    def __init__(self, offsets, size: int, depth: int):
        ffi, self._lib = loops()
        self._offsets = ffi.new("int64_t[]", offsets)
        # Data in every buffer, as a guest's writes carry: untouched (calloc'd) memory reads
        # as the kernel's shared zero page, so each 128 KiB pwritev copied the same 4 KiB
        # again, from L1, while the device's writes read a queue's worth of guest buffers
        # (0.95x the time of a loop writing real data, in a C probe here on 2026-12-04).
        self._bufs = ffi.new("unsigned char[]", size * depth)
        ffi.memmove(self._bufs, os.urandom(size * depth), size * depth)
        self.n, self.size, self.depth = len(offsets), size, depth

    def run(self, fd: int, write: bool) -> None:
        rc = self._lib.hv_raw_block_n(fd, self._offsets, self.n, self._bufs, self.size,
                                      self.depth, int(write))
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))


# KVM's halt-polling parameters (the host's, else its defaults): max, grow, grow_start, shrink
_KVM_PARAMS = "/sys/module/kvm/parameters/"
_HALT_DEFAULTS = {"halt_poll_ns": 200_000, "halt_poll_ns_grow": 2,
                  "halt_poll_ns_grow_start": 10_000, "halt_poll_ns_shrink": 2}


def kvm_halt_params() -> dict:
    out = dict(_HALT_DEFAULTS)
    for name in out:
        try:
            with open(_KVM_PARAMS + name) as f:
                out[name] = int(f.read())
        except (OSError, ValueError):
            pass
    return out


def _halt_state(ffi):
    p = kvm_halt_params()
    return ffi.new("struct hv_rig_halt *", {
        "poll_ns": 0, "max_ns": p["halt_poll_ns"], "grow": p["halt_poll_ns_grow"],
        "grow_start": p["halt_poll_ns_grow_start"], "shrink": p["halt_poll_ns_shrink"]})


class Halt:
    """A halted vCPU's wait for one interrupt eventfd, as Driver's (KVM's adaptive halt
    polling, giving way to another task wanting the CPU), for a driver whose rounds are
    Python."""

    def __init__(self, irq_fd: int):
        ffi, self._lib = loops()
        self._irq, self.halt = irq_fd, _halt_state(ffi)

    def wait(self, timeout_ms: int) -> bool:
        """Until the interrupt (True) or timeout_ms (False)."""
        rc = self._lib.hv_rig_wait(self.halt, self._irq, timeout_ms)
        if rc == -errno.ETIMEDOUT:
            return False
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        return True


class Driver:
    """One queue's driver side in C (hv_rig_round), for a queue with EVENT_IDX negotiated:
    ``round(value)`` publishes avail.idx = value, kicks through the doorbell eventfd if the
    device asked for a kick (avail_event: a fresh ring's 0 asks for the first), and halts,
    with KVM's adaptive halt polling (from none, as a new vCPU's), until used.idx reaches
    it; an error if a halt lasts timeout_ms."""

    def __init__(self, memory, queue, doorbell_fd: int, irq_fd: int, timeout_ms: int = 2000):
        if not queue.event_idx:
            # Without it avail_event stays 0 and no round after the first would kick.
            raise ValueError("rawloop.Driver needs EVENT_IDX negotiated on its queue")
        if doorbell_fd < 0 or irq_fd < 0:
            raise ValueError(f"no doorbell ({doorbell_fd}) or interrupt ({irq_fd}) eventfd")
        ffi, self._lib = loops()
        # guest RAM is a shared mapping: these point into it for the driver's lifetime
        self._avail_idx = ffi.from_buffer("uint16_t[]", memory.view(queue.avail + 2, 2))
        self._used_idx = ffi.from_buffer("uint16_t[]", memory.view(queue.used + 2, 2))
        self._used_event = ffi.from_buffer(
            "uint16_t[]", memory.view(queue.avail + 4 + 2 * queue.size, 2))
        self._avail_ring = ffi.from_buffer("uint16_t[]", memory.view(queue.avail + 4,
                                                                     2 * queue.size))
        self._avail_event = ffi.from_buffer(
            "uint16_t[]", memory.view(queue.used + 4 + 8 * queue.size, 2))
        self._size = queue.size
        self.halt = _halt_state(ffi)
        self._doorbell, self._irq, self._timeout_ms = doorbell_fd, irq_fd, timeout_ms
        self._ffi = ffi

    def close(self) -> None:
        """Let go of guest RAM (the machine cannot unmap it while it is exported)."""
        for view in (self._avail_idx, self._used_idx, self._used_event, self._avail_event,
                     self._avail_ring):
            self._ffi.release(view)

    def round(self, value: int) -> None:
        rc = self._lib.hv_rig_round(self._avail_idx, value & 0xFFFF, self._doorbell,
                                    self._used_idx, self._used_event, self._avail_event,
                                    self._irq, self.halt, self._timeout_ms)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    def batches(self, hdr_dst, headers: bytes, entries: bytes, depth: int,
                batches: int | None = None) -> None:
        """Rounds of `depth` requests, one per len(hdr_dst) bytes of `headers` (hdr_dst
        None: `batches` rounds and no headers): each batch's headers copied
        to hdr_dst (a writable view of guest RAM) and the next `depth` heads of `entries`
        (packed; whole batches, taken in turn) put in the available ring, then a round
        (hv_rig_batches). The ring's size must be a multiple of depth."""
        ffi = self._ffi
        sets = len(entries) // (2 * depth)
        if sets < 1 or len(entries) != 2 * depth * sets:
            raise ValueError("entries must be whole batches of heads")
        if hdr_dst is None:
            if batches is None or headers is not None:
                raise ValueError("without headers, give the number of batches (and no headers)")
            n, dst, headers, hdr_len = batches, ffi.NULL, ffi.NULL, 0
        else:
            if batches is not None:
                raise ValueError("with headers, their length gives the number of batches")
            n = len(headers) // len(hdr_dst)
            if n * len(hdr_dst) != len(headers):
                raise ValueError("headers must be whole batches")
            dst, hdr_len = ffi.from_buffer(hdr_dst), len(hdr_dst)
        try:
            rc = self._lib.hv_rig_batches(self._avail_idx, self._avail_ring, self._size,
                                          ffi.from_buffer("uint16_t[]", entries), sets, depth,
                                          dst, headers, hdr_len, n, self._doorbell,
                                          self._used_idx, self._used_event,
                                          self._avail_event, self._irq, self.halt,
                                          self._timeout_ms)
        finally:
            if hdr_dst is not None:
                ffi.release(dst)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    def stream(self, total: int, delayed: bool = False) -> None:
        """``total`` buffers through the ring, reposted as the device uses them (hv_rig_stream:
        Linux's NAPI driver under load; ``delayed``: interrupts as its transmit side asks for
        them); the ring must be empty (avail.idx == used.idx)."""
        rc = self._lib.hv_rig_stream(self._avail_idx, total, self._size, self._doorbell,
                                     self._used_idx, self._used_event, self._avail_event,
                                     self._irq, self.halt, self._timeout_ms, delayed)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
