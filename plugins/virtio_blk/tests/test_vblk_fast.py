"""virtio-blk's native READ/WRITE path (vblk_serve_chain in the plugin's vblk.c, served by the
core's virtqueue loop in hvframe/core_native/vq.c).

Every scenario runs three times from the same guest memory and image: through the
transport's service loop with the native cycle, once with the batch server (aio=io_uring:
hv_vq_cycle_batch over vblk_serve_batch, runs of READs in one io_uring submission) and once
with the chain server (aio=threads: hv_vq_cycle over vblk_serve_chain), and with serve_cycle
disabled (the Python path alone).
The runs must leave identical guest RAM (data, status bytes, used ring), identical images
and the same queue state and NEEDS_RESET outcome; the native path must actually have served
the IN/OUT chains it can, and never a chain the VirtQueue rejects.
"""
import errno
import logging
import os
import struct
import tempfile
import time

import pytest
from hvframe.testing.helpers import assert_c_struct_matches
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hvframe.block.backend import IOV_MAX, BlockBackend
from hvframe.core_native import api as lib, api_ffi as ffi
from hvframe.errors import ConfigError
from hvframe.memory import FOUR_GIB, GuestMemory
from hvframe.virtio import native
from hvframe.virtio import virtqueue as vq
from hvframe.virtio.native import queue_state
from hvframe.testing.virtio import BareTransport
from hvframe.virtio.pci import QueueState
from hvframe.virtio.virtqueue import VirtQueue
from hvframe_virtio_blk import virtio_blk as vb
from hvframe_virtio_blk._native import ffi as vblk_ffi, lib as vblk_lib

NEXT, WRITE, INDIRECT = vq.VIRTQ_DESC_F_NEXT, vq.VIRTQ_DESC_F_WRITE, vq.VIRTQ_DESC_F_INDIRECT
IN, OUT, FLUSH, GET_ID = vb.T_IN, vb.T_OUT, vb.T_FLUSH, vb.T_GET_ID

LOW = 4 << 20                      # RAM: [0, 4 MiB) and [4 GiB, 4 GiB + 4 MiB)
MEM = 8 << 20
HIGH = FOUR_GIB
DESC, AVAIL, USED = 0x1000, 0x3000, 0x4000
TABLES = 0x8000                    # indirect tables
HDRS = 0x10000                     # request headers, 16 bytes each
STATUS = 0x18000                   # status bytes
DATA = 0x20000                     # data buffers
DISK_SECTORS = 256


def image_bytes(sectors=DISK_SECTORS):
    return bytes((i * 7 + i // 512) & 0xFF for i in range(sectors * 512))


# -- layouts ------------------------------------------------------------------------------------

def test_c_layouts_match_construct_declarations():
    assert_c_struct_matches("struct hv_vring_desc", vq.VirtqDesc)
    assert_c_struct_matches("struct hv_vring_used_elem", vq.VirtqUsedElem)
    assert_c_struct_matches("struct vblk_req_hdr", vb.VirtioBlkReqHeader, vblk_ffi)
    assert lib.HV_VRING_AVAIL_IDX_OFF == vq.AVAIL_IDX_OFF
    assert lib.HV_VRING_AVAIL_RING_OFF == vq.AVAIL_RING_OFF
    assert lib.HV_VRING_AVAIL_ELEM_SIZE == vq.AVAIL_ELEM_SIZE
    assert lib.HV_VRING_USED_IDX_OFF == vq.USED_IDX_OFF
    assert lib.HV_VRING_USED_RING_OFF == vq.USED_RING_OFF
    assert lib.HV_VRING_EVENT_SIZE == vq.EVENT_SIZE
    assert lib.HV_VRING_FLAGS_OFF == vq.AVAIL_FLAGS_OFF == vq.USED_FLAGS_OFF
    assert lib.HV_VRING_AVAIL_F_NO_INTERRUPT == vq.VRING_AVAIL_F_NO_INTERRUPT
    assert lib.HV_VRING_USED_F_NO_NOTIFY == vq.VRING_USED_F_NO_NOTIFY
    assert lib.HV_VRING_MAX_SIZE == vq.MAX_QUEUE_SIZE
    assert (lib.HV_VRING_DESC_F_NEXT, lib.HV_VRING_DESC_F_WRITE, lib.HV_VRING_DESC_F_INDIRECT) \
        == (NEXT, WRITE, INDIRECT)
    assert (vblk_lib.VBLK_T_IN, vblk_lib.VBLK_T_OUT) == (vb.T_IN, vb.T_OUT)
    assert (vblk_lib.VBLK_S_OK, vblk_lib.VBLK_S_IOERR) == (vb.S_OK, vb.S_IOERR)
    assert vblk_lib.VBLK_SECTOR == vb.SECTOR
    assert lib.HV_CHAIN_MAX_SEGS == IOV_MAX
    # the used ring's event field sits where VirtQueue puts it
    q = VirtQueue(GuestMemory(1 << 20), 8, DESC, AVAIL, USED, event_idx=True)
    assert q._avail_event_off == lib.HV_VRING_USED_RING_OFF + 8 * ffi.sizeof(
        "struct hv_vring_used_elem")


# -- the rig ------------------------------------------------------------------------------------

class Guest:
    """Guest RAM with a split queue; descriptors are written raw (malformed ones too)."""

    def __init__(self, size=64, *, event_idx=False, indirect=True, max_chain=None, start=0):
        self.mem = GuestMemory(MEM, lowmem_limit=LOW)
        self.size = size
        self.event_idx = event_idx
        self.start = start
        self.queue_kw = dict(event_idx=event_idx, indirect=indirect, max_chain=max_chain,
                             last_avail_idx=start, used_idx=start)
        self.avail_idx = start
        self.set_avail_idx(start)
        self.mem.write(USED + vq.USED_IDX_OFF, struct.pack("<H", start))
        self.next_desc = 0

    def desc(self, i, addr, length, flags=0, nxt=0, table=DESC):
        self.mem.write(table + 16 * i, vq.VirtqDesc.build(
            dict(addr=addr, len=length, flags=flags, next=nxt)))

    def publish(self, head):
        self.mem.write(AVAIL + vq.AVAIL_RING_OFF + 2 * (self.avail_idx % self.size),
                       struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx):
        self.mem.write(AVAIL + vq.AVAIL_IDX_OFF, struct.pack("<H", idx & 0xFFFF))

    def chain(self, bufs, *, indirect_at=None, publish=True):
        """bufs: (addr, len, writable); consecutive descriptors. Returns the head."""
        if indirect_at is not None:
            for i, (a, n, w) in enumerate(bufs):
                last = i + 1 == len(bufs)
                self.desc(i, a, n, (WRITE if w else 0) | (0 if last else NEXT),
                          0 if last else i + 1, table=indirect_at)
            bufs = [(indirect_at, 16 * len(bufs), None)]
        head = self.next_desc
        for i, (a, n, w) in enumerate(bufs):
            d = head + i
            last = i + 1 == len(bufs)
            flags = INDIRECT if w is None else (WRITE if w else 0)
            self.desc(d % self.size, a, n, flags | (0 if last else NEXT),
                      0 if last else (d + 1) % self.size)
        self.next_desc = (head + len(bufs)) % self.size
        if publish:
            self.publish(head)
        return head

    def request(self, slot, rtype, sector, data=None, read_len=0, *, split=1, indirect=False,
                hdr_split=False, data_addr=None):
        """A well-formed request in slot `slot` (header, data, status)."""
        hdr = HDRS + 16 * slot
        self.mem.write(hdr, vb.VirtioBlkReqHeader.build(dict(type=rtype, reserved=0,
                                                             sector=sector)))
        bufs = [(hdr, 8, False), (hdr + 8, 8, False)] if hdr_split else [(hdr, 16, False)]
        base = DATA + 0x10000 * slot if data_addr is None else data_addr
        n = len(data) if data is not None else read_len
        if data is not None:
            self.mem.write(base, data)
        if n:
            step = -(-n // split)
            for off in range(0, n, step):
                bufs.append((base + off, min(step, n - off), data is None))
        bufs.append((STATUS + slot, 1, True))
        return self.chain(bufs, indirect_at=TABLES + 0x400 * slot if indirect else None)


def run_both(scenario, **kw):
    """Run `scenario(guest)` then the service loop, natively (the batch server, then the
    chain server) and with the Python path alone. Returns the batch server's results (after
    asserting all three agree)."""
    b = run_one(scenario, False, **kw)
    for aio in vb.AIO_MODES:
        a = run_one(scenario, True, aio=aio, **kw)
        assert a["resets"] == b["resets"], aio
        assert a["state"] == b["state"], aio
        assert a["image"] == b["image"], aio
        assert a["interrupts"] == b["interrupts"], aio
        if a["ram"] != b["ram"]:
            diff = next(i for i in range(len(a["ram"])) if a["ram"][i] != b["ram"][i])
            pytest.fail(f"aio={aio}: guest RAM differs at host offset {diff:#x}")
        if aio == "io_uring":
            first = a
    return first


def uring_usable() -> bool:
    """Whether this build and kernel give virtio-blk its io_uring (else aio=io_uring reads
    as aio=threads does, and says so)."""
    err = vblk_ffi.new("int *")
    b = vblk_lib.vblk_batch_new(vblk_ffi.new("struct vblk_disk *"), err)
    if b == vblk_ffi.NULL:
        return False
    vblk_lib.vblk_batch_free(b)
    return True


URING = uring_usable()
NO_URING = ("io_uring is not available here (built without liburing-dev, or the kernel "
            "refuses io_uring_setup): aio=io_uring falls back to aio=threads")


def run_one(scenario, fast, *, aio="io_uring", image=None, backend_kw=None, guest_kw=None,
            workdir=None, after_open=None):
    image = image_bytes() if image is None else image
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        path = os.path.join(d, "disk.img")
        with open(path, "wb") as f:
            f.write(image)
        g = Guest(**(guest_kw or {}))
        scenario(g)
        backend = BlockBackend.open(path, **{"serial": "HVTEST", **(backend_kw or {})})
        if after_open is not None:
            after_open(backend)
        dev = vb.VirtioBlk(backend, queue_size=256, aio=aio)
        served = []
        if fast:
            real = dev.serve_cycle

            def counting(qi, q, gate):
                rc = real(qi, q, gate)
                served.append((queue_state(q).served, queue_state(q).stop))
                return rc
            dev.serve_cycle = counting
        else:
            dev.serve_cycle = None
        t = BareTransport(dev, name="vblk-test")
        qs = QueueState(0, 256)
        qs.size = g.size
        qs.vq = VirtQueue(g.mem, g.size, DESC, AVAIL, USED, **g.queue_kw)
        t.service_queue(qs)
        # The batch server did serve (it is made on the first native cycle).
        batched = bool(dev._batches)
        q = qs.vq
        state = (q.last_avail_idx, q.used_idx, q._shadow_avail, qs.broken)
        q.close()
        dev.close()
        with open(path, "rb") as f:
            img = f.read()
        ram = bytes(g.mem.buffer)
        g.mem.close()
    return dict(resets=[bool(r) for r in t.resets], state=state, image=img, ram=ram,
                interrupts=t.interrupts, served=sum(n for n, _ in served),
                stops=[s for _, s in served], guest=g, batched=batched)


def used(res):
    """The used ring of a result: [(id, len), ...] pushed since the start index."""
    ram, g = res["ram"], res["guest"]
    idx = struct.unpack_from("<H", ram, USED + 2)[0]
    return [struct.unpack_from("<II", ram, USED + 4 + 8 * ((g.start + i) % g.size))
            for i in range((idx - g.start) & 0xFFFF)]


def status(res, slot):
    return res["ram"][STATUS + slot]


def data_at(res, addr, n):
    off = addr if addr < HIGH else LOW + addr - HIGH
    return res["ram"][off:off + n]


# -- parity on well-formed requests --------------------------------------------------------------

@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("split", [1, 3, 8])
def test_reads_and_writes_match_python(event_idx, indirect, split):
    img = image_bytes()

    def scenario(g):
        g.request(0, IN, 3, read_len=4096, split=split, indirect=indirect)
        g.request(1, OUT, 10, data=bytes(range(256)) * 8, split=split, indirect=indirect)
        g.request(2, IN, 10, read_len=2048, split=split, indirect=indirect)
        g.request(3, IN, DISK_SECTORS - 1, read_len=512, indirect=indirect, hdr_split=True)
        g.request(4, OUT, 0, data=b"\xab" * 512, hdr_split=True)
        g.request(5, IN, 0, read_len=0)                     # no data: OK, nothing read

    r = run_both(scenario, guest_kw=dict(event_idx=event_idx))
    assert r["batched"] == URING
    assert r["served"] == 6 and r["resets"] == []
    assert [status(r, s) for s in range(6)] == [vb.S_OK] * 6
    lens = [n for _, n in used(r)]
    assert lens == [4097, 1, 2049, 513, 1, 1]
    assert data_at(r, DATA, 4096) == img[3 * 512:3 * 512 + 4096]
    # READ after WRITE in the same batch sees the write
    assert data_at(r, DATA + 0x20000, 2048) == bytes(range(256)) * 8
    assert r["image"][10 * 512:10 * 512 + 2048] == bytes(range(256)) * 8
    assert r["image"][:512] == b"\xab" * 512
    assert r["interrupts"] == 1


def test_runs_of_reads_across_batches_with_other_requests_between():
    """More READs than one submission takes (32), broken by a WRITE, a FLUSH (the Python
    path's), a READ past the end and a READ of nothing: every request answered as the
    Python path answers it, READs after the WRITE seeing it, in one service pass."""
    img = image_bytes()
    kinds = {}

    def scenario(g):
        for slot in range(45):
            if slot == 20:
                kinds[slot] = "write"
                g.request(slot, OUT, 5, data=b"\x5a" * 1024)
            elif slot == 30:
                kinds[slot] = "flush"
                g.request(slot, FLUSH, 0)
            elif slot == 33:
                kinds[slot] = "past the end"
                g.request(slot, IN, DISK_SECTORS, read_len=512)
            elif slot == 40:
                kinds[slot] = "nothing"
                g.request(slot, IN, 0, read_len=0)
            else:
                kinds[slot] = "read"
                g.request(slot, IN, slot % 8, read_len=1024, split=1 + slot % 3)

    r = run_both(scenario, guest_kw=dict(size=256))
    assert r["batched"] == URING
    assert r["resets"] == [] and r["served"] == 44          # all but the FLUSH
    lens = dict(used(r))
    assert len(lens) == 45
    for slot, kind in kinds.items():
        want = vb.S_IOERR if kind == "past the end" else vb.S_OK
        assert status(r, slot) == want, (slot, kind)
        if kind == "read":
            sector = slot % 8
            got = data_at(r, DATA + 0x10000 * slot, 1024)
            disk = bytearray(img)
            if slot > 20:
                disk[5 * 512:7 * 512] = b"\x5a" * 1024
            assert got == bytes(disk[sector * 512:sector * 512 + 1024]), slot
    assert r["image"][5 * 512:7 * 512] == b"\x5a" * 1024


@pytest.mark.parametrize("layout", ["data over the next header", "data over the descriptors",
                                    "data over an earlier status byte", "data over data",
                                    "a failed read's status over the next header"])
def test_buffers_that_meet_are_served_as_one_by_one(layout):
    """A driver whose buffers meet one another: the batch server must give what serving
    the requests one by one gives (a later request sees the earlier one's writes; a later
    write lands after an earlier one)."""
    def scenario(g):
        if layout == "data over the next header":
            g.request(0, IN, 4, read_len=512, data_addr=HDRS + 16)
        elif layout == "data over the descriptors":
            g.request(0, IN, 6, read_len=512, data_addr=DESC + 16 * 3)
        elif layout == "data over an earlier status byte":
            g.request(0, IN, 4, read_len=512)
            g.request(1, IN, 2, read_len=512, data_addr=STATUS - 100)
        elif layout == "data over data":
            g.request(0, IN, 4, read_len=1024, data_addr=DATA)
        else:
            # Request 0 reads past the end of a truncated image: its IOERR (1) lands on
            # the type of request 1's header, turning its READ into a WRITE.
            g.request(0, IN, DISK_SECTORS - 1, read_len=512)
            g.desc(2, HDRS + 16, 1, WRITE)
        if layout != "data over an earlier status byte":
            g.request(1, IN, 2, read_len=1024, data_addr=DATA + 512)
        for slot in range(2, 6):
            g.request(slot, IN, slot, read_len=512)

    truncate = None
    if layout.startswith("a failed read"):
        def truncate(be):
            os.ftruncate(be.fd, (DISK_SECTORS - 1) * 512)
    r = run_both(scenario, guest_kw=dict(size=64), after_open=truncate)
    assert r["batched"] == URING


@pytest.mark.parametrize("layout", ["two writes to one sector",
                                    "a write then a read of its sector",
                                    "a read then a write of its sector",
                                    "a read into a later write's data",
                                    "a write's data under a later read",
                                    "writes and reads that meet nowhere"])
def test_writes_in_a_batch_are_served_as_one_by_one(layout):
    """WRITEs among READs in one kick, meeting them on the disk or in guest RAM: the disk and
    guest RAM end as serving the requests one by one leaves them (a WRITE is served alone,
    between the batches of READs around it; a batch that took WRITEs too would have to keep
    these apart)."""
    img = image_bytes()
    a, b = b"\xa1" * 1024, b"\xb2" * 1024
    X = DATA + 0x80000                 # a buffer two requests share

    def scenario(g):
        if layout == "two writes to one sector":
            g.request(0, OUT, 4, data=a)
            g.request(1, OUT, 4, data=b)
        elif layout == "a write then a read of its sector":
            g.request(0, OUT, 4, data=a)
            g.request(1, IN, 4, read_len=1024)
        elif layout == "a read then a write of its sector":
            g.request(0, IN, 4, read_len=1024)
            g.request(1, OUT, 4, data=b)
        elif layout == "a read into a later write's data":
            g.request(0, IN, 6, read_len=1024, data_addr=X)
            g.request(1, OUT, 8, data=a, data_addr=X)
        elif layout == "a write's data under a later read":
            g.request(0, OUT, 8, data=a, data_addr=X)
            g.request(1, IN, 6, read_len=1024, data_addr=X)
        else:
            g.request(0, OUT, 4, data=a)
            g.request(1, IN, 12, read_len=1024)
            g.request(2, OUT, 8, data=b)
        for slot in range(2 if layout != "writes and reads that meet nowhere" else 3, 6):
            g.request(slot, IN if slot % 2 else OUT, 20 + 2 * slot, read_len=1024,
                      data=None if slot % 2 else bytes([slot]) * 1024)

    r = run_both(scenario, guest_kw=dict(size=64))
    assert r["batched"] == URING
    image, sector = r["image"], lambda n, k=2: slice(n * 512, (n + k) * 512)
    if layout == "two writes to one sector":
        assert image[sector(4)] == b
    elif layout == "a write then a read of its sector":
        assert data_at(r, DATA + 0x10000, 1024) == a
    elif layout == "a read then a write of its sector":
        assert data_at(r, DATA, 1024) == img[sector(4)] and image[sector(4)] == b
    elif layout == "a read into a later write's data":
        assert image[sector(8)] == img[sector(6)]
    elif layout == "a write's data under a later read":
        assert image[sector(8)] == a and data_at(r, X, 1024) == img[sector(6)]
    else:
        assert image[sector(4)] == a and image[sector(8)] == b
        assert data_at(r, DATA + 0x10000, 1024) == img[sector(12)]
    for slot in range(6):
        assert status(r, slot) == vb.S_OK, slot


def test_buffers_in_high_memory_and_unaligned():
    def scenario(g):
        g.request(0, IN, 1, read_len=1024, data_addr=HIGH + 0x1003, split=2)
        g.request(1, OUT, 2, data=b"x" * 1536, data_addr=HIGH + 0x30001, split=3)
    r = run_both(scenario)
    assert r["served"] == 2
    assert data_at(r, HIGH + 0x1003, 1024) == image_bytes()[512:1536]
    assert r["image"][1024:1024 + 1536] == b"x" * 1536


@pytest.mark.parametrize("event_idx", [False, True])
def test_full_queue_and_index_wraparound(event_idx):
    def scenario(g):
        for i in range(21):          # a full 64-entry table of 3-descriptor chains
            g.request(i % 8, IN if i % 3 else OUT, i, read_len=512, data=None if i % 3
                      else bytes([i]) * 512)
    r = run_both(scenario, guest_kw=dict(size=64, start=65530, event_idx=event_idx))
    assert r["served"] == 21 and r["state"][:2] == ((65530 + 21) & 0xFFFF,) * 2
    assert len(used(r)) == 21 and all(n in (1, 513) for _, n in used(r))


def test_status_byte_inside_a_larger_writable_buffer():
    # data and status in one writable buffer: the status is its last byte
    def scenario(g):
        g.mem.write(HDRS, vb.VirtioBlkReqHeader.build(dict(type=IN, reserved=0, sector=4)))
        g.chain([(HDRS, 16, False), (DATA, 513, True)])
        g.mem.write(HDRS + 16, vb.VirtioBlkReqHeader.build(dict(type=IN, reserved=0, sector=4)))
        g.chain([(HDRS + 16, 16, False), (DATA + 0x1000, 0, True), (DATA + 0x2000, 512, True),
                 (DATA + 0x3000, 1, True), (DATA + 0x4000, 0, True)])
    r = run_both(scenario)
    assert r["served"] == 2
    assert data_at(r, DATA, 513) == image_bytes()[2048:2560] + b"\0"
    assert data_at(r, DATA + 0x3000, 1) == b"\0"
    assert [n for _, n in used(r)] == [513, 513]


def test_header_and_payload_in_one_readable_buffer():
    def scenario(g):
        g.mem.write(DATA, vb.VirtioBlkReqHeader.build(dict(type=OUT, reserved=0, sector=7))
                    + b"\x55" * 512)
        g.chain([(DATA, 16 + 512, False), (STATUS, 1, True)])
    r = run_both(scenario)
    assert r["served"] == 1 and status(r, 0) == vb.S_OK
    assert r["image"][7 * 512:8 * 512] == b"\x55" * 512


# -- errors answered with IOERR --------------------------------------------------------------

@pytest.mark.parametrize("rtype", [IN, OUT])
@pytest.mark.parametrize("sector,length", [
    (DISK_SECTORS, 512),              # past the end
    (DISK_SECTORS - 1, 1024),         # runs past the end
    (DISK_SECTORS + 5, 0),            # zero length, offset past the end
    (2**64 - 1, 512),                 # sector * 512 overflows 64 bits
    (2**55, 512),
    (0, 100),                         # not whole sectors
    (0, 513),
])
def test_bad_ranges_get_ioerr(rtype, sector, length):
    def scenario(g):
        if rtype == IN:
            g.request(0, IN, sector, read_len=length)
        else:
            g.request(0, OUT, sector, data=b"\x77" * length)
        g.request(1, IN, 0, read_len=512)
    r = run_both(scenario)
    assert r["served"] == 2
    assert status(r, 0) == vb.S_IOERR and status(r, 1) == vb.S_OK
    assert [n for _, n in used(r)] == [1, 513]
    assert r["image"] == image_bytes()


def test_zero_length_at_the_end_is_ok():
    r = run_both(lambda g: g.request(0, IN, DISK_SECTORS, read_len=0))
    assert r["served"] == 1 and status(r, 0) == vb.S_OK


def test_read_only_write_gets_ioerr():
    def scenario(g):
        g.request(0, OUT, 1, data=b"\x01" * 512)
        g.request(1, IN, 1, read_len=512)
    r = run_both(scenario, backend_kw=dict(readonly=True))
    assert r["served"] == 2
    assert (status(r, 0), status(r, 1)) == (vb.S_IOERR, vb.S_OK)
    assert r["image"] == image_bytes()


@pytest.mark.parametrize("sector,length,ok", [(0, 4096, True), (8, 8192, True), (1, 4096, False),
                                               (0, 1024, False), (0, 512, False)])
def test_logical_sector_alignment(sector, length, ok):
    def scenario(g):
        g.request(0, IN, sector, read_len=length)
        g.request(1, OUT, sector, data=b"\x42" * length)
    r = run_both(scenario, backend_kw=dict(logical_sector=4096))
    assert r["served"] == 2
    expect = vb.S_OK if ok else vb.S_IOERR
    assert (status(r, 0), status(r, 1)) == (expect, expect)


def test_write_through():
    def scenario(g):
        g.request(0, OUT, 3, data=b"\x99" * 1024)
        g.request(1, OUT, 9, data=b"")            # a zero-length write still flushes
    r = run_both(scenario, backend_kw=dict(write_through=True))
    assert r["served"] == 2 and r["image"][1536:2560] == b"\x99" * 1024


def test_read_past_a_truncated_image_is_ioerr():
    # the backend believes the disk is larger than the file: preadv hits end of file
    def scenario(g):
        g.request(0, IN, 0, read_len=1024)
        g.request(1, IN, DISK_SECTORS - 2, read_len=1024)
    r = run_both(scenario, after_open=lambda be: os.ftruncate(be.fd, (DISK_SECTORS - 1) * 512))
    assert r["served"] == 2
    assert (status(r, 0), status(r, 1)) == (vb.S_OK, vb.S_IOERR)
    assert [n for _, n in used(r)] == [1025, 1]


# -- what the native path leaves to Python -------------------------------------------------------

def test_mixed_batch_is_served_in_order():
    def scenario(g):
        g.request(0, IN, 2, read_len=512)
        g.request(1, FLUSH, 0)
        g.request(2, OUT, 5, data=b"\x11" * 512)
        g.request(3, GET_ID, 0, read_len=20)
        g.request(4, IN, 5, read_len=512)
        g.request(5, 99, 0)                           # unsupported type
        g.request(6, OUT, 6, data=b"\x22" * 1024)
    r = run_both(scenario)
    assert r["served"] == 4                           # 0, 2, 4, 6 natively
    assert "declined" in r["stops"]
    assert [status(r, s) for s in range(7)] == [0, 0, 0, 0, 0, vb.S_UNSUPP, 0]
    heads = [h for h, _ in used(r)]
    assert heads == sorted(heads) and len(heads) == 7  # completion order = submission order
    assert [n for _, n in used(r)] == [513, 1, 1, 21, 513, 1, 1]
    assert data_at(r, DATA + 0x40000, 512) == b"\x11" * 512


def test_no_status_byte_or_short_header_left_to_python():
    def scenario(g):
        g.mem.write(HDRS, vb.VirtioBlkReqHeader.build(dict(type=IN, reserved=0, sector=0)))
        g.chain([(HDRS, 16, False), (DATA, 512, False)])           # nothing writable
        g.chain([(HDRS, 16, False), (DATA, 0, True)])              # only an empty writable
        g.chain([(HDRS, 15, False), (STATUS, 1, True)])            # short header
        g.request(3, IN, 0, read_len=512)
    r = run_both(scenario)
    assert r["served"] == 1
    assert [n for _, n in used(r)] == [0, 0, 1, 513]
    assert status(r, 0) == vb.S_IOERR


def test_closed_backend_is_left_to_python():
    def scenario(g):
        g.request(0, IN, 0, read_len=512)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "disk.img")
        with open(path, "wb") as f:
            f.write(image_bytes())
        g = Guest()
        scenario(g)
        dev = vb.VirtioBlk(BlockBackend.open(path))
        dev.backend.close()
        q = VirtQueue(g.mem, g.size, DESC, AVAIL, USED)
        assert dev.serve_fast(0, q) == 0
        assert q.last_avail_idx == 0 and q.used_idx == 0
        q.close()
        g.mem.close()


def test_direct_backend_bounces_in_python(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(image_bytes())
    try:
        BlockBackend.open(path, direct=True).close()
    except ConfigError:
        pytest.skip("no O_DIRECT on this filesystem")

    def scenario(g):
        g.request(0, IN, 0, read_len=4096, data_addr=DATA)          # aligned: native
        g.request(1, IN, 1, read_len=512, data_addr=DATA + 0x10001)  # unaligned: bounce
        g.request(2, OUT, 4, data=b"\x33" * 512, data_addr=DATA + 0x20000)
    r = run_both(scenario, backend_kw=dict(direct=True), workdir=tmp_path)
    assert "unsupported" in r["stops"]
    assert r["served"] == 2
    assert [status(r, s) for s in range(3)] == [0, 0, 0]


def test_max_chains_per_call():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "disk.img")
        with open(path, "wb") as f:
            f.write(image_bytes())
        g = Guest()
        for i in range(5):
            g.request(i, IN, i, read_len=512)
        dev = vb.VirtioBlk(BlockBackend.open(path))
        q = VirtQueue(g.mem, g.size, DESC, AVAIL, USED)
        nq = queue_state(q)
        assert dev.serve_fast(0, q, 2) == 2 and nq.stop == "max"
        assert (q.last_avail_idx, q.used_idx, q._shadow_avail) == (2, 2, 5)
        assert queue_state(q) is nq
        assert dev.serve_fast(0, q, 10) == 3 and nq.stop == "empty"
        assert q.pop() is None
        assert q.needs_notification()                # covers the native pushes
        q.close()
        dev.close()
        g.mem.close()


def test_too_many_segments_left_to_python():
    def scenario(g):
        g.request(0, IN, 0, read_len=512 * 2, split=1)
        # an OUT whose payload is 1536 one-byte buffers (an indirect table): over the
        # native path's 1024 segments, served by Python
        bufs = [(HDRS + 16, 16, False)] + [(DATA + i, 1, False) for i in range(1536)] \
            + [(STATUS + 1, 1, True)]
        g.mem.write(HDRS + 16, vb.VirtioBlkReqHeader.build(dict(type=OUT, reserved=0,
                                                                sector=1)))
        g.chain(bufs, indirect_at=0x200000)
    r = run_both(scenario)
    assert r["served"] == 1 and "unsupported" in r["stops"]
    assert status(r, 1) == vb.S_OK


# -- malformed chains: declined natively, rejected by Python ------------------------------------

def _good(g):
    g.request(0, IN, 1, read_len=512)


MALFORMED = {
    "head-out-of-range": lambda g: g.publish(g.size + 3),
    "next-out-of-range": lambda g: (g.desc(12, HDRS, 16, NEXT, g.size), g.publish(12)),
    "loop": lambda g: (g.desc(12, HDRS, 16, NEXT, 13), g.desc(13, DATA, 512, NEXT, 12),
                       g.publish(12)),
    "self-loop": lambda g: (g.desc(12, HDRS, 16, NEXT, 12), g.publish(12)),
    "indirect-loop": lambda g: (g.desc(0, HDRS, 16, NEXT, 1, table=TABLES),
                                g.desc(1, DATA, 16, NEXT, 0, table=TABLES),
                                g.desc(12, TABLES, 32, INDIRECT), g.publish(12)),
    "indirect-in-indirect": lambda g: (g.desc(0, TABLES + 0x100, 16, INDIRECT, table=TABLES),
                                       g.desc(12, TABLES, 16, INDIRECT), g.publish(12)),
    "indirect-with-next": lambda g: (g.request(9, IN, 0, read_len=512, indirect=True),
                                     g.desc(g.next_desc - 1, TABLES + 0x400 * 9, 48,
                                            INDIRECT | NEXT, 7)),
    "indirect-len-0": lambda g: (g.desc(12, TABLES, 0, INDIRECT), g.publish(12)),
    "indirect-len-17": lambda g: (g.desc(12, TABLES, 17, INDIRECT), g.publish(12)),
    "indirect-len-8": lambda g: (g.desc(12, TABLES, 8, INDIRECT), g.publish(12)),
    "indirect-outside-ram": lambda g: (g.desc(12, LOW - 16, 32, INDIRECT), g.publish(12)),
    "indirect-next-out-of-range": lambda g: (g.desc(0, HDRS, 16, NEXT, 2, table=TABLES),
                                             g.desc(12, TABLES, 32, INDIRECT), g.publish(12)),
    "buffer-outside-ram": lambda g: g.chain([(HDRS, 16, False), (LOW + 0x1000, 512, True),
                                             (STATUS, 1, True)]),
    "buffer-spans-region-end": lambda g: g.chain([(HDRS, 16, False), (LOW - 256, 512, True),
                                                  (STATUS, 1, True)]),
    "buffer-past-high-ram": lambda g: g.chain([(HDRS, 16, False),
                                               (HIGH + LOW - 256, 512, True),
                                               (STATUS, 1, True)]),
    "buffer-gpa-wraps": lambda g: g.chain([(HDRS, 16, False), (2**64 - 256, 512, True),
                                           (STATUS, 1, True)]),
    "zero-len-outside-ram": lambda g: g.chain([(HDRS, 16, False), (LOW + 1, 0, True),
                                               (STATUS, 1, True)]),
    "readable-after-writable": lambda g: g.chain([(HDRS, 16, False), (DATA, 512, True),
                                                  (DATA + 0x1000, 16, False),
                                                  (STATUS, 1, True)]),
    "readable-after-empty-writable": lambda g: g.chain([(HDRS, 16, False), (DATA, 0, True),
                                                        (DATA + 0x1000, 16, False),
                                                        (STATUS, 1, True)]),
    "avail-a-queue-ahead": lambda g: setattr(g, "avail_idx", g.avail_idx + g.size),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_chain_declined_then_needs_reset(name):
    def scenario(g):
        _good(g)
        g.mem.write(HDRS + 16 * 9, vb.VirtioBlkReqHeader.build(dict(type=IN, reserved=0,
                                                                    sector=0)))
        MALFORMED[name](g)
        g.request(2, IN, 2, read_len=512)            # never reached
    r = run_both(scenario)
    assert r["resets"] == [True], name
    assert r["state"][3] is True                     # the queue is broken
    if name == "avail-a-queue-ahead":
        assert r["served"] == 0 and "invalid" in r["stops"]
    else:
        assert r["served"] == 1 and "invalid" in r["stops"]
        assert [n for _, n in used(r)] == [513]      # only the good chain came back


@pytest.mark.parametrize("writable", [False, True])
def test_32_bit_length_overflow(writable):
    """Buffers that are each in RAM but add up past 4 GiB (3 GiB of unbacked guest RAM)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "disk.img")
        with open(path, "wb") as f:
            f.write(image_bytes())
        mem = GuestMemory(3 << 30)
        g = Guest.__new__(Guest)
        g.mem, g.size, g.start, g.avail_idx, g.next_desc = mem, 16, 0, 0, 0
        g.request(0, IN, 0, read_len=512)
        hdr = vb.VirtioBlkReqHeader.build(dict(type=OUT if not writable else IN, reserved=0,
                                               sector=0))
        mem.write(HDRS + 16, hdr)
        g.chain([(HDRS + 16, 16, False), (0, 0x80000000, writable), (0, 0x80000000, writable),
                 (STATUS + 1, 1, True)])
        dev = vb.VirtioBlk(BlockBackend.open(path))
        q = VirtQueue(mem, 16, DESC, AVAIL, USED)
        assert dev.serve_fast(0, q) == 1 and queue_state(q).stop == "invalid"
        with pytest.raises(vq.VirtqueueError, match="overflows 32 bits"):
            q.pop()
        assert (q.last_avail_idx, q.used_idx) == (1, 1)
        q.close()
        dev.close()
        mem.close()


def test_max_chain_is_enforced():
    def scenario(g):
        g.request(0, IN, 1, read_len=1024, split=2)     # 4 buffers: over the cap of 3
    r = run_both(scenario, guest_kw=dict(max_chain=3))
    assert r["resets"] == [True] and r["served"] == 0


def test_indirect_not_negotiated():
    def scenario(g):
        g.request(0, IN, 1, read_len=512, indirect=True)
    r = run_both(scenario, guest_kw=dict(indirect=False))
    assert r["resets"] == [True] and r["served"] == 0


def test_memory_closed_under_the_queue_is_left_to_python():
    g = Guest()
    g.request(0, IN, 0, read_len=512)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "disk.img")
        with open(path, "wb") as f:
            f.write(image_bytes())
        dev = vb.VirtioBlk(BlockBackend.open(path))
        q = VirtQueue(g.mem, g.size, DESC, AVAIL, USED)
        q.close()
        g.mem.close()
        assert dev.serve_fast(0, q) == 0
        dev.close()


# -- random descriptor tables --------------------------------------------------------------------

ADDRS = [HDRS, HDRS + 16, HDRS + 8, DATA, DATA + 0x1000, DATA + 1, STATUS, STATUS + 1, TABLES,
         TABLES + 0x100, HIGH + 0x1000, LOW - 512, LOW - 1, LOW, HIGH + LOW - 16, 2**64 - 16,
         0]
LENS = [0, 1, 2, 8, 15, 16, 17, 32, 48, 511, 512, 513, 1024, 4096, 0xFFFFFFFF, 0x80000000]


@st.composite
def tables(draw):
    """Plausible chains (some through an indirect table) laid out in a descriptor table,
    then a few arbitrary changes to descriptor fields, heads and avail.idx."""
    size = draw(st.sampled_from([8, 16]))
    main = [(0, 0, 0, 0)] * size
    table = []                                      # the indirect table at TABLES
    heads, pos = [], 0
    for c in range(draw(st.integers(1, 4))):
        hdr = HDRS + 16 * draw(st.integers(0, 2))
        segs = ([(hdr, 8, False), (hdr + 8, 8, False)] if draw(st.booleans())
                else [(hdr, 16, False)])
        writable = draw(st.booleans())
        for _ in range(draw(st.integers(0, 3))):
            segs.append((draw(st.sampled_from([DATA, DATA + 0x1000, DATA + 3, HIGH + 0x1000])),
                         draw(st.sampled_from([0, 512, 1024, 100])), writable))
        segs.append((STATUS + c, 1, True))
        linked = [(a, n, (WRITE if w else 0) | (NEXT if i + 1 < len(segs) else 0),
                   i + 1 if i + 1 < len(segs) else 0) for i, (a, n, w) in enumerate(segs)]
        if not table and draw(st.booleans()):
            table = linked
            linked = [(TABLES, 16 * len(table), INDIRECT, 0)]
        if pos + len(linked) > size:
            break
        for i, (a, n, f, nx) in enumerate(linked):
            main[pos + i] = (a, n, f, nx + pos if f & NEXT else nx)
        heads.append(pos)
        pos += len(linked)
    nested = [(HDRS, 16, NEXT, 1), (STATUS + 7, 1, WRITE, 0)]
    for _ in range(draw(st.integers(0, 3))):          # arbitrary changes
        where = draw(st.sampled_from(["main", "main", "table", "nested"]))
        target = {"main": main, "table": table, "nested": nested}[where]
        if not target:
            continue
        i = draw(st.integers(0, len(target) - 1))
        field = draw(st.integers(0, 3))
        value = draw([st.sampled_from(ADDRS + [TABLES + 0x100]),
                      st.sampled_from(LENS) | st.sampled_from([16, 32, 48]),
                      st.integers(0, 7) | st.integers(0, 0xFFFF),
                      st.integers(0, size + 1) | st.integers(0, 0xFFFF)][field])
        entry = list(target[i])
        entry[field] = value
        target[i] = tuple(entry)
    if draw(st.integers(0, 9)) == 0 and heads:
        heads[draw(st.integers(0, len(heads) - 1))] = draw(st.integers(0, 0xFFFF))
    avail_extra = draw(st.sampled_from([0] * 8 + [1, size + 1]))
    headers = draw(st.lists(st.tuples(st.sampled_from([IN, OUT, IN, OUT, FLUSH, GET_ID, 7]),
                                      st.sampled_from([0, 1, 8, DISK_SECTORS - 1, DISK_SECTORS,
                                                       2**63])),
                            min_size=3, max_size=3))
    event_idx = draw(st.booleans())
    neg_indirect = draw(st.sampled_from([True, True, True, False]))
    return size, main, table, nested, heads, avail_extra, headers, event_idx, neg_indirect


@st.composite
def wellformed(draw):
    """Mostly valid chains with an occasional mutation, so that many get served."""
    size = 64                                       # room for 5 chains of <= 8 descriptors
    n = draw(st.integers(1, 5))
    reqs = []
    for _ in range(n):
        rtype = draw(st.sampled_from([IN, OUT, IN, OUT, FLUSH, GET_ID]))
        sector = draw(st.sampled_from([0, 1, 3, DISK_SECTORS - 2, DISK_SECTORS]))
        length = draw(st.sampled_from([0, 512, 1024, 1536, 100]))
        split = draw(st.integers(1, 3))
        reqs.append((rtype, sector, length, split, draw(st.booleans()), draw(st.booleans())))
    mutation = draw(st.none() | st.tuples(st.integers(0, 47), st.integers(0, 15),
                                          st.integers(0, 255)))
    return size, reqs, mutation


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_random_tables_agree_with_python(t):
    size, main, indirect, nested, heads, avail_extra, headers, event_idx, neg_indirect = t

    def scenario(g):
        for i, (a, n, f, nx) in enumerate(main):
            g.desc(i, a, n, f, nx)
        for i, (a, n, f, nx) in enumerate(indirect):
            g.desc(i, a, n, f, nx, table=TABLES)
        for i, (a, n, f, nx) in enumerate(nested):
            g.desc(i, a, n, f, nx, table=TABLES + 0x100)
        for i, (rtype, sector) in enumerate(headers):
            g.mem.write(HDRS + 16 * i, struct.pack("<IIQ", rtype, 0, sector))
        for h in heads:
            g.publish(h)
        if avail_extra:
            g.set_avail_idx(g.avail_idx + avail_extra)
    r = run_both(scenario, guest_kw=dict(size=size, event_idx=event_idx, indirect=neg_indirect))
    event(f"served natively: {min(r['served'], 2)}, reset: {bool(r['resets'])}")
    event(f"stops: {sorted(set(r['stops']))}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wellformed())
def test_random_requests_agree_with_python(w):
    size, reqs, mutation = w

    def scenario(g):
        for slot, (rtype, sector, length, split, ind, hsplit) in enumerate(reqs):
            if rtype == OUT:
                g.request(slot, rtype, sector, data=bytes([slot + 1]) * length, split=split,
                          indirect=ind, hdr_split=hsplit)
            else:
                g.request(slot, rtype, sector, read_len=length, split=split, indirect=ind,
                          hdr_split=hsplit)
        if mutation is not None:
            desc, byte, value = mutation
            table = DESC if desc < 16 else TABLES + 0x400 * ((desc - 16) // 8)
            g.mem.write(table + 16 * (desc % 16 if desc < 16 else desc % 8) + byte,
                        bytes([value]))
    r = run_both(scenario, guest_kw=dict(size=size))
    event(f"served natively: {min(r['served'], 2)}, reset: {bool(r['resets'])}")
    event(f"stops: {sorted(set(r['stops']))}")
    if mutation is None:
        assert r["resets"] == []
        assert r["served"] == sum(1 for q in reqs if q[0] in (IN, OUT))


# -- the worker's native cycle (hv_vq_cycle) ---------------------------------------------------

class CycleRig:
    """One queue, a device and an eventfd standing in for the vector's irqfd."""

    def __init__(self, tmp_path, **guest_kw):
        path = tmp_path / "disk.img"
        path.write_bytes(image_bytes())
        self.g = Guest(**guest_kw)
        self.dev = vb.VirtioBlk(BlockBackend.open(path))
        self.q = VirtQueue(self.g.mem, self.g.size, DESC, AVAIL, USED, **self.g.queue_kw)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.gate = ffi.new("struct hv_irq_gate *")
        self.gate.fd, self.gate.open = self.efd, 1

    def cycle(self, poll_ns=0):
        return self.dev.serve_cycle(0, self.q, self.gate, poll_ns)

    @property
    def served(self):
        return queue_state(self.q).served

    def irqs(self):
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def used_flags(self):
        return struct.unpack("<H", self.g.mem.read(USED, 2))[0]

    def close(self):
        self.q.close()
        self.dev.close()
        self.g.mem.close()
        os.close(self.efd)


@pytest.fixture
def crig(tmp_path):
    r = CycleRig(tmp_path)
    yield r
    r.close()


def test_cycle_serves_and_fires_the_open_gate(crig):
    for i in range(3):
        crig.g.request(i, IN, i, read_len=512)
    assert crig.cycle() == native.CYCLE_IDLE
    assert crig.served == 3 and crig.irqs() == 1
    assert [n for _, n in used(dict(ram=bytes(crig.g.mem.buffer), guest=crig.g))] == [513] * 3
    # idle: kicks asked for again, and nothing more to say to the driver
    assert not crig.used_flags() & vq.VRING_USED_F_NO_NOTIFY and crig.q._notifications
    assert crig.cycle() == native.CYCLE_IDLE and crig.served == 0 and crig.irqs() == 0


@pytest.mark.skipif(not URING, reason=NO_URING)
def test_batched_reads_use_the_registered_image_and_only_while_it_is_the_one(crig, tmp_path):
    """The ring reads through the image's file as registered with it (no fd look-up per
    read); were the backend's descriptor ever another file, reads come from that file, not
    from the one the ring still holds."""
    def round_(first):
        for i in range(4):
            crig.g.request(i, IN, first + i, read_len=512)
        assert crig.cycle() == native.CYCLE_IDLE and crig.served == 4
        return [crig.g.mem.read(DATA + 0x10000 * i, 512) for i in range(4)]

    img = image_bytes()
    assert round_(0) == [img[i * 512:(i + 1) * 512] for i in range(4)]
    batch = crig.dev._batches[0]
    assert vblk_lib.vblk_batch_file_registered(batch)
    other = bytes(reversed(img))
    (tmp_path / "other.img").write_bytes(other)
    be = crig.dev.backend
    own, be.fd = be.fd, os.open(tmp_path / "other.img", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert round_(4) == [other[(4 + i) * 512:(5 + i) * 512] for i in range(4)]
        assert not vblk_lib.vblk_batch_file_registered(batch)
    finally:
        os.close(be.fd)
        be.fd = own
    assert round_(8) == [img[(8 + i) * 512:(9 + i) * 512] for i in range(4)]
    assert vblk_lib.vblk_batch_file_registered(batch)


_SERVE_THEN_WAIT = """
import pathlib, sys
sys.path.insert(0, sys.argv[1])
import test_vblk_fast as t
r = t.CycleRig(pathlib.Path(sys.argv[2]))
for k in range(4):
    r.g.request(k, t.IN, k, read_len=512)
r.cycle()
print(t.vblk_lib.vblk_batch_file_registered(r.dev._batches[0]), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not URING, reason=NO_URING)
def test_a_killed_vmm_leaves_its_image_unlocked(tmp_path):
    """The ring's registered file is let go of by the kernel after the process is gone; it
    must not be the description that holds the image's lock, or a VMM killed with SIGKILL
    keeps its image locked past its death (a VM restarted at once could not open it)."""
    import fcntl
    import subprocess
    import sys
    for i in range(5):
        d = tmp_path / str(i)
        d.mkdir()
        p = subprocess.Popen([sys.executable, "-c", _SERVE_THEN_WAIT,
                              os.path.dirname(os.path.abspath(__file__)), str(d)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert p.stdout.readline().strip() == b"1"      # reading through the ring's file
        finally:
            p.kill()
            p.wait()
        fd = os.open(d / "disk.img", os.O_RDWR)
        try:            # what BlockBackend.open takes: fails with EAGAIN if still locked
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        finally:
            os.close(fd)


class _RingTrouble:
    """The plugin's native module, but io_uring refused at set-up (``new``) or failing after
    a batch (``later``), as a kernel with io_uring disabled or a broken ring would."""

    def __init__(self, when):
        self.when = when

    def __getattr__(self, name):
        return getattr(vblk_lib, name)

    def vblk_batch_new(self, blk, err):
        if self.when == "new":
            err[0] = errno.EPERM
            return vblk_ffi.NULL
        return vblk_lib.vblk_batch_new(blk, err)

    def vblk_batch_error(self, batch):
        return errno.EIO if self.when == "later" else vblk_lib.vblk_batch_error(batch)


@pytest.mark.parametrize("when", ["new", "later"])
def test_reads_go_on_without_io_uring_and_the_log_says_so_once(crig, monkeypatch, caplog,
                                                               when):
    if when == "later" and not URING:
        pytest.skip(NO_URING)
    monkeypatch.setattr(vb, "_lib", _RingTrouble(when))
    img = image_bytes()
    with caplog.at_level(logging.WARNING):
        for round_ in range(3):
            for i in range(4):
                crig.g.request(i, IN, round_ + i, read_len=512)
            assert crig.cycle() == native.CYCLE_IDLE and crig.served == 4
            for i in range(4):
                assert crig.g.mem.read(DATA + 0x10000 * i, 512) == \
                    img[(round_ + i) * 512:(round_ + i + 1) * 512]
    assert crig.dev._batches is None                    # every read a preadv from now on
    said = [r.getMessage() for r in caplog.records if "io_uring" in r.getMessage()]
    why = os.strerror(errno.EPERM if when == "new" else errno.EIO)
    assert len(said) == 1 and why in said[0], said


def test_the_module_builds_without_liburing(tmp_path, monkeypatch):
    """HVFRAME_NO_URING=1 (or no liburing-dev): the module still builds, and says ENOSYS
    when asked for a ring, so aio=io_uring reads as aio=threads."""
    import glob
    import importlib.util
    import runpy
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("HVFRAME_NO_URING", "1")
    monkeypatch.syspath_prepend(here)
    build = runpy.run_path(os.path.join(here, "build_native.py"))
    assert build["URING"] is False
    build["ffibuilder"].compile(tmpdir=str(tmp_path))
    so, = glob.glob(str(tmp_path / "hvframe_virtio_blk" / "_native*.so"))
    spec = importlib.util.spec_from_file_location("hvframe_virtio_blk._native", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    err = mod.ffi.new("int *")
    assert mod.lib.vblk_uring_built() == 0
    assert mod.lib.vblk_batch_new(mod.ffi.new("struct vblk_disk *"), err) == mod.ffi.NULL
    assert err[0] == errno.ENOSYS


def test_aio_threads_never_makes_a_ring(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(image_bytes())
    dev = vb.VirtioBlk(BlockBackend.open(path), aio="threads")
    try:
        assert dev._batches is None
    finally:
        dev.close()
    backend = BlockBackend.open(path)
    try:
        with pytest.raises(ValueError, match="aio="):
            vb.VirtioBlk(backend, aio="native")
    finally:
        backend.close()


def test_cycle_hands_a_shut_gate_back_once(crig):
    crig.gate.open = 0
    crig.g.request(0, IN, 0, read_len=512)
    assert crig.cycle() == native.CYCLE_NOTIFY and crig.served == 1
    assert crig.irqs() == 0
    assert crig.cycle() == native.CYCLE_IDLE and crig.irqs() == 0


@pytest.mark.parametrize("event_idx", [False, True])
def test_cycle_respects_interrupt_suppression(tmp_path, event_idx):
    r = CycleRig(tmp_path, event_idx=event_idx)
    try:
        if event_idx:       # used_event: interrupt me after the 4th completion only
            r.g.mem.write(AVAIL + vq.AVAIL_RING_OFF + 2 * r.g.size, struct.pack("<H", 3))
        else:
            r.g.mem.write(AVAIL + vq.AVAIL_FLAGS_OFF, struct.pack("<H", vq.VRING_AVAIL_F_NO_INTERRUPT))
        for i in range(2):
            r.g.request(i, IN, i, read_len=512)
        assert r.cycle() == native.CYCLE_IDLE and r.served == 2 and r.irqs() == 0
        if event_idx:
            for i in range(2, 4):
                r.g.request(i, IN, i, read_len=512)
            assert r.cycle() == native.CYCLE_IDLE and r.irqs() == 1
            # avail_event follows the ring once idle
            ev = struct.unpack("<H", r.g.mem.read(USED + vq.USED_RING_OFF + 8 * r.g.size, 2))[0]
            assert ev == 4
    finally:
        r.close()


def test_cycle_polls_for_the_next_batch(crig):
    import threading
    crig.g.request(0, IN, 0, read_len=512)
    later = threading.Timer(0.02, lambda: crig.g.request(1, IN, 1, read_len=512))
    later.start()
    try:
        # one call serves both: the second batch arrived while the worker polled, and
        # it needed no kick (notifications were off)
        assert crig.cycle(poll_ns=2_000_000_000) == native.CYCLE_IDLE
    finally:
        later.join()
    assert crig.served == 2 and crig.irqs() == 2


def test_cycle_yields_to_a_claim(crig):
    for i in range(2):
        crig.g.request(i, IN, i, read_len=512)
    queue_state(crig.q)
    with native.claiming(crig.q):
        assert crig.cycle(poll_ns=2_000_000_000) == native.CYCLE_YIELD
    assert crig.served == 2 and crig.irqs() == 1
    assert crig.q._notifications and not crig.used_flags() & vq.VRING_USED_F_NO_NOTIFY
    assert queue_state(crig.q).c.yield_req == 0


def test_cycle_leaves_other_requests_to_python(crig):
    crig.g.request(0, FLUSH, 0)
    crig.g.request(1, IN, 0, read_len=512)
    assert crig.cycle() == native.CYCLE_PYTHON
    assert crig.served == 0 and queue_state(crig.q).stop == "declined"
    assert crig.q.pop() is not None           # Python takes the FLUSH from here


def test_eventfd_wait_spins_then_sleeps():
    import threading
    import time
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        assert lib.hv_eventfd_wait(fd, 1000, 0) == 0             # nothing: timeout
        os.eventfd_write(fd, 3)
        assert lib.hv_eventfd_wait(fd, 1000, 0) == 3             # found while spinning
        t = threading.Timer(0.05, os.eventfd_write, (fd, 1))
        t.start()
        t0 = time.monotonic()
        assert lib.hv_eventfd_wait(fd, 1000, 5000) == 1          # found after sleeping
        assert time.monotonic() - t0 < 4
        t.join()
    finally:
        os.close(fd)


# -- a large batch shared with the queue's partner thread ---------------------------------------

ONE_CPU = "one CPU to run on: no partner thread is made (nobody to share a batch with)"


def _partner_threads(expect=None):
    """The process's threads named as vblk.c names a batch's partner; with expect, waits up
    to 2 s for that many (a joined thread leaves /proc a moment after the join returns)."""
    deadline = time.monotonic() + 2
    while True:
        n = _count_partner_threads()
        if expect is None or n == expect or time.monotonic() > deadline:
            return n
        time.sleep(0.01)


def _count_partner_threads():
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += f.read().strip() == "vblk-partner"
        except FileNotFoundError:
            pass                   # gone meanwhile
    return n


def _shared_rounds(crig, rounds, seed):
    """Rounds of 16 random 4 KiB reads (_round_of_sixteen), each served whole by one cycle."""
    import random
    rnd = random.Random(seed)
    for _ in range(rounds):
        assert _round_of_sixteen(crig, rnd) == native.CYCLE_IDLE


def _round_of_sixteen(crig, rnd):
    """One batch of 16 random 4 KiB reads (64 KiB: large enough to share) served by one cycle,
    whatever it ends with; every request must get its own sectors, an OK status and its used
    length whichever thread read it and however. Returns the cycle's code."""
    img = image_bytes()
    blocks = rnd.sample(range(len(img) // 4096), 16)
    for i, blk in enumerate(blocks):
        crig.g.mem.write(DATA + 0x10000 * i, b"\xee" * 4096)
        crig.g.mem.write(STATUS + i, b"\xff")
        crig.g.request(i, IN, blk * 8, read_len=4096)
    code = crig.cycle()
    assert crig.served == 16
    idx = struct.unpack("<H", crig.g.mem.read(USED + vq.USED_IDX_OFF, 2))[0]
    for i, blk in enumerate(blocks):
        assert crig.g.mem.read(DATA + 0x10000 * i, 4096) == img[blk * 4096:(blk + 1) * 4096]
        assert crig.g.mem.read(STATUS + i, 1) == bytes([vb.S_OK])
        elem = USED + vq.USED_RING_OFF + 8 * ((idx - 16 + i) % crig.g.size)
        assert struct.unpack("<II", crig.g.mem.read(elem, 8))[1] == 4096 + 1
    return code


@pytest.mark.skipif(not URING, reason=NO_URING)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason=ONE_CPU)
def test_the_partner_reads_its_half_of_a_large_batch(crig):
    """Made to do every half it is offered, the partner reads eight of each sixteen, and
    each lands where its request asked, with its status."""
    _shared_rounds(crig, 1, seed=1)                 # makes the queue's batch state
    batch = crig.dev._batches[0]
    assert vblk_lib.vblk_batch_split(batch, 2) == 1
    back = vblk_ffi.new("uint64_t *")
    before = vblk_lib.vblk_batch_partner_reads(batch, back)
    _shared_rounds(crig, 20, seed=2)
    assert vblk_lib.vblk_batch_partner_reads(batch, back) - before == 20 * 8


@pytest.mark.skipif(not URING, reason=NO_URING)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason=ONE_CPU)
def test_reads_are_right_whichever_thread_does_them(crig):
    """As the device runs: every large batch offers its second half to the partner, and a
    half the partner has not begun by the time the worker is done with its own is taken back
    and read by the worker (the partner, woken on another CPU, is often late after this
    rig's pauses). Every half is one or the other, and every read is right either way."""
    _shared_rounds(crig, 60, seed=3)
    back = vblk_ffi.new("uint64_t *")
    assert vblk_lib.vblk_batch_partner_reads(crig.dev._batches[0], back) + back[0] == 60 * 8


@pytest.mark.skipif(not URING, reason=NO_URING)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason=ONE_CPU)
def test_the_partner_thread_lives_and_ends_with_its_queue(tmp_path):
    """One partner thread per queue that batches, stopped and joined when the batch state
    goes (split turned off, or the device closed), not left behind."""
    import gc
    gc.collect()                   # earlier tests' devices, and their partners, gone first
    base = _partner_threads()
    r = CycleRig(tmp_path)
    try:
        _shared_rounds(r, 1, seed=4)
        batch = r.dev._batches[0]
        assert _partner_threads(base + 1) == base + 1
        assert vblk_lib.vblk_batch_split(batch, 0) == 0
        assert _partner_threads(base) == base
        assert vblk_lib.vblk_batch_split(batch, 1) == 1
        assert _partner_threads(base + 1) == base + 1
        del batch
    finally:
        r.close()
    gc.collect()
    assert _partner_threads(base) == base


def test_no_partner_where_the_device_says_so(tmp_path, monkeypatch):
    """split_reads off: no partner thread, and a large batch is the worker's alone."""
    monkeypatch.setattr(vb.VirtioBlk, "split_reads", False)
    import gc
    gc.collect()
    base = _partner_threads()
    r = CycleRig(tmp_path)
    try:
        _shared_rounds(r, 3, seed=5)
        assert _partner_threads() == base
        if r.dev._batches:
            assert vblk_lib.vblk_batch_partner_reads(r.dev._batches[0], vblk_ffi.NULL) == 0
    finally:
        r.close()


# -- a ring that fails, on either side ---------------------------------------------------------

SPLIT_ALWAYS, SPLIT_NEVER = 2, 3          # vblk.c's VBLK_SPLIT_PARTNER_ALWAYS and _NEVER


def _batch_with_split(crig, mode):
    _shared_rounds(crig, 1, seed=10)          # makes the queue's batch state
    batch = crig.dev._batches[0]
    assert vblk_lib.vblk_batch_split(batch, mode) == (1 if mode else 0)
    return batch


def _partner_counts(batch):
    """(reads the partner did, reads offered to it that the worker took back)"""
    back = vblk_ffi.new("uint64_t *")
    return vblk_lib.vblk_batch_partner_reads(batch, back), back[0]


@pytest.mark.skipif(not URING, reason=NO_URING)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason=ONE_CPU)
def test_a_half_the_partner_never_begins_is_taken_back_and_read(crig):
    """A partner that begins no half it is offered (a test mode): the worker takes every
    one back once its own half is read, and reads it itself; no batch waits on the partner."""
    import random
    batch = _batch_with_split(crig, SPLIT_NEVER)
    reads, taken = _partner_counts(batch)
    rnd = random.Random(20)
    for _ in range(20):
        assert _round_of_sixteen(crig, rnd) == native.CYCLE_IDLE
    assert _partner_counts(batch) == (reads, taken + 20 * 8)


@pytest.mark.skipif(not URING, reason=NO_URING)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason=ONE_CPU)
def test_a_failed_partner_ring_loses_no_read_and_gets_no_more_halves(crig):
    """The partner's ring refuses a submission, its half left queued in it: the half is read
    with preadv, the ring is never entered again (the half stays queued) as the partner is
    offered nothing more, and the worker's ring goes on batching."""
    import random
    rnd = random.Random(21)
    batch = _batch_with_split(crig, SPLIT_ALWAYS)
    reads, taken = _partner_counts(batch)
    assert vblk_lib.vblk_batch_fail_next_submit(batch, 1, errno.EIO) == 1
    assert _round_of_sixteen(crig, rnd) == native.CYCLE_IDLE
    assert _partner_counts(batch) == (reads + 8, taken)       # its job, which failed
    assert vblk_lib.vblk_batch_unsubmitted(batch, 1) == 8
    assert vblk_lib.vblk_batch_fail_next_submit(batch, 1, errno.EIO) == 0   # none in use
    for _ in range(4):
        assert _round_of_sixteen(crig, rnd) == native.CYCLE_IDLE
    assert _partner_counts(batch) == (reads + 8, taken)
    assert vblk_lib.vblk_batch_unsubmitted(batch, 1) == 8
    assert vblk_lib.vblk_batch_error(batch) == 0 and crig.dev._batches is not None


@pytest.mark.skipif(not URING, reason=NO_URING)
@pytest.mark.parametrize("mode", [0, SPLIT_ALWAYS, SPLIT_NEVER],
                         ids=["alone", "partner-reads", "taken-back"])
def test_a_failed_worker_ring_loses_no_read_and_reads_go_on_one_by_one(crig, caplog, mode):
    """The worker's ring refuses a submission, its reads left queued in it: that batch's
    reads (its own half, the partner's, or the half taken back from the partner, which must
    not go through the failed ring: that would hand the queued ones over too) are all done,
    the device gives up io_uring with one warning, and reads go on."""
    import random
    if mode and len(os.sched_getaffinity(0)) < 2:
        pytest.skip(ONE_CPU)
    rnd = random.Random(22)
    batch = _batch_with_split(crig, mode)
    reads, taken = _partner_counts(batch)
    assert vblk_lib.vblk_batch_fail_next_submit(batch, 0, errno.EIO) == 1
    with caplog.at_level(logging.WARNING):
        _round_of_sixteen(crig, rnd)
        assert vblk_lib.vblk_batch_unsubmitted(batch, 0) == (16 if mode == 0 else 8)
        assert _partner_counts(batch) == {0: (0, 0), SPLIT_ALWAYS: (reads + 8, taken),
                                          SPLIT_NEVER: (reads, taken + 8)}[mode]
        assert vblk_lib.vblk_batch_error(batch) == errno.EIO
        assert crig.dev._batches is None
        for _ in range(3):
            assert _round_of_sixteen(crig, rnd) == native.CYCLE_IDLE
    said = [r.getMessage() for r in caplog.records if "io_uring" in r.getMessage()]
    assert len(said) == 1 and os.strerror(errno.EIO) in said[0], said
