"""Intel MultiProcessor Specification 1.4 table: floating pointer + configuration table.

Default place: the last KiB of base memory, 0x9FC00 (E820-reserved by GuestMemory.e820()),
which Linux scans for "_MP_". The configuration table directly follows the 16-byte floating
pointer. Entries, in the order the specification requires (by type): one processor per vCPU
(APIC id = index, the first is the BSP), buses PCI (id 0) and ISA (id 1), the I/O APIC
(id = ncpus at 0xFEC00000), I/O interrupt assignments for ISA IRQs 0-15 (IRQ0 -> pin 2, IRQ2
omitted as the cascade, IRQ9 the SCI level/active-high) and for INTA-INTD of each given PCI
slot (pins 16-19 by the swizzle), then local interrupts ExtINT -> LINT0 and NMI -> LINT1.
"""
from __future__ import annotations

from ..memory import GuestMemory
from ..packed import Declarations
from .tables import MPS_INTI_ACTIVE_HIGH, MPS_INTI_CONFORMING, MPS_INTI_LEVEL, checksum_fix

MP_BASE = 0x9FC00
MP_SIZE = 0x400
SPEC_REV = 4                     # MP specification 1.4
LAPIC_ADDRESS = 0xFEE00000
IOAPIC_ADDRESS = 0xFEC00000
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
PCI_BUS_ID = 0
ISA_BUS_ID = 1
SCI_IRQ = 9
INTX_GSI_BASE = 16

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IOINT, ENTRY_LINT = range(5)
CPU_ENABLED = 1 << 0
CPU_BSP = 1 << 1
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_SMI, INT_TYPE_EXTINT = range(4)
MP_ENTRY_SIZES = {ENTRY_PROCESSOR: 20, ENTRY_BUS: 8, ENTRY_IOAPIC: 8, ENTRY_IOINT: 8, ENTRY_LINT: 8}
MP_HEADER_SIZE = 44


def _declare():
    from construct import (Bytes, Const, GreedyRange, Int8ul, Int16ul, Int32ul, PaddedString,
                           Padding, Rebuild, Struct, Switch, this)

    MpFloatingPointer = Struct(
        "signature" / Const(b"_MP_"),
        "physptr" / Int32ul,
        "length" / Const(1, Int8ul),         # in 16-byte units
        "spec_rev" / Int8ul,
        "checksum" / Int8ul,
        "feature1" / Int8ul,                 # 0: a configuration table is present
        "feature2" / Int8ul,                 # bit 7 IMCRP: 0 = virtual wire mode
        "feature3_5" / Bytes(3),
    )
    assert MpFloatingPointer.sizeof() == 16

    _IntAssignment = Struct(
        "int_type" / Int8ul,
        "flags" / Int16ul,
        "src_bus_id" / Int8ul,
        "src_bus_irq" / Int8ul,
        "dst_apic_id" / Int8ul,
        "dst_pin" / Int8ul,
    )

    MpEntryBodies = {
        ENTRY_PROCESSOR: Struct(
            "apic_id" / Int8ul,
            "apic_version" / Int8ul,
            "cpu_flags" / Int8ul,
            "cpu_signature" / Int32ul,
            "feature_flags" / Int32ul,
            Padding(8),
        ),
        ENTRY_BUS: Struct("bus_id" / Int8ul, "bus_type" / PaddedString(6, "ascii")),
        ENTRY_IOAPIC: Struct("apic_id" / Int8ul, "apic_version" / Int8ul, "flags" / Int8ul,
                             "address" / Int32ul),
        ENTRY_IOINT: _IntAssignment,
        ENTRY_LINT: _IntAssignment,
    }
    MpEntry = Struct("type" / Int8ul, "body" / Switch(this.type, MpEntryBodies))

    MpConfigTable = Struct(
        "signature" / Const(b"PCMP"),
        "base_table_length" / Int16ul,
        "spec_rev" / Int8ul,
        "checksum" / Int8ul,
        "oem_id" / PaddedString(8, "ascii"),
        "product_id" / PaddedString(12, "ascii"),
        "oem_table_pointer" / Int32ul,
        "oem_table_size" / Int16ul,
        "entry_count" / Rebuild(Int16ul, lambda ctx: len(ctx.entries)),
        "lapic_address" / Int32ul,
        "ext_table_length" / Int16ul,
        "ext_table_checksum" / Int8ul,
        Padding(1),
        "entries" / GreedyRange(MpEntry),
    )
    assert all(1 + b.sizeof() == MP_ENTRY_SIZES[k] for k, b in MpEntryBodies.items())
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr

CPU_SIGNATURE = 0x600            # family 6
CPU_FEATURES = (1 << 0) | (1 << 9)   # FPU, APIC


def _int(int_type, flags, bus, irq, apic, pin, kind=ENTRY_IOINT):
    return dict(type=kind, body=dict(int_type=int_type, flags=flags, src_bus_id=bus,
                                     src_bus_irq=irq, dst_apic_id=apic, dst_pin=pin))


def mp_entries(ncpus: int, pci_slots) -> list[dict]:
    if not 1 <= ncpus <= 254:
        raise ValueError(f"ncpus must be 1..254 for an MP table, not {ncpus}")
    ioapic_id = ncpus
    e = [dict(type=ENTRY_PROCESSOR, body=dict(
        apic_id=i, apic_version=LAPIC_VERSION, cpu_flags=CPU_ENABLED | (CPU_BSP if i == 0 else 0),
        cpu_signature=CPU_SIGNATURE, feature_flags=CPU_FEATURES)) for i in range(ncpus)]
    e.append(dict(type=ENTRY_BUS, body=dict(bus_id=PCI_BUS_ID, bus_type="PCI   ")))
    e.append(dict(type=ENTRY_BUS, body=dict(bus_id=ISA_BUS_ID, bus_type="ISA   ")))
    e.append(dict(type=ENTRY_IOAPIC, body=dict(apic_id=ioapic_id, apic_version=IOAPIC_VERSION,
                                               flags=1, address=IOAPIC_ADDRESS)))
    for irq in range(16):
        if irq == 2:
            continue              # the cascade; IRQ0 is delivered on pin 2
        flags = MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL if irq == SCI_IRQ else MPS_INTI_CONFORMING
        e.append(_int(INT_TYPE_INT, flags, ISA_BUS_ID, irq, ioapic_id, 2 if irq == 0 else irq))
    for slot in sorted(set(pci_slots)):
        if not 0 <= slot < 32:
            raise ValueError(f"PCI slot {slot} out of range")
        for pin in range(4):       # 0 = INTA; PCI conforming = level, active low
            e.append(_int(INT_TYPE_INT, MPS_INTI_CONFORMING, PCI_BUS_ID, slot << 2 | pin,
                          ioapic_id, INTX_GSI_BASE + (slot + pin) % 4))
    e.append(_int(INT_TYPE_EXTINT, MPS_INTI_CONFORMING, ISA_BUS_ID, 0, 0xFF, 0, ENTRY_LINT))
    e.append(_int(INT_TYPE_NMI, MPS_INTI_CONFORMING, ISA_BUS_ID, 0, 0xFF, 1, ENTRY_LINT))
    return e


_CONFIG_CHECKSUM = LAYOUTS.MpConfigTable.fields["checksum"][0]
_POINTER_CHECKSUM = LAYOUTS.MpFloatingPointer.fields["checksum"][0]


def build_mptable(base: int, ncpus: int, pci_slots=()) -> bytes:
    """Floating pointer at base, configuration table right after it (both 16-byte aligned)."""
    if base % 16:
        raise ValueError("the MP floating pointer must be 16-byte aligned")
    entries = mp_entries(ncpus, pci_slots)
    table_len = MP_HEADER_SIZE + sum(MP_ENTRY_SIZES[x["type"]] for x in entries)
    cfg = dict(base_table_length=table_len, spec_rev=SPEC_REV, checksum=0, oem_id="HVFRAME",
               product_id="HVFRAME", oem_table_pointer=0, oem_table_size=0,
               entry_count=len(entries), lapic_address=LAPIC_ADDRESS, ext_table_length=0,
               ext_table_checksum=0, entries=entries)
    # Built once with checksum 0, which is then filled in place (the same bytes as building
    # again with it, at half the cost).
    table = bytearray(LAYOUTS.MpConfigTable.build(cfg))
    assert len(table) == table_len
    table[_CONFIG_CHECKSUM] = checksum_fix(table)
    fp = dict(physptr=base + 16, spec_rev=SPEC_REV, checksum=0, feature1=0, feature2=0,
              feature3_5=bytes(3))
    pointer = bytearray(LAYOUTS.MpFloatingPointer.build(fp))
    pointer[_POINTER_CHECKSUM] = checksum_fix(pointer)
    return bytes(pointer + table)


def install_mptable(memory: GuestMemory, base: int = MP_BASE, ncpus: int = 1, pci_slots=(),
                    *, limit: int | None = None) -> int:
    """Write the MP table at base and return the floating pointer's address.

    limit is the room available (default: 1 KiB at 0x9FC00, else up to 0x100000 inside the
    0xF0000 BIOS area); a table that does not fit raises ValueError — put it at 0xF0000 then.
    """
    blob = build_mptable(base, ncpus, pci_slots)
    if limit is None:
        limit = MP_SIZE if base == MP_BASE else max(0, 0x100000 - base)
    if len(blob) > limit:
        raise ValueError(f"MP table needs {len(blob)} bytes, {limit} available at {base:#x}")
    memory.write(base, blob)
    return base
