/* Exit-cost benchmark for reads: `count=N` (default 100000) 8-bit INs from port 0xe0, nothing
 * else in the loop; the sum of what was read is printed so the reads cannot be dropped. */
#include "rt.h"

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 n = cmdline_u32("count", 100000);
    u32 sum = 0;
    printf("portread start count=%u\n", n);
    for (u32 i = 0; i < n; i++)
        sum += inb(0xe0);
    printf("portread done count=%u sum=%u\n", n, sum);
    return 0;
}
