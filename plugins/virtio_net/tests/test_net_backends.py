"""virtio-net's stream backends (passt=, stream=unix:, socket=listen:/connect:, fd=N) and the
backend option grammar, driven the way the device's data path uses them: read and write the
descriptor queue_fds() gives, call peer_gone() on EOF, attach_peer() when told a peer waits.
The far side is a test socket, a real passt process (if installed) or a tap in a namespace."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from hvframe.errors import ConfigError
from hvframe_virtio_net.backend import Framing, Offloads
from hvframe_virtio_net.backends import open_backend
from hvframe_virtio_net import stream
from hvframe.testing.netframes import (StreamReader, arp_request, be32_frame, ip4, mac, open_when_listening,
                       parse_arp_reply, write_all)
from hvframe.testing.netns import Netns, netns_missing

GUEST_MAC = mac("52:54:00:12:34:56")



@pytest.fixture
def backends():
    opened = []
    yield opened
    for b in opened:
        b.close()


def wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def frame(n: int, tag: int) -> bytes:
    return GUEST_MAC + b"\x02\0\0\0\0\x01" + b"\x88\xb5" + bytes((tag + i) & 0xFF for i in range(n - 14))


class Link:
    """The device's view: the callback for waiting peers, and the data path's EOF check."""

    def __init__(self, backend):
        self.backend = backend
        self.calls = threading.Event()
        backend.watch_link(self.calls.set)

    def attach_when_told(self, timeout=5.0) -> bool:
        assert self.calls.wait(timeout), "no link callback"
        self.calls.clear()
        return self.backend.attach_peer()


def peer_eof_seen(fd: int) -> bool:
    """What the data path does on a readable descriptor: read; EOF means the peer is gone."""
    try:
        return os.read(fd, 65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


# ---- the option grammar ------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("", "needs a backend"),
    ("vmnet0", "unknown backend"),
    ("bogus=1", "unknown backend"),
    ("stream=tcp:127.0.0.1:1", "stream= wants unix:PATH"),
    ("stream=/tmp/x", "stream= wants unix:PATH"),
    ("socket=serve:/tmp/x", "socket= wants listen:PATH or connect:PATH"),
    ("socket=/tmp/x", "socket= wants listen:PATH or connect:PATH"),
    ("tap=", "a tap name is 1-15 characters"),
    ("tap=averyveryverylongname", "a tap name is 1-15 characters"),
    ("tap=a/b", "a tap name is 1-15 characters"),
    ("fd=x", "fd= wants a descriptor number"),
    ("fd=-1", "fd= wants a descriptor number"),
    ("passt=", "needs a socket path"),
    ("passt=/tmp/" + "x" * 120, "longer than 107 bytes"),
])
def test_bad_backend_specs_are_one_line_config_errors(spec, message):
    with pytest.raises(ConfigError) as e:
        open_backend(spec, {}, 1)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["passt=/tmp/p", "stream=unix:/tmp/p", "socket=listen:/tmp/p",
                                  "socket=connect:/tmp/p"])
def test_stream_backends_refuse_more_than_one_queue_pair(spec):
    with pytest.raises(ConfigError, match="one queue pair, not queues=2"):
        open_backend(spec, {}, 2)


def test_queues_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="queues=0 must be at least 1"):
        open_backend("socket=listen:/tmp/p", {}, 0)


def test_passt_socket_that_is_not_there_is_a_config_error(sockdir):
    path = os.path.join(sockdir, "nothing.sock")
    with pytest.raises(ConfigError, match=f"cannot connect to {path}: No such file or directory"):
        open_backend(f"passt={path}", {}, 1)


def test_connect_to_a_socket_nobody_listens_on_is_a_config_error(sockdir):
    path = os.path.join(sockdir, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                                    # bound, never listening: refused
    with pytest.raises(ConfigError, match="Connection refused"):
        open_backend(f"socket=connect:{path}", {}, 1)


def test_tap_names_go_to_the_tap_backend(monkeypatch):
    """tapN and tap=NAME are the tap backend's (another module): both reach open_tap with the
    name and the queue count, and what it raises arrives as a ConfigError."""
    import sys
    import types
    from hvframe_virtio_net.backend import BackendError
    seen = []

    def open_tap(name, queues, fd=None):
        seen.append((name, queues))
        raise BackendError(f"tap {name}: cannot open")

    monkeypatch.setitem(sys.modules, "hvframe_virtio_net.tap",
                        types.SimpleNamespace(open_tap=open_tap))
    for spec in ("tap0", "tap=mytap"):
        with pytest.raises(ConfigError, match="cannot open"):
            open_backend(spec, {}, 2)
    assert seen == [("tap0", 2), ("mytap", 2)]


# ---- socket=listen ---------------------------------------------------------------------

def test_listen_starts_with_link_down_and_discards_guest_frames(sockdir, backends):
    b = open_backend(f"socket=listen:{os.path.join(sockdir, 'l.sock')}", {}, 1)
    backends.append(b)
    assert b.framing is Framing.BE32_LENGTH
    assert b.capabilities() == Offloads()
    assert b.link_up() is False
    [fd] = b.queue_fds()
    # The guest transmits into the pulled cable: no error, no stall, counted.
    data = be32_frame(frame(1500, 1)) * 200
    write_all(fd, data)
    assert wait_until(lambda: b.discarded_bytes == len(data))
    assert peer_eof_seen(fd) is False              # nothing to read, and no EOF either


def test_listen_peer_attaches_on_request_and_frames_cross_both_ways(sockdir, backends):
    path = os.path.join(sockdir, "l.sock")
    b = open_backend(f"socket=listen:{path}", {}, 1)
    backends.append(b)
    link = Link(b)
    [fd] = b.queue_fds()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(path)
    assert link.attach_when_told() is True
    assert b.link_up() and b.queue_fds() == [fd]    # the same number, now the peer's
    sent = [frame(n, i) for i, n in enumerate((60, 1514, 64, 9000, 65535 + 14))]
    threading.Thread(target=lambda: [peer.sendall(be32_frame(f)) for f in sent], daemon=True).start()
    r = StreamReader(fd)
    assert [r.read_frame(5) for _ in sent] == sent
    peer.setblocking(False)
    write_all(fd, b"".join(be32_frame(f) for f in reversed(sent)))
    pr = StreamReader(peer.fileno())
    assert [pr.read_frame(5) for _ in sent] == list(reversed(sent))
    peer.close()


def test_listen_link_goes_down_when_the_peer_dies_and_comes_back_with_the_next(sockdir, backends):
    path = os.path.join(sockdir, "l.sock")
    b = open_backend(f"socket=listen:{path}", {}, 1)
    backends.append(b)
    link = Link(b)
    [fd] = b.queue_fds()
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(path)
    assert link.attach_when_told()
    # A second peer while the first is attached is turned away.
    second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second.connect(path)
    assert second.recv(1) == b""
    assert wait_until(lambda: b.refused_peers == 1)
    first.close()
    assert wait_until(lambda: peer_eof_seen(fd))
    b.peer_gone()
    assert b.link_up() is False and b.disconnects == 1
    assert peer_eof_seen(fd) is False                # the idle cable again: quiet
    third = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    third.connect(path)
    assert link.attach_when_told()
    third.sendall(be32_frame(frame(100, 7)))
    assert StreamReader(fd).read_frame(5) == frame(100, 7)
    third.close()


def test_listen_without_a_watching_device_attaches_at_once(sockdir, backends):
    path = os.path.join(sockdir, "l.sock")
    b = open_backend(f"socket=listen:{path}", {}, 1)
    backends.append(b)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(path)
    assert wait_until(b.link_up)
    peer.close()


def test_listen_replaces_a_stale_socket_refuses_a_live_one_and_a_file(sockdir, backends):
    stale = os.path.join(sockdir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    b = open_backend(f"socket=listen:{stale}", {}, 1)
    backends.append(b)
    with pytest.raises(ConfigError, match="is in use"):
        open_backend(f"socket=listen:{stale}", {}, 1)
    regular = os.path.join(sockdir, "file")
    open(regular, "w").close()
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        open_backend(f"socket=listen:{regular}", {}, 1)
    b.close()
    assert not os.path.exists(stale)                 # its own socket is removed on close


# ---- connect, and the two ends together ----------------------------------------------------

def test_two_backends_listen_and_connect_carry_frames_between_them(sockdir, backends):
    """What two hvframe VMs do with socket=listen: and socket=connect:."""
    path = os.path.join(sockdir, "vm.sock")
    a = open_backend(f"socket=listen:{path}", {}, 1)
    backends.append(a)
    link_a = Link(a)
    b = open_backend(f"socket=connect:{path}", {}, 1)
    backends.append(b)
    assert b.link_up()
    assert link_a.attach_when_told()
    [fa], [fb] = a.queue_fds(), b.queue_fds()
    write_all(fa, be32_frame(frame(1514, 3)))
    write_all(fb, be32_frame(frame(60, 9)))
    assert StreamReader(fb).read_frame(5) == frame(1514, 3)
    assert StreamReader(fa).read_frame(5) == frame(60, 9)


def test_connect_reconnects_after_the_server_comes_back(sockdir, backends, monkeypatch):
    monkeypatch.setattr(stream, "RECONNECT_INTERVAL", 0.05)
    path = os.path.join(sockdir, "srv.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    b = open_backend(f"stream=unix:{path}", {}, 1)
    backends.append(b)
    link = Link(b)
    [fd] = b.queue_fds()
    conn, _ = server.accept()
    conn.close()
    assert wait_until(lambda: peer_eof_seen(fd))
    b.peer_gone()
    assert not b.link_up()
    conn2, _ = server.accept()                       # the backend came back by itself
    assert link.attach_when_told()
    conn2.sendall(be32_frame(frame(200, 5)))
    assert StreamReader(fd).read_frame(5) == frame(200, 5)
    conn2.close()
    server.close()


def test_close_stops_the_backend_thread_and_releases_the_descriptor(sockdir):
    from hvframe import concurrency
    before = {t.name for t in concurrency.live_threads()}
    b = open_backend(f"socket=listen:{os.path.join(sockdir, 'l.sock')}", {}, 1)
    [fd] = b.queue_fds()
    assert any(t.name.startswith("net-stream") for t in concurrency.live_threads())
    b.close()
    assert {t.name for t in concurrency.live_threads()} <= before
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF


# ---- fd=N ------------------------------------------------------------------------------

def test_fd_stream_socket_is_adopted(backends):
    ours, theirs = socket.socketpair()
    fd = os.dup(theirs.fileno())
    theirs.close()
    b = open_backend(f"fd={fd}", {}, 1)
    backends.append(b)
    assert b.framing is Framing.BE32_LENGTH and b.queue_fds() == [fd] and b.link_up()
    ours.sendall(be32_frame(frame(64, 1)))
    assert StreamReader(fd).read_frame(5) == frame(64, 1)
    ours.close()
    assert wait_until(lambda: peer_eof_seen(fd))
    b.peer_gone()
    assert not b.link_up()


@pytest.mark.parametrize("make, message", [
    (lambda: os.open("/dev/null", os.O_RDWR), "neither a stream socket nor an attached tap"),
    (lambda: os.open("/dev/null", os.O_RDONLY), "not open for reading and writing"),
    (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach(), "not a stream"),
    (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach(), "is not connected"),
])
def test_fd_that_is_no_backend_is_a_config_error(make, message):
    fd = make()
    try:
        with pytest.raises(ConfigError, match=message):
            open_backend(f"fd={fd}", {}, 1)
    finally:
        os.close(fd)


def test_fd_not_open_is_a_config_error():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ConfigError, match=f"descriptor {r} is not open"):
        open_backend(f"fd={r}", {}, 1)


def _open_tap(ns: Netns, name: str, flags: int) -> int:
    def body():
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", name.encode(), flags))  # TUNSETIFF
        return fd
    return ns.call(body)


@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
def test_fd_tap_gets_a_vnet_header_and_carries_frames_with_it(backends):
    """A manager's tap fd: checked with TUNGETIFF, header size 12 set; a frame the namespace
    sends arrives after a 12-byte virtio_net_hdr, and one written with a header goes out."""
    with Netns() as ns:
        fd = _open_tap(ns, "mgr0", stream.IFF_TAP | stream.IFF_NO_PI | stream.IFF_VNET_HDR)
        b = open_backend(f"fd={fd}", {}, 1)
        backends.append(b)
        assert b.framing is Framing.VNET_HDR
        assert b.capabilities() == Offloads(True, True, True, True)
        hdr_len = struct.unpack("i", fcntl.ioctl(fd, 0x800454D7, b"\0" * 4))[0]  # TUNGETVNETHDRSZ
        assert hdr_len == 12
        b.set_offloads(Offloads(csum=True, tso4=True))
        ns.ip("link", "set", "mgr0", "up")
        pkt = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        pkt.bind(("mgr0", 0))
        sent = frame(200, 4)
        os.write(fd, bytes(12) + sent)              # to the namespace: header + frame
        pkt.settimeout(5)
        while True:
            got = pkt.recv(65536)
            if got[12:14] == b"\x88\xb5":
                break
        assert got == sent
        out = b"\xff" * 6 + b"\x02\0\0\0\0\x02" + b"\x88\xb5" + b"x" * 100
        pkt.send(out)
        assert wait_until(lambda: _readable(fd))
        while True:
            data = os.read(fd, 65536)
            if data[12:] == out:
                break
        assert len(data) == 12 + len(out)
        pkt.close()
        with pytest.raises(ConfigError, match="one queue pair, not queues=2"):
            open_backend(f"fd={os.dup(fd)}", {}, 2)


def _readable(fd):
    import select
    return bool(select.select([fd], [], [], 0)[0])


@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
@pytest.mark.parametrize("flags, message", [
    (stream.IFF_TAP | stream.IFF_NO_PI, "without IFF_VNET_HDR"),
    (stream.IFF_TUN | stream.IFF_NO_PI | stream.IFF_VNET_HDR, r"is a tun \(layer 3\) device"),
])
def test_fd_tap_opened_the_wrong_way_is_a_config_error(flags, message):
    with Netns() as ns:
        fd = _open_tap(ns, "mgr1", flags)
        try:
            with pytest.raises(ConfigError, match=message):
                open_backend(f"fd={fd}", {}, 1)
        finally:
            os.close(fd)


# ---- a real passt ------------------------------------------------------------------------

PASST = shutil.which("passt")


@pytest.mark.skipif(PASST is None, reason="passt is not installed (Debian: passt)")
@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
def test_passt_answers_arp_and_its_death_takes_the_link_down(sockdir, backends):
    """Through a passt process (in a namespace of its own, so it sees no host network): the
    gateway passt pretends to be answers the guest's ARP request; killing passt is EOF on the
    descriptor, peer_gone() takes the link down, and the backend keeps working (quietly)."""
    os.chmod(sockdir, 0o1777)                        # passt drops to nobody before it binds
    path = os.path.join(sockdir, "passt.sock")
    with Netns() as ns:
        ns.add_uplink("up0", "10.0.2.2/24", gateway="10.0.2.1")
        p = ns.popen([PASST, "--foreground", "--stderr", "--socket", path, "--one-off",
                      "--address", "10.0.2.15", "--netmask", "24", "--gateway", "10.0.2.2"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert wait_until(lambda: os.path.exists(path), 10), p.stderr.read1() if p.poll() else ""
        b = open_when_listening(f"passt={path}")
        backends.append(b)
        assert b.link_up() and b.capabilities() == Offloads()
        [fd] = b.queue_fds()
        write_all(fd, be32_frame(arp_request(GUEST_MAC, "10.0.2.15", "10.0.2.2")))
        r = StreamReader(fd)
        reply = None
        while reply is None:
            f = r.read_frame(10)
            assert f is not None, "no ARP reply from passt"
            reply = parse_arp_reply(f)
        assert reply.sender_ip == ip4("10.0.2.2") and reply.target_ip == ip4("10.0.2.15")
        p.kill()
        p.wait(10)
        assert wait_until(lambda: peer_eof_seen(fd), 10)
        b.peer_gone()
        assert not b.link_up()
        write_all(fd, be32_frame(frame(64, 0)))     # the guest still transmits: discarded
        assert wait_until(lambda: b.discarded_bytes > 0)
