"""Fuzz target: the split-virtqueue walker, Python (VirtQueue) against native (the core's vq.c serving virtio-blk's vblk.c).

Every input is played into three identical guest memories with identical disk images:
world A is served with the native batch server (aio=io_uring: hv_vq_cycle_batch over
vblk_serve_batch through the transport's service loop), world C with the native chain server
(aio=threads: hv_vq_cycle over vblk_serve_chain), or in both, hv_vq_serve alone through
VirtioBlk.serve_fast with a fuzzed limit; world B with the Python path alone (VirtQueue.pop +
VirtioBlk.handle_chain). After every service step A and C must each agree with B on guest RAM,
the image, the queue state, the NEEDS_RESET outcome and the interrupts (the batch server
serves a batch as if one by one, even for rings and buffers that meet) (the parity plugins/virtio_blk/tests/test_vblk_fast.py checks, on
fuzzer-made rings). Both RAMs have PROT_NONE guard pages before, between and after their
two regions, so a native read or write one byte outside RAM crashes the process.

Input: a header (queue size, features, start index, ring placement, service mode), then
operations until the input ends: raw descriptors (main table or one of four indirect
tables), well-formed requests (header, data, status; optionally indirect or split), request
headers, raw RAM bytes, avail entries and index, avail flags / used_event, and "serve".
"""
if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzzlib.runner import run_target
    run_target(os.path.abspath(__file__))
    raise SystemExit(0)

import struct

from fuzzlib import guarded, machines
from fuzzlib.observe import Finding, Observer
from fuzzlib.provider import Provider, operations

from hvframe.memory import FOUR_GIB
from hvframe.virtio import virtqueue as vqm
from hvframe.testing.virtio import BareTransport
from hvframe.virtio.pci import QueueState
from hvframe.virtio.virtqueue import VirtQueue, VirtqueueError
from hvframe_virtio_blk import virtio_blk as vb

LOW = 1 << 20                     # RAM: [0, 1 MiB) and [4 GiB, 4 GiB + 256 KiB)
HIGH = 256 << 10
DESC, AVAIL, USED = 0x1000, 0x3000, 0x4000
TABLES = 0x8000                   # four indirect tables of 64 descriptors
HDRS = 0x10000                    # request headers, 16 bytes a slot
STATUS = 0x18000                  # status bytes
DATA = 0x20000                    # data, 0x10000 a slot (8 slots)
DISK_SECTORS = 64
MAX_OPS = 64
NEXT, WRITE, INDIRECT = vqm.VIRTQ_DESC_F_NEXT, vqm.VIRTQ_DESC_F_WRITE, vqm.VIRTQ_DESC_F_INDIRECT
TYPES = (vb.T_IN, vb.T_OUT, vb.T_IN, vb.T_OUT, vb.T_FLUSH, vb.T_GET_ID, vb.T_DISCARD,
         vb.T_WRITE_ZEROES)
SECTORS = (0, 1, 3, DISK_SECTORS - 2, DISK_SECTORS - 1, DISK_SECTORS, 2**55, 2**64 - 1)
DATA_LENS = (0, 512, 1024, 4096, 100, 513, 16, 1)

# operations
OP_DESC, OP_REQUEST, OP_PUBLISH, OP_AVAIL_IDX, OP_HEADER, OP_RAW, OP_EVENT, OP_SERVE = range(8)
N_OPS = 8
# ring placement
PLACE_DEFAULT, PLACE_LOW_END, PLACE_HIGH_END, PLACE_ANY = range(4)
MODE_CYCLE, MODE_FAST = 0, 1


class World:
    def __init__(self, slot: int, native: bool, ro: bool, img: bytes, aio: str = "io_uring"):
        self.native = native
        self.mem = guarded.fresh(LOW, HIGH, slot)
        self.path = machines.image(f"vq-{slot}.img", img)
        self.image_size = len(img)
        self.backend = machines.open_backend(self.path, readonly=ro, serial="HVFUZZ")
        self.dev = vb.VirtioBlk(self.backend, queue_size=256, aio=aio)
        if not native:
            self.dev.serve_cycle = None
        self.t = BareTransport(self.dev, name="vblk-fuzz")
        self.qs = QueueState(0, 256)

    def close(self):
        if self.qs.vq is not None:
            self.qs.vq.close()
        self.dev.close()

    def serve(self, mode: int, limit: int) -> None:
        qs, t = self.qs, self.t
        if qs.vq is None:
            return
        if mode == MODE_CYCLE:
            t.service_queue(qs)
            return
        # One serve_fast pass (native world) then the Python path for what it left, with no
        # notification toggling, the same in both worlds.
        vq = qs.vq
        if qs.broken:
            return
        try:
            for _ in range(vq.size + 1):
                if self.native:
                    self.dev.serve_fast(0, vq, limit)
                chain = vq.pop()
                if chain is None:
                    break
                t._serve_chain(qs, vq, chain)
        except VirtqueueError as e:
            qs.broken = True
            t.needs_reset(str(e))
        if vq.needs_notification():
            t.interrupts += 1

    def state(self):
        q = self.qs.vq
        return dict(resets=[bool(r) for r in self.t.resets], broken=self.qs.broken,
                    interrupts=self.t.interrupts,
                    ring=None if q is None else (q.last_avail_idx, q.used_idx, q._shadow_avail,
                                                 q._notifications, q._signalled_used))


class Guest:
    """The driver side, writing the same bytes into both worlds."""

    def __init__(self, worlds, size, start, desc, avail, used):
        self.worlds = worlds
        self.mems = [w.mem for w in worlds]
        self.size, self.desc_addr, self.avail_addr, self.used_addr = size, desc, avail, used
        self.avail_idx = start
        self.next_desc = 0

    def write(self, gpa: int, data: bytes) -> None:
        for m in self.mems:
            if m.contains(gpa, len(data)):
                m.write(gpa, data)

    def desc(self, table: int, i: int, a: int, n: int, flags: int, nxt: int) -> None:
        self.write(table + 16 * i, struct.pack("<QIHH", a & (2**64 - 1), n & 0xFFFFFFFF,
                                               flags & 0xFFFF, nxt & 0xFFFF))

    def set_avail_idx(self, idx: int) -> None:
        self.write(self.avail_addr + vqm.AVAIL_IDX_OFF, struct.pack("<H", idx & 0xFFFF))

    def publish(self, head: int) -> None:
        slot = self.avail_addr + vqm.AVAIL_RING_OFF + 2 * (self.avail_idx % self.size)
        self.write(slot, struct.pack("<H", head & 0xFFFF))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def chain(self, bufs, indirect_at=None) -> None:
        """bufs: (addr, len, writable); consecutive descriptors from next_desc; published."""
        if indirect_at is not None:
            for i, (a, n, w) in enumerate(bufs):
                last = i + 1 == len(bufs)
                self.desc(indirect_at, i, a, n, (WRITE if w else 0) | (0 if last else NEXT),
                          0 if last else i + 1)
            bufs = [(indirect_at, 16 * len(bufs), None)]
        head = self.next_desc
        for i, (a, n, w) in enumerate(bufs):
            d = (head + i) % self.size
            last = i + 1 == len(bufs)
            flags = INDIRECT if w is None else (WRITE if w else 0)
            self.desc(self.desc_addr, d, a, n, flags | (0 if last else NEXT),
                      0 if last else (d + 1) % self.size)
        self.next_desc = (head + len(bufs)) % self.size
        self.publish(head)


def _place(p: Provider, mem, nbytes: int, align: int, default: int) -> int:
    how = p.u8() & 3
    if how == PLACE_DEFAULT:
        return default
    if how == PLACE_LOW_END:
        return (LOW - nbytes) & ~(align - 1)
    if how == PLACE_HIGH_END:
        return (FOUR_GIB + HIGH - nbytes) & ~(align - 1)
    return machines.addr(p, mem) & ~(align - 1) if p.ConsumeBool() else machines.addr(p, mem)


def _compare(a: World, b: World, step: int) -> None:
    sa, sb = a.state(), b.state()
    if sa != sb:
        raise Finding(f"step {step}: native (aio={a.dev.aio}) and Python paths disagree on "
                      f"the queue: native {sa} python {sb}")
    ra, rb = a.mem.snapshot(), b.mem.snapshot()
    for region, (x, y) in enumerate(zip(ra, rb)):
        if x != y:
            off = next(i for i in range(len(x)) if x[i] != y[i])
            gpa = a.mem.regions[region].gpa + off
            raise Finding(f"step {step}: guest RAM differs at {gpa:#x}: native (aio={a.dev.aio}) "
                          f"{x[off]:#04x} python {y[off]:#04x}")
    with open(a.path, "rb") as f:
        ia = f.read()
    with open(b.path, "rb") as f:
        ib = f.read()
    if len(ia) != a.image_size or len(ib) != b.image_size:
        raise Finding(f"step {step}: disk image size changed: {len(ia)} / {len(ib)}")
    if ia != ib:
        off = next(i for i in range(len(ia)) if ia[i] != ib[i])
        raise Finding(f"step {step}: images differ at byte {off:#x} (aio={a.dev.aio})")


def one_input(data: bytes) -> None:
    p = Provider(data)
    size = 1 << (p.u8() % 9)                      # 1..256
    flags = p.u8()
    event_idx, indirect, ro = bool(flags & 1), bool(flags & 2), bool(flags & 8)
    max_chain = (p.u8() % 16) + 1 if flags & 4 else None
    mode = MODE_FAST if flags & 16 else MODE_CYCLE
    start = p.u16() if flags & 32 else 0
    img = machines.pattern(DISK_SECTORS * 512)
    worlds = []
    with Observer() as obs:
        try:
            worlds = [World(0, True, ro, img), World(1, False, ro, img),
                      World(2, True, ro, img, aio="threads")]
            mem = worlds[0].mem
            desc = _place(p, mem, vqm.desc_table_size(size), vqm.DESC_ALIGN, DESC)
            avail = _place(p, mem, vqm.avail_ring_size(size, event_idx), vqm.AVAIL_ALIGN, AVAIL)
            used = _place(p, mem, vqm.used_ring_size(size, event_idx), vqm.USED_ALIGN, USED)
            g = Guest(worlds, size, start, desc, avail, used)
            g.set_avail_idx(start)
            g.write(used + vqm.USED_IDX_OFF, struct.pack("<H", start))
            kw = dict(event_idx=event_idx, indirect=indirect, max_chain=max_chain,
                      last_avail_idx=start, used_idx=start)
            try:
                for w in worlds:
                    w.qs.size = size
                    w.qs.vq = VirtQueue(w.mem, size, desc, avail, used, **kw)
            except VirtqueueError:
                return                              # the same in both: nothing to serve
            served = False
            for step, op in operations(p, MAX_OPS, N_OPS):
                if op == OP_DESC:
                    which = p.u8() % 5
                    table = desc if which == 4 else TABLES + 0x400 * which
                    i = p.u16() % (size if which == 4 else 64)
                    g.desc(table, i, machines.addr(p, mem), machines.length(p), p.u16(), p.u16())
                elif op == OP_REQUEST:
                    _request(p, g)
                elif op == OP_PUBLISH:
                    g.publish(p.u16() % size if p.u8() & 7 else p.u16())
                elif op == OP_AVAIL_IDX:
                    g.avail_idx = (g.avail_idx + p.u8() - 128) & 0xFFFF if p.ConsumeBool() \
                        else p.u16()
                    g.set_avail_idx(g.avail_idx)
                elif op == OP_HEADER:
                    slot = p.u8() % 8
                    rtype = p.PickValueInList(TYPES) if p.u8() & 3 else p.u32()
                    sector = p.PickValueInList(SECTORS) if p.u8() & 3 else p.u64()
                    g.write(HDRS + 16 * slot, struct.pack("<IIQ", rtype, 0, sector))
                elif op == OP_RAW:
                    at = machines.addr(p, mem)
                    g.write(at, p.ConsumeBytes(p.u8() % 65))
                elif op == OP_EVENT:
                    value = p.u16()
                    if p.ConsumeBool():          # used_event (event_idx) / avail.flags
                        g.write(avail + vqm.AVAIL_RING_OFF + 2 * size, struct.pack("<H", value))
                    else:
                        g.write(avail + vqm.AVAIL_FLAGS_OFF, struct.pack("<H", value))
                else:
                    _serve(worlds, mode, p.u8() % size + 1, step)
                    served = True
                obs.check(f"step {step}")
            if not served or not p.done():
                _serve(worlds, mode, size, MAX_OPS)
            obs.check("final serve")
        finally:
            for w in worlds:
                w.close()


def _serve(worlds, mode, limit, step):
    a, b, c = worlds
    for w in worlds:
        w.serve(mode, limit)
    _compare(a, b, step)
    _compare(c, b, step)


def _request(p: Provider, g: Guest) -> None:
    slot = p.u8() % 8
    bits = p.u8()
    rtype = p.PickValueInList(TYPES)
    sector = p.PickValueInList(SECTORS)
    n = p.PickValueInList(DATA_LENS)
    split = 1 + (bits & 3)
    ind, hdr_split, high = bool(bits & 4), bool(bits & 8), bool(bits & 16)
    hdr = HDRS + 16 * slot
    g.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    bufs = [(hdr, 8, False), (hdr + 8, 8, False)] if hdr_split else [(hdr, 16, False)]
    base = (FOUR_GIB + 0x8000 * slot) if high else DATA + 0x10000 * slot
    to_device = rtype in (vb.T_OUT, vb.T_DISCARD, vb.T_WRITE_ZEROES)
    if to_device and n:
        g.write(base, p.ConsumeBytes(16) * (n // 16 + 1) if rtype != vb.T_OUT
                else bytes([slot + 1]) * n)
    if n:
        step = -(-n // split)
        for off in range(0, n, step):
            bufs.append((base + off, min(step, n - off), not to_device))
    bufs.append((STATUS + slot, 1, True))
    g.chain(bufs, indirect_at=TABLES + 0x400 * (slot % 4) if ind else None)

