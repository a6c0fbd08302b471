"""Closing a machine whose coalesced-writes ring is held by a thread that does not come back
(a buffered write handed to a handler that blocks): close() must still return, leaving what
that thread may touch (the ring, the VM) alone, as it does for a stuck vCPU."""
import threading
import time

import pytest

from conftest import requires_kvm
from hvframe import concurrency
from hvframe.machine import Machine

pytestmark = [requires_kvm, pytest.mark.kvm]


class BlockingPort:
    """COM1's ports as a polled console sees them (THR always empty); a THR write the drain
    thread hands on blocks until released."""

    def __init__(self):
        self.blocked = threading.Event()
        self.release = threading.Event()

    def read(self, offset, size):
        return 0x60 if offset == 5 else 0

    def write(self, offset, size, value):
        if offset == 0 and threading.current_thread().name == "coalesced-drain" \
                and not self.blocked.is_set():
            self.blocked.set()
            self.release.wait(60)


def test_close_returns_while_a_drainer_is_stuck_in_a_handler(guest_dir, monkeypatch):
    from hvframe.loader import load_kernel
    from hvframe.platform.acpi_pm import AcpiPm
    m = Machine(64 << 20, 1)
    port = BlockingPort()
    try:
        boot = load_kernel(m.memory, guest_dir["console"], cmdline="count=50 halt=1")
        m.create_vcpus()
        m.boot_direct(boot)
        zone = m.coalesce_writes("pio", 0x3F8, 1)
        if zone is None:
            pytest.skip("this host's KVM has no KVM_CAP_COALESCED_PIO")
        m.pio.register(0x3F8, 8, port, name="com1")
        zone.enable(True)
        AcpiPm(m)
        threading.Thread(target=m.run, kwargs={"timeout": 120}, daemon=True).start()
        assert port.blocked.wait(30)        # the halted guest's last byte, in the drain thread
        monkeypatch.setattr(concurrency, "JOIN_DEADLINE", 0.5)
        closer = threading.Thread(target=m.close, daemon=True)
        t0 = time.monotonic()
        closer.start()
        closer.join(20)
        assert not closer.is_alive(), "close() hung on the ring's lock"
        assert time.monotonic() - t0 < 20
        assert m.vm is not None             # left alone: the stuck drainer still uses the ring
    finally:
        port.release.set()
        # Unstuck, the drainer returns; give back what close() left alone, so that later
        # tests (tests/test_machine_lifetime.py counts KVM mappings) start clean.
        if m._drain_thread is not None:
            m._drain_thread.join(10)
        for t in m._vcpu_threads:
            t.join(10)
        if m.vm is not None and not (m._drain_thread and m._drain_thread.is_alive()):
            m._release_kvm_and_ram()
