/* AHCI: NCQ READ/WRITE FPDMA QUEUED commands fetched and served natively.
 *
 * ahci_prepare() reads the command headers, command FISes and PRD tables of the issued
 * slots from guest RAM, with the checks hvframe_ahci.hba.AhciPort._fetch and
 * hvframe_ahci.ata.AtaDisk make, and keeps a slot only when every check passes: anything
 * else (another command, a bad tag, a range past the end, a PRD outside RAM, too many
 * segments) is left to the Python path, which answers it with the right ATA/AHCI error.
 * ahci_execute() then moves the data with the core's file I/O helper (GIL released). FISes
 * and the completion stay with Python, which settles a whole batch at once (the registers it
 * changes live in abar.c's register file).
 *
 * Guest values are hostile: each header, FIS and PRD is copied once before use, and guest
 * addresses are translated through the core's RAM region check only, with overflow-safe
 * arithmetic. struct ahci_cmd_header, ahci_prd, ahci_h2d and the AHCI_* numbers below that
 * are not defined here are generated from hvframe_ahci.regs (build_native.py).
 */
#include <errno.h>
#include <string.h>

HV_PLUGIN_API(ahci_bind)

#define AHCI_SLOTS 32
#define AHCI_MAX_IOV 256             /* merged buffers per command served natively */
#define AHCI_CMD_TABLE_ALIGN 0x80

struct ahci_slot {
    uint64_t offset;                    /* bytes into the disk */
    uint64_t length;                    /* bytes to transfer */
    int niov;
    int write, fua;
    int err;                            /* after hv_ahci_execute: 0 or an errno */
    struct iovec iov[AHCI_MAX_IOV];
};

/* One port's native state; Python fills the set-up part before each prepare. */
struct ahci_port {
    struct hv_ram ram;                  /* guest RAM (mem set by Python per call) */
    uint64_t clb;                       /* command list base, guest-physical */
    uint64_t sectors;                   /* disk size in logical sectors */
    uint32_t sector_size;
    int fd;
    int readonly;
    int write_through;                  /* every write is FUA (write cache off) */
    uint32_t ioc;                       /* out: prepared slots with a PRD's IOC bit */
    uint64_t bytes;                     /* out: what the prepared slots transfer */
    struct ahci_slot slot[AHCI_SLOTS];
};

static uint8_t *ahci_translate(const struct ahci_port *p, uint64_t gpa, uint64_t len)
{
    return hv->ram_translate(&p->ram, gpa, len);
}

/* One slot: 1 if it is an NCQ READ/WRITE the native path serves (slot state filled in and
 * PRDBC cleared), 0 to leave it to Python. A slot of more than max_bytes or max_prds PRD
 * entries is left too (the bounds of a vCPU's exit, which holds the HBA's mutex). */
static int ahci_prepare_slot(struct ahci_port *p, unsigned s, uint64_t max_bytes,
                             uint32_t max_prds)
{
    struct ahci_slot *sl = &p->slot[s];
    struct ahci_cmd_header h;
    struct ahci_h2d f;

    uint64_t at = (uint64_t)s * AHCI_CMD_HEADER_SIZE;
    if (p->clb > UINT64_MAX - at)
        return 0;                                       /* wraps: Python says HBFS */
    uint8_t *hp = ahci_translate(p, p->clb + at, sizeof(h));
    if (!hp)
        return 0;
    memcpy(&h, hp, sizeof(h));
    uint32_t cfl = h.flags & AHCI_CFL_MASK;
    if (cfl < 5 || cfl > 16 || h.prdtl > max_prds)
        return 0;
    uint64_t ctba = ((uint64_t)h.ctbau << 32) | (h.ctba & ~(uint32_t)(AHCI_CMD_TABLE_ALIGN - 1));
    uint64_t table_len = AHCI_CMD_TABLE_PRDT + (uint64_t)h.prdtl * sizeof(struct ahci_prd);
    const uint8_t *table = ahci_translate(p, ctba, table_len);
    if (!table)
        return 0;
    memcpy(&f, table, sizeof(f));
    if (f.type != AHCI_FIS_H2D || !(f.flags & AHCI_H2D_COMMAND))
        return 0;
    if (f.command != AHCI_READ_FPDMA && f.command != AHCI_WRITE_FPDMA)
        return 0;
    if ((unsigned)(f.count >> 3) != s)
        return 0;                                       /* the tag must name the slot */
    int write = f.command == AHCI_WRITE_FPDMA;
    if (write && p->readonly)
        return 0;
    uint64_t n = (uint64_t)f.features | (uint64_t)f.features_exp << 8;
    if (!n)
        n = 0x10000;
    uint64_t lba = (uint64_t)f.lba0 | (uint64_t)f.lba1 << 8 | (uint64_t)f.lba2 << 16
                   | (uint64_t)f.lba3 << 24 | (uint64_t)f.lba4 << 32 | (uint64_t)f.lba5 << 40;
    if (lba > p->sectors || n > p->sectors - lba)
        return 0;                                       /* IDNF, from Python */
    uint64_t left = n * p->sector_size;
    if (left > max_bytes)
        return 0;
    /* The PRDs, merged where contiguous, up to the transfer length. */
    int niov = 0, ioc = 0;
    uint64_t end = UINT64_MAX;
    for (uint32_t i = 0; i < h.prdtl && left; i++) {
        struct ahci_prd d;
        memcpy(&d, table + AHCI_CMD_TABLE_PRDT + (uint64_t)i * sizeof(d), sizeof(d));
        uint64_t addr = ((uint64_t)d.dbau << 32) | (d.dba & ~1u);
        uint64_t len = (uint64_t)(d.dbc & AHCI_PRD_DBC_MASK) + 1;
        if (d.dbc & AHCI_PRD_IOC)
            ioc = 1;
        if (len > left)
            len = left;
        uint8_t *host = ahci_translate(p, addr, len);
        if (!host)
            return 0;                                   /* HBFS, from Python */
        if (addr == end && (uint8_t *)sl->iov[niov - 1].iov_base + sl->iov[niov - 1].iov_len == host) {
            sl->iov[niov - 1].iov_len += len;
        } else {
            if (niov == AHCI_MAX_IOV)
                return 0;
            sl->iov[niov].iov_base = host;
            sl->iov[niov].iov_len = len;
            niov++;
        }
        end = addr + len;
        left -= len;
    }
    if (left)
        return 0;                                       /* PRDs too short: OFS, from Python */
    /* IOC of PRDs past the transfer length counts too, as Python reads the whole table. */
    for (uint32_t i = 0; i < h.prdtl && !ioc; i++) {
        uint32_t dbc;
        memcpy(&dbc, table + AHCI_CMD_TABLE_PRDT + (uint64_t)i * sizeof(struct ahci_prd)
                     + offsetof(struct ahci_prd, dbc), sizeof(dbc));
        ioc = (dbc & AHCI_PRD_IOC) != 0;
    }
    sl->offset = lba * p->sector_size;
    sl->length = n * p->sector_size;
    sl->niov = niov;
    sl->write = write;
    sl->fua = write && (p->write_through || (f.device & AHCI_FUA));
    sl->err = 0;
    if (ioc)
        p->ioc |= 1u << s;
    memset(hp + offsetof(struct ahci_cmd_header, prdbc), 0, sizeof(h.prdbc));
    return 1;
}

/* The slots of `slots` the native path takes: all of them, or none (0) when any one needs
 * the Python path -- so that a PxCI write is handled wholly one way, in slot order. */
static uint32_t prepare_bounded(struct ahci_port *p, uint32_t slots, uint64_t max_bytes,
                                uint32_t max_prds)
{
    p->ioc = 0;
    p->bytes = 0;
    if (!hv->ram_ok(&p->ram) || p->fd < 0
        || !(p->sector_size == 512 || p->sector_size == 4096))
        return 0;
    for (unsigned s = 0; s < AHCI_SLOTS; s++) {
        if (!(slots >> s & 1))
            continue;
        if (!ahci_prepare_slot(p, s, max_bytes - p->bytes, max_prds)) {
            p->ioc = 0;
            p->bytes = 0;
            return 0;
        }
        p->bytes += p->slot[s].length;
    }
    return slots;
}

uint32_t ahci_prepare(struct ahci_port *p, uint32_t slots)
{
    return prepare_bounded(p, slots, UINT64_MAX, UINT32_MAX);
}

/* Move the data of prepared `slots` (GIL released); returns the slots that failed, each
 * with its errno in slot[s].err. */
uint32_t ahci_execute(struct ahci_port *p, uint32_t slots)
{
    uint32_t failed = 0;
    for (unsigned s = 0; s < AHCI_SLOTS; s++) {
        if (!(slots >> s & 1))
            continue;
        struct ahci_slot *sl = &p->slot[s];
        /* file_rw consumes its iovecs: work on a copy, so a slot stays as prepared. */
        struct iovec iov[AHCI_MAX_IOV];
        memcpy(iov, sl->iov, sl->niov * sizeof(*iov));
        int err = hv->file_rw(p->fd, iov, sl->niov, sl->offset, sl->write);
        if (!err && sl->fua)
            err = hv->file_datasync(p->fd);
        sl->err = err;
        if (err)
            failed |= 1u << s;
    }
    return failed;
}

/* Slot s's prepared READ moved now if the page cache holds all of it (0), without waiting
 * for a disk; else nonzero, and the slot is left as prepared. */
static int read_slot_cached(struct ahci_port *p, unsigned s)
{
    struct ahci_slot *sl = &p->slot[s];
    /* file_read_cached consumes its iovecs: work on a copy, so the slot stays as prepared. */
    struct iovec iov[AHCI_MAX_IOV];
    memcpy(iov, sl->iov, sl->niov * sizeof(*iov));
    int err = hv->file_read_cached(p->fd, iov, sl->niov, sl->offset);
    if (!err)
        sl->err = 0;
    return err;
}

/* The prepared READs of `slots` whose data the page cache holds, moved now without waiting
 * for a disk (the vCPU's exit stays short); returns the slots done. The others are left as
 * prepared for ahci_execute on a worker, which reads them again in full. */
uint32_t ahci_execute_cached(struct ahci_port *p, uint32_t slots)
{
    uint32_t done = 0;
    for (unsigned s = 0; s < AHCI_SLOTS; s++)
        if ((slots >> s & 1) && !p->slot[s].write && read_slot_cached(p, s) == 0)
            done |= 1u << s;
    return done;
}

/* Whether every prepared READ of `slots` (the caller has left writes out) was moved now
 * from the page cache (a vCPU's exit serves them: no disk is waited for). Stops at the
 * first that is not cached and answers 0; what was moved then is moved again by whoever
 * serves them. */
static int ahci_read_all_cached(struct ahci_port *p, uint32_t slots)
{
    for (unsigned s = 0; s < AHCI_SLOTS; s++)
        if ((slots >> s & 1) && read_slot_cached(p, s) != 0)
            return 0;
    return 1;
}
