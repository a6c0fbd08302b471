"""Cost of one port exit: hvframe's Python-handled exit against the thinnest C KVM loop
(the floor on this host), both running the same guest (tests/guests/portloop.c: N `out`
instructions to port 0xe0, then power off through port 0x404).

With --reads the guest is tests/guests/portread.c (N `in` from port 0xe0) and the port is
also served as a declared register (hvframe.regblock): a read answered natively.

    python -m hvframe.exitbench [--count N] [--rounds R] [--parts] [--reads]
"""
from __future__ import annotations

import argparse
import time

from .core_native import ffi, lib
from .loader import load_kernel
from .machine import Machine

BENCH_PORT = 0xE0
POWEROFF_PORT = 0x404


class CountingPort:
    """The Python device on the measured port: it counts the writes it is given."""

    def __init__(self):
        self.writes = 0
        self.reads = 0

    def read(self, offset, size):
        self.reads += 1
        return 0

    def write(self, offset, size, value):
        self.writes += 1


def _machine(guest: str, count: int) -> Machine:
    m = Machine(32 << 20, 1)
    boot = load_kernel(m.memory, guest, cmdline=f"count={count}")
    m.create_vcpus()
    m.boot_direct(boot)
    return m


def floor_run(guest: str, count: int) -> tuple[float, int]:
    """Seconds and exits for one run under hv_floor_run (no devices at all)."""
    m = _machine(guest, count)
    try:
        exits = ffi.new("uint64_t *")
        v = m.vcpus[0]
        t0 = time.perf_counter()
        rc = lib.hv_floor_run(v.fd, v.c.run, POWEROFF_PORT, exits)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"floor loop ended with {rc}")
        return dt, exits[0]
    finally:
        m.close()


def hvframe_run(guest: str, count: int, handler: str = "python") -> tuple[float, int, int]:
    """Seconds, port exits and Python-handled port accesses for one run under hvframe. The
    port's handler: "python" (CountingPort), "c" (a C sink), "gil" (a C handler that only
    takes and drops the GIL, as the Python path does around its call) or "regblock" (a
    declared read-only register, CountingPort behind it for what it does not serve)."""
    from .platform.acpi_pm import AcpiPm
    m = _machine(guest, count)
    try:
        port = CountingPort()
        if handler == "python":
            m.pio.register(BENCH_PORT, 1, port, name="bench-port")
        elif handler == "regblock":
            from construct import Int8ul, Struct
            from .regblock import Kind, Reg, RegisterBlock
            RegisterBlock(Struct("value" / Int8ul), {"value": Reg(Kind.READ_ONLY, reset=0x5A)},
                          port, name="bench-port").map(m.pio, BENCH_PORT)
        else:
            fn = lib.hv_native_sink if handler == "c" else lib.hv_native_gil_only
            m.pio.register_native(BENCH_PORT, 1, fn, name="bench-port")
        AcpiPm(m)
        t0 = time.perf_counter()
        code = m.run()
        dt = time.perf_counter() - t0
        if code != 1:
            raise RuntimeError(f"guest did not power off: {m.exit_reason}")
        return dt, m.vcpus[0].c.exits_io, port.writes + port.reads
    finally:
        m.close()


def portloop_guest() -> str:
    from .guests.build import cached_guest
    return cached_guest("portloop")


def portread_guest() -> str:
    from .guests.build import cached_guest
    return cached_guest("portread")


def compare(count: int = 200000, rounds: int = 3, parts: bool = False,
            reads: bool = False) -> dict:
    """Best-of-rounds cost per exit: the floor and hvframe's Python handler; with parts, also
    a C handler and the GIL hand-off alone (where the Python handler's cost goes); with
    reads, port reads, and a declared register serving them natively too."""
    guest = portread_guest() if reads else portloop_guest()
    floor = min(floor_run(guest, count)[0] / count for _ in range(rounds))
    out = {"count": count, "floor_us": floor * 1e6}
    handlers = ("python", "c", "gil") if parts else ("python",)
    if reads:
        handlers += ("regblock",)
    for handler in handlers:
        best = None
        for _ in range(rounds):
            dt, exits, calls = hvframe_run(guest, count, handler)
            if handler == "python":
                assert calls == count, (calls, count)
            elif handler == "regblock":
                assert calls == 0, f"{calls} reads of the declared register reached Python"
            best = dt / count if best is None else min(best, dt / count)
        key = "hvframe" if handler == "python" else f"{handler}_handler"
        out[f"{key}_us"] = best * 1e6
    out["ratio"] = out["hvframe_us"] / out["floor_us"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hvframe.exitbench", description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", action="store_true",
                    help="also a C handler and the GIL hand-off alone under hvframe")
    ap.add_argument("--reads", action="store_true",
                    help="port reads, also served by a declared register (hvframe.regblock)")
    a = ap.parse_args(argv)
    r = compare(a.count, a.rounds, a.parts, a.reads)
    print(f"port {'reads' if a.reads else 'writes'} per run: {r['count']}")
    print(f"C floor loop:          {r['floor_us']:.3f} us/exit")
    if a.parts:
        f = r["floor_us"]
        print(f"hvframe C handler:      {r['c_handler_us']:.3f} us/exit "
              f"({r['c_handler_us'] / f:.3f}x)")
        print(f"hvframe GIL hand-off:   {r['gil_handler_us']:.3f} us/exit "
              f"({r['gil_handler_us'] / f:.3f}x)")
    if a.reads:
        print(f"hvframe declared reg:   {r['regblock_handler_us']:.3f} us/exit "
              f"({r['regblock_handler_us'] / r['floor_us']:.3f}x)")
    print(f"hvframe Python handler: {r['hvframe_us']:.3f} us/exit")
    print(f"ratio: {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
