"""Shared pieces of the direct-boot loaders: BootState, the boot memory layout, file reading and
placement of the initrd in free guest RAM."""
from __future__ import annotations

import os

from ..errors import ConfigError
from ..memory import E820_RAM, GuestMemory

PAGE = 0x1000

# VMM-wide direct-boot layout (low memory). 0x0-0xfff belongs to the VMM (boot GDT at 0x500).
VMM_RESERVED = (0x0, 0x1000)
PVH_INFO_ADDR = 0x6000        # hvm_start_info, module list, memory map: all inside 0x6000-0x6fff
PVH_INFO_END = 0x7000
ZERO_PAGE_ADDR = 0x7000       # bzImage boot_params (4 KiB)
ZERO_PAGE_END = 0x8000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 64 << 10        # cap for any kernel: keeps the command line inside 0x20000-0x2ffff
KERNEL_MIN_ADDR = 0x100000    # nothing is loaded below 1 MiB except the boot structures
INITRD_MIN_ADDR = 0x100000


class BootState:
    """Where a loaded kernel is entered: rip (32-bit entry: flat protected mode, paging off,
    IF=0), the registers its boot protocol sets, and what was loaded."""
    __slots__ = ("rip", "regs", "description")

    def __init__(self, rip: int, regs: dict[str, int] | None = None, description: str = ""):
        self.rip = rip
        self.regs = {} if regs is None else regs
        self.description = description

    def __repr__(self) -> str:
        return f"BootState(rip={self.rip:#x}, regs={self.regs!r}, description={self.description!r})"


def align_up(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


def align_down(v: int, a: int) -> int:
    return v & ~(a - 1)


def human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def read_file(what: str, path: str, limit: int) -> bytes:
    """Whole file, refusing (before reading) anything larger than `limit` bytes."""
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise ConfigError(f"{what}: {path} ({human(size)}) is too big for guest RAM ({human(limit)})")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def encode_cmdline(cmdline: str, limit: int) -> bytes:
    """The command line as stored in guest memory (NUL terminated); `limit` excludes the NUL."""
    if "\0" in cmdline:
        raise ConfigError("cmdline: must not contain a NUL character")
    data = cmdline.encode("utf-8")
    if len(data) > limit:
        raise ConfigError(f"cmdline: {len(data)} bytes is too long (the kernel accepts at most {limit})")
    return data + b"\0"


def overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


def place_high(memory: GuestMemory, e820: list[tuple[int, int, int]], size: int, limit: int,
               busy: list[tuple[int, int]], low: int = INITRD_MIN_ADDR) -> int | None:
    """Highest page-aligned address A with [A, A+size) in e820 RAM, backed by guest memory,
    within [low, limit) and clear of every busy [start, end) range; None if there is none."""
    best = None
    for addr, length, kind in e820:
        if kind != E820_RAM:
            continue
        free = [(max(addr, low), min(addr + length, limit))]
        for b0, b1 in busy:
            nxt = []
            for f0, f1 in free:
                if not overlaps(f0, f1, b0, b1):
                    nxt.append((f0, f1))
                    continue
                if f0 < b0:
                    nxt.append((f0, b0))
                if b1 < f1:
                    nxt.append((b1, f1))
            free = nxt
        for f0, f1 in free:
            start = align_down(f1 - size, PAGE)
            if start >= f0 and memory.contains(start, max(size, 1)):
                if best is None or start > best:
                    best = start
    return best


def load_initrd(memory: GuestMemory, e820, path: str, limit: int,
                busy: list[tuple[int, int]]) -> tuple[int, int]:
    """Read the initrd and copy it as high as possible below `limit`; returns (address, size)."""
    data = read_file("initrd", path, memory.size)
    addr = place_high(memory, e820, len(data), limit, busy)
    if addr is None:
        raise ConfigError(f"initrd: {path} ({human(len(data))}) does not fit in free guest RAM "
                          f"below {limit:#x} after the kernel")
    memory.write(addr, data)
    return addr, len(data)
