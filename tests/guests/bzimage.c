/* Entered through the Linux 32-bit boot protocol (packed as a bzImage by the test): reports
 * what the loader handed over in boot_params, found through %esi as the protocol says. */
#include "rt.h"

static u32 rd32(u32 addr) { return *(volatile u32 *)addr; }
static u32 rd8(u32 addr) { return *(volatile unsigned char *)addr; }

int main(const struct hvm_start_info *si)
{
    u32 bp = rt_entry_esi;
    printf("bzimage guest: start_info %s, boot_params at 0x%x\n", si ? "set" : "none", bp);
    if (!bp)
        return 0;
    printf("header %s version 0x%x loader 0x%x\n",
           rd32(bp + 0x202) == 0x53726448 ? "HdrS" : "missing", rd32(bp + 0x206) & 0xffff,
           rd8(bp + 0x210));
    printf("cmdline: \"%s\"\n", (const char *)rd32(bp + 0x228));
    u32 n = rd8(bp + 0x1e8);
    printf("e820: %u entries\n", n);
    for (u32 i = 0; i < n; i++) {
        u32 e = bp + 0x2d0 + i * 20;
        printf("  e820 %08x%08x +%08x%08x type %u\n", rd32(e + 4), rd32(e), rd32(e + 12),
               rd32(e + 8), rd32(e + 16));
    }
    printf("initrd at 0x%x size %u\n", rd32(bp + 0x218), rd32(bp + 0x21c));
    printf("acpi rsdp at 0x%x\n", rd32(bp + 0x70));
    return 0;
}
