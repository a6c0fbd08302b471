"""Polled console throughput: a guest (tests/guests/console.c) prints N bytes to COM1 by
polling LSR and writing THR, as Linux's printk console does. Under hvframe with COM1 served
natively (Uart16550.map_native), all in Python, and under QEMU (when installed) as the
reference. Each figure is the time for N bytes less the time for none, so start-up is not
counted.

    python -m hvframe_uart.console_bench [--count N] [--rounds R] [--no-qemu]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from hvframe.loader import load_kernel
from hvframe.machine import Machine

from .backends import FileBackend
from .uart16550 import Uart16550

COM1, COM1_IRQ = 0x3F8, 4
PORT_COUNT = 8


def console_byte(i: int) -> int:
    """The guest's i-th payload byte (console_byte() in tests/guests/console.c)."""
    return (i * 131 + (i >> 8)) & 0xFF


def expected_payload(count: int) -> bytes:
    return bytes(console_byte(i) for i in range(count))


def console_guest() -> str:
    from hvframe.guests.build import cached_guest
    return cached_guest("console")


@dataclass
class ConsoleRun:
    seconds: float          # the machine's run, VM creation excluded
    output: bytes           # everything COM1 wrote
    native_served: int      # COM1 accesses answered by the native register block
    python_calls: int       # COM1 accesses its register block passed to Python
    exit_code: int


def hvframe_console(guest: str, count: int, native: bool = True) -> ConsoleRun:
    """One run of the console guest with COM1 on a file backend."""
    from hvframe.platform.acpi_pm import AcpiPm
    with tempfile.TemporaryDirectory(prefix="hvframe-console-") as tmp:
        path = os.path.join(tmp, "com1.out")
        m = Machine(64 << 20, 1)
        try:
            boot = load_kernel(m.memory, guest, cmdline=f"count={count}")
            m.create_vcpus()
            m.boot_direct(boot)
            uart = Uart16550(set_irq=m.irq_source(COM1_IRQ), backend=FileBackend(path))
            m.on_close(uart.close)
            if native:
                uart.map_native(m.pio, COM1, name="com1")
            else:
                m.pio.register(COM1, PORT_COUNT, uart, name="com1")
            AcpiPm(m)
            uart.start()
            t0 = time.perf_counter()
            code = m.run()
            dt = time.perf_counter() - t0
            block = uart.native_block
            served = block.served if block is not None else 0
            passed = block.passed if block is not None else 0
        finally:
            m.close()
        with open(path, "rb") as f:
            output = f.read()
    return ConsoleRun(dt, output, served, passed, code)


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def qemu_console(guest: str, count: int, timeout: float = 600) -> tuple[float, bytes]:
    """Wall time of QEMU running the console guest (COM1 to a file; the guest's power-off
    write to port 0x404 ends QEMU through isa-debug-exit), and what COM1 wrote."""
    qemu = qemu_binary()
    if qemu is None:
        raise RuntimeError("qemu-system-x86_64 is not installed")
    with tempfile.TemporaryDirectory(prefix="hvframe-qemu-console-") as tmp:
        path = os.path.join(tmp, "com1.out")
        cmd = [qemu, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-M", "pc", "-m", "64",
               "-nodefaults", "-display", "none", "-kernel", guest, "-append", f"count={count}",
               "-serial", f"file:{path}", "-device", "isa-debug-exit,iobase=0x404,iosize=2"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=False, timeout=timeout, capture_output=True)
        dt = time.perf_counter() - t0
        with open(path, "rb") as f:
            return dt, f.read()


def payload_of(output: bytes, count: int) -> bytes:
    """The count bytes after the guest's "console start" line."""
    start = output.index(b"console start count=%d\r\n" % count) + len(b"console start count=%d\r\n" % count)
    return output[start:start + count]


def compare(count: int = 100000, rounds: int = 3, qemu: bool = True) -> dict:
    """Best-of-rounds microseconds per byte: hvframe native, hvframe Python, QEMU."""
    guest = console_guest()
    out = {"count": count}

    def best(run) -> float:
        return min(run(count) - run(0) for _ in range(rounds)) / count * 1e6

    def hv(native):
        def run(n):
            r = hvframe_console(guest, n, native)
            if payload_of(r.output, n) != expected_payload(n):
                raise RuntimeError("console output differs from what the guest wrote")
            return r.seconds
        return run

    out["native_us_per_byte"] = best(hv(True))
    out["python_us_per_byte"] = best(hv(False))
    if qemu and qemu_binary():
        def run_q(n):
            dt, output = qemu_console(guest, n)
            if payload_of(output, n) != expected_payload(n):
                raise RuntimeError("QEMU's console output differs from what the guest wrote")
            return dt
        out["qemu_us_per_byte"] = best(run_q)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hvframe_uart.console_bench",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-qemu", action="store_true")
    a = ap.parse_args(argv)
    r = compare(a.count, a.rounds, not a.no_qemu)
    print(f"bytes per run: {r['count']}")
    for key, label in (("native_us_per_byte", "hvframe, COM1 native"),
                       ("python_us_per_byte", "hvframe, COM1 in Python"),
                       ("qemu_us_per_byte", "QEMU")):
        if key in r:
            us = r[key]
            print(f"{label:24s} {us:8.2f} us/byte  {1e6 / us / 1024:8.1f} KiB/s")


if __name__ == "__main__":
    main()
