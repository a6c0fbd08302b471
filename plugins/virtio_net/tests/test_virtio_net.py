"""virtio-net over the virtio-pci transport, driven through the dispatch core by the test
driver in hvframe_virtio_net.testdriver; frames travel through the native data path on the
device's queue workers to a socketpair (BE32_LENGTH framing) or a real tap (VNET_HDR) whose
far side is an AF_PACKET socket in a network namespace the test makes."""
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

from hvframe.errors import ConfigError
from hvframe.pci.bus import place
from hvframe.testing import SyntheticMachine, rig
from hvframe.virtio.device import (F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1,
                                   STATUS_NEEDS_RESET, bit)
from hvframe.virtio.pci import VirtioPciFunction
from hvframe_virtio_net import layout as L
from hvframe_virtio_net.backend import Framing, Offloads
from hvframe_virtio_net.plugin import default_mac
from hvframe_virtio_net.testdriver import NetDriver, StreamPair, in_netns, tap_peer_socket
from hvframe_virtio_net import virtio_net
from hvframe_virtio_net.virtio_net import VirtioNet, format_mac

SLOT = 3
MAC = bytes.fromhex("020000aabb01")
BASIC = (bit(L.F_MAC) | bit(L.F_STATUS) | bit(L.F_CTRL_VQ) | bit(L.F_CTRL_RX)
         | bit(L.F_CTRL_MAC_ADDR) | bit(F_RING_EVENT_IDX) | bit(F_RING_INDIRECT_DESC))
ALL = (BASIC | bit(L.F_MRG_RXBUF) | bit(L.F_CSUM) | bit(L.F_GUEST_CSUM) | bit(L.F_MQ)
       | bit(L.F_CTRL_GUEST_OFFLOADS) | bit(L.F_HOST_TSO4) | bit(L.F_HOST_TSO6)
       | bit(L.F_GUEST_TSO4) | bit(L.F_GUEST_TSO6) | bit(L.F_HOST_ECN) | bit(L.F_GUEST_ECN)
       | bit(L.F_MTU))


def frame(dst=MAC, src=bytes.fromhex("020000ccdd02"), n=100, seed=0, ethertype=0x88B5):
    body = bytes((i * 31 + seed) & 0xFF for i in range(n))
    return dst + src + struct.pack(">H", ethertype) + body


class Rig:
    """A synthetic machine with one virtio-net at slot 3 on `backend`, a driver bound."""

    def __init__(self, backend, features=ALL, *, pairs=1, mtu=None, legacy=False,
                 rx_buf_size=2048, post=64, queue_size=None, irqfd_eventfds=False):
        self.m = SyntheticMachine(64 << 20, irqfd_eventfds=irqfd_eventfds)
        self.backend = backend
        self.dev = VirtioNet(backend, mac=MAC, queue_pairs=pairs, mtu=mtu)
        self.fn = VirtioPciFunction(self.dev, name="virtio-net test")
        # A backend object of the test's own: placed by hand, not from a command line.
        self.m.add_device(place(self.m, self.fn, (0, SLOT, 0)))
        self.m.pci.assign_bars()
        self.nd = NetDriver(self.m, SLOT, features, legacy=legacy, rx_buf_size=rx_buf_size,
                            queue_size=queue_size)
        for p in range(pairs if self.nd.features & bit(L.F_MQ) else 1):
            if post:
                self.nd.post_rx(p, post)

    def close(self):
        self.m.close()


@pytest.fixture
def stream_rig():
    rigs = []

    def make(*args, backend=None, **kw):
        r = Rig(backend or StreamPair(), *args, **kw)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


def wait_for(cond, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.005)


# -- through a socketpair (BE32_LENGTH) ---------------------------------------------------

def test_tx_and_rx_through_a_stream_byte_for_byte(stream_rig):
    r = stream_rig()
    be = r.backend
    sent = [frame(n=n, seed=n) for n in (46, 100, 1500, 9000, 60000)]
    for f in sent:
        r.nd.send(0, f, pieces=3)
    assert [be.recv_frame() for _ in sent] == sent
    for f in sent:
        be.send_frame(f)
    got = [r.nd.recv(0) for _ in sent]
    assert [g[1] for g in got] == sent
    # Without offloads from a stream: a plain header, num_buffers saying how many buffers.
    for ((flags, gso, *_rest, nbuf), _), f in zip(got, sent):
        assert flags == 0 and gso == L.GSO_NONE
        assert nbuf == -(-(len(f) + L.HDR_SIZE) // 2048)
    st = r.dev.stats()
    assert st["tx_frames"] == len(sent) and st["rx_frames"] == len(sent)
    assert st["rx_bytes"] == sum(map(len, sent))


def test_indirect_descriptors_and_many_pieces(stream_rig):
    r = stream_rig()
    f = frame(n=3000, seed=11)
    r.nd.send(0, f, pieces=7, indirect=True)
    assert r.backend.recv_frame() == f
    r.nd.send(0, f, pieces=100, indirect=True)  # 101 descriptors in one table
    assert r.backend.recv_frame() == f
    assert r.dev.stats()["tx_frames"] == 2


def test_stream_frames_arrive_in_pieces_and_oversize_is_skipped_whole(stream_rig):
    be = StreamPair(max_frame=2000)
    r = stream_rig(backend=be)
    good1, big, good2 = frame(n=500, seed=1), frame(n=3000, seed=2), frame(n=700, seed=3)
    wire = b"".join(struct.pack(">I", len(f)) + f for f in (good1, big, good2))
    for i in range(0, len(wire), 37):          # dribbled: partial reads everywhere
        be.peer.sendall(wire[i:i + 37])
        time.sleep(0.0005)
    assert r.nd.recv(0)[1] == good1
    assert r.nd.recv(0)[1] == good2
    assert r.dev.stats()["rx_oversize"] == 1


def test_frame_too_big_for_unmerged_buffers_is_dropped_not_truncated(stream_rig):
    r = stream_rig(BASIC | bit(L.F_CSUM), rx_buf_size=1600)
    be = r.backend
    big, small = frame(n=3000, seed=5), frame(n=200, seed=6)
    be.send_frame(big)
    be.send_frame(small)
    fields, got = r.nd.recv(0)
    assert got == small
    assert r.dev.stats()["rx_drop_too_big"] == 1


def test_partial_stream_writes_complete_in_order(stream_rig):
    be = StreamPair(sndbuf=4096)
    r = stream_rig(backend=be)
    sent = [frame(n=20000, seed=i) for i in range(20)]
    for f in sent:
        r.nd.send(0, f, wait=False)
    got = [be.recv_frame() for _ in sent]
    assert got == sent
    assert r.dev.stats()["tx_partial"] > 0       # the small socket buffer forced them


def test_checksum_offload_completed_for_a_stream(stream_rig):
    r = stream_rig()
    be = r.backend
    # An IPv4/UDP datagram with the pseudo-header sum in place, as a driver leaves it.
    payload = bytes(range(37))
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    udp_len = 8 + len(payload)
    pseudo = sum(struct.unpack(">6H", src + dst + struct.pack(">BBH", 0, 17, udp_len)))
    pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    udp = struct.pack(">HHHH", 1234, 5678, udp_len, pseudo) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0, src, dst)
    f = MAC + bytes(6) + b"\x08\x00" + ip + udp
    r.nd.send(0, f, flags=L.HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    out = be.recv_frame()
    # The one's complement sum over pseudo-header and datagram is 0xFFFF when it is right.
    seg = out[34:]
    total = sum(struct.unpack(">6H", src + dst + struct.pack(">BBH", 0, 17, udp_len)))
    data = seg + (b"\0" if len(seg) % 2 else b"")
    total += sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
    assert out[:40] == f[:40] and out[42:] == f[42:]


def test_bad_offload_headers_are_dropped_and_counted(stream_rig):
    r = stream_rig(BASIC)                       # no CSUM, no TSO negotiated
    be = r.backend
    r.nd.send(0, frame(), flags=L.HDR_F_NEEDS_CSUM, csum_start=14, csum_offset=2)
    r.nd.send(0, frame(), gso_type=L.GSO_TCPV4, gso_size=1000)
    r.nd.send(0, b"\1\2\3")                     # a runt
    good = frame(seed=9)
    r.nd.send(0, good)
    assert be.recv_frame() == good
    assert r.dev.stats()["tx_drop_bad"] == 3


def test_legacy_driver_uses_the_short_header(stream_rig):
    r = stream_rig(BASIC, legacy=True)
    be = r.backend
    assert r.nd.hdr_len == L.LEGACY_HDR_SIZE
    f = frame(n=300)
    r.nd.send(0, f)
    assert be.recv_frame() == f
    be.send_frame(f)
    assert r.nd.recv(0)[1] == f


def test_two_queue_pairs_and_vq_pairs_set(stream_rig):
    r = stream_rig(pairs=2)
    be = r.backend
    assert r.nd.ctrl(L.CTRL_MQ, L.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 3)) == L.CTRL_ERR
    assert r.nd.ctrl(L.CTRL_MQ, L.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == L.CTRL_OK
    assert be.pairs_set[-1] == 2
    a, b = frame(seed=1), frame(seed=2)
    r.nd.send(0, a)
    r.nd.send(1, b)          # both pairs write to the one descriptor, frames whole
    assert {be.recv_frame(), be.recv_frame()} == {a, b}
    assert r.dev.stats()["tx_frames"] == 2


def test_control_queue_is_queue_2_when_the_driver_takes_no_mq(stream_rig):
    """virtio 1.2, 5.1.2: without F_MQ the driver uses one pair and the control queue is 2,
    whatever max_virtqueue_pairs says; the device must answer there (Linux spins waiting)."""
    r = stream_rig(ALL & ~bit(L.F_MQ), pairs=2)
    assert not r.nd.features & bit(L.F_MQ) and r.nd.ctrl_q == 2
    assert r.nd.ctrl(L.CTRL_RX, L.CTRL_RX_PROMISC, b"\0") == L.CTRL_OK
    assert r.nd.ctrl(L.CTRL_MQ, L.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == L.CTRL_ERR
    # Pair 0 carries the traffic, the filter setting applied.
    be = r.backend
    f = frame(seed=5)
    r.nd.send(0, f)
    assert be.recv_frame() == f
    be.send_frame(frame(dst=bytes.fromhex("020000999999")))     # not ours: filtered now
    be.send_frame(f)
    assert r.nd.recv(0)[1] == f
    assert r.dev.stats()["rx_drop_filtered"] == 1


def test_ctrl_rx_filter_promisc_allmulti_mac_table(stream_rig):
    r = stream_rig()
    be, nd = r.backend, r.nd
    other = bytes.fromhex("020000999999")
    mcast = bytes.fromhex("01005e000001")
    assert nd.ctrl(L.CTRL_RX, L.CTRL_RX_PROMISC, b"\0") == L.CTRL_OK
    empty_tables = struct.pack("<I", 0) + struct.pack("<I", 0)
    assert nd.ctrl(L.CTRL_MAC, L.CTRL_MAC_TABLE_SET, empty_tables) == L.CTRL_OK
    for dst in (other, mcast, MAC, b"\xff" * 6):
        be.send_frame(frame(dst=dst))
    assert nd.recv(0)[1][:6] == MAC
    assert nd.recv(0)[1][:6] == b"\xff" * 6
    assert r.dev.stats()["rx_drop_filtered"] == 2
    # The multicast address in the table, then all multicast, then promiscuous again.
    tables = struct.pack("<I", 0) + struct.pack("<I", 1) + mcast
    assert nd.ctrl(L.CTRL_MAC, L.CTRL_MAC_TABLE_SET, tables) == L.CTRL_OK
    be.send_frame(frame(dst=mcast))
    assert nd.recv(0)[1][:6] == mcast
    assert nd.ctrl(L.CTRL_RX, L.CTRL_RX_ALLMULTI, b"\1") == L.CTRL_OK
    be.send_frame(frame(dst=bytes.fromhex("333300000001")))
    assert nd.recv(0)[1][:6] == bytes.fromhex("333300000001")
    assert nd.ctrl(L.CTRL_RX, L.CTRL_RX_PROMISC, b"\1") == L.CTRL_OK
    be.send_frame(frame(dst=other))
    assert nd.recv(0)[1][:6] == other
    # Malformed commands: ERR, nothing changed.
    assert nd.ctrl(L.CTRL_MAC, L.CTRL_MAC_TABLE_SET, struct.pack("<I", 5)) == L.CTRL_ERR
    assert nd.ctrl(L.CTRL_RX, 7, b"\1") == L.CTRL_ERR
    assert nd.ctrl(42, 0) == L.CTRL_ERR


def test_ctrl_mac_addr_set_changes_config_and_filter(stream_rig):
    r = stream_rig()
    be, nd = r.backend, r.nd
    new = bytes.fromhex("020000123456")
    assert nd.ctrl(L.CTRL_MAC, L.CTRL_MAC_ADDR_SET, new) == L.CTRL_OK
    assert bytes(nd.config(i, 1) for i in range(6)) == new
    nd.ctrl(L.CTRL_RX, L.CTRL_RX_PROMISC, b"\0")
    be.send_frame(frame(dst=MAC))
    be.send_frame(frame(dst=new))
    assert nd.recv(0)[1][:6] == new
    assert nd.ctrl(L.CTRL_MAC, L.CTRL_MAC_ADDR_SET, new[:5]) == L.CTRL_ERR


def test_ctrl_guest_offloads_only_what_was_negotiated():
    class Caps(StreamPair):
        def capabilities(self):
            return Offloads(csum=True, tso4=True, tso6=True, ecn=True)
    r = Rig(Caps())
    try:
        be, nd = r.backend, r.nd
        assert be.acked[-1] == Offloads(True, True, True, True)
        assert nd.ctrl(L.CTRL_GUEST_OFFLOADS, L.CTRL_GUEST_OFFLOADS_SET,
                       struct.pack("<Q", bit(L.F_GUEST_CSUM))) == L.CTRL_OK
        assert be.acked[-1] == Offloads(csum=True)
        assert nd.ctrl(L.CTRL_GUEST_OFFLOADS, L.CTRL_GUEST_OFFLOADS_SET,
                       struct.pack("<Q", bit(L.F_GUEST_UFO))) == L.CTRL_ERR
        assert be.acked[-1] == Offloads(csum=True)
    finally:
        r.close()
    # A driver that takes fewer offloads: the backend is told exactly those.
    r = Rig(Caps(), BASIC | bit(L.F_CSUM) | bit(L.F_GUEST_CSUM))
    try:
        assert r.backend.acked[-1] == Offloads(csum=True)
    finally:
        r.close()


class DatagramTap(StreamPair):
    """A tap stand-in: one SEQPACKET datagram is a virtio_net_hdr and its frame, so the test
    hands the device the headers a tap with offloads on would."""
    framing = Framing.VNET_HDR

    def __init__(self):
        super().__init__()
        self.dev_end.close()
        self.peer.close()
        self.dev_end, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.dev_end.setblocking(False)

    def capabilities(self):
        return Offloads(csum=True, tso4=True, tso6=True, ecn=True)

    def send(self, f, flags=0, gso_type=0, gso_size=0, csum_start=0, csum_offset=0):
        hdr = struct.pack("<BBHHHHH", flags, gso_type, 0, gso_size, csum_start, csum_offset, 0)
        self.peer.send(hdr + f)


def _udp_needing_csum():
    """An IPv4/UDP frame to MAC with the pseudo-header sum in place, and a checker."""
    payload = bytes(range(41))
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    ulen = 8 + len(payload)
    pseudo = src + dst + struct.pack(">BBH", 0, 17, ulen)

    def fold(b):
        b += b"\0" * (len(b) % 2)
        t = sum(struct.unpack(f">{len(b) // 2}H", b))
        while t >> 16:
            t = (t & 0xFFFF) + (t >> 16)
        return t
    udp = struct.pack(">HHHH", 1, 2, ulen, fold(pseudo)) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0, 64, 17, 0, src, dst)
    return MAC + bytes(6) + b"\x08\x00" + ip + udp, lambda f: fold(pseudo + f[34:]) == 0xFFFF


def test_a_frame_held_for_buffers_follows_offloads_turned_off_meanwhile():
    """5.1.6.5.6.1: after CTRL_GUEST_OFFLOADS_SET turned offloads off, no frame reaches the
    driver with them, including the one that was waiting for buffers when the command came:
    its checksum is completed, or (a segment train the driver cannot take) it is dropped and
    counted."""
    off = struct.pack("<Q", 0)
    f, csum_ok = _udp_needing_csum()
    assert not csum_ok(f)
    big = frame(n=3000)
    for offloaded, kw in ((f, dict(flags=L.HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)),
                          (big, dict(flags=L.HDR_F_NEEDS_CSUM, gso_type=L.GSO_TCPV4,
                                     gso_size=1448, csum_start=34, csum_offset=16))):
        be = DatagramTap()
        r = Rig(be, post=0)
        try:
            be.send(offloaded, **kw)
            wait_for(lambda: r.dev.rxqs[0].have_frame == 1, what="the frame in hand")
            assert r.nd.ctrl(L.CTRL_GUEST_OFFLOADS, L.CTRL_GUEST_OFFLOADS_SET, off) == L.CTRL_OK
            plain = frame(seed=7)
            be.send(plain)
            r.nd.post_rx(0, 8, 4096)
            fields, got = r.nd.recv(0)
            if offloaded is f:              # completed here, delivered plain
                assert fields[0] == 0 and fields[1] == L.GSO_NONE and csum_ok(got)
                fields, got = r.nd.recv(0)
            else:                           # no way to deliver it without TSO: counted
                assert r.dev.stats()["rx_drop_bad"] == 1
            assert got == plain and fields[:2] == (0, L.GSO_NONE)
        finally:
            r.close()


def test_features_follow_backend_capabilities(stream_rig):
    r = stream_rig()
    offered = r.nd.drv.device_features()
    for b in (L.F_GUEST_CSUM, L.F_GUEST_TSO4, L.F_HOST_TSO4, L.F_HOST_TSO6, L.F_GUEST_ECN):
        assert not offered & bit(b), b            # a stream carries no offloads
    for b in (L.F_CSUM, L.F_MRG_RXBUF, L.F_CTRL_VQ, L.F_STATUS, L.F_MAC):
        assert offered & bit(b), b
    assert not r.nd.features & bit(L.F_MTU)


def test_mtu_in_config_and_enforced_on_receive(stream_rig):
    r = stream_rig(mtu=1000)
    assert r.nd.features & bit(L.F_MTU)
    assert r.nd.config(L.VirtioNetConfig.subcons[0].sizeof() + 4, 2) == 1000  # mtu field
    be = r.backend
    be.send_frame(frame(n=1500))
    be.send_frame(frame(n=900, seed=4))
    assert r.nd.recv(0)[1] == frame(n=900, seed=4)
    assert r.dev.stats()["rx_drop_too_big"] == 1


def test_link_down_with_config_interrupt_when_peer_goes_away(stream_rig):
    r = stream_rig()
    assert r.nd.config(6, 2) & L.S_LINK_UP
    gen = r.fn.config_generation
    r.backend.peer.close()
    wait_for(lambda: not r.nd.config(6, 2) & L.S_LINK_UP, what="link down")
    wait_for(lambda: r.fn.config_generation != gen, what="a configuration change")
    assert r.backend.gone
    # Transmit carries on: frames dropped and counted, the VMM fine.
    r.nd.send(0, frame())
    assert r.dev.stats()["tx_drop_gone"] >= 1


def test_link_comes_back_when_the_backend_reconnects(stream_rig):
    r = stream_rig()
    be = r.backend
    be.peer.close()
    wait_for(lambda: not r.nd.config(6, 2) & L.S_LINK_UP, what="link down")
    gen = r.fn.config_generation
    be.reconnect()
    wait_for(lambda: r.nd.config(6, 2) & L.S_LINK_UP, what="link up again")
    wait_for(lambda: r.fn.config_generation != gen, what="a configuration change")
    f = frame(seed=21)
    r.nd.send(0, f)
    assert be.recv_frame() == f
    be.send_frame(f)
    assert r.nd.recv(0)[1] == f


def test_frames_read_before_the_peer_hung_up_reach_the_driver_after_link_down(stream_rig):
    """The peer sends ten frames and goes while the driver has two buffers: the link goes
    down, and the eight frames the device read (or reads at the hang-up) are delivered when
    the driver posts buffers, in order, none lost."""
    r = stream_rig(post=2)
    be = r.backend
    sent = [frame(n=200, seed=i) for i in range(10)]
    for f in sent:
        be.send_frame(f)
    be.peer.close()
    wait_for(lambda: not r.nd.config(6, 2) & L.S_LINK_UP, what="link down")
    time.sleep(0.1)                     # the receive worker settles with the ring empty
    r.nd.post_rx(0, 16)
    assert [r.nd.recv(0)[1] for _ in sent] == sent
    st = r.dev.stats()
    assert st["reset_drops"] == st["rx_truncated"] == 0 and st["rx_frames"] == 10


def test_frames_after_a_skipped_oversize_frame_follow_at_once_and_after_a_hang_up(stream_rig):
    """An oversize frame is skipped whole; the frames after it in the same read are parsed
    then and there (not left until more input comes), and, after a hang-up, delivered like
    any other frame read before it."""
    oversize = struct.pack(">I", 2000) + bytes(2000)
    r = stream_rig(backend=StreamPair(max_frame=1000))
    a = frame(n=200, seed=1)
    r.backend.peer.sendall(oversize + struct.pack(">I", len(a)) + a)
    assert r.nd.recv(0, timeout=3)[1] == a

    r = stream_rig(backend=StreamPair(max_frame=1000), post=0)
    be = r.backend
    held, after = frame(n=200, seed=0), [frame(n=200, seed=2), frame(n=200, seed=3)]
    be.send_frame(held)
    wait_for(lambda: r.dev.rxqs[0].have_frame == 1, what="a frame in hand")
    be.peer.sendall(oversize)
    for f in after:
        be.send_frame(f)
    be.peer.close()
    wait_for(lambda: not r.nd.config(6, 2) & L.S_LINK_UP, what="link down")
    r.nd.post_rx(0, 16)
    assert [r.nd.recv(0, timeout=5)[1] for _ in range(3)] == [held] + after
    st = r.dev.stats()
    assert (st["rx_oversize"], st["rx_truncated"], st["reset_drops"]) == (1, 0, 0)


def test_frames_held_when_the_backend_reconnects_are_counted(stream_rig):
    """A new connection before the driver posted buffers: what the old one left in the device
    (the frame in hand, the rest of the stream buffer) is dropped and counted, and the new
    connection's frames flow."""
    r = stream_rig(post=2)
    be = r.backend
    for i in range(10):
        be.send_frame(frame(n=200, seed=i))
    be.peer.sendall(struct.pack(">I", 300) + bytes(100))     # and the start of one more
    be.peer.close()
    wait_for(lambda: not r.nd.config(6, 2) & L.S_LINK_UP, what="link down")
    be.reconnect()
    wait_for(lambda: r.nd.config(6, 2) & L.S_LINK_UP, what="link up again")
    new = frame(n=300, seed=99)
    be.send_frame(new)
    r.nd.post_rx(0, 16)
    got = [r.nd.recv(0)[1] for _ in range(3)]
    assert got == [frame(n=200, seed=0), frame(n=200, seed=1), new]
    st = r.dev.stats()
    assert (st["reset_drops"], st["rx_truncated"]) == (8, 1)


def test_a_frame_sent_the_moment_the_link_is_back_goes_out(stream_rig, monkeypatch):
    """The transmit worker, asleep in C on the lost connection, is woken by the driver's kick
    before the link watcher has told it about the new connection: the frame goes out on the
    new one instead of being dropped on the old. The watcher is kept dormant and the link
    brought back by hand, so the kick always comes first."""
    monkeypatch.setattr(virtio_net, "LINK_POLL_S", 60.0)
    r = stream_rig()
    be = r.backend
    f0 = frame(seed=20)
    r.nd.send(0, f0)
    assert be.recv_frame() == f0               # the transmit worker has run, and sleeps
    be.peer.close()
    wait_for(lambda: not r.nd.config(6, 2) & L.S_LINK_UP, what="link down")
    be.reconnect()
    assert r.dev._relink()                     # link up; no worker has been told yet
    assert r.nd.config(6, 2) & L.S_LINK_UP
    f = frame(seed=22)
    r.nd.send(0, f)
    assert be.recv_frame() == f
    assert r.dev.stats()["tx_drop_gone"] == 0


def test_rx_ring_empty_while_flooded_costs_no_cpu_and_bounded_memory(stream_rig):
    from hvframe.testing.helpers import rss_kib
    r = stream_rig(post=0)
    be = r.backend
    be.peer.setblocking(False)
    f = frame(n=1400)
    sent = 0
    rss0 = rss_kib()
    t0 = time.thread_time(), time.process_time()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        try:
            be.peer.send(struct.pack(">I", len(f)) + f)
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)       # the device stopped reading: the stream holds back
    cpu = time.process_time() - t0[1] - (time.thread_time() - t0[0])
    assert sent > 0
    assert cpu < 0.2, f"device threads used {cpu:.3f}s of CPU while the ring was empty"
    assert rss_kib() - rss0 < 16 << 10
    # The guest refills: delivery resumes with the frames held back, none lost in between.
    r.nd.post_rx(0, 64)
    got = [r.nd.recv(0)[1] for _ in range(min(sent, 20))]
    assert all(g == f for g in got)
    assert r.dev.stats()["rx_frames"] >= 20


def test_transmit_polls_for_the_next_batch_only_while_batches_come_close(stream_rig,
                                                                         monkeypatch):
    """The transmit worker's poll for the driver's next batch adapts, as QEMU's iothreads and
    KVM's halt polling adapt theirs: batches that follow within the longest window grow it
    (the next is found without a kick's wake-up), batches far apart shrink it (an idle queue
    stops spinning after each: CPU, and the core the interrupted vCPU may be woken on)."""
    monkeypatch.setattr(virtio_net, "POLL_NS", 20_000_000)   # room for Python's pace
    r = stream_rig()
    window = lambda: r.dev.txqs[0].poll.window          # noqa: E731
    assert window() == 0                                # none before traffic
    for i in range(30):
        r.nd.send(0, frame(seed=i))
        assert r.backend.recv_frame() == frame(seed=i)
    grown = window()
    assert 4_000 <= grown <= 20_000_000
    for i in range(6):
        time.sleep(0.05)                                # longer than the longest window
        r.nd.send(0, frame(seed=i))
        assert r.backend.recv_frame() == frame(seed=i)
    assert window() <= grown // 16


@pytest.mark.parametrize("why", ["reset", "needs_reset", "quiesce"])
def test_a_queue_that_cannot_be_served_costs_no_cpu_while_input_waits(stream_rig, why):
    """Input waiting while the receive queue cannot be served (the driver reset the device
    and has not started it again; NEEDS_RESET, which Linux never answers; a checkpoint's
    quiesce): the worker sleeps instead of waking on the input again and again."""
    r = stream_rig(post=4)
    if why == "reset":
        r.nd.drv.set_status(0)
    elif why == "needs_reset":
        r.fn.needs_reset("test")
    else:
        r.fn.quiesce()
    try:
        time.sleep(0.2)
        r.backend.send_frame(frame())
        t0 = time.thread_time(), time.process_time()
        time.sleep(1.0)
        cpu = time.process_time() - t0[1] - (time.thread_time() - t0[0])
        assert cpu < 0.2, f"device threads used {cpu:.3f}s of CPU in 1 s"
    finally:
        if why == "quiesce":
            r.fn.unquiesce()
    if why == "quiesce":          # and the frame is delivered once the queue is served again
        assert r.nd.recv(0)[1] == frame()


def test_receive_interrupts_follow_the_queues_new_msix_vector(stream_rig):
    """A driver moves an enabled queue to another MSI-X vector (allowed, virtio 1.2
    4.1.5.1.2): the worker asleep in C fires the new vector from then on, not the old one."""
    r = stream_rig(post=8, irqfd_eventfds=True)
    time.sleep(0.2)

    def fired(v):
        try:
            return os.eventfd_read(r.fn.msix.irqfd(v).fd)
        except BlockingIOError:
            return 0
    old = r.fn.queues[0].msix_vector
    new = r.fn.msix.vectors - 1
    assert new != old
    r.nd.drv.common_write("queue_select", 2, 0)
    r.nd.drv.common_write("queue_msix_vector", 2, new)
    time.sleep(0.1)
    fired(old)
    r.backend.send_frame(frame())
    wait_for(lambda: r.dev.stats()["rx_frames"] == 1, what="the frame placed")
    wait_for(lambda: fired(new), what="the new vector fired")
    assert fired(old) == 0


def test_a_claim_on_a_queue_that_never_ran_natively_is_not_slept_through(stream_rig):
    """The interleaving a legacy driver's queue_pfn=0 can meet right after the queue is
    built: the worker read the claimant's wake-up before taking the queue's lock, and the
    queue has no native state for a yield request yet. The worker must not go to sleep in C
    while the claim is counted."""
    from hvframe.virtio.native import claiming
    from hvframe.virtio.pci import _claims_lock
    r = stream_rig(post=4)
    time.sleep(0.2)
    q, w = r.fn.queues[0], r.fn._workers[0]
    assert w.thread.pause()                 # parked, its wake-up fd drained
    q.vq.__dict__.pop("_native_queue", None)  # as a queue built a moment ago
    with claiming(q.vq):                    # no native state: no yield request
        with _claims_lock:
            q.claims += 1
        r.fn._wake_worker(q)
        os.eventfd_read(w.wake_fd)          # the worker's loop read it (poll returned) ...
        w.thread.resume()                   # ... and takes the queue's lock first
        time.sleep(0.3)
        got = q.lock.acquire(timeout=3)
        if got:
            q.lock.release()
        with _claims_lock:
            q.claims -= 1
    r.fn._wake_worker(q)
    assert got, "the claimant never got the queue's lock"


def _need_kick(dq, old: int) -> bool:
    """A driver honouring EVENT_IDX (virtio 1.2, 2.7.10): kick only if avail.idx moved past
    the device's avail_event from `old` to the index just published."""
    event = struct.unpack("<H", dq.mem.read(dq.used + 4 + 8 * dq.size, 2))[0]
    return (dq.avail_idx - event - 1) & 0xFFFF < (dq.avail_idx - old) & 0xFFFF


def test_merged_frame_waiting_for_more_buffers_asks_for_the_next_kick(stream_rig):
    # A frame needs two buffers and the driver posted one: the device holds it, and with
    # EVENT_IDX must ask for a kick at the driver's next buffer (an avail_event at the last
    # consumed index would be behind the one already posted: Linux would never kick).
    r = stream_rig(post=0)
    f = frame(n=3000)                        # header + 3014 bytes: two 2048-byte buffers
    r.backend.send_frame(f)
    rq = r.dev.rxqs[0]
    dq = r.nd.drv.queues[0]
    first = r.nd.alloc(2048)
    head = dq.add([(first, 2048, True)])
    r.nd._rx_addr[(0, head)] = (first, 2048)
    dq.publish()
    r.nd.drv.kick(0)
    wait_for(lambda: rq.have_frame, what="the frame held for buffers")
    time.sleep(0.05)                         # the worker settles on its wait
    assert dq.used_idx() == 0
    old = dq.avail_idx
    second = r.nd.alloc(2048)
    head = dq.add([(second, 2048, True)])
    r.nd._rx_addr[(0, head)] = (second, 2048)
    dq.publish()
    assert _need_kick(dq, old), "the device asked for no kick at the buffer it waits for"
    r.nd.drv.kick(0)
    assert r.nd.recv(0)[1] == f
    assert r.dev.stats()["rx_drop_too_big"] == 0


def test_a_burst_fills_buffers_in_order_and_gives_back_ones_too_small_for_a_header(stream_rig):
    # 40 frames wait in the backend; the driver then posts 68 buffers in one kick: 20 of 8
    # bytes (no room for the 12-byte header: more than the 16 the device publishes at once),
    # then 2048-byte ones with every sixth again too small. The used ring, published in
    # batches, gives back every buffer once, in the order posted, the small ones empty, and
    # the frames byte for byte in the order sent.
    r = stream_rig(post=0)
    sent = [frame(n=60 + 37 * i, seed=i) for i in range(40)]
    for f in sent:
        r.backend.send_frame(f)
    rq = r.dev.rxqs[0]
    wait_for(lambda: rq.have_frame, what="the first frame held for buffers")
    dq = r.nd.drv.queues[0]
    posted = []
    for i in range(68):
        size = 8 if i < 20 or i % 6 == 4 else 2048
        addr = r.nd.alloc(size)
        posted.append((dq.add([(addr, size, True)]), addr, size))
    dq.publish()
    r.nd.drv.kick(0)
    used = r.nd.drv.wait_used(0, 68)
    assert [h for h, _ in used] == [h for h, _, _ in posted]
    got = []
    for (head, written), (_, addr, size) in zip(used, posted):
        if size == 8:
            assert written == 0
            continue
        data = r.nd.mem.read(addr, written)
        assert struct.unpack_from("<H", data, 10)[0] == 1       # num_buffers
        got.append(data[L.HDR_SIZE:])
    assert got == sent
    st = r.dev.stats()
    assert st["rx_frames"] == 40 and st["rx_bad_buffers"] == 28


def test_rings_shorter_than_the_publishing_batch_keep_flowing(stream_rig):
    # 4-entry rings: the device publishes used entries in batches longer than the ring, so
    # it must publish a short batch when the ring's entries run out, both ways.
    r = stream_rig(queue_size=4, post=4)
    sent = [frame(n=200 + i, seed=i) for i in range(40)]
    for f in sent:
        r.backend.send_frame(f)
    assert [r.nd.recv(0)[1] for _ in sent] == sent
    for f in sent:
        r.nd.send(0, f)
    assert [r.backend.recv_frame() for _ in sent] == sent


@pytest.mark.parametrize("qsize", [4, 8, 32])
def test_receive_with_a_driver_that_kicks_only_when_asked(stream_rig, qsize):
    # EVENT_IDX as Linux uses it (a kick only when avail_event asks, buffers reposted as
    # they come back) on short rings, frames merged over 1024-byte buffers with 8-byte ones
    # among them: the device never leaves the driver waiting for a frame that came in. A frame
    # that would need more buffers than the ring has is dropped whole and counted.
    import random
    rnd = random.Random(qsize)
    r = stream_rig(post=0, queue_size=qsize)
    dq = r.nd.drv.queues[0]
    assert dq.event_idx
    sent = [frame(n=rnd.choice([60, 900, 1500, 2000]), seed=i) for i in range(150)]
    bufs = {}

    def post(count):
        old = dq.avail_idx
        for _ in range(min(count, len(dq.free))):
            size = 8 if rnd.randrange(5) == 0 else 1024
            addr = r.nd.alloc(size)
            bufs[dq.add([(addr, size, True)])] = (addr, size)
        dq.publish()
        if _need_kick(dq, old):
            r.nd.drv.kick(0)
    post(qsize)
    feeder = threading.Thread(target=lambda: [r.backend.send_frame(f) for f in sent],
                              daemon=True)
    feeder.start()
    got, parts, need = [], [], 0
    while len(got) + r.dev.stats()["rx_drop_too_big"] < len(sent):
        used = r.nd.drv.wait_used(0, 1, timeout=10)
        for head, written in used:
            addr, size = bufs.pop(head)
            if size == 8 and not parts:
                assert written == 0              # no room for the header: given back
                continue
            data = r.nd.mem.read(addr, written)
            if not parts:
                need = struct.unpack_from("<H", data, 10)[0]
                data = data[L.HDR_SIZE:]
            parts.append(data)
            if len(parts) == need:
                got.append(b"".join(parts))
                parts = []
        post(len(used))
    feeder.join(10)
    rest = iter(sent)
    assert all(any(g == f for f in rest) for g in got)      # in order, each whole
    assert len(got) > len(sent) // 2


@pytest.mark.parametrize("qsize", [4, 32])
def test_transmit_with_a_driver_that_kicks_only_when_asked(stream_rig, qsize):
    r = stream_rig(post=4, queue_size=qsize)
    dq = r.nd.drv.queues[1]
    sent = [frame(n=100 + i, seed=i) for i in range(200)]
    received = []
    reader = threading.Thread(target=lambda: [received.append(r.backend.recv_frame())
                                              for _ in sent], daemon=True)
    reader.start()
    i = 0
    while i < len(sent):
        old = dq.avail_idx
        while i < len(sent) and len(dq.free) >= 2:
            r.nd.send(0, sent[i], wait=False, kick=False)
            i += 1
        if _need_kick(dq, old):
            r.nd.drv.kick(1)
        r.nd.drv.wait_used(1, 1, timeout=10)
    reader.join(10)
    assert received == sent


def _used_while_holding_the_gil(dq, fd, action, *args):
    """Another process does `action` (Python, with os, sys and `fd` at hand) on descriptor
    fd after 0.3 s, while this thread spins in Python keeping the GIL until dq's used index
    moves (5 s at most); the used index then."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; time.sleep(0.3); "
         f"fd = int(sys.argv[1]); {action}", str(fd), *args], pass_fds=(fd,))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)              # this thread keeps the GIL while it runs
    try:
        end = time.monotonic() + 5.0
        while dq.used_idx() == 0 and time.monotonic() < end:
            pass                             # busy in Python, never letting the GIL go
        return dq.used_idx()
    finally:
        sys.setswitchinterval(interval)
        child.wait()


def test_receive_needs_no_gil_between_input_and_its_frames(stream_rig):
    # Under KVM, vCPU threads run Python for their exits (and a guest's kick reaches a
    # worker through its ioeventfd): a receive worker places arriving frames without taking
    # the GIL, so a thread busy in Python does not hold receive up. The frame comes from
    # another process while this thread keeps the GIL.
    r = stream_rig(post=4)
    f = frame(n=1000)
    dq = r.nd.drv.queues[0]
    time.sleep(0.05)                         # the worker settles on its wait for input
    fd = r.backend.peer.fileno()
    placed = _used_while_holding_the_gil(
        dq, fd, "os.write(fd, bytes.fromhex(sys.argv[2]))",
        (struct.pack(">I", len(f)) + f).hex())
    assert placed == 1, "the frame waited for the GIL"
    assert r.nd.recv(0)[1] == f


def test_transmit_needs_no_gil_between_a_kick_and_its_frames(stream_rig):
    # A guest's kick reaches the transmit worker through the doorbell's eventfd (KVM writes
    # it, no user space involved): the worker sends without taking the GIL. The kick comes
    # from another process while this thread keeps the GIL.
    r = stream_rig()
    f = frame(n=800)
    dq = r.nd.drv.queues[1]
    time.sleep(0.05)                         # the worker settles on its wait for a kick
    r.nd.send(0, f, wait=False, kick=False)
    sent = _used_while_holding_the_gil(dq, r.fn.doorbell_fd(1), "os.eventfd_write(fd, 1)")
    assert sent == 1, "the frame waited for the GIL"
    assert r.backend.recv_frame() == f


def test_reset_and_reinitialize(stream_rig):
    r = stream_rig()
    r.nd.send(0, frame())
    assert r.backend.recv_frame() == frame()
    r.nd = NetDriver(r.m, SLOT, ALL)
    r.nd.post_rx(0, 16)
    assert r.backend.acked[-2] == Offloads()      # reset took the offloads back
    r.backend.send_frame(frame(seed=3))
    assert r.nd.recv(0)[1] == frame(seed=3)


# -- configuration errors ------------------------------------------------------------------

def _factory(conf, machine=None):
    """A virtio-net from its -s conf, built as `hvframe run` builds it (decoding left off)."""
    fn, = rig(machine or SyntheticMachine(16 << 20), f"-s {SLOT},virtio-net,{conf}",
              direct_boot=False)
    return fn


@pytest.mark.parametrize("conf,msg", [
    ("tap0,queues=0", "queues=0"),
    ("tap0,mac=zz:00:00:00:00:01", "mac="),
    ("tap0,mac=01:00:00:00:00:01", "unicast"),
    ("vmnet0", "unknown backend"),
    ("", "no backend"),
    ("tap0,tap=tap1", "more than one backend"),
    ("tap=this-name-is-far-too-long", "interface name"),
    ("tap0,queue-size=100", "queue-size"),
])
def test_bad_options_are_config_errors(conf, msg):
    with pytest.raises(ConfigError, match=msg):
        _factory(conf)


def test_default_mac_is_stable_and_locally_administered():
    a = default_mac("tap=tap0", (0, 3, 0))
    assert a == default_mac("tap=tap0", (0, 3, 0))
    assert a != default_mac("tap=tap0", (0, 4, 0)) != default_mac("tap=tap1", (0, 3, 0))
    assert a[0] & 2 and not a[0] & 1


# -- through a real tap -------------------------------------------------------------------

def _can_tap():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        return "needs root, /dev/net/tun and ip (iproute2)"
    return None


@pytest.fixture
def netns():
    why = _can_tap()
    if why:
        pytest.skip(why)
    name = f"hvnet-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        yield name, fd
    finally:
        os.close(fd)
        subprocess.run(["ip", "netns", "del", name], check=False)


class TapRig(Rig):
    def __init__(self, netns, conf_extra="", features=ALL, pairs=1, **kw):
        name, fd = netns
        self.tapname = f"hvt{uuid.uuid4().hex[:8]}"
        self.m = SyntheticMachine(64 << 20)
        self.fn = _factory(f"tap={self.tapname},mac={MAC.hex(':')},queues={pairs}{conf_extra}",
                           self.m)
        self.dev = self.fn.device
        self.backend = self.dev.backend
        # The tap goes into the namespace (our descriptors stay attached) and comes up there.
        subprocess.run(["ip", "link", "set", self.tapname, "netns", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", self.tapname, "up"], check=True)
        self.peer = tap_peer_socket(self.tapname, fd)
        self.peer.settimeout(10)
        self.nd = NetDriver(self.m, SLOT, features, **kw)
        for p in range(pairs):
            self.nd.post_rx(p, 64)

    def recv_peer(self, want):
        """Frames the far side saw, until one for which want(frame) holds (the namespace's
        own traffic, IPv6 router solicitations and the like, is passed over)."""
        while True:
            f = self.peer.recv(70000)
            if want(f):
                return f

    def close(self):
        self.peer.close()
        super().close()


def test_tap_tx_rx_byte_for_byte(netns):
    r = TapRig(netns)
    try:
        sent = [frame(dst=bytes.fromhex("020000ccdd02"), src=MAC, n=n, seed=n)
                for n in (46, 500, 1486)]
        for f in sent:
            r.nd.send(0, f, pieces=2)
            assert r.recv_peer(lambda g: g[12:14] == b"\x88\xb5") == f
        inbound = [frame(n=n, seed=n + 1) for n in (46, 700, 1486)]
        for f in inbound:
            r.peer.send(f)
        for f in inbound:
            got = r.nd.recv(0)[1]
            while got[12:14] != b"\x88\xb5":
                got = r.nd.recv(0)[1]
            assert got == f
    finally:
        r.close()


def test_tap_transmit_copied_and_gathered_frames_byte_for_byte(netns):
    """Frames up to 4 KiB leave in one write() of a copy, longer ones in a writev() of the
    guest's buffers (vnet.c, VNET_TX_COPY_MAX): both whole and in order, from one buffer or
    several, either side of the boundary."""
    r = TapRig(netns)
    try:
        peer = bytes.fromhex("020000ccdd02")
        for i, (n, pieces) in enumerate([(4096 - 14, 1), (4096 - 14, 3), (4097 - 14, 1),
                                         (4097 - 14, 4), (9000, 1), (9000, 5), (60, 2)]):
            f = frame(dst=peer, src=MAC, n=n, seed=i)
            r.nd.send(0, f, pieces=pieces)
            assert r.recv_peer(lambda g: g[12:14] == b"\x88\xb5") == f, (n, pieces)
        assert r.dev.stats()["tx_frames"] == 7
    finally:
        r.close()


def test_tap_offloads_follow_acked_features(netns):
    r = TapRig(netns, features=BASIC | bit(L.F_CSUM) | bit(L.F_GUEST_CSUM))
    try:
        from hvframe_virtio_net.tap import TUN_F_CSUM
        assert r.backend.offload_flags == TUN_F_CSUM           # not TSO: not acked
        caps = r.backend.capabilities()
        assert caps.csum and caps.tso4 and caps.tso6
    finally:
        r.close()
    r = TapRig(netns)
    try:
        assert r.backend.offload_flags & 0x7 == 0x7            # CSUM | TSO4 | TSO6
    finally:
        r.close()


def test_tap_two_queue_pairs(netns):
    r = TapRig(netns, pairs=2)
    try:
        assert len(r.backend.queue_fds()) == 2
        assert r.nd.ctrl(L.CTRL_MQ, L.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == L.CTRL_OK
        sent = [frame(dst=bytes.fromhex("020000ccdd02"), src=MAC, seed=p) for p in (0, 1)]
        for p, f in enumerate(sent):
            r.nd.send(p, f)
            assert r.recv_peer(lambda g: g[12:14] == b"\x88\xb5") == f
    finally:
        r.close()


def test_tap_two_queue_pairs_receive_on_both(netns):
    r = TapRig(netns, pairs=2)
    try:
        assert r.nd.ctrl(L.CTRL_MQ, L.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == L.CTRL_OK
        # Many flows: the kernel spreads them over the tap's queues by their hash.
        sent = {_udp_frame(MAC, bytes.fromhex("020000ccdd02"), "10.78.0.1", "10.78.0.2",
                           1000 + i, 7000, bytes([i]) * 50, partial=False) for i in range(64)}
        for f in sent:
            r.peer.send(f)
        got, per_pair = set(), [0, 0]
        end = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < end:
            for p in (0, 1):
                while r.nd.rx_pending(p):
                    f = r.nd.recv(p)[1]
                    if f in sent:
                        got.add(f)
                        per_pair[p] += 1
            time.sleep(0.01)
        assert got == sent
        assert per_pair[0] and per_pair[1], per_pair
    finally:
        r.close()


def test_tap_deleted_takes_link_down(netns):
    r = TapRig(netns)
    try:
        subprocess.run(["ip", "-n", netns[0], "link", "del", r.tapname], check=True)
        r.nd.send(0, frame(src=MAC))
        wait_for(lambda: not r.nd.config(6, 2) & L.S_LINK_UP, what="link down")
    finally:
        r.close()


def test_tap_that_cannot_be_opened_is_a_config_error(netns):
    # A tap that exists with other settings (single-queue) cannot be opened multi-queue.
    name = f"hvx{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "tuntap", "add", name, "mode", "tap"], check=True)
    try:
        with pytest.raises(ConfigError, match=name):
            _factory(f"tap={name},queues=2")
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def _udp_frame(dst_mac, src_mac, src_ip, dst_ip, sport, dport, payload, *, partial):
    """Ethernet/IPv4/UDP; with partial, the UDP checksum holds only the pseudo-header sum
    (what a driver using checksum offload leaves), else the full checksum."""
    import socket as s
    src, dst = s.inet_aton(src_ip), s.inet_aton(dst_ip)
    ulen = 8 + len(payload)

    def fold(x):
        while x >> 16:
            x = (x & 0xFFFF) + (x >> 16)
        return x

    def sum16(b):
        b += b"\0" * (len(b) % 2)
        return sum(struct.unpack(f">{len(b) // 2}H", b))
    pseudo = sum16(src + dst + struct.pack(">BBH", 0, 17, ulen))
    udp = struct.pack(">HHHH", sport, dport, ulen, 0) + payload
    csum = fold(pseudo) if partial else (~fold(pseudo + sum16(udp)) & 0xFFFF) or 0xFFFF
    udp = udp[:6] + struct.pack(">H", csum) + udp[8:]
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 1, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack(">H", ~fold(sum16(ip)) & 0xFFFF) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def _udp_ok(f):
    """Whether the UDP checksum of an Ethernet/IPv4/UDP frame is right."""
    ip = f[14:34]
    udp = f[34:34 + struct.unpack(">H", f[38:40])[0]]
    data = ip[12:20] + struct.pack(">BBH", 0, 17, len(udp)) + udp
    data += b"\0" * (len(data) % 2)
    x = sum(struct.unpack(f">{len(data) // 2}H", data))
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x == 0xFFFF


@pytest.mark.parametrize("guest_csum", [True, False])
def test_tap_checksum_offload_both_ways(netns, guest_csum):
    import socket as s
    feats = ALL if guest_csum else ALL & ~(bit(L.F_GUEST_CSUM) | bit(L.F_GUEST_TSO4)
                                           | bit(L.F_GUEST_TSO6) | bit(L.F_GUEST_ECN))
    r = TapRig(netns, features=feats)
    name, nsfd = netns
    try:
        run = ["ip", "-n", name]
        subprocess.run(run + ["addr", "add", "10.77.0.1/24", "dev", r.tapname], check=True)
        subprocess.run(run + ["neigh", "add", "10.77.0.2", "lladdr", MAC.hex(":"), "dev",
                              r.tapname, "nud", "permanent"], check=True)
        import json
        link = json.loads(subprocess.run(run + ["-j", "link", "show", "dev", r.tapname],
                                         check=True, capture_output=True, text=True).stdout)
        tap_mac = bytes.fromhex(link[0]["address"].replace(":", ""))
        sock = in_netns(nsfd, lambda: s.socket(s.AF_INET, s.SOCK_DGRAM))
        sock.bind(("10.77.0.1", 9000))
        sock.settimeout(10)
        try:
            # Guest to namespace: only the pseudo-header sum, NEEDS_CSUM; the namespace's
            # UDP socket gets the datagram (a wrong checksum would be dropped).
            payload = bytes(range(200))
            f = _udp_frame(tap_mac, MAC, "10.77.0.2", "10.77.0.1", 5555, 9000, payload,
                           partial=True)
            r.nd.send(0, f, flags=L.HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
            assert sock.recvfrom(4096) == (payload, ("10.77.0.2", 5555))
            # Namespace to guest: with GUEST_CSUM the checksum may be left to the guest.
            sock.sendto(payload * 3, ("10.77.0.2", 7777))
            for _ in range(20):
                fields, got = r.nd.recv(0)
                if got[12:14] == b"\x08\x00" and got[23] == 17:
                    break
            flags, gso, hdr_len, gso_size, csum_start, csum_offset, nbuf = fields
            assert got[42:] == payload * 3
            if guest_csum:
                # The namespace's stack left the checksum to the tap, which leaves it to us.
                assert flags & L.HDR_F_NEEDS_CSUM
                assert (csum_start, csum_offset) == (34, 6)
                # What the guest's stack does with it: sum from csum_start, fold, store.
                seg = got[34:] + b"\0" * (len(got[34:]) % 2)
                x = sum(struct.unpack(f">{len(seg) // 2}H", seg))
                while x >> 16:
                    x = (x & 0xFFFF) + (x >> 16)
                got = got[:40] + struct.pack(">H", ~x & 0xFFFF) + got[42:]
                assert _udp_ok(got)
            else:
                assert flags & L.HDR_F_NEEDS_CSUM == 0
                assert _udp_ok(got)
            if not guest_csum:
                assert flags == 0 and r.backend.offload_flags == 0
        finally:
            sock.close()
    finally:
        r.close()


def test_bad_option_on_the_command_line_is_one_line_and_exit_4():
    from hvframe.testing.helpers import run_hvframe
    r = run_hvframe(["run", "-m", "16M", "-s", "0,hostbridge", "-s", "3,virtio-net,tap0,queues=0",
                     "--timeout", "5"])
    assert r.returncode == 4, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "queues=0" in lines[0], r.stderr


def test_tap_flood_with_no_receive_buffers_costs_no_cpu(netns):
    r = TapRig(netns)
    try:
        # The driver takes back every buffer it posted... by never posting more: use them up.
        ours = bytes.fromhex("020000ccdd02")
        f = frame(src=ours, n=1000)
        for _ in range(64):
            r.peer.send(f)
        wait_for(lambda: r.nd.rx_pending(0) >= 64, what="the posted buffers filled")
        t0 = time.process_time() - time.thread_time()
        end = time.monotonic() + 1.0
        n = 0
        while time.monotonic() < end:
            r.peer.send(f)          # the tap queues, then drops and counts: never blocks
            n += 1
        cpu = time.process_time() - time.thread_time() - t0
        assert n > 1000
        assert cpu < 0.2, f"device threads used {cpu:.3f}s of CPU with the ring empty"
        # Buffers again: frames flow again, whole. A fresh one: the tap may have queued
        # none of the flood (here it dropped all but the frame in hand), and the frame in
        # hand may already have gone into a buffer reposted while draining.
        while r.nd.rx_pending(0):
            r.nd.recv(0)
        r.peer.send(f)
        got = r.nd.recv(0)[1]
        while got[6:12] != ours:
            got = r.nd.recv(0)[1]
        assert got == f
    finally:
        r.close()


# ---- what Linux's virtio_net driver does on a tap, without Linux ---------------------------

# The features Linux 6.1's virtio_net driver acknowledged from this device (seen as 0x13087bba7
# under hvframe), and the receive filter it then sets (no promiscuity, its multicast list).
LINUX_FEATURES = (bit(L.F_CSUM) | bit(L.F_GUEST_CSUM) | bit(L.F_CTRL_GUEST_OFFLOADS)
                  | bit(L.F_MAC) | bit(L.F_GUEST_TSO4) | bit(L.F_GUEST_TSO6) | bit(L.F_GUEST_ECN)
                  | bit(L.F_HOST_TSO4) | bit(L.F_HOST_TSO6) | bit(L.F_HOST_ECN)
                  | bit(L.F_MRG_RXBUF) | bit(L.F_STATUS) | bit(L.F_CTRL_VQ) | bit(L.F_CTRL_RX)
                  | bit(L.F_CTRL_MAC_ADDR) | bit(F_RING_INDIRECT_DESC) | bit(F_RING_EVENT_IDX)
                  | bit(F_VERSION_1))
LINUX_MULTICAST = [bytes.fromhex(m) for m in ("333300000001", "01005e000001", "3333ffaabb01")]
HOST_IP, GUEST_IP = "10.0.2.1", "10.0.2.15"


def _answer(f: bytes, ours: bytes) -> bytes | None:
    """What a kernel at GUEST_IP with MAC `ours` answers to frame f: an ARP reply to a
    request for its address, an echo reply to an echo request; else None."""
    import socket as s
    gip = s.inet_aton(GUEST_IP)
    et = f[12:14]
    if et == b"\x08\x06" and len(f) >= 42 and f[20:22] == b"\x00\x01" and f[38:42] == gip:
        smac, sip = f[22:28], f[28:32]
        arp = f[14:20] + b"\x00\x02" + ours + gip + smac + sip
        return smac + ours + b"\x08\x06" + arp
    if et == b"\x08\x00" and f[23] == 1 and f[30:34] == gip:
        ihl = (f[14] & 0x0F) * 4
        total = struct.unpack("!H", f[16:18])[0]
        icmp = bytearray(f[14 + ihl:14 + total])
        if len(icmp) < 8 or icmp[0] != 8:
            return None
        icmp[0], icmp[2:4] = 0, b"\0\0"
        icmp[2:4] = struct.pack("!H", _csum16(bytes(icmp)))
        ip = bytearray(f[14:14 + ihl])
        ip[12:16], ip[16:20] = f[30:34], f[26:30]
        ip[10:12] = b"\0\0"
        ip[10:12] = struct.pack("!H", _csum16(bytes(ip)))
        return f[6:12] + ours + b"\x08\x00" + bytes(ip) + bytes(icmp)
    return None


def _csum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ping_from(netns_fd: int, addr: str, count: int) -> int:
    """Echo requests from inside the namespace, one each 0.2 s; how many distinct ones were
    answered, waiting up to 5 s after the last."""
    import select
    import socket as s
    sock = in_netns(netns_fd, lambda: s.socket(s.AF_INET, s.SOCK_RAW, s.IPPROTO_ICMP))
    answered: set[int] = set()
    try:
        for seq in range(count + 25):
            if seq < count:
                body = struct.pack("!BBHHH", 8, 0, 0, 0x4856, seq) + b"hvframe-linux-like"
                body = body[:2] + struct.pack("!H", _csum16(body)) + body[4:]
                sock.sendto(body, (addr, 0))
            elif len(answered) == count:
                break
            end = time.monotonic() + 0.2
            while select.select([sock], [], [], max(0.0, end - time.monotonic()))[0]:
                pkt = sock.recv(2048)
                icmp = pkt[(pkt[0] & 0x0F) * 4:]
                if len(icmp) >= 8 and icmp[0] == 0 and icmp[4:6] == b"\x48\x56":
                    answered.add(struct.unpack("!H", icmp[6:8])[0])
    finally:
        sock.close()
    return len(answered)


def test_namespace_pings_a_linux_like_driver_on_a_tap(netns):
    """The acceptance path of Linux's driver (tests/test_linux_net.py) in seconds: a tap in a
    namespace with an address, a driver that negotiates what Linux 6.1 negotiates (EVENT_IDX,
    mergeable buffers, the offloads), turns promiscuity off and sets its multicast list as
    Linux does, and answers ARP and ICMP echo like a kernel. The namespace's kernel resolves
    the address by ARP (a broadcast in, a reply out) and its pings are answered, all ten."""
    name, fd = netns
    r = TapRig(netns, features=LINUX_FEATURES, rx_buf_size=1536)
    stop = threading.Event()
    errors: list[BaseException] = []

    def kernel():
        try:
            while not stop.is_set():
                try:
                    _, f = r.nd.recv(0, timeout=0.2)
                except TimeoutError:
                    continue
                reply = _answer(f, MAC)
                if reply is not None:
                    r.nd.send(0, reply)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=kernel, name="linux-like responder")
    try:
        assert r.nd.ctrl(L.CTRL_RX, L.CTRL_RX_PROMISC, b"\0") == L.CTRL_OK
        assert r.nd.ctrl(L.CTRL_RX, L.CTRL_RX_ALLMULTI, b"\0") == L.CTRL_OK
        tables = struct.pack("<I", 0) + struct.pack("<I", len(LINUX_MULTICAST)) \
            + b"".join(LINUX_MULTICAST)
        assert r.nd.ctrl(L.CTRL_MAC, L.CTRL_MAC_TABLE_SET, tables) == L.CTRL_OK
        subprocess.run(["ip", "-n", name, "addr", "add", f"{HOST_IP}/24", "dev", r.tapname],
                       check=True)
        t.start()
        answered = _ping_from(fd, GUEST_IP, 10)
        st = r.dev.stats()
        assert not errors, errors
        assert answered == 10, f"{answered} of 10 answered; device counters: " \
                               f"{ {k: v for k, v in st.items() if v} }"
    finally:
        stop.set()
        if t.is_alive():
            t.join(10)
        r.close()


# -- checkpoint -----------------------------------------------------------------------------

class _StreamServer:
    """The far side of `stream=unix:PATH`: accepts the device's connection, speaks the
    4-byte-length framing (a passt stand-in)."""

    def __init__(self, path):
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(2)
        self.conns = []

    def accept(self):
        self.srv.settimeout(10)
        c, _ = self.srv.accept()
        self.conns.append(c)
        self.conn, self.buf = c, b""

    def send_frame(self, f):
        self.conn.sendall(struct.pack(">I", len(f)) + f)

    def recv_frame(self, timeout=10.0):
        end = time.monotonic() + timeout
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">I", self.buf[:4])[0]:
            self.conn.settimeout(max(0.01, end - time.monotonic()))
            data = self.conn.recv(1 << 20)
            if not data:
                raise EOFError("the device closed its connection")
            self.buf += data
        n = struct.unpack(">I", self.buf[:4])[0]
        f, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
        return f

    def close(self):
        for s in self.conns + [self.srv]:
            s.close()


def test_checkpoint_moves_a_running_driver_to_a_new_machine(tmp_path):
    """virtio-net on `stream=unix:PATH`, a driver exchanging frames with promisc off, a MAC
    set by CTRL_MAC_ADDR_SET and CSUM offload turned off: quiesced, its record and guest RAM
    put into a machine built from the same command line (the backend reopened), where the
    driver goes on with its rings: frames both ways byte for byte, the filter and offloads
    as the driver left them."""
    from hvframe.snapshot.state import decode_into, encode
    server = _StreamServer(tmp_path / "passt.sock")
    line = f"-s {SLOT},virtio-net,stream=unix:{tmp_path / 'passt.sock'},mac={format_mac(MAC)}"
    machines = []
    try:
        ma = SyntheticMachine(64 << 20)
        machines.append(ma)
        fa, = rig(ma, line, direct_boot=False)
        server.accept()
        nd = NetDriver(ma, SLOT, ALL)
        nd.post_rx(0, 16)
        new_mac = bytes.fromhex("020000aabb77")
        assert nd.ctrl(L.CTRL_MAC, L.CTRL_MAC_ADDR_SET, new_mac) == L.CTRL_OK
        assert nd.ctrl(L.CTRL_RX, L.CTRL_RX_PROMISC, b"\0") == L.CTRL_OK
        assert nd.ctrl(L.CTRL_GUEST_OFFLOADS, L.CTRL_GUEST_OFFLOADS_SET,
                       struct.pack("<Q", 0)) == L.CTRL_OK
        for i in range(3):
            nd.send(0, frame(n=200 + i, seed=i))
            assert server.recv_frame() == frame(n=200 + i, seed=i)
            server.send_frame(frame(dst=new_mac, n=300 + i, seed=i))
            assert nd.recv(0)[1] == frame(dst=new_mac, n=300 + i, seed=i)
        before = fa.device.stats()

        fa.quiesce()
        record = encode(fa)
        ram = ma.memory.read(0, ma.memory.size)
        ma.close()                       # the source goes away, its connection with it

        mb = SyntheticMachine(64 << 20)
        machines.append(mb)
        fb, = rig(mb, line, direct_boot=False)
        server.accept()
        mb.memory.write(0, ram)
        decode_into(fb, record, "virtio-net")
        dev = fb.device
        assert dev.config_bytes()[:6] == new_mac
        assert dev.filter.promisc == 0 and dev.guest_offloads == Offloads()
        assert dev.stats()["tx_frames"] == before["tx_frames"] == 3
        assert dev.stats()["rx_frames"] == before["rx_frames"] == 3

        # The driver carries on against the new machine with its rings as they were.
        drv = type(nd.drv)(mb, SLOT)
        drv.queues = nd.drv.queues
        for q in drv.queues:
            q.mem = mb.memory
        drv.data_base = nd.drv.data_base
        nd.m, nd.mem, nd.drv, nd.dev = mb, mb.memory, drv, dev
        sent = frame(n=1500, seed=9)
        nd.send(0, sent)
        assert server.recv_frame() == sent
        got = frame(dst=new_mac, n=1200, seed=8)
        server.send_frame(frame(dst=bytes.fromhex("020000999999"), seed=7))  # filtered now
        server.send_frame(got)
        assert nd.recv(0)[1] == got
        assert dev.stats()["rx_drop_filtered"] == before["rx_drop_filtered"] + 1

        # A record of another version is refused in one line.
        other = SyntheticMachine(64 << 20)
        machines.append(other)
        fc, = rig(other, line, direct_boot=False)
        server.accept()
        bad = encode(fa.device)
        with pytest.raises(ConfigError, match="state version 2") as e:
            decode_into(fc.device, b"\x02\x00" + bad[2:], "virtio-net")
        assert "\n" not in str(e.value)
    finally:
        for m in machines:
            m.close()
        server.close()


def test_restored_device_applies_the_drivers_offloads_to_its_new_backend():
    """The receive offloads a driver chose by CTRL_GUEST_OFFLOADS (not the negotiated ones)
    are what the restored device's new backend is told; a record for another MTU is
    refused in one line."""
    from hvframe.snapshot.state import decode_into, encode

    class Caps(StreamPair):
        def capabilities(self):
            return Offloads(csum=True, tso4=True, tso6=True, ecn=True)

    def target(mtu=None):
        m = SyntheticMachine(64 << 20)
        be = Caps()
        fn = VirtioPciFunction(VirtioNet(be, mac=MAC, mtu=mtu), name="virtio-net restored")
        m.add_device(place(m, fn, (0, SLOT, 0)))
        m.pci.assign_bars()
        return m, fn, be

    a = Rig(Caps())
    machines = [a.m]
    try:
        chosen = bit(L.F_GUEST_CSUM) | bit(L.F_GUEST_TSO4)
        assert a.nd.ctrl(L.CTRL_GUEST_OFFLOADS, L.CTRL_GUEST_OFFLOADS_SET,
                         struct.pack("<Q", chosen)) == L.CTRL_OK
        a.fn.quiesce()
        record = encode(a.fn)
        ram = a.m.memory.read(0, a.m.memory.size)
        a.fn.unquiesce()

        m, fn, be = target()
        machines.append(m)
        m.memory.write(0, ram)
        decode_into(fn, record, "virtio-net")
        assert be.acked[-1] == Offloads(csum=True, tso4=True)
        assert fn.device.feat.guest_tso4 and not fn.device.feat.guest_tso6

        m2, fn2, _ = target(mtu=1000)
        machines.append(m2)
        m2.memory.write(0, ram)
        with pytest.raises(ConfigError, match="mtu=none.*mtu=1000") as e:
            decode_into(fn2, record, "virtio-net")
        assert "\n" not in str(e.value)
    finally:
        for machine in machines:
            machine.close()


def test_quiesce_finishes_a_frame_half_written_to_a_stream(stream_rig):
    """A frame the peer has taken only part of when the checkpoint starts: quiesce writes
    the rest (the peer gets it whole) before it returns, so no record is taken with half a
    frame on the wire."""
    be = StreamPair(sndbuf=4096)
    r = stream_rig(backend=be)
    big = frame(n=60000, seed=5)
    r.nd.send(0, big, wait=False)
    port = r.dev.ports[0].c
    wait_for(lambda: port.tx_len > port.tx_off, what="a partial write")
    done = threading.Event()

    def quiesce():
        r.fn.quiesce()
        done.set()
    t = threading.Thread(target=quiesce)
    t.start()
    try:
        assert be.recv_frame() == big
        assert done.wait(10)
        assert port.tx_len == port.tx_off == 0
    finally:
        t.join(10)
        r.fn.unquiesce()
    f = frame(n=300, seed=6)
    r.nd.send(0, f)
    assert be.recv_frame() == f
