"""The tap backend: `-s N,virtio-net,tapN` or `tap=NAME`.

A tap opened through /dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, one descriptor per
queue pair (IFF_MULTI_QUEUE when there are several), each frame after a 12-byte
virtio_net_hdr (TUNSETVNETHDRSZ). The tap is created if it does not exist (and then goes
away with the VM) or attached to if it does (made persistent by `ip tuntap add`).

What the tap may hand the device (TUNSETOFFLOAD) is set from exactly the offloads the guest
acknowledged; what the kernel's tun driver can do at all is probed once, at open.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from .backend import BackendError, Framing, NetBackend, Offloads

TUN_DEV = "/dev/net/tun"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
VNET_HDR_SIZE = 12
IFNAMSIZ = 16

_IFREQ = struct.Struct("16sH22x")          # ifr_name, ifr_flags (struct ifreq, 40 bytes)


def _ifreq(name: str, flags: int) -> bytes:
    return _IFREQ.pack(name.encode(), flags)


def tun_flags(offloads: Offloads) -> int:
    """TUNSETOFFLOAD's flags for these offloads (segmentation needs checksums, ECN needs
    segmentation, as the tun driver requires)."""
    if not offloads.csum:
        return 0
    flags = TUN_F_CSUM
    if offloads.tso4:
        flags |= TUN_F_TSO4
    if offloads.tso6:
        flags |= TUN_F_TSO6
    if offloads.ecn and (offloads.tso4 or offloads.tso6):
        flags |= TUN_F_TSO_ECN
    return flags


class TapBackend(NetBackend):
    framing = Framing.VNET_HDR

    def __init__(self, name: str, queue_pairs: int = 1):
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.strip() != name:
            raise BackendError(f"tap {name!r}: not a valid interface name (1-15 characters)")
        self.name = name
        self.fds: list[int] = []
        self._gone = False
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queue_pairs > 1 else 0)
        try:
            for _ in range(queue_pairs):
                fd = self._open(flags)
                self.fds.append(fd)
            self._caps = self._probe()
            self.set_offloads(Offloads())
        except BaseException:
            self.close()
            raise

    def _open(self, flags: int) -> int:
        try:
            fd = os.open(TUN_DEV, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise BackendError(f"tap {self.name}: cannot open {TUN_DEV}: {e.strerror}") from None
        try:
            try:
                features = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, b"\0" * 4))[0]
            except OSError:
                features = 0
            if not features & IFF_VNET_HDR or (flags & IFF_MULTI_QUEUE
                                                 and not features & IFF_MULTI_QUEUE):
                raise BackendError(f"tap {self.name}: the kernel's tun driver lacks "
                                   f"{'IFF_MULTI_QUEUE' if features & IFF_VNET_HDR else 'IFF_VNET_HDR'}")
            try:
                fcntl.ioctl(fd, TUNSETIFF, _ifreq(self.name, flags))
            except OSError as e:
                why = {errno.EPERM: "not permitted (needs root or CAP_NET_ADMIN)",
                       errno.EBUSY: "in use by another process",
                       errno.EINVAL: "exists with other settings (single or multi-queue)"}
                raise BackendError(f"tap {self.name}: cannot attach: "
                                   f"{why.get(e.errno, e.strerror)}") from None
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _probe(self) -> Offloads:
        """What TUNSETOFFLOAD accepts (it refuses flags the kernel cannot do)."""
        fd = self.fds[0]

        def ok(flags: int) -> bool:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
                return True
            except OSError:
                return False
        csum = ok(TUN_F_CSUM)
        tso4 = csum and ok(TUN_F_CSUM | TUN_F_TSO4)
        tso6 = csum and ok(TUN_F_CSUM | TUN_F_TSO6)
        ecn = (tso4 or tso6) and ok(TUN_F_CSUM | (TUN_F_TSO4 if tso4 else TUN_F_TSO6)
                                    | TUN_F_TSO_ECN)
        return Offloads(csum, tso4, tso6, ecn)

    # -- NetBackend ---------------------------------------------------------------------
    def queue_fds(self) -> list[int]:
        return list(self.fds)

    def capabilities(self) -> Offloads:
        return self._caps

    def set_offloads(self, acked: Offloads) -> None:
        # The tap is one device: its offloads are set through any of its descriptors.
        flags = tun_flags(acked & self._caps)
        if self.fds:
            fcntl.ioctl(self.fds[0], TUNSETOFFLOAD, flags)
        self.offload_flags = flags

    def set_queue_pairs(self, n: int) -> None:
        # Detached queues get no frames from the kernel (it steers among attached ones).
        for i, fd in enumerate(self.fds if len(self.fds) > 1 else ()):
            try:
                fcntl.ioctl(fd, TUNSETQUEUE, _ifreq("", IFF_ATTACH_QUEUE if i < n
                                                   else IFF_DETACH_QUEUE))
            except OSError:
                pass          # already in that state, or the tap is gone (link_up says)

    def link_up(self) -> bool:
        if self._gone or not self.fds:
            return False
        try:
            fcntl.ioctl(self.fds[0], TUNGETIFF, b"\0" * 40)
        except OSError:
            return False      # EBADFD: the tap was deleted under us
        return True

    def peer_gone(self) -> None:
        self._gone = True     # a deleted tap does not come back to this descriptor

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def open_tap(name: str, queue_pairs: int) -> TapBackend:
    return TapBackend(name, queue_pairs)
