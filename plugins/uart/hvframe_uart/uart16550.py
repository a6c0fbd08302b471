"""16550A UART register model, per the National PC16550D datasheet, independent of KVM.

The model is driven from three sides:
  * vCPU threads call `read(offset, size)` / `write(offset, size, value)` for offsets 0-7;
  * a backend reader thread calls `host_input(data)` with bytes typed by the user;
  * the UART calls `set_irq(level)` whenever its interrupt output changes.

Choices where the datasheet leaves room, or where a VM differs from a wire:
  * Transmit is immediate: a byte written to THR leaves for the backend within the same
    write, so the guest sees THRE/TEMT drop only while another vCPU is mid-transmit. As on
    real hardware the THRE interrupt is cleared by the THR write and re-armed when the FIFO
    empties into the transmitter, so the IRQ line pulses low then high (a fresh edge for
    edge-triggered interrupt controllers).
  * Character timeout is reported as soon as the RX FIFO holds data below the trigger level
    (no 4-character-time delay). Host bytes wait in the backlog only while the FIFO is full,
    so "below trigger" already means "no more input right now": waiting would only add latency.
  * Host input is never lost. It queues in a bounded backlog (default 64 KiB) that refills the
    RX FIFO as the guest reads, whatever IER says; when the backlog is full `host_input`
    blocks the backend reader (backpressure) instead of dropping. FIFO resets and FIFO
    enable/disable clear loopback bytes as the datasheet says, but host bytes go back to the
    front of the backlog: guests reset the FIFOs at start-up, and typed-ahead input must
    survive that. Overrun (LSR.OE) can therefore only come from the loopback path.
  * In loopback the serial input is disconnected: host bytes stay in the backlog until
    loopback is turned off.
  * IRQ line = (IIR reports a pending interrupt) AND MCR.OUT2 AND NOT MCR.LOOP. PC COM ports
    gate the UART's interrupt with the OUT2 pin, and the datasheet forces the OUT2 pin
    inactive in loopback, so a PC sees no IRQ in loopback mode.
  * Without loopback the modem lines read as a connected peer: DCD, DSR and CTS set, RI clear
    (MSR = 0xB0 after reset).
  * Parity, framing and break errors are never generated, so LSR bits 2-4 and 7 stay 0.
    Writes to LSR and MSR (factory test on real parts) are ignored.
  * The divisor latch resets to 12 (9600 baud, the usual BIOS setting); the datasheet leaves
    it undefined. Reading RBR with nothing received returns the last byte received.

`set_irq` is called with the state lock held so successive levels can never be reordered
between threads; it must not call back into this UART.

Native fast path (map_native, hvframe.regblock): for a polled console -- a guest that reads
LSR until THRE and writes THR, as Linux's printk console does -- LSR reads and THR writes are
answered by the native core without the GIL. THR writes go into a bounded native ring that a
drain thread hands to the backend under the transmit lock, so bytes keep their order with
those Python transmits (which empty the ring first). LSR.THRE and TEMT read as set while
the ring has room (the ring is the backend's side of the wire, as the immediate transmit
above); DR is kept current by Python. The native path serves only the plain mode: DLAB
clear, no loopback, IER.ETBEI clear and no overrun pending. Any register access that leaves
that mode switches THR and LSR back to Python (in one step against vCPUs: no native access
is in progress afterwards), so IER, IIR, LCR, MCR, interrupts, the receive path and loopback
behave exactly as without it. A write to a full ring goes to Python, whose transmit drains
the ring first and hands on to the backend, whose own bound drops and counts.
"""
from __future__ import annotations

from collections import deque

from hvframe import concurrency
from hvframe.device import AcpiIsaDevice, Device
from hvframe.dispatch import Access, Bus
from hvframe.packed import Declarations, declared_later
from hvframe.snapshot.state import DeviceState
from hvframe.regblock import Fifo, FifoDrainer, Full, Kind, Reg, RegisterBlock

# typing stays out of a run (about 4 ms of start-up); type checkers see the Protocol below.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional, Protocol, Sequence

    from hvframe.machine import CoalescedWrites
else:
    Protocol = object

# Register offsets (DLAB selects DLL/DLM at 0/1).
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_ERBFI = 0x01   # received data available / timeout
IER_ETBEI = 0x02   # transmitter holding register empty
IER_ELSI = 0x04    # receiver line status
IER_EDSSI = 0x08   # modem status
IER_MASK = 0x0F

IIR_MSR = 0x00
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_RX_RESET = 0x02
FCR_TX_RESET = 0x04
RX_TRIGGER_LEVELS = (1, 4, 8, 14)   # indexed by FCR bits 7:6

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS



def _declare():
    from construct import Flag, Int8ul, Int16ul, PrefixedArray, Struct

    # The register file with DLAB clear: what the native register block serves.
    REGISTERS = Struct("rbr_thr" / Int8ul, "ier" / Int8ul, "iir_fcr" / Int8ul, "lcr" / Int8ul,
                       "mcr" / Int8ul, "lsr" / Int8ul, "msr" / Int8ul, "scr" / Int8ul)

    # A 16550's checkpoint record: its registers, the RX FIFO (each byte with whether it came
    # from the host, which decides where a cleared FIFO's bytes go) and the host bytes waiting
    # for room, the transmit FIFO not yet handed to the backend.
    UART_STATE = Struct(
        "ier" / Int8ul, "lcr" / Int8ul, "mcr" / Int8ul, "scr" / Int8ul, "dll" / Int8ul,
        "dlm" / Int8ul, "fifo_enabled" / Flag, "rx_trigger" / Int8ul,
        "rx" / PrefixedArray(Int16ul, Struct("byte" / Int8ul, "from_host" / Flag)),
        "backlog" / PrefixedArray(Int16ul, Int8ul), "last_rx" / Int8ul, "overrun" / Flag,
        "tx" / PrefixedArray(Int16ul, Int8ul), "thre_pending" / Flag, "msr_lines" / Int8ul,
        "msr_delta" / Int8ul,
    )
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr
assert {n: o for n, (o, _) in LAYOUTS.REGISTERS.fields.items()} == {
    "rbr_thr": THR, "ier": IER, "iir_fcr": IIR, "lcr": LCR, "mcr": MCR, "lsr": LSR, "msr": MSR,
    "scr": SCR}
NATIVE_RING = 16384     # bytes THR writes may queue natively before the drain thread runs
NATIVE_REGS = {
    # THR writes feed the ring; RBR reads (same offset) stay Python.
    "rbr_thr": Reg(Kind.FIFO, fifo="tx", native=False),
    # DR kept current by Python; THRE and TEMT follow the ring.
    "lsr": Reg(Kind.PY_VALUE, fifo="tx", room_bits=LSR_THRE | LSR_TEMT, native=False),
}
NATIVE_FIFOS = {"tx": Fifo(NATIVE_RING, Full.PYTHON)}
NATIVE_NAMES = tuple(NATIVE_REGS)

FIFO_SIZE = 16
DEFAULT_BACKLOG_LIMIT = 64 * 1024
RESET_DIVISOR = 12


class Backend(Protocol):
    """What a Uart16550 writes to and reads from (see backends.py); backends need not
    subclass it."""
    def write(self, data: bytes) -> None: ...
    def start(self, on_input: Callable[[bytes], None]) -> None: ...
    def close(self) -> None: ...


# Eight byte-wide registers: a wider access is that many byte cycles to consecutive registers,
# as on the ISA bus, so the model only ever sees bytes.
BYTE_PORTS = Access(sizes=(1,))


class Uart16550(Device, DeviceState):
    """One 16550A. Handler for an 8-port PIO range; see the module docstring for the model.
    acpi: how the DSDT describes it (a COM port), if it is one."""

    def __init__(self, set_irq: Callable[[int], None], backend: Optional[Backend] = None,
                 backlog_limit: int = DEFAULT_BACKLOG_LIMIT, *, name: str = "16550",
                 acpi: Optional[AcpiIsaDevice] = None):
        if backlog_limit < 1:
            raise ValueError("backlog_limit must be at least 1")
        self.name = name
        self._acpi = acpi
        self.backend = backend
        self._set_irq = set_irq
        self._backlog_limit = backlog_limit
        self._lock = concurrency.lock(concurrency.DEVICE, "16550")
        self._backlog_space = concurrency.condition(self._lock)
        # Serialises hand-off to the backend so bytes from different vCPUs keep THR order.
        self._tx_lock = concurrency.lock(concurrency.DEVICE_OUTER, "16550 transmit")
        self._closed = False
        self._started = False

        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._dll = RESET_DIVISOR & 0xFF
        self._dlm = RESET_DIVISOR >> 8
        self._fifo_enabled = False
        self._rx_trigger = 1
        self._rx: deque[tuple[int, bool]] = deque()   # (byte, came from host)
        self._backlog: deque[int] = deque()           # host bytes not yet in the RX FIFO
        self._last_rx = 0
        self._overrun = False
        self._tx: deque[int] = deque()                # written to THR, not yet handed off
        self._transmitting = False                    # backend write in progress (TSR busy)
        self._thre_pending = False
        self._msr_lines = MSR_CONNECTED
        self._msr_delta = 0
        self._irq_level = 0

        self._native: Optional[RegisterBlock] = None    # set by map_native
        self._drainer: Optional[FifoDrainer] = None
        self._native_on = False                         # THR and LSR served natively now
        self._native_lsr = 0                            # the LSR bits last given to it
        self._native_pushed = 0                         # ring entries pushed when switched on
        self._thr_writes: Optional[CoalescedWrites] = None   # buffered THR writes (map_native)

    @property
    def native_block(self) -> Optional[RegisterBlock]:
        """The native register block serving this UART (map_native), if any."""
        return self._native

    @property
    def native_drainer(self) -> Optional[FifoDrainer]:
        """The thread handing the native ring to the backend (map_native), if any."""
        return self._drainer

    def map_native(self, bus: Bus, base: int, name: str = "16550",
                   thr_writes: CoalescedWrites | None = None) -> None:
        """Serve this UART's 8 ports of bus at base, with LSR reads and THR writes answered
        natively while the mode is plain (see the module docstring). The backend's write()
        must never wait (it is called from the drain thread under the transmit lock).
        thr_writes (Machine.coalesce_writes of the THR port), if given, is enabled while the
        mode is plain: a polled console's THR writes are then buffered by KVM and reach the
        ring at the guest's next LSR poll, one exit per byte instead of two."""
        block = RegisterBlock(LAYOUTS.REGISTERS, NATIVE_REGS, self, fifos=NATIVE_FIFOS, name=name)
        block.map(bus, base, access=BYTE_PORTS)
        self._drainer = FifoDrainer(block, "tx", self.flush_native, name=f"{name}-tx-drain")
        with self._lock:
            self._native = block
            self._thr_writes = thr_writes
            self._sync_native()
        self._drainer.start()

    # ---- checkpoint (hvframe.snapshot.state) -------------------------------------------------
    state_version = 1
    state_layout = declared_later(lambda: LAYOUTS.module_getattr("UART_STATE"))

    def quiesce(self) -> None:
        """What the guest wrote natively goes to the backend before the state is taken."""
        self.flush_native()

    def save_state(self) -> dict:
        with self._lock:
            return dict(ier=self._ier, lcr=self._lcr, mcr=self._mcr, scr=self._scr,
                        dll=self._dll, dlm=self._dlm, fifo_enabled=self._fifo_enabled,
                        rx_trigger=self._rx_trigger,
                        rx=[dict(byte=b, from_host=h) for b, h in self._rx],
                        backlog=list(self._backlog)[:0xFFFF], last_rx=self._last_rx,
                        overrun=self._overrun, tx=list(self._tx)[:0xFFFF],
                        thre_pending=self._thre_pending, msr_lines=self._msr_lines,
                        msr_delta=self._msr_delta)

    def load_state(self, s) -> None:
        with self._lock:
            self._ier, self._lcr, self._mcr, self._scr = s.ier, s.lcr, s.mcr, s.scr
            self._dll, self._dlm = s.dll, s.dlm
            self._fifo_enabled = s.fifo_enabled
            self._rx_trigger = s.rx_trigger if s.rx_trigger in RX_TRIGGER_LEVELS else 1
            self._rx = deque((e.byte, e.from_host) for e in s.rx[:FIFO_SIZE])
            self._backlog = deque(s.backlog[:self._backlog_limit])
            self._last_rx, self._overrun = s.last_rx, s.overrun
            self._tx = deque(s.tx[:FIFO_SIZE])
            self._thre_pending = s.thre_pending
            self._msr_lines, self._msr_delta = s.msr_lines, s.msr_delta
            self._irq_level = -1          # drive the line whatever it was
            self._update_irq()
            self._sync_native()
        if self._tx:
            self._transmit()

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start delivering host input (called once all devices exist, before vCPUs run)."""
        if self._started or self.backend is None:
            return
        self._started = True
        self.backend.start(self.host_input)

    def acpi_isa_devices(self) -> Sequence[AcpiIsaDevice]:
        return (self._acpi,) if self._acpi is not None else ()

    def close(self) -> None:
        """Release a backend reader blocked on backpressure, hand on what the native ring
        holds, then close the backend. Idempotent."""
        if self._thr_writes is not None:
            self._thr_writes.close()    # THR writes still buffered reach the ring first
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._backlog_space.notify_all()
            self._sync_native()     # from now on every access is Python's
        if self._drainer is not None:
            self._drainer.stop()
            with self._tx_lock:
                self._flush_native()
            self._native.close()
        if self.backend is not None:
            self.backend.close()

    @property
    def irq_level(self) -> int:
        return self._irq_level

    # ---- host side --------------------------------------------------------------------------

    def host_input(self, data: bytes) -> None:
        """Queue bytes from the host for the guest. Blocks while the backlog is full."""
        view = memoryview(bytes(data))
        with self._lock:
            while view:
                if self._closed:
                    return
                room = self._backlog_limit - len(self._backlog)
                if room <= 0:
                    self._backlog_space.wait()
                    continue
                self._backlog.extend(view[:room])
                view = view[room:]
                self._refill_rx()
                self._update_irq()
                self._sync_native()

    # ---- guest side -------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if not 0 <= offset <= 7:
            return (1 << (8 * size)) - 1
        with self._lock:
            value = self._read_register(offset)
            self._sync_native()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        if not 0 <= offset <= 7:
            return
        with self._lock:
            must_transmit = self._write_register(offset, value & 0xFF)
            self._sync_native()
        if must_transmit:
            self._transmit()

    # ---- register access (lock held) --------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            return self._dll if dlab else self._read_rbr()
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            return self._read_iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return self._read_lsr()
        if offset == MSR:
            return self._read_msr()
        return self._scr

    def _write_register(self, offset: int, value: int) -> bool:
        """Returns True when bytes were queued for the backend."""
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._dll = value
                return False
            return self._write_thr(value)
        if offset == IER:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR writes are ignored.
        return False

    def _read_rbr(self) -> int:
        if self._rx:
            self._last_rx, _ = self._rx.popleft()
            self._refill_rx()
            self._update_irq()
        return self._last_rx

    def _read_iir(self) -> int:
        iid = self._interrupt_id()
        if iid == IIR_THRE:
            # Reading IIR while it reports THRE acknowledges that interrupt.
            self._thre_pending = False
            self._update_irq()
        return iid | (IIR_FIFO_ENABLED if self._fifo_enabled else 0)

    def _read_lsr(self) -> int:
        value = self._lsr()
        if self._overrun:
            self._overrun = False
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        value = self._msr_lines | self._msr_delta
        if self._msr_delta:
            self._msr_delta = 0
            self._update_irq()
        return value

    def _write_thr(self, value: int) -> bool:
        self._thre_pending = False
        self._update_irq()
        if self._mcr & MCR_LOOP:
            # Loopback: the transmitter feeds the receiver and empties at once.
            self._loopback_receive(value)
            self._thre_pending = True
            self._update_irq()
            return False
        if len(self._tx) < self._fifo_capacity():
            self._tx.append(value)
        # else: a write to a full FIFO is lost, as on the chip (only reachable with several
        # vCPUs writing concurrently, since each write drains before returning).
        return True

    def _write_ier(self, value: int) -> None:
        old = self._ier
        self._ier = value & IER_MASK
        if self._ier & IER_ETBEI and not old & IER_ETBEI and not self._tx:
            # Enabling ETBEI while THR is empty raises THRE (Linux probes for exactly this).
            self._thre_pending = True
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        if not value & FCR_ENABLE:
            # Clearing FCR0 leaves FIFO mode and empties both FIFOs; other bits not programmed.
            if self._fifo_enabled:
                self._fifo_enabled = False
                self._clear_rx()
                self._clear_tx()
        else:
            if not self._fifo_enabled:
                self._fifo_enabled = True
                self._clear_rx()
                self._clear_tx()
            if value & FCR_RX_RESET:
                self._clear_rx()
            if value & FCR_TX_RESET:
                self._clear_tx()
            self._rx_trigger = RX_TRIGGER_LEVELS[value >> 6]
        self._refill_rx()
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        was_loop = self._mcr & MCR_LOOP
        self._mcr = value & MCR_MASK
        self._set_modem_lines(self._modem_lines())
        if was_loop and not self._mcr & MCR_LOOP:
            self._refill_rx()
        self._update_irq()

    # ---- internals (lock held) --------------------------------------------------------------

    def _fifo_capacity(self) -> int:
        return FIFO_SIZE if self._fifo_enabled else 1

    def _lsr(self) -> int:
        value = 0
        if self._rx:
            value |= LSR_DR
        if self._overrun:
            value |= LSR_OE
        if not self._tx:
            value |= LSR_THRE
            if not self._transmitting:
                value |= LSR_TEMT
        if self._native_on:
            # As the native read would: a full ring is a busy transmitter.
            value &= self._native.read("lsr") | ~(LSR_THRE | LSR_TEMT)
        return value

    def _sync_native(self) -> None:
        """Give the native register block what it serves from: the LSR bits Python owns, and
        whether the mode is plain enough for it to serve THR and LSR at all."""
        block = self._native
        if block is None:
            return
        lsr = LSR_DR if self._rx else 0
        if lsr != self._native_lsr:
            block.store("lsr", lsr)
            self._native_lsr = lsr
        plain = not (self._lcr & LCR_DLAB or self._mcr & MCR_LOOP or self._ier & IER_ETBEI
                     or self._overrun or self._closed)
        if plain == self._native_on:
            return
        block.set_native(NATIVE_NAMES, plain)
        self._native_on = plain
        if self._thr_writes is not None:
            # Plain mode raises no interrupt on a THR write, so a buffered one is only late.
            self._thr_writes.enable(plain)
        pushed = block.counts("tx").pushed
        if plain:
            self._native_pushed = pushed
        elif pushed != self._native_pushed:
            # Those THR writes emptied into the transmitter, as a Python one would have.
            self._thre_pending = True
            self._update_irq()

    def _interrupt_id(self) -> int:
        """Highest-priority pending interrupt, as IIR bits 3:0."""
        ier = self._ier
        if ier & IER_ELSI and self._overrun:
            return IIR_RLS
        if ier & IER_ERBFI and self._rx:
            if not self._fifo_enabled or len(self._rx) >= self._rx_trigger:
                return IIR_RDA
            return IIR_TIMEOUT
        if ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if ier & IER_EDSSI and self._msr_delta:
            return IIR_MSR
        return IIR_NONE

    def _update_irq(self) -> None:
        gate_open = self._mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
        level = 1 if gate_open and self._interrupt_id() != IIR_NONE else 0
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)

    def _refill_rx(self) -> None:
        if self._mcr & MCR_LOOP or not self._backlog:
            return
        capacity = self._fifo_capacity()
        while len(self._rx) < capacity and self._backlog:
            self._rx.append((self._backlog.popleft(), True))
        self._backlog_space.notify_all()

    def _loopback_receive(self, value: int) -> None:
        if len(self._rx) < self._fifo_capacity():
            self._rx.append((value, False))
            return
        self._overrun = True
        if not self._fifo_enabled:
            # 16450 mode: the new character overwrites RBR. A host byte it displaces goes
            # back to the backlog rather than being lost.
            old, from_host = self._rx.pop()
            if from_host:
                self._backlog.appendleft(old)
            self._rx.append((value, False))
        # FIFO mode: the character in the shift register is lost; the FIFO is kept.

    def _clear_rx(self) -> None:
        host_bytes = [b for b, from_host in self._rx if from_host]
        self._rx.clear()
        self._backlog.extendleft(reversed(host_bytes))

    def _clear_tx(self) -> None:
        if self._tx:
            self._tx.clear()
            self._thre_pending = True

    def _modem_lines(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return MSR_CONNECTED
        lines = 0
        if mcr & MCR_RTS:
            lines |= MSR_CTS
        if mcr & MCR_DTR:
            lines |= MSR_DSR
        if mcr & MCR_OUT1:
            lines |= MSR_RI
        if mcr & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    def _set_modem_lines(self, lines: int) -> None:
        changed = lines ^ self._msr_lines
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if changed & MSR_RI and not lines & MSR_RI:
            self._msr_delta |= MSR_TERI     # trailing edge of RI only
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        self._msr_lines = lines

    # ---- transmit (called without the state lock) -------------------------------------------

    def flush_native(self) -> None:
        """Hand what the native ring holds to the backend now (the drain thread does it
        within about a millisecond anyway)."""
        with self._tx_lock:
            self._flush_native()

    def _flush_native(self) -> None:
        """(transmit lock held) Everything in the native ring to the backend, oldest first."""
        if self._native is None:
            return
        while True:
            data = self._native.take("tx", NATIVE_RING)
            if not data:
                return
            try:
                if self.backend is not None:
                    self.backend.write(data)
            except OSError:
                pass    # as in _transmit: a broken output path drops output

    def _transmit(self) -> None:
        with self._tx_lock:
            self._flush_native()    # bytes written natively before this one go first
            with self._lock:
                if not self._tx:
                    return
                data = bytes(self._tx)
                self._tx.clear()
                # The FIFO has emptied into the transmitter: THRE is back, so is its interrupt.
                self._transmitting = True
                self._thre_pending = True
                self._update_irq()
            try:
                if self.backend is not None:
                    self.backend.write(data)
            except OSError:
                pass    # a broken output path drops output; the guest must not see an error
            finally:
                with self._lock:
                    self._transmitting = False
