/* Polled console throughput: `count=N` (default 100000) raw bytes to COM1, each after polling
 * LSR until THRE, as Linux's printk console writes. The bytes are console_byte(i) (every value
 * 0-255 occurs), between a "console start" line and a "console done" line. With `halt=1` the
 * guest then halts for good instead of powering off: nothing more leaves it, so the last
 * line must reach the console without another exit to carry it. */
#include "rt.h"

static inline u8 console_byte(u32 i)
{
    return (u8)(i * 131u + (i >> 8));
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 n = cmdline_u32("count", 100000);
    printf("console start count=%u\n", n);
    for (u32 i = 0; i < n; i++)
        serial_putc((char)console_byte(i));
    printf("\nconsole done count=%u\n", n);
    if (cmdline_u32("halt", 0))
        halt_forever();
    return 0;
}
