"""ELF file headers, program headers, section headers and notes (little-endian, ELF32/ELF64),
declared with construct, plus a small bounds-checked reader for the parts the loader needs."""
from __future__ import annotations

from collections import namedtuple

from ..packed import Declarations, PackedError

ELFMAG = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
SHT_NOTE = 7
PN_XNUM = 0xFFFF

def _declare():
    from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

    ElfIdent = Struct(
        "magic" / Const(ELFMAG),
        "ei_class" / Int8ul,
        "ei_data" / Int8ul,
        "ei_version" / Int8ul,
        "ei_osabi" / Int8ul,
        "ei_abiversion" / Int8ul,
        "ei_pad" / Bytes(7),
    )

    def _ehdr(word):
        return Struct(
            "e_ident" / ElfIdent,
            "e_type" / Int16ul,
            "e_machine" / Int16ul,
            "e_version" / Int32ul,
            "e_entry" / word,
            "e_phoff" / word,
            "e_shoff" / word,
            "e_flags" / Int32ul,
            "e_ehsize" / Int16ul,
            "e_phentsize" / Int16ul,
            "e_phnum" / Int16ul,
            "e_shentsize" / Int16ul,
            "e_shnum" / Int16ul,
            "e_shstrndx" / Int16ul,
        )

    Elf32_Ehdr = _ehdr(Int32ul)
    Elf64_Ehdr = _ehdr(Int64ul)

    Elf32_Phdr = Struct(
        "p_type" / Int32ul,
        "p_offset" / Int32ul,
        "p_vaddr" / Int32ul,
        "p_paddr" / Int32ul,
        "p_filesz" / Int32ul,
        "p_memsz" / Int32ul,
        "p_flags" / Int32ul,
        "p_align" / Int32ul,
    )
    # ELF64 moves p_flags up next to p_type to keep the 64-bit fields aligned.
    Elf64_Phdr = Struct(
        "p_type" / Int32ul,
        "p_flags" / Int32ul,
        "p_offset" / Int64ul,
        "p_vaddr" / Int64ul,
        "p_paddr" / Int64ul,
        "p_filesz" / Int64ul,
        "p_memsz" / Int64ul,
        "p_align" / Int64ul,
    )

    def _shdr(word):
        return Struct(
            "sh_name" / Int32ul,
            "sh_type" / Int32ul,
            "sh_flags" / word,
            "sh_addr" / word,
            "sh_offset" / word,
            "sh_size" / word,
            "sh_link" / Int32ul,
            "sh_info" / Int32ul,
            "sh_addralign" / word,
            "sh_entsize" / word,
        )

    Elf32_Shdr = _shdr(Int32ul)
    Elf64_Shdr = _shdr(Int64ul)

    # Same layout in ELF32 and ELF64; name and desc follow, each padded to the note alignment.
    Elf_Nhdr = Struct(
        "n_namesz" / Int32ul,
        "n_descsz" / Int32ul,
        "n_type" / Int32ul,
    )
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr
L = LAYOUTS

CLASSES = {
    ELFCLASS32: (L.Elf32_Ehdr, L.Elf32_Phdr, L.Elf32_Shdr),
    ELFCLASS64: (L.Elf64_Ehdr, L.Elf64_Phdr, L.Elf64_Shdr),
}


class ElfFormatError(Exception):
    """The data is not a well-formed little-endian ELF32/ELF64 file."""


# name: bytes, without the terminating NUL; type: int; desc: bytes
Note = namedtuple("Note", "name type desc")


class ElfFile:
    """Read-only view of an ELF image held in memory."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        if bytes(self.data[:4]) != ELFMAG or len(data) < 16:
            raise ElfFormatError("no ELF magic")
        ident = L.ElfIdent.parse(bytes(self.data[:16]))
        if ident.ei_class not in CLASSES:
            raise ElfFormatError(f"unknown ELF class {ident.ei_class}")
        if ident.ei_data != ELFDATA2LSB:
            raise ElfFormatError("not a little-endian ELF")
        self.ei_class = ident.ei_class
        self.bits = 32 if ident.ei_class == ELFCLASS32 else 64
        ehdr_t, self._phdr_t, self._shdr_t = CLASSES[ident.ei_class]
        self.ehdr = self._parse(ehdr_t, 0, "ELF header")
        self.phdrs = self._table(self._phdr_t, self.ehdr.e_phoff, self._phnum(), self.ehdr.e_phentsize,
                                 "program header")
        self.shdrs = self._table(self._shdr_t, self.ehdr.e_shoff, self._shnum(), self.ehdr.e_shentsize,
                                 "section header")

    # -- raw access --------------------------------------------------------------------------
    def bytes_at(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise ElfFormatError(f"{what} at file offset {offset:#x}+{size:#x} is past the end of the file")
        return bytes(self.data[offset:offset + size])

    def _parse(self, t, offset: int, what: str):
        try:
            return t.parse(self.bytes_at(offset, t.sizeof(), what))
        except PackedError as e:  # pragma: no cover - sizes are checked above
            raise ElfFormatError(f"bad {what}: {e}") from None

    def _table(self, t, offset: int, count: int, entsize: int, what: str) -> list:
        if count == 0 or offset == 0:
            return []
        if entsize < t.sizeof():
            raise ElfFormatError(f"{what} entry size {entsize} is smaller than {t.sizeof()}")
        return [self._parse(t, offset + i * entsize, what) for i in range(count)]

    # Extended numbering: counts that overflow 16 bits live in section header 0.
    def _section0(self):
        if self.ehdr.e_shoff == 0:
            return None
        return self._parse(self._shdr_t, self.ehdr.e_shoff, "section header 0")

    def _phnum(self) -> int:
        if self.ehdr.e_phnum == PN_XNUM:
            s0 = self._section0()
            return s0.sh_info if s0 is not None else 0
        return self.ehdr.e_phnum

    def _shnum(self) -> int:
        if self.ehdr.e_shnum == 0 and self.ehdr.e_shoff != 0:
            return self._section0().sh_size
        return self.ehdr.e_shnum

    # -- notes -------------------------------------------------------------------------------
    def note_regions(self) -> list[tuple[int, int, int]]:
        """(file offset, size, alignment) of every PT_NOTE segment and SHT_NOTE section."""
        regions = []
        for ph in self.phdrs:
            if ph.p_type == PT_NOTE:
                regions.append((ph.p_offset, ph.p_filesz, ph.p_align))
        for sh in self.shdrs:
            if sh.sh_type == SHT_NOTE:
                regions.append((sh.sh_offset, sh.sh_size, sh.sh_addralign))
        return regions

    def notes(self):
        """Every note in every note region; a region that is malformed is skipped from there on."""
        for offset, size, align in self.note_regions():
            # Notes are 4-byte aligned in practice even in ELF64; 8 only when the region says so.
            step = 8 if align == 8 else 4
            try:
                blob = self.bytes_at(offset, size, "note")
            except ElfFormatError:
                continue
            pos = 0
            nhdr = L.Elf_Nhdr
            while pos + nhdr.sizeof() <= len(blob):
                n = nhdr.parse(blob[pos:pos + nhdr.sizeof()])
                name_at = pos + nhdr.sizeof()
                desc_at = name_at + _pad(n.n_namesz, step)
                end = desc_at + _pad(n.n_descsz, step)
                if desc_at + n.n_descsz > len(blob):
                    break
                name = blob[name_at:name_at + n.n_namesz].rstrip(b"\0")
                yield Note(name, n.n_type, blob[desc_at:desc_at + n.n_descsz])
                pos = end


def _pad(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)
