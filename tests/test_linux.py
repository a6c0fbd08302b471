"""Linux's own drivers as clients: the test kernel of scripts/build-test-kernel.sh, booted by
PVH under hvframe, with its console on COM1. Slow (about a minute on nested KVM)."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import requires_kvm, run_hvframe
from linux_kernel import CMDLINE, built_kernel, newc_cpio

KERNEL = built_kernel()
pytestmark = [requires_kvm, pytest.mark.kvm,
              pytest.mark.skipif(KERNEL is None, reason="the Linux test kernel is not built: run "
                                 "scripts/build-test-kernel.sh (about 5 minutes, cached)")]


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory):
    # /init exists, so the kernel gets as far as starting it; user space itself cannot run on
    # nested KVM hosts (see scripts/linux/README.md), so what it contains does not matter.
    path = tmp_path_factory.mktemp("initramfs") / "initramfs.cpio"
    path.write_bytes(newc_cpio({"dev": (0o040755, b""), "init": (0o100755, b"#!/bin/sh\nexit 0\n")}))
    return str(path)


def boot_linux(initramfs, args, cmdline, timeout):
    """(Timeouts: the kernel's 250 Hz tick now reaches it, since the PIT is routed to IOAPIC pin 2
    as the MP table says, and every tick is emulated here, so a boot takes several minutes.)
    Boot the test kernel with COM1 on stdout; it must reach init, then (there being no user
    space here) panic and, with panic=-1, reboot: exit 0. Returns the console. Without an
    initramfs the kernel mounts its root= device and looks for /sbin/init there."""
    initrd = ["--initrd", initramfs] if initramfs else []
    p = run_hvframe(["run", "-m", "128M", *args, "-l", "com1,stdio", "--kernel", KERNEL,
                     *initrd, "-a", cmdline], input="", timeout=timeout)
    assert ("Run /init as init process" if initramfs else "Run /sbin/init as init process") \
        in p.stdout, p.stdout[-3000:]
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_linux_boots_to_init_with_console_on_com1_and_pci_listed(initramfs):
    """acpi=off: CPUs and interrupt routing come from hvframe's MP table; both vCPUs come up.
    A PCI UART in slot 2 is found by Linux's 8250_pci driver."""
    out = boot_linux(initramfs, ["-c", "2", "-s", "0,hostbridge", "-s", "2,uart,null"],
                     CMDLINE + " acpi=off", timeout=900)
    assert "Linux version 6.1" in out
    assert "pci 0000:00:00.0: [8086:1237] type 00 class 0x060000" in out
    assert "serial8250: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A" in out
    assert "Intel MultiProcessor Specification v1.4" in out
    assert "smp: Brought up 1 node, 2 CPUs" in out
    assert "pci 0000:00:02.0: [1b36:0002] type 00 class 0x070002" in out
    assert re.search(r"0000:00:02\.0: ttyS\d at I/O 0x[0-9a-f]+ \(irq = \d+, base_baud = 115200\) is a 16550A", out)


def test_linux_boots_with_the_acpi_tables(initramfs):
    """The same kernel without acpi=off: it finds hvframe's RSDP, MADT, MCFG and DSDT (slower:
    its AML interpreter runs emulated here)."""
    out = boot_linux(initramfs, ["-s", "0,hostbridge", "-s", "31,lpc"], CMDLINE, timeout=900)
    assert "ACPI: RSDP 0x00000000000E0000" in out
    assert "ACPI: Using IOAPIC for interrupt routing" in out
    assert "PCI: MMCONFIG for domain 0000 [bus 00-ff] at [mem 0xe0000000-0xefffffff]" in out
    assert "ACPI: PCI Root Bridge [PCI0]" in out
    assert "pci 0000:00:1f.0: [8086:7000] type 00 class 0x060100" in out
    assert "ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A" in out


def e2fs_tool(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def superblock(image):
    out = subprocess.run([e2fs_tool("dumpe2fs"), "-h", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


@pytest.mark.skipif(e2fs_tool("mke2fs") is None or e2fs_tool("dumpe2fs") is None,
                    reason="needs e2fsprogs (mke2fs, dumpe2fs)")
def test_linux_mounts_ext2_root_from_virtio_blk_read_write(tmp_path):
    """root=/dev/vda rw: Linux's virtio_blk driver finds the disk with the image's size and
    mounts the ext2 root read-write; the superblock in the image file shows the mount."""
    image = tmp_path / "root.img"
    with open(image, "wb") as f:
        f.truncate(24 << 20)
    subprocess.run([e2fs_tool("mke2fs"), "-q", "-F", "-t", "ext2", "-L", "hvroot", str(image)], check=True)
    before = superblock(image)
    assert before["Mount count"].strip() == "0"
    out = boot_linux(None, ["-s", "0,hostbridge", "-s", f"2,virtio-blk,{image}"],
                     CMDLINE + " acpi=off root=/dev/vda rw", timeout=900)
    assert "virtio_blk virtio0: [vda] 49152 512-byte logical blocks" in out
    assert "VFS: Mounted root (ext2 filesystem) on device 254:0." in out
    after = superblock(image)
    assert after["Mount count"].strip() == "1"
    assert after["Filesystem state"].strip() == "not clean"    # mounted, never unmounted
    assert after["Last write time"] != before["Last write time"]


@pytest.mark.skipif(e2fs_tool("mke2fs") is None or e2fs_tool("dumpe2fs") is None,
                    reason="needs e2fsprogs (mke2fs, dumpe2fs)")
def test_linux_ahci_attaches_disk_and_cd_and_mounts_root_read_write(tmp_path):
    """Linux's ahci driver brings both links up, reads IDENTIFY (the configured model, NCQ),
    attaches the disk as sda and the CD as sr0, and mounts the ext2 root from sda read-write."""
    pytest.importorskip("pycdlib", reason="the CD image is written with pycdlib")
    from diskimages import make_eltorito_iso
    image = tmp_path / "root.img"
    with open(image, "wb") as f:
        f.truncate(24 << 20)
    subprocess.run([e2fs_tool("mke2fs"), "-q", "-F", "-t", "ext2", str(image)], check=True)
    iso = make_eltorito_iso(tmp_path / "cd.iso", "HVF-LINUX-CD")
    out = boot_linux(None, ["-s", "0,hostbridge",
                            "-s", f"4,ahci,hd:{image},model=HVF Root Disk,ser=HVFROOT1,cd:{iso}"],
                     CMDLINE + " acpi=off root=/dev/sda rw", timeout=900)
    assert "ata1: SATA link up" in out and "ata2: SATA link up" in out
    # Every command completed in time. libata retries a timed-out IDENTIFY after a COMRESET,
    # and that often works: without this a lost or late completion hid behind the retry.
    assert not re.search(r"qc timeout|failed to IDENTIFY|failed command", out), \
        [line for line in out.splitlines() if re.search(r"ata\d", line)]
    assert "ata1.00: ATA-10: HVF Root Disk" in out
    assert "ata1.00: 49152 sectors, multi 0: LBA48 NCQ (depth 32)" in out
    assert "ata2.00: ATAPI:" in out
    assert "sd 0:0:0:0: [sda] 49152 512-byte logical blocks" in out
    assert re.search(r"sr 1:0:0:0: \[sr0\]", out)
    assert "VFS: Mounted root (ext2 filesystem) on device 8:0." in out
    after = superblock(image)
    assert after["Mount count"].strip() == "1"
    assert after["Filesystem state"].strip() == "not clean"
