"""Guest physical memory: RAM laid out around the PCI hole, with bounds-checked access.

Every access a device makes on behalf of the guest (DMA, descriptor reads, boot structures)
goes through GuestMemory, which refuses anything not entirely inside guest RAM, so a guest
cannot steer the VMM into host memory outside its RAM.
"""
from __future__ import annotations

import mmap
import os
from collections import namedtuple

from .errors import HvError

GiB = 1 << 30
MiB = 1 << 20
HUGE_PAGE = 2 * MiB            # x86's transparent huge page
DEFAULT_MEMORY = "256M"        # `hvframe run` without -m
FOUR_GIB = 4 * GiB
# Like bhyve, RAM below 4 GiB stops at 3 GiB; the top GiB is the PCI hole (MMIO BARs, ECAM,
# IOAPIC, LAPIC, firmware). RAM beyond that is placed above 4 GiB.
LOWMEM_LIMIT = 3 * GiB
PCI_HOLE_START = LOWMEM_LIMIT

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4


class GuestMemoryError(Exception):
    """A guest-physical range is not (entirely) backed by guest RAM."""


# gpa: guest-physical start; host_offset: offset into the single host mapping
class RamRegion(namedtuple("RamRegion", "gpa size host_offset")):
    __slots__ = ()

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """All guest RAM as one host mapping, split into guest-physical regions."""

    def __init__(self, size: int, lowmem_limit: int = LOWMEM_LIMIT, *, shared: bool = False):
        """shared: back RAM with a memfd (``fd``, the host mapping at offset 0 of it) that
        another process can map, as a device server does for DMA; otherwise anonymous
        private memory and ``fd`` is -1."""
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"memory size must be a positive multiple of {mmap.PAGESIZE}")
        self.size = size
        low = min(size, lowmem_limit)
        regions = [RamRegion(0, low, 0)]
        if size > low:
            regions.append(RamRegion(FOUR_GIB, size - low, low))
        self.regions: tuple[RamRegion, ...] = tuple(regions)
        self.lowmem_end = low
        self.highmem_end = regions[-1].end if len(regions) > 1 else 0
        self.fd = -1
        try:
            if shared:
                self.fd = os.memfd_create("hvframe-guest-ram", os.MFD_CLOEXEC)
                os.ftruncate(self.fd, size)
                self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
            else:
                self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                      | getattr(mmap, "MAP_NORESERVE", 0))
        except OSError as e:        # the host's overcommit policy or address-space limit
            if self.fd >= 0:
                os.close(self.fd)
            raise HvError(f"-m: cannot reserve {size >> 20} MiB of guest RAM on this host: "
                          f"{e.strerror}") from None
        # As QEMU does with guest RAM: transparent huge pages where the host allows them
        # (fewer TLB misses for the guest and for every device copy into its buffers), and
        # not inherited by a fork (a child would make every page copy-on-write).
        for advice in ("MADV_HUGEPAGE", "MADV_DONTFORK"):
            if hasattr(mmap, advice):
                try:
                    self._map.madvise(getattr(mmap, advice))
                except OSError:
                    pass
        self._view = memoryview(self._map)
        self.closed = False
        self.unmapped = False    # close() gave the mapping back (see close)

    # -- translation -----------------------------------------------------------------------
    def host_offset(self, gpa: int, length: int) -> int:
        """Offset in the host mapping of [gpa, gpa+length), which must lie in one RAM region."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r.host_offset + (gpa - r.gpa)
        if self.closed:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x}: guest memory is closed")
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self.host_offset(gpa, length)
            return True
        except GuestMemoryError:
            return False

    # -- access ----------------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM; raises GuestMemoryError unless all of it is RAM."""
        off = self.host_offset(gpa, length)
        return self._view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data) -> None:
        data = memoryview(data).cast("B")
        self.view(gpa, len(data))[:] = data

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 4), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.view(gpa, 4)[:] = (value & 0xFFFFFFFF).to_bytes(4, "little")

    def prefault(self, gpa: int, length: int) -> None:
        """Have the host back [gpa, gpa+length) now, its (huge) pages faulted in by a read
        from /dev/zero into one byte of each, which holds no GIL: the first touch of a huge
        page zeroes 2 MiB, milliseconds on a nested host, better spent off the main thread."""
        view = self.view(gpa, length)
        # One byte in each huge page the range touches: its start, then every boundary.
        offsets = [0, *range(-gpa % HUGE_PAGE or HUGE_PAGE, length, HUGE_PAGE)]
        fd = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for off in offsets:
                os.readv(fd, [view[off:off + 1]])
        finally:
            os.close(fd)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        v = self.view(gpa, length)
        v[:] = bytes([byte]) * length

    @property
    def buffer(self):
        """The host mapping (for registering with KVM and for native fast paths)."""
        return self._map

    def e820(self) -> list[tuple[int, int, int]]:
        """The memory map a PC guest is given: (address, length, type), sorted."""
        entries = [(0, 0x9FC00, E820_RAM), (0x9FC00, 0x400, E820_RESERVED),
                   (0xF0000, 0x10000, E820_RESERVED)]
        if self.lowmem_end > 0x100000:
            entries.append((0x100000, self.lowmem_end - 0x100000, E820_RAM))
        if len(self.regions) > 1:
            hi = self.regions[1]
            entries.append((hi.gpa, hi.size, E820_RAM))
        return entries

    def close(self) -> bool:
        """Give guest RAM back to the host; idempotent. Afterwards every access raises
        GuestMemoryError and ``buffer`` is a closed mapping (ffi.from_buffer and memoryview
        of it raise ValueError), so a late device path fails cleanly.

        Returns whether the mapping is gone. While someone still holds a view of it (a
        memoryview slice, an ffi.from_buffer export) it cannot be unmapped under them: its
        pages are dropped at once (MADV_DONTNEED: the RAM goes back to the host, a straggler
        reads zeros instead of crashing) and the mapping itself goes when the last holder
        lets go of it. ``unmapped`` says which happened."""
        if self.closed:
            return self.unmapped
        self.closed = True
        self.regions = ()                # host_offset() now refuses everything
        if self.fd >= 0:                 # the mapping keeps the memfd's pages while it lasts
            os.close(self.fd)
            self.fd = -1
        view, self._view = self._view, memoryview(b"")
        try:
            view.release()
        except BufferError:              # a buffer taken from the view itself: as below
            pass
        del view
        m, self._map = self._map, _CLOSED_MAP
        try:
            m.close()
            self.unmapped = True
        except BufferError:              # exported: free the pages, keep the addresses valid
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass
        return self.unmapped


def _closed_map() -> mmap.mmap:
    m = mmap.mmap(-1, mmap.PAGESIZE)
    m.close()
    return m


_CLOSED_MAP = _closed_map()   # what GuestMemory.buffer is once closed
