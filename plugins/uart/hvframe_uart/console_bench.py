"""Polled console throughput: a guest (tests/guests/console.c) prints N bytes to COM1 by
polling LSR and writing THR, as Linux's printk console does. Under hvframe (`hvframe run`)
with COM1 served natively (Uart16550.map_native), all in Python (native=off), and under QEMU
(when installed) as the reference, each with the console on a pipe. Each figure is the time
between the guest's "console start" line and its "console done" line arriving on the pipe,
so start-up (QEMU's firmware, say) is not counted.

    python -m hvframe_uart.console_bench [--count N] [--rounds R] [--no-qemu]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
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
    port_exits: int = 0     # port I/O exits the vCPU took


@contextlib.contextmanager
def console_machine(guest: str, path: str, cmdline: str, native: bool = True,
                    coalesce: bool = True):
    """The console guest's machine, built and not yet run: COM1 on a file backend at `path`,
    served natively (its THR writes buffered by KVM while it is a plain polled console, as
    `hvframe run` does, unless coalesce=False) or all in Python; the ACPI PM block for the
    guest's power-off. Yields (machine, uart) and closes the machine after."""
    from hvframe.platform.acpi_pm import AcpiPm
    m = Machine(64 << 20, 1)
    try:
        boot = load_kernel(m.memory, guest, cmdline=cmdline)
        m.create_vcpus()
        m.boot_direct(boot)
        uart = Uart16550(set_irq=m.irq_source(COM1_IRQ), backend=FileBackend(path))
        m.on_close(uart.close)
        if native:
            thr = m.coalesce_writes("pio", COM1, 1) if coalesce else None
            uart.map_native(m.pio, COM1, name="com1", thr_writes=thr)
        else:
            m.pio.register(COM1, PORT_COUNT, uart, name="com1")
        AcpiPm(m)
        yield m, uart
    finally:
        m.close()


def hvframe_console(guest: str, count: int, native: bool = True,
                    coalesce: bool = True) -> ConsoleRun:
    """One run of the console guest (console_machine) until it powers off."""
    with tempfile.TemporaryDirectory(prefix="hvframe-console-") as tmp:
        path = os.path.join(tmp, "com1.out")
        with console_machine(guest, path, f"count={count}", native, coalesce) as (m, uart):
            uart.start()
            t0 = time.perf_counter()
            code = m.run()
            dt = time.perf_counter() - t0
            block = uart.native_block
            served = block.served if block is not None else 0
            passed = block.passed if block is not None else 0
            exits = sum(v.c.exits_io for v in m.vcpus)
        with open(path, "rb") as f:
            output = f.read()
    return ConsoleRun(dt, output, served, passed, code, exits)


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def start_marker(count: int) -> bytes:
    return b"console start count=%d\r\n" % count


def done_marker(count: int) -> bytes:
    return b"\r\nconsole done count=%d\r\n" % count


def payload_of(output: bytes, count: int) -> bytes:
    """The count bytes after the guest's "console start" line."""
    start = output.index(start_marker(count)) + len(start_marker(count))
    return output[start:start + count]


def timed_console(cmd: list[str], count: int, timeout: float = 600) -> tuple[float, bytes]:
    """Run cmd (the console guest with COM1 on stdout) and return the seconds from the start
    line to the done line arriving on its stdout, and all of its stdout."""
    start, done = start_marker(count), done_marker(count)
    buf = bytearray()
    t_start = t_done = None
    deadline = time.monotonic() + timeout
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        fd = p.stdout.fileno()
        while time.monotonic() < deadline:
            chunk = os.read(fd, 1 << 16)
            now = time.perf_counter()
            if not chunk:
                break
            tail = max(0, len(buf) - len(done))
            buf += chunk
            if t_start is None and start in buf:
                t_start = now
            if t_start is not None and t_done is None and done in buf[tail:]:
                t_done = now
        p.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    if t_start is None or t_done is None:
        raise RuntimeError(f"{cmd[0]}: the console guest did not finish: {bytes(buf[-200:])!r}")
    return t_done - t_start, bytes(buf)


def hvframe_command(guest: str, count: int, native: bool = True) -> list[str]:
    return [sys.executable, "-m", "hvframe", "run", "-m", "64M",
            "-l", f"com1,stdio,native={'on' if native else 'off'}",
            "--kernel", guest, "-a", f"count={count}"]


def qemu_command(guest: str, count: int) -> list[str]:
    """QEMU with COM1 on stdout; the guest's power-off write to port 0x404 ends it through
    isa-debug-exit."""
    qemu = qemu_binary()
    if qemu is None:
        raise RuntimeError("qemu-system-x86_64 is not installed")
    return [qemu, "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-M", "pc", "-m", "64",
            "-nodefaults", "-display", "none", "-kernel", guest, "-append", f"count={count}",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0x404,iosize=2"]


def us_per_byte(cmd: list[str], count: int) -> float:
    """One timed run of cmd; its output checked byte for byte."""
    dt, output = timed_console(cmd, count)
    if payload_of(output, count) != expected_payload(count):
        raise RuntimeError(f"{cmd[0]}: console output differs from what the guest wrote")
    return dt / count * 1e6


def compare(count: int = 100000, rounds: int = 3, qemu: bool = True) -> dict:
    """Best-of-rounds microseconds per byte: hvframe native, hvframe Python, QEMU, run in
    turn each round (so a busy host slows all of them alike)."""
    guest = console_guest()
    commands = {"native_us_per_byte": hvframe_command(guest, count, True),
                "python_us_per_byte": hvframe_command(guest, count, False)}
    if qemu and qemu_binary():
        commands["qemu_us_per_byte"] = qemu_command(guest, count)
    out = {"count": count}
    for _ in range(rounds):
        for key, cmd in commands.items():
            us = us_per_byte(cmd, count)
            out[key] = min(out.get(key, us), us)
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
