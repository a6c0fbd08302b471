"""virtio-blk from inside a real guest on /dev/kvm: tests/guests/virtio_blk.c, a small modern
virtio-pci driver, reads and writes sectors through queue 0 (doorbells by ioeventfd,
completions by MSI-X through irqfd) and the host checks the image file."""
import hashlib
import re

import pytest

from conftest import requires_kvm, run_hvframe

pytestmark = [requires_kvm, pytest.mark.kvm]

SECTORS = 2048
WRITTEN = range(1, 9)            # the guest writes sectors 1..8


def pattern(sector: int) -> bytes:
    return bytes((sector * 31 + j * 7 + 0x5A) & 0xFF for j in range(512))


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from hvframe.guests.build import build_guest
    return build_guest(["tests/guests/virtio_blk.c"],
                       tmp_path_factory.mktemp("vblk") / "virtio_blk.elf")


def run_guest(guest, disk, conf=""):
    p = run_hvframe(["run", "-m", "64M", "-s", "0,hostbridge",
                     "-s", f"2,virtio-blk,{disk}{conf}", "-l", "com1,stdio",
                     "--kernel", guest], input="", timeout=180)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "vblk done" in p.stdout, (p.stdout, p.stderr)
    return p.stdout


def field(out, name):
    m = re.search(rf"^vblk {name} (.*)$", out, re.M)
    assert m, (name, out)
    return m.group(1)


def make_image(path):
    path.write_bytes(bytes((i * 13 + 1) & 0xFF for i in range(SECTORS * 512)))
    return path


def test_guest_reads_and_writes_sectors(guest, tmp_path):
    disk = make_image(tmp_path / "disk.img")
    original = disk.read_bytes()
    out = run_guest(guest, disk, ",ser=HVF-KVM-1")
    assert field(out, "capacity") == str(SECTORS)
    assert field(out, "ro") == "0"
    first = int(field(out, "read0").split("first ")[1], 16)
    assert first == int.from_bytes(original[:4], "big")     # printed first byte first
    assert field(out, "write").startswith("status 0")
    assert "vblk readback ok" in out
    assert field(out, "batch") == "status 0 0 0 ok"
    assert field(out, "flush").startswith("status 0")
    assert field(out, "id") == 'status 0 "HVF-KVM-1"'
    assert field(out, "oob") == "status 1"          # read at sector == capacity: IOERR
    assert field(out, "unsupp") == "status 2"
    irqs = int(field(out, "irqs").split()[0])
    assert irqs >= 1                                # completions arrived by MSI-X
    image = disk.read_bytes()
    for s in WRITTEN:
        assert image[s * 512:(s + 1) * 512] == pattern(s), s
    assert image[9 * 512:] == original[9 * 512:]    # nothing else touched
    assert image[:512] == original[:512]


def test_read_only_image_gets_ioerr_and_stays_unchanged(guest, tmp_path):
    disk = make_image(tmp_path / "ro.img")
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    out = run_guest(guest, disk, ",ro")
    assert field(out, "ro") == "1"
    assert field(out, "write").startswith("status 1")     # VIRTIO_BLK_S_IOERR
    assert "vblk readback mismatch" in out
    assert field(out, "read0").startswith("status 0")     # reads still work
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == digest
