"""SeaBIOS (Debian's `seabios` package) boots under hvframe from the boot ROM to
"No bootable device": the LPC bridge, fw_cfg (etc/sercon-port puts its console on COM1),
CMOS memory sizing and the reset paths, end to end on /dev/kvm."""
import os

import pytest

from conftest import KVM_MISSING, run_hvframe
from hvframe.lpc.bridge import machine_uuid
from hvframe.plugins import Registry

BIOS = "/usr/share/seabios/bios.bin"
BIOS_256K = "/usr/share/seabios/bios-256k.bin"

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(KVM_MISSING is not None, reason=f"needs KVM: {KVM_MISSING}"),
]


def _need(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing (apt-get install seabios)")
    if Registry().get("com1", "lpc") is None:
        pytest.skip("the hvframe-uart plugin (com1) is not installed")


def boot(bios, *extra, name=None):
    # reboot-timeout=0: SeaBIOS retries at once after "No bootable device" and resets the
    # machine through port 0xcf9, which ends the run with exit status 0.
    return run_hvframe(["run", *extra, "-s", "0,hostbridge", "-s", "31,lpc,reboot-timeout=0",
                        "-l", "com1,stdio", "-l", f"bootrom,{bios}", "-v", "--timeout", "60",
                        *([name] if name else [])],
                       input="", timeout=90)


def check(p, system_uuid=None):
    assert "SeaBIOS (version" in p.stdout, (p.stdout, p.stderr)
    # SeaBIOS installed the SMBIOS tables fw_cfg handed it: it shows their system UUID
    # (an unnamed VM's is the host's).
    assert f"Machine UUID {system_uuid or machine_uuid()}" in p.stdout, p.stdout
    assert "No bootable device" in p.stdout, (p.stdout, p.stderr)
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert "guest reset" in p.stderr
    assert " failed " not in p.stderr      # no device handler raised


def test_seabios_reaches_no_bootable_device():
    _need(BIOS)
    check(boot(BIOS, "-m", "128M"))


def test_seabios_256k_two_cpus_ram_above_4g_and_the_uuid_given_with_U():
    _need(BIOS_256K)
    given = "5e1f0c1e-3f5a-4c1b-9d7e-0123456789ab"
    check(boot(BIOS_256K, "-m", "4G", "-c", "2", "-U", given), given)


def test_seabios_boots_the_mbr_of_a_virtio_blk_disk(tmp_path):
    """SeaBIOS's virtio-blk driver finds the disk and runs its MBR, which prints a marker on
    COM1 and powers off (tests/diskimages.py, tests/guests/boot_marker.S)."""
    _need(BIOS)
    from diskimages import make_mbr_disk
    disk = make_mbr_disk(tmp_path / "mbr.img", "HVF-VIRTIO-MBR-7")
    p = boot(BIOS, "-m", "128M", "-s", f"2,virtio-blk,{disk}", name="mbr1")
    assert "SeaBIOS (version" in p.stdout, (p.stdout, p.stderr)
    # A named VM's system UUID is its own (hvframe.runner.system_uuid), not the host's.
    from hvframe.config import Config
    from hvframe.runner import system_uuid
    named = Config()
    named.set("name", "mbr1")
    assert f"Machine UUID {system_uuid(named)}" in p.stdout, p.stdout
    assert system_uuid(named) != machine_uuid()
    assert "Booting from Hard Disk" in p.stdout
    assert "HVF-VIRTIO-MBR-7" in p.stdout, (p.stdout, p.stderr)
    assert p.returncode == 1, (p.returncode, p.stderr)    # the MBR powered off


def test_seabios_boots_the_mbr_of_an_ahci_disk(tmp_path):
    """SeaBIOS's AHCI driver finds the SATA disk behind hvframe's HBA and runs its MBR."""
    _need(BIOS)
    from diskimages import make_mbr_disk
    disk = make_mbr_disk(tmp_path / "mbr.img", "HVF-AHCI-MBR-3")
    p = boot(BIOS, "-m", "128M", "-s", f"4,ahci,hd:{disk}")
    assert "Booting from Hard Disk" in p.stdout, (p.stdout, p.stderr)
    assert "HVF-AHCI-MBR-3" in p.stdout, (p.stdout, p.stderr)
    assert p.returncode == 1, (p.returncode, p.stderr)


def test_seabios_boots_an_el_torito_cd_from_ahci(tmp_path):
    """An ISO9660 image with a no-emulation El Torito boot image on an AHCI ATAPI CD-ROM."""
    _need(BIOS)
    pytest.importorskip("pycdlib", reason="the ISO is written with pycdlib (requirements-dev)")
    from diskimages import make_eltorito_iso
    iso = make_eltorito_iso(tmp_path / "boot.iso", "HVF-AHCI-CD-5")
    p = boot(BIOS, "-m", "128M", "-s", f"4,ahci,cd:{iso}")
    assert "Booting from DVD/CD" in p.stdout, (p.stdout, p.stderr)
    assert "HVF-AHCI-CD-5" in p.stdout, (p.stdout, p.stderr)
    assert p.returncode == 1, (p.returncode, p.stderr)
