/* virtio-blk under a device server that dies and comes back: the driver of virtio_blk.c
 * (same functions), polling only, writing sector 1 + i % 8 with the host-checkable pattern
 * up to `count` times (cmdline count=N), or until `after` more succeeded after the one that
 * recovered from the first outage (after=M, 0: no such end). A request that fails
 * (VIRTIO_BLK_S_IOERR from the client while the server is gone) makes it reset and set the
 * device up again before the next one.
 *   vblk writing                 (the first write succeeded: I/O is under way)
 *   vblk ioerr I status S        (first failure of an outage, at request I)
 *   vblk recovered I             (first success after an outage)
 *   vblk summary ok N errors E recovered R
 *   vblk done */
#define main vblk_main_unused
#include "virtio_blk.c"
#undef main

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 count = cmdline_u32("count", 3000), after = cmdline_u32("after", 0);
    if (!vp_find(0x1001, 0x1042)) {
        printf("vblk error no virtio-blk function\n");
        return 0;
    }
    if (!map_device()) {
        printf("vblk error missing virtio capability\n");
        return 0;
    }
    int up = vp_restart_polled(&vq), outage = 0;
    u32 ok = 0, errors = 0, recovered = 0, since = 0;
    for (u32 i = 0; i < count && !(after && recovered && since >= after); i++) {
        if (!up && !(up = vp_restart_polled(&vq))) {
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
            if (ok++ == 0)
                printf("vblk writing\n");
            since += recovered != 0;
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
