"""What the PCI passthrough layer needs of a device backend: the VFIO device model (regions,
interrupt indexes, DMA), whether it is reached through the kernel's ioctls or a vfio-user
socket. Everything above these calls is shared (hvframe_passthru.passthru)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hvframe.errors import HvError


class BackendLost(HvError):
    """The device behind the backend is gone (its server died, hung or broke the protocol)."""


@dataclass(frozen=True)
class RegionInfo:
    index: int
    size: int
    readable: bool
    writable: bool


@dataclass(frozen=True)
class IrqInfo:
    index: int
    count: int
    maskable: bool
    automasked: bool


@dataclass
class IoFd:
    """A doorbell of the device: guest writes of `size` bytes at `offset` in the region
    (matching datamatch, when given) are to signal eventfd `fd` (ours to close)."""
    offset: int
    size: int
    fd: int
    pio: bool
    datamatch: int | None


class DeviceBackend(Protocol):
    """A VFIO-style device. Every call may raise BackendLost."""

    description: str

    def region_info(self, index: int) -> RegionInfo: ...
    def region_read(self, index: int, offset: int, size: int) -> bytes: ...
    def region_write(self, index: int, offset: int, data: bytes) -> None: ...
    def region_io_fds(self, index: int) -> list[IoFd]: ...
    def irq_info(self, index: int) -> IrqInfo: ...
    def set_irq_eventfds(self, index: int, fds: list[int]) -> None:
        """Vectors 0..len(fds)-1 of `index` signal these eventfds; [] turns the index off."""
    def set_irq_eventfd(self, index: int, vector: int, fd: int) -> None:
        """Vector `vector` of `index` (already on) signals `fd` from now on; once this
        returns, the device signals the eventfd it had no more."""
    def unmask_intx(self) -> None: ...
    def dma_map_all(self, memory) -> None:
        """Let the device reach all of guest RAM (a GuestMemory) at guest-physical addresses."""
    def reset(self) -> None: ...
    def check_alive(self) -> None:
        """Raise BackendLost if the device is known to be gone (cheap, no round trip)."""
    def reconnect(self) -> bool:
        """Try once to reach the device again after BackendLost; True when it is back, with
        guest RAM mapped and the INTx and MSI eventfds it had; MSI-X's are the caller's to hand
        over again (set_irq_eventfds), under the MSI-X capability's lock."""
    def close(self) -> None: ...
