"""Malformed rings thrown at virtio-net (hypothesis), on its transmit and receive queues. A
broken chain ends in DEVICE_NEEDS_RESET or a dropped frame with a counter; nothing but the
frames of well-formed chains reaches the far side, no exception escapes a worker, and after
a reset the device carries frames both ways again."""
import logging
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hvframe.testing.virtio import RawQueue
from hvframe.virtio.virtqueue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                      VIRTQ_DESC_F_WRITE)
from hvframe_virtio_net import layout as L
from hvframe_virtio_net.testdriver import NetDriver, StreamPair
from test_virtio_net import ALL, SLOT, Rig, frame

OUTSIDE_RAM = 0xF000_0000
TX_FAULTS = ["loop", "next_oob", "data_outside_ram", "hdr_outside_ram", "readable_after_writable",
             "indirect_in_indirect", "indirect_bad_len", "huge_len", "short", "bad_gso",
             "bad_csum_offsets", "head_oob", "avail_ahead", "good"]
RX_FAULTS = ["loop", "next_oob", "data_outside_ram", "readable_only", "tiny", "indirect_in_indirect",
             "head_oob", "avail_ahead", "good"]


@pytest.fixture(scope="module")
def rig():
    r = Rig(StreamPair(), post=0)
    yield r
    r.close()


class Builder(RawQueue):
    """Raw descriptors in the queues the test driver laid out (no driver checks)."""

    def __init__(self, rig, q):
        super().__init__(rig.m.memory, rig.nd.drv.queues[q])
        self.rig = rig
        self.scratch = rig.nd.alloc(0x100000)
        self.good = []
        self.rx_bufs = {}           # head -> (address, writable bytes)

    def area(self, size=0x2000):
        at = self.scratch
        self.scratch += size
        return at

    def tx_chain(self, fault, n):
        hdr, data = self.area(), self.area(0x10000)
        f = frame(n=n, seed=n)
        h = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)
        if fault == "bad_gso":
            h = struct.pack("<BBHHHHH", 0, L.GSO_UDP, 0, 100, 0, 0, 0)
        if fault == "bad_csum_offsets":
            h = struct.pack("<BBHHHHH", L.HDR_F_NEEDS_CSUM, 0, 0, 0, 60000, 4, 0)
        self.mem.write(hdr, h)
        self.mem.write(data, f)
        k = self.next_desc
        if fault == "loop":
            self.desc(hdr, 12, VIRTQ_DESC_F_NEXT, k + 1)
            self.desc(data, len(f), VIRTQ_DESC_F_NEXT, k)
        elif fault == "next_oob":
            self.desc(hdr, 12, VIRTQ_DESC_F_NEXT, self.q.size + 3)
        elif fault in ("data_outside_ram", "hdr_outside_ram", "huge_len"):
            self.desc(OUTSIDE_RAM if fault == "hdr_outside_ram" else hdr, 12,
                      VIRTQ_DESC_F_NEXT, k + 1)
            self.desc(OUTSIDE_RAM if fault == "data_outside_ram" else data,
                      0xFFFF_FF00 if fault == "huge_len" else len(f), 0)
        elif fault == "readable_after_writable":
            self.desc(hdr, 12, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, k + 1)
            self.desc(data, len(f), 0)
        elif fault in ("indirect_in_indirect", "indirect_bad_len"):
            table = self.area(0x1000)
            self.desc(hdr, 12, VIRTQ_DESC_F_NEXT, 1, table=table, index=0)
            if fault == "indirect_in_indirect":
                self.desc(table + 0x800, 16, VIRTQ_DESC_F_INDIRECT, table=table, index=1)
                self.desc(data, len(f), 0, table=table + 0x800, index=0)
                self.desc(table, 32, VIRTQ_DESC_F_INDIRECT)
            else:
                self.desc(data, len(f), 0, table=table, index=1)
                self.desc(table, 32 - 4, VIRTQ_DESC_F_INDIRECT)
        elif fault == "short":
            self.desc(hdr, 6, 0)
        else:       # a well-formed chain (its header may still be refused)
            self.desc(hdr, 12, VIRTQ_DESC_F_NEXT, k + 1)
            self.desc(data, len(f), 0)
            if fault == "good":
                self.good.append(f)
        return k

    def rx_chain(self, fault, size):
        buf = self.area(0x4000)
        k = self.next_desc
        self.rx_bufs[k] = (buf, 4 if fault == "tiny" else size)
        if fault == "loop":
            self.desc(buf, size, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, k)
        elif fault == "next_oob":
            self.desc(buf, size, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0xFFFF)
        elif fault == "data_outside_ram":
            self.desc(OUTSIDE_RAM, size, VIRTQ_DESC_F_WRITE)
        elif fault == "readable_only":
            self.desc(buf, size, 0)
        elif fault == "tiny":
            self.desc(buf, 4, VIRTQ_DESC_F_WRITE)
        elif fault == "indirect_in_indirect":
            table = self.area(0x1000)
            self.desc(table + 0x800, 16, VIRTQ_DESC_F_INDIRECT, table=table, index=0)
            self.desc(buf, size, VIRTQ_DESC_F_WRITE, table=table + 0x800, index=0)
            self.desc(table, 16, VIRTQ_DESC_F_INDIRECT)
        else:
            self.desc(buf, size, VIRTQ_DESC_F_WRITE)
        return k


def fresh(rig):
    rig.nd = NetDriver(rig.m, SLOT, ALL)          # a reset and a bring-up
    return rig.nd


def works_again(rig):
    be = rig.backend
    be.peer.setblocking(True)
    be.peer.settimeout(0.2)
    try:                                            # what earlier examples left behind
        while be.peer.recv(1 << 20):
            pass
    except (BlockingIOError, TimeoutError, OSError):
        pass
    be._buf = b""
    nd = fresh(rig)
    nd.post_rx(0, 8)
    f = frame(seed=77)
    nd.send(0, f)
    assert be.recv_frame() == f
    be.send_frame(f)
    # Frames the peer sent before the reset that were still in the stream come first.
    for _ in range(8):
        if nd.recv(0)[1] == f:
            return
    raise AssertionError("the frame sent after the reset did not arrive")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(chains=st.lists(st.tuples(st.sampled_from(TX_FAULTS), st.integers(46, 3000)),
                       min_size=1, max_size=5))
def test_malformed_tx_chains(rig, chains, caplog):
    caplog.set_level(logging.ERROR)
    fresh(rig)
    b = Builder(rig, 1)
    expect = b.post(chains, b.tx_chain)
    rig.nd.drv.kick(1)
    rig.nd.drv.wait_answered(1, expect, grace=0.02)
    # Only well-formed frames went out, whole and in order (those before a fatal fault).
    got = []
    rig.backend.peer.setblocking(False)
    try:
        while True:
            got.append(rig.backend.recv_frame(timeout=0.05))
    except TimeoutError:
        pass
    assert got == b.good[:len(got)]
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    works_again(rig)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(chains=st.lists(st.tuples(st.sampled_from(RX_FAULTS), st.sampled_from([64, 1600, 4096])),
                       min_size=1, max_size=5),
       frames=st.lists(st.integers(46, 3000), min_size=1, max_size=4))
def test_malformed_rx_chains(rig, chains, frames, caplog):
    caplog.set_level(logging.ERROR)
    fresh(rig)
    b = Builder(rig, 0)
    b.post(chains, b.rx_chain)
    rig.nd.drv.kick(0)
    for n in frames:
        rig.backend.send_frame(frame(n=n))
    time.sleep(0.05)
    deadline = time.monotonic() + 5
    while rig.fn.queues[0].lock.locked() and time.monotonic() < deadline:
        time.sleep(0.005)
    # What came back is whole frames (each after a header saying over how many buffers it
    # is merged), byte for byte what the peer sent, or empty buffers; nothing overflowed.
    q = rig.nd.drv.queues[0]
    sent = {len(frame(n=n)): frame(n=n) for n in frames}
    used = q.reap()
    i = 0
    while i < len(used):
        head, written = used[i]
        addr, size = b.rx_bufs[head]
        assert written <= size
        i += 1
        if written == 0:
            continue
        data = rig.m.memory.read(addr, written)
        nbuf = struct.unpack_from("<H", data, 10)[0]
        body = data[L.HDR_SIZE:]
        for head, written in used[i:i + nbuf - 1]:
            addr, size = b.rx_bufs[head]
            assert written <= size
            body += rig.m.memory.read(addr, written)
        i += nbuf - 1
        assert body == sent.get(len(body)), (len(body), nbuf)
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    works_again(rig)
