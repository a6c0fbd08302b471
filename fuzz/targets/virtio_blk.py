"""Fuzz target: virtio-blk through its PCI transport, driven like a guest would.

A SyntheticMachine (guarded RAM: [0, 2 MiB) and [4 GiB, 4 GiB + 256 KiB)) with a host bridge
and a virtio-blk function at 00:02.0 on a small temporary image. Every access goes through
the dispatch core (ports 0xcf8/0xcfc, the BARs as MMIO and port exits). The queue workers
are replaced by a synchronous pump: after each operation the target serves every queue whose
doorbell rang or whose worker was woken (``VirtioPciFunction.service_queue``, the worker's
own loop body, native cycle included), so a run is deterministic and an exception escaping
the service loop -- which would kill a worker thread -- surfaces here.

Operations: a driver bring-up (legacy or modern, MSI-X or INTx, features, queue size, ring
placement), well-formed requests of every type, raw descriptors and avail entries, kicks,
raw register accesses to BAR0 (legacy header), BAR4 (modern regions) and BAR1 (MSI-X table),
raw configuration-space accesses (BAR moves, command, MSI-X control, the virtio PCI
configuration access window), device status writes and raw RAM bytes.

Invariants: no handler exception (dispatch core reports), no hvframe ERROR log, no exception
out of the service loop, the image keeps its size (and its bytes when opened read-only), and
at the end, after a device reset and a fresh bring-up, a READ still completes with the
image's bytes (nothing the guest did may wedge the device for good).
"""
if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzzlib.runner import run_target
    run_target(os.path.abspath(__file__))
    raise SystemExit(0)

import struct

from fuzzlib import machines
from fuzzlib.observe import Finding, Observer, check_image
from fuzzlib.provider import Provider

from hvframe.memory import FOUR_GIB, GuestMemoryError
from hvframe.testing import rig
from hvframe.virtio.device import (F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, STATUS_NEEDS_RESET,
                                   bit)
from hvframe.testing.virtio import VirtioPciDriver
from hvframe.virtio.pci import CFG_NOTIFY
from hvframe_virtio_blk.virtio_blk import (F_BLK_SIZE, F_DISCARD, F_FLUSH, F_MQ, F_RO,
                                           F_SEG_MAX, F_TOPOLOGY, F_WRITE_ZEROES, S_OK,
                                           T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
                                           T_WRITE_ZEROES)

LOW, HIGH = 2 << 20, 256 << 10
SLOT = 2
SECTORS = 64
RINGS = 0x100000                  # the driver's rings (default placement)
TABLES = 0x170000                 # indirect tables, 0x400 a slot
HDRS, STATUS, DATA = 0x178000, 0x17C000, 0x180000   # data: 0x8000 a slot, 8 slots
FEATURE_BITS = (F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_DISCARD, F_WRITE_ZEROES, F_RO,
                F_MQ, 28, 29, 32, 27)   # 28 indirect, 29 event idx, 32 VERSION_1, 27 any layout
TYPES = (T_IN, T_OUT, T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 7)
SECTOR_CHOICES = (0, 1, 7, SECTORS - 1, SECTORS, SECTORS + 1, 2**55, 2**64 - 1)
DATA_LENS = (0, 512, 1024, 4096, 16, 100, 513, 32)
SIZES = (1, 2, 4, 8)
MAX_OPS = 48
PUMP_ROUNDS = 4
(OP_INIT, OP_REQUEST, OP_DESC, OP_AVAIL, OP_KICK, OP_BAR4, OP_BAR0, OP_CFG, OP_MSIX,
 OP_STATUS, OP_RAM) = range(11)
N_OPS = 11


class _SyncWorker:
    """Stands in for a queue's worker thread: a wake() is remembered for the pump."""

    def __init__(self):
        self.woken = False

    def wake(self):
        self.woken = True

    def stop(self):
        pass


def _synchronous_workers(fn) -> None:
    def start():
        if fn._workers:
            return
        fn._ensure_doorbells()
        fn._workers.extend(_SyncWorker() for _ in fn.queues)
    fn._start_workers = start


def pump(fn) -> None:
    """Serve the queues the guest kicked (doorbell eventfds) or the transport woke."""
    for _ in range(PUMP_ROUNDS):
        todo = []
        for i, q in enumerate(fn.queues):
            rang = 0
            if i < len(fn._doorbells):
                rang = sum(ev.take() for ev in fn._doorbells[i])
            w = fn._workers[i] if i < len(fn._workers) else None
            if w is not None and w.woken:
                w.woken = False
                rang += 1
            if rang:
                todo.append(q)
        if not todo:
            return
        for q in todo:
            fn.service_queue(q)


class Driver(VirtioPciDriver):
    """The harness's driver; its capability walk (35 configuration reads, each costly in
    the transport) gives the same answer for every fresh Rig, so it runs once a process."""

    _found = None

    def _find_regions(self) -> None:
        if Driver._found is None:
            super()._find_regions()
            Driver._found = (dict(self.regions), self.notify_mult, self.msix_cap, self.io)
        regions, self.notify_mult, self.msix_cap, self.io = Driver._found
        self.regions = dict(regions)


class Rig:
    def __init__(self, ro: bool, eventfds: bool):
        self.ro = ro
        self.image = machines.pattern(SECTORS * 512, 11)
        self.path = machines.image("vblk.img", self.image)
        self.m = m = machines.synthetic_machine(LOW, HIGH, irqfd_eventfds=eventfds)
        self.mem = m.memory
        rig(m, "-s 0,hostbridge", direct_boot=False)
        # locking=off: where the block layer locks images (see open_backend)
        conf = f"{self.path},ser=FUZZ,locking=off" + (",ro" if ro else "")
        (self.fn,) = (fn,) = rig(m, f"-s {SLOT},virtio-blk,{conf}", direct_boot=False)
        _synchronous_workers(fn)
        self.bars = [fn.config.get(0x10 + 4 * i, 4) for i in range(6)]
        self.drv = Driver(m, SLOT, msix=False, ring_base=RINGS)
        self.found = (dict(self.drv.regions), self.drv.io, self.drv.notify_mult)
        self.nq = len(fn.queues)

    def close(self):
        machines.teardown(self.m)

    # -- guest helpers ---------------------------------------------------------------------
    def bar_addr(self, index: int) -> int:
        """Where BAR `index` is programmed now (the harness's bookkeeping; the guest would
        remember what it wrote)."""
        return self.fn.bar_address(index)

    def check_image(self, where: str) -> None:
        check_image(self.path, self.image, self.ro, where)


def one_input(data: bytes) -> None:
    p = Provider(data)
    flags = p.u8()
    with Observer() as obs:
        rig = None
        try:
            rig = Rig(ro=bool(flags & 1), eventfds=bool(flags & 2))
            obs.check("set-up")
            for step in range(MAX_OPS):
                if p.done():
                    break
                _op(rig, p, p.u8() % N_OPS)
                pump(rig.fn)
                obs.check(f"step {step}")
            rig.check_image("after the operations")
            _recover(rig)
            obs.check("recovery")
        finally:
            if rig is not None:
                rig.close()


def _op(rig: Rig, p: Provider, op: int) -> None:
    m, drv, mem = rig.m, rig.drv, rig.mem
    if op == OP_INIT:
        bits = p.u8()
        chosen = p.u16() if bits & 0x80 else 0xFFFF
        features = sum(bit(b) for i, b in enumerate(FEATURE_BITS) if chosen >> i & 1)
        if bits & 0x40:
            features = p.u64()
        drv.legacy = bool(bits & 1)
        drv.use_msix = bool(bits & 2)
        if not bits & 4:
            features &= ~bit(F_RING_EVENT_IDX)
        if not bits & 8:
            features &= ~bit(F_RING_INDIRECT_DESC)
        where = (bits >> 4) & 3
        drv.ring_base = (machines.addr(p, mem) & ~0xFFF if where == 3
                         else (RINGS, LOW - 0x10000, FOUR_GIB)[where])
        qsize = 1 << (p.u8() % 9)
        try:
            drv.initialize(features, queue_size=qsize)
        except (RuntimeError, GuestMemoryError, KeyError, IndexError):
            pass                      # the driver gave up (refused features, rings off RAM)
    elif op == OP_REQUEST:
        _request(rig, p)
    elif op == OP_DESC:
        q = _queue(rig, p)
        if q is not None:
            table = q.desc if p.u8() & 3 else TABLES + 0x400 * (p.u8() % 8)
            i = p.u16() % max(q.size, 1)
            _write(mem, table + 16 * i, struct.pack("<QIHH", machines.addr(p, mem),
                                                    machines.length(p) & 0xFFFFFFFF,
                                                    p.u16(), p.u16()))
    elif op == OP_AVAIL:
        q = _queue(rig, p)
        if q is not None:
            if p.ConsumeBool():
                _write(mem, q.avail + 4 + 2 * (q.avail_idx % q.size), struct.pack("<H", p.u16()))
                q.avail_idx = (q.avail_idx + 1) & 0xFFFF
            else:
                q.avail_idx = p.u16()
            _write(mem, q.avail + 2, struct.pack("<H", q.avail_idx))
    elif op == OP_KICK:
        value = p.u16() % (rig.nq + 1) if p.u8() & 3 else p.u16()
        if p.ConsumeBool():
            m.io_write(rig.bar_addr(0) + 16, 2, value)
        else:
            notify = drv.regions.get(CFG_NOTIFY, 0)
            m.mmio_write(notify + drv.notify_mult * (value & 0xFF), p.PickValueInList(SIZES),
                         value)
    elif op == OP_BAR4:
        _access(m.mmio_read, m.mmio_write, rig.bar_addr(4) + (p.u16() % 0x4000), p)
    elif op == OP_BAR0:
        _access(m.io_read, m.io_write, rig.bar_addr(0) + p.u8() % 64, p)
    elif op == OP_CFG:
        reg = p.u8()
        size = p.PickValueInList((1, 2, 4))
        if p.ConsumeBool():
            machines.cfg_write(m, SLOT, reg, size, p.u32() & ((1 << 8 * size) - 1))
        else:
            machines.cfg_read(m, SLOT, reg, size)
    elif op == OP_MSIX:
        table = rig.bar_addr(1)
        off = (p.u8() % 0x90) * 4 if p.u8() & 3 else p.u16() % 0x1000
        size = p.PickValueInList(SIZES)
        m.mmio_write(table + off, size, p.u64() & ((1 << 8 * size) - 1))
        if p.ConsumeBool() and drv.msix_cap:   # and MSI-X control (enable, function mask)
            machines.cfg_write(m, SLOT, drv.msix_cap + 2, 2, p.u16())
    elif op == OP_STATUS:
        drv.set_status(p.u8() if p.u8() & 3 else 0)
    elif op == OP_RAM:
        _write(mem, machines.addr(p, mem), p.ConsumeBytes(p.u8() % 65))


def _access(read, write, address, p: Provider) -> None:
    size = p.PickValueInList(SIZES)
    if p.ConsumeBool():
        write(address, size, p.u64() & ((1 << 8 * size) - 1))
    else:
        read(address, size)


def _write(mem, gpa: int, data: bytes) -> None:
    if mem.contains(gpa, len(data)):
        mem.write(gpa, data)


def _queue(rig: Rig, p: Provider):
    qs = rig.drv.queues
    if not qs:
        return None
    return qs[p.u8() % len(qs)]


def _request(rig: Rig, p: Provider) -> None:
    """A well-formed request on a queue the driver set up (header, data, status), kicked."""
    q = _queue(rig, p)
    if q is None:
        return
    mem = rig.mem
    slot = p.u8() % 8
    bits = p.u8()
    rtype = p.PickValueInList(TYPES)
    sector = p.PickValueInList(SECTOR_CHOICES)
    n = p.PickValueInList(DATA_LENS)
    hdr = HDRS + 16 * slot
    _write(mem, hdr, struct.pack("<IIQ", rtype, 0, sector))
    base = (FOUR_GIB + 0x8000 * (slot % 4)) if bits & 16 else DATA + 0x8000 * slot
    to_device = rtype in (T_OUT, T_DISCARD, T_WRITE_ZEROES)
    if n and to_device:
        if rtype == T_OUT:
            _write(mem, base, bytes([0xA0 + slot]) * n)
        else:                         # discard / write-zeroes segments
            seg = struct.pack("<QII", p.PickValueInList(SECTOR_CHOICES), p.u8(), p.u8() & 1)
            _write(mem, base, seg * (n // 16 + 1))
    bufs = [(hdr, 8, False), (hdr + 8, 8, False)] if bits & 8 else [(hdr, 16, False)]
    split = 1 + (bits & 3)
    if n:
        step = -(-n // split)
        for off in range(0, n, step):
            bufs.append((base + off, min(step, n - off), not to_device))
    bufs.append((STATUS + slot, 1, True))
    if len(bufs) > len(q.free):
        return                        # the driver's table is full: nothing to add
    try:
        rig.drv.submit(q.index, bufs, indirect_at=TABLES + 0x400 * slot if bits & 4 else None)
    except GuestMemoryError:
        return
    rig.drv.kick(q.index)


def _recover(rig: Rig) -> None:
    """Put the BARs back, reset and bring the device up again: a READ must work."""
    m, fn, drv = rig.m, rig.fn, rig.drv
    for i, v in enumerate(rig.bars):
        if fn.config.get(0x10 + 4 * i, 4) != v:
            machines.cfg_write(m, SLOT, 0x10 + 4 * i, 4, v)
    if fn.command & 7 != 7:
        machines.cfg_write(m, SLOT, 0x04, 2, fn.command | 7)
    drv.regions, drv.io, drv.notify_mult = dict(rig.found[0]), rig.found[1], rig.found[2]
    drv.legacy = drv.use_msix = False
    drv.ring_base = RINGS
    drv.set_status(0)
    pump(rig.fn)
    try:
        drv.initialize(bit(F_FLUSH), queue_size=16)
    except RuntimeError as e:
        raise Finding(f"after a reset the device refuses a plain bring-up: {e}") from None
    if drv.status() & STATUS_NEEDS_RESET:
        raise Finding("NEEDS_RESET right after a reset and bring-up")
    mem = rig.mem
    sector = 5
    mem.write(HDRS, struct.pack("<IIQ", T_IN, 0, sector))
    mem.write(STATUS, b"\xee")
    mem.fill(DATA, 512, 0)
    drv.submit(0, [(HDRS, 16, False), (DATA, 512, True), (STATUS, 1, True)])
    drv.kick(0)
    pump(rig.fn)
    done = drv.queues[0].reap()
    if done != [(done[0][0] if done else 0, 513)] or mem.read(STATUS, 1)[0] != S_OK:
        raise Finding(f"after a reset a READ does not complete: used {done}, status "
                      f"{mem.read(STATUS, 1)[0]:#x}, device status {drv.status():#x}")
    rig.check_image("after recovery")
    with open(rig.path, "rb") as f:
        f.seek(sector * 512)
        expected = f.read(512)
    if mem.read(DATA, 512) != expected:
        raise Finding("after a reset a READ returns other bytes than the image has")
