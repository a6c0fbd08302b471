"""What a virtio device model gives the transport, and the feature and status bits they share.

A device model (virtio-blk, virtio-net, a third party's device) subclasses VirtioDevice and
fills in:

    device_type      the virtio device ID (2 for block, 1 for network; virtio 1.2 section 5)
    num_queues       how many virtqueues it has
    queue_max_size   the largest queue size it accepts (a power of two)
    device_features  its device-specific feature bits (the transport adds the generic ones)
    config_bytes()   its configuration space as bytes (declared with construct)
    config_write()   guest writes to the few writable configuration fields, if any
    handle_chain()   one descriptor chain of one queue -> bytes written into the chain

The transport (hvframe.virtio.pci.VirtioPciFunction) owns feature negotiation, device status,
reset, the queues and their worker threads, doorbells and interrupts. handle_chain() runs on
the worker thread of its queue; when it returns, the chain goes back to the driver through
the used ring, so whatever it promises (a write being on the disk) must be true by then.
"""
from __future__ import annotations

from collections import namedtuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    from construct import Struct

    from ..packed import Packed

# -- device status (virtio 1.2, 2.1) --------------------------------------------------------
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# -- generic feature bits (virtio 1.2, 6) ----------------------------------------------------
F_NOTIFY_ON_EMPTY = 24
F_ANY_LAYOUT = 27
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34

# -- ISR status bits (4.1.4.5) ---------------------------------------------------------------
ISR_QUEUE = 1
ISR_CONFIG = 2

NO_VECTOR = 0xFFFF


def bit(n: int) -> int:
    return 1 << n


class WorkerFds(namedtuple("WorkerFds", "doorbells wake")):
    """What a queue's worker sleeps on: the queue's doorbells (eventfds KVM signals) and the
    worker's wake-up eventfd, written whenever the worker is wanted back in Python (a stop,
    a pause, a reset or quiesce claiming the queue, a device's own change of state).
    doorbells: tuple[int, ...]; wake: int."""
    __slots__ = ()


class VirtioDevice:
    """Base class for virtio device models; see the module docstring."""

    name = "virtio-device"
    device_type = 0
    num_queues = 1
    queue_max_size = 256
    device_features = 0
    # The PCI class code the function shows (transitional devices keep the legacy IDs).
    pci_class = 0xFF0000
    # The config space's layout: its construct declaration or the compiled form of one.
    config_layout: Struct | Packed | None = None

    transport = None                       # set by the transport
    # A native fast path: serve_cycle(queue, vq, gate) -> a CYCLE_* code of
    # hvframe.virtio.native, run by the queue's worker with the queue lock held (see
    # VirtioBlk.serve_cycle). None: every chain goes to handle_chain.
    serve_cycle: Callable[[int, Any, Any], int] | None = None
    # A native fast path that also sleeps: serve_sleeping(queue, vq, gate, fds: WorkerFds) -> a
    # CYCLE_* code, run instead of serve_cycle by the queue's own worker (queue lock held;
    # service_queue given the worker's WorkerFds). Between its cycles the native code waits in
    # poll() on fds.doorbells, its own descriptors and fds.wake, and serves again on a doorbell
    # or input without the GIL; it returns CYCLE_IDLE (besides serve_cycle's codes) once
    # fds.wake is readable, leaving it unread, or when another thread asks for the queue (the
    # cycle's yield request). Whatever changes what the worker must do next writes fds.wake
    # (VirtioPciFunction.notify_queue).
    serve_sleeping: Callable[[int, Any, Any, WorkerFds], int] | None = None

    @property
    def log(self):
        """The device's logger: its transport's (hvframe.device.<transport name>), or one
        named after the model while it has none."""
        if self.transport is not None:
            return self.transport.log
        from ..logs import logger
        return logger("hvframe.device." + self.name)

    def queue_waits(self, queue: int) -> tuple[tuple[int, int], ...]:
        """Descriptors besides its doorbells that the worker of ``queue`` also waits on, as
        (fd, poll events) pairs; asked before every wait, on the worker's thread, so the
        answer may follow the queue's state (a receive queue watches its backend for input
        only while it has buffers to fill). Readiness on them just serves the queue again:
        the device reads them. A descriptor reporting an error or hang-up must stop being
        named, or the worker would wake at once again. Default: none."""
        return ()

    def config_bytes(self) -> bytes:
        """The device configuration space as the guest reads it."""
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A guest write to configuration bytes [offset, offset+len(data)); default ignores."""

    def start(self) -> None:
        """The machine is about to run (its transport's Device.start): a model may start its
        own threads here rather than on the guest's DRIVER_OK. Not called on a machine that is
        never started, so activate() must still cope with a model that was not."""

    def activate(self, features: int) -> None:
        """The driver set DRIVER_OK after negotiating `features` (queues are live now)."""

    def reset(self) -> None:
        """The driver reset the device (queues are already stopped)."""

    def handle_chain(self, queue: int, chain) -> int:
        """Serve one descriptor chain; return the number of bytes written into it."""
        raise NotImplementedError

    def close(self) -> None:
        """The machine is going away."""
