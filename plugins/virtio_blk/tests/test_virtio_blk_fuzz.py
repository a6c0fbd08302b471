"""Malformed virtqueues thrown at virtio-blk (hypothesis). Every chain built here is broken in
at least one way and asks to write 0xAB over the disk; the device must answer each with an
error status, drop it, or set DEVICE_NEEDS_RESET, never write the image, never let an
exception escape a worker, and keep working after the driver resets it."""
import logging
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hvframe.testing.virtio import RawQueue
from hvframe.virtio.virtqueue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                      VIRTQ_DESC_F_WRITE)
from hvframe_virtio_blk.virtio_blk import S_OK, T_IN, T_OUT
from test_virtio_blk import ALL, DISK_SECTORS, Rig

OUTSIDE_RAM = 0xF000_0000
FAULTS = ["loop", "next_oob", "data_outside_ram", "header_outside_ram",
          "readable_after_writable", "indirect_in_indirect", "indirect_bad_len",
          "no_status", "short_header", "sector_oob", "misaligned_len", "head_oob",
          "avail_ahead", "huge_len"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("fuzz"))
    yield r
    r.close()


class Builder(RawQueue):
    """Writes raw descriptors into the queue the harness laid out (no harness checks)."""

    def __init__(self, rig):
        super().__init__(rig.mem, rig.drv.queues[0])
        self.rig = rig
        self.scratch = rig.buf + 0x40000

    def header(self, sector, rtype=T_OUT):
        at = self.scratch
        self.scratch += 0x2000
        self.mem.write(at, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write(at + 0x100, b"\xab" * 0x1000)
        self.mem.write(at + 0x1800, b"\xee")
        return at, at + 0x100, at + 0x1800

    def chain(self, fault, sector, length):
        """One broken chain; returns its head."""
        hdr, data, status = self.header(sector)
        n = self.next_desc
        if fault == "loop":
            self.desc(hdr, 16, VIRTQ_DESC_F_NEXT, n + 1)
            self.desc(data, length, VIRTQ_DESC_F_NEXT, n)            # back to the header
        elif fault == "next_oob":
            self.desc(hdr, 16, VIRTQ_DESC_F_NEXT, self.q.size + 5)
        elif fault in ("data_outside_ram", "header_outside_ram", "huge_len"):
            self.desc(OUTSIDE_RAM if fault == "header_outside_ram" else hdr, 16,
                      VIRTQ_DESC_F_NEXT, n + 1)
            addr, ln = data, length
            if fault == "data_outside_ram":
                addr = OUTSIDE_RAM
            if fault == "huge_len":
                ln = 0xFFFF_FE00
            self.desc(addr, ln, VIRTQ_DESC_F_NEXT, n + 2)
            self.desc(status, 1, VIRTQ_DESC_F_WRITE)
        elif fault == "readable_after_writable":
            self.desc(hdr, 16, VIRTQ_DESC_F_NEXT, n + 1)
            self.desc(status, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, n + 2)
            self.desc(data, length, 0)
        elif fault in ("indirect_in_indirect", "indirect_bad_len"):
            table = self.scratch
            self.scratch += 0x1000
            self.desc(hdr, 16, VIRTQ_DESC_F_NEXT, 1, table=table, index=0)
            if fault == "indirect_in_indirect":
                self.desc(table + 0x800, 32, VIRTQ_DESC_F_INDIRECT, table=table, index=1)
                self.desc(data, length, 0, table=table + 0x800, index=0)
                self.desc(status, 1, VIRTQ_DESC_F_WRITE, table=table + 0x800, index=1)
                self.desc(table, 32, VIRTQ_DESC_F_INDIRECT)
            else:
                self.desc(data, length, VIRTQ_DESC_F_NEXT, 2, table=table, index=1)
                self.desc(status, 1, VIRTQ_DESC_F_WRITE, table=table, index=2)
                self.desc(table, 3 * 16 - 4, VIRTQ_DESC_F_INDIRECT)
        elif fault == "no_status":
            self.desc(hdr, 16, VIRTQ_DESC_F_NEXT, n + 1)
            self.desc(data, length, 0)
        elif fault == "short_header":
            self.mem.write(hdr, struct.pack("<II", T_OUT, 0))
            self.desc(hdr, 8, VIRTQ_DESC_F_NEXT, n + 1)
            self.desc(status, 1, VIRTQ_DESC_F_WRITE)
        else:   # well-formed chains whose request is bad
            if fault == "sector_oob":
                self.mem.write(hdr, struct.pack("<IIQ", T_OUT, 0, DISK_SECTORS + sector))
            if fault == "misaligned_len":
                length = length - 1 if length > 1 else 3
            self.desc(hdr, 16, VIRTQ_DESC_F_NEXT, n + 1)
            self.desc(data, length, VIRTQ_DESC_F_NEXT, n + 2)
            self.desc(status, 1, VIRTQ_DESC_F_WRITE)
        return n


fault_chains = st.lists(st.tuples(st.sampled_from(FAULTS), st.integers(0, DISK_SECTORS - 8),
                                  st.sampled_from([512, 1024, 4096])), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(chains=fault_chains)
def test_malformed_chains_never_write_the_image(rig, chains, caplog):
    caplog.set_level(logging.ERROR)
    rig.drv.initialize(ALL)                     # reset: a fresh device for every example
    before = rig.image()
    b = Builder(rig)
    expect = b.post(chains, b.chain)
    rig.drv.kick(0)
    rig.drv.wait_answered(0, expect, grace=0.01)
    assert rig.image() == before
    # Every answered chain that has a status byte says it failed.
    q = rig.drv.queues[0]
    for head, written in q.reap():
        assert written <= 1
    assert not [r for r in caplog.records if "request failed" in r.getMessage()]
    # The device still works after a reset.
    rig.drv.initialize(ALL)
    assert rig.request(T_IN, 0, read_len=512) == (S_OK, 513)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(table=st.binary(min_size=16 * 8, max_size=16 * 8), ring=st.binary(min_size=20, max_size=20))
def test_random_rings_do_not_hurt_the_vmm(rig, table, ring, caplog):
    """Arbitrary bytes as descriptor table and available ring: whatever the device makes of
    them, no exception escapes, and a reset brings it back."""
    caplog.set_level(logging.ERROR)
    rig.drv.initialize(ALL)
    q = rig.drv.queues[0]
    rig.mem.write(q.desc, table)
    rig.mem.write(q.avail, ring)
    rig.drv.kick(0)
    time.sleep(0.02)
    d = rig.drv
    deadline = time.monotonic() + 5
    while rig.fn.queues[0].lock.locked() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not [r for r in caplog.records if "request failed" in r.getMessage()]
    d.initialize(ALL)
    assert rig.request(T_IN, 1, read_len=512) == (S_OK, 513)
