/* PCI and interrupt delivery from inside a guest:
 *   (a) enumerate bus 0 through config mechanism #1 (0xcf8/0xcfc) and through ECAM at
 *       0xE0000000, printing each function's vendor:device both ways;
 *   (b) find pci-testdev (1b36:0005), read its BAR0 magic, move BAR0 by 1 MiB with memory
 *       decode off, and check the magic at the new address and all ones at the old one;
 *   (c) take an MSI-X interrupt (table entry 0 -> LAPIC 0, vector 0x40);
 *   (d) take its INTx through the IOAPIC (level, active high, vector 0x41), acking the device
 *       in the handler;
 *   (e) take an MSI (vector 0x42).
 * Handlers are a few instructions each: on a nested host they run in KVM's emulator. */
#include "rt.h"

#define ECAM_BASE       0xE0000000u
#define LAPIC_BASE      0xFEE00000u
#define LAPIC_EOI       (LAPIC_BASE + 0xB0)
#define LAPIC_SVR       (LAPIC_BASE + 0xF0)
#define IOAPIC_BASE     0xFEC00000u
#define IOAPIC_WIN      (IOAPIC_BASE + 0x10)
#define TESTDEV_ID      0x00051b36u
#define MAGIC           0x48564652u
#define REG_RAISE       0x8
#define REG_ACK         0xc
#define VEC_MSIX        0x40
#define VEC_INTX        0x41
#define VEC_MSI         0x42
#define VEC_SPURIOUS    0xff
#define WAIT_LOOPS      2000000

/* Written by the handlers. */
volatile u32 irq_count[256];
volatile u32 ack_addr;          /* BAR0 + REG_ACK, for the INTx handler */

/* ---- handlers: record the vector, (ack the device,) EOI, return ----
 * KVM's instruction emulator cannot emulate a protected-mode iret, so handlers return with
 * popf + ret instead (same CS, same privilege level): the frame EIP, CS, EFLAGS is turned
 * into EFLAGS, EIP. */
__asm__(
    ".text\n"
    "irq_return:\n"
    "  pushl %eax\n"
    "  pushl %ecx\n"
    "  movl 8(%esp), %eax\n"          /* EIP */
    "  movl 16(%esp), %ecx\n"         /* EFLAGS */
    "  movl %ecx, 12(%esp)\n"
    "  movl %eax, 16(%esp)\n"
    "  popl %ecx\n"
    "  popl %eax\n"
    "  addl $4, %esp\n"
    "  popfl\n"
    "  ret\n"
    ".globl isr_msix\n"
    "isr_msix:\n"
    "  incl irq_count+4*0x40\n"
    "  movl $0, 0xfee000b0\n"
    "  jmp irq_return\n"
    ".globl isr_msi\n"
    "isr_msi:\n"
    "  incl irq_count+4*0x42\n"
    "  movl $0, 0xfee000b0\n"
    "  jmp irq_return\n"
    ".globl isr_intx\n"
    "isr_intx:\n"
    "  pushl %eax\n"
    "  incl irq_count+4*0x41\n"
    "  movl ack_addr, %eax\n"
    "  movl $1, (%eax)\n"           /* deassert INTx before the EOI, or it fires again */
    "  movl $0, 0xfee000b0\n"
    "  popl %eax\n"
    "  jmp irq_return\n"
    ".globl isr_spurious\n"
    "isr_spurious:\n"
    "  incl irq_count+4*0xff\n"
    "  jmp irq_return\n"
    /* CPU exceptions: push the vector, report and power off. */
    ".globl isr_fault\n"
    "isr_fault:\n"
    "  call fault\n"
);

void isr_msix(void), isr_msi(void), isr_intx(void), isr_spurious(void), isr_fault(void);

#define FAULT_STUB(n) \
    __asm__(".text\n.globl fault_" #n "\nfault_" #n ":\n  pushl $" #n "\n  jmp isr_fault\n"); \
    void fault_##n(void);
FAULT_STUB(0) FAULT_STUB(1) FAULT_STUB(2) FAULT_STUB(3) FAULT_STUB(4) FAULT_STUB(5)
FAULT_STUB(6) FAULT_STUB(7) FAULT_STUB(8) FAULT_STUB(9) FAULT_STUB(10) FAULT_STUB(11)
FAULT_STUB(12) FAULT_STUB(13) FAULT_STUB(14) FAULT_STUB(15) FAULT_STUB(16) FAULT_STUB(17)
FAULT_STUB(18) FAULT_STUB(19)

static void (*const fault_stubs[20])(void) = {
    fault_0, fault_1, fault_2, fault_3, fault_4, fault_5, fault_6, fault_7, fault_8, fault_9,
    fault_10, fault_11, fault_12, fault_13, fault_14, fault_15, fault_16, fault_17, fault_18,
    fault_19,
};

/* Entered by `call` with the stub's pushed vector as the first argument. */
__attribute__((used)) void fault(u32 vector)
{
    printf("exception %u\n", vector);
    poweroff();
}

/* ---- IDT: 32-bit interrupt gates, code selector 0x08 (the runtime's GDT) ---- */
struct gate { u16 off_lo, sel; u8 zero, type; u16 off_hi; } __attribute__((packed));
static struct gate idt[256] __attribute__((aligned(8)));

static void set_gate(int v, void (*fn)(void))
{
    u32 a = (u32)fn;
    idt[v] = (struct gate){ (u16)a, 0x08, 0, 0x8e, (u16)(a >> 16) };
}

static void idt_init(void)
{
    for (int v = 0; v < 20; v++)
        set_gate(v, fault_stubs[v]);
    set_gate(VEC_MSIX, isr_msix);
    set_gate(VEC_INTX, isr_intx);
    set_gate(VEC_MSI, isr_msi);
    set_gate(VEC_SPURIOUS, isr_spurious);
    struct { u16 limit; u32 base; } __attribute__((packed)) d = { sizeof(idt) - 1, (u32)idt };
    __asm__ volatile("lidt %0" : : "m"(d));
}

/* ---- config space, both ways ---- */
static u32 cf8(u32 slot, u32 fn, u32 reg) { return 0x80000000u | slot << 11 | fn << 8 | (reg & 0xfc); }

static u32 cfg_read32(u32 slot, u32 fn, u32 reg)
{
    outl(0xcf8, cf8(slot, fn, reg));
    return inl(0xcfc);
}

static u16 cfg_read16(u32 slot, u32 fn, u32 reg)
{
    outl(0xcf8, cf8(slot, fn, reg));
    return inw(0xcfc + (reg & 2));
}

static void cfg_write32(u32 slot, u32 fn, u32 reg, u32 v)
{
    outl(0xcf8, cf8(slot, fn, reg));
    outl(0xcfc, v);
}

static void cfg_write16(u32 slot, u32 fn, u32 reg, u16 v)
{
    outl(0xcf8, cf8(slot, fn, reg));
    outw(0xcfc + (reg & 2), v);
}

static u32 ecam_read32(u32 slot, u32 fn, u32 reg)
{
    return mmio_read32(ECAM_BASE + (slot << 15 | fn << 12 | reg));
}

static u32 find_cap(u32 slot, u8 id)
{
    if (!(cfg_read16(slot, 0, 0x06) & 0x10))
        return 0;
    u32 p = cfg_read32(slot, 0, 0x34) & 0xfc;
    for (int n = 0; p && n < 48; n++) {
        u32 h = cfg_read32(slot, 0, p);
        if ((h & 0xff) == id)
            return p;
        p = (h >> 8) & 0xfc;
    }
    return 0;
}

static int wait_for(u32 vector, u32 count)
{
    for (u32 i = 0; i < WAIT_LOOPS; i++) {
        if (irq_count[vector] >= count)
            return 1;
        cpu_relax();
    }
    return 0;
}

static void ioapic_write(u32 reg, u32 v)
{
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_WIN, v);
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    int dev = -1;

    /* (a) enumeration */
    for (u32 s = 0; s < 32; s++) {
        u32 id1 = cfg_read32(s, 0, 0);
        u32 id2 = ecam_read32(s, 0, 0);
        if ((id1 & 0xffff) == 0xffff && (id2 & 0xffff) == 0xffff)
            continue;
        u32 nfn = (cfg_read32(s, 0, 0x0c) >> 16) & 0x80 ? 8 : 1;
        for (u32 f = 0; f < nfn; f++) {
            id1 = cfg_read32(s, f, 0);
            id2 = ecam_read32(s, f, 0);
            if ((id1 & 0xffff) == 0xffff && (id2 & 0xffff) == 0xffff)
                continue;
            printf("pci 00:%02x.%u cf8 %04x:%04x ecam %04x:%04x\n", s, f,
                   id1 & 0xffff, id1 >> 16, id2 & 0xffff, id2 >> 16);
            if (f == 0 && id1 == TESTDEV_ID)
                dev = (int)s;
        }
    }
    if (dev < 0) {
        printf("pci-testdev not found\n");
        return 0;
    }

    /* (b) BAR0: magic, move, magic again, old address empty */
    u32 bar0 = cfg_read32(dev, 0, 0x10) & ~0xfu;
    printf("testdev bar0 %x magic %x\n", bar0, mmio_read32(bar0));
    u16 cmd = cfg_read16(dev, 0, 0x04);
    u32 moved = bar0 + 0x100000;
    cfg_write16(dev, 0, 0x04, cmd & ~2);
    cfg_write32(dev, 0, 0x10, moved);
    cfg_write16(dev, 0, 0x04, cmd | 2);
    bar0 = cfg_read32(dev, 0, 0x10) & ~0xfu;
    printf("testdev moved bar0 %x magic %x old %x\n", bar0, mmio_read32(bar0),
           mmio_read32(bar0 - 0x100000));

    /* interrupts: IDT, LAPIC on (spurious vector 0xff) */
    idt_init();
    mmio_write32(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
    ack_addr = bar0 + REG_ACK;

    /* (c) MSI-X entry 0 -> APIC 0, vector 0x40 */
    u32 msix = find_cap(dev, 0x11);
    u32 tbl = cfg_read32(dev, 0, msix + 4);
    u32 table = (cfg_read32(dev, 0, 0x10 + 4 * (tbl & 7)) & ~0xfu) + (tbl & ~7u);
    mmio_write32(table + 0, LAPIC_BASE);
    mmio_write32(table + 4, 0);
    mmio_write32(table + 8, VEC_MSIX);
    mmio_write32(table + 12, 0);
    u16 mctl = cfg_read16(dev, 0, msix + 2);
    cfg_write16(dev, 0, msix + 2, mctl | 0x8000);
    __asm__ volatile("sti");
    mmio_write32(bar0 + REG_RAISE, 0);
    if (wait_for(VEC_MSIX, 1))
        printf("msix vector 0x%x received\n", VEC_MSIX);
    else
        printf("msix vector 0x%x NOT received\n", VEC_MSIX);

    /* (d) INTx through the IOAPIC: GSI from the interrupt line register */
    cfg_write16(dev, 0, msix + 2, mctl & ~0x8000);
    u32 gsi = cfg_read32(dev, 0, 0x3c) & 0xff;
    ioapic_write(0x10 + 2 * gsi + 1, 0);                         /* destination APIC 0 */
    ioapic_write(0x10 + 2 * gsi, VEC_INTX | 1u << 15);           /* level, high, unmasked */
    mmio_write32(bar0 + REG_RAISE, 0);
    if (wait_for(VEC_INTX, 1))
        printf("intx vector 0x%x received (gsi %u)\n", VEC_INTX, gsi);
    else
        printf("intx vector 0x%x NOT received (gsi %u)\n", VEC_INTX, gsi);
    printf("intx level after ack %u\n", mmio_read32(bar0 + REG_ACK));

    /* (e) MSI, 64-bit capability: address, upper address, data, enable */
    u32 msi = find_cap(dev, 0x05);
    cfg_write32(dev, 0, msi + 4, LAPIC_BASE);
    cfg_write32(dev, 0, msi + 8, 0);
    cfg_write16(dev, 0, msi + 12, VEC_MSI);
    cfg_write16(dev, 0, msi + 2, cfg_read16(dev, 0, msi + 2) | 1);
    mmio_write32(bar0 + REG_RAISE, 0);
    if (wait_for(VEC_MSI, 1))
        printf("msi vector 0x%x received\n", VEC_MSI);
    else
        printf("msi vector 0x%x NOT received\n", VEC_MSI);
    __asm__ volatile("cli");

    printf("interrupt counts msix %u intx %u msi %u spurious %u\n", irq_count[VEC_MSIX],
           irq_count[VEC_INTX], irq_count[VEC_MSI], irq_count[VEC_SPURIOUS]);
    printf("pci_irq done\n");
    return 0;
}
