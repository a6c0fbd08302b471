"""Ethernet frames for network tests: ARP and ICMP built and parsed by hand (a few fields
each), and the 4-byte big-endian length framing of stream backends (passt, socket=)."""
from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass
from typing import Optional

BROADCAST = b"\xff" * 6
ETH_ARP, ETH_IP, ETH_IPV6 = 0x0806, 0x0800, 0x86DD


def mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def ip4(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s >> 16) + (s & 0xFFFF)
    return ~s & 0xFFFF


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, 1, src_mac, ip4(src_ip),
                       b"\0" * 6, ip4(target_ip))
    return ethernet(BROADCAST, src_mac, ETH_ARP, body)


def arp_reply(src_mac: bytes, src_ip: str, dst_mac: bytes, dst_ip: bytes) -> bytes:
    """The answer to an ARP request from (dst_mac, dst_ip) for src_ip."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, 2, src_mac, ip4(src_ip),
                       dst_mac, dst_ip)
    return ethernet(dst_mac, src_mac, ETH_ARP, body)


@dataclass
class ArpReply:
    sender_mac: bytes
    sender_ip: bytes
    target_ip: bytes


def parse_arp_reply(frame: bytes) -> Optional[ArpReply]:
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_ARP:
        return None
    _, _, _, _, op, smac, sip, _, tip = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
    return ArpReply(smac, sip, tip) if op == 2 else None


def parse_arp_request(frame: bytes) -> Optional[ArpReply]:
    """(sender MAC, sender IP, target IP) of an ARP request, else None."""
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_ARP:
        return None
    _, _, _, _, op, smac, sip, _, tip = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
    return ArpReply(smac, sip, tip) if op == 1 else None


def icmp_echo(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, ident: int, seq: int,
              payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0,
                     ip4(src_ip), ip4(dst_ip))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ethernet(dst_mac, src_mac, ETH_IP, ip + icmp)


def parse_icmp_echo_reply(frame: bytes) -> Optional[tuple[bytes, int, int, bytes]]:
    """(source ip, ident, seq, payload) of an ICMP echo reply, else None."""
    if len(frame) < 42 or struct.unpack("!H", frame[12:14])[0] != ETH_IP:
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14 + 9] != 1:
        return None
    ip_len = struct.unpack("!H", frame[16:18])[0]
    icmp = frame[14 + ihl:14 + ip_len]
    if len(icmp) < 8 or icmp[0] != 0:
        return None
    _, _, _, ident, seq = struct.unpack("!BBHHH", icmp[:8])
    return frame[26:30], ident, seq, icmp[8:]


# ---- the stream framing ------------------------------------------------------------------

def be32_frame(frame: bytes) -> bytes:
    return struct.pack("!I", len(frame)) + frame


class StreamReader:
    """Frames from a BE32_LENGTH byte stream on a non-blocking fd, reassembled."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.eof = False

    def _take(self) -> Optional[bytes]:
        if len(self.buf) >= 4:
            n = struct.unpack("!I", self.buf[:4])[0]
            if len(self.buf) >= 4 + n:
                frame = bytes(self.buf[4:4 + n])
                del self.buf[:4 + n]
                return frame
        return None

    def read_frame(self, timeout: float) -> Optional[bytes]:
        """The next whole frame, or None at EOF or when `timeout` s pass."""
        end = time.monotonic() + timeout
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            left = end - time.monotonic()
            if self.eof or left <= 0:
                return None
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            self.buf += data


def write_all(fd: int, data: bytes, timeout: float = 5.0) -> None:
    view = memoryview(data)
    end = time.monotonic() + timeout
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            if time.monotonic() > end:
                raise TimeoutError("peer does not read")
            select.select([], [fd], [], 0.1)


def open_when_listening(spec: str, timeout: float = 10.0):
    """open_backend(spec) for a server that is still starting: its socket file appears at
    bind(), before listen(), and a connect in between is refused."""
    from hvframe.errors import ConfigError
    from hvframe_virtio_net.backends import open_backend
    end = time.monotonic() + timeout
    while True:
        try:
            return open_backend(spec, {}, 1)
        except ConfigError as e:
            if "Connection refused" not in str(e) and "No such file" not in str(e) \
                    or time.monotonic() > end:
                raise
            time.sleep(0.05)


def describe(frame: bytes) -> str:
    """One line for a frame in a test's failure message: addresses, and the ARP, IPv4/ICMP
    or IPv6 fields that say what it was."""
    if len(frame) < 14:
        return f"runt ({len(frame)} bytes)"
    dst, src = frame[0:6].hex(":"), frame[6:12].hex(":")
    (kind,) = struct.unpack_from("!H", frame, 12)
    body = frame[14:]
    what = f"type {kind:#06x}"
    if kind == ETH_ARP and len(body) >= 28:
        op = "request" if body[7] == 1 else "reply" if body[7] == 2 else f"op {body[7]}"
        what = f"ARP {op} {_dotted(body[14:18])} -> {_dotted(body[24:28])}"
    elif kind == ETH_IP and len(body) >= 20:
        ihl = (body[0] & 0x0F) * 4
        what = f"IPv4 {_dotted(body[12:16])} -> {_dotted(body[16:20])} proto {body[9]}"
        if body[9] == 1 and len(body) >= ihl + 8:
            t, _, _, ident, seq = struct.unpack_from("!BBHHH", body, ihl)
            what += f" ICMP type {t} id {ident} seq {seq}"
    elif kind == ETH_IPV6 and len(body) >= 40:
        what = f"IPv6 next header {body[6]}"
        if body[6] == 58 and len(body) > 40:
            what += f" ICMPv6 type {body[40]}"
    return f"{len(frame):5d} bytes {src} > {dst} {what}"


def _dotted(b: bytes) -> str:
    return ".".join(str(x) for x in b)
