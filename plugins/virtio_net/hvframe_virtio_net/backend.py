"""The contract between the virtio-net device model and the things its frames travel through.

A backend is opened once, from the device's option string, before the guest runs. It hands the
device one non-blocking file descriptor per queue pair and says how frames are laid out on it;
the device's native data path (C, in this package) reads and writes those descriptors itself,
with the GIL released. Python backends keep only what C cannot do: opening, ioctls, offload
settings, link state and closing.

Framing (what one frame looks like on a descriptor):
- VNET_HDR: one read()/write() is one frame, preceded by a `struct virtio_net_hdr_v1`
  (12 bytes, the size set with TUNSETVNETHDRSZ). A tap with IFF_VNET_HDR.
- BE32_LENGTH: a byte stream; each frame is a 4-byte big-endian length followed by that many
  bytes of Ethernet frame, no virtio header (passt, QEMU's `-netdev stream`, and hvframe's own
  socket backend). Partial reads and writes happen and are the data path's to reassemble.
"""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import Callable


class Framing(enum.IntEnum):
    VNET_HDR = 1
    BE32_LENGTH = 2


@dataclass(frozen=True)
class Offloads:
    """Offloads one direction can carry: checksum completion and TCP segmentation."""
    csum: bool = False
    tso4: bool = False
    tso6: bool = False
    ecn: bool = False

    def __and__(self, other: "Offloads") -> "Offloads":
        return Offloads(self.csum and other.csum, self.tso4 and other.tso4,
                        self.tso6 and other.tso6, self.ecn and other.ecn)


class NetBackend(abc.ABC):
    """One opened backend. Not thread-safe: the device calls it under its own lock."""

    #: how frames are laid out on every descriptor of queue_fds()
    framing: Framing
    #: the longest frame (without any header) this backend carries whole
    max_frame: int = 65535 + 14

    @abc.abstractmethod
    def queue_fds(self) -> list[int]:
        """One non-blocking descriptor per queue pair, index i serving pair i. Owned by the
        backend: the device never closes them."""

    @abc.abstractmethod
    def capabilities(self) -> Offloads:
        """The offloads this backend can carry in either direction, fixed once opened. The
        device offers the guest no more than these."""

    @abc.abstractmethod
    def set_offloads(self, acked: Offloads) -> None:
        """Called with exactly what the guest acknowledged (and again on CTRL_GUEST_OFFLOADS):
        the backend may hand the device frames using these offloads and no others."""

    def set_queue_pairs(self, n: int) -> None:
        """The driver uses queue pairs 0..n-1 only (VQ_PAIRS_SET): a backend that steers
        frames among its descriptors (a multi-queue tap) stops giving any to the others.
        Default: nothing to do."""

    def link_up(self) -> bool:
        """Whether the far side is there (tap still exists, peer still connected)."""
        return True

    def peer_gone(self) -> None:
        """The data path saw EOF or an error that means the far side went away. The backend
        notes it (link_up() turns False) and may try to reconnect later."""

    # A peer that comes (back) by itself: a VM connecting to `socket=listen:`, a reconnect to
    # passt. The descriptor numbers of queue_fds() never change; while the link is down they
    # lead nowhere (nothing to read, writes discarded), and a new peer is put on the same
    # numbers only when the device asks, so its stream never starts in the middle of a frame
    # the data path had half read or written.

    def watch_link(self, on_change: Callable[[], None]) -> None:
        """The device's callback for a peer that is waiting to be attached. Called on a
        backend thread holding no backend lock; the device answers with attach_peer(). A
        backend whose link never comes back by itself ignores it. A device that never calls
        this gets a waiting peer attached at once."""

    def attach_peer(self) -> bool:
        """(the device, its data path for this backend stopped, stream state reset) Put a
        waiting peer on queue_fds() and return link_up()."""
        return self.link_up()

    @abc.abstractmethod
    def close(self) -> None:
        """Release every descriptor. Called once, after the data path has stopped."""


class BackendError(Exception):
    """A backend could not be opened: one line, for the user (the plugin turns it into a
    configuration error, exit 4)."""
