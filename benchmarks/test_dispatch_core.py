"""The dispatch core with the synthetic backend: cost per exit by kind of handler.

    python -m pytest benchmarks/test_dispatch_core.py
"""
import pytest

from hvframe.core_native import lib
from hvframe.synthetic import SyntheticMachine

EXITS = 10000  # per round: divide the times below by this for the cost of one exit


class Register:
    def __init__(self):
        self.value = 0

    def read(self, offset, size):
        return self.value

    def write(self, offset, size, value):
        self.value = value


def machine_with_devices():
    m = SyntheticMachine()
    # Many ranges, so that the lookup is a real binary search.
    for i in range(64):
        m.pio.register(0x1000 + i * 16, 8, Register(), name=f"reg{i}")
        m.mmio.register(0xC0000000 + i * 0x1000, 0x100, Register(), name=f"mreg{i}")
    m.pio.register_native(0x80, 1, lib.hv_native_sink, name="post")
    return m


@pytest.mark.parametrize("kind, port", [("python-write", 0x1200), ("native-write", 0x80),
                                        ("unclaimed-write", 0x900)])
def test_port_write_exits(benchmark, kind, port):
    m = machine_with_devices()
    batch = [(port, 1, 0x41, True)] * EXITS
    benchmark.extra_info["exits_per_round"] = EXITS
    benchmark(m.prepare_exits(batch).run_only)


def test_port_read_exits_python(benchmark):
    m = machine_with_devices()
    batch = [(0x1200, 4, 0, False)] * EXITS
    benchmark.extra_info["exits_per_round"] = EXITS
    b = m.prepare_exits(batch)
    benchmark(b.run_only)
    assert b.run()[0] == 0


def test_mmio_write_exits_python(benchmark):
    m = machine_with_devices()
    batch = [(0xC0020010, 4, 0x1234, True)] * EXITS
    benchmark.extra_info["exits_per_round"] = EXITS
    benchmark(m.prepare_exits(batch, True).run_only)


def test_uart_transmit_exits(benchmark):
    """A guest printing through COM1: one LSR poll and one THR write per byte."""
    from hvframe.testing import rig
    m = SyntheticMachine()
    rig(m, "-l com1,null")
    batch = [(0x3FD, 1, 0, False), (0x3F8, 1, 0x41, True)] * (EXITS // 2)
    benchmark.extra_info["exits_per_round"] = EXITS
    b = m.prepare_exits(batch)
    benchmark(b.run_only)
    assert b.run()[0] & 0x20  # THRE: the transmitter kept up
