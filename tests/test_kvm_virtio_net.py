"""virtio-net from inside a real guest on /dev/kvm: tests/guests/virtio_net.c, a small modern
virtio-pci network driver (two queue pairs, mergeable receive buffers, checksum offload),
runs under `hvframe run` in a network namespace the test makes, on a multi-queue tap there.
The namespace's side sees the guest's frames byte for byte (AF_PACKET), its UDP socket gets
the datagram whose checksum the guest left to the device, and the frames it sends come back
echoed, byte for byte."""
import json
import os
import shutil
import re
import select
import socket
import struct
import subprocess
import time
import uuid

import pytest

from conftest import hvframe_cmd, requires_kvm
from hvframe_virtio_net.testdriver import in_netns, tap_peer_socket

pytestmark = [requires_kvm, pytest.mark.kvm]

MAC = bytes.fromhex("020000aabb07")
UDP_PAYLOAD = b"hvframe virtio-net checksum offload: the host completes this.\0"


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    from hvframe.guests.build import build_guest
    return build_guest(["tests/guests/virtio_net.c"],
                       tmp_path_factory.mktemp("vnet") / "virtio_net.elf")


@pytest.fixture
def netns_tap():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("ip"):
        pytest.skip("needs root, /dev/net/tun and ip (iproute2)")
    ns, tap = f"hvnet-{uuid.uuid4().hex[:8]}", f"hvg{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ip = ["ip", "-n", ns]
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        subprocess.run(ip + ["tuntap", "add", tap, "mode", "tap", "multi_queue"], check=True)
        subprocess.run(ip + ["addr", "add", "10.77.0.1/24", "dev", tap], check=True)
        subprocess.run(ip + ["link", "set", tap, "up"], check=True)
        subprocess.run(ip + ["neigh", "add", "10.77.0.2", "lladdr", MAC.hex(":"), "dev", tap,
                             "nud", "permanent"], check=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            yield ns, tap, fd
        finally:
            os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def eth(dst, src, ethertype, payload):
    return dst + src + struct.pack(">H", ethertype) + payload


def pattern(n, seed):
    return bytes((j * 7 + seed) & 0xFF for j in range(n))


def wait_frame(sock, want, deadline, src=MAC):
    """The next frame from `src` (our own sends are seen too) for which want() holds."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no such frame from the guest")
        r, _, _ = select.select([sock], [], [], left)
        if r:
            f = sock.recv(70000)
            if f[6:12] == src and want(f):
                return f


def test_guest_sends_and_receives_over_two_queue_pairs(guest, netns_tap, tmp_path):
    ns, tap, nsfd = netns_tap
    peer = tap_peer_socket(tap, nsfd)
    udp = in_netns(nsfd, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    udp.bind(("10.77.0.1", 9000))
    out = open(tmp_path / "console.txt", "w+")
    env = dict(os.environ)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns] + hvframe_cmd()
        + ["run", "-m", "64M", "-s", "0,hostbridge",
           "-s", f"3,virtio-net,tap={tap},queues=2,mac={MAC.hex(':')}",
           "-l", "com1,stdio", "--kernel", guest, "--timeout", "300"],
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        bcast = b"\xff" * 6
        hello = wait_frame(peer, lambda f: f[12:14] == b"\x88\xb5" and len(f) == 114, deadline)
        assert hello == eth(bcast, MAC, 0x88B5, pattern(100, 1))
        # Checksum offload: the guest left only the pseudo-header sum; the datagram arrives.
        udp.settimeout(max(1, deadline - time.monotonic()))
        data, src = udp.recvfrom(4096)
        assert (data, src) == (UDP_PAYLOAD, ("10.77.0.2", 5555))
        big = wait_frame(peer, lambda f: f[12:14] == b"\x88\xb5" and len(f) == 1514, deadline)
        assert big == eth(bcast, MAC, 0x88B5, pattern(1500, 3))
        # Frames to the guest come back echoed (ethertype 0x88b6), byte for byte.
        ours = b"\x02\x00\x00\x00\x00\x09"
        sent = [eth(MAC, ours, 0x88B5, pattern(n - 14, n & 0xFF)) for n in (60, 333, 1000, 1514)]
        for f in sent:
            peer.send(f)
        echoed = [wait_frame(peer, lambda f: f[12:14] == b"\x88\xb6", deadline, src=ours)
                  for _ in sent]
        expect = [f[:12] + b"\x88\xb6" + f[14:] for f in sent]
        assert sorted(echoed) == sorted(expect)
        rc = proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        peer.close()
        udp.close()
    out.seek(0)
    console = out.read()
    err = proc.stderr.read().decode(errors="replace")
    assert "lock order violation" not in err, err
    assert rc == 1, (console, err)
    assert "vnet done" in console, (console, err)
    assert re.search(r"^vnet mq ack 0$", console, re.M), console
    assert re.search(r"^vnet mac 02:00:00:aa:bb:07 status 1 pairs 2$", console, re.M), console
    # The full-size frames took two 1024-byte buffers each (mergeable).
    assert re.search(r"^vnet rx q \d len 1514 bufs 2 ", console, re.M), console
