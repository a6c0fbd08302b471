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
 * Each step prints a line the test reads. The runtime's counting handlers take the
 * interrupts (rt_irq.c). */
#include "rt.h"

#define TESTDEV_ID      0x00051b36u
#define REG_RAISE       0x8
#define REG_ACK         0xc
#define REG_RAISE_LATER 0x10
#define DELAY_MS        5
#define WAIT_LOOPS      3000000

static u32 ack_addr;

/* Deassert INTx before the EOI, or it fires again. */
static void ack_intx(u32 vector)
{
    (void)vector;
    mmio_write32(ack_addr, 1);
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

static void report(const char *what, u32 vector, u32 count)
{
    printf("%s vector 0x%x %s\n", what, vector,
           irq_wait(vector, count, WAIT_LOOPS) ? "received" : "NOT received");
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    int dev = pci_find_device(TESTDEV_ID & 0xffff, TESTDEV_ID >> 16);
    if (dev < 0) {
        printf("pci-testdev not found\n");
        return 0;
    }
    bar0 = pci_bar_mem(dev, 0);
    irq_init("");
    ack_addr = bar0 + REG_ACK;
    irq_set_hook(0x41, ack_intx);

    u32 msix = pci_find_cap(dev, 0x11);
    u32 table = pci_msix_table(dev, msix);
    u32 pba = pci_msix_pba(dev, msix);
    u16 mctl = pci_read16(dev, msix + 2);
    irq_enable();

    /* (a) */
    msix_route(table, 0, 0x40);
    pci_write16(dev, msix + 2, mctl | 0x8000);
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
    msix_route(table, 1, 0x45);
    raise_later(1);
    report("second msix", 0x45, 1);

    /* (f) INTx through the IOAPIC, after the MSI routes */
    pci_write16(dev, msix + 2, mctl & ~0x8000);
    u32 gsi = pci_read32(dev, 0x3c) & 0xff;
    ioapic_route(gsi, 0x41, IOAPIC_LEVEL);
    mmio_write32(bar0 + REG_RAISE, 0);
    printf("intx gsi %u ", gsi);
    report("intx", 0x41, 1);
    raise_later(0);
    printf("thread intx gsi %u ", gsi);
    report("intx", 0x41, 2);

    /* (g) MSI from the device thread */
    pci_msi_enable(dev, pci_find_cap(dev, 0x05), 0x42);
    raise_later(0);
    report("thread msi", 0x42, 1);
    irq_disable();

    printf("counts 40:%u 41:%u 42:%u 43:%u 44:%u 45:%u spurious:%u\n", irq_count[0x40],
           irq_count[0x41], irq_count[0x42], irq_count[0x43], irq_count[0x44], irq_count[0x45],
           irq_count[VEC_SPURIOUS]);
    printf("irqfd done\n");
    return 0;
}
