"""The virtio-net device (synthetic machine, Python test driver) on the real stream backends of
hvframe_virtio_net.stream: a socket peer the test plays, another device on socket=listen:, and
a real passt process. Frames are compared byte for byte; a peer that dies takes the link down
and the VMM carries on."""
from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from hvframe_virtio_net import layout as L, virtio_net
from hvframe_virtio_net.backends import open_backend
from hvframe.testing.netframes import (StreamReader, arp_request, be32_frame, ip4, open_when_listening,
                       parse_arp_reply, write_all)
from hvframe.testing.netns import Netns, netns_missing
from test_virtio_net import MAC, Rig, frame, wait_for

PASST = shutil.which("passt")



@pytest.fixture
def rigs():
    made = []
    yield made
    for r in made:
        r.close()


def link_up(rig) -> bool:
    return bool(rig.nd.config(6, 2) & L.S_LINK_UP)


def test_device_on_socket_connect_carries_frames_byte_for_byte(sockdir, rigs):
    path = os.path.join(sockdir, "peer.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    r = Rig(open_backend(f"socket=connect:{path}", {}, 1))
    rigs.append(r)
    peer, _ = server.accept()
    peer.setblocking(False)
    assert link_up(r)
    sent = [frame(n=n, seed=n) for n in (46, 1500, 9000, 60000)]
    for f in sent:
        r.nd.send(0, f)
    reader = StreamReader(peer.fileno())
    assert [reader.read_frame(10) for _ in sent] == sent
    write_all(peer.fileno(), b"".join(be32_frame(f) for f in sent))
    assert [r.nd.recv(0)[1] for _ in sent] == sent
    peer.close()
    server.close()


def test_device_link_goes_down_when_the_socket_peer_dies(sockdir, rigs):
    path = os.path.join(sockdir, "peer.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    backend = open_backend(f"stream=unix:{path}", {}, 1)
    r = Rig(backend)
    rigs.append(r)
    peer, _ = server.accept()
    server.close()                           # nothing to reconnect to
    gen = r.fn.config_generation
    peer.close()
    wait_for(lambda: not link_up(r), what="link down")
    wait_for(lambda: r.fn.config_generation != gen, what="a configuration interrupt")
    assert not backend.link_up() and backend.disconnects == 1
    r.nd.send(0, frame())                    # the guest still transmits: dropped, no stall
    wait_for(lambda: r.dev.stats()["tx_drop_gone"] >= 1 or backend.discarded_bytes > 0,
             what="frame dropped")


def test_two_devices_on_socket_listen_and_connect(sockdir, rigs):
    """Two VMs' devices on one socket: what -s 3,virtio-net,socket=listen:P and
    socket=connect:P give; frames cross both ways byte for byte."""
    path = os.path.join(sockdir, "vms.sock")
    listener = open_backend(f"socket=listen:{path}", {}, 1)
    connector = open_backend(f"socket=connect:{path}", {}, 1)
    wait_for(listener.link_up, what="the listener's peer")   # no device watching: attached at once
    a, b = Rig(listener), Rig(connector)
    rigs += [a, b]
    assert link_up(a) and link_up(b)
    a_to_b = [frame(dst=MAC, n=n, seed=n) for n in (60, 1500, 20000)]
    b_to_a = [frame(dst=MAC, n=n, seed=n + 1) for n in (1500, 64)]
    for f in a_to_b:
        a.nd.send(0, f)
    for f in b_to_a:
        b.nd.send(0, f)
    assert [b.nd.recv(0)[1] for _ in a_to_b] == a_to_b
    assert [a.nd.recv(0)[1] for _ in b_to_a] == b_to_a


@pytest.mark.skipif(PASST is None, reason="passt is not installed (Debian: passt)")
@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
def test_device_through_passt_gets_an_arp_answer_and_survives_passt_dying(sockdir, rigs):
    os.chmod(sockdir, 0o1777)                  # passt drops to nobody before it binds
    path = os.path.join(sockdir, "passt.sock")
    with Netns() as ns:
        ns.add_uplink("up0", "10.0.2.2/24", gateway="10.0.2.1")
        p = ns.popen([PASST, "--foreground", "--one-off", "--socket", path,
                      "--address", "10.0.2.15", "--netmask", "24", "--gateway", "10.0.2.2"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(path), what="passt's socket")
        r = Rig(open_when_listening(f"passt={path}"))
        rigs.append(r)
        assert link_up(r)
        r.nd.send(0, arp_request(MAC, "10.0.2.15", "10.0.2.2"))
        end = time.monotonic() + 10
        reply = None
        while reply is None and time.monotonic() < end:
            reply = parse_arp_reply(r.nd.recv(0)[1])
        assert reply and reply.sender_ip == ip4("10.0.2.2") and reply.target_ip == ip4("10.0.2.15")
        p.kill()
        p.wait(10)
        wait_for(lambda: not link_up(r), what="link down after passt died")
        r.nd.send(0, frame())                  # the VMM carries on
        assert r.dev.stats()["tx_frames"] >= 1


def device_attaches_late_peers(sockdir: str) -> bool:
    """Whether the device brings its link up for a peer that connects to socket=listen: after
    the device was made (it must call the backend's watch_link() and attach_peer())."""
    path = os.path.join(sockdir, "late.sock")
    r = Rig(open_backend(f"socket=listen:{path}", {}, 1))
    try:
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(path)
        end = time.monotonic() + 3
        while time.monotonic() < end and not link_up(r):
            time.sleep(0.02)
        up = link_up(r)         # before the peer leaves: its going takes the link down again
        peer.close()
        return up
    finally:
        r.close()


def test_device_link_comes_up_when_a_peer_connects_later(sockdir):
    """socket=listen: starts with the link down; a VM connecting later brings it up."""
    assert device_attaches_late_peers(sockdir)


def test_device_link_follows_listen_peers_coming_and_going(sockdir, rigs):
    """A listening VM: its link is up while a peer is there, down when it leaves (with a
    configuration interrupt each time), up again with the next peer, and frames cross with
    each peer byte for byte. (The first peer connects before the device is made: see the
    expected failure above.)"""
    path = os.path.join(sockdir, "l.sock")
    backend = open_backend(f"socket=listen:{path}", {}, 1)
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(path)
    wait_for(backend.link_up, what="the first peer attached")
    r = Rig(backend)
    rigs.append(r)
    for n in range(3):
        gen = r.fn.config_generation
        if n == 0:
            peer = first
        else:
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(path)
        wait_for(lambda: link_up(r), what=f"link up with peer {n}")
        if n:
            wait_for(lambda: r.fn.config_generation != gen, what="a configuration interrupt")
        peer.sendall(be32_frame(frame(n=300, seed=n)))
        assert r.nd.recv(0)[1] == frame(n=300, seed=n)
        r.nd.send(0, frame(n=200, seed=n + 5))
        peer.setblocking(False)
        assert StreamReader(peer.fileno()).read_frame(10) == frame(n=200, seed=n + 5)
        gen = r.fn.config_generation
        peer.close()
        wait_for(lambda: not link_up(r), what=f"link down after peer {n}")
        wait_for(lambda: r.fn.config_generation != gen, what="a configuration interrupt")


def test_a_new_peer_on_the_same_descriptor_is_never_read_by_the_old_port(sockdir, monkeypatch):
    """socket=listen: puts the next peer behind the same descriptor number. The link watcher's
    relink is made to land at the worst moment: after the receive worker decided to deliver
    what the old connection left (link down, a frame in hand), before it looks at the link
    again. The old port must not read the new peer's bytes: the guest gets the old
    connection's whole frames, then the new peer's frame whole, and the old one's half frame
    is counted, never glued to the new stream."""
    monkeypatch.setattr(virtio_net, "LINK_POLL_S", 60.0)     # only the relink forced below
    path = os.path.join(sockdir, "l.sock")
    be = open_backend(f"socket=listen:{path}", {}, 1)
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(path)
    wait_for(be.link_up, what="the first peer attached")
    r = Rig(be, post=0)
    dev, real, late = r.dev, r.dev._receiving, {}
    new = frame(n=400, seed=42)

    def receiving(pair):
        got = real(pair)
        if got and not dev.link and not late and sys._getframe(1).f_code.co_name == "_serve":
            late["peer"] = second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            second.connect(path)
            wait_for(be.link_up, what="the second peer attached")
            second.sendall(be32_frame(new))
            r.nd.post_rx(0, 16)
            assert dev._relink()              # the watcher thread, as if it ran just now
        return got
    monkeypatch.setattr(dev, "_receiving", receiving)
    try:
        old = [frame(n=200, seed=0), frame(n=200, seed=1)]
        half = MAC + bytes(6) + b"\x88\xb5" + bytes(86)       # 100 bytes of a 300-byte frame
        first.sendall(b"".join(be32_frame(f) for f in old) + struct.pack(">I", 300) + half)
        wait_for(lambda: dev.rxqs[0].have_frame == 1, what="a frame in hand")
        first.close()
        wait_for(lambda: late, what="the relink at the worst moment")
        got = [r.nd.recv(0, timeout=5)[1] for _ in range(3)]
        assert got == old + [new]
        assert dev.stats()["rx_truncated"] == 1
    finally:
        r.close()
        if late:
            late["peer"].close()
