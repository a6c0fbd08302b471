"""Address-range buses over the native dispatch core, and the Python handler trampoline.

A Bus wraps a C `hv_bus`: sorted, non-overlapping ranges, each served by a native function
or a Python handler object (read(offset, size) / write(offset, size, value)). Python
handlers are reached from C with a small integer handle, so the per-exit path is:
C lookup -> the handler's bound read/write method (vectorcall) -> back to C.

A handler that raises never takes the VMM down: the access is answered as if nothing were
there (reads all ones), and the error is reported once per device.
"""
from __future__ import annotations

import enum
import errno
import os
import sys
from collections import namedtuple

from .core_native import ffi, lib
from .errors import ConfigError
from . import concurrency

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping

# Handle -> device name, for error reports. The C core holds the handlers' bound read/write
# methods itself (set by hv_py_set_handler, which takes its own references).
_names: list[str] = []
_free: list[int] = []
_reported: set = set()
_table_lock = concurrency.lock(concurrency.LEAF, "dispatch handler table")


def _add_handler(handler: Any, name: str) -> int:
    with _table_lock:
        if _free:
            h = _free.pop()
            _names[h] = name
        else:
            h = len(_names)
            _names.append(name)
        # Locals keep the bound methods alive until the C table has taken its references.
        read, write = handler.read, handler.write
        if lib.hv_py_set_handler(h, id(read), id(write)) < 0:
            raise MemoryError("handler table")
        return h


def _drop_handler(h: int) -> None:
    with _table_lock:
        lib.hv_py_set_handler(h, 0, 0)
        _names[h] = ""
        _free.append(h)


# Called with (device name, offset, is_write, exception) for every exception that escapes a
# handler, before the once-per-kind report: hvframe.testing's pytest plugin fails the test.
failure_listeners: list[Callable[[str, int, bool, BaseException], None]] = []


def _handler_failed(handle: int, offset: int, is_write: int, exc: BaseException) -> None:
    """An exception escaped a device handler: report it once per device and kind of error.
    The C core answers the access like an empty bus (reads all ones)."""
    name = _names[handle] if 0 <= handle < len(_names) else "?"
    for listener in list(failure_listeners):
        listener(name, offset, bool(is_write), exc)
    key = (name, type(exc), bool(is_write))
    if key in _reported:
        return
    _reported.add(key)
    print(f"hvframe: device {name} failed on {'write' if is_write else 'read'} at offset "
          f"{offset:#x}: {type(exc).__name__}: {exc} (answered as unclaimed; further errors "
          f"of this kind are not shown)", file=sys.stderr)
    if os.environ.get("HVFRAME_DEBUG"):
        import traceback
        traceback.print_exception(exc)


lib.hv_py_set_failed(id(_handler_failed))


class PythonHandle:
    """A Python handler in the C core's table without a range of its own: for native code
    that passes some accesses on to Python (a register block, hvframe.regblock). ``handle``
    is what the C side calls it by; drop() takes it out of the table."""

    def __init__(self, handler: Any, name: str):
        self.name = name
        self.handle = _add_handler(handler, name)

    def drop(self) -> None:
        if self.handle >= 0:
            _drop_handler(self.handle)
            self.handle = -1


class Partial(enum.IntEnum):
    """What a write that covers only part of a handler's unit (a field, or the smallest size
    it takes) becomes."""
    DROP = lib.HV_PARTIAL_DROP     # ignored (and counted): registers that mean nothing in part
    MERGE = lib.HV_PARTIAL_MERGE   # read the unit, merge the written bytes, write it whole
    ZERO = lib.HV_PARTIAL_ZERO     # write the unit with the untouched bytes zero (W1C, W1S)


# offset, size: int; partial: Partial
Field = namedtuple("Field", "offset size partial", defaults=(Partial.MERGE,))

# sizes: tuple[int, ...]; aligned: bool; partial: Partial; fields: tuple[Field, ...]
_AccessRecord = namedtuple("_AccessRecord", "sizes aligned partial fields",
                           defaults=((1, 2, 4, 8), False, Partial.DROP, ()))


class Access(_AccessRecord):
    """The accesses a range's handler takes, as QEMU's MemoryRegionOps.impl says it: the bus
    turns every guest access into those, so the handler has no byte-lane code.

    sizes: the access sizes the handler takes as they come; aligned: only naturally aligned.
    An access of another size or alignment is cut into the largest aligned pieces of those
    sizes; a piece smaller than all of them widens to the aligned unit around it (reads
    extract their bytes, writes follow ``partial``). With ``fields``, accesses are instead cut
    at the fields' bounds, so the handler sees each field whole; bytes between fields read
    zero and writes to them are ignored.

    A merged partial write is a read and a write of the handler's unit, not one atomic step:
    two vCPUs writing different bytes of one unit at the same moment can lose one write,
    where hardware would keep both. Only the guest's own register is affected, never the
    VMM; a handler that must not lose such bits takes whole-unit writes only (sizes without
    1 and 2) or uses Partial.ZERO with write-1 semantics.
    """
    __slots__ = ()

    def __new__(cls, sizes: tuple[int, ...] = (1, 2, 4, 8), aligned: bool = False,
                partial: Partial = Partial.DROP, fields: tuple[Field, ...] = ()) -> "Access":
        if not sizes or any(s not in (1, 2, 4, 8) for s in sizes):
            raise ValueError(f"access sizes must be among 1, 2, 4, 8: {sizes}")
        end = 0
        for f in fields:
            if f.size not in (1, 2, 4, 8) or f.offset < end:
                raise ValueError(f"fields must be 1/2/4/8 bytes, sorted, not overlapping: {f}")
            end = f.offset + f.size
        return super().__new__(cls, sizes, aligned, partial, fields)

    @classmethod
    def of_struct(cls, st, *, partial: Partial = Partial.MERGE,
                  overrides: Mapping[str, Partial] | None = None) -> "Access":
        """Fields from a construct Struct's fixed-size members (the declaration is the
        layout), or from its compiled form (hvframe.packed.Packed, which spares a run the
        import of construct); ``overrides`` gives single fields another partial-write rule."""
        from .packed import Packed
        if isinstance(st, Packed):
            table = st.fields
        else:
            from .layout import fields_of
            table = fields_of(st)
        overrides = dict(overrides or {})
        fields = []
        for name, (off, size) in sorted(table.items(), key=lambda kv: kv[1][0]):
            if name.startswith("_") or size not in (1, 2, 4, 8):
                continue   # padding and arrays are not registers
            fields.append(Field(off, size, overrides.pop(name, partial)))
        if overrides:
            raise ValueError(f"no such fields: {sorted(overrides)}")
        return cls(fields=tuple(fields))

    def check(self, length: int, name: str) -> None:
        """Units never cross the range's end."""
        if self.fields and self.fields[-1].offset + self.fields[-1].size > length:
            raise ConfigError(f"{name}: access fields run past the range's {length} bytes")
        if not self.fields and length % min(self.sizes):
            raise ConfigError(f"{name}: a {length}-byte range cannot be accessed in "
                              f"{min(self.sizes)}-byte units")


def _c_access(access: Access):
    """The C form of an Access (kept alive by the caller as long as any range may use it)."""
    c = ffi.new("struct hv_access *")
    c.sizes = sum(access.sizes)
    c.aligned = access.aligned
    c.partial = access.partial
    if access.fields:
        arr = ffi.new("struct hv_field[]", len(access.fields))
        for i, f in enumerate(access.fields):
            arr[i].off, arr[i].size, arr[i].partial = f.offset, f.size, f.partial
        c.fields, c.nfields = arr, len(access.fields)
        return c, arr
    return c, None


class Range:
    """A registered range: its handler (Python handle, or -1 for native with its function
    fn and opaque), what the native handler passes to Python (fallback), and its Access."""
    __slots__ = ("base", "length", "name", "handler", "handle", "fn", "opaque", "fallback",
                 "access", "c_access")

    def __init__(self, base: int, length: int, name: str, handler: Any, handle: int,
                 fn: Any = None, opaque: Any = None, fallback: "PythonHandle | None" = None,
                 access: Access | None = None, c_access: Any = None):
        self.base, self.length, self.name, self.handler = base, length, name, handler
        self.handle, self.fn, self.opaque, self.fallback = handle, fn, opaque, fallback
        self.access, self.c_access = access, c_access

    def __repr__(self) -> str:
        return f"Range({self.name!r}, {self.base:#x}+{self.length:#x})"

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """One address space (port I/O or MMIO) of a machine."""

    def __init__(self, kind: str):
        self.kind = kind
        self._c = ffi.gc(lib.hv_bus_new(), lib.hv_bus_free)
        self._ranges: dict[int, Range] = {}
        self._lock = concurrency.lock(concurrency.MACHINE, f"{kind} bus ranges")
        # C access rules by Access, kept for the bus's life: a vCPU may still be inside an
        # access that copied a range's pointer when the range goes away.
        self._c_access: dict[Access, tuple] = {}

    @property
    def c_bus(self):
        return self._c

    def _fmt(self, base: int, length: int) -> str:
        return f"{base:#x}-{base + length - 1:#x}"

    def _rules(self, access: Access | None, length: int, name: str):
        if access is None:
            return ffi.NULL
        access.check(length, name)
        if access not in self._c_access:
            self._c_access[access] = _c_access(access)
        return self._c_access[access][0]

    def _add(self, base, length, name, handler, handle, fn, opaque, access=None) -> Range:
        c_access = self._rules(access, length, name)
        rc = lib.hv_bus_add(self._c, base, length, handle, fn, opaque, c_access)
        if rc == -errno.EEXIST:
            other = self.find_overlap(base, length)
            raise ConfigError(f"{name}: {self.kind} range {self._fmt(base, length)} overlaps "
                              f"{other.name} at {self._fmt(other.base, other.length)}")
        if rc < 0:
            raise ConfigError(f"{name}: bad {self.kind} range {base:#x}+{length:#x}")
        r = Range(base, length, name, handler, handle, fn, opaque, access=access,
                  c_access=c_access)
        self._ranges[base] = r
        return r

    def register(self, base: int, length: int, handler: Any, name: str = "",
                 access: Access | None = None) -> Range:
        """Route [base, base+length) to a Python handler; overlap raises ConfigError.
        ``access``: the accesses the handler takes (default: every access as it came)."""
        name = name or type(handler).__name__
        with self._lock:
            h = _add_handler(handler, name)
            try:
                return self._add(base, length, name, handler, h, ffi.NULL, ffi.NULL, access)
            except Exception:
                _drop_handler(h)
                raise

    def register_native(self, base: int, length: int, fn, opaque=ffi.NULL, name: str = "",
                        fallback: PythonHandle | None = None,
                        access: Access | None = None) -> Range:
        """Route a range to a C handler (an `hv_native_fn` from the core or another cffi module).
        ``fallback``: the Python handler that C handler passes accesses to, if any; it is
        dropped with the range."""
        with self._lock:
            r = self._add(base, length, name or "native", None, -1, fn, opaque, access)
            r.fallback = fallback
            return r

    def unregister(self, base: int) -> None:
        with self._lock:
            r = self._ranges.pop(base, None)
            if r is None:
                raise KeyError(f"no {self.kind} range at {base:#x}")
            lib.hv_bus_remove(self._c, base)
            if r.handle >= 0:
                _drop_handler(r.handle)
            if r.fallback is not None:
                r.fallback.drop()

    def move(self, old_base: int, new_base: int) -> None:
        """Re-map a range at a new base (a guest reprogramming a BAR)."""
        with self._lock:
            r = self._ranges[old_base]
            if new_base == old_base:
                return
            lib.hv_bus_remove(self._c, old_base)
            acc = r.c_access if r.c_access is not None else ffi.NULL
            rc = lib.hv_bus_add(self._c, new_base, r.length, r.handle, r.fn, r.opaque, acc)
            if rc < 0:  # leave it where it was
                lib.hv_bus_add(self._c, old_base, r.length, r.handle, r.fn, r.opaque, acc)
                raise ConfigError(f"{r.name}: cannot move to {self._fmt(new_base, r.length)}")
            del self._ranges[old_base]
            r.base = new_base
            self._ranges[new_base] = r

    def close(self) -> None:
        """Unregister every range (their Python handlers leave the C core's table)."""
        for r in self.ranges():
            self.unregister(r.base)

    def find(self, addr: int) -> Range | None:
        for r in self._ranges.values():
            if r.base <= addr < r.end:
                return r
        return None

    def find_overlap(self, base: int, length: int) -> Range | None:
        for r in self._ranges.values():
            if r.base < base + length and base < r.end:
                return r
        return None

    def ranges(self) -> list[Range]:
        return sorted(self._ranges.values(), key=lambda r: r.base)

    @property
    def unclaimed(self) -> int:
        return self._c.unclaimed

    # One access through the C dispatch path (what an exit does); for tests and tools.
    def read(self, addr: int, size: int) -> int:
        return lib.hv_bus_dispatch(self._c, addr, size, 0, 0)

    def write(self, addr: int, size: int, value: int) -> None:
        lib.hv_bus_dispatch(self._c, addr, size, value, 1)
