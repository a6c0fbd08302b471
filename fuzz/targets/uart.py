"""Fuzz target: the 16550A UART (plugins/uart/hvframe_uart/uart16550.py) as COM1.

A SyntheticMachine with a Uart16550 on ports 0x3f8-0x3ff and IRQ 4, wired as the com1
device type wires it (machine.irq_source(4), machine.pio.register), with a recording backend
and a backlog limit from the input (1-64 bytes, or the default 64 KiB) so that backpressure
and the FIFO/backlog boundary are reachable. Register reads and writes of every size go
through the dispatch core; host input arrives as a backend reader thread would deliver it
(never more than the backlog has room for, so the reader never blocks).

Invariants after every operation: no handler exception, no hvframe ERROR log; the IRQ 4
line equals "an interrupt is pending and OUT2 is set and loopback is off"; the RX FIFO
stays within its capacity, and the host bytes held within the backlog limit plus one FIFO
(a FIFO reset puts host bytes back in front of the backlog); LCR, MCR, SCR, IER and the
divisor latch read back what was written (modelled independently from the writes); the
backend received exactly the bytes written to THR with DLAB clear and loopback off, in
order; and host input is never lost, duplicated or reordered (what the guest read of it,
plus what is still in the FIFO and the backlog, is what the host sent).
"""
if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzzlib.runner import run_target
    run_target(os.path.abspath(__file__))
    raise SystemExit(0)

from contextlib import closing

from fuzzlib import machines
from fuzzlib.observe import Finding, Observer
from fuzzlib.provider import Provider, operations

from hvframe_uart import uart16550 as u
from hvframe_uart.uart16550 import Uart16550

BASE, IRQ = 0x3F8, 4
MAX_OPS = 96
OP_READ, OP_WRITE, OP_INPUT, OP_INIT, OP_DRAIN = range(5)
N_OPS = 5
VALUES = (0x00, 0x01, 0x02, 0x03, 0x07, 0x08, 0x0B, 0x0F, 0x10, 0x13, 0x1B, 0x1F, 0x80, 0x83,
          0xC1, 0xC7, 0x41, 0x81, 0xFF)


class Recorder:
    def __init__(self):
        self.output = bytearray()

    def write(self, data):
        self.output += data

    def start(self, on_input):
        pass

    def close(self):
        pass


class Rig:
    def __init__(self, limit: int):
        self.m = m = machines.synthetic_machine(64 << 10)
        self.backend = Recorder()
        self.uart = Uart16550(set_irq=m.irq_source(IRQ), backend=self.backend,
                              backlog_limit=limit)
        m.pio.register(BASE, 8, self.uart, name="com1")
        m.on_close(self.uart.close)
        self.limit = limit
        # the independent model
        self.lcr = self.mcr = self.scr = self.ier = 0
        self.dll, self.dlm = u.RESET_DIVISOR & 0xFF, u.RESET_DIVISOR >> 8
        self.sent = bytearray()            # THR writes that must reach the backend
        self.host_fed = bytearray()
        self.host_read = bytearray()

    def close(self):
        machines.teardown(self.m)

    # -- guest accesses -----------------------------------------------------------------------
    def write(self, offset: int, size: int, value: int) -> None:
        b = value & 0xFF
        dlab = self.lcr & u.LCR_DLAB
        if offset == 0:
            if dlab:
                self.dll = b
            elif not self.mcr & u.MCR_LOOP:
                self.sent.append(b)
        elif offset == 1:
            if dlab:
                self.dlm = b
            else:
                self.ier = b & u.IER_MASK
        elif offset == 3:
            self.lcr = b
        elif offset == 4:
            self.mcr = b & u.MCR_MASK
        elif offset == 7:
            self.scr = b
        self.m.io_write(BASE + offset, size, value)

    def read(self, offset: int, size: int, where: str) -> int:
        uart = self.uart
        host_front = offset == 0 and not self.lcr & u.LCR_DLAB and uart._rx and uart._rx[0][1]
        value = self.m.io_read(BASE + offset, size) & 0xFF
        if host_front:
            self.host_read.append(value)
        dlab = self.lcr & u.LCR_DLAB
        expect = {3: self.lcr, 4: self.mcr, 7: self.scr}.get(offset)
        if offset == 0 and dlab:
            expect = self.dll
        if offset == 1:
            expect = self.dlm if dlab else self.ier
        if expect is not None and value != expect:
            raise Finding(f"{where}: register {offset} reads {value:#x}, {expect:#x} was written")
        return value

    # -- invariants ---------------------------------------------------------------------------
    def check(self, where: str) -> None:
        uart = self.uart
        with uart._lock:
            iid = uart._interrupt_id()
            gate = uart._mcr & (u.MCR_OUT2 | u.MCR_LOOP) == u.MCR_OUT2
            rx = list(uart._rx)
            backlog = bytes(uart._backlog)
            capacity = uart._fifo_capacity()
        want = 1 if gate and iid != u.IIR_NONE else 0
        line = self.m.irq_levels.get(IRQ, 0)
        if line != want:
            raise Finding(f"{where}: IRQ {IRQ} is {line}, but IIR says {iid:#x} with MCR "
                          f"{uart._mcr:#x}")
        if len(rx) > capacity:
            raise Finding(f"{where}: RX FIFO holds {len(rx)} bytes, capacity {capacity}")
        held = len(backlog) + sum(1 for _, host in rx if host)
        # The backlog takes host bytes only while under its limit; a FIFO reset puts the
        # FIFO's host bytes back in front of it, so host bytes held never pass limit + 16.
        if held > self.limit + u.FIFO_SIZE:
            raise Finding(f"{where}: {held} host bytes held, limit {self.limit} + FIFO")
        if bytes(self.backend.output) != bytes(self.sent):
            raise Finding(f"{where}: backend got {bytes(self.backend.output).hex()}, THR writes "
                          f"were {bytes(self.sent).hex()}")
        pending = bytes(b for b, host in rx if host) + backlog
        if bytes(self.host_read) + pending != bytes(self.host_fed):
            raise Finding(f"{where}: host input {bytes(self.host_fed).hex()} became "
                          f"read {bytes(self.host_read).hex()} + pending {pending.hex()}")

    def feed(self, data: bytes) -> None:
        with self.uart._lock:
            room = self.limit - len(self.uart._backlog)
        data = data[:max(0, room)]
        if data:
            self.host_fed += data
            self.uart.host_input(data)


def one_input(data: bytes) -> None:
    p = Provider(data)
    flags = p.u8()
    limit = (flags & 63) + 1 if flags & 64 else u.DEFAULT_BACKLOG_LIMIT
    with Observer() as obs, closing(Rig(limit)) as rig:
        for step, op in operations(p, MAX_OPS, N_OPS):
            where = f"step {step}"
            _op(rig, p, op, where)
            obs.check(where)
            rig.check(where)


def _op(rig: Rig, p: Provider, op: int, where: str) -> None:
    if op == OP_READ:
        rig.read(p.u8() & 7, p.PickValueInList((1, 1, 1, 2, 4)), where)
    elif op == OP_WRITE:
        offset = p.u8() & 7
        size = p.PickValueInList((1, 1, 1, 2, 4))
        value = p.PickValueInList(VALUES) if p.u8() & 1 else p.u32() & ((1 << 8 * size) - 1)
        rig.write(offset, size, value)
    elif op == OP_INPUT:
        rig.feed(p.ConsumeBytes(p.u8() % 80))
    elif op == OP_INIT:
        bits = p.u8()                     # what a driver does at start-up
        rig.write(u.LCR, 1, u.LCR_DLAB)
        rig.write(u.DLL, 1, p.u8())
        rig.write(u.DLM, 1, 0)
        rig.write(u.LCR, 1, 0x03)
        rig.write(u.FCR, 1, (bits & 0xC0) | u.FCR_ENABLE | u.FCR_RX_RESET | u.FCR_TX_RESET
                  if bits & 1 else 0)
        rig.write(u.MCR, 1, u.MCR_DTR | u.MCR_RTS | u.MCR_OUT2 | (u.MCR_LOOP if bits & 2 else 0))
        rig.write(u.IER, 1, (bits >> 2) & u.IER_MASK)
    else:                                 # the guest's receive loop: LSR, then RBR while DR
        for _ in range(p.u8() % 40):
            if not rig.read(u.LSR, 1, where) & u.LSR_DR:
                break
            rig.read(u.RBR, 1, where)
            rig.read(u.IIR, 1, where)
