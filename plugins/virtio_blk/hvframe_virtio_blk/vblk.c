/* virtio-blk READ/WRITE served natively, with the GIL released: the chain server the core's
 * virtqueue loop (hv->vq_serve, hv_vq_cycle) calls for each available chain, and a batch
 * server (hv_vq_cycle_batch) that hands a run of READs to the kernel in one io_uring
 * submission instead of one preadv each.
 *
 * It answers IN/OUT requests the way VirtioBlk.handle_chain() and BlockBackend do (the parity
 * tests in tests/test_vblk_fast.py hold the two together). What it must not decide (another
 * request type, no header or status byte, an O_DIRECT bounce) it declines before touching
 * anything, and the chain stays available for the Python path.
 *
 * struct vblk_req_hdr and the VBLK_* numbers are generated from hvframe_virtio_blk.layout.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef VBLK_HAVE_URING
#include <liburing.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#endif

HV_PLUGIN_API(vblk_bind)

/* The backend as the native path sees it; virtio_blk.py refreshes fd and size per call. */
struct vblk_disk {
    int fd;                        /* < 0: closed */
    int readonly, direct, write_through;
    uint32_t logical_sector;
    uint64_t size;                 /* disk bytes */
    int wb_errno;                  /* a write-through fdatasync failed (Python keeps it) */
};

static int vblk_needs_bounce(const struct vblk_disk *b, const struct iovec *iov, int cnt)
{
    if (!b->direct)
        return 0;
    for (int i = 0; i < cnt; i++)
        if ((uintptr_t)iov[i].iov_base % b->logical_sector || iov[i].iov_len % b->logical_sector)
            return 1;
    return 0;
}

/* BlockBackend._check: whether [off, off+len) is a valid request (else IOERR). */
static int vblk_range_ok(const struct vblk_disk *b, uint64_t sector, uint64_t len)
{
    if (sector > UINT64_MAX / VBLK_SECTOR)
        return 0;
    uint64_t off = sector * VBLK_SECTOR;
    if (off % b->logical_sector || len % b->logical_sector)
        return 0;
    return len <= b->size && off <= b->size - len;
}

/* What vblk_check found for an IN/OUT chain. */
enum { VBLK_DO, VBLK_DONE, VBLK_LEAVE };

/* A checked transfer: the chain's data buffers and where on the disk. */
struct vblk_io {
    struct iovec *data;
    int cnt;
    uint64_t off, total;
};

/* Check one IN/OUT chain: VBLK_DO (*io is the transfer to make), VBLK_DONE (*status says
 * IOERR) or VBLK_LEAVE (Python answers it: an O_DIRECT bounce, a write after a failed
 * write-through fdatasync), nothing done in the last two cases but the status. */
static int vblk_check(struct vblk_disk *b, struct hv_chain *ch, uint32_t type, uint64_t sector,
                      struct vblk_io *io, uint8_t *status)
{
    struct iovec *data;
    int cnt;
    uint64_t total = 0;

    if (type == VBLK_T_IN) {
        /* Device-writable buffers less the status byte (the last one). */
        data = ch->iov + ch->nr;
        cnt = ch->n - ch->nr;
        if (--ch->iov[ch->n - 1].iov_len == 0)
            cnt--;
    } else {
        /* Device-readable buffers after the request header. */
        size_t skip = sizeof(struct vblk_req_hdr);
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
    if (total % VBLK_SECTOR || (type == VBLK_T_OUT && b->readonly)
        || !vblk_range_ok(b, sector, total)) {
        *status = VBLK_S_IOERR;
        return VBLK_DONE;
    }
    if (vblk_needs_bounce(b, data, cnt))
        return VBLK_LEAVE;
    /* After a failed write-through fdatasync every write fails until a reset: Python
     * answers it (a later fdatasync here would succeed and forget the lost write-back). */
    if (type == VBLK_T_OUT && b->write_through && b->wb_errno)
        return VBLK_LEAVE;
    *io = (struct vblk_io){ data, cnt, sector * VBLK_SECTOR, total };
    return VBLK_DO;
}

/* A READ's answer in its status byte; the used length: the data and the status byte, or
 * the status byte alone. */
static uint32_t vblk_read_answer(uint8_t *status, int ok, uint64_t total)
{
    *status = ok ? VBLK_S_OK : VBLK_S_IOERR;
    return ok ? (uint32_t)total + 1 : 1;
}

/* A checked READ done with preadv, and its answer. */
static uint32_t vblk_read_now(int fd, struct vblk_io *io, uint8_t *status)
{
    int ok = io->total == 0 || hv->file_rw(fd, io->data, io->cnt, io->off, 0) == 0;
    return vblk_read_answer(status, ok, io->total);
}

/* One validated IN/OUT chain, transferred with preadv/pwritev: the status and the used
 * length, or -1 to leave it to Python with nothing done. */
static int64_t vblk_request(struct vblk_disk *b, struct hv_chain *ch, uint32_t type,
                            uint64_t sector, uint8_t *status)
{
    struct vblk_io io;
    switch (vblk_check(b, ch, type, sector, &io, status)) {
    case VBLK_LEAVE:
        return -1;
    case VBLK_DONE:
        return 1;
    }
    if (type == VBLK_T_IN)
        return vblk_read_now(b->fd, &io, status);
    if (io.total && hv->file_rw(b->fd, io.data, io.cnt, io.off, 1))
        goto ioerr;
    if (b->write_through) {
        int err = hv->file_datasync(b->fd);
        if (err) {
            /* The kernel reports a lost write-back once: Python keeps it (sticky). */
            b->wb_errno = err;
            goto ioerr;
        }
    }
    *status = VBLK_S_OK;
    return 1;
ioerr:
    *status = VBLK_S_IOERR;
    return 1;
}

static int vblk_disk_ok(const struct vblk_disk *b)
{
    return b->fd >= 0 && (b->logical_sector == 512 || b->logical_sector == 1024
                          || b->logical_sector == 2048 || b->logical_sector == 4096);
}

/* The request header (copied out of the readable buffers) and the status byte's place;
 * -1 when the chain has no room for either (handle_chain's own answers). */
static int vblk_header(struct hv_chain *ch, struct vblk_req_hdr *h, uint8_t **status)
{
    if (ch->rlen < sizeof(*h) || ch->n == ch->nr)
        return -1;
    uint8_t *hp = (uint8_t *)h;
    size_t got = 0;
    for (int i = 0; i < ch->nr && got < sizeof(*h); i++) {
        size_t k = ch->iov[i].iov_len;
        if (k > sizeof(*h) - got)
            k = sizeof(*h) - got;
        memcpy(hp + got, ch->iov[i].iov_base, k);
        got += k;
    }
    struct iovec *last = &ch->iov[ch->n - 1];
    *status = (uint8_t *)last->iov_base + last->iov_len - 1;
    return 0;
}

/* The chain server (hv_chain_fn): ctx is a struct vblk_disk. */
int64_t vblk_serve_chain(void *ctx, struct hv_vq *q, struct hv_chain *ch)
{
    struct vblk_disk *b = ctx;
    (void)q;
    if (!vblk_disk_ok(b))
        return -HV_VQ_STOP_STATE;
    struct vblk_req_hdr h;
    uint8_t *status;
    if (vblk_header(ch, &h, &status) || (h.type != VBLK_T_IN && h.type != VBLK_T_OUT))
        return -HV_VQ_STOP_DECLINED;
    int64_t used_len = vblk_request(b, ch, h.type, h.sector, status);
    return used_len < 0 ? -HV_VQ_STOP_UNSUPPORTED : used_len;
}

/* ---- batched reads (io_uring) --------------------------------------------------------- */

/* Requests handed to the kernel in one submission: the driver's batches are about this size
 * (Linux's virtio_blk posts up to its queue depth between kicks). */
#define VBLK_BATCH 32

/* A READ with more buffers than this is served alone (its own batch). */
#define VBLK_BATCH_SEGS 16

/* Host memory [lo, hi). */
struct vblk_span {
    uintptr_t lo, hi;
};

/* Disjoint spans in address order. A driver's buffers mostly come in rising order, so a
 * span past the last one costs a comparison. */
struct vblk_spans {
    int n;
    struct vblk_span s[VBLK_BATCH * VBLK_BATCH_SEGS];
};

/* One queue's batch server state; only the thread holding the queue's lock uses it. */
struct vblk_batch {
    struct vblk_disk *disk;
    int ring_ok;                      /* 0 after the ring failed: Python serves on without it */
    int ring_errno;
    int read_op;                      /* the kernel has IORING_OP_READ (5.6 and later) */
    /* What the batch's READs will write once submitted (data; status bytes, kept apart as
     * they lie apart in a driver's memory), and the rings' own spans for this call. */
    struct vblk_spans data, status_bytes;
    struct vblk_span desc, avail, used;
    uint16_t heads[VBLK_BATCH];
    uint32_t lens[VBLK_BATCH];
    uint8_t *status[VBLK_BATCH];      /* of each read handed to the ring, else NULL */
    struct vblk_io io[VBLK_BATCH];
    struct hv_chain chains[VBLK_BATCH];
#ifdef VBLK_HAVE_URING
    struct io_uring ring;
    /* The backend's fd whose file is registered with the ring (slot 0), or -1: a registered
     * file saves each read the kernel's look-up of the fd and its reference count (3-5% of a
     * 4 KiB read here). The backend keeps one fd for its life; a different one reads by fd. */
    int registered_fd;
    struct vblk_partner *partner;     /* NULL: this batch's reads are all the worker's */
    int fail_submit;                  /* (tests) the ring's next submission fails with it */
#endif
};

int vblk_uring_built(void)
{
#ifdef VBLK_HAVE_URING
    return 1;
#else
    return 0;
#endif
}

#ifdef VBLK_HAVE_URING
/* Register the image open on fd with the ring: fd, or -1 (then reads go by fd number).
 * What is registered is a second open file description of the image, made through
 * /proc/self/fd, read-only and with fd's O_DIRECT, not fd's own: the kernel lets go of a
 * ring's registered files in a work item after the process is gone, and fd's description
 * holds the image's OFD lock, which would then outlive a killed VMM (seen here: a QEMU
 * started right after could not lock the image). The second one holds no lock. */
static int vblk_register_image(struct io_uring *ring, int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    char path[40];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    int own = open(path, O_RDONLY | O_CLOEXEC | (fl & O_DIRECT));
    if (own < 0)
        return -1;
    int rc = io_uring_register_files(ring, &own, 1);
    close(own);                       /* the ring holds the file now, or nothing does */
    return rc == 0 ? fd : -1;
}

/* A ring for one batch's reads, the image on fd registered with it (*registered_fd: fd, or
 * -1): 0 or -errno. No interrupting its thread to run completion work (it always waits for
 * its reads), and a submission that goes on past a failed request; older kernels refuse
 * both. */
static int vblk_ring_init(struct io_uring *ring, int fd, int *registered_fd)
{
    int rc = io_uring_queue_init(VBLK_BATCH, ring,
                                 IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL);
    if (rc == -EINVAL)
        rc = io_uring_queue_init(VBLK_BATCH, ring, 0);
    if (rc == 0)
        *registered_fd = vblk_register_image(ring, fd);
    return rc;
}

/* The image's file let go of here, not later by the kernel's teardown of the ring (a work
 * item): closing the backend then really closes it. */
static void vblk_ring_exit(struct io_uring *ring, int registered_fd)
{
    if (registered_fd >= 0)           /* a signal may interrupt the kernel's wait for it */
        while (io_uring_unregister_files(ring) == -EINTR)
            ;
    io_uring_queue_exit(ring);
}

static int vblk_retry(int rc)
{
    return rc == -EINTR || rc == -EAGAIN || rc == -EBUSY;
}

/* Read the batch's checked READs idx[0..n) (bt->io and bt->status set) through ring, whose
 * slot 0 holds the image when reg_fd is still the backend's fd; each one's used length goes
 * to bt->lens. Waits for every read: nothing is left in flight into guest RAM when this
 * returns. 0, or the errno the ring failed with: it must not be entered again (SQEs may be
 * left in it), and what it did not read was read with preadv. */
static int vblk_ring_reads(struct vblk_batch *bt, struct io_uring *ring, int reg_fd,
                           int *fail_submit, const uint8_t *idx, int n)
{
    const struct vblk_disk *b = bt->disk;
    int registered = reg_fd >= 0 && reg_fd == b->fd;
    int queued = 0, submitted = 0, reaped = 0, tries = 0, err = 0;
    uint8_t done[VBLK_BATCH] = {0};
    for (; queued < n; queued++) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
        if (!sqe) {                       /* not seen: n <= the SQ's size */
            err = EBUSY;
            break;
        }
        const struct vblk_io *io = &bt->io[idx[queued]];
        int fd = registered ? 0 : b->fd;
        if (io->cnt == 1 && bt->read_op)  /* no iovec to import */
            io_uring_prep_read(sqe, fd, io->data[0].iov_base,
                               (unsigned)io->data[0].iov_len, io->off);
        else
            io_uring_prep_readv(sqe, fd, io->data, (unsigned)io->cnt, io->off);
        if (registered)
            io_uring_sqe_set_flags(sqe, IOSQE_FIXED_FILE);
        io_uring_sqe_set_data64(sqe, idx[queued]);
    }
    while (submitted < queued) {
        int rc;
        if (*fail_submit) {               /* a test's: as a kernel's refusal, SQEs left in */
            rc = -*fail_submit;
            *fail_submit = 0;
        } else {
            rc = io_uring_submit_and_wait(ring, (unsigned)(queued - submitted));
        }
        if (rc > 0) {
            submitted += rc;
            continue;
        }
        if (rc < 0 && vblk_retry(rc) && ++tries < 100)
            continue;
        err = rc < 0 ? -rc : EIO;         /* the rest stays unsubmitted, never entered again */
        break;
    }
    while (reaped < submitted) {
        struct io_uring_cqe *cqe;
        int rc = io_uring_wait_cqe(ring, &cqe);
        if (rc < 0) {
            if (vblk_retry(rc))
                continue;
            /* Not seen (the CQ ring is twice the batch). A read still in flight may land
             * in guest RAM at any time: no request is answered, and Python's hold on the
             * mapping is not let go, until every one has come back. */
            err = -rc;
            struct timespec ms = { 0, 1000000 };
            nanosleep(&ms, NULL);
            continue;
        }
        uint64_t i = io_uring_cqe_get_data64(cqe);
        int32_t res = cqe->res;
        io_uring_cqe_seen(ring, cqe);
        reaped++;
        if (i >= VBLK_BATCH || done[i])
            continue;
        done[i] = 1;
        /* Anything not done whole (a short read, an error) is done again with preadv,
         * which finishes it or gives the error vblk_request would. */
        if (res >= 0 && (uint64_t)res == bt->io[i].total)
            bt->lens[i] = vblk_read_answer(bt->status[i], 1, bt->io[i].total);
        else
            bt->lens[i] = vblk_read_now(b->fd, &bt->io[i], bt->status[i]);
    }
    for (int k = 0; k < n; k++)           /* never submitted */
        if (!done[idx[k]])
            bt->lens[idx[k]] = vblk_read_now(b->fd, &bt->io[idx[k]], bt->status[idx[k]]);
    return err;
}

/* ---- a partner for large batches ----------------------------------------------------------
 *
 * A batch of cached reads is the kernel's copies out of the page cache, one after another on
 * the worker's CPU: 32 reads of 4 KiB take 28-34 us here, about what as many preadv calls
 * from a C loop take. Where a second CPU is free, a partner thread with a ring of its own
 * takes half of a large batch, and the batch takes about half as long (15-17 us here), as
 * QEMU's thread pool or io_uring's workers spread a queue's requests. The partner is offered
 * the half; if the worker has done its own before the partner began, it takes the offer back
 * and does it too: waking a sleeping thread on another CPU costs more here (40-56 us) than
 * the whole batch, so the worst a batch pays is the offer. After each job the partner polls
 * VBLK_PARTNER_POLL_NS for the next (the turnaround between a driver's batches), giving way
 * to any thread woken on its CPU, then sleeps on a futex.
 *
 * The queue's struct vblk_batch owns it; vblk_batch_free stops and joins it (the worker is
 * not serving then, and the partner waits for nothing but its own reads). The worker waits
 * for the partner's half before any of the batch's used entries go out, so no one else sees
 * the split; each request's io, status and length are one thread's at a time. */
#define VBLK_PARTNER_POLL_NS 16000u
#define VBLK_SPLIT_BYTES (32u << 10)  /* a smaller batch: the hand-off costs what it saves */

enum { VBLK_P_SLEEP, VBLK_P_POLL, VBLK_P_JOB, VBLK_P_RUN, VBLK_P_STOP };

/* vblk_batch_split's modes: off, on, and two for tests that make the hand-over
 * deterministic: the partner does every half offered (never taken back), or begins none
 * (every one taken back). */
enum { VBLK_SPLIT_OFF, VBLK_SPLIT_ON, VBLK_SPLIT_PARTNER_ALWAYS, VBLK_SPLIT_PARTNER_NEVER };

struct vblk_partner {
    uint32_t state;                   /* VBLK_P_*, the futex the partner sleeps on */
    uint32_t waiting;                 /* the worker sleeps on state until its job is done */
    int err;                          /* the last job's: its ring failed (vblk_ring_reads) */
    int n;                            /* the job: bt's requests idx[0..n) */
    uint8_t idx[VBLK_BATCH];
    /* The worker's own */
    int broken;                       /* its ring failed: no more jobs */
    int mode;                         /* VBLK_SPLIT_*: as the device runs, or a test's */
    uint64_t reads;                   /* reads it did */
    uint64_t taken_back;              /* reads offered to it and done by the worker */
    struct vblk_batch *bt;
    struct io_uring ring;
    int registered_fd;
    int fail_submit;                  /* (tests) as struct vblk_batch's */
    pthread_t thread;
    pid_t pid;                        /* the process whose thread it is (not a fork child) */
    int away_from;                    /* the worker's CPU, which the partner is kept off; -1 */
};

static long vblk_futex(uint32_t *word, int op, uint32_t val)
{
    return syscall(SYS_futex, word, op | FUTEX_PRIVATE_FLAG, val, NULL, NULL, 0);
}

static int vblk_partner_cas(struct vblk_partner *p, uint32_t *from, uint32_t to)
{
    return __atomic_compare_exchange_n(&p->state, from, to, 0, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}

static void *vblk_partner_main(void *arg)
{
    struct vblk_partner *p = arg;
    uint64_t until = 0;
    unsigned spins = 0;
    for (;;) {
        uint32_t s = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
        if (s == VBLK_P_STOP)
            return NULL;
        if (s == VBLK_P_SLEEP) {
            vblk_futex(&p->state, FUTEX_WAIT, VBLK_P_SLEEP);
            until = 0;
        } else if (s == VBLK_P_JOB) {
            if (__atomic_load_n(&p->mode, __ATOMIC_RELAXED) == VBLK_SPLIT_PARTNER_NEVER) {
                /* (tests) left for the worker to take back, which may need this CPU */
                if (++spins % 64)
                    hv_cpu_relax();
                else
                    sched_yield();
                continue;
            }
            if (!vblk_partner_cas(p, &s, VBLK_P_RUN))
                continue;             /* taken back by the worker */
            p->err = vblk_ring_reads(p->bt, &p->ring, p->registered_fd, &p->fail_submit,
                                     p->idx, p->n);
            s = VBLK_P_RUN;
            if (!__atomic_compare_exchange_n(&p->state, &s, VBLK_P_POLL, 0, __ATOMIC_SEQ_CST,
                                             __ATOMIC_SEQ_CST))
                return NULL;          /* stopped meanwhile (not while a worker serves) */
            if (__atomic_load_n(&p->waiting, __ATOMIC_SEQ_CST))
                vblk_futex(&p->state, FUTEX_WAKE, 1);
            until = hv_now_ns() + VBLK_PARTNER_POLL_NS;
        } else if (!until) {
            until = hv_now_ns() + VBLK_PARTNER_POLL_NS;
        } else if (++spins % 64) {
            hv_cpu_relax();
        } else if (hv_now_ns() >= until) {
            vblk_partner_cas(p, &s, VBLK_P_SLEEP);
        } else {
            sched_yield();            /* a thread woken on this CPU runs at once */
        }
    }
}

/* A partner for bt, or NULL (one CPU to run on, or no ring or thread to be had). */
static struct vblk_partner *vblk_partner_new(struct vblk_batch *bt)
{
    cpu_set_t cpus;
    if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0 && CPU_COUNT(&cpus) < 2)
        return NULL;
    struct vblk_partner *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->away_from = -1;
    p->pid = getpid();
    p->bt = bt;
    p->state = VBLK_P_SLEEP;
    if (vblk_ring_init(&p->ring, bt->disk->fd, &p->registered_fd) < 0) {
        free(p);
        return NULL;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* signals stay the interpreter's threads' */
    int rc = pthread_create(&p->thread, NULL, vblk_partner_main, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        vblk_ring_exit(&p->ring, p->registered_fd);
        free(p);
        return NULL;
    }
    pthread_setname_np(p->thread, "vblk-partner");
    return p;
}

static void vblk_partner_free(struct vblk_partner *p)
{
    if (p->pid == getpid()) {         /* a fork's child has no partner thread to stop */
        __atomic_store_n(&p->state, VBLK_P_STOP, __ATOMIC_RELEASE);
        vblk_futex(&p->state, FUTEX_WAKE, 1);
        pthread_join(p->thread, NULL);
    }
    vblk_ring_exit(&p->ring, p->registered_fd);
    free(p);
}

/* Keep the partner off the CPU the worker runs on. Woken by the worker, it would be put on
 * the worker's CPU, and it would wait there until the worker polls no more: here 19 of 20
 * jobs went back to the worker that way, none once it was kept off. Its CPUs are the ones
 * the worker may use (the worker's affinity, as the operator set it) but this one; set
 * again only when the worker has moved. */
static void vblk_partner_away(struct vblk_partner *p)
{
    int cpu = sched_getcpu();
    if (cpu < 0 || cpu == p->away_from)
        return;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) != 0)
        return;
    CPU_CLR(cpu, &set);
    if (CPU_COUNT(&set) && pthread_setaffinity_np(p->thread, sizeof(set), &set) == 0)
        p->away_from = cpu;
}

/* Offer the partner bt's requests idx[0..n) (woken if asleep): 1, or 0 if it has none. */
static int vblk_partner_give(struct vblk_partner *p, const uint8_t *idx, int n)
{
    if (p->broken)
        return 0;
    vblk_partner_away(p);
    memcpy(p->idx, idx, (size_t)n);
    p->n = n;
    uint32_t s = VBLK_P_POLL;
    if (vblk_partner_cas(p, &s, VBLK_P_JOB))
        return 1;
    if (s == VBLK_P_SLEEP && vblk_partner_cas(p, &s, VBLK_P_JOB)) {
        vblk_futex(&p->state, FUTEX_WAKE, 1);
        return 1;
    }
    return 0;
}

/* The worker's own half done (err: its ring failed meanwhile): the job offered is taken
 * back if the partner has not begun it, and done here (with preadv if the worker's ring
 * failed: a failed ring is not entered again), else waited for: a short spin, then asleep
 * until the partner wakes it (its half may wait for a disk). Returns the worker's ring's
 * error, err or one met taking the job back. */
static int vblk_partner_finish(struct vblk_batch *bt, struct vblk_partner *p, int err)
{
    uint32_t s = VBLK_P_JOB;
    if (p->mode != VBLK_SPLIT_PARTNER_ALWAYS && vblk_partner_cas(p, &s, VBLK_P_POLL)) {
        p->taken_back += (uint64_t)p->n;
        if (!err)
            err = vblk_ring_reads(bt, &bt->ring, bt->registered_fd, &bt->fail_submit, p->idx,
                                  p->n);
        else
            for (int k = 0; k < p->n; k++) {
                int i = p->idx[k];
                bt->lens[i] = vblk_read_now(bt->disk->fd, &bt->io[i], bt->status[i]);
            }
        return err;
    }
    uint64_t until = 0;
    for (unsigned i = 1; s == VBLK_P_JOB || s == VBLK_P_RUN; i++) {
        hv_cpu_relax();
        if (i % 64 == 0) {
            if (!until)
                until = hv_now_ns() + VBLK_PARTNER_POLL_NS;
            else if (hv_now_ns() >= until) {
                __atomic_store_n(&p->waiting, 1, __ATOMIC_SEQ_CST);
                s = __atomic_load_n(&p->state, __ATOMIC_SEQ_CST);
                if (s == VBLK_P_JOB || s == VBLK_P_RUN)
                    vblk_futex(&p->state, FUTEX_WAIT, s);
                __atomic_store_n(&p->waiting, 0, __ATOMIC_RELAXED);
            } else {
                sched_yield();        /* the partner may be waiting for this CPU */
            }
        }
        s = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
    }
    p->reads += (uint64_t)p->n;
    if (p->err)
        p->broken = 1;
    return err;
}
#endif

/* A queue's batch server state for disk, or NULL with *err set (ENOSYS: built without
 * liburing; else why io_uring_queue_init failed, e.g. EPERM where io_uring is disabled). */
struct vblk_batch *vblk_batch_new(struct vblk_disk *disk, int *err)
{
#ifdef VBLK_HAVE_URING
    struct vblk_batch *bt = calloc(1, sizeof(*bt));
    if (!bt) {
        *err = ENOMEM;
        return NULL;
    }
    int rc = vblk_ring_init(&bt->ring, disk->fd, &bt->registered_fd);
    if (rc < 0) {
        free(bt);
        *err = -rc;
        return NULL;
    }
    struct io_uring_probe *probe = io_uring_get_probe_ring(&bt->ring);
    bt->read_op = probe && io_uring_opcode_supported(probe, IORING_OP_READ);
    if (probe)
        io_uring_free_probe(probe);
    bt->disk = disk;
    bt->ring_ok = 1;
    *err = 0;
    return bt;
#else
    (void)disk;
    *err = ENOSYS;
    return NULL;
#endif
}

void vblk_batch_free(struct vblk_batch *bt)
{
    if (!bt)
        return;
#ifdef VBLK_HAVE_URING
    if (bt->partner)
        vblk_partner_free(bt->partner);
    vblk_ring_exit(&bt->ring, bt->registered_fd);
#endif
    free(bt);
}

/* Large batches shared with a partner thread (mode: a VBLK_SPLIT_* but OFF), or not (OFF):
 * whether they are now (1 or 0; -1 for a mode there is no such). Only while no worker
 * serves with bt (the queue's lock held). */
int vblk_batch_split(struct vblk_batch *bt, int mode)
{
#ifdef VBLK_HAVE_URING
    if (mode < VBLK_SPLIT_OFF || mode > VBLK_SPLIT_PARTNER_NEVER)
        return -1;
    if (mode && !bt->partner)
        bt->partner = vblk_partner_new(bt);
    else if (!mode && bt->partner) {
        vblk_partner_free(bt->partner);
        bt->partner = NULL;
    }
    if (bt->partner)
        __atomic_store_n(&bt->partner->mode, mode, __ATOMIC_RELAXED);
    return bt->partner != NULL;
#else
    (void)bt; (void)mode;
    return 0;
#endif
}

/* (tests) The next submission of the worker's ring (partner 0) or of the partner's (1) fails
 * with err, as a kernel's refusal would, its reads left in the ring: 1, or 0 when there is no
 * such ring in use. Only while no worker serves with bt. */
int vblk_batch_fail_next_submit(struct vblk_batch *bt, int partner, int err)
{
#ifdef VBLK_HAVE_URING
    if (partner && (!bt->partner || bt->partner->broken))
        return 0;
    /* The partner reads its field in a job, which the worker's hand-over orders after this. */
    *(partner ? &bt->partner->fail_submit : &bt->fail_submit) = err;
    return 1;
#else
    (void)bt; (void)partner; (void)err;
    return 0;
#endif
}

/* (tests) Requests queued in the worker's ring (partner 0) or the partner's (1) and never
 * handed to the kernel: a ring that failed keeps them, and is never entered again (a later
 * submission would hand them over). -1 when there is no such ring. */
int vblk_batch_unsubmitted(struct vblk_batch *bt, int partner)
{
#ifdef VBLK_HAVE_URING
    if (partner && !bt->partner)
        return -1;
    return (int)io_uring_sq_ready(partner ? &bt->partner->ring : &bt->ring);
#else
    (void)bt; (void)partner;
    return -1;
#endif
}

/* Reads the partner has done for bt (0 without one); *taken_back (unless NULL): reads
 * offered to it that the worker took back. */
uint64_t vblk_batch_partner_reads(const struct vblk_batch *bt, uint64_t *taken_back)
{
#ifdef VBLK_HAVE_URING
    if (taken_back)
        *taken_back = bt->partner ? bt->partner->taken_back : 0;
    return bt->partner ? bt->partner->reads : 0;
#else
    (void)bt;
    if (taken_back)
        *taken_back = 0;
    return 0;
#endif
}

/* Whether the batch reads through the ring's registered file (1) or by fd number (0). */
int vblk_batch_file_registered(const struct vblk_batch *bt)
{
#ifdef VBLK_HAVE_URING
    return bt->registered_fd >= 0 && bt->registered_fd == bt->disk->fd;
#else
    (void)bt;
    return 0;
#endif
}

/* 0 while the ring works, else the errno it failed with. */
int vblk_batch_error(const struct vblk_batch *bt)
{
    return bt->ring_ok ? 0 : (bt->ring_errno ? bt->ring_errno : EIO);
}

#ifdef VBLK_HAVE_URING
/* The batch's reads rd[0..nio), bytes in all: half to the partner when it is polling and
 * the batch is large enough to be worth it, the rest (or all) through the worker's ring. */
static void vblk_submit_reads(struct vblk_batch *bt, const uint8_t *rd, int nio,
                              uint64_t bytes)
{
    struct vblk_partner *p = bt->partner;
    int theirs = nio / 2;
    int shared = p && theirs && bytes >= VBLK_SPLIT_BYTES
                 && vblk_partner_give(p, rd + (nio - theirs), theirs);
    int err = vblk_ring_reads(bt, &bt->ring, bt->registered_fd, &bt->fail_submit, rd,
                              shared ? nio - theirs : nio);
    if (shared)
        err = vblk_partner_finish(bt, p, err);
    if (err) {
        bt->ring_ok = 0;
        bt->ring_errno = err;
    }
}
#endif

/* ---- serving a batch as if one by one ----------------------------------------------------
 *
 * A batch reads every chain (descriptors, indirect table, header) before any of its READs
 * writes guest RAM, and returns them all to the used ring at the end; served one by one, each
 * chain would be read after the ones before it wrote their data, status and used entry. The
 * two differ only for a driver whose buffers meet its own rings or one another (a driver bug,
 * or a hostile guest). Such a chain ends the batch before it, and starts the next one alone,
 * so that every guest sees exactly what the one-by-one servers (vblk_serve_chain, Python's
 * handle_chain) would give it. */

static int vblk_span_meets(struct vblk_span a, uintptr_t lo, uintptr_t hi)
{
    return lo < a.hi && a.lo < hi;
}

/* The first span of set ending after lo (set->n when none). */
static int vblk_spans_after(const struct vblk_spans *set, uintptr_t lo)
{
    int a = 0, b = set->n;
    if (b == 0 || set->s[b - 1].hi <= lo)
        return b;
    while (a < b) {
        int m = (a + b) / 2;
        if (set->s[m].hi <= lo)
            a = m + 1;
        else
            b = m;
    }
    return a;
}

static int vblk_spans_meet(const struct vblk_spans *set, uintptr_t lo, uintptr_t hi)
{
    int i = vblk_spans_after(set, lo);
    return i < set->n && set->s[i].lo < hi;
}

/* Add [lo, hi), merged with the spans it meets (a chain's own buffers may overlap). */
static void vblk_spans_add(struct vblk_spans *set, uintptr_t lo, uintptr_t hi)
{
    int i = vblk_spans_after(set, lo), j = i;
    while (j < set->n && set->s[j].lo < hi) {
        if (set->s[j].lo < lo)
            lo = set->s[j].lo;
        if (set->s[j].hi > hi)
            hi = set->s[j].hi;
        j++;
    }
    if (j == i && i < set->n)         /* room for it */
        memmove(&set->s[i + 1], &set->s[i], sizeof(set->s[0]) * (size_t)(set->n - i));
    else if (j > i + 1)               /* merged several: close the gap */
        memmove(&set->s[i + 1], &set->s[j], sizeof(set->s[0]) * (size_t)(set->n - j));
    set->n += 1 - (j - i);
    set->s[i] = (struct vblk_span){ lo, hi };
}

/* Whether [p, p+len) meets the used ring, what the batch will write, or (for what the chain
 * writes) the descriptor table or the available ring. */
static int vblk_meets(const struct vblk_batch *bt, const void *p, size_t len, int write)
{
    uintptr_t lo = (uintptr_t)p, hi = lo + len;
    if (!len)
        return 0;
    if (vblk_span_meets(bt->used, lo, hi))
        return 1;
    if (write && (vblk_span_meets(bt->desc, lo, hi) || vblk_span_meets(bt->avail, lo, hi)))
        return 1;
    return vblk_spans_meet(&bt->data, lo, hi) || vblk_spans_meet(&bt->status_bytes, lo, hi);
}

/* Whether the READ chain ch (writing io's buffers, when io is not NULL, and its status byte)
 * must not join the batch: what it reads or writes meets what the batch writes or the rings
 * as above. If it may, its writes are noted. */
static int vblk_batch_refuses(struct vblk_batch *bt, const struct hv_chain *ch,
                              const struct vblk_io *io, uint8_t *status)
{
    if (ch->n > VBLK_BATCH_SEGS)
        return 1;
    for (int i = 0; i < ch->nr; i++)
        if (vblk_meets(bt, ch->iov[i].iov_base, ch->iov[i].iov_len, 0))
            return 1;
    if (ch->table && vblk_meets(bt, ch->table, ch->table_len, 0))
        return 1;
    /* Its own buffers are noted after all the checks: they may meet one another (one by
     * one too, the chain is read before it writes, and its data lands before its status). */
    if (vblk_meets(bt, status, 1, 1))
        return 1;
    for (int i = 0; io && i < io->cnt; i++)
        if (vblk_meets(bt, io->data[i].iov_base, io->data[i].iov_len, 1))
            return 1;
    vblk_spans_add(&bt->status_bytes, (uintptr_t)status, (uintptr_t)status + 1);
    for (int i = 0; io && i < io->cnt; i++) {
        uintptr_t lo = (uintptr_t)io->data[i].iov_base;
        if (io->data[i].iov_len)
            vblk_spans_add(&bt->data, lo, lo + io->data[i].iov_len);
    }
    return 0;
}

/* The batch server (hv_batch_fn): ctx is a struct vblk_batch. Runs of READs go to the
 * kernel in one submission; any other request is served alone, in order, after the reads
 * before it completed (vblk_serve_chain's answers for everything). */
int vblk_serve_batch(void *ctx, struct hv_vq *q, int max)
{
    struct vblk_batch *bt = ctx;
#ifdef VBLK_HAVE_URING
    struct vblk_disk *b = bt->disk;
    if (!bt->ring_ok || !vblk_disk_ok(b)) {
        q->stop = HV_VQ_STOP_STATE;
        return 0;
    }
    bt->desc = (struct vblk_span){ (uintptr_t)q->desc,
                                   (uintptr_t)q->desc + sizeof(struct hv_vring_desc) * q->size };
    bt->avail = (struct vblk_span){ (uintptr_t)q->avail, (uintptr_t)q->avail
                                    + HV_VRING_AVAIL_RING_OFF
                                    + HV_VRING_AVAIL_ELEM_SIZE * q->size + HV_VRING_EVENT_SIZE };
    bt->used = (struct vblk_span){ (uintptr_t)q->used, (uintptr_t)q->used + HV_VRING_USED_RING_OFF
                                   + sizeof(struct hv_vring_used_elem) * q->size
                                   + HV_VRING_EVENT_SIZE };
    int served = 0;
    int cap = q->size < VBLK_BATCH ? (int)q->size : VBLK_BATCH;
    /* Rings that meet the used ring: each chain's walk would see the entries pushed before
     * it, so each is a batch of its own. */
    if (vblk_span_meets(bt->used, bt->desc.lo, bt->desc.hi)
        || vblk_span_meets(bt->used, bt->avail.lo, bt->avail.hi))
        cap = 1;
    while (served < max) {
        int n = 0, nio = 0, stop = 0;
        uint8_t rd[VBLK_BATCH];           /* the requests read through the ring */
        uint64_t bytes = 0;
        bt->data.n = bt->status_bytes.n = 0;
        memset(bt->status, 0, sizeof(bt->status));
        while (n < cap && served + n < max) {
            struct hv_chain *ch = &bt->chains[n];
            struct vblk_req_hdr h;
            uint8_t *status;
            int rc = hv->vq_peek_at(q, (uint32_t)n, ch);
            if (rc != HV_VQ_CHAIN) {
                stop = rc;
                break;
            }
            if (vblk_header(ch, &h, &status) || (h.type != VBLK_T_IN && h.type != VBLK_T_OUT)) {
                stop = HV_VQ_STOP_DECLINED;
                break;
            }
            if (h.type != VBLK_T_IN) {
                if (n)
                    break;            /* the reads before it complete first */
                int64_t len = vblk_request(b, ch, h.type, h.sector, status);
                if (len < 0) {
                    stop = HV_VQ_STOP_UNSUPPORTED;
                    break;
                }
                bt->heads[0] = ch->head;
                bt->lens[0] = (uint32_t)len;
                n = 1;
                break;
            }
            struct vblk_io *io = &bt->io[n];
            uint8_t answer = VBLK_S_OK;
            int what = vblk_check(b, ch, h.type, h.sector, io, &answer);
            if (what == VBLK_LEAVE) {
                stop = HV_VQ_STOP_UNSUPPORTED;
                break;
            }
            int alone = vblk_batch_refuses(bt, ch, what == VBLK_DO ? io : NULL, status);
            if (alone && n)
                break;                /* it starts the next batch, after these landed */
            bt->heads[n] = ch->head;
            bt->lens[n] = 1;                      /* the status alone, until the read is done */
            if (what == VBLK_DONE) {
                *status = answer;
            } else if (io->total == 0 || alone) {
                bt->lens[n] = vblk_read_now(b->fd, io, status);
            } else {
                bt->status[n] = status;
                rd[nio++] = (uint8_t)n;
                bytes += io->total;
            }
            n++;
            if (alone)
                break;
        }
        if (nio)
            vblk_submit_reads(bt, rd, nio, bytes);
        hv->vq_push_n(q, bt->heads, bt->lens, (uint32_t)n);
        served += n;
        if (stop) {
            q->stop = stop;
            return served;
        }
        if (!bt->ring_ok) {
            q->stop = HV_VQ_STOP_STATE;
            return served;
        }
    }
    q->stop = HV_VQ_STOP_MAX;
    return served;
#else
    (void)bt; (void)max;
    q->stop = HV_VQ_STOP_STATE;       /* never made without liburing (vblk_batch_new) */
    return 0;
#endif
}
