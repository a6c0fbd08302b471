"""vfio-user conformance, from the specification (QEMU docs/interop/vfio-user.rst): every
command a client sends, answered by hvframe's device server; malformed messages (bad sizes,
unknown commands, file descriptors where none are expected) answered with error replies and
never a crash of the server; and a client that survives a server sending garbage.

The server runs in this process on one end of a socketpair, serving a virtio-blk device on a
ServerMachine; the other end is driven message by message."""
import errno
import json
import os
import socket
import struct
import threading
import time
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hvframe.plugins import Registry
from hvframe_passthru import protocol as p
from hvframe_passthru.backend import BackendLost
from hvframe_passthru.server import DeviceServer, build
from hvframe_passthru.vfio_user import VfioUserBackend


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    disk = tmp_path_factory.mktemp("vu") / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    machine, fn = build(Registry(platform=False), f"virtio-blk,{disk}")
    server = DeviceServer(machine, fn)
    yield server
    machine.close()


class Peer:
    """The client end of a socketpair whose other end the server serves on a thread."""

    def __init__(self, server):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.settimeout(10)
        self.conn = p.Connection(a)
        self.server = server
        self.thread = threading.Thread(target=self._serve, args=(b,), daemon=True)
        self.ended = None
        self.thread.start()

    def _serve(self, sock):
        self.ended = self.server.serve(sock)

    def call(self, command, payload=b"", fds=(), flags=p.TYPE_COMMAND, msg_id=None):
        msg_id = self.conn.next_id() if msg_id is None else msg_id
        self.conn.send(p.encode(msg_id, command, payload, flags=flags), fds)
        reply = self.conn.recv()
        assert reply.is_reply and reply.msg_id == msg_id and reply.command == command
        return reply

    def negotiate(self):
        r = self.call(p.VERSION, p.version_payload({"max_msg_fds": 8}))
        assert not r.flags & p.FLAG_ERROR
        return p.parse_version(r.payload)

    def close(self):
        self.conn.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def peer(served):
    pe = Peer(served)
    yield pe
    pe.close()


def err(reply):
    assert reply.flags & p.FLAG_ERROR, reply
    assert reply.payload == b""                 # an error reply is the header alone
    return reply.error


def region_read(peer, region, offset, count):
    return peer.call(p.REGION_READ, p.RegionAccess.build(dict(offset=offset, region=region,
                                                              count=count)))


def still_serving(peer):
    r = region_read(peer, p.PCI_CONFIG_REGION, 0, 4)
    assert not r.flags & p.FLAG_ERROR
    assert r.payload[16:20] == struct.pack("<HH", 0x1AF4, 0x1001)


# -- every message type -------------------------------------------------------------------------
def test_version_negotiation_and_capabilities(peer):
    major, minor, caps = peer.negotiate()
    assert (major, minor) == (0, 1)
    assert caps["max_msg_fds"] == 8                    # a subset of what we proposed
    assert caps["max_data_xfer_size"] <= p.MAX_DATA_XFER
    assert err(peer.call(p.VERSION, p.version_payload({}))) == errno.EINVAL   # only once


def test_commands_before_version_are_refused(peer):
    assert err(region_read(peer, p.PCI_CONFIG_REGION, 0, 4)) == errno.EINVAL
    peer.negotiate()
    still_serving(peer)


@pytest.mark.parametrize("payload", [
    b"", b"\0", struct.pack("<HH", 0, 1) + b"{}",                      # no NUL
    struct.pack("<HH", 0, 1) + b"[1]\0",                                # not an object
    struct.pack("<HH", 0, 1) + b'{"capabilities": {"max_msg_fds": "x"}}\0',
    struct.pack("<HH", 0, 1) + b"\xff\xfe\0",
    struct.pack("<HH", 0, 1) + b"{" * 5000 + b"\0",
    struct.pack("<HH", 7, 1),                                           # unknown major
])
def test_bad_version_messages(peer, payload):
    assert err(peer.call(p.VERSION, payload)) in (errno.EINVAL, errno.ENOTSUP)
    peer.negotiate()                                    # and a good one still works after


def test_device_info_region_info_irq_info(peer):
    peer.negotiate()
    r = peer.call(p.DEVICE_GET_INFO, p.DeviceInfo.build(dict(argsz=16, flags=0, num_regions=0,
                                                             num_irqs=0)))
    info = p.DeviceInfo.parse(r.payload)
    assert info.flags & p.DEVICE_FLAGS_PCI and info.flags & p.DEVICE_FLAGS_RESET
    assert (info.num_regions, info.num_irqs) == (9, 5)
    sizes = {}
    for i in range(9):
        r = peer.call(p.DEVICE_GET_REGION_INFO, p.RegionInfo.build(dict(
            argsz=32, flags=0, index=i, cap_offset=0, size=0, offset=0)))
        ri = p.RegionInfo.parse(r.payload)
        assert ri.index == i
        sizes[i] = ri.size
    assert sizes == {0: 128, 1: 4096, 2: 0, 3: 0, 4: 16384, 5: 0, 6: 0, 7: 256, 8: 0}
    assert err(peer.call(p.DEVICE_GET_REGION_INFO, p.RegionInfo.build(dict(
        argsz=32, flags=0, index=9, cap_offset=0, size=0, offset=0)))) == errno.EINVAL
    counts = {}
    for i in range(5):
        r = peer.call(p.DEVICE_GET_IRQ_INFO, p.IrqInfo.build(dict(argsz=16, flags=0, index=i,
                                                                  count=0)))
        counts[i] = p.IrqInfo.parse(r.payload).count
    assert counts == {0: 1, 1: 0, 2: 2, 3: 0, 4: 0}


def test_region_io_fds_are_the_doorbells(peer):
    peer.negotiate()
    r = peer.call(p.DEVICE_GET_REGION_IO_FDS, p.RegionIoFdsRequest.build(dict(
        argsz=16, flags=0, index=4, count=0)))
    head = p.RegionIoFdsRequest.parse(r.payload[:16])
    subs = [p.SubRegionIoFd.parse(r.payload[16 + 40 * i:56 + 40 * i]) for i in range(head.count)]
    assert head.count == 1 and len(r.fds) == 1
    assert subs[0].offset == 0x3000 and subs[0].type == p.IO_FD_TYPE_IOEVENTFD
    r.close_fds()
    r = peer.call(p.DEVICE_GET_REGION_IO_FDS, p.RegionIoFdsRequest.build(dict(
        argsz=16, flags=0, index=0, count=0)))
    sub = p.SubRegionIoFd.parse(r.payload[16:56])
    assert sub.flags == p.IOEVENTFD_FLAG_PIO | p.IOEVENTFD_FLAG_DATAMATCH and sub.datamatch == 0
    r.close_fds()


def test_dma_map_unmap_with_descriptors(peer):
    peer.negotiate()
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 1 << 20)
    os.pwrite(fd, b"hello", 0x1000)
    try:
        m = p.DmaMap.build(dict(argsz=32, flags=3, offset=0, address=0x100000, size=1 << 20))
        assert not peer.call(p.DMA_MAP, m, [fd]).flags & p.FLAG_ERROR
        assert peer.server.machine.memory.read(0x101000, 5) == b"hello"
        assert err(peer.call(p.DMA_MAP, m, [fd])) == errno.EEXIST           # overlapping
        assert err(peer.call(p.DMA_MAP, m)) == errno.ENOTSUP                 # no descriptor
        assert err(peer.call(p.DMA_MAP, m, [fd, fd])) == errno.EINVAL
        bad = p.DmaMap.build(dict(argsz=32, flags=3, offset=0, address=0x100001, size=4096))
        assert err(peer.call(p.DMA_MAP, bad, [fd])) == errno.EINVAL          # unaligned
        u = p.DmaUnmap.build(dict(argsz=24, flags=0, address=0x100000, size=1 << 20))
        r = peer.call(p.DMA_UNMAP, u)
        assert r.payload == u
        assert not peer.server.machine.memory.contains(0x101000)
        assert err(peer.call(p.DMA_UNMAP, u)) == errno.ENOENT
        all_ = p.DmaUnmap.build(dict(argsz=24, flags=p.DMA_UNMAP_ALL, address=0, size=0))
        assert not peer.call(p.DMA_UNMAP, all_).flags & p.FLAG_ERROR
    finally:
        os.close(fd)


def test_region_read_write_and_reset(peer):
    peer.negotiate()
    r = region_read(peer, p.PCI_CONFIG_REGION, 0, 64)
    assert p.RegionAccess.parse(r.payload[:16]).count == 64 and len(r.payload) == 80
    # BAR registers read as type bits only and ignore writes (the client places BARs).
    assert r.payload[16 + 0x10:16 + 0x14] == struct.pack("<I", 1)
    w = p.RegionAccess.build(dict(offset=0x10, region=7, count=4)) + struct.pack("<I", 0xC000)
    assert peer.call(p.REGION_WRITE, w).payload == w[:16]
    assert region_read(peer, 7, 0x10, 4).payload[16:] == struct.pack("<I", 1)
    # Device status through the common configuration in BAR4.
    w = p.RegionAccess.build(dict(offset=0x14, region=4, count=1)) + b"\x01"
    peer.call(p.REGION_WRITE, w)
    assert region_read(peer, 4, 0x14, 1).payload[16:] == b"\x01"
    assert not peer.call(p.DEVICE_RESET).flags & p.FLAG_ERROR
    assert region_read(peer, 4, 0x14, 1).payload[16:] == b"\x00"
    multi = p.WriteMultiHead.build(dict(wr_cnt=1)) + p.WriteMultiEntry.build(dict(
        offset=0x14, region=4, count=1, data=b"\x01" + bytes(7)))
    assert p.WriteMultiHead.parse(peer.call(p.REGION_WRITE_MULTI, multi).payload).wr_cnt == 1
    peer.call(p.DEVICE_RESET)


def test_set_irqs_eventfds(peer):
    peer.negotiate()
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    try:
        hdr = p.IrqSet.build(dict(argsz=20, flags=p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER,
                                  index=p.PCI_MSIX_IRQ, start=0, count=2))
        assert not peer.call(p.DEVICE_SET_IRQS, hdr, fds).flags & p.FLAG_ERROR
        assert peer.server.fn.msix.enabled                   # the device's own MSI-X follows
        # The client triggers vector 1 itself: its eventfd is signalled.
        trig = p.IrqSet.build(dict(argsz=21, flags=p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_TRIGGER,
                                   index=p.PCI_MSIX_IRQ, start=1, count=1)) + b"\x01"
        peer.call(p.DEVICE_SET_IRQS, trig)
        assert os.eventfd_read(fds[1]) == 1
        off = p.IrqSet.build(dict(argsz=20, flags=p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER,
                                  index=p.PCI_MSIX_IRQ, start=0, count=0))
        peer.call(p.DEVICE_SET_IRQS, off)
        assert not peer.server.fn.msix.enabled
        for flags, index, start, count, n in (
                (p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, p.PCI_MSIX_IRQ, 1, 2, 2),
                (p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, p.PCI_MSIX_IRQ, 0, 2, 1),
                (p.IRQ_SET_DATA_EVENTFD, p.PCI_MSIX_IRQ, 0, 1, 1),
                (p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, 9, 0, 1, 0),
                (p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, p.PCI_MSIX_IRQ, 0, 1, 1)):
            msg = p.IrqSet.build(dict(argsz=20, flags=flags, index=index, start=start,
                                      count=count))
            assert err(peer.call(p.DEVICE_SET_IRQS, msg, fds[:n])) == errno.EINVAL
    finally:
        for fd in fds:
            os.close(fd)


def test_one_vector_set_irqs_leaves_the_other_vectors_alone(peer):
    """A SET_IRQS naming one MSI-X vector changes that vector only: a vector the client
    masked stays masked (its interrupt goes pending, not to its eventfd) until unmasked."""
    peer.negotiate()
    x = peer.server.fn.msix
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]

    def set_irqs(flags, start, count, extra=b"", send=()):
        msg = p.IrqSet.build(dict(argsz=20 + len(extra), flags=flags, index=p.PCI_MSIX_IRQ,
                                  start=start, count=count)) + extra
        assert not peer.call(p.DEVICE_SET_IRQS, msg, send).flags & p.FLAG_ERROR

    def signalled(fd):
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0
    try:
        set_irqs(p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 0, 2, send=fds[:2])
        set_irqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, 0, 1)
        set_irqs(p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 1, 1, send=fds[2:])
        assert x.vector_masked(0)
        x.notify(0)                     # the device fires the masked vector
        x.notify(1)
        assert signalled(fds[0]) == 0 and x.is_pending(0)
        assert signalled(fds[1]) == 0 and signalled(fds[2]) == 1     # vector 1's new eventfd
        set_irqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK, 0, 1)
        assert signalled(fds[0]) == 1 and not x.is_pending(0)
    finally:
        set_irqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, 0, 0)
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("command", [p.DMA_READ, p.DMA_WRITE, p.DEVICE_FEATURE,
                                     p.MIG_DATA_READ, p.MIG_DATA_WRITE, 14, 19, 0xFFFF])
def test_unsupported_and_unknown_commands(peer, command):
    peer.negotiate()
    assert err(peer.call(command, b"\0" * 8)) in (errno.ENOSYS, errno.ENOTSUP, errno.EINVAL)
    still_serving(peer)


def test_descriptors_where_none_are_expected_are_refused_and_closed(peer):
    peer.negotiate()
    fd = os.eventfd(0)
    try:
        r = peer.call(p.REGION_READ, p.RegionAccess.build(dict(offset=0, region=7, count=4)),
                      [fd])
        assert err(r) == errno.EINVAL
        still_serving(peer)
    finally:
        os.close(fd)


@pytest.mark.parametrize("command, payload", [
    (p.REGION_READ, b"\0" * 15), (p.REGION_READ, b"\0" * 17),
    (p.REGION_READ, p.RegionAccess.build(dict(offset=0, region=7, count=0))),
    (p.REGION_READ, p.RegionAccess.build(dict(offset=250, region=7, count=8))),
    (p.REGION_READ, p.RegionAccess.build(dict(offset=2 ** 64 - 1, region=4, count=4))),
    (p.REGION_READ, p.RegionAccess.build(dict(offset=0, region=2, count=4))),
    (p.REGION_READ, p.RegionAccess.build(dict(offset=0, region=99, count=4))),
    (p.REGION_READ, p.RegionAccess.build(dict(offset=0, region=7, count=2 ** 31))),
    (p.REGION_WRITE, p.RegionAccess.build(dict(offset=0, region=7, count=8)) + b"\0" * 4),
    (p.REGION_WRITE_MULTI, p.WriteMultiHead.build(dict(wr_cnt=5))),
    (p.DEVICE_GET_INFO, b"\0" * 4), (p.DEVICE_RESET, b"\0"),
    (p.DMA_UNMAP, b"\0" * 23), (p.DEVICE_SET_IRQS, b"\0" * 8),
])
def test_bad_sizes_are_einval(peer, command, payload):
    peer.negotiate()
    assert err(peer.call(command, payload)) == errno.EINVAL
    still_serving(peer)


def test_oversized_message_closes_the_connection_without_reading_it(served):
    peer = Peer(served)
    peer.conn.send(p.Header.build(dict(msg_id=1, command=p.REGION_WRITE,
                                       size=p.MAX_MESSAGE + 1, flags=0, error=0)))
    peer.thread.join(10)
    assert not peer.thread.is_alive() and "message size" in peer.ended
    peer.close()
    again = Peer(served)                     # the server takes the next client
    again.negotiate()
    still_serving(again)
    again.close()


def test_undersized_header_size_closes_the_connection(served):
    peer = Peer(served)
    peer.conn.send(p.Header.build(dict(msg_id=1, command=1, size=8, flags=0, error=0)))
    peer.thread.join(10)
    assert "message size" in peer.ended
    peer.close()


def test_no_reply_flag_is_honoured(peer):
    peer.negotiate()
    peer.conn.send(p.encode(5, p.DEVICE_RESET, flags=p.FLAG_NO_REPLY))
    still_serving(peer)                     # the next reply is this one's, not the reset's


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.integers(0, 20), flags=st.integers(0, 0xFF),
       payload=st.binary(max_size=96), nfds=st.integers(0, 3))
def test_random_messages_never_crash_the_server(served, command, flags, payload, nfds):
    peer = Peer(served)
    fds = [os.eventfd(0) for _ in range(nfds)]
    try:
        peer.negotiate()
        msg_id = peer.conn.next_id()
        peer.conn.send(p.encode(msg_id, command, payload, flags=flags), fds)
        if not flags & p.FLAG_NO_REPLY and flags & p.TYPE_MASK == p.TYPE_COMMAND:
            r = peer.conn.recv()
            assert r.is_reply and r.msg_id == msg_id
            r.close_fds()
        # Replies sent to a server, and no-reply commands, get no answer; it serves on.
        still_serving(peer)
    finally:
        for fd in fds:
            os.close(fd)
        peer.close()
    assert served.machine.memory.regions == ()          # a client's maps go with it


# -- the client against a misbehaving server ---------------------------------------------------
def fake_server(sock_path, answer, raw=False):
    """A server that negotiates, then answers every command with answer(msg) (with raw,
    answer(msg, conn) sends what it likes itself)."""
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(str(sock_path))
    ls.listen(1)

    def run():
        s, _ = ls.accept()
        conn = p.Connection(s)
        try:
            msg = conn.recv()
            conn.send(p.encode(msg.msg_id, p.VERSION, p.version_payload({}), flags=p.TYPE_REPLY))
            while True:
                msg = conn.recv()
                msg.close_fds()
                if raw:
                    answer(msg, conn)
                else:
                    conn.send(answer(msg))
        except p.ProtocolError:
            pass
        finally:
            conn.close()
            ls.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=64), same_id=st.booleans())
def test_client_survives_garbage_replies(tmp_path_factory, junk, same_id):
    path = tmp_path_factory.mktemp("fake") / "s"

    def answer(msg):
        return p.encode(msg.msg_id if same_id else msg.msg_id + 1, msg.command, junk,
                        flags=p.TYPE_REPLY)
    t = fake_server(path, answer)
    b = VfioUserBackend(str(path), deadline=2)
    try:
        for op in (lambda: b.region_info(0), lambda: b.region_read(7, 0, 4),
                   lambda: b.irq_info(2), lambda: b.region_io_fds(4)):
            try:
                op()
            except (BackendLost, p.RemoteError):
                pass
    finally:
        b.close()
        t.join(5)


def test_client_error_reply_is_remote_error(tmp_path):
    t = fake_server(tmp_path / "s", lambda msg: p.encode(
        msg.msg_id, msg.command, flags=p.TYPE_REPLY | p.FLAG_ERROR, error=errno.EIO))
    b = VfioUserBackend(str(tmp_path / "s"), deadline=2)
    try:
        with pytest.raises(p.RemoteError, match="REGION_READ"):
            b.region_read(7, 0, 4)
    finally:
        b.close()
        t.join(5)


def test_client_gives_up_on_a_silent_server(tmp_path):
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(str(tmp_path / "s"))
    ls.listen(1)
    try:
        with pytest.raises(BackendLost):
            VfioUserBackend(str(tmp_path / "s"), deadline=0.5)
    finally:
        ls.close()


def set_irq_msg(vector):
    return p.IrqSet.build(dict(argsz=20, flags=p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER,
                               index=p.PCI_MSIX_IRQ, start=vector, count=1))


def test_set_irqs_has_a_shorter_deadline(tmp_path):
    """SET_IRQS is sent under the MSI-X lock: a server that does not answer it is given up
    after irq_deadline, not after the deadline of other commands."""
    gate = threading.Event()

    def answer(msg):
        if msg.command == p.DEVICE_SET_IRQS:
            gate.wait(10)                       # hung
        return p.encode(msg.msg_id, msg.command, flags=p.TYPE_REPLY)
    t = fake_server(tmp_path / "s", answer)
    b = VfioUserBackend(str(tmp_path / "s"), deadline=5, irq_deadline=0.3)
    fd = os.eventfd(0)
    try:
        b.reset()                               # other commands: answered
        start = time.monotonic()
        with pytest.raises(BackendLost):
            b.set_irq_eventfd(p.PCI_MSIX_IRQ, 1, fd)
        assert time.monotonic() - start < 2
        with pytest.raises(BackendLost):        # and the connection is given up
            b.reset()
    finally:
        gate.set()
        os.close(fd)
        b.close()
        t.join(5)


@contextmanager
def _set_irqs_behind_a_read(tmp_path, *, hold, release=lambda: None, deadline):
    """A fake server that answers a REGION_READ once hold() returns (other commands at
    once), a backend on it (`deadline`, SET_IRQS 0.3 s), an eventfd, and a thread whose
    region read the server is holding when this yields (backend, eventfd, the read's
    outcome: a list that gets (exception or None, when), complete once the block is left).
    release() lets the server go on."""
    reading = threading.Event()

    def answer(msg):
        if msg.command == p.REGION_READ:
            reading.set()
            hold()
            return p.encode(msg.msg_id, msg.command, p.RegionAccess.build(dict(
                offset=0, region=7, count=4)) + bytes(4), flags=p.TYPE_REPLY)
        return p.encode(msg.msg_id, msg.command, flags=p.TYPE_REPLY)
    t = fake_server(tmp_path / "s", answer)
    b = VfioUserBackend(str(tmp_path / "s"), deadline=deadline, irq_deadline=0.3)
    fd = os.eventfd(0)
    outcome = []

    def read():
        try:
            b.region_read(7, 0, 4)
            outcome.append((None, time.monotonic()))
        except BaseException as e:
            outcome.append((e, time.monotonic()))
    reader = threading.Thread(target=read)
    try:
        reader.start()
        assert reading.wait(5)
        yield b, fd, outcome
    finally:
        release()
        reader.join(5)
        os.close(fd)
        b.close()
        t.join(5)


def test_set_irqs_waits_behind_a_slow_command_that_is_within_its_deadline(tmp_path):
    """A server taking 1 s over a region access (a reset flushing a large image, say) is slow,
    not hung: a SET_IRQS behind it waits, and both succeed."""
    with _set_irqs_behind_a_read(tmp_path, hold=lambda: time.sleep(1.0),
                                 deadline=5) as (b, fd, read):
        b.set_irq_eventfd(p.PCI_MSIX_IRQ, 1, fd)     # no BackendLost
        b.reset()                                   # the connection is still there
    assert read and read[0][0] is None, read        # the read behind it succeeded too


def test_set_irqs_behind_a_hung_command_ends_when_that_command_times_out(tmp_path):
    """A command the server never answers times out after its own deadline and the device is
    lost; a SET_IRQS waiting behind it gives up by then plus its own deadline."""
    gate = threading.Event()
    with _set_irqs_behind_a_read(tmp_path, hold=lambda: gate.wait(10), release=gate.set,
                                 deadline=1.0) as (b, fd, read):
        start = time.monotonic()
        with pytest.raises(BackendLost):
            b.set_irq_eventfd(p.PCI_MSIX_IRQ, 1, fd)
        assert time.monotonic() - start < 1.0 + 0.3 + 0.5
    assert isinstance(read[0][0], BackendLost) and read[0][1] - start < 1.5


@pytest.mark.parametrize("stall", ["requests of its own", "a reply a byte at a time"])
def test_a_server_cannot_stretch_an_exchange_past_its_deadline(tmp_path, stall):
    """Each exchange has one deadline, not one per socket call: a server that keeps sending
    requests of its own before the reply, or sends the reply a byte at a time, is given up
    when the exchange's deadline is past."""
    stop = threading.Event()

    def answer(msg, conn):
        if msg.command != p.DEVICE_SET_IRQS:
            conn.send(p.encode(msg.msg_id, msg.command, flags=p.TYPE_REPLY))
            return
        if stall == "requests of its own":
            n = 0
            while not stop.is_set():
                n += 1
                conn.send(p.encode(1000 + n, p.DMA_READ, p.DmaAccess.build(dict(
                    address=0, count=4))))
                time.sleep(0.05)
                try:
                    conn.sock.setblocking(False)
                    conn.sock.recv(4096)            # the client's refusals
                except OSError:
                    pass
                finally:
                    conn.sock.setblocking(True)
        else:
            for byte in p.encode(msg.msg_id, msg.command, flags=p.TYPE_REPLY):
                if stop.wait(0.25):
                    return
                conn.sock.send(bytes([byte]))
    t = fake_server(tmp_path / "s", answer, raw=True)
    b = VfioUserBackend(str(tmp_path / "s"), deadline=5, irq_deadline=0.5)
    fd = os.eventfd(0)
    try:
        b.reset()
        start = time.monotonic()
        with pytest.raises(BackendLost):
            b.set_irq_eventfd(p.PCI_MSIX_IRQ, 1, fd)
        assert time.monotonic() - start < 0.5 + 0.5
    finally:
        stop.set()
        os.close(fd)
        b.close()
        t.join(5)


def test_version_json_round_trip():
    payload = p.version_payload({"max_msg_fds": 3})
    assert p.parse_version(payload) == (0, 1, {"max_msg_fds": 3})
    assert json.loads(payload[4:-1])["capabilities"]["max_msg_fds"] == 3


def test_client_keeps_only_doorbells_kvm_can_bind(tmp_path):
    """A server's sub-regions of a size KVM's ioeventfd does not match (with a datamatch:
    1, 2, 4 or 8 bytes) are left out, their descriptors not kept: those writes stay
    trapped, for the server to answer."""
    efds = [os.eventfd(0) for _ in range(3)]

    def answer(msg, conn):
        if msg.command != p.DEVICE_GET_REGION_IO_FDS:
            conn.send(p.encode(msg.msg_id, msg.command, flags=p.TYPE_REPLY | p.FLAG_ERROR,
                               error=errno.ENOTSUP))
            return
        subs = b"".join(p.SubRegionIoFd.build(dict(
            offset=0x100 * i, size=size, fd_index=i, type=p.IO_FD_TYPE_IOEVENTFD,
            flags=p.IOEVENTFD_FLAG_DATAMATCH, padding=0, datamatch=i))
            for i, size in enumerate((4, 3, 0)))
        head = p.RegionIoFdsRequest.build(dict(argsz=p.RegionIoFdsRequest.sizeof() + len(subs),
                                               flags=0, index=4, count=3))
        conn.send(p.encode(msg.msg_id, msg.command, head + subs, flags=p.TYPE_REPLY), efds)

    t = fake_server(tmp_path / "s", answer, raw=True)
    b = VfioUserBackend(str(tmp_path / "s"), deadline=2)
    try:
        before = len(os.listdir("/proc/self/fd"))
        got = b.region_io_fds(4)
        assert [(f.offset, f.size, f.datamatch) for f in got] == [(0, 4, 0)]
        assert len(os.listdir("/proc/self/fd")) == before + 1      # the one kept, no more
        for f in got:
            os.close(f.fd)
    finally:
        b.close()
        t.join(5)
        for fd in efds:
            os.close(fd)
