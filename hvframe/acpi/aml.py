"""A small AML (ACPI Machine Language) encoder, ACPI 6.x chapter 20 and chapter 6.4.

Each function returns the encoded bytes of one AML term, so a definition block is written as
nested calls, e.g. ``scope("\\_SB", device("PCI0", name("_HID", eisaid("PNP0A03"))))``.
Resource descriptors (for _CRS) are declared with construct below and joined by
``resource_template``, which appends the End Tag and wraps the result in a Buffer.
"""
from __future__ import annotations

from ..packed import Declarations

# -- opcodes ------------------------------------------------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82          # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C
PARENT_PREFIX_CHAR = 0x5E
RETURN_OP = 0xA4
ONES_OP = 0xFF

_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class AmlError(ValueError):
    pass


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a package whose contents (after the PkgLength) are body_len bytes long.

    The encoded length counts the PkgLength bytes themselves. One byte holds up to 63; longer
    lengths take 2-4 bytes: bits 7:6 of the lead byte give the count of following bytes, its
    bits 3:0 the low nibble, each following byte the next 8 bits.
    """
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise AmlError(f"package of {body_len} bytes is too long for a PkgLength")


def nameseg(seg: str) -> bytes:
    seg = seg.upper()
    if not 1 <= len(seg) <= 4 or not set(seg) <= _NAME_CHARS or seg[0].isdigit():
        raise AmlError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def namestring(path: str) -> bytes:
    """NameString: optional '\\' or '^' prefixes, then dot-separated 1-4 character segments."""
    out = bytearray()
    i = 0
    if path.startswith("\\"):
        out.append(ROOT_CHAR)
        i = 1
    else:
        while path[i:i + 1] == "^":
            out.append(PARENT_PREFIX_CHAR)
            i += 1
    rest = path[i:]
    segs = [s for s in rest.split(".")] if rest else []
    if len(segs) == 0:
        out.append(0x00)                         # NullName
    elif len(segs) == 1:
        out += nameseg(segs[0])
    elif len(segs) == 2:
        out.append(DUAL_NAME_PREFIX)
        out += nameseg(segs[0]) + nameseg(segs[1])
    else:
        if len(segs) > 255:
            raise AmlError("name path has too many segments")
        out += bytes([MULTI_NAME_PREFIX, len(segs)])
        for s in segs:
            out += nameseg(s)
    return bytes(out)


def integer(value: int) -> bytes:
    """The smallest encoding of an integer constant."""
    if value < 0 or value >= 1 << 64:
        raise AmlError(f"integer {value} out of range")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == (1 << 64) - 1:
        return bytes([ONES_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + value.to_bytes(2, "little")
    if value <= 0xFFFFFFFF:
        return bytes([DWORD_PREFIX]) + value.to_bytes(4, "little")
    return bytes([QWORD_PREFIX]) + value.to_bytes(8, "little")


def string(s: str) -> bytes:
    raw = s.encode("ascii")
    if b"\0" in raw or any(c > 0x7F for c in raw):
        raise AmlError("AML strings are 7-bit ASCII without NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisaid(pnp: str) -> bytes:
    """EISAID("PNP0A03") as an integer: three 5-bit letters and a 16-bit hex product id,
    stored so that the bytes read in order are the big-endian compressed id."""
    if len(pnp) != 7 or not pnp[:3].isalpha() or not pnp[:3].isupper():
        raise AmlError(f"bad EISA id {pnp!r}")
    vendor = ((ord(pnp[0]) - 0x40) << 10) | ((ord(pnp[1]) - 0x40) << 5) | (ord(pnp[2]) - 0x40)
    product = int(pnp[3:], 16)
    be = (vendor << 16) | product
    return integer(int.from_bytes(be.to_bytes(4, "big"), "little"))


def _obj(value) -> bytes:
    """A data object: int -> Integer, str -> String, bytes -> already encoded term."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise AmlError(f"cannot encode {value!r} as an AML data object")


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + bytes(data)
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def package(*elements) -> bytes:
    if len(elements) > 255:
        raise AmlError("Package holds at most 255 elements (VarPackage not supported)")
    body = bytes([len(elements)]) + b"".join(_obj(e) for e in elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def name(path: str, value) -> bytes:
    return bytes([NAME_OP]) + namestring(path) + _obj(value)


def scope(path: str, *terms: bytes) -> bytes:
    body = namestring(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = namestring(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, nargs: int, *terms: bytes, serialized: bool = False, sync_level: int = 0) -> bytes:
    if not 0 <= nargs <= 7 or not 0 <= sync_level <= 15:
        raise AmlError("bad method flags")
    flags = nargs | (int(serialized) << 3) | (sync_level << 4)
    body = namestring(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def return_(value) -> bytes:
    return bytes([RETURN_OP]) + _obj(value)


# -- resource descriptors (ACPI 6.x section 6.4) --------------------------------------------
# Small items: tag byte = type << 3 | length.  Large items: 0x80 | type, then a 16-bit length
# of the rest.
def _declare():
    from construct import Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

    IoDescriptor = Struct(
        "tag" / Const(0x47, Int8ul),       # small type 0x08, length 7
        "decode16" / Int8ul,
        "min" / Int16ul,
        "max" / Int16ul,
        "alignment" / Int8ul,
        "length" / Int8ul,
    )

    IrqNoFlagsDescriptor = Struct(
        "tag" / Const(0x22, Int8ul),       # small type 0x04, length 2
        "mask" / Int16ul,
    )

    EndTagDescriptor = Struct(
        "tag" / Const(0x79, Int8ul),       # small type 0x0F, length 1
        "checksum" / Int8ul,
    )

    Memory32FixedDescriptor = Struct(
        "tag" / Const(0x86, Int8ul),
        "length" / Const(9, Int16ul),
        "info" / Int8ul,                   # bit 0: read-write
        "base" / Int32ul,
        "size" / Int32ul,
    )

    def _address_space_descriptor(tag: int, field):
        """Word/DWord/QWord Address Space Descriptors (ACPI 6.4.3.5): the same fields, at the
        width of `field`; the length counts the bytes after the 3-byte header."""
        return Struct(
            "tag" / Const(tag, Int8ul),
            "length" / Const(3 + 5 * field.sizeof(), Int16ul),
            "resource_type" / Int8ul,          # 0 memory, 1 I/O, 2 bus number
            "general_flags" / Int8ul,
            "type_flags" / Int8ul,
            "granularity" / field,
            "min" / field,
            "max" / field,
            "translation" / field,
            "range_length" / field,
        )

    WordAddressSpaceDescriptor = _address_space_descriptor(0x88, Int16ul)
    DWordAddressSpaceDescriptor = _address_space_descriptor(0x87, Int32ul)
    QWordAddressSpaceDescriptor = _address_space_descriptor(0x8A, Int64ul)
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr
L = LAYOUTS

RES_MEMORY, RES_IO, RES_BUS = 0, 1, 2
# General flags for a bridge's window: ResourceProducer (bit 0 clear), PosDecode (bit 1 clear),
# MinFixed (bit 2), MaxFixed (bit 3).
PRODUCER_FIXED = 0x0C
IO_ENTIRE_RANGE = 0x03          # I/O type flags: ISA and non-ISA ranges
MEM_RW_CACHEABLE = 0x03         # memory type flags: read-write, cacheable


def io(min_: int, max_: int, alignment: int, length: int) -> bytes:
    return L.IoDescriptor.build(dict(decode16=1, min=min_, max=max_, alignment=alignment, length=length))


def irq_noflags(*irqs: int) -> bytes:
    mask = 0
    for i in irqs:
        if not 0 <= i <= 15:
            raise AmlError(f"IRQ {i} is not an ISA IRQ")
        mask |= 1 << i
    return L.IrqNoFlagsDescriptor.build(dict(mask=mask))


def memory32_fixed(base: int, size: int, rw: bool = True) -> bytes:
    return L.Memory32FixedDescriptor.build(dict(info=int(rw), base=base, size=size))


def _addr(struct, rtype: int, tflags: int, min_: int, max_: int) -> bytes:
    if max_ < min_:
        raise AmlError(f"empty address range {min_:#x}-{max_:#x}")
    return struct.build(dict(resource_type=rtype, general_flags=PRODUCER_FIXED, type_flags=tflags,
                             granularity=0, min=min_, max=max_, translation=0,
                             range_length=max_ - min_ + 1))


def word_bus_number(min_: int, max_: int) -> bytes:
    return _addr(L.WordAddressSpaceDescriptor, RES_BUS, 0, min_, max_)


def dword_io(min_: int, max_: int) -> bytes:
    return _addr(L.DWordAddressSpaceDescriptor, RES_IO, IO_ENTIRE_RANGE, min_, max_)


def dword_memory(min_: int, max_: int) -> bytes:
    return _addr(L.DWordAddressSpaceDescriptor, RES_MEMORY, MEM_RW_CACHEABLE, min_, max_)


def qword_memory(min_: int, max_: int) -> bytes:
    return _addr(L.QWordAddressSpaceDescriptor, RES_MEMORY, MEM_RW_CACHEABLE, min_, max_)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(){...}: the descriptors and an End Tag (checksum 0) in a Buffer."""
    return buffer(b"".join(descriptors) + L.EndTagDescriptor.build(dict(checksum=0)))
