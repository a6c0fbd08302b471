/* AHCI under a device server that dies and comes back: the driver of ahci.c (same
 * functions), polling only, writing sector 1 + i % 8 with the host-checkable pattern up to
 * `count` times (cmdline count=N), or until `after` more succeeded after the one that
 * recovered from the first outage (after=M, 0: no such end), with WRITE DMA EXT. A command
 * that fails (a task file error from the client while the server is gone) makes it recover
 * the port as AHCI 1.3.1 6.2.2.1 says (ST off, wait CR, clear PxSERR and PxIS, ST on) before
 * the next one.
 *   ahci writing                     (the first write succeeded: I/O is under way)
 *   ahci ioerr I tfd HEX is HEX8     (first failure of an outage, at command I)
 *   ahci recovered I                 (first success after an outage)
 *   ahci summary ok N errors E recovered R
 *   ahci done */
#define main ahci_main_unused
#include "ahci.c"
#undef main

static int bring_up(void)
{
    hba_write(GHC, hba_read(GHC) | GHC_AE);
    hba_write(GHC, hba_read(GHC) | GHC_HR);
    for (u32 i = 0; hba_read(GHC) & GHC_HR; i++)
        if (i > POLL_LOOPS)
            return 0;
    hba_write(GHC, hba_read(GHC) | GHC_AE);
    u32 pi = hba_read(PI);
    int port = -1;
    for (int p = 0; p < 32 && port < 0; p++)
        if (pi & (1u << p))
            port = p;
    if (port < 0)
        return 0;
    port_select(port);
    if (!port_stop(1))
        return 0;
    port_set_lists(cmdlist, rfis);
    port_clear_status();
    port_write(PxCMD, port_read(PxCMD) | CMD_FRE | CMD_SUD | CMD_POD);
    if (!wait_link())
        return 0;
    port_clear_status();
    port_write(PxCMD, port_read(PxCMD) | CMD_ST);
    return 1;
}

static void recover(void)
{
    port_stop(0);
    port_clear_status();
    hba_write(IS, 0xffffffffu);
    port_write(PxCMD, port_read(PxCMD) | CMD_ST);
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 count = cmdline_u32("count", 3000), after = cmdline_u32("after", 0);
    int d = pci_find_class(0x010601);
    if (d < 0) {
        printf("ahci error no AHCI function\n");
        return 0;
    }
    pdev = d;
    abar = pci_read32(pdev, 0x24) & ~0xfu;
    pci_write16(pdev, 0x04, pci_read16(pdev, 0x04) | 0x6);
    if (!bring_up()) {
        printf("ahci error bring-up\n");
        return 0;
    }
    u32 ok = 0, errors = 0, recovered = 0, since = 0;
    int outage = 0;
    for (u32 i = 0; i < count && !(after && recovered && since >= after); i++) {
        u32 s = 1 + i % 8;
        for (u32 j = 0; j < 512; j++)
            wbuf[j] = pattern(s, j);
        struct seg seg = { wbuf, 512 };
        u32 tfd = (u32)dma_rw(0, 1, s, 1, &seg, 1);
        if (!(tfd & (TFD_ERR | TFD_BSY | TFD_DRQ | 0x10000)) && !(last_is & IS_ERRORS)) {
            if (ok++ == 0)
                printf("ahci writing\n");
            since += recovered != 0;
            if (outage) {
                printf("ahci recovered %u\n", i);
                recovered++;
                outage = 0;
            }
        } else {
            errors++;
            if (!outage)
                printf("ahci ioerr %u tfd %x is %08x\n", i, tfd, last_is);
            outage = 1;
            recover();
            for (volatile u32 w = 0; w < 200000; w++)
                cpu_relax();
        }
    }
    printf("ahci summary ok %u errors %u recovered %u\n", ok, errors, recovered);
    printf("ahci done\n");
    return 0;
}
