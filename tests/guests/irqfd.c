/* Interrupts a device raises from a thread of its own (pci-testdev register 0x10), which
 * hvframe delivers through KVM irqfds:
 *   (a) MSI-X entry 0 -> vector 0x40, raised 5 ms later by the device thread;
 *   (b) entry 0 reprogrammed the way drivers do it (mask, new data, unmask) -> vector 0x43;
 *   (c) entry 0 reprogrammed while unmasked -> vector 0x44;
 *   (d) entry 0 masked when the device raises it: pending bit set, nothing delivered; the
 *       unmask delivers it (vector 0x44);
 *   (e) a second vector (entry 1 -> 0x45), a route of its own;
 *   (f) INTx through the IOAPIC (GSI 16-23, KVM's default routes) after all those MSI routes;
 *   (g) MSI (capability 0x05) -> vector 0x42, raised by the device thread.
 * Each step prints a line the test reads. Handlers return with popf + ret: KVM's emulator
 * cannot run a protected-mode iret here (see pci_irq.c). */
#include "rt.h"

#define LAPIC_BASE      0xFEE00000u
#define LAPIC_SVR       (LAPIC_BASE + 0xF0)
#define IOAPIC_BASE     0xFEC00000u
#define IOAPIC_WIN      (IOAPIC_BASE + 0x10)
#define TESTDEV_ID      0x00051b36u
#define REG_RAISE       0x8
#define REG_ACK         0xc
#define REG_RAISE_LATER 0x10
#define DELAY_MS        5
#define VEC_SPURIOUS    0xff
#define WAIT_LOOPS      3000000

volatile u32 irq_count[256];
volatile u32 ack_addr;

__asm__(
    ".text\n"
    "irq_ret:\n"
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
    ".macro msg_isr vec\n"
    ".globl isr_\\vec\n"
    "isr_\\vec:\n"
    "  incl irq_count+4*\\vec\n"
    "  movl $0, 0xfee000b0\n"
    "  jmp irq_ret\n"
    ".endm\n"
    "msg_isr 0x40\n"
    "msg_isr 0x42\n"
    "msg_isr 0x43\n"
    "msg_isr 0x44\n"
    "msg_isr 0x45\n"
    ".globl isr_intx\n"
    "isr_intx:\n"
    "  pushl %eax\n"
    "  incl irq_count+4*0x41\n"
    "  movl ack_addr, %eax\n"
    "  movl $1, (%eax)\n"
    "  movl $0, 0xfee000b0\n"
    "  popl %eax\n"
    "  jmp irq_ret\n"
    ".globl isr_spurious\n"
    "isr_spurious:\n"
    "  incl irq_count+4*0xff\n"
    "  jmp irq_ret\n"
    ".globl isr_fault\n"
    "isr_fault:\n"
    "  call fault\n"
);

void isr_0x40(void), isr_0x42(void), isr_0x43(void), isr_0x44(void), isr_0x45(void);
void isr_intx(void), isr_spurious(void), isr_fault(void);

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

__attribute__((used)) void fault(u32 vector)
{
    printf("exception %u\n", vector);
    poweroff();
}

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
    set_gate(0x40, isr_0x40);
    set_gate(0x41, isr_intx);
    set_gate(0x42, isr_0x42);
    set_gate(0x43, isr_0x43);
    set_gate(0x44, isr_0x44);
    set_gate(0x45, isr_0x45);
    set_gate(VEC_SPURIOUS, isr_spurious);
    struct { u16 limit; u32 base; } __attribute__((packed)) d = { sizeof(idt) - 1, (u32)idt };
    __asm__ volatile("lidt %0" : : "m"(d));
}

static u32 cf8(u32 slot, u32 reg) { return 0x80000000u | slot << 11 | (reg & 0xfc); }

static u32 cfg_read32(u32 slot, u32 reg)
{
    outl(0xcf8, cf8(slot, reg));
    return inl(0xcfc);
}

static u16 cfg_read16(u32 slot, u32 reg)
{
    outl(0xcf8, cf8(slot, reg));
    return inw(0xcfc + (reg & 2));
}

static void cfg_write32(u32 slot, u32 reg, u32 v)
{
    outl(0xcf8, cf8(slot, reg));
    outl(0xcfc, v);
}

static void cfg_write16(u32 slot, u32 reg, u16 v)
{
    outl(0xcf8, cf8(slot, reg));
    outw(0xcfc + (reg & 2), v);
}

static u32 find_cap(u32 slot, u8 id)
{
    u32 p = cfg_read32(slot, 0x34) & 0xfc;
    for (int n = 0; p && n < 48; n++) {
        u32 h = cfg_read32(slot, p);
        if ((h & 0xff) == id)
            return p;
        p = (h >> 8) & 0xfc;
    }
    return 0;
}

static void ioapic_write(u32 reg, u32 v)
{
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_WIN, v);
}

static u32 bar0;

/* Ask the device thread for `vector`; wait until the device says it raised it. */
static int raise_later(u32 vector)
{
    u32 before = mmio_read32(bar0 + REG_RAISE_LATER);
    mmio_write32(bar0 + REG_RAISE_LATER, vector | DELAY_MS << 16);
    for (u32 i = 0; i < WAIT_LOOPS; i++) {
        if (mmio_read32(bar0 + REG_RAISE_LATER) != before)
            return 1;
        cpu_relax();
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

static void report(const char *what, u32 vector, u32 count)
{
    printf("%s vector 0x%x %s\n", what, vector, wait_for(vector, count) ? "received" : "NOT received");
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    int dev = -1;
    for (u32 s = 0; s < 32; s++)
        if (cfg_read32(s, 0) == TESTDEV_ID)
            dev = (int)s;
    if (dev < 0) {
        printf("pci-testdev not found\n");
        return 0;
    }
    bar0 = cfg_read32(dev, 0x10) & ~0xfu;
    idt_init();
    mmio_write32(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
    ack_addr = bar0 + REG_ACK;

    u32 msix = find_cap(dev, 0x11);
    u32 tbl = cfg_read32(dev, msix + 4);
    u32 table = (cfg_read32(dev, 0x10 + 4 * (tbl & 7)) & ~0xfu) + (tbl & ~7u);
    u32 pba_reg = cfg_read32(dev, msix + 8);
    u32 pba = (cfg_read32(dev, 0x10 + 4 * (pba_reg & 7)) & ~0xfu) + (pba_reg & ~7u);
    u16 mctl = cfg_read16(dev, msix + 2);
    __asm__ volatile("sti");

    /* (a) */
    mmio_write32(table + 0, LAPIC_BASE);
    mmio_write32(table + 4, 0);
    mmio_write32(table + 8, 0x40);
    mmio_write32(table + 12, 0);
    cfg_write16(dev, msix + 2, mctl | 0x8000);
    raise_later(0);
    report("thread msix", 0x40, 1);

    /* (b) mask, retarget, unmask */
    mmio_write32(table + 12, 1);
    mmio_write32(table + 8, 0x43);
    mmio_write32(table + 12, 0);
    raise_later(0);
    report("reprogrammed msix", 0x43, 1);

    /* (c) retarget while unmasked */
    mmio_write32(table + 8, 0x44);
    raise_later(0);
    report("unmasked-reprogrammed msix", 0x44, 1);

    /* (d) masked: pending, then delivered by the unmask */
    mmio_write32(table + 12, 1);
    raise_later(0);
    for (u32 i = 0; i < 100000; i++)
        cpu_relax();
    printf("masked msix pending %u delivered %u\n", mmio_read32(pba) & 1, irq_count[0x44] - 1);
    mmio_write32(table + 12, 0);
    report("unmasked pending msix", 0x44, 2);
    printf("pending after unmask %u\n", mmio_read32(pba) & 1);

    /* (e) a second vector */
    mmio_write32(table + 16, LAPIC_BASE);
    mmio_write32(table + 20, 0);
    mmio_write32(table + 24, 0x45);
    mmio_write32(table + 28, 0);
    raise_later(1);
    report("second msix", 0x45, 1);

    /* (f) INTx through the IOAPIC, after the MSI routes */
    cfg_write16(dev, msix + 2, mctl & ~0x8000);
    u32 gsi = cfg_read32(dev, 0x3c) & 0xff;
    ioapic_write(0x10 + 2 * gsi + 1, 0);
    ioapic_write(0x10 + 2 * gsi, 0x41 | 1u << 15);
    mmio_write32(bar0 + REG_RAISE, 0);
    printf("intx gsi %u ", gsi);
    report("intx", 0x41, 1);
    raise_later(0);
    printf("thread intx gsi %u ", gsi);
    report("intx", 0x41, 2);

    /* (g) MSI from the device thread */
    u32 msi = find_cap(dev, 0x05);
    cfg_write32(dev, msi + 4, LAPIC_BASE);
    cfg_write32(dev, msi + 8, 0);
    cfg_write16(dev, msi + 12, 0x42);
    cfg_write16(dev, msi + 2, cfg_read16(dev, msi + 2) | 1);
    raise_later(0);
    report("thread msi", 0x42, 1);
    __asm__ volatile("cli");

    printf("counts 40:%u 41:%u 42:%u 43:%u 44:%u 45:%u spurious:%u\n", irq_count[0x40],
           irq_count[0x41], irq_count[0x42], irq_count[0x43], irq_count[0x44], irq_count[0x45],
           irq_count[VEC_SPURIOUS]);
    printf("irqfd done\n");
    return 0;
}
