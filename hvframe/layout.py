"""Fast paths derived from construct declarations, the single source of truth for every
register file and in-memory structure: struct.Struct objects and field tables computed once,
at import time, so that hot paths never parse through construct."""
from __future__ import annotations

import re
import struct

from construct import (Array, Bytes, Const, Flag, FormatField, GreedyBytes, GreedyRange, Padded,
                       Pass, Rebuild, Renamed, StringEncoded, Struct, Switch)


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


# -- compiled plans for hvframe.packed ---------------------------------------------------------
# A plan is plain data (tuples, dicts, str, bytes, int) that marshal can store: see
# hvframe.packed.Packed for how it is built and parsed with. Only what hvframe's declarations
# use is compiled; anything else makes plan_of return None (that layout stays construct-only,
# and asking for its compiled form is an error a test sees).

class NotCompilable(TypeError):
    pass


def _padded_string_length(c) -> int | None:
    # PaddedString(n, "ascii") is StringEncoded(FixedSized(n, NullStripped(GreedyBytes))).
    if isinstance(c, StringEncoded) and c.encoding == "ascii":
        fixed = c.subcon
        if type(fixed).__name__ == "FixedSized" and isinstance(fixed.length, int) \
                and type(fixed.subcon).__name__ == "NullStripped" and fixed.subcon.pad == b"\0":
            return fixed.length
    return None


def _this_field(keyfunc) -> str:
    m = re.fullmatch(r"this\['(\w+)'\]", repr(keyfunc))
    if not m:
        raise NotCompilable(f"switch on {keyfunc!r}")
    return m.group(1)


def _member(c, path: tuple, fmt: list, items: list) -> None:
    """Append one fixed-size member's struct codes and items."""
    if c.parsed is not None:
        raise NotCompilable(f"{path}: parse hooks")
    if isinstance(c, Renamed):
        _member(c.subcon, path, fmt, items)
    elif isinstance(c, FormatField):
        if c.fmtstr[0] != "<":
            raise NotCompilable(f"{path}: {c.fmtstr!r} is not little-endian")
        fmt.append(c.fmtstr[1:])
        items.append((path, "n", None))
    elif isinstance(c, Rebuild) and isinstance(c.subcon, FormatField):
        # The value is computed by a function of the declaration: the caller supplies it.
        _member(c.subcon, path, fmt, items)
    elif isinstance(c, Const):
        if isinstance(c.subcon, FormatField):
            fmt.append(c.subcon.fmtstr[1:])
        elif isinstance(c.subcon, Bytes) and isinstance(c.subcon.length, int):
            fmt.append(f"{c.subcon.length}s")
        else:
            raise NotCompilable(f"{path}: const of {c.subcon!r}")
        items.append((path, "c", c.value))
    elif isinstance(c, Padded) and c.subcon is Pass and c.pattern == b"\0" \
            and isinstance(c.length, int):
        fmt.append(f"{c.length}x")
    elif isinstance(c, Bytes) and isinstance(c.length, int):
        fmt.append(f"{c.length}s")
        items.append((path, "b", c.length))
    elif c is Flag:
        fmt.append("?")
        items.append((path, "f", None))
    elif (n := _padded_string_length(c)) is not None:
        fmt.append(f"{n}s")
        items.append((path, "s", n))
    elif isinstance(c, Array) and isinstance(c.count, int) and not c.discard:
        for i in range(c.count):
            _member(c.subcon, path + (i,), fmt, items)
    elif isinstance(c, Struct):
        for sc in c.subcons:
            _member(sc, path + (sc.name,) if sc.name else path, fmt, items)
    else:
        raise NotCompilable(f"{path}: {c!r}")


def _struct_plan(st: Struct) -> tuple:
    fmt, items, fields, tail = ["<"], [], [], None
    off = 0
    for i, sc in enumerate(st.subcons):
        last = i == len(st.subcons) - 1
        c = sc.subcon if isinstance(sc, Renamed) else sc
        if last and sc.name and isinstance(c, GreedyRange) and not c.discard:
            tail = ("R", sc.name, _element_plan(c.subcon))
        elif last and sc.name and c is GreedyBytes:
            tail = ("G", sc.name)
        elif last and sc.name and isinstance(c, Switch):
            cases = {k: _struct_plan(v) for k, v in c.cases.items() if isinstance(v, Struct)}
            if len(cases) != len(c.cases):
                raise NotCompilable(f"{sc.name}: a case that is not a Struct")
            tail = ("W", sc.name, _this_field(c.keyfunc), cases)
        else:
            _member(sc, (sc.name,) if sc.name else (), fmt, items)
            size = struct.calcsize("".join(fmt)) - off
            if sc.name:
                fields.append((sc.name, off, size))
            off += size
    items = tuple((p, k, a) for p, k, a in items)
    return ("S", "".join(fmt), items, tail, tuple(fields))


def _element_plan(c) -> tuple:
    if isinstance(c, FormatField) and c.fmtstr[0] == "<":
        return ("N", c.fmtstr)
    if isinstance(c, Struct):
        return _struct_plan(c)
    raise NotCompilable(f"range of {c!r}")


def plan_of(con) -> tuple | None:
    """The compiled plan of a Struct declaration, or None if it uses what plans cannot say."""
    if not isinstance(con, Struct):
        return None
    try:
        return _struct_plan(con)
    except NotCompilable:
        return None
