"""The core's drain of the VM's ring of buffered writes (hv_coalesced_drain), driven with a
ring KVM would fill, here a memfd laid out as KVM lays out its coalesced-MMIO page: entries
reach their handlers in order, and no drainer returns while a write it could not yet see
handled is still on its way to the handler (what a vCPU's next exit, Machine.pause() and
close() rely on)."""
import mmap
import os
import struct
import threading

from hvframe.core_native import ffi, lib
from hvframe.synthetic import SyntheticMachine

PAGE = mmap.PAGESIZE
RING_PAGE = 2            # KVM_COALESCED_MMIO_PAGE_OFFSET on x86 (page 1 is the PIO page)
ENTRY = struct.Struct("<QII8s")     # phys_addr, len, pio, data


class Ring:
    """A coalesced ring page as KVM writes it (entry first, then `last`)."""

    def __init__(self, machine):
        self.fd = os.memfd_create("coalesced-ring")
        os.ftruncate(self.fd, PAGE * (RING_PAGE + 1))
        self.page = mmap.mmap(self.fd, PAGE, offset=PAGE * RING_PAGE)
        self.c = lib.hv_coalesced_new(self.fd, machine.pio.c_bus, machine.mmio.c_bus)
        assert self.c != ffi.NULL
        self.max = (PAGE - 8) // ENTRY.size

    def push(self, port: int, value: int) -> None:
        first, last = struct.unpack_from("<II", self.page, 0)
        assert (last + 1) % self.max != first, "ring full"
        ENTRY.pack_into(self.page, 8 + last * ENTRY.size, port, 1, 1, bytes([value]) + bytes(7))
        struct.pack_into("<I", self.page, 4, (last + 1) % self.max)

    def close(self):
        lib.hv_coalesced_free(self.c)
        self.page.close()
        os.close(self.fd)


class SlowPort:
    """A port whose first write blocks until released (a Python handler waiting for the GIL
    or a device lock while a drainer hands it a buffered write)."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.log = []

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        if not self.log:
            self.entered.set()
            self.release.wait(10)
        self.log.append(value)


def test_entries_reach_the_bus_in_order_across_the_wrap():
    m = SyntheticMachine()
    port = SlowPort()
    port.release.set()
    m.pio.register(0x3F8, 1, port)
    ring = Ring(m)
    try:
        sent = []
        for round_ in range(3):            # more than the ring holds in all: it wraps
            for i in range(ring.max - 1):
                v = (round_ * 7 + i) & 0xFF
                ring.push(0x3F8, v)
                sent.append(v)
            assert lib.hv_coalesced_drain(ring.c) == ring.max - 1
        assert port.log == sent
    finally:
        ring.close()
        m.close()


def test_a_second_drainer_waits_for_a_write_the_first_is_still_handing_on():
    """vCPU A (or the drain thread) has taken the last buffered THR write and is handing it
    to the UART; vCPU B exits meanwhile (a Python-handled LCR write that turns DLAB on, say).
    B's drain must not find the ring empty and go on before that write is handled, or the
    write lands after B's access (as a divisor latch write, not a byte) or after the
    snapshot pause() took."""
    m = SyntheticMachine()
    port = SlowPort()
    m.pio.register(0x3F8, 1, port)
    ring = Ring(m)
    try:
        ring.push(0x3F8, ord("a"))
        a = threading.Thread(target=lib.hv_coalesced_drain, args=(ring.c,))
        a.start()
        assert port.entered.wait(10)
        seen = []
        b = threading.Thread(target=lambda: seen.append((lib.hv_coalesced_drain(ring.c),
                                                         list(port.log))))
        b.start()
        b.join(0.3)
        port.release.set()
        a.join(10)
        b.join(10)
        assert seen == [(0, [ord("a")])]     # B returned only once A's write was handled
    finally:
        port.release.set()
        ring.close()
        m.close()


def test_the_synthetic_machine_holds_back_only_what_kvms_ring_holds():
    """A guest writing a coalesced port with no other exit: the synthetic backend buffers as
    many writes as KVM's one-page ring holds (169) and no more; the next write exits, after
    the buffered ones, as KVM hands it to user space when the ring is full."""
    m = SyntheticMachine()
    port = SlowPort()
    port.release.set()
    m.pio.register(0x3F8, 1, port)
    m.coalesce_writes("pio", 0x3F8, 1).enable(True)
    try:
        held = (PAGE - 8) // ENTRY.size - 1
        for i in range(held):
            m.io_write(0x3F8, 1, i & 0xFF)
        assert port.log == []
        m.io_write(0x3F8, 1, 0xAA)
        assert port.log == [i & 0xFF for i in range(held)] + [0xAA]
    finally:
        m.close()
