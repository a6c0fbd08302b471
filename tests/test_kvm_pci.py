"""PCI from inside a real guest on /dev/kvm: enumeration through 0xcf8/0xcfc and ECAM, moving
a BAR, and MSI-X, INTx (through the in-kernel IOAPIC) and MSI interrupts from pci-testdev.
The guest is tests/guests/pci_irq.c."""
import re

import pytest

from conftest import requires_kvm, run_hvframe

pytestmark = [requires_kvm, pytest.mark.kvm]

ARGS = ["run", "-m", "64M", "-s", "0,hostbridge", "-s", "3,pci-testdev", "-l", "com1,stdio"]


@pytest.fixture(scope="module")
def pci_irq_run(tmp_path_factory):
    from hvframe.guests.build import build_guest
    elf = build_guest(["tests/guests/pci_irq.c"],
                      tmp_path_factory.mktemp("pci_irq") / "pci_irq.elf")
    p = run_hvframe(ARGS + ["--kernel", elf], input="", timeout=180)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "pci_irq done" in p.stdout, (p.stdout, p.stderr)
    return p.stdout


def test_enumeration_through_cf8_and_ecam_agree(pci_irq_run):
    found = re.findall(r"pci 00:([0-9a-f]{2})\.(\d) cf8 (\w{4}:\w{4}) ecam (\w{4}:\w{4})",
                       pci_irq_run)
    assert [(s, f) for s, f, _, _ in found] == [("00", "0"), ("03", "0")]
    assert [(a, b) for _, _, a, b in found] == [("8086:1237", "8086:1237"),
                                                 ("1b36:0005", "1b36:0005")]


def test_bar0_magic_and_move(pci_irq_run):
    m = re.search(r"testdev bar0 (\w+) magic (\w+)", pci_irq_run)
    assert m and m.group(2) == "48564652"
    old = int(m.group(1), 16)
    assert 0xC0000000 <= old < 0xE0000000
    m = re.search(r"testdev moved bar0 (\w+) magic (\w+) old (\w+)", pci_irq_run)
    assert m and int(m.group(1), 16) == old + 0x100000
    assert m.group(2) == "48564652" and m.group(3) == "ffffffff"


def test_msix_interrupt(pci_irq_run):
    assert "msix vector 0x40 received" in pci_irq_run


def test_intx_interrupt_through_ioapic(pci_irq_run):
    assert "intx vector 0x41 received (gsi 19)" in pci_irq_run  # 16 + (slot 3 + INTA - 1) % 4
    assert "intx level after ack 0" in pci_irq_run


def test_msi_interrupt(pci_irq_run):
    assert "msi vector 0x42 received" in pci_irq_run
    m = re.search(r"interrupt counts msix (\d+) intx (\d+) msi (\d+) spurious (\d+)", pci_irq_run)
    assert m and int(m.group(1)) == 1 and int(m.group(3)) == 1
    assert int(m.group(2)) >= 1
