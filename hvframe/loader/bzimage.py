"""Linux bzImage direct boot via the 32-bit boot protocol (Documentation/arch/x86/boot.rst):
the protected-mode kernel is copied to 1 MiB (or its preferred address), the zero page
(struct boot_params) is filled in, and the kernel is entered at code32_start with %esi
pointing at the zero page."""
from __future__ import annotations

from ..errors import ConfigError
from ..memory import GuestMemory
from .common import (CMDLINE_ADDR, CMDLINE_MAX, KERNEL_MIN_ADDR, ZERO_PAGE_ADDR, BootState,
                     encode_cmdline, human, load_initrd)
from ..packed import Declarations

BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448          # "HdrS"
MIN_PROTOCOL = 0x206             # first version with cmdline_size
LOADED_HIGH = 0x01               # loadflags: protected-mode code is loaded at 0x100000 (bzImage)
CAN_USE_HEAP = 0x80
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
TYPE_OF_LOADER_UNDEFINED = 0xFF
VID_MODE_NORMAL = 0xFFFF
HEAP_END_PTR = 0xDE00            # the conventional 0xe000 - 0x200 from the real-mode base
E820_MAX_ENTRIES_ZEROPAGE = 128

SETUP_HEADER_OFFSET = 0x1F1
SETUP_HEADER_LIMIT = 0x290       # end of the hdr area (plus its padding) in boot_params


def _declare():
    from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

    # struct setup_header, as found at 0x1f1 in the image and in boot_params. Fields past the end
    # the image declares (0x202 + byte at 0x201) are not part of older headers.
    SetupHeader = Struct(
        "setup_sects" / Int8ul,          # 0x1f1
        "root_flags" / Int16ul,          # 0x1f2
        "syssize" / Int32ul,             # 0x1f4
        "ram_size" / Int16ul,            # 0x1f8
        "vid_mode" / Int16ul,            # 0x1fa
        "root_dev" / Int16ul,            # 0x1fc
        "boot_flag" / Int16ul,           # 0x1fe
        "jump" / Int16ul,                # 0x200
        "header" / Int32ul,              # 0x202
        "version" / Int16ul,             # 0x206
        "realmode_swtch" / Int32ul,      # 0x208
        "start_sys_seg" / Int16ul,       # 0x20c
        "kernel_version" / Int16ul,      # 0x20e
        "type_of_loader" / Int8ul,       # 0x210
        "loadflags" / Int8ul,            # 0x211
        "setup_move_size" / Int16ul,     # 0x212
        "code32_start" / Int32ul,        # 0x214
        "ramdisk_image" / Int32ul,       # 0x218
        "ramdisk_size" / Int32ul,        # 0x21c
        "bootsect_kludge" / Int32ul,     # 0x220
        "heap_end_ptr" / Int16ul,        # 0x224
        "ext_loader_ver" / Int8ul,       # 0x226
        "ext_loader_type" / Int8ul,      # 0x227
        "cmd_line_ptr" / Int32ul,        # 0x228
        "initrd_addr_max" / Int32ul,     # 0x22c
        "kernel_alignment" / Int32ul,    # 0x230
        "relocatable_kernel" / Int8ul,   # 0x234
        "min_alignment" / Int8ul,        # 0x235
        "xloadflags" / Int16ul,          # 0x236
        "cmdline_size" / Int32ul,        # 0x238
        "hardware_subarch" / Int32ul,    # 0x23c
        "hardware_subarch_data" / Int64ul,  # 0x240
        "payload_offset" / Int32ul,      # 0x248
        "payload_length" / Int32ul,      # 0x24c
        "setup_data" / Int64ul,          # 0x250
        "pref_address" / Int64ul,        # 0x258
        "init_size" / Int32ul,           # 0x260
        "handover_offset" / Int32ul,     # 0x264
        "kernel_info_offset" / Int32ul,  # 0x268
    )
    assert SetupHeader.sizeof() == 0x26C - SETUP_HEADER_OFFSET

    BootE820Entry = Struct(
        "addr" / Int64ul,
        "size" / Int64ul,
        "type" / Int32ul,
    )

    # struct boot_params, the "zero page". Regions the loader never touches are raw bytes so that
    # parse/build round-trips them unchanged.
    BootParams = Struct(
        "screen_info" / Bytes(0x40),             # 0x000
        "apm_bios_info" / Bytes(0x14),           # 0x040
        "_pad2" / Bytes(4),                      # 0x054
        "tboot_addr" / Int64ul,                  # 0x058
        "ist_info" / Bytes(0x10),                # 0x060
        "acpi_rsdp_addr" / Int64ul,              # 0x070
        "_pad3" / Bytes(8),                      # 0x078
        "hd0_info" / Bytes(0x10),                # 0x080
        "hd1_info" / Bytes(0x10),                # 0x090
        "sys_desc_table" / Bytes(0x10),          # 0x0a0
        "olpc_ofw_header" / Bytes(0x10),         # 0x0b0
        "ext_ramdisk_image" / Int32ul,           # 0x0c0
        "ext_ramdisk_size" / Int32ul,            # 0x0c4
        "ext_cmd_line_ptr" / Int32ul,            # 0x0c8
        "_pad4" / Bytes(0x74),                   # 0x0cc
        "edid_info" / Bytes(0x80),               # 0x140
        "efi_info" / Bytes(0x20),                # 0x1c0
        "alt_mem_k" / Int32ul,                   # 0x1e0
        "scratch" / Int32ul,                     # 0x1e4
        "e820_entries" / Int8ul,                 # 0x1e8
        "eddbuf_entries" / Int8ul,               # 0x1e9
        "edd_mbr_sig_buf_entries" / Int8ul,      # 0x1ea
        "kbd_status" / Int8ul,                   # 0x1eb
        "secure_boot" / Int8ul,                  # 0x1ec
        "_pad5" / Bytes(2),                      # 0x1ed
        "sentinel" / Int8ul,                     # 0x1ef
        "_pad6" / Bytes(1),                      # 0x1f0
        "hdr" / SetupHeader,                     # 0x1f1
        "_pad7" / Bytes(SETUP_HEADER_LIMIT - 0x26C),  # 0x26c
        "edd_mbr_sig_buffer" / Array(16, Int32ul),    # 0x290
        "e820_table" / Array(E820_MAX_ENTRIES_ZEROPAGE, BootE820Entry),  # 0x2d0
        "_pad8" / Bytes(0x30),                   # 0xcd0
        "eddbuf" / Bytes(0x1EC),                 # 0xd00
        "_pad9" / Bytes(0x114),                  # 0xeec
    )
    assert BootParams.sizeof() == 0x1000
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr


def is_bzimage(data: bytes) -> bool:
    return (len(data) >= 0x206 and int.from_bytes(data[0x1FE:0x200], "little") == BOOT_FLAG
            and int.from_bytes(data[0x202:0x206], "little") == HDRS_MAGIC)


def _version(v: int) -> str:
    return f"{v >> 8}.{v & 0xFF:02d}"


def load_bzimage(memory: GuestMemory, data: bytes, path: str, cmdline: str,
                 initrd_path: str | None, e820: list[tuple[int, int, int]], rsdp_paddr: int = 0) -> BootState:
    # The zero page starts as zeros with the image's setup header copied in (as long as the
    # image says it is: the short jump at 0x200 skips exactly over it).
    hdr_end = min(0x202 + data[0x201], SETUP_HEADER_LIMIT, len(data))
    page = bytearray(LAYOUTS.BootParams.sizeof())
    page[SETUP_HEADER_OFFSET:hdr_end] = data[SETUP_HEADER_OFFSET:hdr_end]
    bp = LAYOUTS.BootParams.parse(bytes(page))
    hdr = bp.hdr

    if hdr.version < MIN_PROTOCOL:
        raise ConfigError(f"kernel: {path} uses boot protocol {_version(hdr.version)}; "
                          f"at least {_version(MIN_PROTOCOL)} is required")
    if hdr_end < 0x23C:   # a 2.06 header reaches at least through cmdline_size
        raise ConfigError(f"kernel: {path}: setup header is truncated (ends at {hdr_end:#x})")
    if not hdr.loadflags & LOADED_HIGH:
        raise ConfigError(f"kernel: {path} is a zImage (not loaded high); only bzImage is supported")

    setup_sects = hdr.setup_sects or 4
    pm_offset = (setup_sects + 1) * 512
    if pm_offset >= len(data):
        raise ConfigError(f"kernel: {path}: no protected-mode kernel after {setup_sects} setup sectors")
    pm = memoryview(data)[pm_offset:]
    # init_size (2.10+) is the memory the kernel needs from its load address while it unpacks.
    need = max(len(pm), hdr.init_size if hdr.version >= 0x20A else 0)

    load_addr = KERNEL_MIN_ADDR
    if (hdr.version >= 0x20A and hdr.relocatable_kernel and hdr.pref_address > KERNEL_MIN_ADDR
            and hdr.pref_address + need <= memory.lowmem_end):
        load_addr = hdr.pref_address
    if load_addr + need > memory.lowmem_end:
        raise ConfigError(f"kernel: {path} needs {human(need)} at {load_addr:#x}, more than guest low RAM "
                          f"(ends at {memory.lowmem_end:#x})")

    cmd_limit = min(hdr.cmdline_size, CMDLINE_MAX - 1)
    cmd = encode_cmdline(cmdline, cmd_limit)
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ConfigError(f"memory map has {len(e820)} entries; the zero page holds at most "
                          f"{E820_MAX_ENTRIES_ZEROPAGE}")

    memory.write(load_addr, pm)
    memory.write(CMDLINE_ADDR, cmd)

    # code32_start defaults to the load address; keep its offset if the kernel moved.
    entry = hdr.code32_start - KERNEL_MIN_ADDR + load_addr if hdr.code32_start else load_addr
    hdr.code32_start = entry
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.loadflags |= CAN_USE_HEAP
    hdr.heap_end_ptr = HEAP_END_PTR
    hdr.vid_mode = VID_MODE_NORMAL
    hdr.cmd_line_ptr = CMDLINE_ADDR
    bp.ext_cmd_line_ptr = CMDLINE_ADDR >> 32

    hdr.ramdisk_image = hdr.ramdisk_size = 0
    if initrd_path is not None:
        # initrd_addr_max is the highest byte the initrd may occupy.
        limit = min(hdr.initrd_addr_max + 1, memory.lowmem_end)
        addr, size = load_initrd(memory, e820, initrd_path, limit, [(load_addr, load_addr + need)])
        hdr.ramdisk_image, bp.ext_ramdisk_image = addr & 0xFFFFFFFF, addr >> 32
        hdr.ramdisk_size, bp.ext_ramdisk_size = size & 0xFFFFFFFF, size >> 32

    bp.acpi_rsdp_addr = rsdp_paddr   # read by kernels of boot protocol 2.14 and later
    bp.e820_entries = len(e820)
    table = [dict(addr=a, size=s, type=t) for a, s, t in e820]
    table += [dict(addr=0, size=0, type=0)] * (E820_MAX_ENTRIES_ZEROPAGE - len(table))
    bp.e820_table = table
    memory.write(ZERO_PAGE_ADDR, LAYOUTS.BootParams.build(bp))

    # 32-bit protocol: %esi = boot_params; %ebp, %edi, %ebx must be zero.
    return BootState(rip=entry, regs={"rsi": ZERO_PAGE_ADDR, "rbx": 0, "rbp": 0, "rdi": 0},
                     description=f"bzImage {path} protocol {_version(hdr.version)} at {load_addr:#x} "
                                 f"entry {entry:#x}")
