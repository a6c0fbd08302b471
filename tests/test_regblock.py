"""Declared register blocks (hvframe.regblock, core_native/regblock.c), driven through the
dispatch core with synthetic exits as a vCPU's would be."""
import sys
import threading
import time

import pytest
from construct import Int8ul, Int16ul, Int32ul, Padding, Struct

from hvframe.core_native import lib
from hvframe.regblock import Fifo, FifoDrainer, Full, Kind, Reg, RegisterBlock
from hvframe.synthetic import SyntheticMachine

BASE = 0x500
LAYOUT = Struct(
    "data" / Int8ul,        # 0: FIFO data port
    "ctrl" / Int8ul,        # 1: STORAGE, low nibble writable
    "status" / Int16ul,     # 2: PY_VALUE with FIFO bits
    "irq" / Int32ul,        # 4: W1C
    "ident" / Int32ul,      # 8: READ_ONLY
    "cmd" / Int8ul,         # 12: PYTHON
    "wide" / Int16ul,       # 13: FIFO of 16-bit entries
    Padding(1),             # 15: undeclared
)
OFF = {"data": 0, "ctrl": 1, "status": 2, "irq": 4, "ident": 8, "cmd": 12, "wide": 13}
ROOM, EMPTY = 0x0020, 0x0040


class Device:
    """The Python side: records what reaches it."""

    def __init__(self):
        self.calls = []

    def read(self, offset, size):
        self.calls.append(("r", offset, size))
        return 0xA5

    def write(self, offset, size, value):
        self.calls.append(("w", offset, size, value))


def declare(dev, *, data_fifo=Fifo(4), wide_fifo=Fifo(8, Full.DROP)):
    return RegisterBlock(LAYOUT, {
        "data": Reg(Kind.FIFO, fifo="out"),
        "ctrl": Reg(Kind.STORAGE, reset=0x30, write_mask=0x0F),
        "status": Reg(Kind.PY_VALUE, reset=0x0100, fifo="out", room_bits=ROOM, empty_bits=EMPTY),
        "irq": Reg(Kind.W1C, reset=0xFFFF0000, write_mask=0xFFFF0000),
        "ident": Reg(Kind.READ_ONLY, reset=0x12345678),
        "cmd": Reg(Kind.PYTHON),
        "wide": Reg(Kind.FIFO, fifo="words"),
    }, dev, fifos={"out": data_fifo, "words": wide_fifo}, name="testdev")


@pytest.fixture
def rig():
    m = SyntheticMachine()
    dev = Device()
    block = declare(dev)
    block.map(m.pio, BASE)
    yield m, dev, block
    m.close()


def r(m, name, size=None):
    return m.io_read(BASE + OFF[name], size or LAYOUT_SIZES[name])


def w(m, name, value, size=None):
    m.io_write(BASE + OFF[name], size or LAYOUT_SIZES[name], value)


LAYOUT_SIZES = {"data": 1, "ctrl": 1, "status": 2, "irq": 4, "ident": 4, "cmd": 1, "wide": 2}


# ---- each kind -----------------------------------------------------------------------------

def test_storage_keeps_the_writable_bits(rig):
    m, dev, block = rig
    assert r(m, "ctrl") == 0x30
    w(m, "ctrl", 0xFF)
    assert r(m, "ctrl") == 0x3F
    w(m, "ctrl", 0x05)
    assert r(m, "ctrl") == 0x35
    assert block.read("ctrl") == 0x35
    assert dev.calls == []


def test_read_only_ignores_writes(rig):
    m, dev, block = rig
    w(m, "ident", 0)
    assert r(m, "ident") == 0x12345678
    assert dev.calls == []


def test_write_one_to_clear(rig):
    m, dev, block = rig
    w(m, "irq", 0x00050000)
    assert r(m, "irq") == 0xFFFA0000
    w(m, "irq", 0x0000FFFF)                 # bits outside write_mask: not cleared
    assert r(m, "irq") == 0xFFFA0000
    block.update("irq", set=0x00010000)     # the device raises a cause
    assert r(m, "irq") == 0xFFFB0000
    assert dev.calls == []


def test_python_keeps_a_read_value_and_gets_its_writes(rig):
    m, dev, block = rig
    assert r(m, "status") & 0xFF00 == 0x0100
    block.store("status", 0x0200)
    assert r(m, "status") & 0xFF00 == 0x0200
    block.update("status", clear=0x0200, set=0x0400)
    assert r(m, "status") & 0xFF00 == 0x0400
    assert dev.calls == []
    w(m, "status", 0x1234)
    assert dev.calls == [("w", 2, 2, 0x1234)]


def test_fifo_data_port_and_the_bits_that_follow_it(rig):
    m, dev, block = rig
    assert r(m, "status") & (ROOM | EMPTY) == ROOM | EMPTY
    w(m, "data", ord("a"))
    assert r(m, "status") & (ROOM | EMPTY) == ROOM          # not empty, room left
    for c in b"bcd":
        w(m, "data", c)
    assert r(m, "status") & (ROOM | EMPTY) == 0             # full
    assert block.level("out") == 4
    assert block.take("out", 2) == b"ab"
    assert r(m, "status") & (ROOM | EMPTY) == ROOM
    assert block.take("out") == b"cd"
    assert block.counts("out") == (4, 4, 0)
    assert dev.calls == []
    assert r(m, "data") == 0xA5                             # the data port's read: Python
    assert dev.calls == [("r", 0, 1)]


def test_wide_fifo_entries_wrap_around_the_ring(rig):
    m, dev, block = rig
    for round_ in range(3):                                 # 3 x 6 entries through 8 slots
        values = [round_ * 100 + i for i in range(6)]
        for v in values:
            w(m, "wide", 0xAB00 + v)
        got = block.take("words")
        assert [int.from_bytes(got[i:i + 2], "little") for i in range(0, len(got), 2)] == \
            [0xAB00 + v for v in values]


def test_python_kind_undeclared_offsets_and_other_sizes_reach_the_handler(rig):
    m, dev, block = rig
    w(m, "cmd", 7)
    assert r(m, "cmd") == 0xA5
    assert m.io_read(BASE + 15, 1) == 0xA5                  # padding: nobody declared it
    assert m.io_read(BASE + 3, 1) == 0xA5                   # inside status, not its start
    assert m.io_read(BASE + OFF["ident"], 2) == 0xA5        # half of a 32-bit register
    m.io_write(BASE + OFF["ctrl"], 2, 0xFFFF)               # a wider write: Python decides
    assert r(m, "ctrl") == 0x30
    assert dev.calls == [("w", 12, 1, 7), ("r", 12, 1), ("r", 15, 1), ("r", 3, 1),
                         ("r", 8, 2), ("w", 1, 2, 0xFFFF)]
    assert block.passed == 6


def test_registers_switched_to_python_and_back(rig):
    m, dev, block = rig
    block.set_native(["ctrl", "data"], False)
    assert not block.native("ctrl") and block.native("status")
    w(m, "ctrl", 0x0F)
    w(m, "data", 0x41)
    assert r(m, "ctrl") == 0xA5
    assert dev.calls == [("w", 1, 1, 0x0F), ("w", 0, 1, 0x41), ("r", 1, 1)]
    assert block.level("out") == 0
    block.set_native(["ctrl", "data"], True)
    assert r(m, "ctrl") == 0x30                             # the Python-side write left it
    w(m, "data", 0x42)
    assert block.take("out") == b"B"


def test_a_register_declared_off_starts_with_python():
    m = SyntheticMachine()
    dev = Device()
    block = RegisterBlock(LAYOUT, {"ctrl": Reg(Kind.STORAGE, native=False)}, dev, name="x")
    block.map(m.pio, BASE)
    assert m.io_read(BASE + 1, 1) == 0xA5
    block.set_native(["ctrl"], True)
    assert m.io_read(BASE + 1, 1) == 0
    m.close()


def test_unregistered_block_gives_its_handler_back(rig):
    m, dev, block = rig
    [rng] = [x for x in m.pio.ranges() if x.name == "testdev"]
    assert rng.handler is dev and rng.fallback.handle >= 0
    m.pio.unregister(BASE)
    assert rng.fallback.handle == -1                        # out of the handler table
    assert m.io_read(BASE, 1) == 0xFF                       # nothing there any more


# ---- full FIFOs ----------------------------------------------------------------------------

def test_full_fifo_passes_the_write_to_python(rig):
    m, dev, block = rig
    for c in b"abcd":
        w(m, "data", c)
    w(m, "data", ord("e"))
    assert dev.calls == [("w", 0, 1, ord("e"))]
    assert block.counts("out") == (4, 0, 0)
    assert block.take("out") == b"abcd"


def test_full_fifo_with_drop_policy_counts_and_never_calls_python(rig):
    m, dev, block = rig
    for v in range(20):
        w(m, "wide", v)
    assert block.counts("words") == (8, 0, 12)
    assert dev.calls == []
    got = block.take("words")
    assert [int.from_bytes(got[i:i + 2], "little") for i in range(0, 16, 2)] == list(range(8))


# ---- declarations a device gets wrong ------------------------------------------------------

@pytest.mark.parametrize("regs, fifos, match", [
    ({"nosuch": Reg(Kind.STORAGE)}, {}, "not a field"),
    ({"ctrl": Reg(Kind.STORAGE, reset=0x100)}, {}, "does not fit"),
    ({"ctrl": Reg(Kind.STORAGE, fifo="out")}, {}, "no FIFO"),
    ({"data": Reg(Kind.FIFO, fifo="out")}, {"out": Fifo(3)}, "power of two"),
    ({"data": Reg(Kind.FIFO)}, {}, "cannot declare"),
    ({"ctrl": Reg(Kind.STORAGE, room_bits=1)}, {}, "cannot declare"),
    ({"ctrl": Reg(Kind.STORAGE)}, {"out": Fifo(4)}, "no FIFO register"),
    ({"data": Reg(Kind.FIFO, fifo="out"), "ctrl": Reg(Kind.FIFO, fifo="out")},
     {"out": Fifo(4)}, "fed by two"),
])
def test_bad_declarations_are_refused(regs, fifos, match):
    with pytest.raises(ValueError, match=match):
        RegisterBlock(LAYOUT, regs, Device(), fifos=fifos, name="bad")


def test_declared_layout_matches_the_c_engine_limits():
    assert LAYOUT.sizeof() == 16
    with pytest.raises(ValueError, match="too large"):
        RegisterBlock(Struct(Padding(lib.HV_REGBLOCK_MAX_LEN + 1)), {}, Device(), name="big")


# ---- concurrency ---------------------------------------------------------------------------

def test_two_vcpus_push_at_once_and_a_consumer_drains_in_order():
    """Two threads feed one 32-bit data port through the native path while a FifoDrainer
    empties it: nothing lost or duplicated, each thread's entries in its own order, and
    with a small ring the excess is counted as dropped, never blocking anyone."""
    layout = Struct("port" / Int32ul)
    m = SyntheticMachine()
    dev = Device()
    block = RegisterBlock(layout, {"port": Reg(Kind.FIFO, fifo="q")}, dev,
                          fifos={"q": Fifo(64, Full.DROP)}, name="q")
    block.map(m.pio, BASE)
    got = []
    drainer = FifoDrainer(block, "q", lambda: got.append(block.take("q")), name="q-drain",
                          linger=0).start()
    n = 20000
    batches = [m.prepare_exits([(BASE, 4, (tag << 24) | i, True) for i in range(n)])
               for tag in (1, 2)]
    threads = [threading.Thread(target=b.run_only) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drainer.stop()
    got.append(block.take("q"))
    data = b"".join(got)
    entries = [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]
    pushed, taken, dropped = block.counts("q")
    assert pushed + dropped == 2 * n
    assert taken == pushed == len(entries)
    for tag in (1, 2):
        mine = [e & 0xFFFFFF for e in entries if e >> 24 == tag]
        assert mine == sorted(set(mine))                    # in order, no duplicates
    assert dev.calls == []
    m.close()


def test_reads_never_see_a_value_half_updated():
    """A vCPU thread reads a 32-bit value the device flips between two patterns."""
    layout = Struct("v" / Int32ul)
    m = SyntheticMachine()
    block = RegisterBlock(layout, {"v": Reg(Kind.PY_VALUE, reset=0)}, Device(), name="v")
    block.map(m.pio, BASE)
    batch = m.prepare_exits([(BASE, 4, 0, False)] * 20000)
    results = []
    t = threading.Thread(target=lambda: results.append(batch.run()))
    t.start()
    while t.is_alive():
        block.store("v", 0xFFFFFFFF)
        block.store("v", 0x00000000)
    t.join()
    assert set(results[0]) <= {0, 0xFFFFFFFF}
    m.close()


def test_native_accesses_take_no_gil():
    """Native accesses go on while this thread holds the GIL and never lets it go: the
    count of served accesses (read without releasing the GIL) reaches the batch's size."""
    layout = Struct("v" / Int32ul)
    m = SyntheticMachine()
    block = RegisterBlock(layout, {"v": Reg(Kind.READ_ONLY, reset=7)}, Device(), name="v")
    block.map(m.pio, BASE)
    n = 200000
    batch = m.prepare_exits([(BASE, 4, 0, False)] * n)
    c = block._c            # the struct's counter: reading it releases no GIL
    old = sys.getswitchinterval()
    t = threading.Thread(target=batch.run_only)
    try:
        t.start()
        while c.served == 0:
            time.sleep(0.0001)
        sys.setswitchinterval(100.0)    # no forced hand-over: the GIL stays here
        deadline = time.monotonic() + 10
        while c.served < n and time.monotonic() < deadline:
            pass
        served = c.served
    finally:
        sys.setswitchinterval(old)
    t.join()
    assert served == n
    assert block.passed == 0
    m.close()


def test_a_consumer_waits_and_is_woken_by_a_push_and_by_a_kick(rig):
    m, dev, block = rig
    assert block.wait("out", 0.01) == 0                     # timeout, nothing there
    woke = []
    t = threading.Thread(target=lambda: woke.append(block.wait("out", 5)))
    t.start()
    time.sleep(0.05)
    w(m, "data", 1)
    t.join(5)
    assert woke == [1]
    block.take("out")
    t = threading.Thread(target=lambda: woke.append(block.wait("out", 5)))
    t.start()
    time.sleep(0.05)
    block.kick("out")
    t.join(5)
    assert woke == [1, 0]



def eventfds():
    import os
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "eventfd" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:         # the fd listdir itself used
            pass
    return n


def test_close_gives_back_the_eventfds_and_accesses_still_work(rig):
    m, dev, block = rig
    before = eventfds()
    block.close()
    block.close()
    assert eventfds() == before - 2                         # one per FIFO
    w(m, "data", 1)                                         # a push signals nobody, safely
    block.kick("out")
    assert block.take("out") == b"\x01"
    with pytest.raises(OSError):
        block.wait("out", 0)                                # nobody could wake it any more
