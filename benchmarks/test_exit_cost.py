"""One Python-handled port exit of a real guest against the C floor, in the same run.

The guest (tests/guests/portloop.c) does N `out` instructions to port 0xe0. The floor is
hv_floor_run, the thinnest C loop (no dispatch at all); hvframe runs the same guest with a
Python device on port 0xe0. Target: hvframe's exit costs at most 1.05 times the floor's.
test_exit_cost_parts splits the difference: a C handler, and the GIL hand-off alone.

    python -m pytest benchmarks/test_exit_cost.py
"""
import pytest

from conftest import requires_kvm
from hvframe import exitbench

pytestmark = requires_kvm
COUNT = 100000
TARGET_RATIO = 1.05
results = {}


@pytest.fixture(scope="module")
def guest():
    return exitbench.portloop_guest()


def timed(fn, times):
    """Record the run loop's own time (fn returns it first), not VM creation."""
    def call(*args):
        result = fn(*args)
        times.append(result[0])
        return result
    return call


def test_floor_exit(benchmark, guest):
    times = []
    benchmark.pedantic(timed(exitbench.floor_run, times), args=(guest, COUNT), rounds=5, iterations=1)
    results["floor"] = min(times) / COUNT
    benchmark.extra_info["us_per_exit"] = results["floor"] * 1e6


def test_python_handled_exit(benchmark, guest):
    times = []
    dt, exits, writes = benchmark.pedantic(timed(exitbench.hvframe_run, times), args=(guest, COUNT),
                                           rounds=5, iterations=1)
    assert writes == COUNT
    per_exit = min(times) / COUNT
    benchmark.extra_info["us_per_exit"] = per_exit * 1e6
    if "floor" in results:
        ratio = per_exit / results["floor"]
        benchmark.extra_info["ratio_to_floor"] = ratio
        print(f"\nfloor {results['floor'] * 1e6:.3f} us/exit, hvframe {per_exit * 1e6:.3f} us/exit, "
              f"ratio {ratio:.3f} (target {TARGET_RATIO})")
        assert ratio <= TARGET_RATIO, f"Python-handled exit is {ratio:.3f}x the C floor"


@pytest.mark.parametrize("handler", ["c", "gil"])
def test_exit_cost_parts(benchmark, guest, handler):
    """Where a Python-handled exit's cost goes: the same port served by a C handler, and by
    a C handler that only takes and drops the GIL as the Python path does (no target)."""
    times = []
    dt, exits, _ = benchmark.pedantic(timed(exitbench.hvframe_run, times),
                                      args=(guest, COUNT, handler), rounds=5, iterations=1)
    assert exits >= COUNT
    per_exit = min(times) / COUNT
    benchmark.extra_info["us_per_exit"] = per_exit * 1e6
    if "floor" in results:
        ratio = per_exit / results["floor"]
        benchmark.extra_info["ratio_to_floor"] = ratio
        print(f"\n{handler} handler: {per_exit * 1e6:.3f} us/exit, ratio {ratio:.3f}")
