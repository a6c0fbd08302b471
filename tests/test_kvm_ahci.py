"""AHCI from inside a real guest on /dev/kvm: tests/guests/ahci.c, a small AHCI driver, brings
port 0 up and issues IDENTIFY, DMA reads and writes with fragmented PRD tables, NCQ with four
tags outstanding, FLUSH, TRIM and an out-of-range read; the host checks the image file."""
import re

import pytest

from conftest import requires_kvm, run_hvframe

pytestmark = [requires_kvm, pytest.mark.kvm]

SECTORS = 2048


def pattern(lba: int) -> bytes:
    return bytes((lba * 31 + j * 7 + 0x5A) & 0xFF for j in range(512))


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from hvframe.guests.build import build_guest
    return build_guest(["tests/guests/ahci.c"], tmp_path_factory.mktemp("ahci") / "ahci.elf")


def field(out, name):
    m = re.search(rf"^ahci {name} (.*)$", out, re.M)
    assert m, (name, out)
    return m.group(1)


def test_guest_drives_the_hba(guest, tmp_path):
    disk = tmp_path / "disk.img"
    original = (bytes(range(256)) * 2).ljust(SECTORS * 512, b"\x11")
    disk.write_bytes(original)
    p = run_hvframe(["run", "-m", "64M", "-s", "0,hostbridge",
                     "-s", f"3,ahci,hd:{disk},ser=HVF-SER-9,model=HVF Test Disk",
                     "-l", "com1,stdio", "--kernel", guest], input="", timeout=180)
    out = p.stdout
    assert p.returncode == 1 and "ahci done" in out, (out, p.stderr)
    assert field(out, "pci").endswith("id 8086:2922") or "8086:2922" in field(out, "pci")
    assert field(out, "model") == '"HVF Test Disk"'
    assert field(out, "serial") == '"HVF-SER-9"'
    assert re.match(rf"{SECTORS} lba48 1 ncq 1 depth 32 trim 1", field(out, "sectors"))
    assert field(out, "read0").endswith("sum c03fbf00 first 00010203")
    assert "ahci readback ok" in out
    assert re.match(r"tags 4 sact_set f maxsact \d tfd 50 is 8 sact 0$", field(out, "ncq write"))
    # (The reads are in the page cache, so they are usually served in the PxCI write's exit
    # itself, maxsact 0; not always: the write round's completion offers the exit the port
    # again only after the guest can see it.)
    assert re.match(r"tags 4 sact_set f maxsact \d tfd 50 is 8 sact 0 ok$", field(out, "ncq read"))
    assert field(out, "flush") == "tfd 50"
    assert field(out, "trim").endswith("after zero")
    oob = field(out, "oob")                 # ERR in the task file, TFES in PxIS
    assert re.match(r"tfd [0-9a-f]*[13579bdf]\b", oob) and oob.endswith("err 1 tfes 1"), oob
    assert field(out, "recover").startswith("ok")
    assert field(out, "reread").endswith("ok")
    assert int(field(out, "irqs").split()[0]) >= 1
    image = disk.read_bytes()
    for lba in list(range(1, 9)) + list(range(32, 40)):
        assert image[lba * 512:(lba + 1) * 512] == pattern(lba), lba
    assert image[64 * 512:72 * 512] == bytes(8 * 512)       # trimmed: reads back zeros
    assert image[:512] == original[:512]
    assert image[72 * 512:] == original[72 * 512:]
