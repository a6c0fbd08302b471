"""find_pvh_entry: the PVH 32-bit entry point recorded in an ELF image's Xen notes."""
from __future__ import annotations

from .elf import ElfFile, ElfFormatError

XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18


def find_pvh_entry(data: bytes) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY value (4- or 8-byte little-endian desc) of an ELF32/ELF64
    image, looked for in PT_NOTE segments and SHT_NOTE sections; None if `data` is not such an
    ELF or carries no usable note."""
    try:
        elf = ElfFile(data)
        for note in elf.notes():
            if (note.name == XEN_NOTE_NAME and note.type == XEN_ELFNOTE_PHYS32_ENTRY
                    and len(note.desc) in (4, 8)):
                return int.from_bytes(note.desc, "little")
    except ElfFormatError:
        return None
    return None
