/* A guest that counts, for checkpoint and migration tests: the virtio-blk driver of
 * virtio_blk.c (same functions, polling only), then for i = 1..count (cmdline count=N,
 * default 300): write sector i with the record below, and once the device has
 * acknowledged it print "count i". A run that is checkpointed and restored (or migrated)
 * must go on from where it was: the console of both processes together shows every count
 * once, in order, and the image holds every acknowledged one.
 *
 * Sector i holds: u32 magic 0x434e5452 ("CNTR"), u32 i, u32 ~i, then bytes
 * (i * 31 + j * 7 + 0x5a) & 0xff for j = 12..511.
 *   counter start              (once, at boot: a restored run must not print it again)
 *   count I
 *   counter ioerr I status S   (and stops)
 *   counter done N */
#define main vblk_main_unused
#include "virtio_blk.c"
#undef main

#define COUNTER_MAGIC 0x434e5452u

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 count = cmdline_u32("count", 300);
    printf("counter start\n");
    if (!vp_find(0x1001, 0x1042)) {
        printf("counter error no virtio-blk function\n");
        return 0;
    }
    if (!map_device() || !vp_restart_polled(&vq)) {
        printf("counter error device setup\n");
        return 0;
    }
    for (u32 i = 1; i <= count; i++) {
        u32 *w = (u32 *)wbuf;
        w[0] = COUNTER_MAGIC;
        w[1] = i;
        w[2] = ~i;
        for (u32 j = 12; j < 512; j++)
            wbuf[j] = pattern(i, j);
        struct seg seg = { wbuf, 512 };
        u8 st = request(T_OUT, i, &seg, 1, 0);
        if (st != 0) {
            printf("counter ioerr %u status %u\n", i, st);
            return 0;
        }
        printf("count %u\n", i);
    }
    printf("counter done %u\n", count);
    return 0;
}
