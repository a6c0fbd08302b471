"""PVH direct boot: load an ELF's PT_LOAD segments and describe the guest in hvm_start_info
(Xen public ABI, arch-x86/hvm/start_info.h), entered at XEN_ELFNOTE_PHYS32_ENTRY with %ebx
pointing at the start_info."""
from __future__ import annotations

from ..errors import ConfigError
from ..memory import GuestMemory
from ..packed import Declarations
from .common import (CMDLINE_ADDR, CMDLINE_MAX, PVH_INFO_ADDR, PVH_INFO_END, ZERO_PAGE_END,
                     BootState, align_up, encode_cmdline, load_initrd, overlaps)
from .elf import PT_LOAD, ElfFile

HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1       # version 1 adds the memory map


def _declare():
    from construct import Const, Int32ul, Int64ul, Struct

    HvmStartInfo = Struct(
        "magic" / Const(HVM_START_MAGIC, Int32ul),
        "version" / Int32ul,
        "flags" / Int32ul,
        "nr_modules" / Int32ul,
        "modlist_paddr" / Int64ul,
        "cmdline_paddr" / Int64ul,
        "rsdp_paddr" / Int64ul,
        "memmap_paddr" / Int64ul,    # version >= 1
        "memmap_entries" / Int32ul,  # version >= 1
        "reserved" / Int32ul,
    )

    HvmModlistEntry = Struct(
        "paddr" / Int64ul,
        "size" / Int64ul,
        "cmdline_paddr" / Int64ul,
        "reserved" / Int64ul,
    )

    HvmMemmapEntry = Struct(
        "addr" / Int64ul,
        "size" / Int64ul,
        "type" / Int32ul,
        "reserved" / Int32ul,
    )
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr

# Everything PVH lives in the page at 0x6000: start_info, then one module slot, then the map.
START_INFO_ADDR = PVH_INFO_ADDR
MODLIST_ADDR = align_up(START_INFO_ADDR + LAYOUTS.HvmStartInfo.sizeof(), 0x20)
MEMMAP_ADDR = align_up(MODLIST_ADDR + LAYOUTS.HvmModlistEntry.sizeof(), 0x20)
MEMMAP_MAX = (PVH_INFO_END - MEMMAP_ADDR) // LAYOUTS.HvmMemmapEntry.sizeof()


def load_segments(memory: GuestMemory, elf: ElfFile, path: str, cmdline_end: int) -> list[tuple[int, int]]:
    """Copy every PT_LOAD to p_paddr and zero its bss; returns the [start, end) ranges used."""
    used = []
    for i, ph in enumerate(elf.phdrs):
        if ph.p_type != PT_LOAD or ph.p_memsz == 0:
            continue
        start, end = ph.p_paddr, ph.p_paddr + ph.p_memsz
        where = f"kernel: {path}: segment {i} at {start:#x}+{ph.p_memsz:#x}"
        if ph.p_filesz > ph.p_memsz:
            raise ConfigError(f"{where} has file size {ph.p_filesz:#x} larger than its memory size")
        if ph.p_offset + ph.p_filesz > len(elf.data):
            raise ConfigError(f"{where} extends past the end of the file")
        if not memory.contains(start, ph.p_memsz):
            raise ConfigError(f"{where} is outside guest RAM (low RAM ends at {memory.lowmem_end:#x})")
        # The VMM's own boot structures (GDT, start_info, zero page, command line) live there.
        if overlaps(start, end, 0, ZERO_PAGE_END) or overlaps(start, end, CMDLINE_ADDR, cmdline_end):
            raise ConfigError(f"{where} overlaps the VMM boot area (below {ZERO_PAGE_END:#x} "
                              f"or the command line at {CMDLINE_ADDR:#x})")
        memory.write(start, elf.data[ph.p_offset:ph.p_offset + ph.p_filesz])
        memory.fill(start + ph.p_filesz, ph.p_memsz - ph.p_filesz)
        used.append((start, end))
    if not used:
        raise ConfigError(f"kernel: {path} has no loadable (PT_LOAD) segments")
    return used


def load_pvh(memory: GuestMemory, elf: ElfFile, entry: int, path: str, cmdline: str,
             initrd_path: str | None, e820: list[tuple[int, int, int]], rsdp_paddr: int = 0) -> BootState:
    if entry >= 1 << 32:
        raise ConfigError(f"kernel: {path}: PVH entry {entry:#x} is above 4 GiB")
    if len(e820) > MEMMAP_MAX:
        raise ConfigError(f"memory map has {len(e820)} entries; PVH boot supports at most {MEMMAP_MAX}")
    cmd = encode_cmdline(cmdline, CMDLINE_MAX - 1)
    used = load_segments(memory, elf, path, CMDLINE_ADDR + len(cmd))
    if not any(s <= entry < e for s, e in used):
        raise ConfigError(f"kernel: {path}: PVH entry {entry:#x} is not inside any loaded segment")
    memory.write(CMDLINE_ADDR, cmd)

    memory.fill(PVH_INFO_ADDR, PVH_INFO_END - PVH_INFO_ADDR)
    nr_modules = 0
    if initrd_path is not None:
        # The initrd goes as high as possible in low RAM (below 4 GiB, which the 32-bit entry can
        # reach), clear of the kernel segments.
        addr, size = load_initrd(memory, e820, initrd_path, memory.lowmem_end, used)
        memory.write(MODLIST_ADDR, LAYOUTS.HvmModlistEntry.build(dict(paddr=addr, size=size, cmdline_paddr=0,
                                                               reserved=0)))
        nr_modules = 1
    for i, (addr, size, kind) in enumerate(e820):
        memory.write(MEMMAP_ADDR + i * LAYOUTS.HvmMemmapEntry.sizeof(),
                     LAYOUTS.HvmMemmapEntry.build(dict(addr=addr, size=size, type=kind, reserved=0)))
    memory.write(START_INFO_ADDR, LAYOUTS.HvmStartInfo.build(dict(
        version=HVM_START_VERSION, flags=0,
        nr_modules=nr_modules, modlist_paddr=MODLIST_ADDR if nr_modules else 0,
        cmdline_paddr=CMDLINE_ADDR, rsdp_paddr=rsdp_paddr,
        memmap_paddr=MEMMAP_ADDR, memmap_entries=len(e820), reserved=0)))
    return BootState(rip=entry, regs={"rbx": START_INFO_ADDR},
                     description=f"PVH ELF{elf.bits} {path} entry {entry:#x}")
