/* AHCI port restart while NCQ requests are still with the block backend.
 *
 * On the AHCI function at PCI slot AHCI_SLOT (default 3), its first port with a link:
 *   6 rounds of: 32 NCQ READ FPDMA QUEUED (tags 0-31, 8 sectors each, distinct LBAs, each its
 *   own PxSACT + PxCI write), then PxCMD.ST cleared and set again at once (no wait for CR),
 *   then a bounded wait for PxCI == PxSACT == 0;
 *   32 NCQ WRITEs of 'A' (slot t to LBA 100 + 8 t, tags 31..0), ST cleared and set again at
 *   once, then one NCQ WRITE of 'B' to LBA 100 (issued while the port may still drain),
 *   waited for;
 *   an NCQ READ of LBA 100, which must be all 'B'.
 * Prints "AHCI-RESTART OK" or "AHCI-RESTART FAIL <what>" on COM1; main returns: power off.
 * The commands are polled (no interrupts); each wait is bounded. */
#ifndef AHCI_SLOT
#define AHCI_SLOT       3
#endif
#define POLL_LOOPS      1000000u
#define ROUNDS          6
#define READ_LBA0       512u
#define WRITE_LBA0      100u
#define AHCI_PRDS       1
#include "ahci.h"

static struct cmd_header cmdlist[32] __attribute__((aligned(1024)));
static u8 rfis[256] __attribute__((aligned(256)));
static struct cmd_table tables[32];
static u8 rbuf[4096] __attribute__((aligned(16)));     /* every stale read lands here */
static u8 abuf[4096] __attribute__((aligned(16)));
static u8 bbuf[4096] __attribute__((aligned(16)));
static u8 check[4096] __attribute__((aligned(16)));

#define FAIL(...) do { printf("AHCI-RESTART FAIL " __VA_ARGS__); return 0; } while (0)

/* An NCQ READ/WRITE FPDMA QUEUED of 8 sectors in slot == tag, one PRD. */
static void build_ncq(u32 tag, int write, u32 lba, void *buf)
{
    struct cmd_table *t = &tables[tag];
    memset(t, 0, sizeof *t);
    u8 *f = t->cfis;
    f[0] = 0x27;                            /* H2D register FIS */
    f[1] = 0x80;                            /* C */
    f[2] = write ? 0x61 : 0x60;
    f[3] = 8;                               /* sector count in FEATURES */
    f[4] = (u8)lba;
    f[5] = (u8)(lba >> 8);
    f[6] = (u8)(lba >> 16);
    f[7] = 0x40;
    f[8] = (u8)(lba >> 24);
    f[12] = (u8)(tag << 3);                 /* tag in COUNT 7:3 */
    t->prdt[0] = (struct prd){ (u32)buf, 0, 0, 4096 - 1 };
    struct cmd_header *h = &cmdlist[tag];
    memset(h, 0, sizeof *h);
    h->flags = 5 | (write ? 1u << 6 : 0);
    h->prdtl = 1;
    h->ctba = (u32)t;
}

static void issue_ncq(u32 tag)
{
    port_write(PxSACT, 1u << tag);
    __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory");
    port_write(PxCI, 1u << tag);
}

static u32 cmd_run;                         /* PxCMD of the running port */

/* ST off and on again, CR not waited for. No register read between the last PxCI write and
 * the stop: the later the stop, the more requests are still with the backend. */
static void restart(void)
{
    port_write(PxCMD, cmd_run & ~CMD_ST);
    port_write(PxCMD, cmd_run);
}

/* Until (PxCI | PxSACT) & mask is 0: 1; 0 on a timeout; -1 on an error in PxIS. */
static int wait_idle(u32 mask)
{
    for (u32 i = 0; i < POLL_LOOPS; i++) {
        if (port_read(PxIS) & IS_ERRORS)
            return -1;
        if (!((port_read(PxCI) | port_read(PxSACT)) & mask))
            return 1;
        cpu_relax();
    }
    return 0;
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 pdev = PCI_DEV(AHCI_SLOT, 0);
    u32 class = pci_read32(pdev, 0x08) >> 8;
    u32 bar5 = pci_read32(pdev, 0x24);
    if (class != 0x010601 || bar5 & 1 || !(bar5 & ~0xfu))
        FAIL("no AHCI at slot %d: class %x bar5 %x\n", AHCI_SLOT, class, bar5);
    abar = bar5 & ~0xfu;
    pci_write16(pdev, 0x04, pci_read16(pdev, 0x04) | 0x6);    /* memory, bus master */
    hba_write(GHC, hba_read(GHC) | GHC_AE);
    int port = port_select_first_linked();

    /* bring the port up */
    port_write(PxCMD, port_read(PxCMD) & ~CMD_ST);
    if (!wait_clear(PxCMD, CMD_CR))
        FAIL("port %d does not stop\n", port);
    port_write(PxCMD, port_read(PxCMD) & ~CMD_FRE);
    if (!wait_clear(PxCMD, CMD_FR))
        FAIL("port %d FIS receive does not stop\n", port);
    port_set_lists(cmdlist, rfis);
    port_write(PxCMD, port_read(PxCMD) | CMD_FRE | CMD_SUD | CMD_POD);
    u32 i;
    for (i = 0; i < POLL_LOOPS && (port_read(PxSSTS) & 0xf) != 3; i++)
        cpu_relax();
    if (i == POLL_LOOPS)
        FAIL("port %d link down ssts %x\n", port, port_read(PxSSTS));
    port_write(PxSERR, 0xffffffffu);
    if (!wait_clear(PxTFD, TFD_BSY | TFD_DRQ))
        FAIL("port %d busy tfd %x\n", port, port_read(PxTFD));
    port_write(PxIS, 0xffffffffu);
    port_write(PxCMD, port_read(PxCMD) | CMD_ST);
    cmd_run = port_read(PxCMD);

    /* rounds of 32 reads, each cut short by a stop/start */
    for (u32 r = 0; r < ROUNDS; r++) {
        for (u32 t = 0; t < 32; t++) {
            build_ncq(t, 0, READ_LBA0 + (r * 32 + t) * 8, rbuf);
            issue_ncq(t);
        }
        restart();
        int w = wait_idle(~0u);
        if (w <= 0)
            FAIL("round %u %s ci %x sact %x is %x cmd %x tfd %x\n", r,
                 w ? "error" : "timeout", port_read(PxCI), port_read(PxSACT), port_read(PxIS),
                 port_read(PxCMD), port_read(PxTFD));
    }

    /* 32 stale writes of 'A', then a write of 'B' that must win. Tag 0 (LBA 100) goes last,
     * right before the stop: it is the one most likely still with the backend. */
    memset(abuf, 'A', sizeof abuf);
    memset(bbuf, 'B', sizeof bbuf);
    for (int t = 31; t >= 0; t--) {
        build_ncq(t, 1, WRITE_LBA0 + 8 * t, abuf);
        issue_ncq(t);
    }
    restart();
    build_ncq(0, 1, WRITE_LBA0, bbuf);
    issue_ncq(0);
    int w = wait_idle(1);
    if (w <= 0 || port_read(PxTFD) & TFD_ERR)
        FAIL("write B %s ci %x sact %x is %x tfd %x\n", w < 0 ? "error" : w ? "tfd" : "timeout",
             port_read(PxCI), port_read(PxSACT), port_read(PxIS), port_read(PxTFD));

    memset(check, 0xcc, sizeof check);
    build_ncq(0, 0, WRITE_LBA0, check);
    issue_ncq(0);
    w = wait_idle(1);
    if (w <= 0 || port_read(PxTFD) & TFD_ERR)
        FAIL("read back %s ci %x sact %x is %x tfd %x\n", w < 0 ? "error" : w ? "tfd" : "timeout",
             port_read(PxCI), port_read(PxSACT), port_read(PxIS), port_read(PxTFD));
    for (u32 j = 0; j < sizeof check; j++)
        if (check[j] != 'B')
            FAIL("LBA %u byte %u is %02x, not 'B'\n", WRITE_LBA0, j, check[j]);

    printf("AHCI-RESTART OK\n");
    return 0;
}
