/* hvframe guest runtime: PCI configuration mechanism #1 (0xcf8/0xcfc) on bus 0. */
#include "rt.h"

static void cfg_addr(u32 dev, u32 reg)
{
    outl(0xcf8, 0x80000000u | PCI_SLOT(dev) << 11 | PCI_FN(dev) << 8 | (reg & 0xfc));
}

u32 pci_read32(u32 dev, u32 reg) { cfg_addr(dev, reg); return inl(0xcfc); }
u16 pci_read16(u32 dev, u32 reg) { cfg_addr(dev, reg); return inw(0xcfc + (reg & 2)); }
u8 pci_read8(u32 dev, u32 reg) { cfg_addr(dev, reg); return inb(0xcfc + (reg & 3)); }
void pci_write32(u32 dev, u32 reg, u32 v) { cfg_addr(dev, reg); outl(0xcfc, v); }
void pci_write16(u32 dev, u32 reg, u16 v) { cfg_addr(dev, reg); outw(0xcfc + (reg & 2), v); }

int pci_next(int after)
{
    for (u32 d = after < 0 ? 0 : (u32)after + 1; d < 32 * 8; d++) {
        u32 slot0 = PCI_DEV(PCI_SLOT(d), 0);
        if ((pci_read32(slot0, 0) & 0xffff) == 0xffff) {
            d |= 7;                 /* no function 0: nothing in the slot */
            continue;
        }
        if (PCI_FN(d) && !(pci_read8(slot0, 0x0e) & 0x80)) {
            d |= 7;                 /* single-function device */
            continue;
        }
        if ((pci_read32(d, 0) & 0xffff) != 0xffff)
            return (int)d;
    }
    return -1;
}

int pci_find_device(u16 vendor, u16 device)
{
    for (int d = pci_next(-1); d >= 0; d = pci_next(d))
        if (pci_read32(d, 0) == ((u32)device << 16 | vendor))
            return d;
    return -1;
}

int pci_find_class(u32 class_code)
{
    for (int d = pci_next(-1); d >= 0; d = pci_next(d))
        if (pci_read32(d, 0x08) >> 8 == class_code)
            return d;
    return -1;
}

u32 pci_find_cap(u32 dev, u8 id)
{
    if (!(pci_read16(dev, 0x06) & 0x10))
        return 0;
    u32 p = pci_read8(dev, 0x34) & 0xfc;
    for (int n = 0; p && n < 48; n++) {     /* bounded: a looping list must not hang us */
        if (pci_read8(dev, p) == id)
            return p;
        p = pci_read8(dev, p + 1) & 0xfc;
    }
    return 0;
}

u32 pci_bar_mem(u32 dev, u32 bar) { return pci_read32(dev, 0x10 + 4 * bar) & ~0xfu; }

/* Table and PBA registers: BIR in bits 2:0, offset above. */
u32 pci_msix_table(u32 dev, u32 cap)
{
    u32 r = pci_read32(dev, cap + 4);
    return pci_bar_mem(dev, r & 7) + (r & ~7u);
}

u32 pci_msix_pba(u32 dev, u32 cap)
{
    u32 r = pci_read32(dev, cap + 8);
    return pci_bar_mem(dev, r & 7) + (r & ~7u);
}

void msix_route(u32 table, u32 entry, u32 vector)
{
    u32 e = table + 16 * entry;
    mmio_write32(e + 0, LAPIC_BASE);
    mmio_write32(e + 4, 0);
    mmio_write32(e + 8, vector);
    mmio_write32(e + 12, 0);
}

void pci_msi_enable(u32 dev, u32 cap, u32 vector)
{
    u16 ctl = pci_read16(dev, cap + 2);
    pci_write32(dev, cap + 4, LAPIC_BASE);
    if (ctl & 0x80) {               /* 64-bit address */
        pci_write32(dev, cap + 8, 0);
        pci_write16(dev, cap + 12, vector);
    } else
        pci_write16(dev, cap + 8, vector);
    pci_write16(dev, cap + 2, (ctl & ~0x70) | 1);  /* one vector, enabled */
}
