"""An i8042 keyboard controller at ports 0x60 (data) / 0x64 (status/command), enough for
firmware and for the PC reset line.

There is no keyboard input. The controller answers its own commands (self test, interface
tests, command byte, output port) and a keyboard that acknowledges commands (reset answers
0xfa 0xaa, identify 0xfa 0xab 0x83) so firmware probing it does not wait for timeouts. The
auxiliary (mouse) port answers 0xfe (no device). Command 0xfe, or any 0xf0-0xff pulse with
bit 0 clear, or an output-port write with the reset bit clear, resets the machine: the run
ends with exit status 0 (reboot), as bhyve does. A20 commands are accepted (A20 is always on).
IRQ 1 (IRQ 12 for aux data) is raised while a byte waits, if the command byte enables it.

Output, at the sizes of the hardware, so a guest that never reads cannot make the VMM hold
more (a guest writing commands to 0x64 forever costs nothing but its exits):

* The controller has one output register (OBF in the status register says it is full).
  A controller answer (0x20 command byte, 0xaa self test, 0xd2/0xd3 echoes, the no-mouse
  0xfe) is written into it, replacing an unread byte as the register does when the
  controller's firmware writes it (QEMU's pckbd keeps one controller byte, newest wins).
* The keyboard has its own small transmit buffer (16 bytes in an MF2 keyboard), needed
  because its answers are several bytes (0xfa then 0xaa; 0xfa 0xab 0x83). While OBF is set
  the controller holds the keyboard clock, so those bytes wait in the keyboard and move into
  the register one at a time as the host reads it. A new keyboard command discards the
  answer bytes the keyboard had not yet sent (QEMU's ps2 command queue does the same), so
  at most three bytes wait there; past 16 further bytes would be dropped.

So the controller holds at most ``CAPACITY`` bytes (1 + 16); ``held`` and ``held_peak``
report what it holds now and the most it ever held.
"""
from __future__ import annotations

from ..device import Device

from collections import deque

from .. import concurrency
from ..snapshot.state import DeviceState
from ..packed import declared_later

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

OUTPUT_REGISTER_SIZE = 1    # the controller's output buffer
KBD_BUFFER_SIZE = 16        # the keyboard's own transmit buffer
CAPACITY = OUTPUT_REGISTER_SIZE + KBD_BUFFER_SIZE

_WRITE_RAM = range(0x61, 0x80)


class I8042(Device, DeviceState):
    name = "i8042"

    CAPACITY = CAPACITY
    # -1 stands for None (no command pending, output register empty).
    state_version = 1

    @declared_later
    def state_layout():
        from construct import Bytes, Flag, Int8ul, Int16sl, PrefixedArray, Struct
        return Struct("ccb" / Int8ul, "ram" / Bytes(32), "output_port" / Int8ul,
                      "pending_cmd" / Int16sl, "obuf" / Int16sl, "obuf_aux" / Flag,
                      "kbd_tx" / PrefixedArray(Int8ul, Int8ul), "last_was_cmd" / Flag,
                      "kbd_pending" / Int16sl, "scancode_set" / Int8ul)

    def __init__(self, machine):
        self.machine = machine
        self._lock = concurrency.lock(concurrency.DEVICE, "i8042")
        self.ccb = CCB_SYS | CCB_XLATE | CCB_KBD_INT
        self.ram = bytearray(32)
        self.output_port = 0x03          # reset line high (not asserted), A20 on
        self.pending_cmd: int | None = None   # controller command awaiting its data byte
        self.obuf: int | None = None     # the output register (None: OBF clear)
        self.obuf_aux = False            # ... holding aux (mouse) data
        self.kbd_tx: deque[int] = deque()     # keyboard bytes not yet in the register
        self.held_peak = 0               # most bytes ever held (register + keyboard buffer)
        self.last_was_cmd = False
        self.kbd_pending: int | None = None   # keyboard command awaiting its parameter
        self.scancode_set = 2
        self._irq = (0, 0)               # (IRQ 1, IRQ 12) as last driven
        machine.pio.register(DATA_PORT, 1, _Port(self, DATA_PORT), name="i8042-data")
        machine.pio.register(STATUS_PORT, 1, _Port(self, STATUS_PORT), name="i8042-cmd")

    def save_state(self) -> dict:
        def opt(v):
            return -1 if v is None else v
        with self._lock:
            return dict(ccb=self.ccb, ram=bytes(self.ram), output_port=self.output_port,
                        pending_cmd=opt(self.pending_cmd), obuf=opt(self.obuf),
                        obuf_aux=self.obuf_aux, kbd_tx=list(self.kbd_tx)[:255],
                        last_was_cmd=self.last_was_cmd, kbd_pending=opt(self.kbd_pending),
                        scancode_set=self.scancode_set)

    def load_state(self, s) -> None:
        def opt(v):
            return None if v < 0 else v & 0xFF
        with self._lock:
            self.ccb, self.ram[:], self.output_port = s.ccb, s.ram, s.output_port
            self.pending_cmd, self.obuf = opt(s.pending_cmd), opt(s.obuf)
            self.obuf_aux, self.last_was_cmd = s.obuf_aux, s.last_was_cmd
            self.kbd_tx = deque(list(s.kbd_tx)[:KBD_BUFFER_SIZE])
            self.kbd_pending, self.scancode_set = opt(s.kbd_pending), s.scancode_set
            self._update_irq()

    # -- output buffer ----------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Bytes the controller holds for the host: the register and the keyboard's buffer."""
        return (self.obuf is not None) + len(self.kbd_tx)

    def _count(self) -> None:
        n = (self.obuf is not None) + len(self.kbd_tx)
        if n > self.held_peak:
            self.held_peak = n

    def _push(self, data: int, aux: bool = False) -> None:
        """A controller answer: into the output register, replacing an unread byte."""
        self.obuf, self.obuf_aux = data & 0xFF, aux
        self._count()
        self._update_irq()

    def _kbd_send(self, data: int) -> None:
        """A keyboard answer byte: it waits in the keyboard until the register is free."""
        if len(self.kbd_tx) < KBD_BUFFER_SIZE:
            self.kbd_tx.append(data & 0xFF)
        self._fill()

    def _fill(self) -> None:
        if self.obuf is None and self.kbd_tx:
            self.obuf, self.obuf_aux = self.kbd_tx.popleft(), False
        self._count()
        self._update_irq()

    def _update_irq(self) -> None:
        kbd = aux = 0
        if self.obuf is not None:
            if self.obuf_aux:
                aux = 1 if self.ccb & CCB_AUX_INT else 0
            else:
                kbd = 1 if self.ccb & CCB_KBD_INT else 0
        if (kbd, aux) != self._irq:
            self._irq = (kbd, aux)
            self.machine.irq(KBD_IRQ, kbd)
            self.machine.irq(AUX_IRQ, aux)

    def status(self) -> int:
        s = STS_UNLOCKED | (STS_SYS if self.ccb & CCB_SYS else 0)
        if self.last_was_cmd:
            s |= STS_CMD
        if self.obuf is not None:
            s |= STS_OBF
            if self.obuf_aux:
                s |= STS_AUX_OBF
        return s

    def read_data(self) -> int:
        data = self.obuf
        if data is None:
            return 0x00
        self.obuf = None
        self._update_irq()               # the line drops with OBF ...
        self._fill()                     # ... and rises again for the keyboard's next byte
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
        self.kbd_tx.clear()                      # it drops the answer it had not yet sent
        send = self._kbd_send
        param_of, self.kbd_pending = self.kbd_pending, None
        if param_of is not None:
            if param_of == 0xF0 and value == 0:
                send(0xFA)
                send(self.scancode_set)
                return
            if param_of == 0xF0:
                self.scancode_set = value
            send(0xFA)
            return
        if value == 0xFF:                        # reset and self test
            send(0xFA)
            send(0xAA)
        elif value == 0xF2:                      # identify
            send(0xFA)
            send(0xAB)
            send(0x83)
        elif value == 0xEE:                      # echo
            send(0xEE)
        elif value in (0xED, 0xF0, 0xF3):        # take a parameter byte
            self.kbd_pending = value
            send(0xFA)
        else:
            send(0xFA)


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
