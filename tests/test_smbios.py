"""SMBIOS tables for firmware (hvframe.acpi.smbios), checked as a reader such as dmidecode
would: entry point checksums, structure walk, what each structure says."""
import uuid

from hvframe.acpi import smbios
from hvframe.acpi.smbios import ANCHOR_21, MEMORY_DEVICE, PROCESSOR, SYSTEM


def test_entry_point_checksums_and_lengths_agree_with_the_tables():
    anchor, tables = smbios.build(2, [(0, 128 << 20)], uuid.uuid4())
    ep = ANCHOR_21.parse(anchor)
    assert len(anchor) == ep.length == 31 and (ep.major, ep.minor) == (2, 8)
    assert sum(anchor) % 256 == 0 and sum(anchor[0x10:]) % 256 == 0
    assert ep.table_length == len(tables)
    structures = smbios.parse(anchor, tables)
    assert len(structures) == ep.structures
    assert ep.max_structure_size >= max(len(b) for _, b, _ in structures)
    assert [t for t, _, _ in structures] == [1, 3, 4, 4, 16, 17, 19, 32, 127]


def test_system_uuid_cpus_and_memory_are_described():
    vm = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    regions = [(0, 3 << 30), (1 << 32, 33 << 30)]          # 36 GiB, split around the hole
    anchor, tables = smbios.build(3, regions, vm, cpuid_signature=0x806F8)
    by_type = {}
    for t, body, strings in smbios.parse(anchor, tables):
        by_type.setdefault(t, []).append((body, strings))
    system, strings = by_type[1][0]
    assert SYSTEM.parse(system).uuid == vm.bytes_le and strings[0] == b"hvframe"
    cpus = [PROCESSOR.parse(b) for b, _ in by_type[4]]
    assert len(cpus) == 3 and all(c.processor_id[:4] == (0x806F8).to_bytes(4, "little")
                                  for c in cpus)
    assert [s[0] for _, s in by_type[4]] == [b"CPU 0", b"CPU 1", b"CPU 2"]
    dimms = [MEMORY_DEVICE.parse(b).size_mib for b, _ in by_type[17]]
    assert sum(dimms) == 36 << 10 and max(dimms) == 16 << 10
    assert len(by_type[19]) == 2        # one mapping per RAM range
