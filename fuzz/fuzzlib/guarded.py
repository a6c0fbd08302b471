"""Guest RAM with PROT_NONE guard pages around it, for the native paths.

hvframe's GuestMemory maps its RAM itself (one anonymous mmap, regions laid out back to back)
and has no parameter for a mapping made elsewhere. ``GuardedMemory`` is a GuestMemory whose
state is built here instead: one larger anonymous mapping, PROT_NONE everywhere except the
RAM regions, so the page before RAM, the page after it and one page *between* the low and the
high region are inaccessible. Python accesses are bounds-checked by GuestMemory as usual;
a native access (vq.c, vblk.c, ncq.c) that strays a byte past a region faults at once,
which is the finding.

A machine gets it by replacing ``machine.memory`` right after construction, before any
device is made (devices take ``machine.memory`` when they are built). That works because
nothing else holds the original GuestMemory yet; a proper hook would be a ``memory=``
argument to ``Machine.__init__`` (see fuzz/README.md).

Mappings are expensive to make and unmap safely while old views may linger, so each
(layout, slot) has one ``GuardedRam`` for the life of the process; ``fresh()`` zeroes it
(MADV_DONTNEED) and wraps it in a new GuardedMemory for the next input.
"""
from __future__ import annotations

import ctypes
import mmap as _mmap
import os

from hvframe.memory import FOUR_GIB, GuestMemory, RamRegion

PAGE = _mmap.PAGESIZE
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x20, 0x4000
MADV_DONTNEED = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class GuardedRam:
    """[guard][low region][guard][high region][guard] in one mapping (no high: one guard
    less). ``view`` covers everything from the low region to the end of the high one,
    the middle guard included (never touched from Python: no region translates there)."""

    def __init__(self, low: int, high: int = 0):
        if low <= 0 or low % PAGE or high < 0 or high % PAGE:
            raise ValueError("region sizes must be positive multiples of the page size")
        self.low, self.high = low, high
        self.inner = low + (PAGE + high if high else 0)
        self.total = self.inner + 2 * PAGE
        base = _libc.mmap(None, self.total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                          -1, 0)
        if base in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed")
        self.base = base
        self.low_host = base + PAGE
        _check(_libc.mprotect(self.low_host, low, PROT_READ | PROT_WRITE), "mprotect")
        self.high_host = None
        if high:
            self.high_host = base + 2 * PAGE + low
            _check(_libc.mprotect(self.high_host, high, PROT_READ | PROT_WRITE), "mprotect")
        self._array = (ctypes.c_ubyte * self.inner).from_address(self.low_host)
        self.view = memoryview(self._array).cast("B")
        self.regions = [RamRegion(0, low, 0)]
        if high:
            self.regions.append(RamRegion(FOUR_GIB, high, low + PAGE))

    def guard_pages(self) -> list[int]:
        """Host addresses of the PROT_NONE pages (for reports)."""
        out = [self.base, self.base + PAGE + self.inner]
        if self.high:
            out.append(self.low_host + self.low)
        return out

    def zero(self) -> None:
        _check(_libc.madvise(self.low_host, self.low, MADV_DONTNEED), "madvise")
        if self.high:
            _check(_libc.madvise(self.high_host, self.high, MADV_DONTNEED), "madvise")


class GuardedMemory(GuestMemory):
    """A GuestMemory over a GuardedRam (see the module docstring)."""

    def __init__(self, ram: GuardedRam):   # deliberately not GuestMemory.__init__
        self.ram = ram
        self.size = ram.inner               # the host mapping's length, as mem_size wants
        self.regions = tuple(ram.regions)
        self.lowmem_end = ram.low
        self.highmem_end = ram.regions[-1].end if ram.high else 0
        self._map = ram.view
        self._view = ram.view
        self.closed = False                 # (GuestMemory's close() bookkeeping)
        self.unmapped = False

    @property
    def buffer(self):
        return self.ram.view

    def close(self) -> bool:
        return False                        # the mapping lives as long as the process

    def snapshot(self) -> list[bytes]:
        """Every region's bytes (the guard gap is never read)."""
        return [bytes(self._view[r.host_offset:r.host_offset + r.size]) for r in self.regions]


_pool: dict[tuple, GuardedRam] = {}


def fresh(low: int, high: int = 0, slot: int = 0) -> GuardedMemory:
    """Zeroed guest RAM of this layout (one mapping per layout and slot, reused)."""
    key = (low, high, slot)
    ram = _pool.get(key)
    if ram is None:
        ram = _pool[key] = GuardedRam(low, high)
    else:
        ram.zero()
    return GuardedMemory(ram)
