/* PVH entry for hvframe guests.
 *
 * The VMM (or QEMU -kernel) enters at _start in 32-bit flat protected mode, paging and
 * interrupts off, %ebx = physical address of struct hvm_start_info. No stack is provided and
 * the boot GDT belongs to the loader, so we install our own GDT and stack before any C. */

#define XEN_ELFNOTE_PHYS32_ENTRY 18

    .section .note.Xen, "a"
    .p2align 2
    .long 4                         /* namesz: "Xen\0" */
    .long 4                         /* descsz: a 32-bit physical address */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long _start

    .section .text.start, "ax"
    .code32
    .globl _start
_start:
    cli
    cld
    /* Reload segments from a GDT we own: the loader's may be overwritten later. */
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $__stack_top, %esp
    xorl %ebp, %ebp
    /* The Linux 32-bit boot protocol passes boot_params in %esi: keep it for guests that
     * are entered that way (a bzImage-format test guest). */
    movl %esi, rt_entry_esi

    /* Zero .bss (loaders zero p_memsz past p_filesz, but don't depend on it). The stack
     * lives in .bss too; nothing is on it yet. */
    movl %ebx, %esi
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl
    movl %esi, %ebx

    pushl %ebx                      /* main(const struct hvm_start_info *) */
    call rt_main
    /* rt_main powers off and never returns; if power-off is ignored, stay halted. */
2:  cli
    hlt
    jmp 2b

    .section .rodata
    .p2align 3
gdt:
    .quad 0                         /* null */
    .quad 0x00cf9a000000ffff        /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: flat 32-bit data */
gdt_end:
    .p2align 2
    .word 0                         /* pad so the descriptor's base is 4-aligned */
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .section .data
    .p2align 2
    .globl rt_entry_esi
rt_entry_esi:
    .long 0

    .section .bss
    .p2align 4
__stack_bottom:
    .skip 16384                     /* 16 KiB boot stack */
    .globl __stack_top
__stack_top:

    .section .note.GNU-stack, "", @progbits
