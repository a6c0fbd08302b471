"""Declared registers served natively: a device says what its registers are (a construct
Struct, the single source of truth for offsets and sizes) and how each behaves, and the
native core (hvframe/core_native/regblock.c) answers every access that needs no Python
without taking the GIL. The rest reaches the device's ordinary read()/write() handler.

    LAYOUT = Struct("data" / Int8ul, "ctrl" / Int8ul, "status" / Int8ul, "irq" / Int8ul)
    block = RegisterBlock(LAYOUT, {
        "data": Reg(Kind.FIFO, fifo="out"),                       # writes feed a ring
        "status": Reg(Kind.PY_VALUE, fifo="out", room_bits=0x20),  # bit 5: the ring has room
        "irq": Reg(Kind.W1C, reset=0),
    }, device, fifos={"out": Fifo(4096)}, name="dev")
    block.map(machine.pio, 0x500)
    FifoDrainer(block, "out", device.drain, name="dev-out").start()

Kinds (what an access of exactly the register's offset and size does natively):

=========  ===============================================  ==============================
kind       read                                             write
=========  ===============================================  ==============================
STORAGE    the stored value                                 stores the bits of write_mask
READ_ONLY  the stored value                                 ignored
W1C        the stored value                                 clears the write_mask bits
                                                            written as 1
PY_VALUE   the value Python keeps current (store/update)    Python
FIFO       Python                                           one entry into the FIFO (a data
                                                            port); full: per Fifo.when_full
PYTHON     Python                                           Python
=========  ===============================================  ==============================

Any register may show a FIFO's state in its reads (``fifo`` plus ``room_bits``, set while
the FIFO has room, and ``empty_bits``, set while it is empty): a status register whose
"transmitter ready" bits follow the ring its data port feeds, with no Python involved.
Offsets nobody declared, accesses of another size than the register's, and registers the
device has switched off with set_native() go to Python: a device keeps one handler that
knows the whole register file, and declares natively only what is plain.

Concurrency. Each block has one small mutex in C, the innermost lock of the process: every
native access and every call below (store, update, set_native, take, ...) holds it for a
few instructions, calls nothing and waits for nothing while holding it, and never holds it
across the call into Python. So two vCPUs writing at once, or the device updating a value
while a vCPU reads it, each see one access at a time; and once set_native(..., False)
returns no native access to those registers is in progress, which is how a device switches
a register to Python and takes over its state. These calls may be made with any device
lock held. No GIL is taken for a native access; cffi releases the GIL around the calls below.

A FIFO is bounded (``capacity`` entries) and never blocks the vCPU: when full, a write either
goes to the device's Python handler (``Full.PYTHON``; it may drain the ring itself, or drop
and count) or is dropped and counted natively (``Full.DROP``). Its consumer is a device
thread (FifoDrainer) that sleeps on an eventfd the pushing vCPU signals only when the
consumer said it sleeps.
"""
from __future__ import annotations

import enum
import time
from collections import namedtuple

from . import concurrency
from .core_native import ffi, lib
from .dispatch import Access, Bus, PythonHandle, Range
from .device import PortHandler
from .packed import Packed

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Iterable, Mapping

    from construct import Struct


class Kind(enum.IntEnum):
    STORAGE = lib.HV_REG_STORAGE
    READ_ONLY = lib.HV_REG_READ_ONLY
    W1C = lib.HV_REG_W1C
    PY_VALUE = lib.HV_REG_PY_VALUE
    FIFO = lib.HV_REG_FIFO
    PYTHON = lib.HV_REG_PYTHON


class Full(enum.IntEnum):
    """What a write to a full FIFO does."""
    PYTHON = lib.HV_FIFO_FULL_PYTHON    # goes to the device's Python handler
    DROP = lib.HV_FIFO_FULL_DROP        # dropped and counted (FifoCounts.dropped)


class Fifo(namedtuple("Fifo", "capacity when_full", defaults=(Full.PYTHON,))):
    """A bounded ring of ``capacity`` entries (a power of two), each as wide as the data port
    that feeds it. capacity: int; when_full: Full."""
    __slots__ = ()


class Reg(namedtuple("Reg", "kind reset write_mask fifo room_bits empty_bits native",
                     defaults=(0, None, None, 0, 0, True))):
    """One register's semantics (see the module docstring). ``write_mask`` None: all bits of
    the register. ``native`` False: served by Python until set_native() switches it on.
    kind: Kind; reset: int; write_mask: int or None; fifo: str or None (the Fifo's name);
    room_bits, empty_bits: int; native: bool."""
    __slots__ = ()


FifoCounts = namedtuple("FifoCounts", "pushed taken dropped")


class RegisterBlock:
    """A device's declared registers in the native core, for one bus range.

    ``layout`` gives every register's offset and size (a fixed-size construct Struct, or its
    compiled form from hvframe.packed, which spares a run the import of construct); ``regs``
    the semantics of those served natively, by field name; ``handler`` is the device's Python
    handler (read/write with offsets within the block), which gets every access the block
    does not answer itself."""

    def __init__(self, layout: Packed | Struct, regs: Mapping[str, Reg], handler: PortHandler, *,
                 fifos: Mapping[str, Fifo] | None = None, name: str = ""):
        self.name = name or type(handler).__name__
        self.layout = layout
        self.handler = handler
        if isinstance(layout, Packed):
            fields = layout.fields
        else:           # a construct Struct (a test's, a third party's): compiled here
            from .layout import fields_of
            fields = fields_of(layout)
        self.length = layout.sizeof()
        fifos = dict(fifos or {})
        if len(regs) > min(lib.HV_REGBLOCK_MAX_REGS, 64):
            raise ValueError(f"{self.name}: at most 64 native registers in one block")
        if len(fifos) > lib.HV_REGBLOCK_MAX_FIFOS:
            raise ValueError(f"{self.name}: at most {lib.HV_REGBLOCK_MAX_FIFOS} FIFOs")
        c = lib.hv_regblock_new(self.length, len(regs), len(fifos))
        if c == ffi.NULL:
            raise ValueError(f"{self.name}: a block of {self.length} bytes is too large")
        self._c = ffi.gc(c, lib.hv_regblock_free)
        self._fifo_index: dict[str, int] = {}
        self._fifo_width: dict[str, int] = {}
        widths = {r.fifo: fields[n][1] for n, r in regs.items()
                  if r.kind == Kind.FIFO and n in fields}
        for f, (fname, fifo) in enumerate(fifos.items()):
            if fname not in widths:
                raise ValueError(f"{self.name}: FIFO {fname!r} has no FIFO register feeding it")
            rc = lib.hv_regblock_def_fifo(self._c, f, fifo.capacity, widths[fname], fifo.when_full)
            if rc < 0:
                raise ValueError(f"{self.name}: bad FIFO {fname!r} ({fifo}): capacity must be "
                                 f"a power of two up to {lib.HV_FIFO_MAX_ENTRIES}")
            self._fifo_index[fname] = f
            self._fifo_width[fname] = widths[fname]
        self._reg_index: dict[str, int] = {}
        self._fifo_fed: set[str] = set()
        for i, (rname, reg) in enumerate(regs.items()):
            if rname not in fields:
                raise ValueError(f"{self.name}: {rname!r} is not a field of the layout")
            offset, size = fields[rname]
            full = (1 << (8 * size)) - 1
            mask = full if reg.write_mask is None else reg.write_mask
            for what, v in (("reset", reg.reset), ("write_mask", mask),
                            ("room_bits", reg.room_bits), ("empty_bits", reg.empty_bits)):
                if not 0 <= v <= full:
                    raise ValueError(f"{self.name}.{rname}: {what} {v:#x} does not fit {size} bytes")
            if reg.fifo is not None and reg.fifo not in self._fifo_index:
                raise ValueError(f"{self.name}.{rname}: no FIFO {reg.fifo!r}")
            if reg.kind == Kind.FIFO:
                if reg.fifo in self._fifo_fed:
                    raise ValueError(f"{self.name}: FIFO {reg.fifo!r} is fed by two registers")
                self._fifo_fed.add(reg.fifo)
            fifo = -1 if reg.fifo is None else self._fifo_index[reg.fifo]
            rc = lib.hv_regblock_def_reg(self._c, i, offset, size, int(reg.kind), fifo, reg.reset,
                                         mask, reg.room_bits, reg.empty_bits, int(reg.native))
            if rc < 0:
                raise ValueError(f"{self.name}.{rname}: cannot declare it at offset {offset} "
                                 f"size {size} (sizes 1, 2, 4, 8; a FIFO register feeds a "
                                 f"FIFO; FIFO bits need a FIFO)")
            self._reg_index[rname] = i
        self._handle: PythonHandle | None = None

    # ---- on a bus --------------------------------------------------------------------------

    def map(self, bus: Bus, base: int, access: Access | None = None) -> Range:
        """Serve [base, base + length) of bus: natively where declared, else by the handler;
        ``access``: the range's access rules (hvframe.dispatch.Access)."""
        if self._handle is not None:
            raise ValueError(f"{self.name}: already mapped")
        handle = PythonHandle(self.handler, self.name)
        lib.hv_regblock_set_handler(self._c, handle.handle)
        try:
            r = bus.register_native(base, self.length, lib.hv_regblock_access, self._c,
                                    name=self.name, fallback=handle, access=access)
        except BaseException:
            lib.hv_regblock_set_handler(self._c, -1)
            handle.drop()
            raise
        r.handler = self.handler   # the object answering the range, as for a Python range
        self._handle = handle
        return r

    # ---- the device's side -----------------------------------------------------------------

    def _reg(self, name: str) -> int:
        return self._reg_index[name]

    def read(self, name: str) -> int:
        """What a native read of the register returns now (FIFO bits included)."""
        return lib.hv_regblock_read(self._c, self._reg(name))

    def store(self, name: str, value: int) -> None:
        """Set the stored value (a PY_VALUE register's value, say)."""
        lib.hv_regblock_update(self._c, self._reg(name), 0xFFFFFFFFFFFFFFFF, value)

    def update(self, name: str, clear: int = 0, set: int = 0) -> int:
        """Clear, then set bits of the stored value in one step; the new value."""
        return lib.hv_regblock_update(self._c, self._reg(name), clear, set)

    def set_native(self, names: Iterable[str], on: bool) -> None:
        """Serve these registers natively (on) or by Python; all switched in one step, and
        no native access to them is in progress when this returns."""
        mask = 0
        for n in names:
            mask |= 1 << self._reg(n)
        lib.hv_regblock_set_native(self._c, mask, 1 if on else 0)

    def native(self, name: str) -> bool:
        return bool(lib.hv_regblock_native_mask(self._c) >> self._reg(name) & 1)

    @property
    def served(self) -> int:
        """Accesses answered natively so far."""
        return self._c.served

    @property
    def passed(self) -> int:
        """Accesses passed to the Python handler so far."""
        return self._c.passed

    # ---- FIFOs -----------------------------------------------------------------------------

    def take(self, fifo: str, max_entries: int = 4096) -> bytes:
        """Up to max_entries entries, oldest first, as little-endian bytes (width each)."""
        width = self._fifo_width[fifo]
        buf = ffi.new("uint8_t[]", max_entries * width)
        n = lib.hv_regblock_fifo_take(self._c, self._fifo_index[fifo], buf, max_entries)
        return ffi.buffer(buf, n * width)[:]

    def level(self, fifo: str) -> int:
        return lib.hv_regblock_fifo_level(self._c, self._fifo_index[fifo])

    def counts(self, fifo: str) -> FifoCounts:
        p = ffi.new("uint64_t[3]")
        lib.hv_regblock_fifo_counts(self._c, self._fifo_index[fifo], p, p + 1, p + 2)
        return FifoCounts(p[0], p[1], p[2])

    def wait(self, fifo: str, timeout: float | None) -> int:
        """(the FIFO's consumer) Wait until the FIFO holds an entry, up to timeout seconds
        (None: forever) or a kick(): its level, 0 on timeout or kick."""
        concurrency.may_block(f"{self.name} FIFO {fifo}")
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        n = lib.hv_regblock_fifo_wait(self._c, self._fifo_index[fifo], ms)
        if n < 0:
            raise OSError(-n, f"{self.name}: waiting for FIFO {fifo}")
        return n

    def kick(self, fifo: str) -> None:
        """Wake the FIFO's consumer out of wait()."""
        lib.hv_regblock_fifo_kick(self._c, self._fifo_index[fifo])

    def close(self) -> None:
        """Give back what the block holds besides memory (the FIFOs' eventfds), once their
        consumers have stopped; accesses still work (a full FIFO then goes to Python).
        Idempotent."""
        lib.hv_regblock_close(self._c)


class FifoDrainer:
    """The consumer of a native FIFO: a DeviceThread that waits until the FIFO holds entries
    and calls ``drain()`` (the device takes them, with whatever locks keep its output in
    order). After a batch it lingers ``linger`` seconds before the next wait, so a guest
    writing steadily fills the ring meanwhile and its vCPU pushes without waking anyone.
    stop() ends the thread; entries still in the ring are the owner's to drain."""

    POLL = 0.5      # seconds between checks of `stopping` should a kick be lost

    def __init__(self, block: RegisterBlock, fifo: str, drain: Callable[[], None], *,
                 name: str, linger: float = 0.002):
        self.block, self.fifo, self._drain, self.linger = block, fifo, drain, linger
        self._thread = concurrency.DeviceThread(name, self._run,
                                                wake=lambda: block.kick(fifo))

    def start(self) -> "FifoDrainer":
        self._thread.start()
        return self

    def _run(self, thread: concurrency.DeviceThread) -> None:
        while not thread.stopping:
            thread.checkpoint()
            if self.block.wait(self.fifo, self.POLL) and not thread.stopping:
                self._drain()
                if self.linger:
                    time.sleep(self.linger)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def pause(self) -> bool:
        """Stop draining until resume() (DeviceThread.pause: True once parked)."""
        return self._thread.pause()

    def resume(self) -> None:
        self._thread.resume()

    def stop(self, deadline: float = concurrency.JOIN_DEADLINE) -> bool:
        return self._thread.stop(deadline)


__all__ = ["Fifo", "FifoCounts", "FifoDrainer", "Full", "Kind", "Reg", "RegisterBlock"]
