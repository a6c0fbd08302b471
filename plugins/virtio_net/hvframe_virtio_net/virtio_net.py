"""virtio-net (virtio 1.2, section 5.1) on a NetBackend.

    -s N,virtio-net,BACKEND[,mac=..][,mtu=..][,queues=N]

Queues: receive 2i and transmit 2i+1 for each queue pair i, then the control queue (at 2 when
the driver did not take F_MQ: virtio 1.2, 5.1.2). Frames
travel natively (vnet.c, GIL released) on the transport's queue workers: vnet_tx_cycle and
vnet_rx_cycle serve the rings, read and write the backend descriptors, interrupt through the
irqfd gates. The workers sleep natively too (serve_sleeping, vnet_rx_run and vnet_tx_run):
from one kick, input or room on the backend to the next they need neither Python nor the
GIL; whatever changes what it must do (link, queue pairs, a reconnected backend) wakes it
back into Python through notify_queue. Python keeps the control queue, configuration, offload
negotiation, link state and errors.

What the receive path waits for follows its state (queue_waits): backend input while the
driver has buffers; the driver's kick (notifications on, ring re-checked) when it has none,
so a guest that posts no buffers while its peer floods costs nothing but the backend's own
queue (a tap drops beyond its queue length and counts it; a stream peer is held back). A
frame is never truncated: it fits the buffers it goes to or is dropped whole and counted.

Offloads: the device offers segmentation only where the backend can carry it (tap); CSUM is
offered everywhere (for a stream backend the device completes the checksum itself). The
backend is told exactly the receive offloads the driver acknowledged (set_offloads), again
on CTRL_GUEST_OFFLOADS.

Checkpoint (DeviceState): the record carries the MAC, the receive filter (promisc, allmulti,
the MAC tables), the receive offloads the driver acknowledged, the active queue pairs, the MTU
and the counters. The backend is not in it: the restored machine reopens it from the same
command line, and the record's offloads and queue pairs are applied to it again. Quiescing is
the transport's (no queue worker is inside a cycle, so no frame is half placed in guest
buffers) plus the rest of a frame half written to a stream backend, finished here.
"""
from __future__ import annotations

import os
import select
import struct
import threading
import time

from construct import Bytes, Flag, Int16ul, Int32ul, Int64ul, PrefixedArray, Struct

from hvframe import concurrency
from hvframe.core_native import bind as _bind
from hvframe.errors import ConfigError
from hvframe.snapshot.state import DeviceState
from hvframe.virtio.device import F_VERSION_1, VirtioDevice, WorkerFds, bit
from hvframe.virtio.native import CYCLE_IDLE, CYCLE_PYTHON, POLL_NS, queue_state
from hvframe.layout import struct_of

from . import layout as L
from .backend import Framing, NetBackend, Offloads
from ._native import ffi, lib

_bind(lib.vnet_bind)

_CTRL_HDR = struct_of(L.VirtioNetCtrlHdr)
_CTRL_MQ = struct_of(L.VirtioNetCtrlMq)
_CTRL_OFFLOADS = struct_of(L.VirtioNetCtrlOffloads)
GUEST_OFFLOAD_BITS = (bit(L.F_GUEST_CSUM) | bit(L.F_GUEST_TSO4) | bit(L.F_GUEST_TSO6)
                      | bit(L.F_GUEST_ECN) | bit(L.F_GUEST_UFO))
RX_BUF_SLACK = 64 << 10        # stream reads beyond one frame: fewer, larger reads
VLAN_HLEN = 4
LINK_POLL_S = 0.25             # how often a lost link is looked at again (reconnecting backends)
CTRL_MAX = 64 << 10            # the longest control command read (a MAC table of ~10,000)


_PORT_COUNTERS = ("rx_oversize", "rx_runt", "rx_truncated", "tx_partial")
_RXQ_COUNTERS = ("frames", "bytes", "drop_filtered", "drop_bad", "drop_too_big", "bad_buffers")
_TXQ_COUNTERS = ("frames", "bytes", "drop_bad", "drop_oversize", "drop_error", "drop_gone")
QUIESCE_TX_S = 2.0             # how long a half-written stream frame may take to finish

_MAC_TABLE = PrefixedArray(Int16ul, Bytes(6))
# The checkpoint record (DeviceState, version 1).
VIRTIO_NET_STATE = Struct(
    "mac" / Bytes(6),                     # the current one (CTRL_MAC_ADDR_SET may change it)
    "link" / Flag,                        # as saved; after restore the reopened backend decides
    "mtu" / Int32ul,                      # 0: none offered; must match the configuration
    "active_pairs" / Int16ul,
    "guest_offloads" / Int64ul,           # the acknowledged receive offloads, feature bits
    "promisc" / Flag,
    "allmulti" / Flag,                    # the driver's CTRL_RX_ALLMULTI setting
    "alluni" / Flag,                      # more unicast addresses than the table holds
    "multi_overflow" / Flag,              # more multicast addresses than the table holds
    "uni" / _MAC_TABLE,
    "multi" / _MAC_TABLE,
    "rxq" / PrefixedArray(Int16ul, Struct(*(k / Int64ul for k in _RXQ_COUNTERS))),
    "txq" / PrefixedArray(Int16ul, Struct(*(k / Int64ul for k in _TXQ_COUNTERS))),
    "port" / Struct(*(k / Int64ul for k in _PORT_COUNTERS)),
    "reset_drops" / Int64ul,
    "python_drops" / Int64ul,
)


def parse_mac(text: str) -> bytes:
    """'02:00:5e:10:00:01' (or with '-') -> 6 bytes; ValueError unless a unicast address."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) in (1, 2) for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (six hex bytes, e.g. 02:00:00:00:00:01)")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address") from None
    if mac[0] & 1 or mac == bytes(6):
        raise ValueError(f"{text}: not a unicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class _Port:
    """One backend descriptor's native state (struct vnet_port) and the buffers it points
    to; alive while a queue uses it."""

    __slots__ = ("c", "bufs", "counted")

    def __init__(self, c, bufs):
        self.c, self.bufs = c, bufs
        self.counted: dict[str, int] | None = None   # once retired: what _retired has of it


class QueueRole:
    RX, TX, CTRL = "rx", "tx", "ctrl"
    UNUSED = "unused"               # without F_MQ, the queues of every pair but the first


class VirtioNet(VirtioDevice, DeviceState):
    name = "virtio-net"
    device_type = L.VIRTIO_ID_NET
    pci_class = 0x020000            # network, Ethernet
    config_layout = L.VirtioNetConfig
    state_version = 1
    state_layout = VIRTIO_NET_STATE

    def __init__(self, backend: NetBackend, *, mac: bytes, queue_pairs: int = 1,
                 mtu: int | None = None, queue_size: int = 256):
        self.backend = backend
        self.pairs = queue_pairs
        self.num_queues = 2 * queue_pairs + 1
        self.queue_max_size = queue_size
        self.default_mac = mac
        self.mtu = mtu
        caps = backend.capabilities()
        self.caps = caps
        gso = backend.framing == Framing.VNET_HDR     # a byte stream carries no segments
        features = (bit(L.F_MAC) | bit(L.F_STATUS) | bit(L.F_MRG_RXBUF) | bit(L.F_CSUM)
                    | bit(L.F_CTRL_VQ) | bit(L.F_CTRL_RX) | bit(L.F_CTRL_MAC_ADDR)
                    | bit(L.F_CTRL_GUEST_OFFLOADS))
        if caps.csum:
            features |= bit(L.F_GUEST_CSUM)
            for ok, guest, host in ((caps.tso4, L.F_GUEST_TSO4, L.F_HOST_TSO4),
                                    (caps.tso6, L.F_GUEST_TSO6, L.F_HOST_TSO6)):
                if ok:
                    features |= bit(guest) | (bit(host) if gso else 0)
            if caps.ecn and (caps.tso4 or caps.tso6):
                features |= bit(L.F_GUEST_ECN) | (bit(L.F_HOST_ECN) if gso else 0)
        if queue_pairs > 1:
            features |= bit(L.F_MQ)
        if mtu is not None:
            features |= bit(L.F_MTU)
        self.device_features = features

        # Python's state (under _lock): link, MAC, filter settings, active pairs.
        self._lock = concurrency.lock(concurrency.DEVICE_INNER, "virtio-net state")
        self.features = 0
        self.link = backend.link_up()
        self.active_pairs = 1
        self.reset_drops = 0
        self.python_drops = 0
        self._ctrl_warned = False
        self._guest_offload_bits = 0
        self.guest_offloads = Offloads()

        # The native data path's state: one port per backend descriptor, a receive and a
        # transmit queue per pair (pair i on port i mod ports; only pairs below the number
        # of ports receive), shared features and filter.
        self._keep = []                 # buffers the structs point to
        self.feat = ffi.new("struct vnet_feat *")
        self.filter = ffi.new("struct vnet_filter *")
        self.ports = [self._new_port(fd) for fd in backend.queue_fds()]
        if not self.ports:
            raise ValueError("the backend gave no descriptor")
        # Each queue's port, as its worker uses it; a reconnected backend's new ports wait in
        # _pending until that worker picks them up (between its cycles, so a cycle never
        # sees its port change).
        self._queue_port: dict[int, _Port] = {}
        self._pending: dict[int, _Port] = {}
        self._retired = dict.fromkeys(_PORT_COUNTERS, 0)
        self._watcher: concurrency.DeviceThread | None = None
        self._watch_wake = threading.Event()
        self._closed = False
        self._doorbell_arrays: dict[int, tuple] = {}   # queue -> (WorkerFds, int[])
        self.rxqs, self.txqs = [], []
        tap = backend.framing == Framing.VNET_HDR
        for i in range(queue_pairs):
            port = self.ports[i % len(self.ports)]
            self._queue_port[2 * i] = self._queue_port[2 * i + 1] = port
            rq = ffi.new("struct vnet_rxq *")
            rq.port, rq.filter, rq.feat = port.c, self.filter, self.feat
            if tap:
                cap = L.HDR_SIZE + backend.max_frame + VLAN_HLEN + 64
                rq.bounce = self._buffer(cap)
                rq.bounce_cap = cap
            rq.wait = lib.VNET_WAIT_INPUT
            tq = ffi.new("struct vnet_txq *")
            tq.port, tq.feat = port.c, self.feat
            tq.bounce = self._buffer(backend.max_frame)
            tq.bounce_cap = backend.max_frame
            self.rxqs.append(rq)
            self.txqs.append(tq)
        self._reset_filter()
        self._build_config()
        if not self.link:
            # A backend with no far side yet (a listening socket before its first peer):
            # watch for it as after a link loss.
            with self._lock:
                self._start_watcher()

    def _buffer(self, size: int):
        buf = ffi.new("uint8_t[]", size)
        self._keep.append(buf)
        return buf

    def _new_port(self, fd: int) -> _Port:
        be = self.backend
        p = ffi.new("struct vnet_port *")
        p.fd = fd
        p.framing = (lib.VNET_FRAMING_BE32 if be.framing == Framing.BE32_LENGTH
                     else lib.VNET_FRAMING_VNET_HDR)
        p.max_frame = be.max_frame
        bufs = []
        if be.framing == Framing.BE32_LENGTH:
            cap = L.STREAM_LEN_SIZE + be.max_frame + RX_BUF_SLACK
            bufs.append(ffi.new("uint8_t[]", cap))
            p.rx_buf, p.rx_cap = bufs[-1], cap
            cap = L.STREAM_LEN_SIZE + be.max_frame
            bufs.append(ffi.new("uint8_t[]", cap))
            p.tx_buf, p.tx_cap = bufs[-1], cap
        return _Port(p, bufs)

    def _take_pending(self, queue: int) -> None:
        """(on the queue's worker, between cycles) Switch to the port a reconnection made."""
        role, pair = self.role(queue)
        if role not in (QueueRole.RX, QueueRole.TX):
            return                        # (without MQ the control queue is at 2)
        # Under _lock: a reset (another thread) may drop the frame in hand meanwhile.
        with self._lock:
            port = self._pending.pop(queue, None)
            if port is None:
                return
            old = self._queue_port[queue]
            if role == QueueRole.RX:
                # What the old port read and the driver had no buffers for (the frame in
                # hand, the rest of its stream buffer) goes with it, counted.
                rq = self.rxqs[pair]
                self.reset_drops += lib.vnet_rx_discard(rq)
                rq.port = port.c
            else:
                self.txqs[pair].port = port.c
            self._settle_counters(old)
            self._queue_port[queue] = port     # the old one goes once no queue holds it

    def _settle_counters(self, port: _Port) -> None:
        """(under _lock) A retired port's counters into _retired: what they gained since it
        was retired (cycles that were under way, the discard above) is not lost."""
        now = {k: getattr(port.c, k) for k in _PORT_COUNTERS}
        was = port.counted or dict.fromkeys(_PORT_COUNTERS, 0)
        for k in _PORT_COUNTERS:
            self._retired[k] += now[k] - was[k]
        port.counted = now

    # -- queues ---------------------------------------------------------------------------
    def role(self, queue: int) -> tuple[str, int]:
        """A queue's role and pair. The control queue follows the last pair the driver may
        use: after all of them with F_MQ, at 2 without (virtio 1.2, 5.1.2)."""
        ctrl = 2 * self.pairs if self.features & bit(L.F_MQ) else 2
        if queue == ctrl:
            return QueueRole.CTRL, 0
        if queue > ctrl:
            return QueueRole.UNUSED, 0
        return (QueueRole.RX if queue % 2 == 0 else QueueRole.TX), queue // 2

    def _data_queues(self) -> range:
        """The receive and transmit queues the driver can use."""
        return range(2 * self.pairs if self.features & bit(L.F_MQ) else 2)

    def _receiving(self, pair: int) -> bool:
        """(on the queue's worker) Whether receive queue `pair` is served now: while the link
        is up, and after it went down until what its port had read is delivered."""
        if pair >= self.active_pairs or pair >= len(self.ports):
            return False
        return self.link or bool(lib.vnet_rx_held(self.rxqs[pair]))

    def serve_cycle(self, queue: int, vq, gate) -> int:
        return self._serve(queue, vq, gate, None)

    def serve_sleeping(self, queue: int, vq, gate, fds: WorkerFds) -> int:
        """The receive and transmit workers stay in C from one kick, input or room on the
        backend to the next (vnet_rx_run, vnet_tx_run); the control queue is Python's."""
        return self._serve(queue, vq, gate, fds)

    def _serve(self, queue: int, vq, gate, fds: WorkerFds | None) -> int:
        role, pair = self.role(queue)
        if role == QueueRole.CTRL:
            return CYCLE_PYTHON
        if role == QueueRole.UNUSED:
            return CYCLE_IDLE
        if self._pending:
            self._take_pending(queue)
        try:
            nq = queue_state(vq)
            if role == QueueRole.RX:
                rq = self.rxqs[pair]
                if not self._receiving(pair):
                    return CYCLE_IDLE     # buffers stay posted; nothing reads for this queue
                if not self.link:
                    # Delivering what was read before the link went down (the port is gone:
                    # _link_lost), one cycle at a time.
                    rc = nq.call(lib.vnet_rx_cycle, rq, gate)
                elif fds is None:
                    rc = nq.call(lib.vnet_rx_cycle, rq, gate)
                else:
                    rc = nq.call(lib.vnet_rx_run, rq, gate, self._doorbells(queue, fds),
                                 len(fds.doorbells), fds.wake, POLL_NS)
                port = rq.port
            else:
                tq = self.txqs[pair]
                if fds is None:
                    rc = nq.call(lib.vnet_tx_cycle, tq, gate, POLL_NS)
                else:
                    rc = nq.call(lib.vnet_tx_run, tq, gate, POLL_NS,
                                 self._doorbells(queue, fds), len(fds.doorbells), fds.wake)
                port = tq.port
        except (ValueError, BufferError):
            return CYCLE_IDLE         # guest memory closed under us: the machine is going
        # A port a reconnection already replaced (its successor waits in _pending: the link
        # is up again on it) is not a new loss; a worker sleeping natively can wake on it.
        if (port.gone or port.hup) and self.link and queue not in self._pending:
            self._link_lost(f"queue {queue}: the backend's far side went away")
        return rc

    def _doorbells(self, queue: int, fds: WorkerFds):
        """fds.doorbells as the C array vnet_rx_run takes (made once per worker)."""
        arr = self._doorbell_arrays.get(queue)
        if arr is None or arr[0] != fds:
            arr = self._doorbell_arrays[queue] = (fds, ffi.new("int[]", list(fds.doorbells)
                                                              or [-1]))
        return arr[1]

    def queue_waits(self, queue: int) -> tuple[tuple[int, int], ...]:
        role, pair = self.role(queue)
        if self._pending:
            self._take_pending(queue)
        if role == QueueRole.RX:
            if not self._receiving(pair):
                return ()
            rq = self.rxqs[pair]
            port = rq.port
            if port.fd < 0 or port.gone:
                return ()
            if rq.wait == lib.VNET_WAIT_INPUT:
                return ((port.fd, select.POLLIN),)
            if rq.wait == lib.VNET_WAIT_RING and not port.hup:
                return ((port.fd, 0),)          # hang-up and errors only
            return ()
        if role == QueueRole.TX:
            tq = self.txqs[pair]
            port = tq.port
            if tq.wait == lib.VNET_WAIT_OUTPUT and port.fd >= 0 and not port.gone:
                return ((port.fd, select.POLLOUT),)
        return ()

    def handle_chain(self, queue: int, chain) -> int:
        role, _ = self.role(queue)
        if role == QueueRole.CTRL:
            return self._control(chain)
        # A chain the native path left (more pieces than it takes, or no backend): dropped.
        with self._lock:
            self.python_drops += 1
        return 0

    # -- link -----------------------------------------------------------------------------
    def _link_lost(self, why: str) -> None:
        with self._lock:
            if not self.link:
                return
            self.link = False
            # No worker reads these descriptors again: peer_gone() may put another
            # connection behind the same number. The receive queues deliver what was read
            # already (fetch_be32 parses to the end of its buffer before it looks at gone).
            for port in {id(p): p for p in list(self._queue_port.values()) + self.ports}.values():
                port.c.gone = 1
            try:
                self.backend.peer_gone()
            except Exception:
                self.log.exception("%s: backend peer_gone failed", self.name)
            self._build_config()
            self._start_watcher()
        self.log.warning("%s: link down: %s", self.name, why)
        if self.transport is not None:
            self.transport.config_changed()
            for q in self._data_queues()[::2]:
                self.transport.notify_queue(q)   # out of vnet_rx_run: stop reading

    def _start_watcher(self) -> None:
        """(under _lock) The link watcher, once: it runs until close()."""
        if self._watcher is None and not self._closed:
            self._watcher = concurrency.DeviceThread(
                "virtio-net-link", self._watch_link, wake=self._watch_wake.set,
                on_error=self._watcher_failed).start()

    def _watch_link(self, thread: concurrency.DeviceThread) -> None:
        """(the link watcher, a DeviceThread this device owns; close() stops it) While the
        link is down, ask the backend every LINK_POLL_S whether its far side is back (a
        reconnecting stream backend); if so, take its new descriptors and bring the link up."""
        while not thread.stopping:
            concurrency.may_block("the next link check")
            self._watch_wake.wait(LINK_POLL_S)
            self._watch_wake.clear()
            if thread.stopping:
                return
            thread.checkpoint()
            if thread.stopping:
                return
            if not self.link and self._relink():
                self.log.warning("%s: link up again", self.name)
                if self.transport is not None:
                    self.transport.config_changed()
                    for q in self._data_queues():
                        self.transport.notify_queue(q)

    def _relink(self) -> bool:
        with self._lock:
            if self.link or self._closed or not self.backend.link_up():
                return False
            fds = self.backend.queue_fds()
            if len(fds) != len(self.ports):
                self.log.error("%s: the backend came back with %d descriptors, not %d; the link "
                          "stays down", self.name, len(fds), len(self.ports))
                return False
            for old in self.ports:
                self._settle_counters(old)
                # A transmit worker asleep in C on it may wake on a kick before it hears of
                # the new port: it hands the frame back instead of dropping it (SEND_MOVED).
                old.c.moved = 1
            self.ports = [self._new_port(fd) for fd in fds]
            for i in range(self.pairs):
                port = self.ports[i % len(self.ports)]
                self._pending[2 * i] = self._pending[2 * i + 1] = port
            for rq in self.rxqs:
                rq.wait = lib.VNET_WAIT_INPUT
            self.link = True
            self._build_config()
            return True

    def _watcher_failed(self, exc: BaseException) -> None:
        self.log.error("%s: the link watcher died; a reconnected backend is not noticed", self.name)

    # -- configuration space --------------------------------------------------------------
    def _build_config(self) -> None:
        status = L.S_LINK_UP if self.link else 0
        self._config = L.VirtioNetConfig.build(dict(
            mac=ffi.buffer(self.filter.mac)[:], status=status, max_virtqueue_pairs=self.pairs,
            mtu=self.mtu or 0, speed=L.SPEED_UNKNOWN, duplex=L.DUPLEX_UNKNOWN,
            rss_max_key_size=0, rss_max_indirection_table_length=0, supported_hash_types=0))

    def config_bytes(self) -> bytes:
        return self._config

    def config_write(self, offset: int, data: bytes) -> None:
        # Legacy drivers set the MAC by writing it (modern ones use CTRL_MAC_ADDR_SET).
        if offset < 6 and not self.features & bit(F_VERSION_1):
            with self._lock:
                n = min(len(data), 6 - offset)
                ffi.memmove(self.filter.mac + offset, data[:n], n)
                self._build_config()

    # -- life cycle -----------------------------------------------------------------------
    def _reset_filter(self) -> None:
        f = self.filter
        ffi.memmove(f.mac, self.default_mac, 6)
        # Until the driver says otherwise, everything is received (as QEMU does).
        f.promisc, f.allmulti, f.alluni = 1, 0, 0
        f.n_uni = f.n_multi = 0
        self._allmulti = False
        self._multi_overflow = False

    def activate(self, features: int) -> None:
        def has(*bits):
            return all(features & bit(b) for b in bits)
        with self._lock:
            self.features = features
            feat = self.feat
            feat.hdr_len = L.HDR_SIZE if has(L.F_MRG_RXBUF) or has(F_VERSION_1) \
                else L.LEGACY_HDR_SIZE
            feat.mrg_rxbuf = has(L.F_MRG_RXBUF)
            feat.csum = has(L.F_CSUM)
            # Segmentation needs checksums, ECN needs segmentation (5.1.3.1).
            feat.host_tso4 = has(L.F_CSUM, L.F_HOST_TSO4)
            feat.host_tso6 = has(L.F_CSUM, L.F_HOST_TSO6)
            feat.host_ecn = has(L.F_HOST_ECN) and (feat.host_tso4 or feat.host_tso6)
            self._set_guest_offloads(features & GUEST_OFFLOAD_BITS)
            max_plain = self.backend.max_frame
            if has(L.F_MTU):
                max_plain = min(max_plain, self.mtu + L.ETH_HLEN + VLAN_HLEN)
            feat.rx_max_plain = max_plain
            self.active_pairs = 1
            self.backend.set_queue_pairs(1)
            for rq in self.rxqs:
                rq.wait = lib.VNET_WAIT_INPUT

    def _set_guest_offloads(self, bits: int) -> None:
        """(under _lock) The receive offloads the driver takes: the backend first when
        turning off (no new frames with them; those already read are finished or dropped),
        the data path first when turning on."""
        def has(*b):
            return all(bits & bit(x) for x in b)
        csum = has(L.F_GUEST_CSUM)
        tso4 = has(L.F_GUEST_CSUM, L.F_GUEST_TSO4)
        tso6 = has(L.F_GUEST_CSUM, L.F_GUEST_TSO6)
        ecn = has(L.F_GUEST_ECN) and (tso4 or tso6)
        acked = Offloads(csum, tso4, tso6, ecn)
        feat = self.feat
        more = (csum > feat.guest_csum or tso4 > feat.guest_tso4 or tso6 > feat.guest_tso6
                or ecn > feat.guest_ecn)
        if not more:
            self.backend.set_offloads(acked)
        feat.guest_csum, feat.guest_tso4, feat.guest_tso6, feat.guest_ecn = csum, tso4, tso6, ecn
        if more:
            self.backend.set_offloads(acked)
        self.guest_offloads = acked
        self._guest_offload_bits = bits

    def reset(self) -> None:
        # The queues are stopped: nothing runs on the structs now.
        with self._lock:
            self.features = 0
            self._ctrl_warned = False
            self._set_guest_offloads(0)
            for rq in self.rxqs:
                if lib.vnet_rx_drop_pending(rq):
                    self.reset_drops += 1
            self.active_pairs = 1
            self.backend.set_queue_pairs(1)
            self._reset_filter()
            self._build_config()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            watcher = self._watcher
        if watcher is not None:
            watcher.stop()
        for p in list(self._queue_port.values()) + self.ports:
            p.c.fd = -1
        self.backend.close()

    # -- checkpoint (hvframe.snapshot.state) ---------------------------------------------
    def quiesce(self) -> None:
        """(the queue workers are quiesced by the transport) Finish the rest of a frame half
        written to a stream backend, so its peer never sees half a frame; a backend that
        takes nothing for QUIESCE_TX_S keeps it (sent when the queue runs again)."""
        for port in self._live_ports():
            c = port.c
            deadline = time.monotonic() + QUIESCE_TX_S
            while c.tx_off < c.tx_len and c.fd >= 0 and not c.gone:
                try:
                    n = os.write(c.fd, ffi.buffer(c.tx_buf + c.tx_off, c.tx_len - c.tx_off))
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:
                    break                 # the data path sees the error when it runs again
                c.tx_off += n
                if c.tx_off < c.tx_len:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.log.warning("%s: a frame half written at checkpoint", self.name)
                        break
                    concurrency.may_block("a stream backend taking the rest of a frame")
                    select.select([], [c.fd], [], left)
            if c.tx_len and c.tx_off >= c.tx_len:
                c.tx_off = c.tx_len = 0

    def _live_ports(self) -> list[_Port]:
        with self._lock:
            return list({id(p): p for p in list(self._queue_port.values()) + self.ports}.values())

    def save_state(self) -> dict:
        with self._lock:
            f = self.filter
            port = dict(self._retired)
            for p in self.ports:
                for k in _PORT_COUNTERS:
                    port[k] += getattr(p.c, k)
            return dict(
                mac=ffi.buffer(f.mac)[:], link=self.link, mtu=self.mtu or 0,
                active_pairs=self.active_pairs, guest_offloads=self._guest_offload_bits,
                promisc=bool(f.promisc), allmulti=self._allmulti, alluni=bool(f.alluni),
                multi_overflow=self._multi_overflow,
                uni=[ffi.buffer(f.uni[i])[:] for i in range(f.n_uni)],
                multi=[ffi.buffer(f.multi[i])[:] for i in range(f.n_multi)],
                rxq=[{k: getattr(q, k) for k in _RXQ_COUNTERS} for q in self.rxqs],
                txq=[{k: getattr(q, k) for k in _TXQ_COUNTERS} for q in self.txqs],
                port=port, reset_drops=self.reset_drops, python_drops=self.python_drops)

    def load_state(self, s) -> None:
        """(by the transport, after activate(); the workers do not run yet) The filter,
        offloads and queue pairs as the driver left them, applied to the reopened backend."""
        where = f"snapshot: {self.name}"
        if s.mtu != (self.mtu or 0):
            raise ConfigError(f"{where}: saved with mtu={s.mtu or 'none'}, this device has "
                              f"mtu={self.mtu or 'none'}")
        if len(s.rxq) != self.pairs or len(s.txq) != self.pairs:
            raise ConfigError(f"{where}: {len(s.rxq)} queue pairs saved, this device has "
                              f"{self.pairs}")
        if not 1 <= s.active_pairs <= self.pairs:
            raise ConfigError(f"{where}: {s.active_pairs} active queue pairs of {self.pairs}")
        if len(s.uni) > L.MAC_TABLE_ENTRIES or len(s.multi) > L.MAC_TABLE_ENTRIES:
            raise ConfigError(f"{where}: a MAC table longer than {L.MAC_TABLE_ENTRIES}")
        if s.guest_offloads & ~(self.features & GUEST_OFFLOAD_BITS):
            raise ConfigError(f"{where}: receive offloads {s.guest_offloads:#x} the driver "
                              f"did not negotiate")
        with self._lock:
            f = self.filter
            ffi.memmove(f.mac, bytes(s.mac), 6)
            f.promisc, f.alluni = int(s.promisc), int(s.alluni)
            self._allmulti, self._multi_overflow = bool(s.allmulti), bool(s.multi_overflow)
            f.allmulti = int(self._allmulti or self._multi_overflow)
            for i, m in enumerate(s.uni):
                ffi.memmove(f.uni[i], bytes(m), 6)
            f.n_uni = len(s.uni)
            for i, m in enumerate(s.multi):
                ffi.memmove(f.multi[i], bytes(m), 6)
            f.n_multi = len(s.multi)
            self._set_guest_offloads(s.guest_offloads)
            self.active_pairs = s.active_pairs
            self.backend.set_queue_pairs(s.active_pairs)
            for q, sq in zip(self.rxqs, s.rxq):
                for k in _RXQ_COUNTERS:
                    setattr(q, k, sq[k])
            for q, sq in zip(self.txqs, s.txq):
                for k in _TXQ_COUNTERS:
                    setattr(q, k, sq[k])
            for k in _PORT_COUNTERS:
                self._retired[k] += s.port[k]
            self.reset_drops, self.python_drops = s.reset_drops, s.python_drops
            self._build_config()
        if bool(s.link) != self.link:
            self.log.warning("%s: link %s after restore (was %s)", self.name,
                             "up" if self.link else "down", "up" if s.link else "down")

    # -- counters -------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """What went through and what was dropped, and why (summed over queues)."""
        out = {k: 0 for k in ("rx_frames", "rx_bytes", "rx_drop_filtered", "rx_drop_bad",
                              "rx_drop_too_big", "rx_bad_buffers", "tx_frames", "tx_bytes",
                              "tx_drop_bad", "tx_drop_oversize", "tx_drop_error",
                              "tx_drop_gone", "rx_oversize", "rx_runt", "rx_truncated",
                              "tx_partial")}
        for rq in self.rxqs:
            for k in ("frames", "bytes", "drop_filtered", "drop_bad", "drop_too_big",
                      "bad_buffers"):
                out["rx_" + k] += getattr(rq, k)
        for tq in self.txqs:
            for k in ("frames", "bytes", "drop_bad", "drop_oversize", "drop_error",
                      "drop_gone"):
                out["tx_" + k] += getattr(tq, k)
        for k in _PORT_COUNTERS:
            out[k] += self._retired[k] + sum(getattr(p.c, k) for p in self.ports)
        out["reset_drops"] = self.reset_drops
        out["python_drops"] = self.python_drops
        return out

    # -- control queue --------------------------------------------------------------------
    def _control(self, chain) -> int:
        if not chain.writable or not len(chain.writable[0]):
            if not self._ctrl_warned:         # once until the reset: the guest can repeat it
                self._ctrl_warned = True
                self.log.warning("%s: control command without room for its ack dropped",
                                 self.name)
            return 0
        if chain.read_len() > CTRL_MAX:
            data = b""                  # no command is this long: ERR
        else:
            data = chain.gather()
        ack = L.CTRL_ERR
        if len(data) >= _CTRL_HDR.size:
            cls, cmd = _CTRL_HDR.unpack_from(data)
            try:
                ack = L.CTRL_OK if self._command(cls, cmd, data[_CTRL_HDR.size:]) else L.CTRL_ERR
            except Exception:
                self.log.exception("%s: control command %d.%d failed", self.name, cls, cmd)
        chain.writable[0][0] = ack
        return 1

    def _command(self, cls: int, cmd: int, body: bytes) -> bool:
        """One control command; whether it succeeded."""
        feats = self.features

        def has(b):
            return bool(feats & bit(b))
        wake = False
        with self._lock:
            f = self.filter
            if cls == L.CTRL_RX and has(L.F_CTRL_RX):
                if len(body) != 1 or cmd not in (L.CTRL_RX_PROMISC, L.CTRL_RX_ALLMULTI):
                    return False
                if cmd == L.CTRL_RX_PROMISC:
                    f.promisc = 1 if body[0] else 0
                else:
                    self._allmulti = bool(body[0])
                    f.allmulti = int(self._allmulti or self._multi_overflow)
                return True
            if cls == L.CTRL_MAC and cmd == L.CTRL_MAC_TABLE_SET and has(L.F_CTRL_RX):
                tables = self._parse_mac_tables(body)
                if tables is None:
                    return False
                uni, multi = tables
                f.alluni = int(len(uni) > L.MAC_TABLE_ENTRIES)
                f.n_uni = 0
                for i, m in enumerate(uni[:L.MAC_TABLE_ENTRIES]):
                    ffi.memmove(f.uni[i], m, 6)
                f.n_uni = min(len(uni), L.MAC_TABLE_ENTRIES)
                self._multi_overflow = len(multi) > L.MAC_TABLE_ENTRIES
                f.n_multi = 0
                for i, m in enumerate(multi[:L.MAC_TABLE_ENTRIES]):
                    ffi.memmove(f.multi[i], m, 6)
                f.n_multi = min(len(multi), L.MAC_TABLE_ENTRIES)
                f.allmulti = int(self._allmulti or self._multi_overflow)
                return True
            if cls == L.CTRL_MAC and cmd == L.CTRL_MAC_ADDR_SET and has(L.F_CTRL_MAC_ADDR):
                if len(body) != 6:
                    return False
                ffi.memmove(f.mac, body, 6)
                self._build_config()
                return True
            if cls == L.CTRL_MQ and cmd == L.CTRL_MQ_VQ_PAIRS_SET and has(L.F_MQ):
                if len(body) != _CTRL_MQ.size:
                    return False
                (n,) = _CTRL_MQ.unpack(body)
                if not 1 <= n <= self.pairs:
                    return False
                self.active_pairs = n
                self.backend.set_queue_pairs(n)
                wake = True
            elif (cls == L.CTRL_GUEST_OFFLOADS and cmd == L.CTRL_GUEST_OFFLOADS_SET
                  and has(L.F_CTRL_GUEST_OFFLOADS)):
                if len(body) != _CTRL_OFFLOADS.size:
                    return False
                (bits,) = _CTRL_OFFLOADS.unpack(body)
                # Only offloads the driver negotiated may be turned on (5.1.6.5.6.1).
                if bits & ~(feats & GUEST_OFFLOAD_BITS):
                    return False
                self._set_guest_offloads(bits)
                return True
            else:
                return False
        if wake and self.transport is not None:
            for q in self._data_queues()[::2]:
                self.transport.notify_queue(q)   # the receive queues look again
        return True

    @staticmethod
    def _parse_mac_tables(body: bytes):
        """VIRTIO_NET_CTRL_MAC_TABLE_SET's two tables, or None when malformed."""
        tables, off = [], 0
        for _ in range(2):
            if len(body) < off + 4:
                return None
            (n,) = struct.unpack_from("<I", body, off)
            off += 4
            if n > (len(body) - off) // 6:
                return None
            tables.append([bytes(body[off + 6 * i:off + 6 * i + 6]) for i in range(n)])
            off += 6 * n
        if off != len(body):
            return None
        return tables
