"""PCI INTx reaches both the IOAPIC pin (GSI 16-19) and the ISA IRQ the guest routes its PIRQ
to in the LPC bridge, as SeaBIOS programs it for systems using the PIC."""
from hvframe.config import Config
from hvframe.pci.bus import add_pci_devices
from hvframe.plugins import Registry
from hvframe.runner import add_slot
from hvframe.synthetic import SyntheticMachine

SLOT = 3
PIRQ = (SLOT + 1 - 1) % 4      # INTA of slot 3
GSI = 16 + PIRQ


def machine():
    registry, cfg = Registry(), Config()
    for s in ("0,hostbridge", f"{SLOT},pci-testdev", "31,lpc"):
        add_slot(cfg, registry, s)
    m = SyntheticMachine(64 << 20)
    add_pci_devices(m, registry, cfg.group("pci"), direct_boot=True)
    return m


def write_config(m, slot, reg, size, value):
    m.io_write(0xCF8, 4, 0x80000000 | slot << 11 | (reg & ~3))
    m.io_write(0xCFC + (reg & 3), size, value)


def read_config(m, slot, reg, size=4):
    m.io_write(0xCF8, 4, 0x80000000 | slot << 11 | (reg & ~3))
    return m.io_read(0xCFC + (reg & 3), size)


def raise_and_ack(m):
    bar0 = read_config(m, SLOT, 0x10) & ~0xF
    m.mmio_write(bar0 + 8, 4, 0)     # raise vector 0: INTx while MSI/MSI-X are off
    up = dict(m.irq_levels)
    m.mmio_write(bar0 + 12, 4, 0)    # acknowledge: the device lets go of the pin
    return up, dict(m.irq_levels)


def test_unrouted_pirq_drives_only_the_ioapic_pin():
    m = machine()
    up, down = raise_and_ack(m)
    assert up[GSI] == 1 and down[GSI] == 0
    assert not any(level for irq, level in up.items() if irq < 16)


def test_routed_pirq_also_drives_the_isa_irq_and_follows_a_new_route():
    m = machine()
    write_config(m, 31, 0x60 + PIRQ, 1, 11)
    up, down = raise_and_ack(m)
    assert up[GSI] == 1 and up[11] == 1
    assert down[GSI] == 0 and down[11] == 0
    write_config(m, 31, 0x60 + PIRQ, 1, 10)
    up, down = raise_and_ack(m)
    assert up[10] == 1 and up.get(11, 0) == 0 and down[10] == 0


def test_reserved_isa_irqs_are_not_routed():
    m = machine()
    write_config(m, 31, 0x60 + PIRQ, 1, 8)   # the RTC's IRQ
    up, _ = raise_and_ack(m)
    assert up.get(8, 0) == 0 and up[GSI] == 1
