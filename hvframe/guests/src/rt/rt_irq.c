/* hvframe guest runtime: IDT, counting interrupt handlers, LAPIC and IOAPIC basics. */
#include "rt.h"

volatile u32 irq_count[256];
static void (*irq_hooks[256])(u32);
static const char *exc_prefix = "";

struct gate { u16 off_lo, sel; u8 zero, type; u16 off_hi; } __attribute__((packed));
static struct gate idt[256] __attribute__((aligned(8)));
extern void (*const rt_irq_stubs[256])(void);

/* One stub per vector pushes its number (the CPU does not) and joins rt_irq_entry, which
 * dispatches in C and returns with popf + ret: the frame EIP, CS, EFLAGS becomes EFLAGS, EIP
 * (same CS, same privilege level). KVM's emulator cannot emulate a protected-mode iret. */
__asm__(
    "  .section .rodata\n"
    "  .p2align 2\n"
    "  .globl rt_irq_stubs\n"
    "rt_irq_stubs:\n"
    "  vec = 0\n"
    "  .rept 256\n"
    "  .pushsection .text\n"
    "1: pushl $vec\n"
    "  jmp rt_irq_entry\n"
    "  .popsection\n"
    "  .long 1b\n"
    "  vec = vec + 1\n"
    "  .endr\n"
    "  .text\n"
    "rt_irq_entry:\n"               /* vec, EIP, CS, EFLAGS */
    "  pushl %eax\n"
    "  pushl %ecx\n"
    "  pushl %edx\n"
    "  movl 12(%esp), %eax\n"
    "  pushl %eax\n"
    "  cmpl $32, %eax\n"
    "  jb rt_exception\n"           /* never returns */
    "  call rt_irq_dispatch\n"
    "  addl $4, %esp\n"
    "  movl 16(%esp), %eax\n"       /* EIP */
    "  movl 24(%esp), %ecx\n"       /* EFLAGS */
    "  movl %ecx, 20(%esp)\n"
    "  movl %eax, 24(%esp)\n"
    "  popl %edx\n"
    "  popl %ecx\n"
    "  popl %eax\n"
    "  addl $8, %esp\n"             /* vec, old EIP slot */
    "  popfl\n"
    "  ret\n"
);

__attribute__((used)) void rt_irq_dispatch(u32 vector)
{
    irq_count[vector]++;
    if (irq_hooks[vector])
        irq_hooks[vector](vector);
    if (vector != VEC_SPURIOUS)     /* a spurious interrupt is not in service: no EOI */
        lapic_eoi();
}

/* Entered by a jump with the vector as the first argument (error codes are not decoded). */
__attribute__((used, noreturn)) void rt_exception(u32 vector)
{
    printf("%sexception %u\n", exc_prefix, vector);
    poweroff();
}

void irq_init(const char *exception_prefix)
{
    exc_prefix = exception_prefix ? exception_prefix : "";
    for (int v = 0; v < 256; v++) {
        u32 a = (u32)rt_irq_stubs[v];
        idt[v] = (struct gate){ (u16)a, 0x08, 0, 0x8e, (u16)(a >> 16) };   /* interrupt gate */
    }
    struct { u16 limit; u32 base; } __attribute__((packed)) d = { sizeof(idt) - 1, (u32)idt };
    __asm__ volatile("lidt %0" : : "m"(d));
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
}

void irq_set_hook(u32 vector, void (*hook)(u32 vector))
{
    irq_hooks[vector & 0xff] = hook;
}

int irq_wait(u32 vector, u32 count, u32 loops)
{
    for (u32 i = 0; i < loops; i++) {
        if (irq_count[vector] >= count)
            return 1;
        cpu_relax();
    }
    return 0;
}

void ioapic_route(u32 gsi, u32 vector, u32 lo_flags)
{
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * gsi + 1);     /* destination APIC 0 */
    mmio_write32(IOAPIC_BASE + 0x10, 0);
    mmio_write32(IOAPIC_BASE, 0x10 + 2 * gsi);
    mmio_write32(IOAPIC_BASE + 0x10, vector | lo_flags);
}
