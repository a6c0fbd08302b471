"""hvframe.testing's frame capture (Netns.capture) and frame descriptions (netframes.describe):
what a network test prints when it fails must name the frames that crossed the tap."""
import fcntl
import os
import struct
import time

import pytest

from hvframe.testing.netframes import (ETH_IP, arp_request, describe, ethernet, icmp_echo,
                                       ip4, mac)
from hvframe.testing.netns import Netns, netns_missing

TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
HOST_MAC = mac("52:54:00:aa:bb:cc")


def test_describe_names_arp_and_icmp_fields():
    arp = describe(arp_request(HOST_MAC, "10.0.2.1", "10.0.2.15"))
    assert "ARP request 10.0.2.1 -> 10.0.2.15" in arp and "52:54:00:aa:bb:cc" in arp
    echo = describe(icmp_echo(b"\xff" * 6, HOST_MAC, "10.0.2.1", "10.0.2.15", 7, 3, b"x"))
    assert "IPv4 10.0.2.1 -> 10.0.2.15 proto 1 ICMP type 8 id 7 seq 3" in echo
    assert describe(b"\0" * 10) == "runt (10 bytes)"
    # A truncated IPv4 header is named by its type, never read past its end.
    assert "type 0x0800" in describe(ethernet(HOST_MAC, HOST_MAC, ETH_IP, ip4("1.2.3.4")))


@pytest.mark.skipif(netns_missing() is not None, reason=str(netns_missing()))
def test_capture_records_the_namespaces_arp_for_an_unanswered_ping():
    with Netns() as ns:
        ns.add_tap("tap0", "10.9.0.1/24")

        def attach():       # a carrier: the tap's queue open, as a VMM would hold it
            fd = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"tap0", IFF_TAP | IFF_NO_PI))
            return fd
        fd = ns.call(attach)
        try:
            with ns.capture("tap0") as log:
                assert ns.ping("10.9.0.2", count=1, wait=1.5) == 0
                end = time.monotonic() + 5
                while "ARP request" not in log.text() and time.monotonic() < end:
                    time.sleep(0.1)
            text = log.text()
        finally:
            os.close(fd)
    assert "out" in text and "ARP request 10.9.0.1 -> 10.9.0.2" in text, text
