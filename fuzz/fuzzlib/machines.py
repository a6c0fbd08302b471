"""Machines, disk images and guest-value decoding shared by the targets."""
from __future__ import annotations

import atexit
import functools
import inspect
import os
import shutil
import tempfile

from hvframe.memory import FOUR_GIB
from hvframe.synthetic import SyntheticMachine

from . import guarded
from .provider import Encoder, Provider

_workdir: str | None = None


def workdir() -> str:
    """A private temporary directory for disk images (removed at exit)."""
    global _workdir
    if _workdir is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _workdir = tempfile.mkdtemp(prefix="hvframe-fuzz-", dir=base)
        atexit.register(shutil.rmtree, _workdir, True)
    return _workdir


def image(name: str, data: bytes) -> str:
    """A disk image file with exactly `data` in it (rewritten for every input)."""
    path = os.path.join(workdir(), name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def open_backend(path: str, **kw):
    """BlockBackend.open without image locking where the block layer has it (every input
    reopens the same scratch image; the previous one is closed, but a lock is not needed)."""
    from hvframe.block.backend import BlockBackend
    if "locking" in inspect.signature(BlockBackend.open).parameters:
        kw.setdefault("locking", False)
    return BlockBackend.open(path, **kw)


@functools.lru_cache(maxsize=16)
def pattern(nbytes: int, seed: int = 7) -> bytes:
    return bytes((i * seed + i // 512) & 0xFF for i in range(nbytes))


def synthetic_machine(low: int, high: int = 0, slot: int = 0, **kw) -> SyntheticMachine:
    """A SyntheticMachine whose RAM is guarded (fuzzlib.guarded), zeroed."""
    m = SyntheticMachine(guarded.PAGE, **kw)
    m.memory.close()
    m.memory = guarded.fresh(low, high, slot)
    return m


def teardown(m) -> None:
    """Close the machine and take its ranges off the dispatch core: Machine.close() leaves
    them registered, and the C handler table would keep every input's devices alive."""
    try:
        m.close()
    finally:
        for bus in (m.pio, m.mmio):
            for r in bus.ranges():
                try:
                    bus.unregister(r.base)
                except KeyError:
                    pass


# -- PCI configuration mechanism #1 ------------------------------------------------------------

def cf8(bus: int, slot: int, func: int, reg: int) -> int:
    return 0x80000000 | bus << 16 | slot << 11 | func << 8 | (reg & 0xFC)


def cfg_read(m, slot: int, reg: int, size: int = 4, func: int = 0, bus: int = 0) -> int:
    m.io_write(0xCF8, 4, cf8(bus, slot, func, reg))
    return m.io_read(0xCFC + (reg & 3), size)


def cfg_write(m, slot: int, reg: int, size: int, value: int, func: int = 0, bus: int = 0) -> None:
    m.io_write(0xCF8, 4, cf8(bus, slot, func, reg))
    m.io_write(0xCFC + (reg & 3), size, value)


# -- guest addresses and lengths --------------------------------------------------------------
# Raw 64-bit addresses almost never land in a small guest's RAM; a kind byte steers them into
# each region, to a region's last bytes (where a one-byte overrun hits a guard page) or to
# interesting places outside RAM.

SPECIAL_ADDRS = (0, 0xFFFFFFFFFFFFFFF0, 0xFFFFFFFFFFFFFFFF, FOUR_GIB - 16, FOUR_GIB - 1,
                 0xFEE00000, 0xE0000000, 0xC0000000, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFF)
ADDR_RAW, ADDR_LOW, ADDR_HIGH, ADDR_LOW_END, ADDR_HIGH_END, ADDR_SPECIAL = 0, 1, 4, 5, 6, 7


def addr(p: Provider, mem) -> int:
    kind = p.u8() & 7
    low = mem.lowmem_end
    high = mem.highmem_end - FOUR_GIB if mem.highmem_end else 0
    if kind == ADDR_RAW:
        return p.u64()
    if kind in (1, 2, 3):
        return p.u32() % low
    if kind == ADDR_HIGH:
        v = p.u32()
        return FOUR_GIB + v % high if high else v % low
    if kind == ADDR_LOW_END:
        return low - 1 - p.u16() % 512
    if kind == ADDR_HIGH_END:
        end = mem.highmem_end or low
        return end - 1 - p.u16() % 512
    return SPECIAL_ADDRS[p.u8() % len(SPECIAL_ADDRS)]


def ram_write(mem, gpa: int, data: bytes) -> None:
    """A guest write the harness makes; skipped where it is not RAM."""
    if mem.contains(gpa, len(data)):
        mem.write(gpa, data)


def raw_ram(p: Provider, mem, most: int = 64) -> None:
    """Up to `most` raw bytes at a steered address (skipped where it is not RAM)."""
    ram_write(mem, addr(p, mem), p.ConsumeBytes(p.u8() % (most + 1)))


def cfg_access(p: Provider, m, slot: int) -> None:
    """A configuration-space read or write of any register and size through 0xcf8/0xcfc."""
    reg = p.u8()
    size = p.PickValueInList((1, 2, 4))
    if p.ConsumeBool():
        cfg_write(m, slot, reg, size, p.u32() & ((1 << 8 * size) - 1))
    else:
        cfg_read(m, slot, reg, size)


def enc_addr(e: Encoder, a: int, low: int, high: int = 0) -> Encoder:
    if 0 <= a < low:
        return e.u8(ADDR_LOW).u32(a)
    if high and FOUR_GIB <= a < FOUR_GIB + high:
        return e.u8(ADDR_HIGH).u32(a - FOUR_GIB)
    return e.u8(ADDR_RAW).u64(a)


def length(p: Provider) -> int:
    kind = p.u8() & 3
    if kind == 0:
        return p.u32()
    if kind == 1:
        return p.u8()
    if kind == 2:
        return 512 * (p.u8() % 17)
    return p.u16()


def enc_length(e: Encoder, n: int) -> Encoder:
    if n < 256:
        return e.u8(1).u8(n)
    if n % 512 == 0 and n // 512 <= 16:
        return e.u8(2).u8(n // 512)
    if n < 65536:
        return e.u8(3).u16(n)
    return e.u8(0).u32(n)
