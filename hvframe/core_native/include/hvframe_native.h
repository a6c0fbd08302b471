/* hvframe's native API for device plugins.
 *
 * A plugin's native module (built with cffi at install time, see hvframe.native_build) includes
 * this header and reaches the core through one table of functions, `struct hv_api`, handed to
 * it once at import (HV_PLUGIN_API below). The core itself knows no device: what is here is
 * guest RAM translation, the split virtqueue (walk, completion, notifications, the worker's
 * service cycle), interrupt gates, eventfd waits and file I/O helpers.
 *
 * The part between HV_CDEF_BEGIN and HV_CDEF_END is also the cffi declaration of the API
 * (build_core.py reads it from this file), so C and Python see one text. Guest-visible layouts
 * (struct hv_vring_desc, struct hv_vring_used_elem) are generated from the construct
 * declarations in hvframe.virtio.virtqueue at build time and come before this header.
 */
#ifndef HVFRAME_NATIVE_H
#define HVFRAME_NATIVE_H
#include <stdint.h>
#include <stddef.h>
#include <time.h>
#include <sys/uio.h>

/* HV_CDEF_BEGIN */
#define HV_API_VERSION 2           /* 2: struct hv_chain names its indirect table */
#define HV_RAM_MAX_REGIONS 4
#define HV_CHAIN_MAX_SEGS 1024        /* buffers of one chain (also Linux's IOV_MAX) */

/* Guest RAM as the VMM maps it: `mem` is the host mapping (valid only while Python pins it,
 * i.e. during one call), each region a run of guest-physical addresses inside it. */
struct hv_ram_region { uint64_t gpa; uint64_t size; uint64_t host_offset; };
struct hv_ram {
    void *mem;
    uint64_t mem_size;
    uint32_t nregions;
    struct hv_ram_region regions[4];
};

/* What vq_peek found (HV_VQ_CHAIN) or why a walk or a serve loop stopped (the rest). */
enum {
    HV_VQ_CHAIN = 0,                  /* a valid chain */
    HV_VQ_STOP_EMPTY,                 /* nothing (more) available */
    HV_VQ_STOP_MAX,                   /* served the `max` chains asked for */
    HV_VQ_STOP_DECLINED,              /* the device left the next chain to Python */
    HV_VQ_STOP_UNSUPPORTED,           /* the next chain is valid but too long for C */
    HV_VQ_STOP_INVALID,               /* the next chain or avail.idx is invalid: Python raises */
    HV_VQ_STOP_STATE                  /* bad struct hv_vq set-up (a VMM bug) */
};

/* One split virtqueue; hvframe.virtio.native copies the moving part in and out around each
 * call, so Python's VirtQueue carries on where C stopped. */
struct hv_vq {
    struct hv_ram ram;
    uint64_t desc_addr, avail_addr, used_addr;   /* guest-physical */
    uint32_t size;
    uint32_t max_chain;               /* 0: no cap on descriptors per chain */
    uint8_t event_idx, indirect, notifications;
    uint16_t last_avail_idx, shadow_avail, used_idx;
    uint16_t signalled_used;          /* used_idx at the last interrupt decision */
    int stop;                         /* HV_VQ_STOP_* of the last call */
    uint32_t served;                  /* chains hv_vq_cycle served in its last call */
    uint32_t repoll;                  /* hv_vq_cycle returned NOTIFY after a batch: poll next */
    volatile int yield_req;           /* another thread wants the queue: return after the batch */
    uint8_t *desc, *avail, *used;     /* host pointers, set by vq_begin for one call */
};

/* A validated descriptor chain: non-empty buffers, device-readable ones first. */
struct hv_chain {
    uint16_t head;
    int n, nr;                        /* buffers stored, of which readable */
    uint64_t rlen, wlen;              /* bytes readable, writable */
    /* The indirect table the walk read (NULL: none), for a device that reads chains ahead
     * of serving the ones before them (it checks their writes against what it read). */
    const uint8_t *table;
    uint32_t table_len;
    struct iovec iov[1024];
};

/* A device's chain server: the used length (>= 0) to complete the chain with, or
 * -HV_VQ_STOP_DECLINED / -HV_VQ_STOP_UNSUPPORTED (or -HV_VQ_STOP_STATE: the device cannot
 * serve at all) to leave it, untouched, to Python. */
typedef int64_t (*hv_chain_fn)(void *ctx, struct hv_vq *q, struct hv_chain *ch);

/* A device's batch server, for devices that hand the host many requests in one call (one
 * io_uring submission for a queue's reads): serve up to max chains from the head of the
 * queue itself (vq_peek_at, vq_push_n), stopping where a chain server would, and set q->stop
 * as vq_serve does (HV_VQ_STOP_MAX when max were served); returns how many it served. The
 * rings are mapped (vq_begin) before it is called. */
typedef int (*hv_batch_fn)(void *ctx, struct hv_vq *q, int max);

/* An MSI-X vector as a queue worker sees it: Python keeps `open` true only while the vector
 * may fire (enabled, unmasked, routed to the irqfd `fd`); otherwise the worker asks Python. */
struct hv_irq_gate { int fd; int open; };

enum { HV_VQ_CYCLE_IDLE = 0, HV_VQ_CYCLE_PYTHON, HV_VQ_CYCLE_NOTIFY, HV_VQ_CYCLE_YIELD };

/* A Python handler of the exit-dispatch core (hvframe.dispatch.PythonHandle.handle) called
 * as an exit calls it: takes the GIL for the call only; the value read (all ones when the
 * handle is empty or the handler fails), 0 for writes. */
typedef uint64_t (*hv_py_call_fn)(int handle, uint64_t offset, uint32_t size, uint64_t value,
                                  int is_write);

/* The core's functions for plugins. New entries go at the end; `size` lets a plugin built
 * against a newer header refuse an older core. */
struct hv_api {
    uint32_t version;
    uint32_t size;
    /* host pointer of [gpa, gpa+len) inside one RAM region, else NULL */
    uint8_t *(*ram_translate)(const struct hv_ram *ram, uint64_t gpa, uint64_t len);
    /* whether the region list fits the mapping it claims to be in */
    int (*ram_ok)(const struct hv_ram *ram);
    /* check the queue set-up and map its rings: 0 or HV_VQ_STOP_STATE */
    int (*vq_begin)(struct hv_vq *q);
    /* the next available chain, not consumed: HV_VQ_CHAIN, or a HV_VQ_STOP_* code */
    int (*vq_peek)(struct hv_vq *q, struct hv_chain *ch);
    /* consume the chain vq_peek returned and put it in the used ring (release order) */
    void (*vq_push)(struct hv_vq *q, const struct hv_chain *ch, uint32_t used_len);
    /* serve up to max chains with fn; q->stop says why it stopped */
    int (*vq_serve)(struct hv_vq *q, hv_chain_fn fn, void *ctx, int max);
    int (*vq_needs_notification)(struct hv_vq *q);
    void (*vq_set_notifications)(struct hv_vq *q, int on);
    int (*irq_gate_fire)(const struct hv_irq_gate *g);
    /* read or write all of iov at off (consumes iov): 0 or an errno */
    int (*file_rw)(int fd, struct iovec *iov, int cnt, uint64_t off, int write);
    /* fdatasync, retried on EINTR: 0 or an errno */
    int (*file_datasync)(int fd);
    /* read all of iov at off only if the page cache has it all, without waiting for the
     * disk (preadv2 RWF_NOWAIT): 0, EAGAIN (not all cached: nothing promised, read it again
     * the waiting way; iov may be consumed) or an errno */
    int (*file_read_cached)(int fd, struct iovec *iov, int cnt, uint64_t off);
    /* wait for an eventfd (EFD_NONBLOCK): spin spin_ns, then sleep up to timeout_ms (< 0:
     * forever); the count read, 0 on timeout, or -errno */
    int64_t (*eventfd_wait)(int fd, uint64_t spin_ns, int timeout_ms);
    /* -- added after version 1's first table (a plugin that uses them checks `size`) -- */
    /* the chain `ahead` places after the next available one (0: vq_peek), not consumed:
     * HV_VQ_CHAIN or a HV_VQ_STOP_* code (EMPTY when fewer are available) */
    int (*vq_peek_at)(struct hv_vq *q, uint32_t ahead, struct hv_chain *ch);
    /* consume the next n available chains (heads as peeked) and put them in the used ring
     * with their lengths, publishing used.idx once, after all n elements: a driver sees a
     * frame merged over several receive buffers whole or not at all */
    void (*vq_push_n)(struct hv_vq *q, const uint16_t *heads, const uint32_t *lens, uint32_t n);
    /* busy-poll up to ns for avail.idx to move past last_avail_idx (1) or not (0); returns
     * early (0) when another thread asks for the queue (yield_req) */
    int (*vq_poll_avail)(struct hv_vq *q, uint64_t ns);
    /* pass an access on to a Python handler (a native register handler's fallback); never
     * call it with a lock held that the handler's Python side may take */
    hv_py_call_fn py_call;
};
/* HV_CDEF_END */

/* Helpers for polling loops, the core's and the plugins' (inline: nothing through the table). */

/* CLOCK_MONOTONIC in nanoseconds. */
static inline uint64_t hv_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* One turn of a spin-wait: tells the CPU (and a hypervisor's pause-loop exiting) that this
 * thread waits for another. */
static inline void hv_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* In one C file of a plugin module: HV_PLUGIN_API(myplugin_bind) defines `hv`, the table,
 * and the function Python calls once at import (hvframe.core_native.bind). */
#define HV_PLUGIN_API(bind_name)                                                        \
    static const struct hv_api *hv;                                                     \
    int bind_name(const struct hv_api *api)                                             \
    {                                                                                   \
        if (!api || api->version != HV_API_VERSION || api->size < sizeof(struct hv_api)) \
            return -1;                                                                  \
        hv = api;                                                                       \
        return 0;                                                                       \
    }
#endif
