"""The DSDT definition block: the PCI root bridge with its windows and _PRT, the ISA/LPC
devices a direct-booted kernel needs (COM1, COM2, RTC), processor devices, and \\_S5."""
from __future__ import annotations

from . import aml

PCI_SLOTS = 32
INTX_GSI_BASE = 16


def intx_gsi(slot: int, pin: int) -> int:
    """GSI of INTx pin (0 = INTA .. 3 = INTD) of a slot, as hvframe.pci.bus wires it."""
    return INTX_GSI_BASE + (slot + pin) % 4


def prt() -> bytes:
    """_PRT in APIC mode: Package(){Address (slot << 16 | 0xFFFF), Pin, Source 0, GSI}."""
    entries = [aml.package((slot << 16) | 0xFFFF, pin, 0, intx_gsi(slot, pin))
               for slot in range(PCI_SLOTS) for pin in range(4)]
    return aml.name("_PRT", aml.package(*entries))


def _isa_device(dev: str, hid: str, uid: int, *resources: bytes) -> bytes:
    return aml.device(dev,
                      aml.name("_HID", aml.eisaid(hid)),
                      aml.name("_UID", uid),
                      aml.method("_STA", 0, aml.return_(0x0F)),
                      aml.name("_CRS", aml.resource_template(*resources)))


def build_dsdt_aml(*, ncpus: int, ecam_base: int, ecam_buses: int = 256,
                   mmio32: tuple[int, int] = (0xC0000000, 0xE0000000),
                   mmio64: tuple[int, int] | None = None, lpc_slot: int = 31,
                   com_ports=(1, 2), isa_devices=None) -> bytes:
    """AML of the DSDT body. mmio32/mmio64 are [start, end) windows for BARs. isa_devices
    (hvframe.device.AcpiIsaDevice, what the machine's devices declare) are described under
    the ISA bridge; without them, com_ports says which of COM1 (0x3f8, IRQ4) and COM2 (0x2f8,
    IRQ3) to describe."""
    crs = [
        aml.word_bus_number(0, ecam_buses - 1),
        aml.io(0x0CF8, 0x0CF8, 1, 8),
        aml.dword_io(0x0000, 0x0CF7),
        aml.dword_io(0x0D00, 0xFFFF),
        aml.dword_memory(mmio32[0], mmio32[1] - 1),
    ]
    if mmio64 is not None and mmio64[1] > mmio64[0]:
        crs.append(aml.qword_memory(mmio64[0], mmio64[1] - 1))

    serial = {1: (0x3F8, 4), 2: (0x2F8, 3)}
    if isa_devices is None:
        coms = [_isa_device(f"COM{n}", "PNP0501", n, aml.io(serial[n][0], serial[n][0], 1, 8),
                            aml.irq_noflags(serial[n][1])) for n in sorted(set(com_ports))]
    else:
        coms = [_isa_device(d.name, d.hid, d.uid, aml.io(d.io_base, d.io_base, 1, d.io_length),
                            aml.irq_noflags(d.irq)) for d in sorted(isa_devices, key=lambda d: d.name)]
    isa = aml.device(
        "ISA",
        aml.name("_ADR", lpc_slot << 16),
        *coms,
        _isa_device("RTC", "PNP0B00", 0, aml.io(0x70, 0x70, 1, 2), aml.irq_noflags(8)),
    )
    pci0 = aml.device(
        "PCI0",
        aml.name("_HID", aml.eisaid("PNP0A03")),
        aml.name("_ADR", 0),
        aml.name("_UID", 0),
        aml.name("_BBN", 0),
        aml.name("_SEG", 0),
        aml.name("_CRS", aml.resource_template(*crs)),
        prt(),
        isa,
    )
    # Motherboard resources: the ECAM window, so the OS accepts MCFG's region as reserved.
    mres = aml.device(
        "MRES",
        aml.name("_HID", aml.eisaid("PNP0C02")),
        aml.name("_UID", 0),
        aml.name("_CRS", aml.resource_template(aml.memory32_fixed(ecam_base, ecam_buses << 20))),
    )
    cpus = [aml.device(f"C{i:03X}", aml.name("_HID", "ACPI0007"), aml.name("_UID", i))
            for i in range(ncpus)]
    return (aml.scope("\\_SB", pci0, mres, *cpus)
            + aml.name("\\_S5", aml.package(5, 5, 0, 0)))
