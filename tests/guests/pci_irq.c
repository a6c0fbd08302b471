/* PCI and interrupt delivery from inside a guest:
 *   (a) enumerate bus 0 through config mechanism #1 (0xcf8/0xcfc) and through ECAM at
 *       0xE0000000, printing each function's vendor:device both ways;
 *   (b) find pci-testdev (1b36:0005), read its BAR0 magic, move BAR0 by 1 MiB with memory
 *       decode off, and check the magic at the new address and all ones at the old one;
 *   (c) take an MSI-X interrupt (table entry 0 -> LAPIC 0, vector 0x40);
 *   (d) take its INTx through the IOAPIC (level, active high, vector 0x41), acking the device
 *       in the handler;
 *   (e) take an MSI (vector 0x42).
 * The runtime's counting handlers take the interrupts (rt_irq.c). */
#include "rt.h"

#define ECAM_BASE       0xE0000000u
#define TESTDEV_ID      0x00051b36u
#define MAGIC           0x48564652u
#define REG_RAISE       0x8
#define REG_ACK         0xc
#define VEC_MSIX        0x40
#define VEC_INTX        0x41
#define VEC_MSI         0x42
#define WAIT_LOOPS      2000000

static u32 ack_addr;            /* BAR0 + REG_ACK */

/* Deassert INTx before the EOI, or it fires again. */
static void ack_intx(u32 vector)
{
    (void)vector;
    mmio_write32(ack_addr, 1);
}

static u32 ecam_read32(u32 slot, u32 fn, u32 reg)
{
    return mmio_read32(ECAM_BASE + (slot << 15 | fn << 12 | reg));
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    int dev = -1;

    /* (a) enumeration */
    for (u32 s = 0; s < 32; s++) {
        u32 id1 = pci_read32(PCI_DEV(s, 0), 0);
        u32 id2 = ecam_read32(s, 0, 0);
        if ((id1 & 0xffff) == 0xffff && (id2 & 0xffff) == 0xffff)
            continue;
        u32 nfn = (pci_read32(PCI_DEV(s, 0), 0x0c) >> 16) & 0x80 ? 8 : 1;
        for (u32 f = 0; f < nfn; f++) {
            id1 = pci_read32(PCI_DEV(s, f), 0);
            id2 = ecam_read32(s, f, 0);
            if ((id1 & 0xffff) == 0xffff && (id2 & 0xffff) == 0xffff)
                continue;
            printf("pci 00:%02x.%u cf8 %04x:%04x ecam %04x:%04x\n", s, f,
                   id1 & 0xffff, id1 >> 16, id2 & 0xffff, id2 >> 16);
            if (f == 0 && id1 == TESTDEV_ID)
                dev = (int)PCI_DEV(s, 0);
        }
    }
    if (dev < 0) {
        printf("pci-testdev not found\n");
        return 0;
    }

    /* (b) BAR0: magic, move, magic again, old address empty */
    u32 bar0 = pci_bar_mem(dev, 0);
    printf("testdev bar0 %x magic %x\n", bar0, mmio_read32(bar0));
    u16 cmd = pci_read16(dev, 0x04);
    u32 moved = bar0 + 0x100000;
    pci_write16(dev, 0x04, cmd & ~2);
    pci_write32(dev, 0x10, moved);
    pci_write16(dev, 0x04, cmd | 2);
    bar0 = pci_bar_mem(dev, 0);
    printf("testdev moved bar0 %x magic %x old %x\n", bar0, mmio_read32(bar0),
           mmio_read32(bar0 - 0x100000));

    /* interrupts: IDT, LAPIC on (spurious vector 0xff) */
    irq_init("");
    ack_addr = bar0 + REG_ACK;
    irq_set_hook(VEC_INTX, ack_intx);

    /* (c) MSI-X entry 0 -> APIC 0, vector 0x40 */
    u32 msix = pci_find_cap(dev, 0x11);
    msix_route(pci_msix_table(dev, msix), 0, VEC_MSIX);
    u16 mctl = pci_read16(dev, msix + 2);
    pci_write16(dev, msix + 2, mctl | 0x8000);
    irq_enable();
    mmio_write32(bar0 + REG_RAISE, 0);
    if (irq_wait(VEC_MSIX, 1, WAIT_LOOPS))
        printf("msix vector 0x%x received\n", VEC_MSIX);
    else
        printf("msix vector 0x%x NOT received\n", VEC_MSIX);

    /* (d) INTx through the IOAPIC: GSI from the interrupt line register */
    pci_write16(dev, msix + 2, mctl & ~0x8000);
    u32 gsi = pci_read32(dev, 0x3c) & 0xff;
    ioapic_route(gsi, VEC_INTX, IOAPIC_LEVEL);                   /* active high, unmasked */
    mmio_write32(bar0 + REG_RAISE, 0);
    if (irq_wait(VEC_INTX, 1, WAIT_LOOPS))
        printf("intx vector 0x%x received (gsi %u)\n", VEC_INTX, gsi);
    else
        printf("intx vector 0x%x NOT received (gsi %u)\n", VEC_INTX, gsi);
    printf("intx level after ack %u\n", mmio_read32(bar0 + REG_ACK));

    /* (e) MSI */
    pci_msi_enable(dev, pci_find_cap(dev, 0x05), VEC_MSI);
    mmio_write32(bar0 + REG_RAISE, 0);
    if (irq_wait(VEC_MSI, 1, WAIT_LOOPS))
        printf("msi vector 0x%x received\n", VEC_MSI);
    else
        printf("msi vector 0x%x NOT received\n", VEC_MSI);
    irq_disable();

    printf("interrupt counts msix %u intx %u msi %u spurious %u\n", irq_count[VEC_MSIX],
           irq_count[VEC_INTX], irq_count[VEC_MSI], irq_count[VEC_SPURIOUS]);
    printf("pci_irq done\n");
    return 0;
}
