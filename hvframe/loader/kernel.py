"""load_kernel: recognise the kernel format and hand it to the matching loader."""
from __future__ import annotations

from ..errors import ConfigError
from ..memory import GuestMemory
from .bzimage import is_bzimage, load_bzimage
from .common import BootState, read_file
from .elf import ELFMAG, ElfFile, ElfFormatError
from .elfnote import find_pvh_entry
from .pvh import load_pvh


def load_kernel(memory: GuestMemory, kernel_path: str, *, cmdline: str = "",
                initrd_path: str | None = None,
                e820: list[tuple[int, int, int]] | None = None, rsdp_paddr: int = 0) -> BootState:
    """Load a PVH ELF or a bzImage (plus command line and initrd) into guest memory and return
    where and how to start it. Every problem is a one-line ConfigError. rsdp_paddr, when the
    VMM built ACPI tables, is handed to the kernel (PVH start_info / boot_params)."""
    if e820 is None:
        e820 = memory.e820()
    data = read_file("kernel", kernel_path, memory.size)
    if data[:4] == ELFMAG:
        try:
            elf = ElfFile(data)
        except ElfFormatError as e:
            raise ConfigError(f"kernel: {kernel_path} is a malformed ELF file: {e}") from None
        entry = find_pvh_entry(data)
        if entry is not None:
            return load_pvh(memory, elf, entry, kernel_path, cmdline, initrd_path, e820, rsdp_paddr)
    elif is_bzimage(data):
        return load_bzimage(memory, data, kernel_path, cmdline, initrd_path, e820, rsdp_paddr)
    raise ConfigError(f"kernel: {kernel_path} is neither a PVH ELF (no XEN_ELFNOTE_PHYS32_ENTRY note) "
                      "nor a bzImage")
