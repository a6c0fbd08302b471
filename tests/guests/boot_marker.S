/* Boot sector for test disk images (tests/diskimages.py): prints a marker on COM1 and powers
 * off. Used both as an MBR (BIOS jumps to 0000:7C00) and as an El Torito no-emulation boot
 * image (loaded at 07C0:0000 by default): the first far jump makes CS:IP 0000:7C00-based
 * either way.
 *
 * Build: gcc -m16 -c boot_marker.S; ld -m elf_i386 -Ttext=0x7c00 --oformat binary.
 * The code ends at the label `marker`: diskimages.py appends the NUL-terminated marker text
 * right there, so the marker starts at the end of the assembled code.
 *
 * Real mode is executed by KVM's instruction emulator on a nested host: plain 16-bit
 * integer instructions only. */

#define COM1    0x3f8

    .code16
    .text
    .globl _start
_start:
    cli
    ljmp $0, $normal
normal:
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    cld

    /* 16550 at COM1: no interrupts, 115200 8N1 (divisor 1) */
    movw $COM1 + 1, %dx         /* IER */
    xorb %al, %al
    outb %al, %dx
    movw $COM1 + 3, %dx         /* LCR: DLAB */
    movb $0x80, %al
    outb %al, %dx
    movw $COM1, %dx             /* DLL */
    movb $1, %al
    outb %al, %dx
    movw $COM1 + 1, %dx         /* DLM */
    xorb %al, %al
    outb %al, %dx
    movw $COM1 + 3, %dx         /* LCR: 8N1 */
    movb $3, %al
    outb %al, %dx

    movw $marker, %si
next_char:
    lodsb
    testb %al, %al
    jz done
    movb %al, %bl
    movw $COM1 + 5, %dx         /* LSR: wait for THRE, bounded (a missing UART reads 0xff) */
    movw $0xffff, %cx
wait_thre:
    inb %dx, %al
    testb $0x20, %al
    jnz send
    loop wait_thre
send:
    movw $COM1, %dx
    movb %bl, %al
    outb %al, %dx
    jmp next_char

done:
    /* Power off: hvframe's ACPI PM1a_CNT (0x404, SLP_TYP=5 | SLP_EN), then the PIIX4/ICH9
     * PM1a_CNT where SeaBIOS puts it under QEMU (0x604, SLP_TYP=0 | SLP_EN); if neither
     * exists, stay halted. */
    movw $0x404, %dx
    movw $0x3400, %ax
    outw %ax, %dx
    movw $0x604, %dx
    movw $0x2000, %ax
    outw %ax, %dx
halt:
    cli
    hlt
    jmp halt

    .globl marker
marker:                         /* the marker text is appended here */

    .section .note.GNU-stack, "", @progbits
