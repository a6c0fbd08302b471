/* Console input test: echoes every byte received on COM1 (raw, unchanged) until EOT (0x04) or
 * 'q', then prints "bye" and powers off. "echo ready" says when input is being read. */
#include "rt.h"

int main(const struct hvm_start_info *si)
{
    (void)si;
    printf("echo ready\n");
    for (;;) {
        int c = serial_getc();
        if (c == 0x04 || c == 'q')
            break;
        serial_putc((char)c);
    }
    printf("\nbye\n");
    return 0;
}
