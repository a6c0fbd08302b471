"""ACPI PM1a event/control blocks and the PM timer, at bhyve's addresses.

The guest powers off by writing SLP_TYP=5 (S5) with SLP_EN to PM1a_CNT, which ends the run
with exit status 1, as bhyve does.
"""
from __future__ import annotations

import time
from .. import concurrency

PM1A_EVT = 0x400   # PM1_STS (2 bytes) + PM1_EN (2 bytes)
PM1A_CNT = 0x404   # 2 bytes
PM_TMR = 0x408     # 4 bytes, 3.579545 MHz, 24 bits
PM_TMR_HZ = 3579545
SCI_EN = 1 << 0
SLP_EN = 1 << 13
SLP_TYP_SHIFT = 10
S5 = 5
PWRBTN_STS = 1 << 8
TMR_STS = 1 << 0


class AcpiPm:
    def __init__(self, machine):
        self.machine = machine
        self.sts = 0
        self.en = 0
        self.cnt = 0
        self._lock = concurrency.lock(concurrency.DEVICE, "acpi-pm")
        self._t0 = time.monotonic_ns()
        self.evt_block = _Block(self._evt_read, self._evt_write)
        self.cnt_block = _Block(self._cnt_read, self._cnt_write)
        self.timer = _Block(self._tmr_read, lambda off, size, value: None)
        machine.pio.register(PM1A_EVT, 4, self.evt_block, name="acpi-pm1a-evt")
        machine.pio.register(PM1A_CNT, 2, self.cnt_block, name="acpi-pm1a-cnt")
        machine.pio.register(PM_TMR, 4, self.timer, name="acpi-pm-timer")

    def _evt_read(self, off: int, size: int) -> int:
        regs = (self.sts | self.en << 16).to_bytes(4, "little")
        return int.from_bytes(regs[off:off + size].ljust(size, b"\xff"), "little")

    def _evt_write(self, off: int, size: int, value: int) -> None:
        data = value.to_bytes(8, "little")[:size]
        with self._lock:
            for i, b in enumerate(data):
                pos = off + i
                if pos < 2:      # status bits are write-one-to-clear
                    self.sts &= ~(b << (8 * pos))
                elif pos < 4:
                    shift = 8 * (pos - 2)
                    self.en = (self.en & ~(0xFF << shift)) | (b << shift)

    def _cnt_read(self, off: int, size: int) -> int:
        return (self.cnt >> (8 * off)) & ((1 << (8 * size)) - 1)

    def _cnt_write(self, off: int, size: int, value: int) -> None:
        with self._lock:
            shift = 8 * off
            mask = ((1 << (8 * size)) - 1) << shift
            new = (self.cnt & ~mask | (value << shift) & mask) & 0xFFFF
            self.cnt = new & ~SLP_EN   # SLP_EN always reads as zero
        if new & SLP_EN and (new >> SLP_TYP_SHIFT) & 7 == S5:
            self.machine.request_exit(1, "guest powered off (ACPI S5)")

    def _tmr_read(self, off: int, size: int) -> int:
        ticks = (time.monotonic_ns() - self._t0) * PM_TMR_HZ // 1_000_000_000
        return ((ticks & 0xFFFFFF) >> (8 * off)) & ((1 << (8 * size)) - 1)


class _Block:
    """A port handler made of two callables."""

    def __init__(self, read, write):
        self.read = read
        self.write = write
