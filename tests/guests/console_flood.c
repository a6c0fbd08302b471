/* Console throughput benchmark (benchmarks/test_vs_qemu.py): `count=N` (default 100000) bytes
 * on COM1, each sent as a driver without interrupts sends it: poll LSR (0x3fd) until THRE
 * (bit 5), then write THR (0x3f8). Lines of 63 letters and '\n'; exactly N bytes, nothing
 * else, then power off. */
#include "rt.h"

#define THR (COM1 + 0)
#define LSR (COM1 + 5)
#define LSR_THRE 0x20

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 n = cmdline_u32("count", 100000);
    for (u32 i = 0; i < n; i++) {
        u8 c = (i % 64 == 63) ? '\n' : (u8)('a' + i % 26);
        while (!(inb(LSR) & LSR_THRE))
            cpu_relax();
        outb(THR, c);
    }
    return 0;
}
