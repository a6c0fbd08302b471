/* Exit-cost benchmark: `count=N` (default 100000) 8-bit OUTs to port 0xe0, nothing else in
 * the loop, so the time between the two lines is N port-I/O exits. */
#include "rt.h"

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 n = cmdline_u32("count", 100000);
    printf("portloop start count=%u\n", n);
    for (u32 i = 0; i < n; i++)
        outb(0xe0, (u8)i);
    printf("portloop done count=%u\n", n);
    return 0;
}
