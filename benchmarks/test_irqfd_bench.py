"""Cost of delivering one MSI from a Python device thread: an irqfd (one eventfd write; KVM
delivers through the GSI's MSI route) against KVM_SIGNAL_MSI (one ioctl with the message).

The VM has one vCPU, created but not running, whose local APIC is software-enabled, so
every message is accepted into its IRR: both paths do the same work in KVM and differ only
in how they get there. Measured twice: the bare call (os.eventfd_write vs KvmVm.signal_msi)
and the whole device path, MsixCapability.notify (state checks under the capability lock,
then the irqfd, or PciFunction.send_msi as before irqfds).

    python -m pytest benchmarks/test_irqfd_bench.py
"""
import fcntl
import os

import pytest

from conftest import requires_kvm

pytestmark = requires_kvm
ROUNDS_PER_CALL = 1000      # calls per benchmark round: divide the times by this
MSG = (0xFEE00000, 0x40)    # APIC 0, vector 0x40, fixed, edge
KVM_GET_LAPIC = 0x8400AE8E  # _IOR(KVMIO, 0x8e, struct kvm_lapic_state), 1024 bytes
KVM_SET_LAPIC = 0x4400AE8F  # _IOW(KVMIO, 0x8f, struct kvm_lapic_state)
APIC_SVR = 0xF0
results = {}


@pytest.fixture(scope="module")
def machine():
    from hvframe.machine import Machine
    m = Machine(16 << 20)
    m.create_vcpus()
    lapic = bytearray(1024)
    fcntl.ioctl(m.vcpus[0].fd, KVM_GET_LAPIC, lapic)
    svr = int.from_bytes(lapic[APIC_SVR:APIC_SVR + 4], "little") | 0x1FF
    lapic[APIC_SVR:APIC_SVR + 4] = svr.to_bytes(4, "little")
    fcntl.ioctl(m.vcpus[0].fd, KVM_SET_LAPIC, lapic)
    yield m
    m.close()


@pytest.fixture(scope="module")
def testdev(machine):
    """pci-testdev on the machine, MSI-X enabled, vector 0 -> MSG, unmasked."""
    from hvframe.pci.bus import attach
    from hvframe.pci.msi import MSIX_CONTROL, MSIX_ENABLE
    from hvframe.pci.testdev import PciTestDev
    dev = attach(machine, PciTestDev(), {"pci.address": (0, 3, 0)})
    machine.pci.assign_bars()
    machine.pci.enable_all()
    for off, value in ((0, MSG[0]), (4, 0), (8, MSG[1]), (12, 0)):   # as a guest would
        dev.msix.bar_write(dev.msix.table_offset + off, 4, value)
    dev.config_write(dev.msix.offset + MSIX_CONTROL, 2, MSIX_ENABLE)
    assert dev.msix.irqfd(0) is not None and dev.msix.irqfd(0).message == MSG
    return dev


def loop(fn, *args):
    def run():
        for _ in range(ROUNDS_PER_CALL):
            fn(*args)
    return run


def record(benchmark, name):
    per_call = benchmark.stats.stats.min / ROUNDS_PER_CALL
    results[name] = per_call
    benchmark.extra_info["us_per_msi"] = per_call * 1e6


def report(a, b):
    if a in results and b in results:
        print(f"\n{a} {results[a] * 1e6:.3f} us/MSI, {b} {results[b] * 1e6:.3f} us/MSI, "
              f"ratio {results[b] / results[a]:.2f}")


def test_irqfd_eventfd_write(benchmark, machine):
    irq = machine.add_msi_irqfd(*MSG)
    benchmark.extra_info["calls_per_round"] = ROUNDS_PER_CALL
    benchmark(loop(os.eventfd_write, irq.fd, 1))
    record(benchmark, "irqfd")


def test_signal_msi_ioctl(benchmark, machine):
    assert machine.vm.signal_msi(*MSG)      # accepted by the LAPIC
    benchmark.extra_info["calls_per_round"] = ROUNDS_PER_CALL
    benchmark(loop(machine.vm.signal_msi, *MSG))
    record(benchmark, "signal_msi")
    report("irqfd", "signal_msi")


def test_msix_notify_through_irqfd(benchmark, testdev):
    assert testdev.msix._fast[0] is testdev.msix.irqfd(0)   # the lock-free path
    benchmark.extra_info["calls_per_round"] = ROUNDS_PER_CALL
    benchmark(loop(testdev.msix.notify, 0))
    record(benchmark, "notify-irqfd")


def test_msix_notify_through_signal_msi(benchmark, testdev):
    """The same call with the vector's irqfd taken away: the path before irqfds."""
    from hvframe.pci import msi
    msix = testdev.msix
    saved = msix._irqfds[0], msix._fast[0]
    msix._irqfds[0], msix._fast[0] = msi._NO_IRQFD, None
    signalled = []
    real = testdev.send_msi
    testdev.send_msi = lambda a, d: signalled.append(1) or real(a, d)
    try:
        assert msix.notify(0) and signalled == [1]
        testdev.send_msi = real
        benchmark.extra_info["calls_per_round"] = ROUNDS_PER_CALL
        benchmark(loop(msix.notify, 0))
    finally:
        del testdev.send_msi
        msix._irqfds[0], msix._fast[0] = saved
    record(benchmark, "notify-signal_msi")
    report("notify-irqfd", "notify-signal_msi")
