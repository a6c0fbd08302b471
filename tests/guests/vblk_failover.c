/* virtio-blk under a device server that dies and comes back: the driver of virtio_blk.c
 * (same functions), polling only, writing sector 1 + i % 8 with the host-checkable pattern
 * `count` times (cmdline count=N). A request that fails (VIRTIO_BLK_S_IOERR from the client
 * while the server is gone) makes it reset and set the device up again before the next one.
 *   vblk ioerr I status S        (first failure of an outage, at request I)
 *   vblk recovered I             (first success after an outage)
 *   vblk summary ok N errors E recovered R
 *   vblk done */
#define main vblk_main_unused
#include "virtio_blk.c"
#undef main

static int bring_up(void)
{
    cc_write8(CC_STATUS, 0);
    for (u32 i = 0; cc_read8(CC_STATUS) != 0; i++)
        if (i > 50)
            return 0;                   /* NEEDS_RESET while the server is away */
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
    cc_write32(CC_GFSELECT, 0);
    cc_write32(CC_GF, 0);
    cc_write32(CC_GFSELECT, 1);
    cc_write32(CC_GF, 1u << (F_VERSION_1 - 32));
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    if (!(cc_read8(CC_STATUS) & ST_FEATURES_OK))
        return 0;
    cc_write16(CC_Q_SELECT, 0);
    u16 qmax = cc_read16(CC_Q_SIZE);
    if (qmax == 0 || qmax == 0xffff)
        return 0;
    qsize = qmax < QSIZE_MAX ? qmax : QSIZE_MAX;
    while (qsize & (qsize - 1))
        qsize &= qsize - 1;
    for (u32 i = 0; i < sizeof(used); i++)
        ((volatile u8 *)&used)[i] = 0;
    for (u32 i = 0; i < sizeof(avail); i++)
        ((volatile u8 *)&avail)[i] = 0;
    avail_idx = used_seen = 0;
    cc_write16(CC_Q_SIZE, qsize);
    cc_write64(CC_Q_DESC, (u32)desc);
    cc_write64(CC_Q_DRIVER, (u32)&avail);
    cc_write64(CC_Q_DEVICE, (u32)&used);
    cc_write16(CC_Q_MSIX, NO_VECTOR);
    notify_off = cc_read16(CC_Q_NOTIFY_OFF);
    cc_write16(CC_Q_ENABLE, 1);
    cc_write8(CC_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    return (cc_read8(CC_STATUS) & (ST_DRIVER_OK | 0x40)) == ST_DRIVER_OK;
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 count = cmdline_u32("count", 3000);
    if (!find_function(VIRTIO_VENDOR, 0x1001, 0x1042)) {
        printf("vblk error no virtio-blk function\n");
        return 0;
    }
    setup_bars();
    if (!walk_caps()) {
        printf("vblk error missing virtio capability\n");
        return 0;
    }
    int up = bring_up(), outage = 0;
    u32 ok = 0, errors = 0, recovered = 0;
    for (u32 i = 0; i < count; i++) {
        if (!up && !(up = bring_up())) {
            for (volatile u32 d = 0; d < 200000; d++)
                cpu_relax();
            continue;
        }
        u32 s = 1 + i % WRITE_SECTORS;
        for (u32 j = 0; j < 512; j++)
            wbuf[j] = pattern(s, j);
        struct seg seg = { wbuf, 512 };
        u8 st = request(T_OUT, s, &seg, 1, 0);
        if (st == 0) {
            ok++;
            if (outage) {
                printf("vblk recovered %u\n", i);
                recovered++;
                outage = 0;
            }
        } else {
            errors++;
            if (!outage)
                printf("vblk ioerr %u status %u\n", i, st);
            outage = 1;
            up = 0;
        }
    }
    printf("vblk summary ok %u errors %u recovered %u\n", ok, errors, recovered);
    printf("vblk done\n");
    return 0;
}
