/* The pci-counter example device (plugins/pci_counter) from inside a guest: find 1234:c0de,
 * read the magic in BAR0, route MSI-X entries 0 and 1 to LAPIC vectors 0x40 and 0x41,
 * enable MSI-X, ring the doorbell on each vector and take the interrupts.
 * Output:
 *   pcicnt bar0 HEX magic HEX
 *   pcicnt vector V irq 0xNN received|NOT received
 *   pcicnt count N interrupts N status N
 *   pcicnt done */
#include "rt.h"

#define MAGIC           0x544e5443u
#define REG_MAGIC       0x00
#define REG_COUNT       0x04
#define REG_DOORBELL    0x08
#define REG_VECTOR      0x0c
#define REG_STATUS      0x10
#define REG_INTERRUPTS  0x14
#define WAIT_LOOPS      2000000

int main(const struct hvm_start_info *si)
{
    (void)si;
    int dev = pci_find_device(0x1234, 0xc0de);
    if (dev < 0) {
        printf("pcicnt error no pci-counter\n");
        return 0;
    }
    pci_write16(dev, 0x04, pci_read16(dev, 0x04) | 0x6);       /* memory, bus master */
    u32 bar0 = pci_bar_mem(dev, 0);
    printf("pcicnt bar0 %x magic %x\n", bar0, mmio_read32(bar0 + REG_MAGIC));

    irq_init("pcicnt error ");
    u32 msix = pci_find_cap(dev, 0x11);
    u32 table = pci_msix_table(dev, msix);
    msix_route(table, 0, 0x40);
    msix_route(table, 1, 0x41);
    pci_write16(dev, msix + 2, (pci_read16(dev, msix + 2) | 0x8000) & ~0x4000);
    irq_enable();
    for (u32 v = 0; v < 2; v++) {
        mmio_write32(bar0 + REG_VECTOR, v);
        mmio_write32(bar0 + REG_DOORBELL, 3 + v);
        int ok = irq_wait(0x40 + v, 1, WAIT_LOOPS);
        printf("pcicnt vector %u irq 0x%x %s\n", v, 0x40 + v, ok ? "received" : "NOT received");
    }
    irq_disable();
    printf("pcicnt count %u interrupts %u status %u\n", mmio_read32(bar0 + REG_COUNT),
           mmio_read32(bar0 + REG_INTERRUPTS), mmio_read32(bar0 + REG_STATUS));
    printf("pcicnt irq counts %u %u spurious %u\n", irq_count[0x40], irq_count[0x41],
           irq_count[VEC_SPURIOUS]);
    printf("pcicnt done\n");
    return 0;
}
