"""Guest memory of a device server: the client's DMA regions, mapped from the descriptors
that came with VFIO_USER_DMA_MAP, seen by the device as a GuestMemory.

The device models and the native core take guest RAM as one host mapping with regions at
offsets in it (struct hv_ram), so one large address range is reserved up front (PROT_NONE,
no memory behind it) and each DMA region is mapped into it with MAP_FIXED at an offset of its
own. An unmapped region leaves the guest-physical map at once (every later access is refused
by host_offset) and its pages are replaced by private zero pages, not by a hole: a device
thread still finishing a request in it writes into scratch memory instead of faulting the
server, and the client's memory is no longer referenced.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading

from hvframe.memory import GuestMemory, GuestMemoryError, RamRegion

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
PROT_NONE = 0
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

RESERVE = 1 << 40          # address space for all regions together (no memory behind it)
ALIGN = 2 << 20            # regions start 2 MiB aligned in it (huge pages where the file has them)
PAGE = mmap.PAGESIZE


def _mmap(addr, length, prot, flags, fd=-1, offset=0) -> int:
    p = _libc.mmap(addr, length, prot, flags, fd, offset)
    if p is None or p == _MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return p


class DmaMemory(GuestMemory):
    """The client's DMA regions as guest memory (see the module docstring)."""

    def __init__(self, max_maps: int = 64):
        # Not GuestMemory.__init__: there is no anonymous RAM of our own.
        self.size = RESERVE
        self.max_maps = max_maps
        self._base = _mmap(None, RESERVE, PROT_NONE,
                           mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        self._map = (ctypes.c_ubyte * RESERVE).from_address(self._base)
        self._view = memoryview(self._map).cast("B")
        self.regions: tuple[RamRegion, ...] = ()
        self.lowmem_end = self.highmem_end = 0
        self.closed = False
        self.unmapped = False
        self._next = 0                       # bump allocator over the reservation
        self._lock = threading.Lock()        # map/unmap against each other (one client)

    # -- the DMA map -----------------------------------------------------------------------
    def map(self, fd: int, file_offset: int, gpa: int, size: int, writable: bool) -> None:
        """Map [gpa, gpa+size) from fd at file_offset. OSError(EEXIST) if it overlaps a
        mapping, EINVAL for a bad range, ENOSPC when there are too many or no room is left."""
        if size <= 0 or gpa % PAGE or size % PAGE or file_offset % PAGE or gpa + size > 1 << 64:
            raise OSError(errno.EINVAL, "DMA region not page aligned")
        with self._lock:
            if self.closed:
                raise OSError(errno.ENODEV, "memory closed")
            for r in self.regions:
                if gpa < r.end and r.gpa < gpa + size:
                    raise OSError(errno.EEXIST, f"DMA region overlaps {r.gpa:#x}+{r.size:#x}")
            if len(self.regions) >= self.max_maps:
                raise OSError(errno.ENOSPC, f"more than {self.max_maps} DMA regions")
            host = (self._next + ALIGN - 1) & ~(ALIGN - 1)
            if host + size > RESERVE:
                raise OSError(errno.ENOSPC, "DMA address space exhausted")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            _mmap(self._base + host, size, prot, mmap.MAP_SHARED | MAP_FIXED, fd, file_offset)
            self._next = host + size
            self.regions = tuple(sorted(self.regions + (RamRegion(gpa, size, host),),
                                        key=lambda r: r.gpa))
            self._update_ends()

    def unmap(self, gpa: int, size: int) -> None:
        """Drop the mapping that is exactly [gpa, gpa+size); OSError(ENOENT) if none is."""
        with self._lock:
            for r in self.regions:
                if r.gpa == gpa and r.size == size:
                    break
            else:
                raise OSError(errno.ENOENT, "no such DMA region")
            self.regions = tuple(x for x in self.regions if x is not r)
            self._update_ends()
            self._scrub(r)

    def unmap_all(self) -> None:
        with self._lock:
            regions, self.regions = self.regions, ()
            self._update_ends()
            for r in regions:
                self._scrub(r)

    def _scrub(self, r: RamRegion) -> None:
        _mmap(self._base + r.host_offset, r.size, mmap.PROT_READ | mmap.PROT_WRITE,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED)

    def _update_ends(self) -> None:
        self.lowmem_end = max((r.end for r in self.regions if r.end <= 1 << 32), default=0)
        self.highmem_end = max((r.end for r in self.regions if r.end > 1 << 32), default=0)

    # -- GuestMemory ------------------------------------------------------------------------
    def e820(self):
        raise GuestMemoryError("a device server has no memory map of its own")

    def close(self) -> bool:
        with self._lock:
            if self.closed:
                return self.unmapped
            self.closed = True
            self.regions = ()
            view, self._view = self._view, memoryview(b"")
            try:
                view.release()
            except BufferError:
                pass
            try:
                # Everything goes back; a straggler holding a view sees zero pages.
                _mmap(self._base, RESERVE, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED)
            except OSError:
                pass
            return False
