"""Fuzz target: virtio-net through its PCI transport and native data path, driven like a
guest, with a byte-stream peer (BE32_LENGTH framing on a socketpair) that also misbehaves.

A SyntheticMachine (guarded RAM: [0, 2 MiB) and [4 GiB, 4 GiB + 256 KiB)) with a host bridge
and virtio-net at 00:03.0 (two queue pairs) on hvframe_virtio_net.testdriver.StreamPair. The
queue workers are replaced by a synchronous pump: after each operation the target serves
every queue whose doorbell rang, whose worker was woken, or whose own wait
(VirtioNet.queue_waits: backend input, room to write) is ready -- the worker's loop body,
native cycles included -- so a run is deterministic and an exception that would kill a
worker surfaces here.

Operations: a driver bring-up (legacy or modern, MSI-X or INTx, any features, queue size,
ring placement), transmit chains with any header (offload flags, GSO types, checksum
offsets) and frame length split over pieces, receive buffers of any size (writable or not,
through indirect tables), control commands with any class, command and body, raw
descriptors and avail entries, kicks, the peer sending frames, raw stream bytes (lengths
beyond max_frame, runts, partial frames) or hanging up, BAR0/BAR4/MSI-X/configuration
accesses, device status writes and raw RAM bytes.

Invariants: no handler exception, no hvframe ERROR log, no exception out of the service
loop; what the peer receives is always a well-framed stream of frames between 14 bytes and
max_frame long; no receive buffer comes back with more written than it holds; at the end, after a reset and a fresh bring-up, a frame goes out and one comes in
(or, if the peer hung up, the link reads down).
"""
if __name__ == "__main__":
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fuzzlib.runner import run_target
    run_target(os.path.abspath(__file__))
    raise SystemExit(0)

import select
import struct

from fuzzlib import machines
from fuzzlib.observe import Finding, Observer
from fuzzlib.provider import Provider

from hvframe.memory import FOUR_GIB, GuestMemoryError
from hvframe.pci.bus import attach, ensure_pci_bus
from hvframe.testing import rig
from hvframe.virtio.device import STATUS_NEEDS_RESET, bit
from hvframe.testing.virtio import VirtioPciDriver
from hvframe.virtio.pci import CFG_NOTIFY, VirtioPciFunction
from hvframe_virtio_net import layout as L
from hvframe_virtio_net.testdriver import StreamPair
from hvframe_virtio_net.virtio_net import VirtioNet

LOW, HIGH = 2 << 20, 256 << 10
SLOT = 3
PAIRS = 2
MAX_FRAME = 9000
MAC = bytes.fromhex("020000aabb01")
RINGS = 0x100000
TABLES = 0x170000                 # indirect tables, 0x400 a slot
HDRS, CTRL, DATA = 0x178000, 0x17C000, 0x180000    # data: 0x4000 a slot, 16 slots
FEATURE_BITS = (L.F_CSUM, L.F_GUEST_CSUM, L.F_CTRL_GUEST_OFFLOADS, L.F_MTU, L.F_MAC,
                L.F_MRG_RXBUF, L.F_STATUS, L.F_CTRL_VQ, L.F_CTRL_RX, L.F_MQ,
                L.F_CTRL_MAC_ADDR, 28, 29, 32, 27, L.F_HOST_TSO4)
FRAME_LENS = (0, 13, 14, 60, 1514, 4000, MAX_FRAME, MAX_FRAME + 1)
BUF_LENS = (0, 1, 10, 12, 64, 1526, 4096, 0x4000)
GSO_TYPES = (L.GSO_NONE, L.GSO_TCPV4, L.GSO_UDP, L.GSO_TCPV6, L.GSO_TCPV4 | L.GSO_ECN, 0x7F)
SIZES = (1, 2, 4, 8)
MAX_OPS = 48
PUMP_ROUNDS = 6
(OP_INIT, OP_TX, OP_RX, OP_CTRL, OP_DESC, OP_AVAIL, OP_KICK, OP_PEER, OP_RAW_STREAM,
 OP_HANGUP, OP_BAR4, OP_BAR0, OP_CFG, OP_STATUS, OP_RAM) = range(15)
N_OPS = 15


class _SyncWorker:
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


def _ready(waits) -> bool:
    if not waits:
        return False
    p = select.poll()
    for fd, ev in waits:
        p.register(fd, ev)
    return bool(p.poll(0))


def pump(fn) -> None:
    dev = fn.device
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
            if rang or _ready(dev.queue_waits(i)):
                todo.append(q)
        if not todo:
            return
        for q in todo:
            fn.service_queue(q)


class Driver(VirtioPciDriver):
    _found = None

    def _find_regions(self) -> None:
        if Driver._found is None:
            super()._find_regions()
            Driver._found = (dict(self.regions), self.notify_mult, self.msix_cap, self.io)
        regions, self.notify_mult, self.msix_cap, self.io = Driver._found
        self.regions = dict(regions)


class Rig:
    def __init__(self, eventfds: bool):
        self.m = m = machines.synthetic_machine(LOW, HIGH, irqfd_eventfds=eventfds)
        self.mem = m.memory
        rig(m, "-s 0,hostbridge", direct_boot=False)
        self.backend = StreamPair(max_frame=MAX_FRAME, sndbuf=16384)
        self.backend.peer.setblocking(False)
        self.dev = VirtioNet(self.backend, mac=MAC, queue_pairs=PAIRS, mtu=1500,
                             queue_size=64)
        self.fn = fn = VirtioPciFunction(self.dev, name="virtio-net fuzz")
        _synchronous_workers(fn)
        options = {"pci.address": (0, SLOT, 0)}
        attach(m, fn, options)
        m.add_device(fn)
        ensure_pci_bus(m).assign_bars()
        self.bars = [fn.config.get(0x10 + 4 * i, 4) for i in range(6)]
        self.drv = Driver(m, SLOT, msix=False, ring_base=RINGS)
        self.found = (dict(self.drv.regions), self.drv.io, self.drv.notify_mult)
        self.nq = len(fn.queues)
        self.rx_sizes = {}            # (queue, head) -> writable bytes posted
        self.stream = b""
        self.hung_up = False
        self.unframed = False         # the peer sent raw bytes: frames after are garbage

    def close(self):
        machines.teardown(self.m)

    def bar_addr(self, index: int) -> int:
        return self.fn.bar_address(index)

    def drain_peer(self) -> None:
        """Read what the device sent; the framing must hold."""
        if self.hung_up:
            return
        while True:
            try:
                data = self.backend.peer.recv(1 << 16)
            except BlockingIOError:
                break
            if not data:
                break
            self.stream += data
        while len(self.stream) >= 4:
            n = struct.unpack(">I", self.stream[:4])[0]
            if n < L.ETH_HLEN or n > MAX_FRAME:
                raise Finding(f"the device sent a frame of {n} bytes")
            if len(self.stream) < 4 + n:
                break
            self.stream = self.stream[4 + n:]

    def check_rx_used(self) -> None:
        for q in range(0, 2 * PAIRS, 2):
            if q >= len(self.drv.queues):
                return
            dq = self.drv.queues[q]
            for head, written in dq.reap():
                size = self.rx_sizes.pop((q, head), None)
                if size is not None and written > size:
                    raise Finding(f"receive buffer of {size} bytes came back with {written}")


def one_input(data: bytes) -> None:
    p = Provider(data)
    flags = p.u8()
    with Observer() as obs:
        rig = None
        try:
            rig = Rig(eventfds=bool(flags & 2))
            obs.check("set-up")
            for step in range(MAX_OPS):
                if p.done():
                    break
                _op(rig, p, p.u8() % N_OPS)
                pump(rig.fn)
                rig.drain_peer()
                rig.check_rx_used()
                obs.check(f"step {step}")
            _recover(rig)
            obs.check("recovery")
        finally:
            if rig is not None:
                rig.close()


def _write(mem, gpa: int, data: bytes) -> None:
    if mem.contains(gpa, len(data)):
        mem.write(gpa, data)


def _queue(rig: Rig, p: Provider, want=None):
    qs = rig.drv.queues
    if not qs:
        return None
    i = p.u8() % len(qs)
    if want is not None:
        i = (i // 2) * 2 + want if i < 2 * PAIRS else i
        if i >= len(qs):
            return None
    return qs[i]


def _frame(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) & 0xFF for i in range(n))


def _submit(rig: Rig, q, bufs, indirect_slot=None) -> int | None:
    if len(bufs) > len(q.free) or not bufs:
        return None
    try:
        return rig.drv.submit(q.index, bufs, indirect_at=None if indirect_slot is None
                              else TABLES + 0x400 * indirect_slot)
    except GuestMemoryError:
        return None


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
        where = (bits >> 4) & 3
        drv.ring_base = (machines.addr(p, mem) & ~0xFFF if where == 3
                         else (RINGS, LOW - 0x20000, FOUR_GIB)[where])
        qsize = 1 << (p.u8() % 7)
        rig.rx_sizes.clear()
        try:
            drv.initialize(features, queue_size=qsize)
        except (RuntimeError, GuestMemoryError, KeyError, IndexError):
            pass
    elif op == OP_TX:
        q = _queue(rig, p, want=1)
        slot = p.u8() % 16
        hflags, gso = p.u8() & 7, p.PickValueInList(GSO_TYPES)
        hdr = struct.pack("<BBHHHHH", hflags, gso, p.u16(), p.u16(), p.u16(), p.u16(), 0)
        n = p.PickValueInList(FRAME_LENS)
        pieces = 1 + p.u8() % 4
        hlen = p.PickValueInList((12, 10, 6, 0))
        if q is None:
            return
        _write(mem, HDRS + 16 * slot, hdr)
        base = DATA + 0x4000 * slot
        n = min(n, 0x4000 * (16 - slot))
        _write(mem, base, _frame(n, slot))
        bufs = [(HDRS + 16 * slot, hlen, False)] if hlen else []
        if n:
            step = -(-n // pieces)
            bufs += [(base + o, min(step, n - o), False) for o in range(0, n, step)]
        if _submit(rig, q, bufs, slot if p.ConsumeBool() else None) is not None:
            drv.kick(q.index)
    elif op == OP_RX:
        q = _queue(rig, p, want=0)
        count = 1 + p.u8() % 8
        size = p.PickValueInList(BUF_LENS)
        writable = p.u8() & 3 != 0
        high = p.ConsumeBool()
        if q is None:
            return
        for i in range(count):
            base = (FOUR_GIB + 0x4000 * (i % 16)) if high else DATA + 0x4000 * (i % 16)
            head = _submit(rig, q, [(base, size, writable)])
            if head is not None:
                rig.rx_sizes[(q.index, head)] = size if writable else 0
        drv.kick(q.index)
    elif op == OP_CTRL:
        q = drv.queues[-1] if drv.queues else None
        cls, cmd = p.u8() % 8, p.u8() % 4
        body = p.ConsumeBytes(p.u8() % 40)
        if q is None:
            return
        _write(mem, CTRL, bytes([cls, cmd]) + body)
        bufs = [(CTRL, 2 + len(body), False), (CTRL + 0x800, 1, True)]
        if _submit(rig, q, bufs) is not None:
            drv.kick(q.index)
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
    elif op == OP_PEER:
        n = p.PickValueInList(FRAME_LENS)
        dst = p.PickValueInList((MAC, b"\xff" * 6, bytes.fromhex("01005e000001"),
                                 bytes.fromhex("020000999999")))
        f = (dst + _frame(max(n, 6) - 6, n))[:n]
        _peer_send(rig, struct.pack(">I", len(f)) + f)
    elif op == OP_RAW_STREAM:
        _peer_send(rig, p.ConsumeBytes(p.u8() % 24), framed=False)
    elif op == OP_HANGUP:
        if p.u8() & 3 == 0 and not rig.hung_up:
            rig.backend.peer.close()
            rig.hung_up = True
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
    elif op == OP_STATUS:
        drv.set_status(p.u8() if p.u8() & 3 else 0)
    elif op == OP_RAM:
        _write(mem, machines.addr(p, mem), p.ConsumeBytes(p.u8() % 65))


def _peer_send(rig: Rig, data: bytes, framed: bool = True) -> None:
    if rig.hung_up or rig.unframed:
        return
    try:
        sent = rig.backend.peer.send(data)
    except (BlockingIOError, OSError):
        return                        # the device holds back: the peer waits
    if sent < len(data) or not framed:
        rig.unframed = True           # the stream is out of step from here on


def _access(read, write, address, p: Provider) -> None:
    size = p.PickValueInList(SIZES)
    if p.ConsumeBool():
        write(address, size, p.u64() & ((1 << 8 * size) - 1))
    else:
        read(address, size)


def _recover(rig: Rig) -> None:
    """Put the BARs back, reset and bring the device up again: a frame goes out and one
    comes in, or the link reads down when the peer hung up."""
    m, fn, drv, mem = rig.m, rig.fn, rig.drv, rig.mem
    for i, v in enumerate(rig.bars):
        if fn.config.get(0x10 + 4 * i, 4) != v:
            machines.cfg_write(m, SLOT, 0x10 + 4 * i, 4, v)
    if fn.command & 7 != 7:
        machines.cfg_write(m, SLOT, 0x04, 2, fn.command | 7)
    drv.regions, drv.io, drv.notify_mult = dict(rig.found[0]), rig.found[1], rig.found[2]
    drv.legacy = drv.use_msix = False
    drv.ring_base = RINGS
    drv.set_status(0)
    pump(fn)
    features = bit(L.F_MRG_RXBUF) | bit(L.F_STATUS) | bit(L.F_MAC)
    try:
        drv.initialize(features, queue_size=16)
    except RuntimeError as e:
        raise Finding(f"after a reset the device refuses a plain bring-up: {e}") from None
    if drv.status() & STATUS_NEEDS_RESET:
        raise Finding("NEEDS_RESET right after a reset and bring-up")
    pump(fn)                          # the receive queue looks at its descriptor
    if rig.hung_up or rig.backend.gone:
        if drv.config_read(6, 2) & L.S_LINK_UP:
            raise Finding("the peer hung up but the link reads up")
        return
    f = MAC + _frame(60, 99)
    _write(mem, HDRS, bytes(12))
    _write(mem, DATA, f)
    drv.submit(1, [(HDRS, 12, False), (DATA, len(f), False)])
    drv.kick(1)
    pump(fn)
    rig.stream = b""
    got = b""
    try:
        got = rig.backend.peer.recv(1 << 20)
    except BlockingIOError:
        pass
    if not got.endswith(struct.pack(">I", len(f)) + f):
        raise Finding("after a reset a frame does not go out")
    if rig.unframed:
        return                        # what comes in now is whatever the bytes said
    bufs = {}
    for i in range(8):
        bufs[drv.submit(0, [(DATA + 0x8000 + 0x1000 * i, 0x1000, True)])] = i
    drv.kick(0)
    pump(fn)
    g = MAC + _frame(100, 7)
    wire = struct.pack(">I", len(g)) + g
    for _ in range(200):                # frames the peer sent earlier may come first
        if wire:
            try:                        # (and may fill the socket until they are read)
                wire = wire[rig.backend.peer.send(wire):]
            except BlockingIOError:
                pass
        pump(fn)
        # Heads are free again once reaped: look every buffer up before posting any.
        done = [(bufs.pop(h), written) for h, written in drv.queues[0].reap()]
        for i, written in done:
            addr = DATA + 0x8000 + 0x1000 * i
            if written > 12 and mem.read(addr + 12, written - 12) == g:
                return
            bufs[drv.submit(0, [(addr, 0x1000, True)])] = i
            drv.kick(0)
    raise Finding("after a reset no frame comes in")
