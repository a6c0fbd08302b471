"""An i8042 keyboard controller at ports 0x60 (data) / 0x64 (status/command), enough for
firmware and for the PC reset line.

There is no keyboard input. The controller answers its own commands (self test, interface
tests, command byte, output port) and a keyboard that acknowledges commands (reset answers
0xfa 0xaa, identify 0xfa 0xab 0x83) so firmware probing it does not wait for timeouts. The
auxiliary (mouse) port answers 0xfe (no device). Command 0xfe, or any 0xf0-0xff pulse with
bit 0 clear, or an output-port write with the reset bit clear, resets the machine: the run
ends with exit status 0 (reboot), as bhyve does. A20 commands are accepted (A20 is always on).
IRQ 1 is raised while keyboard data waits, if the command byte enables it.
"""
from __future__ import annotations

import threading
from collections import deque

DATA_PORT = 0x60
STATUS_PORT = 0x64

STS_OBF = 0x01
STS_SYS = 0x04
STS_CMD = 0x08      # last write was to the command port
STS_UNLOCKED = 0x10
STS_AUX_OBF = 0x20

CCB_KBD_INT = 0x01
CCB_AUX_INT = 0x02
CCB_SYS = 0x04
CCB_KBD_DISABLE = 0x10
CCB_AUX_DISABLE = 0x20
CCB_XLATE = 0x40

KBD_IRQ = 1
AUX_IRQ = 12

_WRITE_RAM = range(0x61, 0x80)


class I8042:
    def __init__(self, machine):
        self.machine = machine
        self._lock = threading.Lock()
        self.ccb = CCB_SYS | CCB_XLATE | CCB_KBD_INT
        self.ram = bytearray(32)
        self.output_port = 0x03          # reset line high (not asserted), A20 on
        self.pending_cmd: int | None = None   # controller command awaiting its data byte
        self.queue: deque[tuple[int, bool]] = deque()   # (byte, from_aux)
        self.last_was_cmd = False
        self.kbd_pending: int | None = None   # keyboard command awaiting its parameter
        self.scancode_set = 2
        machine.pio.register(DATA_PORT, 1, _Port(self, DATA_PORT), name="i8042-data")
        machine.pio.register(STATUS_PORT, 1, _Port(self, STATUS_PORT), name="i8042-cmd")

    # -- output buffer ----------------------------------------------------------------------
    def _push(self, data: int, aux: bool = False) -> None:
        self.queue.append((data & 0xFF, aux))
        self._update_irq()

    def _update_irq(self) -> None:
        kbd = aux = 0
        if self.queue:
            _, from_aux = self.queue[0]
            if from_aux:
                aux = 1 if self.ccb & CCB_AUX_INT else 0
            else:
                kbd = 1 if self.ccb & CCB_KBD_INT else 0
        self.machine.irq(KBD_IRQ, kbd)
        self.machine.irq(AUX_IRQ, aux)

    def status(self) -> int:
        s = STS_UNLOCKED | (STS_SYS if self.ccb & CCB_SYS else 0)
        if self.last_was_cmd:
            s |= STS_CMD
        if self.queue:
            s |= STS_OBF
            if self.queue[0][1]:
                s |= STS_AUX_OBF
        return s

    def read_data(self) -> int:
        if not self.queue:
            return 0x00
        data, _ = self.queue.popleft()
        self._update_irq()
        return data

    # -- commands ---------------------------------------------------------------------------
    def _reset(self, how: str) -> None:
        self.machine.request_exit(0, f"guest reset (i8042 {how})")

    def command(self, cmd: int) -> None:
        self.last_was_cmd = True
        if cmd == 0x20:
            self._push(self.ccb)
        elif 0x21 <= cmd <= 0x3F:
            self._push(self.ram[cmd - 0x20])
        elif cmd == 0x60 or cmd in _WRITE_RAM or cmd in (0xD1, 0xD2, 0xD3, 0xD4):
            self.pending_cmd = cmd
        elif cmd == 0xA7:
            self.ccb |= CCB_AUX_DISABLE
        elif cmd == 0xA8:
            self.ccb &= ~CCB_AUX_DISABLE
        elif cmd == 0xA9:
            self._push(0x00)             # aux interface test passed
        elif cmd == 0xAA:
            self._push(0x55)             # controller self test passed
        elif cmd == 0xAB:
            self._push(0x00)             # keyboard interface test passed
        elif cmd == 0xAD:
            self.ccb |= CCB_KBD_DISABLE
        elif cmd == 0xAE:
            self.ccb &= ~CCB_KBD_DISABLE
        elif cmd == 0xC0:
            self._push(0x00)             # input port
        elif cmd == 0xD0:
            self._push(self.output_port)
        elif cmd in (0xDD, 0xDF):
            pass                         # A20 off/on (A20 stays on)
        elif cmd >= 0xF0:
            if not cmd & 0x01:           # pulse output line 0: the CPU reset
                self._reset(f"command {cmd:#04x}")
        # anything else is ignored

    def data(self, value: int) -> None:
        self.last_was_cmd = False
        cmd, self.pending_cmd = self.pending_cmd, None
        if cmd is None:
            self._keyboard(value)
        elif cmd == 0x60:
            self.ccb = value
            self._update_irq()
        elif cmd in _WRITE_RAM:
            self.ram[cmd - 0x60] = value
        elif cmd == 0xD1:
            self.output_port = value | 0x02      # A20 stays on
            if not value & 0x01:
                self._reset("output port")
        elif cmd == 0xD2:
            self._push(value)                    # echo as keyboard data
        elif cmd == 0xD3:
            self._push(value, aux=True)          # echo as aux data
        elif cmd == 0xD4:
            self._push(0xFE, aux=True)           # no mouse

    def _keyboard(self, value: int) -> None:
        self.ccb &= ~CCB_KBD_DISABLE             # writing to the keyboard enables it
        param_of, self.kbd_pending = self.kbd_pending, None
        if param_of is not None:
            if param_of == 0xF0 and value == 0:
                self._push(0xFA)
                self._push(self.scancode_set)
                return
            if param_of == 0xF0:
                self.scancode_set = value
            self._push(0xFA)
            return
        if value == 0xFF:                        # reset and self test
            self._push(0xFA)
            self._push(0xAA)
        elif value == 0xF2:                      # identify
            self._push(0xFA)
            self._push(0xAB)
            self._push(0x83)
        elif value == 0xEE:                      # echo
            self._push(0xEE)
        elif value in (0xED, 0xF0, 0xF3):        # take a parameter byte
            self.kbd_pending = value
            self._push(0xFA)
        else:
            self._push(0xFA)


class _Port:
    def __init__(self, ctl: I8042, port: int):
        self.ctl = ctl
        self.port = port

    def read(self, offset: int, size: int) -> int:
        with self.ctl._lock:
            return self.ctl.read_data() if self.port == DATA_PORT else self.ctl.status()

    def write(self, offset: int, size: int, value: int) -> None:
        with self.ctl._lock:
            if self.port == DATA_PORT:
                self.ctl.data(value & 0xFF)
            else:
                self.ctl.command(value & 0xFF)


def create(machine, options) -> I8042:
    return I8042(machine)
