"""PCI configuration space: the type-0 header layout and a 4 KiB byte array with write masks.

The `construct` declarations below are the only place header offsets are written down;
`FIELDS` (name -> (offset, size)) is derived from them, so code never spells a magic offset.

A ConfigSpace answers guest accesses of size 1, 2 or 4 at any offset. Each byte has a write
mask (bits the guest may change) and a write-1-to-clear mask (status bits the guest clears by
writing ones). Accesses outside the space (past 256 bytes for a conventional function, past
4 KiB for an express one) read all ones and are ignored, never raising: a guest can probe
anything.
"""
from __future__ import annotations

from ..packed import Declarations

CONVENTIONAL_SIZE = 256
EXTENDED_SIZE = 4096
HEADER_SIZE = 64


def _declare():
    from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

    # Type-0 (endpoint) configuration header, PCI Local Bus Specification 3.0 section 6.1.
    TYPE0_HEADER = Struct(
        "vendor_id" / Int16ul,
        "device_id" / Int16ul,
        "command" / Int16ul,
        "status" / Int16ul,
        "revision_id" / Int8ul,
        "prog_if" / Int8ul,
        "subclass" / Int8ul,
        "class_code" / Int8ul,
        "cache_line_size" / Int8ul,
        "latency_timer" / Int8ul,
        "header_type" / Int8ul,
        "bist" / Int8ul,
        "bar0" / Int32ul,
        "bar1" / Int32ul,
        "bar2" / Int32ul,
        "bar3" / Int32ul,
        "bar4" / Int32ul,
        "bar5" / Int32ul,
        "cardbus_cis" / Int32ul,
        "subsystem_vendor_id" / Int16ul,
        "subsystem_id" / Int16ul,
        "expansion_rom" / Int32ul,
        "capabilities_ptr" / Int8ul,
        "reserved" / Bytes(7),
        "interrupt_line" / Int8ul,
        "interrupt_pin" / Int8ul,
        "min_gnt" / Int8ul,
        "max_lat" / Int8ul,
    )

    # Every capability in the list starts with these two bytes.
    CAPABILITY_HEADER = Struct(
        "cap_id" / Int8ul,
        "next" / Int8ul,
    )
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr

FIELDS: dict[str, tuple[int, int]] = LAYOUTS.TYPE0_HEADER.fields
CAP_FIELDS: dict[str, tuple[int, int]] = LAYOUTS.CAPABILITY_HEADER.fields
assert sum(s for _, s in FIELDS.values()) == HEADER_SIZE == LAYOUTS.TYPE0_HEADER.sizeof()

BAR_OFFSETS = tuple(FIELDS[f"bar{i}"][0] for i in range(6))
ROM_OFFSET = FIELDS["expansion_rom"][0]
COMMAND_OFFSET = FIELDS["command"][0]
STATUS_OFFSET = FIELDS["status"][0]
CAP_PTR_OFFSET = FIELDS["capabilities_ptr"][0]
CAP_HEADER_SIZE = LAYOUTS.CAPABILITY_HEADER.sizeof()

# Command register bits.
CMD_IO = 1 << 0
CMD_MEMORY = 1 << 1
CMD_BUS_MASTER = 1 << 2
CMD_PARITY = 1 << 6
CMD_SERR = 1 << 8
CMD_INTX_DISABLE = 1 << 10
CMD_WRITABLE = CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | CMD_PARITY | CMD_SERR | CMD_INTX_DISABLE

# Status register bits.
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
# Error bits the guest clears by writing 1: master data parity error, signaled/received target
# abort, received master abort, signaled system error, detected parity error.
STATUS_W1C = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15)

HEADER_TYPE_MULTIFUNCTION = 0x80

_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


def all_ones(size: int) -> int:
    return _ONES.get(size, (1 << (8 * max(size, 0))) - 1)


class ConfigSpace:
    """One function's configuration space with per-byte guest write masks."""

    def __init__(self, extended: bool = False):
        self.size = EXTENDED_SIZE if extended else CONVENTIONAL_SIZE
        self.data = bytearray(EXTENDED_SIZE)
        self.wmask = bytearray(EXTENDED_SIZE)   # bits the guest may write
        self.w1c = bytearray(EXTENDED_SIZE)     # bits the guest clears by writing 1

    def _inside(self, offset: int, size: int) -> bool:
        return size in (1, 2, 4) and 0 <= offset and offset + size <= self.size

    # -- guest accesses -------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if not self._inside(offset, size):
            return all_ones(size)
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> bool:
        """A guest write through the masks; returns False (and changes nothing) if outside."""
        if not self._inside(offset, size):
            return False
        data, wmask, w1c = self.data, self.wmask, self.w1c
        for i in range(size):
            o = offset + i
            b = (value >> (8 * i)) & 0xFF
            old = data[o]
            data[o] = ((old & ~wmask[o]) | (b & wmask[o])) & ~(b & w1c[o]) & 0xFF
        return True

    # -- the device model's own accesses (no masks) ----------------------------------------
    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = (value & all_ones(size)).to_bytes(size, "little")

    def set_mask(self, offset: int, size: int, mask: int, w1c: int = 0) -> None:
        self.wmask[offset:offset + size] = (mask & all_ones(size)).to_bytes(size, "little")
        self.w1c[offset:offset + size] = (w1c & all_ones(size)).to_bytes(size, "little")

    def mask_at(self, offset: int, size: int) -> int:
        return int.from_bytes(self.wmask[offset:offset + size], "little")

    def __getitem__(self, name: str) -> int:
        off, size = FIELDS[name]
        return self.get(off, size)

    def __setitem__(self, name: str, value: int) -> None:
        off, size = FIELDS[name]
        self.put(off, size, value)

    def header(self):
        """The header parsed (for tools and tests)."""
        return LAYOUTS.TYPE0_HEADER.parse(bytes(self.data[:HEADER_SIZE]))

    def capabilities(self) -> list[tuple[int, int]]:
        """Walk the capability list: [(offset, cap_id)], stopping at loops or bad pointers."""
        out: list[tuple[int, int]] = []
        if not self["status"] & STATUS_CAP_LIST:
            return out
        ptr, seen = self["capabilities_ptr"] & 0xFC, set()
        while ptr and ptr not in seen and HEADER_SIZE <= ptr <= CONVENTIONAL_SIZE - CAP_HEADER_SIZE:
            seen.add(ptr)
            cap = LAYOUTS.CAPABILITY_HEADER.parse(bytes(self.data[ptr:ptr + CAP_HEADER_SIZE]))
            out.append((ptr, cap.cap_id))
            ptr = cap.next & 0xFC
        return out
