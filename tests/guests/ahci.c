/* A small AHCI driver (AHCI 1.3.1, ATA8-ACS commands), as a test of an AHCI HBA model.
 *
 * Finds the first function of class 01:06:01 on bus 0 through 0xcf8, maps ABAR (BAR5),
 * resets the HBA (GHC.HR), sets GHC.AE, brings up the first implemented port with a device
 * (stop, CLB/FB, FRE, spin-up, COMRESET when the link is not up, wait PxSSTS.DET=3, clear
 * PxSERR/PxIS, ST), takes MSI (vector 0x41) when the HBA has it but completes every command
 * by polling PxCI / PxSACT. Then:
 *   IDENTIFY DEVICE; READ DMA EXT of sector 0;
 *   WRITE DMA EXT of sectors 1..8 through a 3-entry PRD table, READ DMA EXT back through 2;
 *   WRITE FPDMA QUEUED to sectors 32..39 (4 tags of 2 sectors, all issued at once), READ FPDMA
 *   QUEUED back the same way;
 *   FLUSH CACHE EXT;
 *   WRITE DMA EXT of sectors 64..71, DATA SET MANAGEMENT (TRIM) of 64..71, READ DMA EXT of 64;
 *   READ DMA EXT at LBA == sector count (must fail: ERR in PxTFD, TFES in PxIS), port
 *   recovery, and one more READ DMA EXT of sector 0.
 *
 * Every sector it writes (1..8, 32..39, 64..71) holds, at byte j,
 *     (lba * 31 + j * 7 + 0x5a) & 0xff
 * (the same formula as tests/guests/virtio_blk.c), so the host can check the image; after the
 * TRIM, 64..71 may read back as zeroes (on a device that discards) or still hold the pattern.
 *
 * Output lines (numbers decimal unless hex is said):
 *   ahci pci 00:SS.F id VVVV:DDDD abar HEX
 *   ahci cap HEX8 ports N slots N ncq 0|1 sss 0|1 pi HEX vs HEX
 *   ahci port P ssts HEX sig HEX8 comreset 0|1 tfd HEX
 *   ahci msi 0|1
 *   ahci identify tfd HEX bytes N                  (bytes: PRDBC of the command)
 *   ahci model "..."  /  ahci serial "..."  /  ahci firmware "..."
 *   ahci sectors N lba48 0|1 ncq 0|1 depth N trim 0|1 dsm-blocks N
 *   ahci read0 tfd HEX bytes N sum HEX8 first HEX32        (sum: 32-bit sum of the 128 LE words)
 *   ahci write tfd HEX prds 3 bytes N
 *   ahci readback tfd HEX bytes N, then: ahci readback ok | ahci readback mismatch at N
 *   ahci ncq write tags N sact_set HEX maxsact N tfd HEX is HEX sact HEX
 *   ahci ncq read (the same) ok | mismatch at N    (or: ahci ncq unsupported)
 *       sact_set: PxSACT read back after setting it, before PxCI; maxsact: most tags seen
 *       still active while polling (0 when the device finished before the first look)
 *   ahci flush tfd HEX
 *   ahci write64 tfd HEX
 *   ahci trim tfd HEX read tfd HEX after zero|pattern|other   (or: ahci trim unsupported,
 *       when IDENTIFY word 169 bit 0 is clear; DSM is then not sent)
 *   ahci oob tfd HEX is HEX8 err 0|1 tfes 0|1
 *   ahci recover ok ci HEX tfd HEX how restart|clo|comreset  (or: ahci recover failed ...)
 *   ahci reread tfd HEX sum HEX8 ok|mismatch       (compared with read0's sum)
 *   ahci irqs N spurious N
 *   ahci done
 * PxTFD values print as ERROR << 8 | STATUS: 50 is DRDY|DSC (success), 441 is ABRT + ERR.
 * A failure prints "ahci error ..." and powers off without "ahci done". */
#define VEC_HBA         0x41
#define POLL_LOOPS      5000000u
#include "ahci.h"

/* ATA commands */
#define ATA_IDENTIFY        0xec
#define ATA_READ_DMA_EXT    0x25
#define ATA_WRITE_DMA_EXT   0x35
#define ATA_READ_FPDMA      0x60
#define ATA_WRITE_FPDMA     0x61
#define ATA_FLUSH_EXT       0xea
#define ATA_DSM             0x06

#define NTAGS   4

static u32 pdev;                /* the HBA, PCI_DEV(slot, fn) */

static void delay(u32 n)
{
    for (u32 i = 0; i < n; i++)
        inb(0x80);              /* ~1 us each on real hardware, an exit under a VMM */
}

_Static_assert(sizeof(struct cmd_table) == 0x80 + 8 * 16, "command table");

static struct cmd_header cmdlist[32] __attribute__((aligned(1024)));
static u8 rfis[256] __attribute__((aligned(256)));
static struct cmd_table tables[NTAGS];

static u8 ident[512] __attribute__((aligned(2)));
static u8 sector0[512] __attribute__((aligned(2)));
static u8 wbuf[4096 + 1024] __attribute__((aligned(16)));
static u8 rbuf[4096 + 1024] __attribute__((aligned(16)));
static u8 nbuf[NTAGS][1024] __attribute__((aligned(16)));
static u8 dsm[512] __attribute__((aligned(16)));

struct seg { void *p; u32 len; };

/* Fill slot's header and table: an H2D register FIS (command, LBA, count, features, device)
 * and a PRD table from segs. */
static void build(u32 slot, u8 command, u64 lba, u16 count, u16 features, u8 device,
                  const struct seg *segs, int nseg, int write)
{
    struct cmd_table *t = &tables[slot];
    memset(t, 0, sizeof *t);
    u8 *f = t->cfis;
    f[0] = 0x27;                /* register FIS, host to device */
    f[1] = 0x80;                /* C: command register update */
    f[2] = command;
    f[3] = (u8)features;
    f[4] = (u8)lba;
    f[5] = (u8)(lba >> 8);
    f[6] = (u8)(lba >> 16);
    f[7] = device;
    f[8] = (u8)(lba >> 24);
    f[9] = (u8)(lba >> 32);
    f[10] = (u8)(lba >> 40);
    f[11] = (u8)(features >> 8);
    f[12] = (u8)count;
    f[13] = (u8)(count >> 8);
    for (int i = 0; i < nseg; i++)
        t->prdt[i] = (struct prd){ (u32)segs[i].p, 0, 0, segs[i].len - 1 };
    struct cmd_header *h = &cmdlist[slot];
    memset(h, 0, sizeof *h);
    h->flags = 5 | (write ? 1u << 6 : 0);      /* CFL = 5 dwords */
    h->prdtl = (u16)nseg;
    h->ctba = (u32)t;
}

static u32 last_is;

/* Issue slot and wait until PxCI clears or an error is flagged; returns PxTFD (bit 16 set
 * on a timeout). PxIS is cleared afterwards, its value kept in last_is. */
static u32 issue(u32 slot)
{
    port_write(PxIS, 0xffffffffu);
    __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory");
    port_write(PxCI, 1u << slot);
    u32 timeout = 1 << 16;
    for (u32 i = 0; i < POLL_LOOPS; i++) {
        u32 is = port_read(PxIS);
        if (!(port_read(PxCI) & (1u << slot)) || (is & IS_ERRORS)) {
            timeout = 0;
            break;
        }
        cpu_relax();
    }
    last_is = port_read(PxIS);
    port_write(PxIS, last_is);
    hba_write(IS, hba_read(IS));
    return port_read(PxTFD) | timeout;
}

static u8 pattern(u32 lba, u32 j) { return (u8)(lba * 31 + j * 7 + 0x5a); }

static void ata_string(char *out, const u8 *id, int word, int nwords)
{
    int n = 0;
    for (int w = word; w < word + nwords; w++) {
        u16 v = id[2 * w] | id[2 * w + 1] << 8;
        out[n++] = (char)(v >> 8);
        out[n++] = (char)v;
    }
    while (n > 0 && (out[n - 1] == ' ' || out[n - 1] == 0))
        n--;
    out[n] = 0;
    for (int i = 0; i < n; i++)
        if (out[i] < 0x20 || out[i] > 0x7e || out[i] == '"')
            out[i] = '?';
}

static u16 idw(int w) { return ident[2 * w] | ident[2 * w + 1] << 8; }

/* Stop the command engine (and FIS receive if fre_too). */
static int port_stop(int fre_too)
{
    port_write(PxCMD, port_read(PxCMD) & ~CMD_ST);
    if (!wait_clear(PxCMD, CMD_CR))
        return 0;
    if (fre_too) {
        port_write(PxCMD, port_read(PxCMD) & ~CMD_FRE);
        if (!wait_clear(PxCMD, CMD_FR))
            return 0;
    }
    return 1;
}

static int link_up(void) { return (port_read(PxSSTS) & 0xf) == 3; }

static int wait_link(void)
{
    for (u32 i = 0; i < 100000; i++) {
        if (link_up())
            return 1;
        delay(10);
    }
    return 0;
}

static void comreset(void)
{
    port_write(PxSCTL, (port_read(PxSCTL) & ~0xfu) | 1);  /* DET=1: COMRESET */
    delay(2000);                                            /* at least 1 ms */
    port_write(PxSCTL, port_read(PxSCTL) & ~0xfu);
}

static int dma_rw(u32 slot, int write, u64 lba, u16 count, const struct seg *segs, int nseg)
{
    build(slot, write ? ATA_WRITE_DMA_EXT : ATA_READ_DMA_EXT, lba, count, 0, 0x40, segs, nseg,
          write);
    return (int)issue(slot);
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    int d = pci_find_class(0x010601);
    if (d < 0) {
        printf("ahci error no AHCI function\n");
        return 0;
    }
    pdev = d;
    u32 id = pci_read32(pdev, 0);
    u32 bar5 = pci_read32(pdev, 0x24);
    if (bar5 & 1 || !(bar5 & ~0xfu)) {
        printf("ahci error BAR5 %x\n", bar5);
        return 0;
    }
    abar = bar5 & ~0xfu;
    pci_write16(pdev, 0x04, pci_read16(pdev, 0x04) | 0x6);    /* memory decode, bus master */
    printf("ahci pci 00:%02x.%u id %04x:%04x abar %x\n", PCI_SLOT(pdev), PCI_FN(pdev),
           id & 0xffff, id >> 16, abar);

    /* HBA reset, then AHCI mode */
    hba_write(GHC, hba_read(GHC) | GHC_AE);
    hba_write(GHC, hba_read(GHC) | GHC_HR);
    for (u32 i = 0; hba_read(GHC) & GHC_HR; i++)
        if (i > POLL_LOOPS) {
            printf("ahci error HBA reset did not complete\n");
            return 0;
        }
    hba_write(GHC, hba_read(GHC) | GHC_AE);
    u32 cap = hba_read(CAP), pi = hba_read(PI);
    u32 nslots = ((cap >> 8) & 0x1f) + 1;
    printf("ahci cap %08x ports %u slots %u ncq %u sss %u pi %x vs %x\n", cap, (cap & 0x1f) + 1,
           nslots, cap & CAP_SNCQ ? 1 : 0, cap & CAP_SSS ? 1 : 0, pi, hba_read(VS));

    int port = port_select_first_linked();

    /* bring the port up (AHCI 1.3.1 10.1.2, 10.3.1) */
    if (!port_stop(1)) {
        printf("ahci error port %d does not stop\n", port);
        return 0;
    }
    port_set_lists(cmdlist, rfis);
    port_clear_status();
    port_write(PxCMD, port_read(PxCMD) | CMD_FRE);
    u32 pcmd = port_read(PxCMD);
    if (pcmd & CMD_CPD)
        pcmd |= CMD_POD;
    if (cap & CAP_SSS)
        pcmd |= CMD_SUD;
    port_write(PxCMD, pcmd);
    int did_comreset = 0;
#ifdef AHCI_FORCE_COMRESET
    comreset();                     /* self-test of the path below (defines={...: 1}) */
    did_comreset = 1;
#endif
    if (!link_up()) {
        delay(10000);
        if (!link_up()) {
            comreset();
            did_comreset = 1;
        }
    }
    if (!wait_link()) {
        printf("ahci error port %d link down ssts %x\n", port, port_read(PxSSTS));
        return 0;
    }
    port_write(PxSERR, 0xffffffffu);
    for (u32 i = 0; i < POLL_LOOPS && (port_read(PxTFD) & (TFD_BSY | TFD_DRQ)); i++)
        cpu_relax();
    port_write(PxIS, 0xffffffffu);
    hba_write(IS, 0xffffffffu);
    printf("ahci port %d ssts %x sig %08x comreset %d tfd %x\n", port, port_read(PxSSTS),
           port_read(PxSIG), did_comreset, port_read(PxTFD));

    /* MSI (vector VEC_HBA) if the function has it; completions are polled regardless */
    irq_init("ahci error ");
    u32 msi = pci_find_cap(pdev, 0x05);
    if (msi) {
        pci_msi_enable(pdev, msi, VEC_HBA);
        port_write(PxIE, 0x7dc0007fu);            /* completions and errors */
        hba_write(GHC, hba_read(GHC) | GHC_IE);
        irq_enable();
    }
    printf("ahci msi %d\n", msi ? 1 : 0);

    port_write(PxCMD, port_read(PxCMD) | CMD_ST);

    /* IDENTIFY DEVICE (PIO data-in, 512 bytes) */
    struct seg sid[1] = { { ident, 512 } };
    build(0, ATA_IDENTIFY, 0, 0, 0, 0, sid, 1, 0);
    u32 tfd = issue(0);
    printf("ahci identify tfd %x bytes %u\n", tfd, cmdlist[0].prdbc);
    char str[48];
    ata_string(str, ident, 27, 20);
    printf("ahci model \"%s\"\n", str);
    ata_string(str, ident, 10, 10);
    printf("ahci serial \"%s\"\n", str);
    ata_string(str, ident, 23, 4);
    printf("ahci firmware \"%s\"\n", str);
    int lba48 = (idw(83) >> 10) & 1;
    u64 sectors = lba48 ? (u64)idw(100) | (u64)idw(101) << 16 | (u64)idw(102) << 32 |
                          (u64)idw(103) << 48
                        : (u64)idw(60) | (u64)idw(61) << 16;
    int ncq = (idw(76) >> 8) & 1;
    u32 depth = (idw(75) & 0x1f) + 1;
    int trim = idw(169) & 1;
    printf("ahci sectors %llu lba48 %d ncq %d depth %u trim %d dsm-blocks %u\n", sectors, lba48,
           ncq, depth, trim, idw(105));

    /* READ DMA EXT, sector 0 */
    struct seg s0[1] = { { sector0, 512 } };
    tfd = dma_rw(0, 0, 0, 1, s0, 1);
    u32 sum0 = sum_words(sector0, 512);
    printf("ahci read0 tfd %x bytes %u sum %08x first %02x%02x%02x%02x\n", tfd, cmdlist[0].prdbc,
           sum0, sector0[0], sector0[1], sector0[2], sector0[3]);

    /* WRITE DMA EXT, sectors 1..8, 3 PRDs of 1024 + 1536 + 1536 bytes, not contiguous */
    u8 *wa = wbuf, *wb = wbuf + 1024 + 256, *wc = wbuf + 1024 + 256 + 1536 + 256;
    for (u32 j = 0; j < 4096; j++) {
        u8 v = pattern(1 + j / 512, j % 512);
        if (j < 1024)
            wa[j] = v;
        else if (j < 2560)
            wb[j - 1024] = v;
        else
            wc[j - 2560] = v;
    }
    struct seg sw[3] = { { wa, 1024 }, { wb, 1536 }, { wc, 1536 } };
    tfd = dma_rw(0, 1, 1, 8, sw, 3);
    printf("ahci write tfd %x prds 3 bytes %u\n", tfd, cmdlist[0].prdbc);

    /* READ DMA EXT back, 2 PRDs of 2560 + 1536 */
    memset(rbuf, 0xcc, sizeof rbuf);
    u8 *ra = rbuf, *rb = rbuf + 2560 + 512;
    struct seg sr[2] = { { ra, 2560 }, { rb, 1536 } };
    tfd = dma_rw(0, 0, 1, 8, sr, 2);
    int bad = -1;
    for (u32 j = 0; j < 4096 && bad < 0; j++)
        if ((j < 2560 ? ra[j] : rb[j - 2560]) != pattern(1 + j / 512, j % 512))
            bad = (int)j;
    printf("ahci readback tfd %x bytes %u\n", tfd, cmdlist[0].prdbc);
    if (bad < 0)
        printf("ahci readback ok\n");
    else
        printf("ahci readback mismatch at %d\n", bad);

    /* NCQ: tags 0..n-1, 2 sectors each at 32 + 2 * tag, all issued at once */
    u32 ntags = NTAGS;
    if (ntags > depth)
        ntags = depth;
    if (ntags > nslots)
        ntags = nslots;
    if (!(cap & CAP_SNCQ) || !ncq)
        printf("ahci ncq unsupported\n");
    else {
        for (int write = 1; write >= 0; write--) {
            u32 mask = (1u << ntags) - 1;
            for (u32 t = 0; t < ntags; t++) {
                struct seg sn[2] = { { nbuf[t], 512 }, { nbuf[t] + 512, 512 } };
                u32 lba = 32 + 2 * t;
                for (u32 j = 0; j < 1024; j++)
                    nbuf[t][j] = write ? pattern(lba + j / 512, j % 512) : 0xcc;
                /* count goes in FEATURES, the tag in COUNT 7:3 */
                build(t, write ? ATA_WRITE_FPDMA : ATA_READ_FPDMA, lba, (u16)(t << 3), 2, 0x40,
                      sn, 2, write);
            }
            port_write(PxIS, 0xffffffffu);
            port_write(PxSACT, mask);
            u32 sact_set = port_read(PxSACT) & mask;
            __asm__ volatile("lock; addl $0, (%%esp)" ::: "memory");
            port_write(PxCI, mask);
            u32 maxact = 0, is = 0, i;
            for (i = 0; i < POLL_LOOPS; i++) {
                u32 act = port_read(PxSACT) & mask;
                u32 n = 0;
                for (u32 b = act; b; b &= b - 1)
                    n++;
                if (n > maxact)
                    maxact = n;
                is = port_read(PxIS);
                if ((!act && !(port_read(PxCI) & mask)) || (is & IS_ERRORS))
                    break;
                cpu_relax();
            }
            port_write(PxIS, is);
            hba_write(IS, hba_read(IS));
            tfd = port_read(PxTFD) | (i == POLL_LOOPS ? 1u << 16 : 0);
            int bad2 = -1;
            if (!write)
                for (u32 t = 0; t < ntags && bad2 < 0; t++)
                    for (u32 j = 0; j < 1024 && bad2 < 0; j++)
                        if (nbuf[t][j] != pattern(32 + 2 * t + j / 512, j % 512))
                            bad2 = (int)(t * 1024 + j);
            printf("ahci ncq %s tags %u sact_set %x maxsact %u tfd %x is %x sact %x",
                   write ? "write" : "read", ntags, sact_set, maxact, tfd, is, port_read(PxSACT));
            if (write)
                printf("\n");
            else if (bad2 < 0)
                printf(" ok\n");
            else
                printf(" mismatch at %d\n", bad2);
        }
    }

    /* FLUSH CACHE EXT */
    build(0, ATA_FLUSH_EXT, 0, 0, 0, 0x40, 0, 0, 0);
    printf("ahci flush tfd %x\n", issue(0));

    /* DATA SET MANAGEMENT / TRIM of 64..71 after writing the pattern there */
    struct seg st8[1] = { { wbuf, 4096 } };
    for (u32 j = 0; j < 4096; j++)
        wbuf[j] = pattern(64 + j / 512, j % 512);
    tfd = dma_rw(0, 1, 64, 8, st8, 1);
    printf("ahci write64 tfd %x\n", tfd);
    if (!trim) {                                /* a device without TRIM would abort it */
        printf("ahci trim unsupported\n");
        goto oob;
    }
    memset(dsm, 0, sizeof dsm);
    *(u64 *)dsm = 64ull | 8ull << 48;           /* LBA 47:0, range length 63:48 */
    struct seg sd[1] = { { dsm, 512 } };
    build(0, ATA_DSM, 0, 1, 1, 0x40, sd, 1, 1);  /* features bit 0: TRIM; count: 1 block */
    tfd = issue(0);
    memset(rbuf, 0xcc, 512);
    struct seg s64[1] = { { rbuf, 512 } };
    u32 tfd2 = dma_rw(0, 0, 64, 1, s64, 1);
    int zero = 1, pat = 1;
    for (u32 j = 0; j < 512; j++) {
        zero &= rbuf[j] == 0;
        pat &= rbuf[j] == pattern(64, j);
    }
    printf("ahci trim tfd %x read tfd %x after %s\n", tfd, tfd2,
           zero ? "zero" : pat ? "pattern" : "other");

oob:
    /* out of range: READ DMA EXT at LBA == sectors must fail */
    tfd = dma_rw(0, 0, sectors, 1, s0, 1);
    printf("ahci oob tfd %x is %08x err %u tfes %u\n", tfd, last_is, tfd & TFD_ERR ? 1 : 0,
           last_is & IS_TFES ? 1 : 0);

    /* recovery (AHCI 1.3.1 6.2.2.1): ST off, CR clear, errors cleared, CLO or COMRESET when
     * the device still looks busy, ST on */
    int rec = port_stop(0);
    port_clear_status();
    hba_write(IS, 0xffffffffu);
    u32 how = 0;
    if (port_read(PxTFD) & (TFD_BSY | TFD_DRQ)) {
        if (cap & CAP_SCLO) {
            port_write(PxCMD, port_read(PxCMD) | CMD_CLO);
            rec &= wait_clear(PxCMD, CMD_CLO);
            how = 1;
        } else {
            comreset();
            rec &= wait_link();
            port_write(PxSERR, 0xffffffffu);
            how = 2;
        }
    }
    port_write(PxCMD, port_read(PxCMD) | CMD_ST);
    if (rec)
        printf("ahci recover ok ci %x tfd %x how %s\n", port_read(PxCI), port_read(PxTFD),
               how == 0 ? "restart" : how == 1 ? "clo" : "comreset");
    else
        printf("ahci recover failed cmd %x tfd %x\n", port_read(PxCMD), port_read(PxTFD));
    memset(sector0, 0xcc, sizeof sector0);
    tfd = dma_rw(0, 0, 0, 1, s0, 1);
    u32 sum = sum_words(sector0, 512);
    printf("ahci reread tfd %x sum %08x %s\n", tfd, sum, sum == sum0 ? "ok" : "mismatch");

    delay(100);
    irq_disable();
    printf("ahci irqs %u spurious %u\n", irq_count[VEC_HBA], irq_count[VEC_SPURIOUS]);
    printf("ahci done\n");
    return 0;
}
