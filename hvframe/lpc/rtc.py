"""The MC146818-style RTC and CMOS RAM at ports 0x70 (index) / 0x71 (data).

Time registers follow host UTC plus an offset the guest may change by writing them; status
register B selects BCD or binary (DM, bit 2) and 24- or 12-hour (bit 1) encoding. The
update-in-progress bit never reads as set. Interrupts on IRQ 8 (from a timer thread started
with the machine's devices): periodic (PIE, at the rate in status A), update-ended (UIE, each
guest second) and alarm (AIE, with the "don't care" values 0xc0-0xff); status C reports
IRQF | PF | AF | UF and reading it clears them and lowers the line.

The CMOS bytes firmware sizes memory from (SeaBIOS reads these when fw_cfg gives no e820):
  0x15/0x16  base memory in KiB (640)
  0x17/0x18, 0x30/0x31  extended memory above 1 MiB in KiB, capped at 0xffff
  0x34/0x35  RAM between 16 MiB and the end of low RAM (below 4 GiB) in 64 KiB units
  0x5b-0x5d  RAM above 4 GiB in 64 KiB units
  0x5f       number of CPUs - 1
with the standard checksum over 0x10-0x2d at 0x2e (high) / 0x2f (low).
"""
from __future__ import annotations

from ..device import Device

import math
import time

from .. import concurrency
from ..snapshot.state import DeviceState
from ..packed import declared_later

RTC_PORT = 0x70
CMOS_SIZE = 128

REG_SEC, REG_SEC_ALARM, REG_MIN, REG_MIN_ALARM, REG_HOUR, REG_HOUR_ALARM = range(6)
REG_DOW, REG_DAY, REG_MONTH, REG_YEAR = 6, 7, 8, 9
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32
TIME_REGS = (REG_SEC, REG_MIN, REG_HOUR, REG_DOW, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)

B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
RTC_IRQ = 8
B_DM_BINARY = 0x04
B_24H = 0x02
A_UIP = 0x80
D_VRT = 0x80

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


def memory_bytes(lowmem_end: int, highmem_size: int, cpus: int) -> dict[int, int]:
    """The CMOS memory-size (and CPU count) bytes for a machine."""
    out = {}
    out[0x15], out[0x16] = 640 & 0xFF, 640 >> 8
    ext = min(max(lowmem_end - MiB, 0) // KiB, 0xFFFF)
    out[0x17] = out[0x30] = ext & 0xFF
    out[0x18] = out[0x31] = ext >> 8
    above16 = min(max(lowmem_end - 16 * MiB, 0) // (64 * KiB), 0xFFFF)
    out[0x34], out[0x35] = above16 & 0xFF, above16 >> 8
    high = min(highmem_size // (64 * KiB), 0xFFFFFF)
    out[0x5B], out[0x5C], out[0x5D] = high & 0xFF, (high >> 8) & 0xFF, high >> 16
    out[0x5F] = max(cpus - 1, 0) & 0xFF
    return out


MAX_CLOCK_OFFSET = 1e10     # seconds (about 317 years) either side of the host's clock


class Rtc(Device, DeviceState):
    name = "rtc"
    # The guest's clock is kept as its offset from the host's: restored elsewhere it goes on
    # from the host's time as QEMU's does (base=utc), not from when it was saved.
    state_version = 1

    @declared_later
    def state_layout():
        from construct import Bytes, Flag, Float64l, Int8ul, Struct
        return Struct("index" / Int8ul, "nmi_disabled" / Flag, "offset" / Float64l,
                      "cmos" / Bytes(CMOS_SIZE))

    def __init__(self, machine, *, clock=time.time):
        self.machine = machine
        self._clock = clock
        self._lock = concurrency.lock(concurrency.DEVICE, "rtc")
        self._cond = concurrency.condition(self._lock)
        self._thread: concurrency.DeviceThread | None = None
        self._closing = False
        self.index = 0
        self.nmi_disabled = False
        self.offset = 0.0   # guest time - host time, seconds
        self.cmos = bytearray(CMOS_SIZE)
        self.cmos[REG_A] = 0x26          # 32.768 kHz base, 1024 Hz rate
        self.cmos[REG_B] = B_24H         # BCD, 24-hour
        self.cmos[REG_D] = D_VRT
        self.cmos[0x14] = 0x02           # equipment: maths coprocessor present
        mem = machine.memory
        high = sum(r.size for r in mem.regions if r.gpa >= 1 << 32)
        for reg, val in memory_bytes(mem.lowmem_end, high, machine.cpus).items():
            self.cmos[reg] = val
        self._update_checksum()
        machine.pio.register(RTC_PORT, 2, self, name="rtc")

    def _update_checksum(self) -> None:
        s = sum(self.cmos[0x10:0x2E]) & 0xFFFF
        self.cmos[0x2E], self.cmos[0x2F] = s >> 8, s & 0xFF

    # -- time -------------------------------------------------------------------------------
    def _now(self) -> time.struct_time:
        return time.gmtime(int(self._clock() + self.offset))

    def _encode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else from_bcd(v)

    def _time_reg(self, reg: int) -> int:
        t = self._now()
        if reg == REG_SEC:
            return self._encode(t.tm_sec)
        if reg == REG_MIN:
            return self._encode(t.tm_min)
        if reg == REG_HOUR:
            h = t.tm_hour
            if self.cmos[REG_B] & B_24H:
                return self._encode(h)
            pm = 0x80 if h >= 12 else 0
            return self._encode(h % 12 or 12) | pm
        if reg == REG_DOW:
            return self._encode((t.tm_wday + 1) % 7 + 1)   # 1 = Sunday
        if reg == REG_DAY:
            return self._encode(t.tm_mday)
        if reg == REG_MONTH:
            return self._encode(t.tm_mon)
        if reg == REG_YEAR:
            return self._encode(t.tm_year % 100)
        return self._encode(t.tm_year // 100)            # century

    def _set_time_reg(self, reg: int, value: int) -> None:
        t = self._now()
        f = [t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec]
        if reg == REG_HOUR and not self.cmos[REG_B] & B_24H:
            pm = value & 0x80
            h = self._decode(value & 0x7F) % 12
            v = h + 12 if pm else h
        else:
            v = self._decode(value)
        if reg == REG_SEC:
            f[5] = v
        elif reg == REG_MIN:
            f[4] = v
        elif reg == REG_HOUR:
            f[3] = v
        elif reg == REG_DAY:
            f[2] = v
        elif reg == REG_MONTH:
            f[1] = v
        elif reg == REG_YEAR:
            f[0] = f[0] // 100 * 100 + v % 100
        elif reg == REG_CENTURY:
            f[0] = v * 100 + f[0] % 100
        else:
            return   # day of week follows from the date
        import calendar      # only when the guest sets the clock: it costs start-up ~3 ms
        try:
            guest = calendar.timegm((f[0], max(f[1], 1), max(f[2], 1), f[3], f[4], f[5], 0, 0, 0))
        except (ValueError, OverflowError):
            return
        self.offset = guest - int(self._clock())

    # -- interrupts ---------------------------------------------------------------------------
    def _period(self) -> float | None:
        rate = self.cmos[REG_A] & 0x0F
        if not rate or not self.cmos[REG_B] & B_PIE:
            return None
        if rate < 3:
            rate += 7                                 # rates 1 and 2 alias 8 and 9
        return (1 << (rate - 1)) / 32768.0

    def _raise(self, flags: int) -> None:
        """Set flags in status C; raise IRQ 8 if one of them is enabled in status B."""
        c = self.cmos[REG_C] | flags
        enabled = self.cmos[REG_B] & (B_PIE | B_AIE | B_UIE)   # same bit positions as C's flags
        if c & (C_PF | C_AF | C_UF) & enabled:
            c |= C_IRQF
        self.cmos[REG_C] = c
        if c & C_IRQF:
            self.machine.irq(RTC_IRQ, 1)

    def _alarm_matches(self) -> bool:
        for alarm, reg in ((REG_SEC_ALARM, REG_SEC), (REG_MIN_ALARM, REG_MIN),
                           (REG_HOUR_ALARM, REG_HOUR)):
            a = self.cmos[alarm]
            if a < 0xC0 and a != self._time_reg(reg):
                return False
        return True

    def save_state(self) -> dict:
        with self._lock:
            return dict(index=self.index, nmi_disabled=self.nmi_disabled, offset=self.offset,
                        cmos=bytes(self.cmos))

    def load_state(self, s) -> None:
        # A record's offset is a float off the file: NaN or one past what gmtime() takes would
        # stop the timer thread at its first tick (the restore refuses it, in one line).
        if not math.isfinite(s.offset) or abs(s.offset) > MAX_CLOCK_OFFSET:
            raise ValueError(f"clock offset {s.offset!r} s is not a time this RTC can keep")
        with self._cond:
            self.index, self.nmi_disabled, self.offset = s.index, s.nmi_disabled, s.offset
            self.cmos[:] = s.cmos
            self._cond.notify_all()        # the timer thread: the period may have changed

    def start(self) -> None:
        if self._thread is None:
            self._thread = concurrency.DeviceThread("rtc-timer", self._timer_loop,
                                                    wake=self._wake).start()

    def _wake(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def close(self) -> None:
        self._wake()
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    def _timer_loop(self, thread: concurrency.DeviceThread) -> None:
        next_tick = None
        last_second = None
        with self._cond:
            while not self._closing:
                now = time.monotonic()
                period = self._period()
                if period is None:
                    next_tick = None
                elif next_tick is None or next_tick - now > period:
                    next_tick = now + period
                elif now >= next_tick:
                    self._raise(C_PF)
                    next_tick += period
                    if next_tick < now:               # fell behind: do not burst
                        next_tick = now + period
                second = int(self._clock() + self.offset)
                if last_second is not None and second != last_second and \
                        not self.cmos[REG_B] & B_SET:
                    self._raise(C_UF | (C_AF if self._alarm_matches() else 0))
                last_second = second
                waits = [1.0 - ((self._clock() + self.offset) % 1.0) + 0.0005]
                if next_tick is not None:
                    waits.append(next_tick - time.monotonic())
                self._cond.wait(max(0.0, min(waits)))

    # -- port handler -----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF if size == 1 else 0xFFFF      # the index register is write-only
        with self._lock:
            v = self._read_data()
        return v if size == 1 else v | 0xFF00

    def _read_data(self) -> int:
        reg = self.index
        if reg in TIME_REGS:
            return self._time_reg(reg)
        if reg == REG_A:
            return self.cmos[REG_A] & ~A_UIP
        if reg == REG_C:
            v = self.cmos[REG_C]
            self.cmos[REG_C] = 0                      # read clears the interrupt flags
            if v & C_IRQF:
                self.machine.irq(RTC_IRQ, 0)
            return v
        return self.cmos[reg]

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == 0:
                self.index = value & 0x7F
                self.nmi_disabled = bool(value & 0x80)
                if size == 2:
                    self._write_data((value >> 8) & 0xFF)
            else:
                self._write_data(value & 0xFF)

    def _write_data(self, value: int) -> None:
        reg = self.index
        if reg in TIME_REGS:
            self._set_time_reg(reg, value)
        elif reg == REG_A:
            self.cmos[REG_A] = value & 0x7F
            self._cond.notify_all()
        elif reg == REG_B:
            self.cmos[REG_B] = value
            self._cond.notify_all()
        elif reg in (REG_C, REG_D):
            pass                                      # read-only
        else:
            self.cmos[reg] = value


def create(machine, options) -> Rtc:
    return Rtc(machine)
