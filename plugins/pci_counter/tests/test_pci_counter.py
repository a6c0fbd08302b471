"""pci-counter driven as a guest would drive it: PCI configuration through 0xcf8/0xcfc, its
BAR as MMIO exits through the dispatch core, MSI-X messages as the machine records them.
Fixtures (device_rig, pci_config) come from hvframe's pytest plugin."""
import threading

import pytest

from hvframe.errors import ConfigError
from hvframe_pci_counter.pci_counter import (DEVICE, MAGIC, MSIX_OFFSET, REG, STATUS_BAD_VECTOR,
                                             VENDOR)
from hvframe_pci_counter.plugin import MAX_VECTORS

SLOT = 4
MSIX_CAP_ID = 0x11


class Guest:
    """What a guest's driver does: find the BAR, program MSI-X, use the registers."""

    def __init__(self, m, cfg):
        self.m, self.cfg = m, cfg
        self.bar = cfg.bar(0)

    def route(self, vector, data, masked=False):
        entry = self.bar + MSIX_OFFSET + 16 * vector
        for off, value in ((0, 0xFEE00000), (4, 0), (8, data), (12, int(masked))):
            self.m.mmio_write(entry + off, 4, value)

    def enable_msix(self):
        cap = self.cfg.capability(MSIX_CAP_ID)
        self.cfg.write(cap + 2, 2, self.cfg.read(cap + 2, 2) | 0x8000)

    def reg(self, name, value=None, size=4):
        if value is None:
            return self.m.mmio_read(self.bar + REG[name], size)
        self.m.mmio_write(self.bar + REG[name], size, value)


@pytest.fixture
def guest(device_rig, pci_config):
    m, _ = device_rig(f"-s {SLOT},pci-counter,vectors=4")
    return Guest(m, pci_config(m, SLOT))


@pytest.fixture
def machine(guest):
    return guest.m


def test_identity_and_one_memory_bar(guest):
    cfg = guest.cfg
    assert (cfg.vendor_id, cfg.device_id) == (VENDOR, DEVICE)
    assert 0xC0000000 <= guest.bar < 0xE0000000
    assert cfg.bar_size(0) == 0x1000
    assert [cfg.bar_size(i) for i in range(1, 6)] == [0] * 5               # no other BAR
    assert guest.reg("magic") == MAGIC
    assert cfg.read(cfg.capability(MSIX_CAP_ID) + 2, 2) & 0x7FF == 3      # 4 vectors


def test_doorbell_counts_and_raises_the_chosen_msix_vector(machine, guest):
    guest.route(0, 0x40)
    guest.route(2, 0x42)
    guest.enable_msix()
    guest.reg("doorbell", 5)
    guest.reg("vector", 2)
    guest.reg("doorbell", 7)
    assert guest.reg("count") == 12
    assert machine.msis == [(0xFEE00000, 0x40), (0xFEE00000, 0x42)]
    assert guest.reg("interrupts") == 2 and guest.reg("doorbell") == 0


def test_masked_vector_stays_pending_and_fires_on_unmask(machine, guest):
    guest.route(0, 0x40, masked=True)
    guest.enable_msix()
    guest.reg("doorbell", 1)
    assert machine.msis == []
    guest.route(0, 0x40)                       # unmask
    assert machine.msis == [(0xFEE00000, 0x40)]


def test_doorbell_with_msix_off_raises_nothing_and_is_counted(machine, guest):
    guest.reg("doorbell", 3)
    assert machine.msis == [] and guest.reg("count") == 3 and guest.reg("dropped") == 1


def test_bad_vector_is_refused_with_a_status_bit(guest):
    guest.reg("vector", 1)
    guest.reg("vector", 4)                     # outside the 4-entry table
    assert guest.reg("vector") == 1
    assert guest.reg("status") == STATUS_BAD_VECTOR
    guest.reg("status", STATUS_BAD_VECTOR)     # write 1 to clear
    assert guest.reg("status") == 0


def test_odd_accesses_are_answered_not_raised(machine, guest):
    guest.reg("magic", 0)                      # read-only
    assert guest.reg("magic") == MAGIC
    assert machine.mmio_read(guest.bar + 1, 2) == (MAGIC >> 8) & 0xFFFF   # inside a field
    assert machine.mmio_read(guest.bar + 0x400, 4) == 0                     # between regions
    machine.mmio_write(guest.bar + REG["count"] + 2, 1, 0xFF)
    machine.mmio_write(guest.bar + MSIX_OFFSET + 3, 1, 0xFF)                # a byte of the table
    assert guest.reg("count") == 0


def test_doorbells_from_many_vcpus_are_all_counted(guest):
    def ring():
        for _ in range(500):
            guest.reg("doorbell", 1)
    threads = [threading.Thread(target=ring) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert guest.reg("count") == 2000


@pytest.mark.parametrize("conf, words", [
    ("vectors=0", f"vectors=0 must be 1-{MAX_VECTORS}"),
    (f"vectors={MAX_VECTORS + 1}", f"vectors={MAX_VECTORS + 1} must be 1-{MAX_VECTORS}"),
    ("speed=9", "unexpected option 'speed=9'")])
def test_bad_options_are_one_config_error(device_rig, conf, words):
    with pytest.raises(ConfigError, match=words):
        device_rig(f"-s {SLOT},pci-counter,{conf}")


def test_checkpoint_moves_registers_and_msix_to_a_new_machine(machine, guest, device_rig,
                                                             pci_config):
    """Counter, vector, status, MSI-X routes (one masked with an interrupt pending) saved and
    loaded into a machine built from the same line: the guest reads the same registers and
    its next doorbell and unmask raise the vectors it programmed, at the BAR it chose."""
    from hvframe.snapshot.state import decode_into, encode
    guest.route(1, 0x41)
    guest.route(2, 0x42, masked=True)
    guest.enable_msix()
    guest.reg("vector", 2)
    guest.reg("doorbell", 9)                   # pending on the masked vector
    guest.reg("vector", 7)                     # refused: BAD_VECTOR
    guest.reg("vector", 1)
    fa = machine.pci.lookup(0, SLOT, 0)
    record = encode(fa)

    mb, (fb,) = device_rig(f"-s {SLOT},pci-counter,vectors=4", direct_boot=False)
    decode_into(fb, record, "pci-counter")
    b = Guest(mb, pci_config(mb, SLOT))
    assert b.bar == guest.bar
    assert [b.reg(r) for r in ("count", "vector", "status", "interrupts")] == \
        [9, 1, STATUS_BAD_VECTOR, 1]
    b.reg("doorbell", 1)
    assert mb.msis == [(0xFEE00000, 0x41)]
    b.route(2, 0x42)                           # unmask: the pending interrupt arrives
    assert mb.msis == [(0xFEE00000, 0x41), (0xFEE00000, 0x42)]
    assert b.reg("count") == 10

    with pytest.raises(ConfigError, match="state version 2") as e:
        decode_into(fb, b"\x02\x00" + record[2:], "pci-counter")
    assert "\n" not in str(e.value)
    mc, (fc,) = device_rig(f"-s {SLOT},pci-counter,vectors=2", direct_boot=False)
    with pytest.raises(ConfigError, match="MSI-X table size"):
        decode_into(fc, record, "pci-counter")
