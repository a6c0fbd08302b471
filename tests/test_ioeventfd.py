"""ioeventfd doorbells: a real guest's writes signal an eventfd inside KVM without exits to
user space, and a moved doorbell stops signalling at its old address."""
import pytest

from conftest import requires_kvm
from hvframe.exitbench import CountingPort
from hvframe.loader import load_kernel
from hvframe.machine import Machine
from hvframe.platform.acpi_pm import AcpiPm
from hvframe.errors import HvError
from hvframe.synthetic import SyntheticMachine

COUNT = 3000


def run_portloop(guest, setup):
    m = Machine(32 << 20, 1)
    try:
        boot = load_kernel(m.memory, guest, cmdline=f"count={COUNT}")
        m.create_vcpus()
        m.boot_direct(boot)
        AcpiPm(m)
        port = CountingPort()
        m.pio.register(0xE0, 1, port, name="doorbell")
        ev = setup(m)
        assert m.run(timeout=60) == 1, m.exit_reason
        return port.writes, ev.take(), m.vcpus[0].c.exits_io
    finally:
        m.close()


@requires_kvm
@pytest.mark.kvm
def test_guest_writes_signal_the_eventfd_without_exits(guest_dir):
    writes, signalled, exits = run_portloop(guest_dir["portloop"],
                                            lambda m: m.add_ioeventfd("pio", 0xE0, 1))
    assert signalled == COUNT
    assert writes == 0           # none reached the Python handler
    assert exits < COUNT         # and none left the kernel


@requires_kvm
@pytest.mark.kvm
def test_moved_doorbell_no_longer_answers_at_the_old_address(guest_dir):
    def setup(m):
        ev = m.add_ioeventfd("pio", 0xE0, 1)
        ev.move(0xE4)            # as when the guest moves the BAR holding the doorbell
        return ev
    writes, signalled, exits = run_portloop(guest_dir["portloop"], setup)
    assert signalled == 0
    assert writes == COUNT       # the old address is ordinary port I/O again


@requires_kvm
@pytest.mark.kvm
def test_datamatch_signals_only_matching_writes(guest_dir):
    # portloop writes the low byte of its counter: value 7 occurs COUNT // 256 (+1) times.
    writes, signalled, _ = run_portloop(guest_dir["portloop"],
                                        lambda m: m.add_ioeventfd("pio", 0xE0, 1, datamatch=7))
    expected = len([i for i in range(COUNT) if i & 0xFF == 7])
    assert signalled == expected
    assert writes == COUNT - expected


def test_synthetic_backend_leaves_doorbell_writes_to_the_bus():
    m = SyntheticMachine()
    ev = m.add_ioeventfd("mmio", 0xC0000000, 4)
    assert ev.take() == 0
    ev.signal()
    ev.signal()
    assert ev.take() == 2 and ev.take() == 0
    m.close()
    assert ev.fd == -1


def test_synthetic_machine_matches_ioeventfds_as_kvm_does():
    # SyntheticMachine(ioeventfds=True) stands in for KVM_IOEVENTFD: a matching write signals
    # the eventfd and reaches no handler; a moved doorbell, another length or another value
    # (datamatch) is ordinary I/O again.
    m = SyntheticMachine(1 << 20, ioeventfds=True)
    try:
        port = CountingPort()
        m.pio.register(0xE0, 8, port, name="doorbell")
        ev = m.add_ioeventfd("pio", 0xE0, 2, datamatch=7)
        m.io_write(0xE0, 2, 7)
        assert (ev.take(), port.writes) == (1, 0)
        # The same match names the eventfd to a driver written in C (benchmarks/rawloop.py).
        assert m.ioeventfd_for("pio", 0xE0, 2, 7) == ev.fd
        assert [m.ioeventfd_for(*w) for w in (("pio", 0xE0, 2, 8), ("pio", 0xE0, 1, 7),
                                               ("mmio", 0xE0, 2, 7))] == [-1, -1, -1]
        m.io_write(0xE0, 2, 8)                    # datamatch differs
        m.io_write(0xE0, 1, 7)                    # length differs
        assert (ev.take(), port.writes) == (0, 2)
        ev.move(0xE4)
        assert (m.ioeventfd_for("pio", 0xE0, 2, 7), m.ioeventfd_for("pio", 0xE4, 2, 7)) == \
            (-1, ev.fd)
        m.io_write(0xE0, 2, 7)
        assert (ev.take(), port.writes) == (0, 3)
        m.io_write(0xE4, 2, 7)
        assert (ev.take(), port.writes) == (1, 3)
    finally:
        m.close()
    plain = SyntheticMachine(1 << 20)             # without the option: every write dispatched
    try:
        port = CountingPort()
        plain.pio.register(0xE0, 2, port, name="doorbell")
        ev = plain.add_ioeventfd("pio", 0xE0, 2)
        plain.io_write(0xE0, 2, 1)
        assert (ev.take(), port.writes) == (0, 1)
    finally:
        plain.close()


@pytest.mark.parametrize("length, datamatch", [(0, 7), (3, None), (16, None), (2, -1)],
                         ids=["any-write-with-datamatch", "odd-length", "too-long",
                              "datamatch-not-64-bit"])
def test_what_kvm_refuses_the_synthetic_machine_refuses_too(length, datamatch):
    """KVM_IOEVENTFD takes lengths 0, 1, 2, 4 and 8, and no datamatch with length 0 (any
    write): a doorbell KVM would refuse is refused on the synthetic backend as well, so a
    device cannot pass its tests with one and fail on real hardware."""
    m = SyntheticMachine(1 << 20)
    try:
        with pytest.raises(ValueError, match="KVM"):
            m.add_ioeventfd("pio", 0xE0, length, datamatch=datamatch)
        assert m.ioeventfd_for("pio", 0xE0, length, 7) == -1
    finally:
        m.close()


def test_two_doorbells_kvm_would_call_one_are_refused():
    """KVM_IOEVENTFD's EEXIST on the synthetic backend too: a second doorbell at the same
    address and length is refused unless both match different values; one that matches any
    write collides with everything there; a doorbell moved away frees its place."""
    m = SyntheticMachine(1 << 20)
    try:
        a = m.add_ioeventfd("pio", None, 2, datamatch=0)
        b = m.add_ioeventfd("pio", None, 2, datamatch=1)
        c = m.add_ioeventfd("pio", None, 2)
        a.move(0xE0)
        b.move(0xE0)                                  # another value: KVM takes both
        with pytest.raises(HvError, match="EEXIST"):
            c.move(0xE0)                              # any value at 0xE0: both collide
        assert c.addr is None                         # bound nowhere
        a.move(None)
        b.move(0xE4)
        c.move(0xE0)                                  # free now
        assert m.ioeventfd_for("pio", 0xE0, 2, 5) == c.fd
        assert m.ioeventfd_for("mmio", 0xE0, 2, 5) == -1          # another bus
    finally:
        m.close()
