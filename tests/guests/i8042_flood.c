/* A guest that floods the i8042 with commands that answer and never reads the answers:
 * `count=N` (default 200000) rounds of, in turn, 0x20 (read command byte) and 0xaa (self
 * test) to port 0x64, 0xd2 (echo) with a data byte, and 0xf2 (keyboard identify, three answer
 * bytes) to port 0x60. Then it reads what the controller still holds, checks that it still
 * works and powers off. It prints:
 *   i8042 flood start count=N
 *   i8042 flood sent N
 *   i8042 drained K bytes: xx xx ...      (what was waiting, at most 8 shown)
 *   i8042 selftest xx kbdreset xx xx
 *   i8042 flood done
 */
#include "rt.h"

#define DATA 0x60
#define CMD 0x64
#define OBF 0x01

static int wait_obf(void)
{
    for (u32 i = 0; i < 100000; i++)
        if (inb(CMD) & OBF)
            return 1;
    return 0;
}

static int read_answer(void)
{
    return wait_obf() ? inb(DATA) : -1;
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    u32 n = cmdline_u32("count", 200000);
    printf("i8042 flood start count=%u\n", n);
    for (u32 i = 0; i < n; i++) {
        switch (i & 3) {
        case 0:
            outb(CMD, 0x20);
            break;
        case 1:
            outb(CMD, 0xd2);
            outb(DATA, (u8)i);
            break;
        case 2:
            outb(DATA, 0xf2);
            break;
        default:
            outb(CMD, 0xaa);
            break;
        }
    }
    printf("i8042 flood sent %u\n", n);

    u8 seen[8];
    u32 drained = 0;
    while ((inb(CMD) & OBF) && drained < 1000) {
        u8 b = inb(DATA);
        if (drained < 8)
            seen[drained] = b;
        drained++;
    }
    printf("i8042 drained %u bytes:", drained);
    for (u32 i = 0; i < drained && i < 8; i++)
        printf(" %02x", seen[i]);
    printf("\n");

    outb(CMD, 0xaa);
    int st = read_answer();
    outb(DATA, 0xff);
    int ack = read_answer();
    int bat = read_answer();
    printf("i8042 selftest %02x kbdreset %02x %02x\n", st & 0xff, ack & 0xff, bat & 0xff);
    printf("i8042 flood done\n");
    return 0;
}
