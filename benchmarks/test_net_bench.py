"""Raw tap throughput, the ceiling virtio-net's tap backend is measured against.

    python -m pytest benchmarks/test_net_bench.py

A tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, 12-byte header, as the device's tap backend opens
it) in a network namespace the benchmark makes (hvframe/testing/netns.py), driven from this process:

- write: what the device's transmit path does per frame: one write() of header + frame into
  the tap. The frames are addressed to a MAC nobody in the namespace has, so the namespace's
  kernel drops them as soon as it has taken them in (the cost is the tap's, not a socket's).
- read: what the receive path does: one read() per frame, of frames the namespace put in the
  tap's queue beforehand (an AF_PACKET socket bound to the tap; untimed), at most the queue's
  length (tx_queuelen 1000) per round.
- read of 64 KiB segments: frames a packet socket injects carry SKB_GSO_DODGY, which the tap
  does not accept whole (it has no NETIF_F_GSO_ROBUST), so the kernel would cut them to MSS
  before the tap. Whole segments come from the namespace's own TCP: a connection to an address
  behind the tap, whose other end is a minimal TCP receiver in this process (SYN-ACK, then one
  ACK written back per segment read). Timed: reading the segments and writing the ACKs, as a
  guest receiving TCP does; the sender runs on its own thread in the same process.

Sizes: 64-byte and 1500-byte Ethernet frames, and 64 KiB TCP segments (TSO: one frame of
65535-byte IPv4 packet with a GSO header; written as the guest's TSO would be, read with
TUNSETOFFLOAD CSUM|TSO4 so the tap hands it over whole).

extra_info: frames/s and MB/s (Ethernet bytes, no header) of the best round. The device
cases below (virtio-net through a tap of its own, raw rounds on this one between them) report
the device's fraction of raw: of the best rounds, and the median of each device round's
ratio to the raw round of its setup (fraction_of_raw_pair_median).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from hvframe.testing.netns import Netns, netns_missing  # noqa: E402

import rawloop  # noqa: E402

pytestmark = pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))

TUNSETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD = 0x400454CA, 0x400454D8, 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4 = 0x01, 0x02
SOL_PACKET, PACKET_VNET_HDR = 263, 15
VNET_HDR = struct.Struct("<BBHHHHH")       # virtio_net_hdr_v1: flags, gso_type, hdr_len,
#                                            gso_size, csum_start, csum_offset, num_buffers
GSO_NONE, GSO_TCPV4, NEEDS_CSUM = 0, 1, 1
MSS = 1448
BATCH = {"64": 512, "1500": 512, "tso64k": 64}
ROUNDS = 15
# Device rounds, each after a raw round (about 1 ms each, so 40 cost little). Round times move
# by 20-50% here from one round to the next, on both sides; the device's spread is the wider
# (two wake-ups a round), so the best-of figure favours it as rounds are added: the pairs'
# median, which does not, is reported beside it.
DEV_ROUNDS = 40
FOREIGN_MAC = b"\x02\x00\x00\x00\x00\x99"
OUR_MAC = b"\x02\x00\x00\x00\x00\x01"


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s >> 16) + (s & 0xFFFF)
    return ~s & 0xFFFF


def ipv4(proto: int, payload: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
                      socket.inet_aton("10.0.9.2"), socket.inet_aton("10.0.9.3"))
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + payload


def case_frame(case: str) -> tuple[bytes, bytes]:
    """(vnet header, Ethernet frame) for a case."""
    if case == "tso64k":
        tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
        ip = ipv4(6, tcp + bytes(65535 - 40))
        hdr = VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 54, MSS, 34, 16, 0)
    else:
        size = int(case)
        udp = struct.pack("!HHHH", 40000, 5001, size - 34, 0) + bytes(size - 42)
        ip = ipv4(17, udp)
        hdr = VNET_HDR.pack(0, GSO_NONE, 0, 0, 0, 0, 0)
    return hdr, FOREIGN_MAC + OUR_MAC + b"\x08\x00" + ip


@pytest.fixture(scope="module")
def ns():
    with Netns() as n:
        yield n


@pytest.fixture
def tap(ns):
    def open_tap():
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"bench0",
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        return fd
    fd = ns.call(open_tap)
    # No IPv6 chatter (router solicitations, MLD) of the namespace's own in the tap's queue.
    ns.sysctl("net.ipv6.conf.bench0.disable_ipv6", "1")
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR.size))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
    ns.ip("link", "set", "bench0", "mtu", "1500", "up")
    yield fd
    os.close(fd)


def record(benchmark, case: str, frames: int, frame_len: int) -> None:
    best = benchmark.stats.stats.min
    benchmark.extra_info["frames_per_s"] = round(frames / best)
    benchmark.extra_info["MB_per_s"] = round(frames * frame_len / best / 1e6, 1)
    benchmark.extra_info["case"] = case


@pytest.mark.parametrize("case", list(BATCH))
def test_raw_tap_write(benchmark, tap, case):
    hdr, frame = case_frame(case)
    data = hdr + frame
    n = BATCH[case]
    write = os.write

    def send_batch():
        for _ in range(n):
            write(tap, data)

    benchmark.pedantic(send_batch, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, case, n, len(frame))


@pytest.mark.parametrize("case", ["64", "1500"])
def test_raw_tap_read(benchmark, ns, tap, case):
    hdr, frame = case_frame(case)
    n = BATCH[case]
    # The namespace side: a packet socket on the tap, taking a virtio header on send (so a
    # 64 KiB segment goes into the tap whole).
    pkt = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    pkt.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    pkt.bind(("bench0", 0))
    out = hdr[:10] + frame                     # packet sockets take the 10-byte header
    read = os.read
    os.set_blocking(tap, True)
    got_len = []

    def fill():
        for _ in range(n):
            pkt.send(out)
        return (), {}

    def receive_batch():
        total = 0
        for _ in range(n):
            total += len(read(tap, 65536 + 64))
        got_len.append(total)

    try:
        benchmark.pedantic(receive_batch, setup=fill, rounds=ROUNDS, iterations=1,
                           warmup_rounds=1)
    finally:
        pkt.close()
    # Every read was one whole frame with its header: nothing segmented, nothing else mixed in.
    assert set(got_len) == {n * (VNET_HDR.size + len(frame))}
    record(benchmark, case, n, len(frame))


# ---- 64 KiB TCP segments from the namespace's own TCP stack ---------------------------------

NS_ADDR, PEER_ADDR, PEER_PORT = "10.0.9.1", "10.0.9.2", 5001
TSO_READS = 64


def tcp_segment(dst_mac: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
                options: bytes = b"", src: str = PEER_ADDR, dst: str = NS_ADDR) -> bytes:
    src, dst = socket.inet_aton(src), socket.inet_aton(dst)
    doff = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0) + options
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return VNET_HDR.pack(0, 0, 0, 0, 0, 0, 0) + dst_mac + OUR_MAC + b"\x08\x00" + ip + tcp


class TcpReceiver:
    """The far end of one TCP connection the namespace opens through the tap: answers the SYN
    (MSS 1460, window scale 7, so the window is 8 MiB) and ACKs every segment it reads.
    `link` reads and writes the frames (TapLink: the tap itself; DeviceTcpLink: virtio-net)."""
    SYN, ACK = 0x02, 0x10

    def __init__(self, link, peer: str = PEER_ADDR, ns_addr: str = NS_ADDR):
        self.link = link
        self.peer, self.ns_addr = peer, ns_addr
        self.ack = 0
        self.seq = 1000
        self.dst_mac = b""
        self.dport = 0

    def _send(self, flags: int, options: bytes = b"") -> None:
        self.link.write(tcp_segment(self.dst_mac, PEER_PORT, self.dport, self.seq, self.ack,
                                    flags, options, self.peer, self.ns_addr))

    def _tcp_of(self, frame: bytes):
        if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            return None
        ihl = (frame[14] & 0x0F) * 4
        ip_len = struct.unpack_from("!H", frame, 16)[0]
        tcp = frame[14 + ihl:]
        sport, dport, seq, _, off, flags = struct.unpack_from("!HHIIBB", tcp)
        if dport != PEER_PORT:
            return None
        return frame, sport, seq, flags, ip_len - ihl - (off >> 4) * 4

    def handshake(self) -> None:
        while True:
            got = self._tcp_of(self.link.read()[0])
            if got and got[3] & self.SYN:
                frame, self.dport, seq, _, _ = got
                self.dst_mac = frame[6:12]
                self.ack = (seq + 1) & 0xFFFFFFFF
                self._send(self.SYN | self.ACK,
                           struct.pack("!BBH", 2, 4, 1460) + b"\x01\x03\x03\x07")
                self.seq += 1
                return

    def receive(self, segments: int) -> int:
        """Read `segments` data segments, ACKing each; their Ethernet bytes."""
        total = 0
        while segments:
            frame, frame_len = self.link.read()
            got = self._tcp_of(frame)
            if not got or got[4] <= 0:
                continue
            _, _, seq, _, length = got
            if seq == self.ack:
                self.ack = (seq + length) & 0xFFFFFFFF
            self._send(self.ACK)
            total += frame_len
            segments -= 1
        return total


class TapLink:
    """TcpReceiver's frames through a tap: one read() or write() each (virtio header first).
    Reads go into one buffer kept for the purpose, and only the headers are copied out, as
    DeviceTcpLink does (os.read's new 70 kB object a segment cost the raw side a third of its
    rate: the device measured 1.29 of raw that way, 2026-12-04)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray(70000)

    def read(self) -> tuple[bytes, int]:
        n = os.readv(self.fd, [self.buf])
        return bytes(self.buf[VNET_HDR.size:VNET_HDR.size + 128]), n - VNET_HDR.size

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)


@contextlib.contextmanager
def tcp_sender(ns, peer: str):
    """The namespace's TCP sending to peer:PEER_PORT without pause, from a thread, until the
    block ends."""
    sender = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    stop = threading.Event()

    def send():
        try:
            sender.connect((peer, PEER_PORT))
            chunk = bytes(1 << 20)
            while not stop.is_set():
                sender.sendall(chunk)
        except OSError:
            pass                        # closed at the end

    t = threading.Thread(target=send, name="bench-tcp-sender", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        sender.close()
        t.join(10)


def route_to(ns, dev: str, ns_addr: str, peer: str) -> None:
    """The namespace reaches peer (at OUR_MAC) through dev, from ns_addr."""
    ns.ip("addr", "add", f"{ns_addr}/24", "dev", dev)
    ns.ip("neigh", "replace", peer, "lladdr", OUR_MAC.hex(":"), "dev", dev, "nud", "permanent")


def test_raw_tap_read_tso64k(benchmark, ns, tap):
    route_to(ns, "bench0", NS_ADDR, PEER_ADDR)
    os.set_blocking(tap, True)
    rx = TcpReceiver(TapLink(tap))
    sizes = []
    try:
        with tcp_sender(ns, PEER_ADDR):
            rx.handshake()
            rx.receive(2000)                # slow start and TSO autosizing settle first
            benchmark.pedantic(lambda: sizes.append(rx.receive(TSO_READS)), rounds=ROUNDS,
                               iterations=1, warmup_rounds=1)
    finally:
        ns.ip("addr", "flush", "dev", "bench0")
    mean = sum(sizes) / len(sizes) / TSO_READS
    assert mean > 16 * MSS, f"segments averaged {mean:.0f} bytes: the tap is not getting TSO"
    benchmark.extra_info["mean_frame_bytes"] = round(mean)
    best = benchmark.stats.stats.min
    benchmark.extra_info["frames_per_s"] = round(TSO_READS / best)
    benchmark.extra_info["MB_per_s"] = round(mean * TSO_READS / best / 1e6, 1)
    benchmark.extra_info["case"] = "tso64k"


# ---- the device: virtio-net through the same kind of tap, against raw, in the same run -----
#
# A synthetic machine with the virtio-net device on a tap in the namespace (the device's own
# tap backend), driven as in test_virtio_blk_bench.py: descriptor chains laid out once, then
# per batch only the avail entries and avail.idx are written, one kick if the device asks for
# kicks, and the wait for used.idx on the queue's MSI-X irqfd (halt-polled as KVM would).
# Raw rounds on a second tap of the same namespace run before each device round (untimed by
# pytest-benchmark, recorded), so both see the host in the same state. The raw side of these
# comparisons is a C loop (rawloop.py), as the device's own calls are: fraction_of_raw; the
# same calls from a Python loop give fraction_of_python_loop (the interpreter's share
# flattered the device by 25-40%). The raw-only cases above stay Python loops.

DEV_QUEUE = 512
DEV_BATCH = 128          # chains per kick (TX), of DEV_QUEUE
_U16 = struct.Struct("<H")


class DeviceRig:
    def __init__(self, ns, tap_name: str, features_extra: int = 0, event_idx: bool = True):
        from hvframe.pci.bus import attach, ensure_pci_bus
        from hvframe.synthetic import SyntheticMachine
        from hvframe.virtio.device import F_RING_EVENT_IDX, F_VERSION_1, bit
        from hvframe.virtio.harness import VirtioPciDriver
        from hvframe.virtio.pci import VirtioPciFunction
        from hvframe_virtio_net import layout as L
        from hvframe_virtio_net.tap import open_tap
        from hvframe_virtio_net.virtio_net import VirtioNet
        self.L, self.bit = L, bit
        self.backend = ns.call(lambda: open_tap(tap_name, 1))
        ns.sysctl(f"net.ipv6.conf.{tap_name}.disable_ipv6", "1")
        ns.ip("link", "set", tap_name, "up")
        # Kicks signal the doorbell's ioeventfd with no Python handler, as under KVM.
        self.m = SyntheticMachine(128 << 20, irqfd_eventfds=True, ioeventfds=True)
        self.dev = VirtioNet(self.backend, mac=OUR_MAC, queue_pairs=1, queue_size=DEV_QUEUE)
        fn = VirtioPciFunction(self.dev, name="virtio-net bench")
        options = {"pci.address": (0, 3, 0)}
        attach(self.m, fn, options)
        self.m.add_device(fn)
        ensure_pci_bus(self.m).assign_bars()
        self.drv = VirtioPciDriver(self.m, 3)
        # EVENT_IDX as Linux's driver negotiates it: a round asks for one interrupt, at its end
        # (DeviceTcpLink, which never moves used_event, goes without).
        features = (bit(F_VERSION_1) | bit(L.F_MAC) | bit(L.F_STATUS) | bit(L.F_MRG_RXBUF)
                    | (bit(F_RING_EVENT_IDX) if event_idx else 0) | features_extra)
        self.drv.initialize(features, DEV_QUEUE)
        self.mem = self.m.memory
        self.next = self.drv.data_base

    def alloc(self, size: int) -> int:
        addr = self.next
        self.next = (addr + size + 0xFFF) & ~0xFFF
        return addr

    def irq_fd(self, q: int) -> int:
        return self.drv.fn.msix.irqfd(self.drv.fn.queues[q].msix_vector).fd

    def driver(self, q: int) -> "rawloop.Driver":
        """Queue q's rounds driven in C, as a guest's driver is: avail.idx, the kick when the
        device asks for one (the doorbell eventfd KVM's ioeventfd signals) and a halted vCPU's
        wait on the irqfd, with KVM's adaptive halt polling. Until 2026-12-04 these were
        Python here: the kick went through the synthetic machine's dispatch (27-70 us when it
        woke the worker on the other core, a bare eventfd write 9-21 us), and the wait spun
        a fixed 200 us without yielding to a worker woken on the same CPU."""
        return rawloop.Driver(self.mem, self.drv.queues[q], self.drv.doorbell_fd(q),
                              self.irq_fd(q))

    def close(self):
        self.m.close()


class TxQueue:
    """Queue 1: chain i = descriptor 2i (the 12-byte header) -> 2i+1 (the frame)."""

    def __init__(self, rig: DeviceRig, hdr: bytes, frame: bytes):
        from hvframe.virtio.virtqueue import VIRTQ_DESC_F_NEXT
        self.rig, self.q = rig, rig.drv.queues[1]
        q, mem = self.q, rig.mem
        area = rig.alloc(DEV_QUEUE * (16 + len(frame) + 64))
        descs = bytearray()
        for i in range(DEV_QUEUE // 2):
            h = area + i * 16
            f = area + DEV_QUEUE * 16 + i * (len(frame) + 64)
            mem.write(h, hdr)
            mem.write(f, frame)
            descs += struct.pack("<QIHH", h, len(hdr), VIRTQ_DESC_F_NEXT, 2 * i + 1)
            descs += struct.pack("<QIHH", f, len(frame), 0, 0)
        mem.write(q.desc, bytes(descs))
        # The batches' heads, in turn: every chain's frame is a copy of its own.
        self.heads = b"".join(struct.pack(f"<{DEV_BATCH}H", *range(2 * b * DEV_BATCH,
                                                                    2 * (b + 1) * DEV_BATCH, 2))
                              for b in range(DEV_QUEUE // 2 // DEV_BATCH))
        self.driver = rig.driver(1)
        self.next_batch = 0

    def send(self, frames: int) -> None:
        """frames // DEV_BATCH batches, one after the other, in one call into C (as a guest
        driver's are: Python between the batches, 2-3 us each, while the worker polled for
        the next, was the rig's cost until 2026-12-04)."""
        q, n = self.q, frames // DEV_BATCH
        sets = len(self.heads) // (2 * DEV_BATCH)
        # set b % sets for the round's b-th batch: rotate so that rounds go on in turn
        k = 2 * DEV_BATCH * self.next_batch
        self.driver.batches(None, None, self.heads[k:] + self.heads[:k], DEV_BATCH, n)
        self.next_batch = (self.next_batch + n) % sets
        q.avail_idx = q.last_used = (q.avail_idx + n * DEV_BATCH) & 0xFFFF

    def close(self):
        self.driver.close()


class RxQueue:
    """Queue 0: chain i = descriptor i, one writable buffer of `size` bytes."""

    def __init__(self, rig: DeviceRig, size: int):
        from hvframe.virtio.virtqueue import VIRTQ_DESC_F_WRITE
        self.rig, self.q = rig, rig.drv.queues[0]
        q, mem = self.q, rig.mem
        area = rig.alloc(DEV_QUEUE * size)
        mem.write(q.desc, b"".join(struct.pack("<QIHH", area + i * size, size,
                                               VIRTQ_DESC_F_WRITE, 0) for i in range(DEV_QUEUE)))
        self.avail = mem.view(q.avail, 4 + 2 * q.size)
        self.driver = rig.driver(0)
        # Ring position p always offers buffer p % DEV_QUEUE: the entries are packed once,
        # before any timing, as a driver in C posts them for a few nanoseconds each (one
        # _U16.pack_into per buffer in the round, as before 2026-12-04, charged the device
        # 0.2-0.3 us of Python a frame, a fifth of a raw read()).
        self.entries = struct.pack(f"<{q.size}H", *(p % DEV_QUEUE for p in range(q.size)))

    def receive(self, frames: int) -> None:
        """Post `frames` buffers (the device has none meanwhile: what arrived waits in the
        tap), kick if the device asks (it does, asleep), wait until all are used
        (rawloop.Driver: an error after 2 s)."""
        q = self.q
        idx = q.avail_idx
        start = idx % q.size
        first = min(frames, q.size - start)             # up to the ring's end, then from 0
        self.avail[4 + 2 * start:4 + 2 * (start + first)] = self.entries[2 * start:2 * (start + first)]
        self.avail[4:4 + 2 * (frames - first)] = self.entries[:2 * (frames - first)]
        q.avail_idx = target = (idx + frames) & 0xFFFF
        self.driver.round(target)
        q.last_used = target

    def close(self):
        self.driver.close()
        self.avail.release()


def _record_vs_raw(benchmark, case, frames, frame_len, raw_times, py_times):
    """raw_times: the raw side in a C loop (rawloop.py), the reference; py_times: the same
    calls from a Python loop, which adds the interpreter to every frame (kept for comparison
    with figures from before 2026-12-02)."""
    hv, raw, py = benchmark.stats.stats.min, min(raw_times), min(py_times)
    # Each device round beside the raw round of its setup, as
    # test_virtio_net_datapath does (the last raw rounds: any before were the warm-up's).
    data = benchmark.stats.stats.data
    pairs = statistics.median(r / d for r, d in zip(raw_times[-len(data):], data))
    benchmark.extra_info.update({
        "case": case, "frames_per_round": frames,
        "fraction_of_raw_pair_median": round(pairs, 3),
        "device_MB_per_s": round(frames * frame_len / hv / 1e6, 1),
        "raw_MB_per_s": round(frames * frame_len / raw / 1e6, 1),
        "device_frames_per_s": round(frames / hv), "raw_frames_per_s": round(frames / raw),
        "fraction_of_raw": round(raw / hv, 3),
        "python_loop_frames_per_s": round(frames / py),
        "fraction_of_python_loop": round(py / hv, 3)})


def _same_offloads(tap: int) -> None:
    """The raw tap as the device's: no receive offloads (the drivers here acknowledge none,
    and the device gives its tap exactly those). The fixture sets CSUM|TSO4 for the raw TSO
    read; left so, the raw tap measured 25-45% slower on writes and faster on reads than
    the device's (2026-12-02)."""
    fcntl.ioctl(tap, TUNSETOFFLOAD, 0)


DEV_TX = {"64": 512, "1500": 512, "tso64k": 128}


@pytest.mark.parametrize("case", list(DEV_TX))
def test_device_tx_vs_raw_tap_write(benchmark, ns, tap, case):
    pytest.importorskip("hvframe_virtio_net.virtio_net", reason="the virtio-net device is not built")
    from hvframe.virtio.device import bit
    from hvframe_virtio_net import layout as L
    hdr, frame = case_frame(case)
    n = DEV_TX[case]
    extra = bit(L.F_CSUM) | bit(L.F_HOST_TSO4) if case == "tso64k" else 0
    rawloop.loops()                                   # skips here if it cannot be built
    _same_offloads(tap)
    # Non-blocking, as the device's tap (and QEMU's) is: the kernel builds a non-blocking
    # writer's frame of up to a page in place (tun_build_skb), a blocking writer's through
    # an allocated skb, and here the former took 0.66 us a 1514-byte frame, the latter 0.73
    # (2026-12-05). The raw loop wrote blocking until then.
    os.set_blocking(tap, False)
    rig = DeviceRig(ns, "devtx0", extra)
    txq = TxQueue(rig, hdr, frame)
    raw_times, py_times, one_times = [], [], []
    data = hdr + frame
    # The raw loop writes from as many copies of the frame as the device's ring holds, in
    # turn, as the device reads each chain's own: 64 KiB segments written from one buffer
    # came from the cache, the device's from memory, and the device measured 0.35-0.57 of
    # that (2026-12-04). One buffer's figure stays beside it (fraction_of_raw_one_buffer).
    frames = rawloop.Frames(data, DEV_QUEUE // 2, len(frame) + 64)   # TxQueue's spacing

    def raw_round():
        t = time.perf_counter()
        frames.write_n(tap, n)
        raw_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        rawloop.write_n(tap, data, n)
        one_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n):
            os.write(tap, data)
        py_times.append(time.perf_counter() - t)

    try:
        txq.send(n)                                   # warm
        benchmark.pedantic(lambda: txq.send(n), setup=raw_round, rounds=DEV_ROUNDS, iterations=1)
        # Every frame went out whole (the counters may trail used.idx by a moment).
        sent = n * (DEV_ROUNDS + 1)
        deadline = time.monotonic() + 5
        while rig.dev.stats()["tx_frames"] < sent and time.monotonic() < deadline:
            time.sleep(0.01)
        st = rig.dev.stats()
        assert st["tx_frames"] == sent, str({k: v for k, v in st.items() if v})
        assert st["tx_drop_bad"] == st["tx_drop_error"] == st["tx_drop_oversize"] == 0, st
    finally:
        txq.close()
        rig.close()
    _record_vs_raw(benchmark, case, n, len(frame), raw_times, py_times)
    benchmark.extra_info["fraction_of_raw_one_buffer"] = round(
        min(one_times) / benchmark.stats.stats.min, 3)


DEV_RX = {"64": 512, "1500": 512}
RX_BUF = 2048                   # each receive buffer, the device's and the raw loop's


@pytest.mark.parametrize("case", list(DEV_RX))
def test_device_rx_vs_raw_tap_read(benchmark, ns, tap, case):
    pytest.importorskip("hvframe_virtio_net.virtio_net", reason="the virtio-net device is not built")
    rawloop.loops()                                   # skips here if it cannot be built
    _, frame = case_frame(case)
    frame = OUR_MAC + frame[6:]                       # to the device's MAC: past its filter
    n = DEV_RX[case]
    _same_offloads(tap)
    rig = DeviceRig(ns, "devrx0")
    rxq = RxQueue(rig, RX_BUF)
    to_dev = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    to_dev.bind(("devrx0", 0))
    to_raw = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    to_raw.bind(("bench0", 0))
    os.set_blocking(tap, True)
    # The raw loop reads each frame into a buffer of its own, in turn across as many as the
    # device's ring holds and of the same size, as the device's frames land; one buffer's
    # figure stays beside it (fraction_of_raw_one_buffer), as transmit's does.
    reader = rawloop.Reader(RX_BUF, copies=DEV_QUEUE)
    one_reader = rawloop.Reader(65536 + 64)
    raw_times, py_times, one_times = [], [], []

    def queue(sock):
        # Every side reads frames that waited in its tap's queue as long: read at once, the
        # raw loop found them in the cache of the CPU that had just sent them and measured
        # 0.75 us a frame; 10 ms later (as the device's frames always were) 1.1-1.2 us
        # (2026-12-04: the device's own read() calls, timed inside its worker, took as long).
        for _ in range(n):
            sock.send(frame)
        time.sleep(0.01)                              # everything is in the tap's queue

    def timed_read(r, times):
        queue(to_raw)
        t = time.perf_counter()
        got = r.read_n(tap, n)
        times.append(time.perf_counter() - t)
        assert got == n * (VNET_HDR.size + len(frame))

    def setup():
        timed_read(reader, raw_times)
        timed_read(one_reader, one_times)
        queue(to_raw)
        t = time.perf_counter()
        for _ in range(n):
            os.read(tap, 65536 + 64)
        py_times.append(time.perf_counter() - t)
        queue(to_dev)
        return (), {}

    try:
        setup()
        rxq.receive(n)                                # warm
        benchmark.pedantic(lambda: rxq.receive(n), setup=setup, rounds=DEV_ROUNDS, iterations=1)
        st = rig.dev.stats()
        assert st["rx_frames"] == n * (DEV_ROUNDS + 1) and st["rx_bytes"] == st["rx_frames"] * len(frame)
    finally:
        to_dev.close()
        to_raw.close()
        rxq.close()
        rig.close()
    _record_vs_raw(benchmark, case, n, len(frame), raw_times, py_times)
    benchmark.extra_info["fraction_of_raw_one_buffer"] = round(
        min(one_times) / benchmark.stats.stats.min, 3)


# ---- 64 KiB TCP segments received through the device ----------------------------------------
#
# The namespace's TCP sends to an address behind the device's tap (GUEST_CSUM and GUEST_TSO4
# acknowledged, so the device gives its tap TUNSETOFFLOAD CSUM|TSO4 and the segments arrive
# whole), and another connection to one behind the raw tap; TcpReceiver answers both, the
# raw one through read()/write() on its tap, the device's through the rings (DeviceTcpLink).
# A round reads 64 segments and ACKs each, raw round before device round, the connection not
# being read meanwhile waiting with its window full. Compared: bytes per second of the best
# round of each. The ACK logic (Python) is the same on both sides, and each copies only the
# headers out: the raw side from the buffer its read() filled, the device's rig from guest
# RAM (the device already made the copy a guest's read needs).

DEV_NS_ADDR, DEV_PEER_ADDR = "10.0.10.1", "10.0.10.2"
TSO_BUF = 65536 + 2048          # one receive buffer holds a segment and its header
TSO_RX_BUFFERS = 128
TX_SLOTS, TX_SLOT = 256, 128    # ACKs: one-descriptor chains, reused in turn


class DeviceTcpLink:
    """TcpReceiver's frames through the device: read() takes the next used receive buffer
    (TSO_BUF bytes each, so one buffer per segment) and posts it again at once; write() puts
    a frame on the transmit queue without waiting for it."""

    def __init__(self, rig: DeviceRig):
        from hvframe.virtio.virtqueue import (VIRTQ_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
                                              full_barrier)
        # Bound once: read() and write() run inside the timed rounds.
        self._barrier = full_barrier
        self._no_notify = VRING_USED_F_NO_NOTIFY
        self.rig, self.mem = rig, rig.mem
        self.rxq, self.txq = rig.drv.queues[0], rig.drv.queues[1]
        rq, tq, mem = self.rxq, self.txq, rig.mem
        area = rig.alloc(TSO_RX_BUFFERS * TSO_BUF)
        self.rx_addr = [area + i * TSO_BUF for i in range(TSO_RX_BUFFERS)]
        mem.write(rq.desc, b"".join(struct.pack("<QIHH", a, TSO_BUF, VIRTQ_DESC_F_WRITE, 0)
                                    for a in self.rx_addr))
        self.tx_area = rig.alloc(TX_SLOTS * TX_SLOT)
        mem.write(tq.desc, b"".join(struct.pack("<QIHH", self.tx_area + i * TX_SLOT, TX_SLOT,
                                                0, 0) for i in range(TX_SLOTS)))
        self.views = [mem.view(rq.avail, 4 + 2 * rq.size), mem.view(rq.used, 4 + 8 * rq.size),
                      mem.view(tq.avail, 4 + 2 * tq.size), mem.view(tq.used, 4)]
        self.rx_avail, self.rx_used, self.tx_avail, self.tx_used = self.views
        self.rx_avail16, self.tx_avail16 = self.rx_avail.cast("H"), self.tx_avail.cast("H")
        # A halted vCPU's wait for the receive interrupt (KVM's adaptive halt polling, giving
        # way to a worker on the same CPU, as rawloop.Driver's).
        self.rx_halt = rawloop.Halt(rig.irq_fd(0))
        # Kicks write the doorbell eventfd, as KVM's ioeventfd does for a guest's notify write
        # (not through the synthetic machine's dispatch: Python a real guest never pays).
        self.doorbells = (rig.drv.doorbell_fd(0), rig.drv.doorbell_fd(1))
        self.rx_next = self.rx_seen = self.tx_next = 0
        for head in range(TSO_RX_BUFFERS):
            self._post(head)
        self._publish(0, self.rx_avail16, self.rx_used, self.rx_next)

    def _post(self, head: int) -> None:
        self.rx_avail16[2 + self.rx_next % self.rxq.size] = head
        self.rx_next += 1

    def _publish(self, q: int, avail16, used, idx: int) -> None:
        """avail.idx of queue q in one store, then a kick if the device asks for one."""
        avail16[1] = idx & 0xFFFF
        self._barrier()
        if not _U16.unpack_from(used, 0)[0] & self._no_notify:
            os.eventfd_write(self.doorbells[q], 1)

    def read(self) -> tuple[bytes, int]:
        deadline = time.monotonic() + 10
        while _U16.unpack_from(self.rx_used, 2)[0] == self.rx_seen & 0xFFFF:
            if time.monotonic() > deadline:
                raise TimeoutError("virtio-net: no segment in 10 s")
            self.rx_halt.wait(1000)
        head, written = struct.unpack_from("<II", self.rx_used,
                                           4 + 8 * (self.rx_seen % self.rxq.size))
        self.rx_seen += 1
        frame_len = written - VNET_HDR.size
        headers = self.mem.read(self.rx_addr[head] + VNET_HDR.size, min(frame_len, 128))
        self._post(head)
        self._publish(0, self.rx_avail16, self.rx_used, self.rx_next)
        return headers, frame_len

    def write(self, data: bytes) -> None:
        deadline = time.monotonic() + 10
        while (self.tx_next - _U16.unpack_from(self.tx_used, 2)[0]) & 0xFFFF >= TX_SLOTS:
            if time.monotonic() > deadline:
                raise TimeoutError("virtio-net: transmit ring full for 10 s")
            time.sleep(0)
        slot = self.tx_next % TX_SLOTS
        self.mem.write(self.tx_area + slot * TX_SLOT, data)
        self.mem.write(self.txq.desc + 16 * slot + 8, struct.pack("<I", len(data)))
        self.tx_avail16[2 + self.tx_next % self.txq.size] = slot
        self.tx_next += 1
        self._publish(1, self.tx_avail16, self.tx_used, self.tx_next)

    def close(self) -> None:
        self.rx_avail16.release()
        self.tx_avail16.release()
        for v in self.views:
            v.release()


def test_device_rx_tso64k_vs_raw_tap_read(benchmark, ns, tap):
    pytest.importorskip("hvframe_virtio_net.virtio_net", reason="the virtio-net device is not built")
    from hvframe.virtio.device import bit
    from hvframe_virtio_net import layout as L
    rawloop.loops()                                   # skips here if it cannot be built
    route_to(ns, "bench0", NS_ADDR, PEER_ADDR)       # the raw tap keeps CSUM|TSO4 (fixture)
    rig = DeviceRig(ns, "devtso0", bit(L.F_GUEST_CSUM) | bit(L.F_GUEST_TSO4), event_idx=False)
    link = None
    try:
        route_to(ns, "devtso0", DEV_NS_ADDR, DEV_PEER_ADDR)
        os.set_blocking(tap, True)
        raw = TcpReceiver(TapLink(tap))
        link = DeviceTcpLink(rig)
        dev = TcpReceiver(link, DEV_PEER_ADDR, DEV_NS_ADDR)
        raw_rounds, dev_bytes = [], []

        def raw_round():
            t = time.perf_counter()
            got = raw.receive(TSO_READS)
            raw_rounds.append((got, time.perf_counter() - t))

        with tcp_sender(ns, PEER_ADDR), tcp_sender(ns, DEV_PEER_ADDR):
            raw.handshake()
            dev.handshake()
            raw.receive(2000)                   # slow start and TSO autosizing settle first
            dev.receive(2000)
            benchmark.pedantic(lambda: dev_bytes.append(dev.receive(TSO_READS)),
                               setup=raw_round, rounds=ROUNDS, iterations=1)
        st = rig.dev.stats()
    finally:
        if link:
            link.close()
        rig.close()
        ns.ip("addr", "flush", "dev", "bench0")
    for side, total in (("raw", sum(b for b, _ in raw_rounds)), ("device", sum(dev_bytes))):
        mean = total / len(dev_bytes) / TSO_READS
        assert mean > 16 * MSS, f"{side}: segments averaged {mean:.0f} bytes: no TSO"
    assert st["rx_drop_bad"] == st["rx_drop_too_big"] == 0, st
    raw_rate = max(b / t for b, t in raw_rounds)
    dev_rate = max(b / t for b, t in zip(dev_bytes, benchmark.stats.stats.data))
    benchmark.extra_info.update({
        "case": "tso64k", "segments_per_round": TSO_READS,
        "device_MB_per_s": round(dev_rate / 1e6, 1), "raw_MB_per_s": round(raw_rate / 1e6, 1),
        "mean_segment_bytes": round(sum(dev_bytes) / len(dev_bytes) / TSO_READS),
        "fraction_of_raw": round(dev_rate / raw_rate, 3)})
