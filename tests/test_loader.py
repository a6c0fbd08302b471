"""Loader tests on synthetic kernels built here (no KVM): PVH ELF32/ELF64 and bzImage."""
from __future__ import annotations

import pytest

from hvframe.errors import ConfigError
from hvframe.loader import BootState, find_pvh_entry, load_kernel
from hvframe.loader.bzimage import BootParams, SetupHeader
from hvframe.loader.elf import (Elf32_Ehdr, Elf32_Phdr, Elf32_Shdr, Elf64_Ehdr, Elf64_Phdr,
                                Elf64_Shdr, Elf_Nhdr)
from hvframe.loader.pvh import HvmMemmapEntry, HvmModlistEntry, HvmStartInfo
from hvframe.memory import E820_RAM, E820_RESERVED, GuestMemory

MiB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory(64 * MiB)
    yield m
    m.close()


# -- synthetic ELF ---------------------------------------------------------------------------
def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)
    return Elf_Nhdr.build(dict(n_namesz=len(name) + 1, n_descsz=len(desc), n_type=ntype)) \
        + pad(name + b"\0") + pad(desc)


def pvh_note(entry: int, size: int) -> bytes:
    return note(b"Xen", 18, entry.to_bytes(size, "little"))


def make_elf(bits: int, segments, notes: bytes | None, where=("segment", "section"),
             entry: int = 0x100000) -> bytes:
    """ELF with `segments` [(paddr, data, memsz)] and a note blob in a PT_NOTE and/or SHT_NOTE."""
    ehdr_t, phdr_t, shdr_t = ((Elf32_Ehdr, Elf32_Phdr, Elf32_Shdr) if bits == 32
                              else (Elf64_Ehdr, Elf64_Phdr, Elf64_Shdr))
    nph = len(segments) + (1 if notes is not None and "segment" in where else 0)
    off = ehdr_t.sizeof() + nph * phdr_t.sizeof()
    body, phdrs = b"", []
    note_off = off
    if notes is not None:
        body += notes
        if "segment" in where:
            phdrs.append(dict(p_type=4, p_offset=note_off, p_vaddr=0, p_paddr=0,
                              p_filesz=len(notes), p_memsz=0, p_flags=4, p_align=4))
    for paddr, data, memsz in segments:
        body += b"\0" * (-len(body) % 16)
        phdrs.append(dict(p_type=1, p_offset=off + len(body), p_vaddr=paddr | 0xC0000000,
                          p_paddr=paddr, p_filesz=len(data), p_memsz=memsz, p_flags=7, p_align=16))
        body += data
    body += b"\0" * (-len(body) % 8)
    shdrs = []
    if notes is not None and "section" in where:
        zero = dict(sh_name=0, sh_type=0, sh_flags=0, sh_addr=0, sh_offset=0, sh_size=0,
                    sh_link=0, sh_info=0, sh_addralign=0, sh_entsize=0)
        shdrs = [zero, dict(zero, sh_type=7, sh_offset=note_off, sh_size=len(notes), sh_addralign=4)]
    shoff = off + len(body) if shdrs else 0
    ident = dict(ei_class=1 if bits == 32 else 2, ei_data=1, ei_version=1, ei_osabi=0,
                 ei_abiversion=0, ei_pad=bytes(7))
    ehdr = ehdr_t.build(dict(
        e_ident=ident, e_type=2, e_machine=3 if bits == 32 else 62, e_version=1, e_entry=entry,
        e_phoff=ehdr_t.sizeof(), e_shoff=shoff, e_flags=0, e_ehsize=ehdr_t.sizeof(),
        e_phentsize=phdr_t.sizeof(), e_phnum=len(phdrs), e_shentsize=shdr_t.sizeof(),
        e_shnum=len(shdrs), e_shstrndx=0))
    return ehdr + b"".join(phdr_t.build(p) for p in phdrs) + body + b"".join(shdr_t.build(s) for s in shdrs)


def write(tmp_path, name, data) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


OTHER_NOTE = note(b"GNU", 3, b"\x11" * 20)  # a build-id ahead of the Xen note


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("where", [("segment",), ("section",), ("segment", "section")])
@pytest.mark.parametrize("size", [4, 8])
def test_find_pvh_entry(bits, where, size):
    elf = make_elf(bits, [(0x100000, b"\x90", 1)], OTHER_NOTE + pvh_note(0x100123, size), where)
    assert find_pvh_entry(elf) == 0x100123


def test_find_pvh_entry_none():
    assert find_pvh_entry(b"") is None
    assert find_pvh_entry(b"MZ" + bytes(100)) is None
    assert find_pvh_entry(make_elf(64, [(0x100000, b"\x90", 1)], OTHER_NOTE)) is None
    assert find_pvh_entry(make_elf(64, [(0x100000, b"\x90", 1)], None)) is None
    # A Xen note of another type is not the entry.
    assert find_pvh_entry(make_elf(64, [(0x100000, b"\x90", 1)], note(b"Xen", 1, b"\0" * 8))) is None
    # Truncated file: header tables past the end.
    assert find_pvh_entry(make_elf(64, [(0x100000, b"\x90", 1)], pvh_note(0x100000, 4))[:80]) is None


def start_info(mem):
    return HvmStartInfo.parse(mem.read(0x6000, HvmStartInfo.sizeof()))


@pytest.mark.parametrize("bits", [32, 64])
def test_pvh_load(mem, tmp_path, bits):
    text = bytes(range(256)) * 16
    data2 = b"DATA" * 100
    segs = [(0x100000, text, len(text)), (0x200000, data2, len(data2) + 0x3000)]
    kernel = write(tmp_path, "k.elf", make_elf(bits, segs, OTHER_NOTE + pvh_note(0x100010, bits // 8)))
    initrd_data = bytes((i * 7) & 0xFF for i in range(5000))
    initrd = write(tmp_path, "initrd.img", initrd_data)
    mem.fill(0x200000 + len(data2), 0x3000, 0xAA)  # stale bytes where the bss goes

    st = load_kernel(mem, kernel, cmdline="console=ttyS0 root=/dev/vda", initrd_path=initrd)

    assert isinstance(st, BootState)
    assert st.rip == 0x100010
    assert st.regs == {"rbx": 0x6000}
    assert "PVH" in st.description and "0x100010" in st.description
    assert mem.read(0x100000, len(text)) == text
    assert mem.read(0x200000, len(data2)) == data2
    assert mem.read(0x200000 + len(data2), 0x3000) == bytes(0x3000)

    si = start_info(mem)
    assert si.magic == 0x336EC578 and si.version == 1 and si.flags == 0
    assert si.rsdp_paddr == 0
    assert 0x6000 <= si.memmap_paddr < 0x7000 and 0x6000 <= si.modlist_paddr < 0x7000
    assert mem.read(si.cmdline_paddr, 29) == b"console=ttyS0 root=/dev/vda\0\0"[:29]
    assert si.cmdline_paddr == 0x20000
    memmap = [HvmMemmapEntry.parse(mem.read(si.memmap_paddr + i * 24, 24)) for i in range(si.memmap_entries)]
    assert [(e.addr, e.size, e.type) for e in memmap] == mem.e820()
    assert si.memmap_paddr + si.memmap_entries * 24 <= 0x7000

    assert si.nr_modules == 1
    mod = HvmModlistEntry.parse(mem.read(si.modlist_paddr, HvmModlistEntry.sizeof()))
    assert mod.size == len(initrd_data) and mod.cmdline_paddr == 0
    assert mod.paddr % 4096 == 0 and mod.paddr + mod.size <= mem.lowmem_end
    assert mod.paddr >= 0x200000 + len(data2) + 0x3000  # above the kernel
    assert mem.read(mod.paddr, mod.size) == initrd_data


def test_pvh_without_initrd_custom_e820(mem, tmp_path):
    kernel = write(tmp_path, "k.elf", make_elf(64, [(0x400000, b"\xf4" * 64, 64)], pvh_note(0x400000, 8),
                                               where=("section",)))
    e820 = [(0, 0x9F000, E820_RAM), (0x100000, 0x1000000, E820_RAM), (0xFEC00000, 0x1000, E820_RESERVED)]
    st = load_kernel(mem, kernel, e820=e820)
    assert st.rip == 0x400000
    si = start_info(mem)
    assert si.nr_modules == 0 and si.modlist_paddr == 0
    assert mem.read(si.cmdline_paddr, 1) == b"\0"
    memmap = [HvmMemmapEntry.parse(mem.read(si.memmap_paddr + i * 24, 24)) for i in range(si.memmap_entries)]
    assert [(e.addr, e.size, e.type) for e in memmap] == e820


def test_pvh_initrd_respects_e820(mem, tmp_path):
    kernel = write(tmp_path, "k.elf", make_elf(32, [(0x100000, b"\xf4", 1)], pvh_note(0x100000, 4)))
    initrd = write(tmp_path, "i", b"x" * 10000)
    e820 = [(0, 0x9F000, E820_RAM), (0x100000, 0x800000, E820_RAM)]  # RAM shown only up to 9 MiB
    load_kernel(mem, kernel, initrd_path=initrd, e820=e820)
    mod = HvmModlistEntry.parse(mem.read(start_info(mem).modlist_paddr, 32))
    assert mod.paddr + mod.size <= 0x900000 and mod.paddr > 0x900000 - 0x4000


# -- synthetic bzImage -----------------------------------------------------------------------
def make_bzimage(payload: bytes, *, version=0x20F, setup_sects=2, cmdline_size=2048,
                 initrd_addr_max=0x7FFFFFFF, relocatable=0, pref_address=0x100000, init_size=0,
                 loadflags=0x01, hdr_end=0x26C, code32_start=0x100000) -> bytes:
    hdr = SetupHeader.build(dict(
        setup_sects=setup_sects, root_flags=1, syssize=(len(payload) + 15) // 16, ram_size=0,
        vid_mode=0xFFFD, root_dev=0, boot_flag=0xAA55, jump=0xEB | ((hdr_end - 0x202) << 8),
        header=0x53726448, version=version, realmode_swtch=0, start_sys_seg=0x1000,
        kernel_version=0x1234, type_of_loader=0, loadflags=loadflags, setup_move_size=0x8000,
        code32_start=code32_start, ramdisk_image=0, ramdisk_size=0, bootsect_kludge=0,
        heap_end_ptr=0, ext_loader_ver=0, ext_loader_type=0, cmd_line_ptr=0,
        initrd_addr_max=initrd_addr_max, kernel_alignment=0x200000, relocatable_kernel=relocatable,
        min_alignment=21, xloadflags=0x3, cmdline_size=cmdline_size, hardware_subarch=0,
        hardware_subarch_data=0, payload_offset=0x1234, payload_length=len(payload),
        setup_data=0, pref_address=pref_address, init_size=init_size, handover_offset=0x190,
        kernel_info_offset=0))
    setup = bytearray((setup_sects or 4) * 512 + 512)
    setup[0x1F1:0x1F1 + len(hdr)] = hdr
    setup[hdr_end:0x300] = b"\xcc" * (0x300 - hdr_end)  # "setup code" right after the header
    return bytes(setup) + payload


PAYLOAD = bytes((i * 13 + 5) & 0xFF for i in range(20000))


def zero_page(mem):
    return BootParams.parse(mem.read(0x7000, 4096))


def test_bzimage_load(mem, tmp_path):
    image = make_bzimage(PAYLOAD, initrd_addr_max=0x1FFFFFF)  # initrd must end by 32 MiB
    kernel = write(tmp_path, "bzImage", image)
    initrd_data = bytes(range(256)) * 40
    initrd = write(tmp_path, "initrd", initrd_data)

    st = load_kernel(mem, kernel, cmdline="console=ttyS0 quiet", initrd_path=initrd)

    assert st.rip == 0x100000
    assert st.regs["rsi"] == 0x7000 and st.regs.get("rbx", 0) == 0
    assert "bzImage" in st.description
    assert mem.read(0x100000, len(PAYLOAD)) == PAYLOAD  # protected-mode part: after 3 sectors

    bp = zero_page(mem)
    orig = SetupHeader.parse(image[0x1F1:0x26C])
    for name in ("setup_sects", "syssize", "boot_flag", "header", "version", "kernel_version",
                 "initrd_addr_max", "kernel_alignment", "cmdline_size", "payload_offset",
                 "payload_length", "handover_offset", "xloadflags"):
        assert bp.hdr[name] == orig[name], name
    assert bp.hdr.type_of_loader == 0xFF
    assert bp.hdr.loadflags & 0x81 == 0x81  # LOADED_HIGH kept, CAN_USE_HEAP set
    assert bp.hdr.heap_end_ptr != 0
    assert bp.hdr.vid_mode == 0xFFFF
    assert bp.hdr.cmd_line_ptr == 0x20000 and bp.ext_cmd_line_ptr == 0
    assert mem.read(0x20000, 20) == b"console=ttyS0 quiet\0"
    assert bp.sentinel == 0

    assert bp.e820_entries == len(mem.e820())
    assert [(e.addr, e.size, e.type) for e in bp.e820_table[:bp.e820_entries]] == mem.e820()
    assert all(e.size == 0 for e in bp.e820_table[bp.e820_entries:])

    assert bp.hdr.ramdisk_size == len(initrd_data) and bp.ext_ramdisk_size == 0
    addr = bp.hdr.ramdisk_image
    assert bp.ext_ramdisk_image == 0
    assert addr % 4096 == 0 and addr >= 0x100000 + len(PAYLOAD)
    assert addr + len(initrd_data) - 1 <= 0x1FFFFFF
    assert addr == 0x2000000 - 0x3000  # as high as it fits (10 KiB rounds to 3 pages)
    assert mem.read(addr, len(initrd_data)) == initrd_data


def test_bzimage_short_header_not_copied_past_end(mem, tmp_path):
    # A 2.06 header ends after cmdline_size; bytes beyond it are setup code, not header fields.
    image = make_bzimage(PAYLOAD, version=0x206, hdr_end=0x23C, setup_sects=0)
    kernel = write(tmp_path, "bz", image)
    load_kernel(mem, kernel)
    bp = zero_page(mem)
    assert bp.hdr.cmdline_size == 2048 and bp.hdr.pref_address == 0 and bp.hdr.init_size == 0
    assert mem.read(0x100000, len(PAYLOAD)) == PAYLOAD  # setup_sects 0 means 4
    assert bp.hdr.type_of_loader == 0xFF


def test_bzimage_relocatable_pref_address(mem, tmp_path):
    image = make_bzimage(PAYLOAD, relocatable=1, pref_address=0x1000000, init_size=0x800000)
    kernel = write(tmp_path, "bz", image)
    initrd = write(tmp_path, "i", b"r" * 4096)
    st = load_kernel(mem, kernel, initrd_path=initrd)
    assert st.rip == 0x1000000
    assert mem.read(0x1000000, len(PAYLOAD)) == PAYLOAD
    bp = zero_page(mem)
    assert bp.hdr.code32_start == 0x1000000
    assert bp.hdr.ramdisk_image >= 0x1800000  # clear of init_size


def test_bzimage_pref_address_too_high_falls_back(mem, tmp_path):
    image = make_bzimage(PAYLOAD, relocatable=1, pref_address=0x8000000)
    st = load_kernel(mem, write(tmp_path, "bz", image))
    assert st.rip == 0x100000 and mem.read(0x100000, 64) == PAYLOAD[:64]


# -- errors ----------------------------------------------------------------------------------
def expect(match, fn, *a, **kw):
    with pytest.raises(ConfigError, match=match) as ei:
        fn(*a, **kw)
    assert "\n" not in str(ei.value)
    return str(ei.value)


def test_not_a_kernel(mem, tmp_path):
    k = write(tmp_path, "junk", b"hello world" * 100)
    msg = expect("neither a PVH ELF", load_kernel, mem, k)
    assert k in msg and "bzImage" in msg


def test_elf_without_note(mem, tmp_path):
    k = write(tmp_path, "plain.elf", make_elf(64, [(0x100000, b"\x90", 1)], OTHER_NOTE))
    expect("no XEN_ELFNOTE_PHYS32_ENTRY", load_kernel, mem, k)


def test_malformed_elf(mem, tmp_path):
    k = write(tmp_path, "bad.elf", make_elf(64, [(0x100000, b"\x90", 1)], pvh_note(0x100000, 4))[:70])
    expect("malformed ELF", load_kernel, mem, k)


def test_missing_file(mem, tmp_path):
    expect("cannot read", load_kernel, mem, str(tmp_path / "nope"))
    k = write(tmp_path, "k.elf", make_elf(64, [(0x100000, b"\x90", 1)], pvh_note(0x100000, 4)))
    expect("initrd: cannot read", load_kernel, mem, k, initrd_path=str(tmp_path / "nope"))


def test_old_protocol(mem, tmp_path):
    k = write(tmp_path, "bz", make_bzimage(PAYLOAD, version=0x205))
    expect(r"boot protocol 2\.05.*2\.06", load_kernel, mem, k)


def test_zimage(mem, tmp_path):
    k = write(tmp_path, "bz", make_bzimage(PAYLOAD, loadflags=0))
    expect("zImage", load_kernel, mem, k)


def test_cmdline_too_long(mem, tmp_path):
    k = write(tmp_path, "bz", make_bzimage(PAYLOAD, cmdline_size=16))
    load_kernel(mem, k, cmdline="x" * 16)
    expect("cmdline: 17 bytes is too long.*16", load_kernel, mem, k, cmdline="x" * 17)
    k = write(tmp_path, "k.elf", make_elf(64, [(0x100000, b"\x90", 1)], pvh_note(0x100000, 4)))
    expect("cmdline.*too long", load_kernel, mem, k, cmdline="y" * (64 << 10))
    expect("NUL", load_kernel, mem, k, cmdline="a\0b")


def test_kernel_too_big(mem, tmp_path):
    # File larger than all of RAM: refused before reading it.
    big = tmp_path / "huge"
    with open(big, "wb") as f:
        f.truncate(65 * MiB)
    expect("too big for guest RAM", load_kernel, mem, str(big))
    # bzImage whose init_size cannot fit at 1 MiB.
    k = write(tmp_path, "bz", make_bzimage(PAYLOAD, init_size=64 * MiB))
    expect("more than guest low RAM", load_kernel, mem, k)
    # PVH segment past the end of RAM, and one reaching into the VMM's boot area.
    k = write(tmp_path, "k.elf", make_elf(64, [(0x3F00000, b"\x90", 2 * MiB)], pvh_note(0x3F00000, 4)))
    expect("outside guest RAM", load_kernel, mem, k)
    k = write(tmp_path, "k2.elf", make_elf(32, [(0x6000, b"\x90", 16)], pvh_note(0x6000, 4)))
    expect("VMM boot area", load_kernel, mem, k)


def test_pvh_entry_outside_segments(mem, tmp_path):
    k = write(tmp_path, "k.elf", make_elf(64, [(0x100000, b"\x90", 16)], pvh_note(0x900000, 8)))
    expect("not inside any loaded segment", load_kernel, mem, k)


def test_initrd_too_big(mem, tmp_path):
    initrd = write(tmp_path, "initrd", bytes(40 * MiB))
    # bzImage: below initrd_addr_max (32 MiB) there is no room for 40 MiB.
    k = write(tmp_path, "bz", make_bzimage(PAYLOAD, initrd_addr_max=0x1FFFFFF))
    expect("initrd: .* does not fit", load_kernel, mem, k, initrd_path=initrd)
    # PVH: kernel at 30 MiB leaves under 40 MiB above it.
    k = write(tmp_path, "k.elf", make_elf(64, [(30 * MiB, b"\x90", 16)], pvh_note(30 * MiB, 8)))
    expect("initrd: .* does not fit", load_kernel, mem, k, initrd_path=initrd)
    # Larger than RAM altogether.
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(65 * MiB)
    expect("initrd: .* too big", load_kernel, mem, k, initrd_path=str(huge))
