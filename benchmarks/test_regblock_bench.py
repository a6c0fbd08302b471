"""Declared registers served natively (hvframe.regblock), on /dev/kvm.

1. One port-read exit of a real guest (tests/guests/portread.c: N `in` from port 0xe0) under
   the C floor (hv_floor_run), with the port as a declared register (answered natively, no
   GIL) and with a Python handler. Target: the declared register at most 1.05x the floor.
2. A guest printing 100,000 bytes by polling LSR and writing THR (tests/guests/console.c),
   COM1 served natively, in Python, and under QEMU. Target: native at least as fast as QEMU.

    python -m pytest benchmarks/test_regblock_bench.py -s
"""
import pytest

from conftest import requires_kvm
from hvframe import exitbench
from hvframe_uart import console_bench

pytestmark = requires_kvm
COUNT = 100000
CONSOLE_BYTES = 100000
TARGET_RATIO = 1.05
ROUNDS = 5


@pytest.fixture(scope="module")
def guest():
    return exitbench.portread_guest()


@pytest.fixture(scope="module")
def console_guest():
    return console_bench.console_guest()


def test_declared_register_read_exit(benchmark, guest):
    """Per exit: the floor, the declared register and the Python handler, in turn each round
    (a busy host slows all three alike); best of ROUNDS each."""
    best = {}

    def one_round():
        for kind in ("floor", "regblock", "python"):
            if kind == "floor":
                dt, _ = exitbench.floor_run(guest, COUNT)
            else:
                dt, exits, calls = exitbench.hvframe_run(guest, COUNT, kind)
                assert exits >= COUNT
                assert calls == (0 if kind == "regblock" else COUNT)
            best[kind] = min(best.get(kind, dt), dt)
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    us = {k: v / COUNT * 1e6 for k, v in best.items()}
    ratios = {k: us[k] / us["floor"] for k in ("regblock", "python")}
    benchmark.extra_info.update({f"{k}_us_per_exit": v for k, v in us.items()})
    benchmark.extra_info.update({f"{k}_ratio_to_floor": v for k, v in ratios.items()})
    print(f"\nport read exit: floor {us['floor']:.3f} us, declared register {us['regblock']:.3f} us "
          f"({ratios['regblock']:.3f}x), Python handler {us['python']:.3f} us "
          f"({ratios['python']:.3f}x)")
    assert ratios["regblock"] <= TARGET_RATIO, \
        f"declared register exit is {ratios['regblock']:.3f}x the C floor"


def test_console_throughput(benchmark, console_guest):
    """hvframe native, hvframe in Python and QEMU, in turn each round (a busy host slows
    all three alike), each timed from the guest's start line to its done line on a pipe."""
    qemu = console_bench.qemu_binary() is not None
    r = benchmark.pedantic(console_bench.compare, args=(CONSOLE_BYTES, 3, qemu), rounds=1,
                           iterations=1)
    benchmark.extra_info.update(r)
    print(f"\nconsole, {CONSOLE_BYTES} bytes: native {r['native_us_per_byte']:.2f} us/byte, "
          f"Python {r['python_us_per_byte']:.2f} us/byte"
          + (f", QEMU {r['qemu_us_per_byte']:.2f} us/byte" if qemu else " (no QEMU)"))
    if qemu:
        ratio = r["native_us_per_byte"] / r["qemu_us_per_byte"]
        print(f"native time per byte / QEMU's: {ratio:.3f}")
        assert ratio <= 1.0, f"hvframe's native console takes {ratio:.2f}x QEMU's time per byte"
