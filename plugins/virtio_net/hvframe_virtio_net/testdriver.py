"""A virtio-net driver in Python, for tests and benchmarks of the device without a guest.

It drives a virtio-net function on a machine's dispatch core through
hvframe.virtio.harness.VirtioPciDriver (PCI configuration, BAR accesses, rings in guest RAM)
and adds what a network driver does: receive buffers posted (one per chain, mergeable or
not), frames sent after a virtio_net_hdr (header and frame in separate descriptors, as
Linux's driver lays them out without ANY_LAYOUT), frames received (merged over num_buffers
used entries), control commands.

    nd = NetDriver(machine, slot=3, features=...)
    nd.post_rx(0, 64)
    nd.send(0, frame)
    hdr, frame = nd.recv(0)

`StreamPair` is a NetBackend on a socketpair with BE32_LENGTH framing, the test's end of
which speaks the same framing (send_frame / recv_frame).
"""
from __future__ import annotations

import os
import select
import socket
import struct
import time

from hvframe.virtio.device import F_VERSION_1, bit
from hvframe.virtio.harness import VirtioPciDriver
from hvframe.layout import struct_of

from . import layout as L
from .backend import Framing, NetBackend, Offloads

HDR = struct_of(L.VirtioNetHdr)


class NetDriver:
    def __init__(self, machine, slot: int, features: int, *, legacy: bool = False,
                 rx_buf_size: int = 2048, queue_size: int | None = None):
        self.m = machine
        self.mem = machine.memory
        self.drv = VirtioPciDriver(machine, slot, legacy=legacy)
        self.dev = self.drv.fn.device
        self.features = self.drv.initialize(features, queue_size)
        self.mrg = bool(self.features & bit(L.F_MRG_RXBUF))
        self.hdr_len = (L.HDR_SIZE if self.mrg or self.features & bit(F_VERSION_1)
                        else L.LEGACY_HDR_SIZE)
        self.pairs = self.dev.pairs
        self.rx_buf_size = rx_buf_size
        # The control queue: after every pair with F_MQ, at 2 without (virtio 1.2, 5.1.2).
        self.ctrl_q = 2 * self.pairs if self.features & bit(L.F_MQ) else 2
        self._next = self.drv.data_base
        self._rx_addr: dict[tuple[int, int], int] = {}     # (queue, head) -> buffer
        self._used: dict[int, list[tuple[int, int]]] = {}   # queue -> reaped, not consumed
        self._tx_slot = {}
        self._tx_area = {}
        qsize = self.drv.queues[0].size
        for p in range(self.pairs):
            self._tx_area[2 * p + 1] = self.alloc(qsize * 0x11000)
            self._tx_slot[2 * p + 1] = 0
        self._ctrl_area = self.alloc(0x10000)

    def alloc(self, size: int) -> int:
        addr = self._next
        self._next = (addr + size + 0xFFF) & ~0xFFF
        if self._next > self.mem.size:
            raise MemoryError("test driver: guest RAM used up")
        return addr

    def config(self, offset: int, size: int) -> int:
        return self.drv.config_read(offset, size)

    # -- receive --------------------------------------------------------------------------
    def post_rx(self, pair: int, count: int, size: int | None = None, *,
                addrs: list[int] | None = None) -> None:
        """Post `count` new receive buffers of `size` bytes (or the buffers at `addrs`)."""
        q = 2 * pair
        size = size or self.rx_buf_size
        dq = self.drv.queues[q]
        for addr in addrs if addrs is not None else [self.alloc(size) for _ in range(count)]:
            head = dq.add([(addr, size, True)])
            self._rx_addr[(q, head)] = (addr, size)
        dq.publish()
        self.drv.kick(q)

    def _take(self, q: int, got: list[tuple[int, int]]) -> list[tuple[int, int, object]]:
        # The head goes back on the free list when reaped: its buffer is looked up now.
        return [(head, written, self._rx_addr.pop((q, head), None)) for head, written in got]

    def _reap(self, q: int, count: int, timeout: float) -> list[tuple[int, int, object]]:
        have = self._used.setdefault(q, [])
        if len(have) < count:
            have += self._take(q, self.drv.wait_used(q, count - len(have), timeout))
        out, self._used[q] = have[:count], have[count:]
        return out

    def recv(self, pair: int, timeout: float = 10.0) -> tuple[tuple, bytes]:
        """The next received frame: (header fields, frame bytes). Its buffers are posted
        again (same size)."""
        q = 2 * pair
        (head, written, (addr, size)), = self._reap(q, 1, timeout)
        addrs = [addr]
        data = self.mem.read(addr, written)
        fields = HDR.unpack(data[:L.HDR_SIZE] if self.hdr_len == L.HDR_SIZE
                            else data[:L.LEGACY_HDR_SIZE] + b"\1\0")
        body = [data[self.hdr_len:]]
        nbuf = fields[-1] if self.mrg else 1
        if nbuf > 1:
            for head, written, (addr, _) in self._reap(q, nbuf - 1, timeout):
                addrs.append(addr)
                body.append(self.mem.read(addr, written))
        self.post_rx(pair, 0, size, addrs=addrs)
        return fields, b"".join(body)

    def rx_pending(self, pair: int) -> int:
        """Completed receive buffers not yet taken by recv()."""
        q = 2 * pair
        have = self._used.setdefault(q, [])
        have += self._take(q, self.drv.queues[q].reap())
        return len(have)

    # -- transmit -------------------------------------------------------------------------
    def send(self, pair: int, frame: bytes, *, flags: int = 0, gso_type: int = 0,
             hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0, csum_offset: int = 0,
             wait: bool = True, pieces: int = 1, indirect: bool = False,
             kick: bool = True) -> None:
        """One frame after its header; `pieces` splits the frame over that many buffers,
        `indirect` puts them in an indirect table; kick=False publishes it unannounced."""
        q = 2 * pair + 1
        dq = self.drv.queues[q]
        slot = self._tx_slot[q]
        self._tx_slot[q] = (slot + 1) % dq.size
        base = self._tx_area[q] + slot * 0x11000
        hdr = HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)
        self.mem.write(base, hdr[:self.hdr_len])
        self.mem.write(base + 0x40, frame)
        bufs = [(base, self.hdr_len, False)]
        step = max(1, -(-len(frame) // pieces))
        for off in range(0, len(frame), step):
            bufs.append((base + 0x40 + off, min(step, len(frame) - off), False))
        dq.add(bufs, indirect_at=base + 0x10800 if indirect else None)
        dq.publish()
        if kick:
            self.drv.kick(q)
        if wait:
            self._reap(q, 1, 10.0)

    def wait_sent(self, pair: int, count: int, timeout: float = 10.0) -> None:
        self._reap(2 * pair + 1, count, timeout)

    # -- control --------------------------------------------------------------------------
    def ctrl(self, cls: int, cmd: int, data: bytes = b"") -> int:
        """One control command; the device's ack (CTRL_OK / CTRL_ERR)."""
        base = self._ctrl_area
        self.mem.write(base, bytes([cls, cmd]) + data)
        self.mem.write(base + 0x8000, b"\xee")
        dq = self.drv.queues[self.ctrl_q]
        dq.add([(base, 2 + len(data), False), (base + 0x8000, 1, True)])
        dq.publish()
        self.drv.kick(self.ctrl_q)
        self._reap(self.ctrl_q, 1, 10.0)
        return self.mem.read(base + 0x8000, 1)[0]


class StreamPair(NetBackend):
    """A NetBackend on one end of a socketpair (BE32_LENGTH); the test holds the other."""

    framing = Framing.BE32_LENGTH

    def __init__(self, max_frame: int = 65535 + 14, sndbuf: int | None = None):
        self.max_frame = max_frame
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if sndbuf:
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        a.setblocking(False)
        self.dev_end, self.peer = a, b
        self.acked: list[Offloads] = []
        self.gone = False
        self.pairs_set: list[int] = []
        self._buf = b""
        self._old: list[socket.socket] = []

    def reconnect(self) -> None:
        """A new connection (as a reconnecting stream backend makes): new descriptors, the
        link up again. The old ends stay open until close(), so no number is reused."""
        self._old += [self.dev_end, self.peer]
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setblocking(False)
        self.dev_end, self.peer = a, b
        self._buf = b""
        self.gone = False

    def queue_fds(self) -> list[int]:
        return [self.dev_end.fileno()]

    def capabilities(self) -> Offloads:
        return Offloads()

    def set_offloads(self, acked: Offloads) -> None:
        self.acked.append(acked)

    def set_queue_pairs(self, n: int) -> None:
        self.pairs_set.append(n)

    def link_up(self) -> bool:
        return not self.gone

    def peer_gone(self) -> None:
        self.gone = True

    def close(self) -> None:
        for s in [self.dev_end, self.peer] + self._old:
            s.close()

    # -- the test's end -------------------------------------------------------------------
    def send_frame(self, frame: bytes) -> None:
        self.peer.sendall(struct.pack(">I", len(frame)) + frame)

    def recv_frame(self, timeout: float = 10.0) -> bytes:
        end = time.monotonic() + timeout
        while True:
            if len(self._buf) >= 4:
                n = struct.unpack(">I", self._buf[:4])[0]
                if len(self._buf) >= 4 + n:
                    frame, self._buf = self._buf[4:4 + n], self._buf[4 + n:]
                    return frame
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the device")
            r, _, _ = select.select([self.peer], [], [], left)
            if r:
                data = self.peer.recv(1 << 20)
                if not data:
                    raise EOFError("device end closed")
                self._buf += data


def tap_peer_socket(ifname: str, netns_fd: int | None = None) -> socket.socket:
    """An AF_PACKET socket bound to `ifname` (in the namespace `netns_fd`, if given): what
    the far side of a tap sends and receives, byte for byte."""
    def make():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind((ifname, 0))
        return s
    if netns_fd is None:
        return make()
    return in_netns(netns_fd, make)


def in_netns(netns_fd: int, fn):
    """Run fn() on a thread that entered the network namespace `netns_fd` (setns is per
    thread); sockets it makes stay in that namespace."""
    import ctypes
    import threading
    libc = ctypes.CDLL(None, use_errno=True)
    result = {}

    def run():
        if libc.setns(netns_fd, 0x40000000) != 0:      # CLONE_NEWNET
            result["error"] = OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            return
        try:
            result["value"] = fn()
        except BaseException as e:   # noqa: BLE001 - handed to the caller
            result["error"] = e
    t = threading.Thread(target=run, name="netns")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
