"""Fast paths derived from construct declarations, the single source of truth for every
register file and in-memory structure: struct.Struct objects and field tables computed once,
at import time, so that hot paths never parse through construct."""
from __future__ import annotations

import struct

from construct import FormatField, Renamed, Struct


def fields_of(st: Struct) -> dict[str, tuple[int, int]]:
    """Field name -> (byte offset, size) in a fixed-size Struct; padding has no entry."""
    out, off = {}, 0
    for sc in st.subcons:
        size = sc.sizeof()
        if sc.name:
            out[sc.name] = (off, size)
        off += size
    return out


def offsets_of(st: Struct) -> dict[str, int]:
    """Field name -> byte offset in a fixed-size Struct (padding is skipped)."""
    return {name: off for name, (off, _) in fields_of(st).items()}


def offset_of(st: Struct, name: str) -> int:
    """Byte offset of field ``name`` in a Struct whose fields before it have fixed sizes (the
    rest may vary, e.g. a table with a GreedyRange tail); KeyError if it has no such field."""
    off = 0
    for sc in st.subcons:
        if sc.name == name:
            return off
        off += sc.sizeof()
    raise KeyError(name)


def struct_of(st: Struct) -> struct.Struct:
    """A little-endian struct.Struct with the same layout: numbers as themselves, named byte
    strings as 's', padding as 'x'."""
    codes = []
    for sc in st.subcons:
        field = sc.subcon if isinstance(sc, Renamed) else sc
        if isinstance(field, FormatField):
            if field.fmtstr[0] != "<":
                raise TypeError(f"{sc!r} is not little-endian")
            codes.append(field.fmtstr[1:])
        elif sc.name:
            codes.append(f"{sc.sizeof()}s")
        else:
            codes.append(f"{sc.sizeof()}x")
    s = struct.Struct("<" + "".join(codes))
    assert s.size == st.sizeof(), st
    return s


def tuple_indexes(st: Struct) -> dict[str, int]:
    """Where each named field lands in the tuple struct_of(st).unpack() returns (padding
    produces no item)."""
    return {sc.name: i for i, sc in enumerate(sc for sc in st.subcons if sc.name)}


# -- C declarations generated from the same declarations --------------------------------------
# Native fast paths (the core's and plugins') get their structs and constants from here at
# build time, so a layout changes in one place: see hvframe.native_build.

_C_TYPES = {"B": "uint8_t", "H": "uint16_t", "I": "uint32_t", "L": "uint32_t", "Q": "uint64_t",
            "b": "int8_t", "h": "int16_t", "i": "int32_t", "l": "int32_t", "q": "int64_t"}


def c_struct(name: str, st: Struct) -> str:
    """``struct name { ... };`` with the layout of a fixed-size little-endian Struct: numbers
    as (u)intN_t, named byte strings and padding as uint8_t arrays."""
    lines, pad = [], 0
    for sc in st.subcons:
        field = sc.subcon if isinstance(sc, Renamed) else sc
        if isinstance(field, FormatField):
            if field.fmtstr[0] != "<" or field.fmtstr[1:] not in _C_TYPES:
                raise TypeError(f"{name}.{sc.name}: no C type for {field.fmtstr!r}")
            lines.append(f"    {_C_TYPES[field.fmtstr[1:]]} {sc.name};")
        elif sc.name:
            lines.append(f"    uint8_t {sc.name}[{sc.sizeof()}];")
        else:
            lines.append(f"    uint8_t _pad{pad}[{sc.sizeof()}];")
            pad += 1
    return f"struct {name} {{\n" + "\n".join(lines) + "\n};\n"


def c_layouts(structs: dict[str, Struct], constants: dict[str, int]) -> tuple[str, str]:
    """(declarations, checks): the structs and ``#define``s, as text both the C compiler and
    cffi's cdef read, and C static assertions that each struct's size is the declared one
    (a field the C compiler would align differently fails the build, not a guest)."""
    decls = "".join(c_struct(n, st) for n, st in structs.items())
    decls += "".join(f"#define {k} {int(v)}\n" for k, v in constants.items())
    checks = "".join(f'_Static_assert(sizeof(struct {n}) == {st.sizeof()}, "{n} layout");\n'
                     for n, st in structs.items())
    return decls, checks
