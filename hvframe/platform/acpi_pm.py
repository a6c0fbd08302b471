"""ACPI PM1a event/control blocks and the PM timer, at bhyve's addresses.

The guest powers off by writing SLP_TYP=5 (S5) with SLP_EN to PM1a_CNT, which ends the run
with exit status 1, as bhyve does.

The power button is ACPI's fixed-feature one (the FADT's PWR_BUTTON flag is clear, so the DSDT
needs no device for it): press_power_button() sets PWRBTN_STS in PM1_STS and, while the guest
has PWRBTN_EN set in PM1_EN, raises the SCI (IRQ 9, level-triggered, active high as the MADT
and FADT say) until the guest clears the status bit. SIGTERM and QMP's system_powerdown
press it. There is no SMI command port, so the machine is always in ACPI mode: SCI_EN reads 1.
"""
from __future__ import annotations
from ..device import Device

import time

from .. import concurrency
from ..snapshot.state import DeviceState
from ..packed import declared_later
from ..dispatch import Access, Partial

PM1A_EVT = 0x400   # PM1_STS (2 bytes) + PM1_EN (2 bytes)
PM1A_CNT = 0x404   # 2 bytes
PM_TMR = 0x408     # 4 bytes, 3.579545 MHz, 24 bits
PM_TMR_HZ = 3579545
SCI_EN = 1 << 0
SLP_EN = 1 << 13
SLP_TYP_SHIFT = 10
S5 = 5
PWRBTN_STS = 1 << 8
PWRBTN_EN = 1 << 8
TMR_STS = 1 << 0
SCI_IRQ = 9


# Each register is its own range and sees only whole accesses; the bus cuts or widens the
# rest. A byte written to the status register clears bits in that byte only (W1C: the other
# byte reads as zero); one written to the enable or control register merges into it.
WORD_W1C = Access(sizes=(2,), aligned=True, partial=Partial.ZERO)
WORD = Access(sizes=(2,), aligned=True, partial=Partial.MERGE)
DWORD_READ_ONLY = Access(sizes=(4,), aligned=True, partial=Partial.DROP)


class AcpiPm(Device, DeviceState):
    name = "acpi-pm"
    state_version = 1

    @declared_later
    def state_layout():
        from construct import Int16ul, Int32ul, Struct
        return Struct("sts" / Int16ul, "en" / Int16ul, "cnt" / Int16ul,
                      "power_button_presses" / Int32ul)

    def __init__(self, machine):
        self.machine = machine
        self.sts = 0
        self.en = 0
        self.cnt = SCI_EN
        self.power_button_presses = 0
        self._lock = concurrency.lock(concurrency.DEVICE, "acpi-pm")
        self._t0 = time.monotonic_ns()
        self.status_reg = _Register(lambda: self.sts, self._sts_write)
        self.enable_reg = _Register(lambda: self.en, self._en_write)
        self.control_reg = _Register(lambda: self.cnt, self._cnt_write)
        self.timer = _Register(self._tmr_read, lambda value: None)
        machine.pio.register(PM1A_EVT, 2, self.status_reg, name="acpi-pm1a-sts", access=WORD_W1C)
        machine.pio.register(PM1A_EVT + 2, 2, self.enable_reg, name="acpi-pm1a-en", access=WORD)
        machine.pio.register(PM1A_CNT, 2, self.control_reg, name="acpi-pm1a-cnt", access=WORD)
        machine.pio.register(PM_TMR, 4, self.timer, name="acpi-pm-timer",
                             access=DWORD_READ_ONLY)

    def press_power_button(self) -> None:
        """Any thread: the button is pressed (and released)."""
        with self._lock:
            self.sts |= PWRBTN_STS
            self.power_button_presses += 1
            self._update_sci()

    def _update_sci(self) -> None:
        # (lock held) The SCI is the OR of the enabled status bits; only the power button
        # can raise it (the PM timer's overflow event is not implemented).
        self.machine.irq(SCI_IRQ, 1 if self.sts & self.en & PWRBTN_STS else 0)

    def _sts_write(self, value: int) -> None:
        with self._lock:
            self.sts &= ~value
            self._update_sci()

    def _en_write(self, value: int) -> None:
        with self._lock:
            self.en = value
            self._update_sci()

    def _cnt_write(self, value: int) -> None:
        with self._lock:
            # SLP_EN always reads as zero; SCI_EN as one (no SMI port to leave ACPI mode).
            self.cnt = (value & ~SLP_EN) | SCI_EN
        if value & SLP_EN and (value >> SLP_TYP_SHIFT) & 7 == S5:
            self.machine.request_exit(1, "guest powered off (ACPI S5)")

    def save_state(self) -> dict:
        with self._lock:
            return dict(sts=self.sts, en=self.en, cnt=self.cnt,
                        power_button_presses=self.power_button_presses)

    def load_state(self, s) -> None:
        with self._lock:
            self.sts, self.en, self.cnt = s.sts, s.en, s.cnt
            self.power_button_presses = s.power_button_presses
            self._update_sci()

    def _tmr_read(self) -> int:
        ticks = (time.monotonic_ns() - self._t0) * PM_TMR_HZ // 1_000_000_000
        return ticks & 0xFFFFFF


class _Register:
    """One register as a port handler: whole accesses only (its range's Access says so)."""

    def __init__(self, get, put):
        self.get = get
        self.put = put

    def read(self, offset: int, size: int) -> int:
        return self.get()

    def write(self, offset: int, size: int, value: int) -> None:
        self.put(value)
