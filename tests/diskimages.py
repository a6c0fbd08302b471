"""Bootable disk images for tests: a raw disk whose MBR prints a marker on COM1, and an ISO9660
image whose El Torito no-emulation boot image does the same.

    make_mbr_disk(path, "MBR-MARKER-1")          # raw image, 1 MiB by default
    make_eltorito_iso(path, "ISO-MARKER-1")      # ISO9660 + El Torito (needs pycdlib)

Both run the boot sector assembled from tests/guests/boot_marker.S (16-bit real mode): set
COM1 (0x3f8) to 115200 8N1, print the marker and "\\r\\n" polling LSR.THRE, then power off
through hvframe's ACPI PM1a_CNT (port 0x404) or, under QEMU+SeaBIOS, the PIIX4 one (0x604),
and stay halted if neither exists. The marker is stored right after the code, NUL-terminated.

The ISO is written with pycdlib (pure Python, from PyPI through requirements-dev.txt), so no
system tool beyond gcc/ld, which building hvframe already needs, has to be installed.
"""
from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Union

BOOT_SOURCE = Path(__file__).resolve().parent / "guests" / "boot_marker.S"
SECTOR = 512
MBR_CODE_MAX = 440              # then the disk signature (440), partition table (446), 55AA (510)
CD_SECTOR = 2048
DEFAULT_DISK_SIZE = 1 << 20

PathLike = Union[str, os.PathLike]


class DiskImageError(RuntimeError):
    """An image could not be made: a missing tool or a marker that does not fit."""


@functools.lru_cache(maxsize=None)
def boot_code() -> bytes:
    """The assembled boot_marker.S, linked at 0x7c00, without the marker."""
    cc = os.environ.get("HVFRAME_GUEST_CC") or "gcc"
    for tool in (cc, "ld"):
        if shutil.which(tool) is None:
            raise DiskImageError(f"{tool!r} not found: assembling {BOOT_SOURCE.name} needs gcc "
                                 "and binutils (Debian: apt-get install gcc binutils)")
    with tempfile.TemporaryDirectory(prefix="hvframe-boot-") as tmp:
        obj, out = Path(tmp, "boot.o"), Path(tmp, "boot.bin")
        for cmd in ([cc, "-m16", "-c", "-o", str(obj), str(BOOT_SOURCE)],
                    ["ld", "-m", "elf_i386", "-Ttext=0x7c00", "-e", "_start", "--oformat",
                     "binary", "-o", str(out), str(obj)]):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise DiskImageError(f"{' '.join(cmd[:2])} ... failed: {r.stderr.strip()}")
        code = out.read_bytes()
    if not code or code[0] != 0xFA:         # cli: the entry is the first byte
        raise DiskImageError(f"{BOOT_SOURCE.name} assembled to something unexpected")
    return code


def boot_sector(marker: str) -> bytes:
    """512 bytes: boot code, the marker + CRLF + NUL right after it, 0x55 0xAA at 510."""
    text = marker.encode("ascii")
    if b"\0" in text or not text:
        raise DiskImageError("the marker must be non-empty ASCII without NUL")
    code = boot_code() + text + b"\r\n\0"
    if len(code) > MBR_CODE_MAX:
        raise DiskImageError(f"marker too long: boot code and marker need {len(code)} bytes, "
                             f"an MBR has {MBR_CODE_MAX}")
    sector = bytearray(SECTOR)
    sector[:len(code)] = code
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def make_mbr_disk(path: PathLike, marker: str, size: int = DEFAULT_DISK_SIZE) -> str:
    """A raw disk image of `size` bytes (a multiple of 512) whose MBR prints `marker`; the
    partition table is empty and everything after sector 0 reads as zeroes."""
    if size < SECTOR or size % SECTOR:
        raise DiskImageError(f"disk size {size} is not a positive multiple of {SECTOR}")
    sector = boot_sector(marker)
    with open(path, "wb") as f:
        f.write(sector)
        f.truncate(size)
    return os.fspath(path)


def make_eltorito_iso(path: PathLike, marker: str, *, volume_id: str = "HVFRAME_TEST") -> str:
    """An ISO9660 image with an El Torito boot catalog holding one bootable x86 no-emulation
    entry: BOOT.IMG (2048 bytes: the boot sector, zero padded), loaded whole (4 virtual
    sectors) at the default segment 0x7C0. MARKER.TXT holds the marker as a plain file."""
    try:
        import pycdlib
    except ImportError:
        raise DiskImageError("pycdlib is needed to write ISO images "
                             "(pip install -r requirements-dev.txt)") from None
    image = boot_sector(marker).ljust(CD_SECTOR, b"\0")
    text = (marker + "\n").encode("ascii")
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=volume_id)
    try:
        iso.add_fp(io.BytesIO(image), len(image), "/BOOT.IMG;1")
        iso.add_fp(io.BytesIO(text), len(text), "/MARKER.TXT;1")
        iso.add_eltorito("/BOOT.IMG;1", bootcatfile="/BOOT.CAT;1", media_name="noemul",
                         boot_load_size=CD_SECTOR // SECTOR, platform_id=0)
        iso.write(os.fspath(path))
    finally:
        iso.close()
    return os.fspath(path)
