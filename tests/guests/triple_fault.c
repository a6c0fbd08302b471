/* Ends in a triple fault (VMM exit code 3): with an empty IDT, #UD cannot be delivered,
 * neither can the #GP nor the #DF that follow, so the CPU shuts down. ud2 rather than int3,
 * which KVM's emulator cannot run. */
#include "rt.h"

int main(const struct hvm_start_info *si)
{
    (void)si;
    static const struct __attribute__((packed)) { u16 limit; u32 base; } empty_idt = {0, 0};
    printf("about to triple fault\n");
    __asm__ volatile("lidt %0\n\tud2" : : "m"(empty_idt));
    printf("still alive after ud2?\n");     /* not reached */
    return 0;
}
