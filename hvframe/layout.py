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
    """Byte offset of field ``name`` in a fixed-size Struct (KeyError if it has none)."""
    return fields_of(st)[name][0]


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
