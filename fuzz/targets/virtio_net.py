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

import struct
from contextlib import closing

from fuzzlib import machines, virtio
from fuzzlib.observe import Finding, Observer
from fuzzlib.provider import Provider, operations
from fuzzlib.virtio import RINGS, TABLES

from hvframe.memory import FOUR_GIB, GuestMemoryError
from hvframe.pci.bus import attach, ensure_pci_bus
from hvframe.testing import rig
from hvframe.virtio.device import bit
from hvframe.virtio.pci import VirtioPciFunction
from hvframe_virtio_net import layout as L
from hvframe_virtio_net.testdriver import StreamPair
from hvframe_virtio_net.virtio_net import VirtioNet

LOW, HIGH = 2 << 20, 256 << 10
SLOT = 3
PAIRS = 2
MAX_FRAME = 9000
MAC = bytes.fromhex("020000aabb01")
HDRS, CTRL, DATA = 0x178000, 0x17C000, 0x180000    # data: 0x4000 a slot, 16 slots
FEATURE_BITS = (L.F_CSUM, L.F_GUEST_CSUM, L.F_CTRL_GUEST_OFFLOADS, L.F_MTU, L.F_MAC,
                L.F_MRG_RXBUF, L.F_STATUS, L.F_CTRL_VQ, L.F_CTRL_RX, L.F_MQ,
                L.F_CTRL_MAC_ADDR, 28, 29, 32, 27, L.F_HOST_TSO4)
FRAME_LENS = (0, 13, 14, 60, 1514, 4000, MAX_FRAME, MAX_FRAME + 1)
BUF_LENS = (0, 1, 10, 12, 64, 1526, 4096, 0x4000)
GSO_TYPES = (L.GSO_NONE, L.GSO_TCPV4, L.GSO_UDP, L.GSO_TCPV6, L.GSO_TCPV4 | L.GSO_ECN, 0x7F)
MAX_OPS = 48
(OP_INIT, OP_TX, OP_RX, OP_CTRL, OP_DESC, OP_AVAIL, OP_KICK, OP_PEER, OP_RAW_STREAM,
 OP_HANGUP, OP_BAR4, OP_BAR0, OP_CFG, OP_STATUS, OP_RAM) = range(15)
N_OPS = 15


class Rig(virtio.VirtioRig):
    slot = SLOT
    pump_rounds = 6
    ready = staticmethod(virtio.waits_ready)   # backend input, room to write

    def __init__(self, eventfds: bool):
        self.m = m = machines.synthetic_machine(LOW, HIGH, irqfd_eventfds=eventfds)
        self.mem = m.memory
        rig(m, "-s 0,hostbridge", direct_boot=False)
        self.backend = StreamPair(max_frame=MAX_FRAME, sndbuf=16384)
        self.backend.peer.setblocking(False)
        self.dev = VirtioNet(self.backend, mac=MAC, queue_pairs=PAIRS, mtu=1500,
                             queue_size=64)
        self.fn = fn = VirtioPciFunction(self.dev, name="virtio-net fuzz")
        virtio.synchronous_workers(fn)
        options = {"pci.address": (0, SLOT, 0)}
        attach(m, fn, options)
        m.add_device(fn)
        ensure_pci_bus(m).assign_bars()
        self.drive()
        self.rx_sizes = {}            # (queue, head) -> writable bytes posted
        self.stream = b""
        self.hung_up = False
        self.unframed = False         # the peer sent raw bytes: frames after are garbage

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
    with Observer() as obs, closing(Rig(eventfds=bool(flags & 2))) as rig:
        obs.check("set-up")
        for step, op in operations(p, MAX_OPS, N_OPS):
            _op(rig, p, op)
            rig.pump()
            rig.drain_peer()
            rig.check_rx_used()
            obs.check(f"step {step}")
        _recover(rig)
        obs.check("recovery")


def _queue(rig: Rig, p: Provider, want: int):
    """A receive (want 0) or transmit (want 1) queue of a pair, or the control queue."""
    qs = rig.drv.queues
    if not qs:
        return None
    i = p.u8() % len(qs)
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
    OPERATIONS[op](rig, p)


def _init(rig: Rig, p: Provider) -> None:
    b = virtio.BringUp.decode(p, rig.mem, FEATURE_BITS, (RINGS, LOW - 0x20000, FOUR_GIB), 7)
    rig.rx_sizes.clear()
    b.run(rig.drv)


def _tx(rig: Rig, p: Provider) -> None:
    """A frame with any header, split over pieces, on a transmit queue."""
    q = _queue(rig, p, want=1)
    slot = p.u8() % 16
    hflags, gso = p.u8() & 7, p.PickValueInList(GSO_TYPES)
    hdr = struct.pack("<BBHHHHH", hflags, gso, p.u16(), p.u16(), p.u16(), p.u16(), 0)
    n = p.PickValueInList(FRAME_LENS)
    pieces = 1 + p.u8() % 4
    hlen = p.PickValueInList((12, 10, 6, 0))
    if q is None:
        return
    mem = rig.mem
    machines.ram_write(mem, HDRS + 16 * slot, hdr)
    base = DATA + 0x4000 * slot
    n = min(n, 0x4000 * (16 - slot))
    machines.ram_write(mem, base, _frame(n, slot))
    bufs = [(HDRS + 16 * slot, hlen, False)] if hlen else []
    if n:
        step = -(-n // pieces)
        bufs += [(base + o, min(step, n - o), False) for o in range(0, n, step)]
    if _submit(rig, q, bufs, slot if p.ConsumeBool() else None) is not None:
        rig.drv.kick(q.index)


def _rx(rig: Rig, p: Provider) -> None:
    """Receive buffers of any size, writable or not, on a receive queue."""
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
    rig.drv.kick(q.index)


def _ctrl(rig: Rig, p: Provider) -> None:
    """A control command with any class, command and body."""
    drv = rig.drv
    q = drv.queues[-1] if drv.queues else None
    cls, cmd = p.u8() % 8, p.u8() % 4
    body = p.ConsumeBytes(p.u8() % 40)
    if q is None:
        return
    machines.ram_write(rig.mem, CTRL, bytes([cls, cmd]) + body)
    bufs = [(CTRL, 2 + len(body), False), (CTRL + 0x800, 1, True)]
    if _submit(rig, q, bufs) is not None:
        drv.kick(q.index)


def _peer(rig: Rig, p: Provider) -> None:
    """The peer sends a frame to our MAC, broadcast, multicast or someone else."""
    n = p.PickValueInList(FRAME_LENS)
    dst = p.PickValueInList((MAC, b"\xff" * 6, bytes.fromhex("01005e000001"),
                             bytes.fromhex("020000999999")))
    f = (dst + _frame(max(n, 6) - 6, n))[:n]
    _peer_send(rig, struct.pack(">I", len(f)) + f)


def _raw_stream(rig: Rig, p: Provider) -> None:
    _peer_send(rig, p.ConsumeBytes(p.u8() % 24), framed=False)


def _hangup(rig: Rig, p: Provider) -> None:
    if p.u8() & 3 == 0 and not rig.hung_up:
        rig.backend.peer.close()
        rig.hung_up = True


def _peer_send(rig: Rig, data: bytes, framed: bool = True) -> None:
    if rig.hung_up or rig.unframed:
        return
    try:
        sent = rig.backend.peer.send(data)
    except (BlockingIOError, OSError):
        return                        # the device holds back: the peer waits
    if sent < len(data) or not framed:
        rig.unframed = True           # the stream is out of step from here on


def _recover(rig: Rig) -> None:
    """Put the BARs back, reset and bring the device up again: a frame goes out and one
    comes in, or the link reads down when the peer hung up."""
    drv, mem = rig.drv, rig.mem
    rig.recover(bit(L.F_MRG_RXBUF) | bit(L.F_STATUS) | bit(L.F_MAC))
    rig.pump()                        # the receive queue looks at its descriptor
    if rig.hung_up or rig.backend.gone:
        if drv.config_read(6, 2) & L.S_LINK_UP:
            raise Finding("the peer hung up but the link reads up")
        return
    f = MAC + _frame(60, 99)
    machines.ram_write(mem, HDRS, bytes(12))
    machines.ram_write(mem, DATA, f)
    drv.submit(1, [(HDRS, 12, False), (DATA, len(f), False)])
    drv.kick(1)
    rig.pump()
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
    rig.pump()
    g = MAC + _frame(100, 7)
    wire = struct.pack(">I", len(g)) + g
    for _ in range(200):                # frames the peer sent earlier may come first
        if wire:
            try:                        # (and may fill the socket until they are read)
                wire = wire[rig.backend.peer.send(wire):]
            except BlockingIOError:
                pass
        rig.pump()
        # Heads are free again once reaped: look every buffer up before posting any.
        done = [(bufs.pop(h), written) for h, written in drv.queues[0].reap()]
        for i, written in done:
            addr = DATA + 0x8000 + 0x1000 * i
            if written > 12 and mem.read(addr + 12, written - 12) == g:
                return
            bufs[drv.submit(0, [(addr, 0x1000, True)])] = i
            drv.kick(0)
    raise Finding("after a reset no frame comes in")


OPERATIONS = {OP_INIT: _init, OP_TX: _tx, OP_RX: _rx, OP_CTRL: _ctrl, OP_DESC: virtio.op_desc,
              OP_AVAIL: virtio.op_avail, OP_KICK: virtio.op_kick, OP_PEER: _peer,
              OP_RAW_STREAM: _raw_stream, OP_HANGUP: _hangup, OP_BAR4: virtio.op_bar4,
              OP_BAR0: virtio.op_bar0, OP_CFG: virtio.op_cfg, OP_STATUS: virtio.op_status,
              OP_RAM: virtio.op_ram}
