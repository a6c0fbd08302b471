"""SMBIOS 2.8 tables for firmware, handed over through fw_cfg as QEMU does.

SeaBIOS takes `etc/smbios/smbios-anchor` (a 2.1-style entry point) and
`etc/smbios/smbios-tables` (the structures, ending with type 127) when both exist and agree
on the table length, adds its own BIOS information (type 0) in front, and installs them.
Without them it builds its own set, looking up a fw_cfg file for every field of every
structure: under an emulating KVM that costs a noticeable share of the boot.

What is described: the system (type 1, with the VM's UUID), a chassis (3), one processor per
vCPU (4), the RAM as one array of 16 GiB devices (16, 17) and its mappings (19), and a clean
boot (32). Every structure is declared with construct below.
"""
from __future__ import annotations

import uuid as uuidlib

from ..memory import FOUR_GIB
from ..packed import Declarations, Packed


def _declare():
    from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Struct

    ANCHOR_21 = Struct(
        "anchor" / Const(b"_SM_"),
        "checksum" / Int8ul,
        "length" / Int8ul,
        "major" / Int8ul,
        "minor" / Int8ul,
        "max_structure_size" / Int16ul,
        "revision" / Int8ul,
        "formatted_area" / Bytes(5),
        "intermediate_anchor" / Const(b"_DMI_"),
        "intermediate_checksum" / Int8ul,
        "table_length" / Int16ul,
        "table_address" / Int32ul,
        "structures" / Int16ul,
        "bcd_revision" / Int8ul,
    )
    HEADER = Struct("type" / Int8ul, "length" / Int8ul, "handle" / Int16ul)
    SYSTEM = Struct(*HEADER.subcons, "manufacturer" / Int8ul, "product" / Int8ul,
                    "version" / Int8ul, "serial" / Int8ul, "uuid" / Bytes(16),
                    "wake_up_type" / Int8ul, "sku" / Int8ul, "family" / Int8ul)
    CHASSIS = Struct(*HEADER.subcons, "manufacturer" / Int8ul, "chassis_type" / Int8ul,
                     "version" / Int8ul, "serial" / Int8ul, "asset_tag" / Int8ul,
                     "boot_up_state" / Int8ul, "power_supply_state" / Int8ul,
                     "thermal_state" / Int8ul, "security_status" / Int8ul, "oem" / Int32ul,
                     "height" / Int8ul, "power_cords" / Int8ul, "contained_count" / Int8ul,
                     "contained_length" / Int8ul, "sku" / Int8ul)
    PROCESSOR = Struct(*HEADER.subcons, "socket" / Int8ul, "processor_type" / Int8ul,
                       "family" / Int8ul, "manufacturer" / Int8ul, "processor_id" / Bytes(8),
                       "version" / Int8ul, "voltage" / Int8ul, "external_clock" / Int16ul,
                       "max_speed" / Int16ul, "current_speed" / Int16ul, "status" / Int8ul,
                       "upgrade" / Int8ul, "l1_cache" / Int16ul, "l2_cache" / Int16ul,
                       "l3_cache" / Int16ul, "serial" / Int8ul, "asset_tag" / Int8ul,
                       "part_number" / Int8ul, "core_count" / Int8ul, "core_enabled" / Int8ul,
                       "thread_count" / Int8ul, "characteristics" / Int16ul, "family2" / Int16ul)
    MEMORY_ARRAY = Struct(*HEADER.subcons, "location" / Int8ul, "use" / Int8ul,
                          "error_correction" / Int8ul, "maximum_capacity_kib" / Int32ul,
                          "error_handle" / Int16ul, "devices" / Int16ul)
    MEMORY_DEVICE = Struct(*HEADER.subcons, "array_handle" / Int16ul, "error_handle" / Int16ul,
                           "total_width" / Int16ul, "data_width" / Int16ul, "size_mib" / Int16ul,
                           "form_factor" / Int8ul, "device_set" / Int8ul, "locator" / Int8ul,
                           "bank_locator" / Int8ul, "memory_type" / Int8ul, "type_detail" / Int16ul,
                           "speed" / Int16ul, "manufacturer" / Int8ul, "serial" / Int8ul,
                           "asset_tag" / Int8ul, "part_number" / Int8ul)
    ARRAY_MAPPING = Struct(*HEADER.subcons, "start_kib" / Int32ul, "end_kib" / Int32ul,
                           "array_handle" / Int16ul, "partition_width" / Int8ul)
    BOOT_INFO = Struct(*HEADER.subcons, "reserved" / Bytes(6), "boot_status" / Int8ul)
    END = HEADER
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr
L = LAYOUTS


MANUFACTURER = "hvframe"
DEVICE_MIB = 16 << 10        # one memory device per 16 GiB, as SeaBIOS describes RAM
NO_HANDLE = 0xFFFF
NO_ERROR_INFO = 0xFFFE


def _structure(st: Packed, strings: list[str], **fields) -> bytes:
    """One structure: its formatted part, then its strings (index 1..n), double-NUL ended."""
    body = st.build(dict(length=st.sizeof(), **fields))
    text = b"".join(s.encode("ascii", "replace") + b"\0" for s in strings)
    return body + (text + b"\0" if text else b"\0\0")


def build(cpus: int, ram_regions, vm_uuid: uuidlib.UUID, cpuid_signature: int = 0,
          cpuid_features: int = 0) -> tuple[bytes, bytes]:
    """(anchor, tables) for fw_cfg. ram_regions: (guest address, size) of each RAM range."""
    total_mib = sum(size for _, size in ram_regions) >> 20
    devices = max(1, (total_mib + DEVICE_MIB - 1) // DEVICE_MIB)
    out = [
        _structure(L.SYSTEM, [MANUFACTURER, "hvframe virtual machine"], type=1, handle=0x100,
                   manufacturer=1, product=2, version=0, serial=0,
                   uuid=vm_uuid.bytes_le, wake_up_type=6, sku=0, family=0),
        _structure(L.CHASSIS, [MANUFACTURER], type=3, handle=0x300, manufacturer=1,
                   chassis_type=1, version=0, serial=0, asset_tag=0, boot_up_state=3,
                   power_supply_state=3, thermal_state=3, security_status=2, oem=0,
                   height=0, power_cords=0, contained_count=0, contained_length=0, sku=0),
    ]
    processor_id = (cpuid_signature | cpuid_features << 32).to_bytes(8, "little")
    for n in range(cpus):
        out.append(_structure(
            L.PROCESSOR, [f"CPU {n}", MANUFACTURER], type=4, handle=0x400 + n, socket=1,
            processor_type=3, family=1, manufacturer=2, processor_id=processor_id,
            version=0, voltage=0, external_clock=0, max_speed=2000, current_speed=2000,
            status=0x41, upgrade=1, l1_cache=NO_HANDLE, l2_cache=NO_HANDLE,
            l3_cache=NO_HANDLE, serial=0, asset_tag=0, part_number=0, core_count=1,
            core_enabled=1, thread_count=1, characteristics=0, family2=1))
    max_kib = total_mib << 10
    out.append(_structure(L.MEMORY_ARRAY, [], type=16, handle=0x1000, location=1, use=3,
                          error_correction=6,
                          maximum_capacity_kib=max_kib if max_kib < 1 << 31 else 1 << 31,
                          error_handle=NO_ERROR_INFO, devices=devices))
    left = total_mib
    for n in range(devices):
        size = min(left, DEVICE_MIB)
        left -= size
        out.append(_structure(L.MEMORY_DEVICE, [f"DIMM {n}"], type=17, handle=0x1100 + n,
                              array_handle=0x1000, error_handle=NO_ERROR_INFO,
                              total_width=64, data_width=64,
                              size_mib=size if size < 0x7FFF else 0x7FFF, form_factor=9,
                              device_set=0, locator=1, bank_locator=0, memory_type=7,
                              type_detail=2, speed=0, manufacturer=0, serial=0, asset_tag=0,
                              part_number=0))
    for n, (gpa, size) in enumerate(ram_regions):
        if gpa + size > FOUR_GIB * 1024:    # beyond what 32-bit KiB addresses say
            continue
        out.append(_structure(L.ARRAY_MAPPING, [], type=19, handle=0x1300 + n,
                              start_kib=gpa >> 10, end_kib=((gpa + size) >> 10) - 1,
                              array_handle=0x1000, partition_width=devices))
    out.append(_structure(L.BOOT_INFO, [], type=32, handle=0x2000, reserved=bytes(6),
                          boot_status=0))
    out.append(_structure(L.END, [], type=127, handle=0x7F00))
    tables = b"".join(out)
    anchor = L.ANCHOR_21.build(dict(
        checksum=0, length=L.ANCHOR_21.sizeof(), major=2, minor=8,
        max_structure_size=max(len(s) for s in out), revision=0, formatted_area=bytes(5),
        intermediate_checksum=0, table_length=len(tables), table_address=0,
        structures=len(out), bcd_revision=0x28))
    return _with_checksums(anchor), tables


def _with_checksums(anchor: bytes) -> bytes:
    """The intermediate checksum covers bytes 0x10.., the first covers the first 16."""
    a = bytearray(anchor)
    a[0x15] = -sum(a[0x10:]) & 0xFF
    a[4] = -sum(a[:0x10]) & 0xFF
    return bytes(a)


def parse(anchor: bytes, tables: bytes) -> list[tuple[int, bytes, list[bytes]]]:
    """[(type, formatted part, strings)] of a table set: for tests and tools."""
    ep = L.ANCHOR_21.parse(anchor)
    out, pos = [], 0
    for _ in range(ep.structures):
        h = L.HEADER.parse(tables[pos:pos + 4])
        body = tables[pos:pos + h.length]
        end = tables.index(b"\0\0", pos + h.length)
        strings = [s for s in tables[pos + h.length:end].split(b"\0") if s]
        out.append((h.type, body, strings))
        pos = end + 2
    if pos != len(tables) or pos != ep.table_length:
        raise ValueError("SMBIOS table length does not match its structures")
    return out
