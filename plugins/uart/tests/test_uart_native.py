"""The 16550's polled console served natively (Uart16550.map_native): what the native register
block answers, when it hands back to Python, and that output keeps its order throughout."""
import os
import threading

import pytest

from hvframe.testing import SyntheticMachine, rig
from hvframe_uart.uart16550 import NATIVE_RING

COM1 = 0x3F8
THR, IER, IIR, LCR, MCR, LSR = 0, 1, 2, 3, 4, 5


def build(conf):
    machine = SyntheticMachine()
    uart, = rig(machine, f"-l com1,{conf}")
    return machine, uart


@pytest.fixture
def com1(tmp_path):
    path = tmp_path / "com1.out"
    machine, uart = build(f"file={path}")
    uart.start()
    yield machine, uart, path
    machine.close()


def guest_init(m):
    """What the test guests' runtime does: IER=0, divisor 1, 8N1, FIFOs on, DTR|RTS|OUT2."""
    for offset, value in ((IER, 0), (LCR, 0x80), (0, 1), (1, 0), (LCR, 3), (2, 0xC7), (MCR, 0x0B)):
        m.io_write(COM1 + offset, 1, value)


def putc(m, c):
    while not m.io_read(COM1 + LSR, 1) & 0x20:
        pass
    m.io_write(COM1 + THR, 1, c)


def test_polled_console_needs_no_python(com1):
    m, uart, path = com1
    guest_init(m)
    block = uart.native_block
    passed = block.passed
    text = bytes(range(256)) * 8
    for c in text:
        putc(m, c)
    m.drain_coalesced()                         # the last THR write, buffered as KVM would
    assert block.passed == passed               # every LSR read and THR write was native
    assert block.served >= 2 * len(text)
    uart.close()
    assert path.read_bytes() == text


def test_only_file_stdio_and_null_backends_are_served_natively():
    m, uart = build("tcp=127.0.0.1:0")
    [rng] = [r for r in m.pio.ranges() if r.name == "com1"]
    assert rng.handle >= 0 and uart.native_block is None
    m.close()
    m, uart = build("null")
    [rng] = [r for r in m.pio.ranges() if r.name == "com1"]
    assert rng.handle == -1 and uart.native_block is not None
    m.close()
    m, uart = build("null,native=off")          # the Python path, one option away
    [rng] = [r for r in m.pio.ranges() if r.name == "com1"]
    assert rng.handle >= 0 and uart.native_block is None
    m.close()


def test_thre_interrupt_after_native_output(com1):
    """Output written natively, then the guest turns to interrupt-driven transmit: the THRE
    interrupt comes exactly as the datasheet says, and THR goes through Python meanwhile."""
    m, uart, path = com1
    guest_init(m)
    for c in b"polled ":
        putc(m, c)
    assert m.irq_levels.get(4, 0) == 0          # the line never moved
    m.io_write(COM1 + IER, 1, 0x02)             # ETBEI with THR empty: THRE at once
    assert m.irq_levels[4] == 1
    assert m.io_read(COM1 + IIR, 1) == 0xC2
    assert m.irq_levels[4] == 0                 # reading IIR took it
    passed = uart.native_block.passed
    m.io_write(COM1 + THR, 1, ord("i"))         # through Python: the interrupt re-arms
    assert uart.native_block.passed == passed + 1
    assert m.irq_levels[4] == 1
    assert m.io_read(COM1 + IIR, 1) == 0xC2
    m.io_write(COM1 + IER, 1, 0x00)
    passed = uart.native_block.passed
    for c in b"rq":
        putc(m, c)
    assert uart.native_block.passed == passed   # plain again: native again
    uart.close()
    assert path.read_bytes() == b"polled irq"


def test_dlab_and_loopback_take_thr_back_to_python(com1):
    m, uart, path = com1
    guest_init(m)
    m.io_write(COM1 + LCR, 1, 0x83)
    m.io_write(COM1 + THR, 1, 0x55)             # DLL, not output
    m.io_write(COM1 + LCR, 1, 0x03)
    m.io_write(COM1 + MCR, 1, 0x1B)             # loopback
    m.io_write(COM1 + THR, 1, ord("L"))
    assert m.io_read(COM1 + LSR, 1) & 0x01
    assert m.io_read(COM1 + 0, 1) == ord("L")
    m.io_write(COM1 + MCR, 1, 0x0B)
    putc(m, ord("x"))
    m.io_write(COM1 + LCR, 1, 0x83)
    assert m.io_read(COM1 + 0, 1) == 0x55
    uart.close()
    assert path.read_bytes() == b"x"


def test_received_data_shows_in_the_native_lsr(com1):
    m, uart, path = com1
    guest_init(m)
    passed = uart.native_block.passed
    assert m.io_read(COM1 + LSR, 1) == 0x60
    uart.host_input(b"k")
    assert m.io_read(COM1 + LSR, 1) == 0x61
    assert uart.native_block.passed == passed   # both LSR reads native
    assert m.io_read(COM1 + 0, 1) == ord("k")   # RBR: Python
    assert m.io_read(COM1 + LSR, 1) == 0x60


def test_a_full_ring_is_busy_then_python_empties_it_in_order(com1):
    m, uart, path = com1
    guest_init(m)
    assert uart.native_drainer.pause()
    block = uart.native_block
    try:
        data = bytes(i & 0xFF for i in range(NATIVE_RING))
        for c in data:
            m.io_write(COM1 + THR, 1, c)
        m.drain_coalesced()                         # as KVM hands them on at the next exit
        assert block.level("tx") == NATIVE_RING
        assert m.io_read(COM1 + LSR, 1) == 0x00     # THRE and TEMT clear: no room
        assert uart.read(LSR, 1) == 0x00            # Python's LSR says the same
        passed = block.passed
        m.io_write(COM1 + THR, 1, ord("!"))         # no room: Python transmits, ring first
        m.drain_coalesced()
        assert block.passed == passed + 1
        assert block.level("tx") == 0
        assert m.io_read(COM1 + LSR, 1) == 0x60
    finally:
        uart.native_drainer.resume()
    uart.close()
    assert path.read_bytes() == data + b"!"


def test_two_vcpus_writing_thr_natively_keep_each_ones_order(com1):
    m, uart, path = com1
    guest_init(m)
    n = 30000
    seqs = {tag: bytes(tag * 0x80 + i % 0x80 for i in range(n)) for tag in (0, 1)}
    batches = [m.prepare_exits([(COM1 + THR, 1, c, True) for c in seqs[tag]]) for tag in (0, 1)]
    threads = [threading.Thread(target=b.run_only) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uart.close()
    out = path.read_bytes()
    assert len(out) == 2 * n
    assert bytes(c for c in out if c < 0x80) == seqs[0]
    assert bytes(c for c in out if c >= 0x80) == seqs[1]


def test_close_hands_on_what_the_ring_holds(com1):
    m, uart, path = com1
    guest_init(m)
    assert uart.native_drainer.pause()
    for c in b"last words":
        m.io_write(COM1 + THR, 1, c)
    uart.native_drainer.resume()
    uart.close()
    assert path.read_bytes() == b"last words"
    assert not uart.native_drainer.is_alive()
    assert not uart.native_block.native("lsr")      # after close every access is Python's


def test_polled_thr_writes_wait_for_the_guests_next_access(com1):
    """The THR port is coalesced while the console is plain (Machine.coalesce_writes): a
    write reaches the ring at the guest's next access, as under KVM, where it took no exit
    of its own; output is unchanged."""
    m, uart, path = com1
    guest_init(m)
    block = uart.native_block
    served = block.served
    m.io_write(COM1 + THR, 1, ord("a"))
    assert block.served == served               # buffered: not handled yet
    assert m.io_read(COM1 + LSR, 1) & 0x20       # the poll hands it on first, then is answered
    assert block.served == served + 2
    assert block.level("tx") + len(path.read_bytes()) >= 1
    uart.close()
    assert path.read_bytes() == b"a"


def test_interrupt_driven_transmit_is_not_buffered(com1):
    """With ETBEI set a THR write must raise THRE at once: it exits and is handled then."""
    m, uart, path = com1
    guest_init(m)
    m.io_write(COM1 + IER, 1, 0x02)
    assert m.io_read(COM1 + IIR, 1) == 0xC2     # THRE for the empty THR, taken
    passed = uart.native_block.passed
    m.io_write(COM1 + THR, 1, ord("i"))
    assert uart.native_block.passed == passed + 1     # handled by Python, no access after
    assert m.irq_levels[4] == 1
    m.io_write(COM1 + IER, 1, 0x00)
    putc(m, ord("p"))                           # plain again: buffered again
    served = uart.native_block.served
    m.io_write(COM1 + THR, 1, ord("q"))
    assert uart.native_block.served == served
    uart.close()                                # hands on what is buffered
    assert path.read_bytes() == b"ipq"


class RefusingMachine(SyntheticMachine):
    """A VM whose KVM refuses to buffer the THR port (ENOSPC: its port bus is full, say)."""

    def _coalesce(self, zone, on):
        if on:
            import errno
            from hvframe.kvm import KvmError
            raise KvmError(f"KVM_(UN)REGISTER_COALESCED_MMIO: {os.strerror(errno.ENOSPC)}")
        super()._coalesce(zone, on)


def test_kvm_refusing_to_buffer_thr_writes_costs_only_exits(tmp_path, capfd):
    """A guest's LCR or IER write that makes the console plain asks KVM to buffer THR
    writes; KVM saying no must not fail that write (the guest's divisor, mode and interrupt
    enables all take) nor lose a byte: THR writes then simply exit, each handled at once."""
    from hvframe import dispatch
    failures = []
    dispatch.failure_listeners.append(lambda *a: failures.append(a))
    path = tmp_path / "com1.out"
    m = RefusingMachine()
    try:
        uart, = rig(m, f"-l com1,file={path}")
        uart.start()
        guest_init(m)
        assert m.io_read(COM1 + LCR, 1) == 0x03 and m.io_read(COM1 + MCR, 1) == 0x0B
        served = uart.native_block.served
        for c in b"ok":
            putc(m, c)
        assert uart.native_block.served == served + 4     # each THR write handled at once
        m.io_write(COM1 + IER, 1, 0x02)
        assert m.io_read(COM1 + IIR, 1) == 0xC2           # THRE, as without the refusal
        uart.close()
        assert path.read_bytes() == b"ok"
    finally:
        dispatch.failure_listeners.pop()
        m.close()
    assert failures == []
    assert capfd.readouterr().err.count("buffer") <= 1   # said once, not per register write


class CountingMachine(SyntheticMachine):
    """Counts the KVM_(UN)REGISTER_COALESCED_MMIO calls a guest's register writes cause."""

    def __init__(self):
        super().__init__()
        self.zone_ioctls = 0

    def _coalesce(self, zone, on):
        self.zone_ioctls += 1
        super()._coalesce(zone, on)


def test_a_guest_toggling_thr_interrupts_costs_no_ioctl_per_toggle(tmp_path, monkeypatch):
    """Each (un)registration of the THR zone is an ioctl KVM answers with an SRCU grace
    period (milliseconds under nested KVM, held under the UART lock on the vCPU's exit
    path). A guest flipping ETBEI on and off (Linux's 8250 around every interactive write
    burst, or a guest doing it in a loop) must not make one per flip: the zone comes back
    only once the console has stayed plain for a while (the machine's drain thread sees to
    it), and every byte still arrives in order."""
    from hvframe.machine import CoalescedWrites
    monkeypatch.setattr(CoalescedWrites, "SETTLE", 60.0)   # no token back during the loop
    path = tmp_path / "com1.out"
    m = CountingMachine()
    try:
        uart, = rig(m, f"-l com1,file={path}")
        uart.start()
        guest_init(m)
        before = m.zone_ioctls
        text = b"".join(b"line %d\n" % i for i in range(200))
        for line in text.splitlines(keepends=True):
            m.io_write(COM1 + IER, 1, 0x02)          # start_tx: THR interrupts on
            m.io_write(COM1 + IER, 1, 0x00)          # stop_tx: off again, a plain console
            for c in line:
                putc(m, c)
        assert m.zone_ioctls - before <= 2 * CoalescedWrites.BURST   # not 2 per line
        monkeypatch.setattr(CoalescedWrites, "SETTLE", 0.01)
        import time
        time.sleep(0.05)                             # plain for a while now: a token is back
        m.settle_coalesced()                         # the drain thread's periodic call
        served = uart.native_block.served
        m.io_write(COM1 + THR, 1, ord("!"))
        assert uart.native_block.served == served    # plain long enough: buffered again
        uart.close()
        assert path.read_bytes() == text + b"!"
    finally:
        m.close()
