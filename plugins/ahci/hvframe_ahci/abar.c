/* AHCI: the ABAR registers a driver touches on every command, served without the GIL.
 *
 * ahci_abar_access is the bus's native function for the whole ABAR (opaque: the HBA's
 * struct ahci_hba_regs). It answers natively
 *   reads   of CAP, GHC, IS, PI, VS (and the rest of the generic block, which reads 0) and
 *           of each port's IS, IE, CMD, TFD, SSTS, SERR, SACT, CI (and the registers that
 *           read 0);
 *   writes  of HBA IS and PxIS (write-1-to-clear, the interrupt recomputed: an MSI is sent
 *           through the vector's irqfd gate, hv_irq_gate), of PxSACT and PxCI (bits set at
 *           once; new PxCI slots are handed to the port's worker through an eventfd, or,
 *           while Python has offered it and they are all NCQ reads the page cache holds,
 *           served and completed in the exit itself: serve_inline), and of the read-only
 *           registers (ignored);
 * and passes everything else to the HBA's Python handler (hvframe_ahci.hba.AhciHba.read/
 * write) through the core's py_call: PxCMD, PxSCTL, GHC, CLB/FB, PxIE, PxSERR, ... -- and any
 * write whose interrupt consequence Python must deliver (INTx, a masked or not yet routed
 * MSI), decided before anything changes, so that Python does the whole write.
 * Byte lanes are the Python handler's: an 8-byte access is two dword accesses, a read of
 * 1-4 bytes extracts them from the dword, a write that crosses a dword is ignored.
 *
 * Ownership. Every field here has one writer for each kind of change: the guest's native
 * writes only clear IS bits (PxIS, HBA IS), set PxSACT/PxCI/issued bits and recompute HBA IS
 * and the level; Python (under the HBA lock) does everything else -- completions clearing
 * PxCI/PxSACT and setting PxIS, PxCMD/PxTFD/PxSSTS/PxSERR/PxIE/GHC values, stop and reset --
 * through the functions at the end of this file. All changes are read-modify-writes under
 * `lock`, so a guest's W1C racing a completion on a worker loses neither; the mutex is the
 * innermost lock of the HBA (below hba.lock, hvframe.concurrency): nothing is called while
 * it is held except a non-blocking eventfd write and, in serve_inline, reads of the page
 * cache (RWF_NOWAIT: no disk is waited for; at most inline_max bytes and 256 PRD entries a
 * command) -- no other thread of hvframe is ever waited for, though the kernel may still
 * sleep in a page fault on guest RAM -- and it is never held across py_call.
 * Stores are atomic (release) and native reads load without the lock (acquire): a read
 * racing a change sees the value before or after it. Python stores a completion's PxTFD
 * first, then clears PxCI/PxSACT, then sets PxIS, so a guest that sees a slot done sees its
 * status.
 */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>

enum { AHCI_F_IS, AHCI_F_IE, AHCI_F_CMD, AHCI_F_TFD, AHCI_F_SSTS, AHCI_F_SERR, AHCI_F_SACT,
       AHCI_F_CI, AHCI_F_PORT_FIELDS };
enum { AHCI_H_GHC, AHCI_H_IS };
enum { AHCI_IRQ_LEVEL = 1, AHCI_IRQ_FIRE = 2, AHCI_IRQ_OWED = 4 };
#define AHCI_WAIT_IRQ (1LL << 32)        /* ahci_port_wait: an interrupt is owed */
#define AHCI_INLINE_MAX_PRDS 256         /* PRD entries a command served in the exit may have */

/* One port: its registers as a native read returns them. */
struct ahci_port_regs {
    uint32_t f[AHCI_F_PORT_FIELDS];   /* AHCI_F_*: PxCMD as read (CR, FR, CCS included) */
    uint32_t issued;                  /* PxCI slots written and not yet taken by the worker */
    int efd;                          /* the worker's eventfd; -1: PxCI writes go to Python */
    int waiting;                      /* the worker sleeps on efd */
    /* Served in the exit (ahci_port_inline): set while Python has nothing under way on the
     * port, so that a PxCI write of NCQ reads the page cache holds completes at once. */
    struct ahci_port *inline_nat;     /* the port's native NCQ state; NULL: not offered */
    uint64_t inline_fb;               /* PxFB, guest-physical: where the SDB FIS goes */
    uint64_t inline_max;              /* bytes one PxCI write may move in the exit */
    uint64_t inline_slots;            /* slots served in the exit (statistics, tests) */
    uint32_t inline_cold;             /* set when an exit declined reads the cache lacked */
    uint32_t irq_owed;                /* an exit's completion whose interrupt Python sends */
};

struct ahci_hba_regs {
    pthread_mutex_t lock;
    int py_handle;                    /* AhciHba's Python handler; -1: none (unmapped) */
    uint32_t native;                  /* 0: every access goes to Python (a reset, tests) */
    uint32_t nports;
    uint32_t cap, pi, vs;
    uint32_t ghc, is;
    uint32_t level;                   /* the interrupt condition at the last update */
    uint32_t intx;                    /* the INTx level Python drives (0 while MSI is on) */
    struct hv_irq_gate *msi;          /* the MSI vector's gate (Python keeps it alive) */
    uint64_t served, passed;          /* accesses answered here / passed to Python */
    struct ahci_port_regs port[AHCI_MAX_PORTS];
};

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)

/* PxIS as read from its stored bits: PCS and PRCS mirror PxSERR.DIAG.X and DIAG.N. */
static uint32_t is_as_read(uint32_t is, uint32_t serr)
{
    uint32_t v = is & ~(uint32_t)(AHCI_IS_PCS | AHCI_IS_PRCS);
    if (serr & AHCI_SERR_DIAG_X)
        v |= AHCI_IS_PCS;
    if (serr & AHCI_SERR_DIAG_N)
        v |= AHCI_IS_PRCS;
    return v;
}

static uint32_t port_is(const struct ahci_port_regs *p)
{
    return is_as_read(LOAD(p->f[AHCI_F_IS]), LOAD(p->f[AHCI_F_SERR]));
}

/* (lock held) HBA IS and the level that would follow from HBA IS bits `hba_is` and port
 * `port`'s PxIS bits being `port_bits` (port < 0: every port as stored), and whether an MSI
 * would be due. HBA IS bits are sticky (only the guest clears them); a port with an enabled
 * status sets its bit. */
static uint32_t irq_compute(const struct ahci_hba_regs *h, uint32_t hba_is, int port,
                            uint32_t port_bits, uint32_t *new_is)
{
    uint32_t n = hba_is;
    for (uint32_t i = 0; i < h->nports; i++) {
        const struct ahci_port_regs *p = &h->port[i];
        uint32_t is = (int)i == port ? is_as_read(port_bits, p->f[AHCI_F_SERR]) : port_is(p);
        if (is & p->f[AHCI_F_IE])
            n |= 1u << i;
    }
    uint32_t gained = n & ~hba_is;
    uint32_t level = (h->ghc & AHCI_GHC_IE) && n;
    *new_is = n;
    return (level ? AHCI_IRQ_LEVEL : 0)
           | (level && (gained || !h->level) ? AHCI_IRQ_FIRE : 0);
}

/* (lock held) Store the outcome of irq_compute. */
static void irq_store(struct ahci_hba_regs *h, uint32_t new_is, uint32_t r)
{
    STORE(h->is, new_is);
    h->level = r & AHCI_IRQ_LEVEL;
}

/* A guest W1C of PxIS (port >= 0) or HBA IS (port < 0): 1 done here; 0 (nothing changed)
 * when the interrupt that follows must be delivered by Python, which then does it all. */
static int w1c(struct ahci_hba_regs *h, int port, uint32_t bits)
{
    pthread_mutex_lock(&h->lock);
    uint32_t pis = port >= 0 ? h->port[port].f[AHCI_F_IS] & ~bits : 0;
    uint32_t new_is;
    uint32_t r = irq_compute(h, port >= 0 ? h->is : h->is & ~bits, port, pis, &new_is);
    const struct hv_irq_gate *g = h->msi;
    int msi_native = g && LOAD(g->open) && !h->intx;
    if (!msi_native && ((r & AHCI_IRQ_FIRE) || (r & AHCI_IRQ_LEVEL) != h->intx)) {
        pthread_mutex_unlock(&h->lock);
        return 0;
    }
    uint32_t old_pis = port >= 0 ? h->port[port].f[AHCI_F_IS] : 0;
    uint32_t old_is = h->is, old_level = h->level;
    if (port >= 0)
        STORE(h->port[port].f[AHCI_F_IS], pis);
    irq_store(h, new_is, r);
    /* The MSI after the state it announces: a non-blocking eventfd write. Should the gate
     * have shut since we looked (the guest masking the vector on another vCPU), the write is
     * undone -- nobody else changed these fields, the lock is held -- and Python does it
     * all, setting the vector's pending bit. */
    if (msi_native && (r & AHCI_IRQ_FIRE) && !hv->irq_gate_fire(g)) {
        if (port >= 0)
            STORE(h->port[port].f[AHCI_F_IS], old_pis);
        STORE(h->is, old_is);
        h->level = old_level;
        pthread_mutex_unlock(&h->lock);
        return 0;
    }
    pthread_mutex_unlock(&h->lock);
    return 1;
}

/* The dword at off (a multiple of 4) if a native read serves it. */
static int read32(struct ahci_hba_regs *h, uint32_t off, uint32_t *out)
{
    if (off < AHCI_PORT_BASE) {
        switch (off) {
        case AHCI_GHC_CAP: *out = h->cap; break;
        case AHCI_GHC_GHC: *out = LOAD(h->ghc); break;
        case AHCI_GHC_IS: *out = LOAD(h->is); break;
        case AHCI_GHC_PI: *out = h->pi; break;
        case AHCI_GHC_VS: *out = h->vs; break;
        default: *out = 0;                             /* not offered: reads 0 */
        }
        return 1;
    }
    uint32_t n = (off - AHCI_PORT_BASE) / AHCI_PORT_STRIDE;
    uint32_t reg = (off - AHCI_PORT_BASE) % AHCI_PORT_STRIDE;
    if (n >= h->nports) {
        *out = 0;
        return 1;
    }
    const struct ahci_port_regs *p = &h->port[n];
    switch (reg) {
    case AHCI_PX_IS: *out = port_is(p); return 1;
    case AHCI_PX_IE: *out = LOAD(p->f[AHCI_F_IE]); return 1;
    case AHCI_PX_CMD: *out = LOAD(p->f[AHCI_F_CMD]); return 1;
    case AHCI_PX_TFD: *out = LOAD(p->f[AHCI_F_TFD]); return 1;
    case AHCI_PX_SSTS: *out = LOAD(p->f[AHCI_F_SSTS]); return 1;
    case AHCI_PX_SERR: *out = LOAD(p->f[AHCI_F_SERR]); return 1;
    case AHCI_PX_SACT: *out = LOAD(p->f[AHCI_F_SACT]); return 1;
    case AHCI_PX_CI: *out = LOAD(p->f[AHCI_F_CI]); return 1;
    case AHCI_PX_CLB: case AHCI_PX_CLBU: case AHCI_PX_FB: case AHCI_PX_FBU:
    case AHCI_PX_SIG: case AHCI_PX_SCTL: case AHCI_PX_SNTF:
        return 0;                                      /* Python's: rarely read */
    default:
        *out = 0;                                      /* FBS, DEVSLP, reserved */
        return 1;
    }
}

/* New PxCI slots (lock held, PxCMD.ST set): visible at once, the worker told. */
static void issue_locked(struct ahci_port_regs *p, uint32_t bits, int *wake)
{
    uint32_t ci = p->f[AHCI_F_CI];
    uint32_t add = bits & ~ci;
    if (!add)
        return;
    STORE(p->f[AHCI_F_CI], ci | add);
    STORE(p->issued, p->issued | add);          /* the worker's poll reads it unlocked */
    if (p->waiting) {
        p->waiting = 0;
        *wake = 1;
    }
}

static void signal_efd(int efd)
{
    uint64_t one = 1;
    ssize_t r = write(efd, &one, sizeof(one));
    (void)r;          /* EAGAIN: the counter is saturated, a wake-up is pending anyway */
}

/* (lock held) The interrupt after a completion in the exit: HBA IS and the level as the
 * completion leaves them, and an MSI through the vector's open gate, as w1c sends one. What
 * the exit cannot deliver (INTx, a masked vector, a gate shut since we looked) is owed: the
 * worker, woken through wake, has Python recompute and deliver it (AhciHba.deliver_owed),
 * with the MSI the change called for. */
static void inline_irq(struct ahci_hba_regs *h, struct ahci_port_regs *p, int *wake)
{
    uint32_t new_is;
    uint32_t r = irq_compute(h, h->is, -1, 0, &new_is);
    const struct hv_irq_gate *g = h->msi;
    int msi_native = g && LOAD(g->open) && !h->intx;
    int owed;
    irq_store(h, new_is, r);
    if (msi_native)
        owed = (r & AHCI_IRQ_FIRE) && !hv->irq_gate_fire(g);
    else
        owed = (r & AHCI_IRQ_FIRE) || (r & AHCI_IRQ_LEVEL) != h->intx;
    if (!owed)
        return;
    STORE(p->irq_owed, p->irq_owed | AHCI_IRQ_OWED | (r & AHCI_IRQ_FIRE));
    if (p->waiting) {
        p->waiting = 0;
        *wake = 1;
    }
}

/* (lock held, PxCMD.ST set, a worker) New PxCI slots served in the exit: every one an NCQ
 * READ the native path takes (ncq.c's checks), their SActive bits set, the transfer within
 * inline_max, all of it in the page cache. Then they complete as _settle_native completes
 * a batch -- PxTFD, PxCMD.CCS, PxCI, the SDB FIS, PxSACT, PxIS, the interrupt -- and 1 is
 * returned. Anything else returns 0 with nothing changed but the lease, which is withdrawn:
 * the worker takes the slots, and Python offers the lease again once nothing is under way.
 * The lock is held throughout (no disk is waited for: RWF_NOWAIT), so Python's changes of
 * the port, which take it, never see half a completion. */
static int serve_inline(struct ahci_hba_regs *h, struct ahci_port_regs *p, uint32_t bits,
                        int *wake)
{
    struct ahci_port *nat = p->inline_nat;
    uint32_t add = bits & ~p->f[AHCI_F_CI];
    if (!add)
        return 1;                                      /* nothing new */
    uint32_t cmd = p->f[AHCI_F_CMD];
    struct ahci_sdb_fis *sdb = NULL;
    /* Bounded before anything is walked: the bytes, and the PRD entries (Linux's driver
     * uses at most 168 a command), so that no guest holds the mutex long. */
    if (p->issued || (add & ~p->f[AHCI_F_SACT])
        || prepare_bounded(nat, add, p->inline_max, AHCI_INLINE_MAX_PRDS) != add)
        goto decline;
    if (cmd & AHCI_CMD_FRE) {
        if (p->inline_fb > UINT64_MAX - AHCI_RX_SDBFIS)
            goto decline;
        sdb = (struct ahci_sdb_fis *)hv->ram_translate(&nat->ram, p->inline_fb + AHCI_RX_SDBFIS,
                                                       sizeof(*sdb));
        if (!sdb)
            goto decline;                              /* HBFS, from Python */
    }
    for (unsigned i = 0; i < AHCI_SLOTS; i++)
        if ((add >> i & 1) && nat->slot[i].write)
            goto decline;                              /* writes are the disk workers' */
    if (!ahci_read_all_cached(nat, add)) {
        p->inline_cold = 1;                            /* Python waits before offering again */
        goto decline;
    }
    /* Accepted and done, in the order a polling guest relies on: the status, then the
     * slots, then the events. */
    uint32_t last = 31 - (uint32_t)__builtin_clz(add);
    cmd = (cmd & ~(0x1Fu << AHCI_CMD_CCS_SHIFT)) | last << AHCI_CMD_CCS_SHIFT;
    STORE(p->f[AHCI_F_TFD], (uint32_t)AHCI_ST_OK);
    STORE(p->f[AHCI_F_CMD], cmd);
    STORE(p->f[AHCI_F_CI], p->f[AHCI_F_CI] & ~add);
    if (sdb) {
        struct ahci_sdb_fis f = { .type = AHCI_FIS_SDB, .flags = AHCI_FIS_I,
                                  .status = AHCI_ST_OK & 0x77, .error = 0, .sactive = add };
        memcpy(sdb, &f, sizeof(f));
    }
    STORE(p->f[AHCI_F_SACT], p->f[AHCI_F_SACT] & ~add);
    STORE(p->f[AHCI_F_IS], p->f[AHCI_F_IS] | AHCI_IS_SDBS | (nat->ioc & add ? AHCI_IS_DPS : 0));
    inline_irq(h, p, wake);
    __atomic_add_fetch(&p->inline_slots, (uint64_t)__builtin_popcount(add), __ATOMIC_RELAXED);
    return 1;
decline:
    p->inline_nat = NULL;
    return 0;
}

/* A write of the dword at off (value and mask already in its lanes): 1 done here. */
static int write32(struct ahci_hba_regs *h, uint32_t off, uint32_t value, uint32_t mask)
{
    uint32_t bits = value & mask;
    if (off < AHCI_PORT_BASE) {
        if (off == AHCI_GHC_IS)
            return w1c(h, -1, bits);
        return off != AHCI_GHC_GHC;                    /* CAP, PI, VS, ...: read-only */
    }
    uint32_t n = (off - AHCI_PORT_BASE) / AHCI_PORT_STRIDE;
    uint32_t reg = (off - AHCI_PORT_BASE) % AHCI_PORT_STRIDE;
    if (n >= h->nports)
        return 1;
    struct ahci_port_regs *p = &h->port[n];
    switch (reg) {
    case AHCI_PX_IS:
        return w1c(h, (int)n, bits);
    case AHCI_PX_SACT:
    case AHCI_PX_CI: {
        int served = 1, wake = 0;
        pthread_mutex_lock(&h->lock);
        if (!(p->f[AHCI_F_CMD] & AHCI_CMD_ST))
            ;                                          /* ignored while stopped */
        else if (reg == AHCI_PX_SACT)
            STORE(p->f[AHCI_F_SACT], p->f[AHCI_F_SACT] | bits);
        else if (p->efd < 0)
            served = 0;                                /* no worker: Python issues them */
        else if (!p->inline_nat || !serve_inline(h, p, bits, &wake))
            issue_locked(p, bits, &wake);
        if (wake)
            signal_efd(p->efd);                        /* under the lock: not closed meanwhile */
        pthread_mutex_unlock(&h->lock);
        return served;
    }
    case AHCI_PX_TFD: case AHCI_PX_SIG: case AHCI_PX_SSTS:
        return 1;                                      /* read-only */
    default:
        return 0;
    }
}

static uint64_t to_python(struct ahci_hba_regs *h, uint64_t offset, uint32_t size,
                          uint64_t value, int is_write)
{
    __atomic_add_fetch(&h->passed, 1, __ATOMIC_RELAXED);
    int handle = LOAD(h->py_handle);
    if (handle < 0)
        return is_write ? 0 : ~0ULL;
    return hv->py_call(handle, offset, size, value, is_write);
}

/* The bus's native function for the ABAR (opaque: struct ahci_hba_regs). */
uint64_t ahci_abar_access(void *opaque, uint64_t offset, uint32_t size, uint64_t value,
                          int is_write)
{
    struct ahci_hba_regs *h = opaque;
    if (size == 8) {                                   /* two dwords, as Python has it */
        uint64_t lo = ahci_abar_access(opaque, offset, 4, value & 0xFFFFFFFFu, is_write);
        uint64_t hi = ahci_abar_access(opaque, offset + 4, 4, value >> 32, is_write);
        return is_write ? 0 : ((lo & 0xFFFFFFFFu) | hi << 32);
    }
    if (size < 1 || size > 4 || offset >= AHCI_ABAR_SIZE || !LOAD(h->native))
        return to_python(h, offset, size, value, is_write);
    uint32_t shift = 8 * (uint32_t)(offset & 3);
    uint32_t off = (uint32_t)offset & ~3u;
    uint64_t lanes = (size == 4 ? 0xFFFFFFFFull : (1ull << (8 * size)) - 1);
    if (!is_write) {
        uint32_t v;
        if (read32(h, off, &v)) {
            __atomic_add_fetch(&h->served, 1, __ATOMIC_RELAXED);
            return (v >> shift) & lanes;
        }
    } else {
        if ((offset & 3) + size > 4) {                 /* crosses a dword: means nothing */
            __atomic_add_fetch(&h->served, 1, __ATOMIC_RELAXED);
            return 0;
        }
        uint32_t mask = (uint32_t)(lanes << shift);
        if (write32(h, off, (uint32_t)(value << shift) & mask, mask)) {
            __atomic_add_fetch(&h->served, 1, __ATOMIC_RELAXED);
            return 0;
        }
    }
    return to_python(h, offset, size, value, is_write);
}

/* ---- Python's side (cffi calls these without the GIL; the HBA lock held) ---------------- */

int ahci_hba_init(struct ahci_hba_regs *h, uint32_t nports, uint32_t cap, uint32_t pi,
                  uint32_t vs)
{
    if (nports > AHCI_MAX_PORTS)
        return -EINVAL;
    pthread_mutex_init(&h->lock, NULL);
    h->py_handle = -1;
    h->nports = nports;
    h->cap = cap;
    h->pi = pi;
    h->vs = vs;
    for (uint32_t i = 0; i < AHCI_MAX_PORTS; i++)
        h->port[i].efd = -1;
    STORE(h->native, 1u);
    return 0;
}

void ahci_set_handler(struct ahci_hba_regs *h, int py_handle)
{
    STORE(h->py_handle, py_handle);
}

/* Serve natively (on) or pass everything to Python; once this returns no native access is
 * half done (each holds the lock while it changes anything). */
void ahci_set_native(struct ahci_hba_regs *h, int on)
{
    pthread_mutex_lock(&h->lock);
    STORE(h->native, on ? 1u : 0u);
    pthread_mutex_unlock(&h->lock);
}

void ahci_set_msi_gate(struct ahci_hba_regs *h, struct hv_irq_gate *g)
{
    pthread_mutex_lock(&h->lock);
    h->msi = g;
    pthread_mutex_unlock(&h->lock);
}

/* Clear, then set bits of a port field (AHCI_F_*) in one step; the new value. */
uint32_t ahci_port_update(struct ahci_hba_regs *h, uint32_t port, uint32_t field,
                          uint32_t clear, uint32_t set)
{
    if (port >= h->nports || field >= AHCI_F_PORT_FIELDS)
        return 0;
    pthread_mutex_lock(&h->lock);
    uint32_t *f = &h->port[port].f[field];
    uint32_t v = (*f & ~clear) | set;
    STORE(*f, v);
    pthread_mutex_unlock(&h->lock);
    return v;
}

/* The same for HBA fields (AHCI_H_*). */
uint32_t ahci_hba_update(struct ahci_hba_regs *h, uint32_t field, uint32_t clear, uint32_t set)
{
    uint32_t *f = field == AHCI_H_GHC ? &h->ghc : field == AHCI_H_IS ? &h->is : NULL;
    if (!f)
        return 0;
    pthread_mutex_lock(&h->lock);
    uint32_t v = (*f & ~clear) | set;
    STORE(*f, v);
    pthread_mutex_unlock(&h->lock);
    return v;
}

/* NCQ slots the device accepted, in one call (the hot path's): their PxCI bits clear, the
 * status byte of PxTFD becomes `status` (BSY off), PxCMD's value as read becomes cmd. */
void ahci_port_accepted(struct ahci_hba_regs *h, uint32_t port, uint32_t slots,
                        uint32_t status, uint32_t cmd)
{
    if (port >= h->nports)
        return;
    struct ahci_port_regs *p = &h->port[port];
    pthread_mutex_lock(&h->lock);
    STORE(p->f[AHCI_F_TFD], (p->f[AHCI_F_TFD] & ~0xFFu) | (status & 0xFFu));
    STORE(p->f[AHCI_F_CMD], cmd);
    STORE(p->f[AHCI_F_CI], p->f[AHCI_F_CI] & ~slots);
    pthread_mutex_unlock(&h->lock);
}

static uint32_t irq_update_locked(struct ahci_hba_regs *h, int msi_enabled)
{
    uint32_t new_is;
    uint32_t r = irq_compute(h, h->is, -1, 0, &new_is);
    irq_store(h, new_is, r);
    h->intx = msi_enabled ? 0 : (r & AHCI_IRQ_LEVEL);
    return r;
}

/* Commands done, in one call (the hot path's), in the order a polling guest relies on:
 * PxTFD = tfd and PxCMD's value = cmd, then `clear` bits of field (PxCI or PxSACT) cleared,
 * then `events` set in PxIS, then the interrupt recomputed (ahci_irq_update's answer; not
 * when msi_enabled < 0: Python computes it, see ahci_irq_store). */
uint32_t ahci_port_done(struct ahci_hba_regs *h, uint32_t port, uint32_t tfd, uint32_t cmd,
                        uint32_t field, uint32_t clear, uint32_t events, int msi_enabled)
{
    if (port >= h->nports || (field != AHCI_F_CI && field != AHCI_F_SACT))
        return 0;
    struct ahci_port_regs *p = &h->port[port];
    pthread_mutex_lock(&h->lock);
    STORE(p->f[AHCI_F_TFD], tfd);
    STORE(p->f[AHCI_F_CMD], cmd);
    STORE(p->f[field], p->f[field] & ~clear);
    STORE(p->f[AHCI_F_IS], p->f[AHCI_F_IS] | events);
    uint32_t r = msi_enabled < 0 ? 0 : irq_update_locked(h, msi_enabled);
    pthread_mutex_unlock(&h->lock);
    return r;
}

/* Store an interrupt state Python computed itself (the reference computation, used while
 * native accesses are off), so that native accesses carry on from it when they are on. */
void ahci_irq_store(struct ahci_hba_regs *h, uint32_t hba_is, uint32_t level, uint32_t intx)
{
    pthread_mutex_lock(&h->lock);
    STORE(h->is, hba_is);
    h->level = level ? 1 : 0;
    h->intx = intx ? 1 : 0;
    pthread_mutex_unlock(&h->lock);
}

/* PxCI written through Python (no worker, or while native accesses are off): the slots
 * new to PxCI, now set and also left in `issued` for ahci_port_take. */
uint32_t ahci_port_issue(struct ahci_hba_regs *h, uint32_t port, uint32_t bits)
{
    if (port >= h->nports)
        return 0;
    int wake = 0;
    pthread_mutex_lock(&h->lock);
    struct ahci_port_regs *p = &h->port[port];
    uint32_t before = p->issued;
    issue_locked(p, bits, &wake);
    uint32_t added = p->issued & ~before;
    if (wake && p->efd >= 0)
        signal_efd(p->efd);
    pthread_mutex_unlock(&h->lock);
    return added;
}

/* The slots issued since the last call, handed to whoever starts them. */
uint32_t ahci_port_take(struct ahci_hba_regs *h, uint32_t port)
{
    if (port >= h->nports)
        return 0;
    pthread_mutex_lock(&h->lock);
    uint32_t v = h->port[port].issued;
    STORE(h->port[port].issued, 0u);
    pthread_mutex_unlock(&h->lock);
    return v;
}

/* The port forgets its commands (ST cleared, COMRESET, reset): PxCI, PxSACT and what the
 * worker had not taken yet, in one step against the guest's writes. */
void ahci_port_stop(struct ahci_hba_regs *h, uint32_t port)
{
    if (port >= h->nports)
        return;
    pthread_mutex_lock(&h->lock);
    struct ahci_port_regs *p = &h->port[port];
    STORE(p->f[AHCI_F_CI], 0u);
    STORE(p->f[AHCI_F_SACT], 0u);
    STORE(p->issued, 0u);
    pthread_mutex_unlock(&h->lock);
}

/* Recompute HBA IS and the level after Python changed something; Python delivers what the
 * answer (AHCI_IRQ_*) says. msi_enabled: Python sends MSIs, INTx stays low; otherwise the
 * INTx pin follows the level. */
uint32_t ahci_irq_update(struct ahci_hba_regs *h, int msi_enabled)
{
    pthread_mutex_lock(&h->lock);
    uint32_t r = irq_update_locked(h, msi_enabled);
    pthread_mutex_unlock(&h->lock);
    return r;
}

/* Offer the port's PxCI writes to be served in the exit (nat set: the port's native NCQ
 * state, filled in for its disk; fb: PxFB; max_bytes per write) or withdraw the offer (nat
 * NULL). Once this returns no exit is serving with the old offer. */
void ahci_port_inline(struct ahci_hba_regs *h, uint32_t port, struct ahci_port *nat,
                      uint64_t fb, uint64_t max_bytes)
{
    if (port >= h->nports)
        return;
    pthread_mutex_lock(&h->lock);
    struct ahci_port_regs *p = &h->port[port];
    p->inline_nat = nat;
    p->inline_fb = fb;
    p->inline_max = max_bytes;
    pthread_mutex_unlock(&h->lock);
}

/* What an exit left for Python to deliver (AHCI_IRQ_OWED, with AHCI_IRQ_FIRE if the change
 * called for an MSI; 0: nothing), no longer owed once taken. */
uint32_t ahci_port_take_irq(struct ahci_hba_regs *h, uint32_t port)
{
    if (port >= h->nports)
        return 0;
    pthread_mutex_lock(&h->lock);
    uint32_t owed = h->port[port].irq_owed;
    STORE(h->port[port].irq_owed, 0u);
    pthread_mutex_unlock(&h->lock);
    return owed;
}

/* ---- the port's worker ------------------------------------------------------------------ */

/* Give the port a worker: PxCI writes are then served natively. 0 or -errno. */
int ahci_port_worker_open(struct ahci_hba_regs *h, uint32_t port)
{
    if (port >= h->nports)
        return -EINVAL;
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0)
        return -errno;
    pthread_mutex_lock(&h->lock);
    if (h->port[port].efd >= 0) {
        pthread_mutex_unlock(&h->lock);
        close(efd);
        return -EBUSY;
    }
    h->port[port].efd = efd;
    pthread_mutex_unlock(&h->lock);
    return 0;
}

/* (the worker) Wait until slots are issued: first polling for up to spin_ns (a driver
 * that just had commands served usually issues more at once, and a sleeping thread takes
 * tens of microseconds to wake), then sleeping up to timeout_ms (< 0: forever) or a kick.
 * The slots waiting, plus AHCI_WAIT_IRQ if an interrupt is owed (0 on timeout or kick), or
 * -errno (-EBADF once the worker is closed). */
int64_t ahci_port_wait(struct ahci_hba_regs *h, uint32_t port, uint64_t spin_ns,
                       int timeout_ms)
{
    if (port >= h->nports)
        return -EINVAL;
    struct ahci_port_regs *p = &h->port[port];
    if (spin_ns) {
        /* Yielding every 64 turns: the vCPU that would issue may be runnable on this CPU
         * (as vq_poll_avail in the core). */
        uint64_t end = hv_now_ns() + spin_ns;
        for (unsigned i = 1; !LOAD(p->issued) && !LOAD(p->irq_owed) && hv_now_ns() < end; i++) {
            hv_cpu_relax();
            if (i % 64 == 0)
                sched_yield();
        }
    }
    pthread_mutex_lock(&h->lock);
    int64_t n = p->issued | (p->irq_owed ? AHCI_WAIT_IRQ : 0);
    int efd = p->efd;
    p->waiting = !n && efd >= 0;
    pthread_mutex_unlock(&h->lock);
    if (n)
        return n;
    if (efd < 0)
        return -EBADF;
    struct pollfd pf = { .fd = efd, .events = POLLIN };
    int r;
    do
        r = poll(&pf, 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    int err = r < 0 ? errno : 0;
    pthread_mutex_lock(&h->lock);
    uint64_t count;
    if (p->efd >= 0) {
        ssize_t got = read(p->efd, &count, sizeof(count));      /* reset it */
        (void)got;
    }
    p->waiting = 0;
    n = p->issued | (p->irq_owed ? AHCI_WAIT_IRQ : 0);
    pthread_mutex_unlock(&h->lock);
    return err ? -(int64_t)err : n;
}

/* Wake the worker out of ahci_port_wait (to stop it). */
void ahci_port_kick(struct ahci_hba_regs *h, uint32_t port)
{
    if (port >= h->nports)
        return;
    pthread_mutex_lock(&h->lock);
    if (h->port[port].efd >= 0)
        signal_efd(h->port[port].efd);
    pthread_mutex_unlock(&h->lock);
}

/* The worker is gone: PxCI writes go to Python from now on. */
void ahci_port_worker_close(struct ahci_hba_regs *h, uint32_t port)
{
    if (port >= h->nports)
        return;
    pthread_mutex_lock(&h->lock);
    struct ahci_port_regs *p = &h->port[port];
    if (p->efd >= 0)
        close(p->efd);
    p->efd = -1;
    p->waiting = 0;
    pthread_mutex_unlock(&h->lock);
}
