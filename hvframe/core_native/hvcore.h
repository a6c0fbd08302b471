/* hvframe native exit-dispatch core: the per-vCPU KVM_RUN loop and address-range buses. */
#ifndef HVCORE_H
#define HVCORE_H
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>

/* A device access handler in C: returns the value for reads; ignored for writes. */
typedef uint64_t (*hv_native_fn)(void *opaque, uint64_t offset, uint32_t size,
                                 uint64_t value, int is_write);

/* Access-size rules of a range (hvframe.dispatch.Access): the bus splits, widens and merges
 * guest accesses so that a handler only ever sees the accesses it declared. */
enum { HV_PARTIAL_DROP = 0, HV_PARTIAL_MERGE = 1, HV_PARTIAL_ZERO = 2 };

struct hv_field {
    uint32_t off;
    uint8_t size;            /* 1, 2, 4 or 8 */
    uint8_t partial;         /* HV_PARTIAL_*: a write that covers only part of the field */
};

struct hv_access {
    uint8_t sizes;           /* bitmask of access sizes (1|2|4|8) the handler takes as they are */
    uint8_t aligned;         /* those accesses must also be naturally aligned */
    uint8_t partial;         /* HV_PARTIAL_* for a write covering part of the smallest size */
    uint32_t nfields;        /* > 0: accesses are cut at these fields' bounds instead */
    const struct hv_field *fields;   /* sorted by off, not overlapping */
    uint64_t adapted;        /* guest accesses that needed splitting or widening */
    uint64_t dropped;        /* partial writes dropped by HV_PARTIAL_DROP */
};

struct hv_range {
    uint64_t base;
    uint64_t len;
    int py_handle;          /* >= 0: Python handler index; -1: native */
    hv_native_fn fn;
    void *opaque;
    struct hv_access *acc;  /* NULL: every access goes to the handler as it came */
    uint64_t hits;          /* guest accesses routed here (hv_bus_hits; `hvframe ctl --get-stats`) */
};

struct hv_bus {
    struct hv_range *ranges; /* sorted by base, never overlapping */
    int count;
    int cap;
    pthread_rwlock_t lock;
    uint64_t unclaimed;      /* accesses nobody claimed (all-ones reads, dropped writes) */
};

/* Writes KVM buffers without an exit (KVM_REGISTER_COALESCED_MMIO, ports or MMIO): one ring
 * page per VM, which every vCPU drains, in order, before it handles an exit of its own, so a
 * guest sees each buffered write done before any later access it makes is answered. */
struct hv_coalesced {
    void *ring;              /* struct kvm_coalesced_mmio_ring, mapped from a vCPU fd */
    size_t ring_size;
    uint32_t max;            /* entries in the ring */
    struct hv_bus *pio;
    struct hv_bus *mmio;
    pthread_mutex_t lock;    /* one drainer at a time; taken before any device lock */
    uint64_t drained;        /* buffered writes handed to the buses */
};

/* Why hv_vcpu_run returned. */
enum {
    HV_EXIT_STOPPED = 0,     /* stop requested (hv_vcpu_stop) */
    HV_EXIT_SHUTDOWN = 1,    /* triple fault */
    HV_EXIT_INTERNAL = 2,    /* KVM internal error; details in internal_* */
    HV_EXIT_HLT = 3,
    HV_EXIT_SYSTEM_EVENT = 4,
    HV_EXIT_FAIL_ENTRY = 5,
    HV_EXIT_UNKNOWN = 6,     /* exit reason in last_exit_reason */
    HV_EXIT_ERROR = 7,       /* KVM_RUN failed; errno in last_errno */
};

struct hv_vcpu {
    int fd;
    int index;
    void *run;               /* struct kvm_run mapping */
    size_t run_size;
    struct hv_bus *pio;
    struct hv_bus *mmio;
    volatile int stop;
    volatile int thread_valid;
    pthread_t thread;
    uint32_t last_exit_reason;
    int last_errno;
    uint32_t internal_suberror;
    uint32_t internal_ndata;
    uint64_t internal_data[16];
    uint32_t event_type;     /* KVM_EXIT_SYSTEM_EVENT type */
    uint64_t fail_reason;
    uint64_t exits_io;
    uint64_t exits_mmio;
    uint64_t exits_other;
    struct hv_coalesced *coalesced;  /* set before the vCPU first runs; NULL: none */
};

int hv_coalesced_drain(struct hv_coalesced *c);
#endif
