/* Executes INT3 in protected mode, which KVM's instruction emulator cannot run on nested
 * hosts without hardware virtualization (KVM_EXIT_INTERNAL_ERROR): the VMM must report the
 * RIP and the instruction bytes and exit with status 4. (On hardware KVM, with no IDT, this
 * would be a triple fault instead.) */
#include "rt.h"

int main(const struct hvm_start_info *si)
{
    (void)si;
    static const struct __attribute__((packed)) { u16 limit; u32 base; } empty_idt = {0, 0};
    printf("about to run int3\n");
    __asm__ volatile("lidt %0\n\t.byte 0xcc" : : "m"(empty_idt));
    return 0;
}
