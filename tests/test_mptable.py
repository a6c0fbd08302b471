"""MP specification 1.4 table: checksums, entry counts, the floating pointer and its link to
the configuration table, parsed back through the construct declarations."""
import pytest

from hvframe.acpi import mptable as M
from hvframe.memory import GuestMemory, MiB


def _split(blob):
    fp = M.MpFloatingPointer.parse(blob[:16])
    return fp, blob[16:]


@pytest.mark.parametrize("ncpus,slots", [(1, []), (2, [0, 1, 3]), (4, list(range(8)))])
def test_checksums_and_counts(ncpus, slots):
    blob = M.build_mptable(M.MP_BASE, ncpus, slots)
    fp, cfg_raw = _split(blob)
    assert blob[:4] == b"_MP_" and sum(blob[:16]) % 256 == 0
    assert fp.physptr == M.MP_BASE + 16 and fp.spec_rev == 4 and fp.feature1 == 0
    cfg = M.MpConfigTable.parse(cfg_raw)
    assert cfg_raw[:4] == b"PCMP"
    assert cfg.base_table_length == len(cfg_raw)
    assert sum(cfg_raw) % 256 == 0
    assert cfg.lapic_address == 0xFEE00000
    assert cfg.entry_count == len(cfg.entries)
    by = {t: [e.body for e in cfg.entries if e.type == t] for t in range(5)}
    assert [e.type for e in cfg.entries] == sorted(e.type for e in cfg.entries)
    assert len(by[M.ENTRY_PROCESSOR]) == ncpus
    assert [p.apic_id for p in by[M.ENTRY_PROCESSOR]] == list(range(ncpus))
    assert all(p.cpu_flags & M.CPU_ENABLED for p in by[M.ENTRY_PROCESSOR])
    assert [bool(p.cpu_flags & M.CPU_BSP) for p in by[M.ENTRY_PROCESSOR]] == [True] + [False] * (ncpus - 1)
    assert {(b.bus_id, b.bus_type) for b in by[M.ENTRY_BUS]} == {(0, "PCI   "), (1, "ISA   ")}
    assert len(by[M.ENTRY_IOAPIC]) == 1
    io = by[M.ENTRY_IOAPIC][0]
    assert (io.apic_id, io.address, io.flags) == (ncpus, 0xFEC00000, 1)
    ints = by[M.ENTRY_IOINT]
    assert len(ints) == 15 + 4 * len(slots)
    isa = {i.src_bus_irq: i for i in ints if i.src_bus_id == M.ISA_BUS_ID}
    assert isa[0].dst_pin == 2 and 2 not in isa and isa[1].dst_pin == 1
    assert isa[9].flags == 0x0D
    assert all(i.dst_apic_id == ncpus for i in ints)
    pci = {(i.src_bus_irq >> 2, i.src_bus_irq & 3): i.dst_pin for i in ints if i.src_bus_id == 0}
    assert pci == {(s, p): 16 + (s + p) % 4 for s in slots for p in range(4)}
    lints = {l.dst_pin: l for l in by[M.ENTRY_LINT]}
    assert lints[0].int_type == M.INT_TYPE_EXTINT and lints[1].int_type == M.INT_TYPE_NMI
    assert all(l.dst_apic_id == 0xFF for l in lints.values())
    # the checksums are patched into bytes built once: exactly what the declarations build
    assert M.MpFloatingPointer.build(fp) == blob[:16]
    assert M.MpConfigTable.build(cfg) == cfg_raw


def test_install_points_to_pcmp():
    mem = GuestMemory(4 * MiB)
    try:
        addr = M.install_mptable(mem, M.MP_BASE, 2, [0, 1, 2])
        assert addr == M.MP_BASE and mem.read(addr, 4) == b"_MP_"
        fp = M.MpFloatingPointer.parse(mem.read(addr, 16))
        assert mem.read(fp.physptr, 4) == b"PCMP"
        length = int.from_bytes(mem.read(fp.physptr + 4, 2), "little")
        assert sum(mem.read(fp.physptr, length)) % 256 == 0
        assert fp.physptr + length <= M.MP_BASE + M.MP_SIZE
    finally:
        mem.close()


def test_too_big_for_base_memory_kib_goes_to_bios_area():
    mem = GuestMemory(4 * MiB)
    try:
        with pytest.raises(ValueError):
            M.install_mptable(mem, M.MP_BASE, 2, range(32))
        addr = M.install_mptable(mem, 0xF0000, 2, range(32))
        fp = M.MpFloatingPointer.parse(mem.read(addr, 16))
        length = int.from_bytes(mem.read(fp.physptr + 4, 2), "little")
        cfg = M.MpConfigTable.parse(mem.read(fp.physptr, length))
        assert len(cfg.entries) == cfg.entry_count
        assert cfg.entry_count == 2 + 2 + 1 + 15 + 128 + 2
    finally:
        mem.close()
