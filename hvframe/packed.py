"""Compiled layouts: construct declarations turned, once, into struct.Struct plans that a run
builds and parses with, so that an `hvframe run` never imports construct (about 40 ms, a
third of the start-up before the guest's first instruction).

construct stays the single source of truth. A module declares its layouts in a function and
hands it to ``Declarations``:

    def _declare():
        from construct import Int16ul, Struct
        Header = Struct("kind" / Int16ul, "length" / Int16ul)
        return locals()

    LAYOUTS = Declarations(__name__, __file__, _declare)
    __getattr__ = LAYOUTS.module_getattr      # module.Header: the construct declaration

``LAYOUTS.Header`` is then a ``Packed`` with construct's ``build``, ``parse`` and ``sizeof``
for the declarations hvframe uses (hvframe.layout.plan_of says which; tests check every
compiled layout against its declaration). The plans are compiled by hvframe.layout on the
first run after the declaring module changes, and kept in ``~/.cache/hvframe/layouts`` (or
``$XDG_CACHE_HOME``), keyed by the module's modification time and size as Python keys its
bytecode. A cache that cannot be read or written only costs that run the import of construct.

This module imports nothing beyond the standard library's struct, os, sys and marshal.
"""
from __future__ import annotations

import marshal
import os
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

# Bump when the plan format (hvframe.layout.plan_of) changes: old cache files are then ignored.
PLAN_VERSION = 1


class PackedError(ValueError):
    """Data that does not match a compiled layout (construct's ConstructError, for Packed)."""


class Record(dict):
    """A parsed structure: a dict whose fields can also be read as attributes, as construct's
    Container is."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _get(obj, path: tuple):
    for key in path:
        obj = obj[key]
    return obj


def _put(rec, path: tuple, value) -> None:
    """Set rec[path[0]][path[1]]... = value, making the Records (name keys) and lists (index
    keys) on the way."""
    for key, nxt in zip(path, path[1:]):
        if isinstance(rec, list):
            rec.extend([None] * (key + 1 - len(rec)))
            missing = rec[key] is None
        else:
            missing = key not in rec
        if missing:
            rec[key] = [] if isinstance(nxt, int) else Record()
        rec = rec[key]
    if isinstance(rec, list):
        rec.extend([None] * (path[-1] + 1 - len(rec)))
    rec[path[-1]] = value


class Packed:
    """One compiled Struct: a fixed part packed with one struct.Struct, and at most one
    variable member at the end (a repeated element, the rest of the bytes, or a body chosen by
    a field of the fixed part)."""

    __slots__ = ("name", "_st", "_items", "_tail", "fields", "_fixed", "_simple")

    def __init__(self, name: str, plan: tuple):
        kind, fmt, items, tail, fields = plan
        if kind != "S":
            raise PackedError(f"{name}: not a struct plan")
        self.name = name
        self._st = struct.Struct(fmt)
        self._items = items
        # Fields with a one-key path and no conversion are taken and stored directly.
        self._simple = all(len(p) == 1 and k == "n" for p, k, _ in items)
        self._tail = None
        if tail is not None:
            t = tail[0]
            if t == "R":
                self._tail = ("R", tail[1], _element(f"{name}.{tail[1]}", tail[2]))
            elif t == "G":
                self._tail = tail
            elif t == "W":
                bodies = {k: Packed(f"{name}.{tail[1]}[{k}]", p) for k, p in tail[3].items()}
                self._tail = ("W", tail[1], tail[2], bodies)
            else:
                raise PackedError(f"{name}: unknown tail {t!r}")
        # Field name -> (offset, size) of the fixed part's members (padding has no entry).
        self.fields: dict[str, tuple[int, int]] = {n: (o, s) for n, o, s in fields}
        self._fixed = self._st.size

    def __repr__(self) -> str:
        return f"<Packed {self.name}>"

    @property
    def struct(self) -> struct.Struct:
        """The fixed part as one struct.Struct, for a fast path's unpack_from and pack_into
        (little-endian; padding as 'x', byte strings as 's')."""
        return self._st

    def sizeof(self) -> int:
        if self._tail is not None:
            raise PackedError(f"{self.name} has no fixed size")
        return self._fixed

    def case(self, key) -> "Packed":
        """The body the trailing switch chooses for ``key``."""
        if self._tail is None or self._tail[0] != "W" or key not in self._tail[3]:
            raise PackedError(f"{self.name} has no case {key!r}")
        return self._tail[3][key]

    # -- build -------------------------------------------------------------------------------
    def build(self, obj) -> bytes:
        if self._simple:
            try:
                vals = [obj[p[0]] for p, _, _ in self._items]
            except KeyError as e:
                raise PackedError(f"{self.name}: no value for {e.args[0]!r}") from None
        else:
            vals = []
            for path, kind, arg in self._items:
                if kind == "c":
                    vals.append(arg)
                    continue
                try:
                    v = _get(obj, path)
                except (KeyError, IndexError, TypeError):
                    raise PackedError(f"{self.name}: no value for {'.'.join(map(str, path))}") from None
                if kind == "s":
                    v = v.encode("ascii")
                    if len(v) > arg:
                        raise PackedError(f"{self.name}.{path[-1]}: {v!r} is longer than {arg} bytes")
                elif kind == "b":
                    if len(v) != arg:
                        raise PackedError(f"{self.name}.{path[-1]}: {len(v)} bytes, expected {arg}")
                elif kind == "f":
                    v = bool(v)
                vals.append(v)
        try:
            out = self._st.pack(*vals)
        except struct.error as e:
            raise PackedError(f"{self.name}: {e}") from None
        if self._tail is None:
            return out
        t = self._tail
        if t[0] == "R":
            elem = t[2]
            return out + b"".join(elem.build(v) for v in obj[t[1]])
        if t[0] == "G":
            return out + bytes(obj[t[1]])
        body = t[3].get(_get(obj, (t[2],)))
        if body is None:
            raise PackedError(f"{self.name}: no body for {t[2]}={_get(obj, (t[2],))!r}")
        return out + body.build(obj[t[1]])

    # -- parse -------------------------------------------------------------------------------
    def parse(self, data) -> Record:
        rec, used = self._parse(data, 0)
        return rec

    def _parse(self, data, offset: int) -> tuple[Record, int]:
        try:
            vals = self._st.unpack_from(data, offset)
        except struct.error as e:
            raise PackedError(f"{self.name}: {e}") from None
        rec = Record()
        for (path, kind, arg), v in zip(self._items, vals):
            if kind == "s":
                v = v.rstrip(b"\0").decode("ascii", "replace")
            elif kind == "c" and v != arg:
                raise PackedError(f"{self.name}.{path[-1]}: {v!r}, expected {arg!r}")
            if len(path) == 1:
                rec[path[0]] = v
            else:
                _put(rec, path, v)
        pos = offset + self._fixed
        t = self._tail
        if t is None:
            return rec, pos
        if t[0] == "G":
            rec[t[1]] = bytes(data[pos:])
            return rec, len(data)
        if t[0] == "R":
            items, elem = [], t[2]
            while pos < len(data):
                try:
                    v, pos = elem._parse(data, pos)
                except PackedError:
                    break       # as GreedyRange: what does not parse ends the range
                items.append(v)
            rec[t[1]] = items
            return rec, pos
        body = t[3].get(rec[t[2]])
        if body is None:
            raise PackedError(f"{self.name}: no body for {t[2]}={rec[t[2]]!r}")
        rec[t[1]], pos = body._parse(data, pos)
        return rec, pos


class _Number:
    """A repeated number (GreedyRange of a FormatField)."""

    __slots__ = ("_st",)

    def __init__(self, code: str):
        self._st = struct.Struct(code)

    def build(self, v) -> bytes:
        try:
            return self._st.pack(v)
        except struct.error as e:
            raise PackedError(str(e)) from None

    def _parse(self, data, offset):
        try:
            return self._st.unpack_from(data, offset)[0], offset + self._st.size
        except struct.error as e:
            raise PackedError(str(e)) from None


def _element(name: str, plan: tuple):
    return _Number(plan[1]) if plan[0] == "N" else Packed(name, plan)


class declared_later:
    """A class attribute holding a construct declaration (a device's ``state_layout``, say),
    made the first time it is read (a snapshot, a test), so that importing the class does
    not import construct:

        @declared_later
        def state_layout():
            from construct import Int8ul, Struct
            return Struct("value" / Int8ul)
    """

    def __init__(self, declare: Callable[[], Any]):
        self._declare = declare
        self._value = None
        self.__doc__ = declare.__doc__

    def __get__(self, obj, owner=None):
        if self._value is None:
            self._value = self._declare()     # two threads racing make equal declarations
        return self._value


# -- the cache -----------------------------------------------------------------------------------

def cache_dir() -> str | None:
    """Where plans are kept; None when there is no home to keep them in (no HOME and no
    passwd entry leave "~" as it is): never a directory relative to where the run started.
    A relative XDG_CACHE_HOME is ignored, as the XDG spec says."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None
    return os.path.join(base, "hvframe", "layouts")


_COMPILER_FILES: tuple | None = None


def _compiler_files() -> tuple:
    # The compiler's own sources and construct's are part of the key: a change in either (an
    # upgrade of construct, say) recompiles every plan. Found once, without importing it.
    global _COMPILER_FILES
    if _COMPILER_FILES is None:
        from importlib.util import find_spec
        here = os.path.dirname(__file__)
        spec = find_spec("construct")
        construct_init = spec.origin if spec is not None and spec.origin else ""
        _COMPILER_FILES = (os.path.join(here, "packed.py"), os.path.join(here, "layout.py"),
                           construct_init)
    return _COMPILER_FILES


def _fnv1a(data: bytes) -> int:
    # A stable 32-bit hash for a file name (hash() is salted per process; zlib costs an import).
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def _stamp(paths) -> tuple:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


class Declarations:
    """A module's construct declarations, evaluated only when asked for, and their compiled
    forms (``Packed``), read from the cache when it is current."""

    def __init__(self, modname: str, filename: str, declare: Callable[[], dict[str, Any]]):
        self._modname = modname
        self._filename = filename
        self._declare = declare
        self._constructs: dict[str, Any] | None = None
        self._plans: dict[str, tuple] | None = None
        self._packed: dict[str, Packed] = {}

    # -- the construct declarations (tests, snapshots, tools) ---------------------------------
    def constructs(self) -> dict[str, Any]:
        """The declarations: what ``declare()`` returns (its ``locals()``, say), less private
        names and the construct names it imported."""
        if self._constructs is None:
            import construct
            self._constructs = {k: v for k, v in self._declare().items()
                                if not k.startswith("_") and vars(construct).get(k) is not v}
        return self._constructs

    def module_getattr(self, name: str):
        """For the declaring module's ``__getattr__``: its construct declarations by name."""
        if name.startswith("_"):     # the import system's probes (__path__, say): not ours
            raise AttributeError(f"module {self._modname!r} has no attribute {name!r}")
        c = self.constructs()
        if name in c:
            return c[name]
        raise AttributeError(f"module {self._modname!r} has no attribute {name!r}")

    # -- compiled ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Packed:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._packed[name]
        except KeyError:
            pass
        plans = self._load_plans()
        if name not in plans:
            raise AttributeError(f"{self._modname} declares no compiled layout {name!r}")
        p = self._packed[name] = Packed(name, plans[name])
        return p

    def _key(self) -> tuple | None:
        # The module's path is part of the key: the cache is per user, not per checkout as
        # __pycache__ is, and two checkouts' copies can have equal stamps (cp -a, rsync -a, a
        # reproducible build's fixed mtimes) yet declare different layouts. None (nothing is
        # cached) when a source cannot be looked at (an install without its .py files).
        try:
            stamps = _stamp((self._filename, *_compiler_files()))
        except OSError:
            return None
        return (PLAN_VERSION, sys.version_info[:2], os.path.abspath(self._filename), stamps)

    def _cache_path(self) -> str | None:
        # One file per checkout (a hash of the module's directory), so that runs from two
        # worktrees do not keep compiling over each other's plans.
        where = _fnv1a(os.path.abspath(os.path.dirname(self._filename)).encode())
        base = cache_dir()
        if base is None:
            return None
        name = f"{self._modname}.{where:08x}.{sys.implementation.cache_tag}.plans"
        return os.path.join(base, name)

    def _load_plans(self) -> dict[str, tuple]:
        if self._plans is not None:
            return self._plans
        key = self._key()
        path = self._cache_path() if key is not None else None
        try:
            if path is None:
                raise FileNotFoundError("no cache directory")
            with open(path, "rb") as f:
                cached_key, plans = marshal.loads(f.read())    # load(f) reads byte by byte
            if cached_key == key and isinstance(plans, dict):
                self._plans = plans
                return plans
        except (OSError, EOFError, ValueError, TypeError):
            pass          # missing, unreadable or corrupt: compile again
        from .layout import plan_of     # imports construct: the one slow path
        plans = {}
        for name, con in self.constructs().items():
            plan = plan_of(con)
            if plan is not None:
                plans[name] = plan
        self._plans = plans
        if path is not None:
            self._store(path, key, plans)
        return plans

    @staticmethod
    def _store(path: str, key: tuple, plans: dict) -> None:
        # Two threads reaching a layout first both compile and store it: a temporary file of
        # each one's own, so neither moves the other's half-written one into place.
        import threading
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(marshal.dumps((key, plans)))
            os.replace(tmp, path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
