"""tests/diskimages.py: the images' structure, parsed here with struct (independently of the
writer), and, where QEMU and SeaBIOS are installed, that SeaBIOS boots them and the marker
appears on COM1."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import diskimages
from diskimages import DiskImageError, boot_code, make_eltorito_iso, make_mbr_disk

needs_toolchain = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("ld") is None,
                                     reason="gcc and ld are needed to assemble boot_marker.S")
pytestmark = needs_toolchain

CD = 2048


def test_boot_code_is_real_mode_code_starting_with_cli_and_far_jump():
    code = boot_code()
    assert code[0] == 0xFA                                  # cli
    assert code[1] == 0xEA                                  # ljmp ptr16:16
    offset, segment = struct.unpack_from("<HH", code, 2)
    assert segment == 0 and offset == 0x7C00 + 6            # 0000:7C06, the next instruction
    assert len(code) < 200


def test_mbr_disk_layout(tmp_path):
    path = make_mbr_disk(tmp_path / "disk.img", "MBR-MARKER-42", size=2 << 20)
    data = Path(path).read_bytes()
    assert len(data) == 2 << 20
    mbr = data[:512]
    assert mbr[510:512] == b"\x55\xaa"
    code = boot_code()
    assert mbr[:len(code)] == code                          # code at offset 0
    assert mbr[len(code):].startswith(b"MBR-MARKER-42\r\n\0")
    assert mbr[446:510] == bytes(64)                        # no partitions
    assert data[512:] == bytes(len(data) - 512)


def test_mbr_disk_default_size_and_errors(tmp_path):
    assert os.path.getsize(make_mbr_disk(tmp_path / "d.img", "x")) == diskimages.DEFAULT_DISK_SIZE
    with pytest.raises(DiskImageError, match="too long"):
        make_mbr_disk(tmp_path / "long.img", "M" * 400)
    with pytest.raises(DiskImageError, match="multiple of 512"):
        make_mbr_disk(tmp_path / "odd.img", "x", size=1000)
    with pytest.raises(DiskImageError):
        make_mbr_disk(tmp_path / "nul.img", "a\0b")


def parse_eltorito(data: bytes) -> dict:
    """Primary volume descriptor at sector 16, El Torito boot record among the descriptors,
    validation entry and initial/default entry of the boot catalog."""
    assert data[16 * CD:16 * CD + 6] == b"\x01CD001", "no primary volume descriptor"
    catalog = None
    for lba in range(16, 32):
        vd = data[lba * CD:(lba + 1) * CD]
        assert vd[1:6] == b"CD001", f"descriptor {lba} lacks CD001"
        if vd[0] == 0xFF:                                   # set terminator
            break
        if vd[0] == 0:                                      # boot record
            assert vd[7:7 + 32].rstrip(b"\0") == b"EL TORITO SPECIFICATION"
            catalog = struct.unpack_from("<I", vd, 0x47)[0]
    assert catalog, "no El Torito boot record"
    cat = data[catalog * CD:catalog * CD + 64]
    validation, initial = cat[:32], cat[32:64]
    assert validation[0] == 1                               # header ID
    assert validation[30:32] == b"\x55\xaa"
    assert sum(struct.unpack("<16H", validation)) & 0xFFFF == 0, "validation checksum"
    boot_ind, media, load_seg, _systype, count, rba = struct.unpack_from("<BBHBxHI", initial)
    return dict(platform=validation[1], boot_indicator=boot_ind, media=media,
                load_segment=load_seg, sectors=count, rba=rba)


def test_iso_has_a_no_emulation_x86_boot_entry_with_the_marker(tmp_path):
    pytest.importorskip("pycdlib", reason="pycdlib (requirements-dev.txt) writes the ISO")
    path = make_eltorito_iso(tmp_path / "boot.iso", "ISO-MARKER-7")
    data = Path(path).read_bytes()
    assert len(data) % CD == 0
    e = parse_eltorito(data)
    assert e["platform"] == 0                               # x86
    assert e["boot_indicator"] == 0x88                      # bootable
    assert e["media"] == 0                                  # no emulation
    assert e["load_segment"] in (0, 0x7C0)                  # 0 means the default, 0x7C0
    assert e["sectors"] == 4                                # 512-byte virtual sectors
    image = data[e["rba"] * CD:e["rba"] * CD + e["sectors"] * 512]
    assert image.startswith(boot_code())
    assert b"ISO-MARKER-7\r\n\0" in image


# ---- booting them under QEMU + SeaBIOS (the reference machine) ----

QEMU = shutil.which("qemu-system-x86_64")
SEABIOS = "/usr/share/seabios/bios.bin"


def qemu_unusable() -> str | None:
    if QEMU is None:
        return "qemu-system-x86_64 is not installed (Debian: qemu-system-x86)"
    if not os.path.exists(SEABIOS):
        return f"{SEABIOS} is missing (Debian: seabios)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not usable"
    return None


def boot_under_qemu(devices: list[str], timeout: float = 20) -> str:
    """Run QEMU+SeaBIOS until the boot sector powers it off (ACPI, port 0x604) or the
    timeout; returns what appeared on COM1."""
    cmd = [QEMU, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-M", "pc", "-m", "64M",
           "-bios", SEABIOS, "-display", "none", "-serial", "stdio", "-monitor", "none",
           "-no-reboot", "-net", "none", *devices]
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        return p.stdout.decode("latin-1")
    except subprocess.TimeoutExpired as e:
        return (e.stdout or b"").decode("latin-1")


@pytest.mark.kvm
@pytest.mark.skipif(qemu_unusable() is not None, reason=str(qemu_unusable()))
@pytest.mark.parametrize("controller", ["virtio", "ahci"])
def test_seabios_boots_the_mbr_under_qemu(tmp_path, controller):
    disk = make_mbr_disk(tmp_path / "disk.img", f"MBR-MARKER-{controller}")
    drive = ["-drive", f"file={disk},if=none,id=d0,format=raw"]
    dev = (["-device", "virtio-blk-pci,drive=d0,bootindex=0"] if controller == "virtio" else
           ["-device", "ahci,id=ahci", "-device", "ide-hd,drive=d0,bus=ahci.0,bootindex=0"])
    out = boot_under_qemu(drive + dev)
    assert f"MBR-MARKER-{controller}\r\n" in out, out


@pytest.mark.kvm
@pytest.mark.skipif(qemu_unusable() is not None, reason=str(qemu_unusable()))
def test_seabios_boots_the_iso_from_an_ahci_cd_under_qemu(tmp_path):
    pytest.importorskip("pycdlib", reason="pycdlib (requirements-dev.txt) writes the ISO")
    iso = make_eltorito_iso(tmp_path / "boot.iso", "ISO-MARKER-ahci")
    out = boot_under_qemu(["-drive", f"file={iso},if=none,id=c0,format=raw,media=cdrom,readonly=on",
                           "-device", "ahci,id=ahci",
                           "-device", "ide-cd,drive=c0,bus=ahci.0,bootindex=0"])
    assert "ISO-MARKER-ahci\r\n" in out, out
