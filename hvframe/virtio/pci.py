"""virtio over PCI (virtio 1.2, section 4.1): one transitional PCI function per virtio device.

Both driver generations bind to the same function:

* modern drivers find five vendor capabilities pointing into BAR4 (32-bit memory, 16 KiB):
      0x0000 common configuration    0x1000 ISR status
      0x2000 device configuration    0x3000 notifications (queue q at 0x3000 + 4q)
  plus the PCI configuration access capability (a window onto BAR4 through config space);
* legacy drivers use the I/O BAR0 header (4.1.4.8): features, queue PFN/size/select/notify,
  status, ISR, the two MSI-X vector registers while MSI-X is on, then device configuration.
BAR1 holds the MSI-X table (one vector per queue plus one for configuration changes).

Data path: every queue has a worker thread. Queue notifications are KVM ioeventfds at the
notify address of BAR4 and the legacy notify port, moved with the BARs (bar_remapped), so a
kick wakes the worker without leaving the kernel; a write that does reach user space (the
synthetic backend, an odd access size) signals the same eventfd. The worker pops chains, the
device model serves them, they go back through the used ring, and one interrupt (MSI-X
through the PCI function, or INTx with the ISR bit) covers the batch when the driver wants it.
A device with VirtioDevice.serve_sleeping sleeps natively on the same doorbells and wake-up
fd; claiming a queue (reset, quiesce, disable) and NEEDS_RESET write the wake-up fd.

A driver that breaks the virtqueue contract (a VirtqueueError: loops, addresses outside RAM,
an index a whole queue ahead...) gets DEVICE_NEEDS_RESET and a configuration interrupt, and
that queue stops until the driver resets the device.
"""
from __future__ import annotations

import os
import select
from functools import partial

from ..core_native import api_ffi as ffi
from ..dispatch import Access, Bus, Partial
from ..pci.device import BarRegion, PciFunction
from ..pci.msi import MsixCapability
from .device import (F_ANY_LAYOUT, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1,
                     ISR_CONFIG, ISR_QUEUE, NO_VECTOR, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
                     STATUS_NEEDS_RESET, VirtioDevice, WorkerFds, bit)
from .native import CYCLE_IDLE, CYCLE_NOTIFY, CYCLE_YIELD, claiming
from .virtqueue import VirtQueue, VirtqueueError
from .. import concurrency
from ..errors import ConfigError
from ..packed import Declarations, declared_later
from ..snapshot.pci import load_pci, save_pci
from ..snapshot.state import DeviceState, encode, parse_record


VIRTIO_VENDOR = 0x1AF4
MODERN_DEVICE_BASE = 0x1040
# Transitional PCI device IDs by virtio device type (4.1.2.3).
TRANSITIONAL_IDS = {1: 0x1000, 2: 0x1001, 5: 0x1002, 3: 0x1003, 8: 0x1004, 4: 0x1005, 9: 0x1009}

# -- capabilities (4.1.4) ---------------------------------------------------------------------
CAP_ID_VENDOR = 0x09
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5


def _declare():
    # The transport's registers and capabilities (virtio 1.2 4.1.4). A run reads them
    # compiled (hvframe.packed); the construct objects are for tests, tools and snapshots.
    from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

    VirtioPciCap = Struct(
        "cap_vndr" / Int8ul,
        "cap_next" / Int8ul,
        "cap_len" / Int8ul,
        "cfg_type" / Int8ul,
        "bar" / Int8ul,
        "id" / Int8ul,
        "padding" / Bytes(2),
        "offset" / Int32ul,
        "length" / Int32ul,
    )
    VirtioPciNotifyCap = Struct(*VirtioPciCap.subcons, "notify_off_multiplier" / Int32ul)
    VirtioPciCfgCap = Struct(*VirtioPciCap.subcons, "pci_cfg_data" / Int32ul)

    VirtioPciCommonCfg = Struct(
        "device_feature_select" / Int32ul,
        "device_feature" / Int32ul,
        "driver_feature_select" / Int32ul,
        "driver_feature" / Int32ul,
        "config_msix_vector" / Int16ul,
        "num_queues" / Int16ul,
        "device_status" / Int8ul,
        "config_generation" / Int8ul,
        "queue_select" / Int16ul,
        "queue_size" / Int16ul,
        "queue_msix_vector" / Int16ul,
        "queue_enable" / Int16ul,
        "queue_notify_off" / Int16ul,
        "queue_desc" / Int64ul,
        "queue_driver" / Int64ul,
        "queue_device" / Int64ul,
        "queue_notify_data" / Int16ul,
        "queue_reset" / Int16ul,
    )
    # The legacy I/O header (4.1.4.8); the MSI-X pair exists only while MSI-X is enabled.
    VirtioPciLegacyHeader = Struct(
        "host_features" / Int32ul,
        "guest_features" / Int32ul,
        "queue_pfn" / Int32ul,
        "queue_size" / Int16ul,
        "queue_select" / Int16ul,
        "queue_notify" / Int16ul,
        "device_status" / Int8ul,
        "isr_status" / Int8ul,
    )
    VirtioPciLegacyMsix = Struct("config_msix_vector" / Int16ul, "queue_msix_vector" / Int16ul)
    return locals()


def _declare_state():
    # The transport's checkpoint record: the PCI function, the common configuration, each
    # queue as the driver set it up with the device's ring positions, then the device model's
    # own record (hvframe.snapshot.state framing). Made when a snapshot is taken or loaded.
    from construct import (Flag, GreedyBytes, Int8ul, Int16ul, Int32ul, Int64ul, Prefixed,
                           PrefixedArray, Struct)
    from ..snapshot.pci import LAYOUTS as PCI_LAYOUTS
    PCI_FUNCTION_STATE = PCI_LAYOUTS.module_getattr("PCI_FUNCTION_STATE")
    VIRTIO_QUEUE_STATE = Struct(
        "size" / Int16ul, "msix_vector" / Int16ul, "enabled" / Flag, "desc" / Int64ul,
        "driver" / Int64ul, "device" / Int64ul, "pfn" / Int32ul, "broken" / Flag,
        "live" / Flag, "last_avail_idx" / Int16ul, "used_idx" / Int16ul,
    )
    VIRTIO_PCI_STATE = Struct(
        "pci" / PCI_FUNCTION_STATE,
        "status" / Int8ul, "device_feature_select" / Int32ul, "driver_feature_select" / Int32ul,
        "driver_features" / Int64ul, "features" / Int64ul, "config_vector" / Int16ul,
        "config_generation" / Int8ul, "queue_select" / Int32ul, "isr" / Int8ul, "live" / Flag,
        "queues" / PrefixedArray(Int16ul, VIRTIO_QUEUE_STATE),
        "device" / Prefixed(Int32ul, GreedyBytes),
    )
    return {"PCI_FUNCTION_STATE": PCI_FUNCTION_STATE, "VIRTIO_QUEUE_STATE": VIRTIO_QUEUE_STATE,
            "VIRTIO_PCI_STATE": VIRTIO_PCI_STATE}


_states: dict | None = None


def _state(name: str):
    global _states
    if _states is None:
        _states = _declare_state()
    return _states[name]


LAYOUTS = Declarations(__name__, __file__, _declare)


def __getattr__(name: str):
    # The checkpoint records keep the module-level names they had before they were declared
    # late (a tool reading checkpoints imports them); asking for one imports construct.
    if name in ("PCI_FUNCTION_STATE", "VIRTIO_QUEUE_STATE", "VIRTIO_PCI_STATE"):
        return _state(name)
    return LAYOUTS.module_getattr(name)

COMMON_SIZE = LAYOUTS.VirtioPciCommonCfg.sizeof()

LEGACY_HEADER_SIZE = LAYOUTS.VirtioPciLegacyHeader.sizeof()            # 20
LEGACY_MSIX_SIZE = LAYOUTS.VirtioPciLegacyMsix.sizeof()                # 4
LEGACY_NOTIFY = LAYOUTS.VirtioPciLegacyHeader.fields["queue_notify"][0]
LEGACY_ISR = LAYOUTS.VirtioPciLegacyHeader.fields["isr_status"][0]
# Where the configuration access window's fields sit in its capability (looked up once here,
# not on every configuration access).
CFG_CAP_BAR, CFG_CAP_OFFSET, CFG_CAP_LENGTH, CFG_CAP_DATA = (
    LAYOUTS.VirtioPciCfgCap.fields[n][0] for n in ("bar", "offset", "length", "pci_cfg_data"))
QUEUE_MSIX_VECTOR = LAYOUTS.VirtioPciCommonCfg.fields["queue_msix_vector"][0]
LEGACY_PAGE = 4096          # queue_pfn unit and used-ring alignment of legacy queues

# BAR layout.
LEGACY_BAR, MSIX_BAR, MODERN_BAR = 0, 1, 4
MODERN_BAR_SIZE = 0x4000
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
REGION_SIZE = 0x1000
NOTIFY_MULTIPLIER = 4
MAX_QUEUES = 64


def _le(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _names_by_offset(layout) -> dict[int, str]:
    return {off: name for name, (off, _) in layout.fields.items()}


# The bus hands the register handlers one whole field per call (hvframe.dispatch.Access): a
# narrower write merges into the field (so a 64-bit address written as two dwords works),
# and the handler needs no byte-lane code.
COMMON_ACCESS = Access.of_struct(LAYOUTS.VirtioPciCommonCfg)
LEGACY_ACCESS = Access.of_struct(LAYOUTS.VirtioPciLegacyHeader)
# Bytes 20-23 of the legacy BAR: the two MSI-X vectors while MSI-X is on, else the first four
# bytes of the device configuration; both are words.
LEGACY_WORDS = Access(sizes=(2,), aligned=True, partial=Partial.MERGE)
_COMMON_NAMES = _names_by_offset(LAYOUTS.VirtioPciCommonCfg)
_LEGACY_NAMES = _names_by_offset(LAYOUTS.VirtioPciLegacyHeader)
_LEGACY_MSIX_NAMES = _names_by_offset(LAYOUTS.VirtioPciLegacyMsix)


_claims_lock = concurrency.lock(concurrency.LEAF, "queue claims")


class QueueState:
    """The driver's view of one queue, and the device's VirtQueue once it is live."""

    def __init__(self, index: int, max_size: int):
        self.index = index
        self.max_size = max_size
        # Held while served, and while a worker sleeps natively (VirtioDevice.serve_sleeping):
        # another thread takes it only as a claim (claiming(), claims += 1, then the worker's
        # wake-up fd), which brings the worker out of its sleep to let go.
        self.lock = concurrency.lock(concurrency.QUEUE, f"queue {index}")
        # Threads waiting for the lock (a reset, a disable): the Python service loop lets go
        # between chains when there are any, as the native cycle does (CYCLE_YIELD).
        self.claims = 0
        # A checkpoint is being taken: the worker serves nothing (the transport's quiesce).
        self.quiesced = False
        self.clear()

    def clear(self) -> None:
        self.size = self.max_size
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0
        self.pfn = 0
        self.vq: VirtQueue | None = None
        self.broken = False


class _QueueWorker:
    """The thread serving one queue (a DeviceThread the transport owns): it sleeps on the
    queue's doorbells and a wake-up fd. If it dies of a bug, the queue is marked broken and
    the device NEEDS_RESET, so the driver is told instead of waiting forever."""

    def __init__(self, transport: "VirtioPciFunction", queue: QueueState, fds: list[int]):
        self.transport = transport
        self.queue = queue
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds = fds + [self.wake_fd]
        self.sleep_fds = WorkerFds(tuple(fds), self.wake_fd)  # for VirtioDevice.serve_sleeping
        self.thread = concurrency.DeviceThread(
            f"{transport.device.name}-q{queue.index}", self._run, wake=self.wake,
            on_error=self._failed).start()

    def wake(self) -> None:
        if self.wake_fd >= 0:
            os.eventfd_write(self.wake_fd, 1)

    def stop(self, deadline: float = concurrency.JOIN_DEADLINE) -> bool:
        if not self.thread.stop(deadline):
            return False   # stuck in a request: its wake fd stays open (a leak, not a reuse)
        fd, self.wake_fd = self.wake_fd, -1
        os.close(fd)
        return True

    def _failed(self, exc: BaseException) -> None:
        self.queue.broken = True
        self.transport.needs_reset(f"queue {self.queue.index}: worker failed: {exc}")

    def _run(self, thread: concurrency.DeviceThread) -> None:
        poller = select.poll()
        for fd in self.fds:
            poller.register(fd, select.POLLIN)
        device, index = self.transport.device, self.queue.index
        while not thread.stopping:
            # The device's own descriptors for this wait (VirtioDevice.queue_waits), only
            # while the queue can be served: a backend with input waiting for a reset or
            # quiesced queue would make this loop spin (the transport wakes the worker when
            # the queue can be served again).
            extra = {fd: ev for fd, ev in device.queue_waits(index) if fd not in self.fds} \
                if _servable(self.transport, self.queue) else {}
            for fd, ev in extra.items():
                poller.register(fd, ev)
            try:
                ready = poller.poll()
            finally:
                for fd in extra:
                    poller.unregister(fd)
            for fd, events in ready:
                if fd in extra:
                    continue          # the device's: it reads them when it serves the queue
                if events & (select.POLLNVAL | select.POLLERR):
                    return            # a doorbell was closed under us: the machine is going
                try:
                    os.eventfd_read(fd)
                except (BlockingIOError, OSError):
                    pass
            if thread.stopping:
                return
            thread.checkpoint()
            self.transport.service_queue(self.queue, self.sleep_fds)


def _servable(transport, q: QueueState) -> bool:
    """Whether q's worker may serve it now (service_queue checks again under q.lock)."""
    return not (q.vq is None or q.broken or not transport.live
                or transport.status & STATUS_NEEDS_RESET or q.quiesced)


class _Handler:
    """A register region of the transport: read/write calls routed to two of its methods."""

    def __init__(self, read, write):
        self.read = read
        self.write = write


class VirtioPciFunction(PciFunction, DeviceState):
    """A virtio device on PCI: the transport around one VirtioDevice."""

    state_version = 1
    state_layout = declared_later(lambda: _state("VIRTIO_PCI_STATE"))

    def __init__(self, device: VirtioDevice, *, name: str | None = None):
        nq = device.num_queues
        if not 1 <= nq <= MAX_QUEUES:
            raise ValueError(f"{device.name}: {nq} queues (1-{MAX_QUEUES} supported)")
        vtype = device.device_type
        legacy_id = TRANSITIONAL_IDS.get(vtype)
        super().__init__(VIRTIO_VENDOR, legacy_id or MODERN_DEVICE_BASE + vtype,
                         device.pci_class, revision=0 if legacy_id else 1,
                         subsystem_vendor=VIRTIO_VENDOR,
                         subsystem_id=vtype if legacy_id else 0x40, pin=1,
                         name=name or device.name)
        self.device = device
        device.transport = self
        # Status, features and queue registers; the ISR under it (hvframe.concurrency).
        self._lock = concurrency.lock(concurrency.DEVICE, f"{self.name} registers",
                                      reentrant=True)
        self._isr_lock = concurrency.lock(concurrency.DEVICE_INNER, f"{self.name} ISR")
        self._reset_lock = concurrency.lock(concurrency.RESET, f"{self.name} reset")
        # Doorbells are made on the first BAR mapping (PCI bus lock) or the first activation
        # (register lock), whichever comes first: once.
        self._doorbells_lock = concurrency.lock(concurrency.DEVICE_INNER, f"{self.name} doorbells")
        self.queues = [QueueState(i, device.queue_max_size) for i in range(nq)]
        self.offered = (device.device_features | bit(F_VERSION_1) | bit(F_RING_EVENT_IDX)
                        | bit(F_RING_INDIRECT_DESC) | bit(F_ANY_LAYOUT))
        self._workers: list[_QueueWorker] = []
        self._doorbells: list[tuple] = []  # per queue: (modern IoEventFd, legacy IoEventFd)
        self._reset_state()

        legacy_size = 32
        while legacy_size < LEGACY_HEADER_SIZE + LEGACY_MSIX_SIZE + len(device.config_bytes()):
            legacy_size <<= 1
        tail = LEGACY_HEADER_SIZE + LEGACY_MSIX_SIZE
        self.add_bar(LEGACY_BAR, legacy_size, "io", regions=(
            BarRegion(0, LEGACY_HEADER_SIZE, _Handler(self.legacy_read, self.legacy_write),
                      LEGACY_ACCESS, "legacy header"),
            BarRegion(LEGACY_HEADER_SIZE, LEGACY_MSIX_SIZE,
                      _Handler(self.legacy_words_read, self.legacy_words_write), LEGACY_WORDS,
                      "legacy MSI-X or config"),
            BarRegion(tail, legacy_size - tail,
                      _Handler(self.legacy_config_read, self.legacy_config_write),
                      name="legacy config")))
        modern = (
            BarRegion(COMMON_OFF, REGION_SIZE, _Handler(self.common_read, self.common_write),
                      COMMON_ACCESS, "common"),
            BarRegion(ISR_OFF, REGION_SIZE,
                      _Handler(lambda off, size: self.read_isr() if off == 0 else 0,
                               lambda off, size, value: None), name="isr"),
            BarRegion(DEVICE_OFF, REGION_SIZE,
                      _Handler(self.device_config_read, self.device_config_write),
                      name="device"),
            BarRegion(NOTIFY_OFF, REGION_SIZE,
                      _Handler(lambda off, size: 0,
                               lambda off, size, value: self.kick(off // NOTIFY_MULTIPLIER)),
                      name="notify"))
        self.add_bar(MODERN_BAR, MODERN_BAR_SIZE, "mmio32", regions=modern)
        # The PCI configuration access window (VIRTIO_PCI_CAP_PCI_CFG) reaches BAR4 whether it
        # is decoded or not, with the same access rules: through a bus of its own.
        self._modern_window = Bus("virtio-pci cfg window")
        for r in modern:
            self._modern_window.register(r.offset, r.length, r.handler, name=r.name,
                                         access=r.access)
        MsixCapability(self, vectors=nq + 1, bar=MSIX_BAR, table_offset=0, pba_offset=0x800,
                       bar_size=0x1000)
        self._add_virtio_cap(CFG_COMMON, COMMON_OFF, REGION_SIZE)
        self._add_virtio_cap(CFG_ISR, ISR_OFF, REGION_SIZE)
        self._add_virtio_cap(CFG_DEVICE, DEVICE_OFF, REGION_SIZE)
        self._add_virtio_cap(CFG_NOTIFY, NOTIFY_OFF, REGION_SIZE)
        self._pci_cfg_cap = self._add_virtio_cap(CFG_PCI, 0, 0)

    # -- capabilities ---------------------------------------------------------------------
    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int) -> int:
        fields = dict(cap_vndr=CAP_ID_VENDOR, cap_next=0, cfg_type=cfg_type,
                      bar=MODERN_BAR, id=0, padding=b"\0\0", offset=offset, length=length)
        if cfg_type == CFG_NOTIFY:
            st, fields["notify_off_multiplier"] = LAYOUTS.VirtioPciNotifyCap, NOTIFY_MULTIPLIER
        elif cfg_type == CFG_PCI:
            st, fields["pci_cfg_data"], fields["bar"] = LAYOUTS.VirtioPciCfgCap, 0, 0
        else:
            st = LAYOUTS.VirtioPciCap
        fields["cap_len"] = st.sizeof()
        body = st.build(fields)[2:]          # add_capability writes id and next itself
        wmask = None
        if cfg_type == CFG_PCI:
            # The driver picks bar, offset and length, then moves data through pci_cfg_data.
            wm = bytearray(len(body))
            for name, (o, n) in st.fields.items():
                if name in ("bar", "offset", "length", "pci_cfg_data"):
                    wm[o - 2:o - 2 + n] = b"\xff" * n
            wmask = bytes(wm)
        return self.add_capability(CAP_ID_VENDOR, body, wmask)

    def _pci_cfg_window(self) -> tuple[int, int, int, int]:
        """(bar, offset, length, data config offset) of the configuration access window."""
        base = self._pci_cfg_cap
        cs = self.config
        return (cs.get(base + CFG_CAP_BAR, 1), cs.get(base + CFG_CAP_OFFSET, 4),
                cs.get(base + CFG_CAP_LENGTH, 4), base + CFG_CAP_DATA)

    def _pci_cfg_access(self, offset: int, size: int) -> tuple[int, int, int] | None:
        """(BAR4 offset, length, data config offset) when a config access at offset/size
        touches pci_cfg_data and the window the driver set up is a valid BAR4 access."""
        data = self._pci_cfg_cap + CFG_CAP_DATA
        if not (offset < data + 4 and data < offset + size):
            return None              # every other config access: no window to look at
        bar, off, length, _ = self._pci_cfg_window()
        if bar == MODERN_BAR \
                and length in (1, 2, 4) and off % length == 0 and off + length <= MODERN_BAR_SIZE:
            return off, length, data
        return None

    def config_read(self, offset: int, size: int) -> int:
        access = self._pci_cfg_access(offset, size)
        if access is not None:
            off, length, data = access
            self.config.put(data, 4, self._modern_window.read(off, length))
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        access = self._pci_cfg_access(offset, size)
        if access is not None:
            off, length, data = access
            v = self.config.get(data, 4) & ((1 << (8 * length)) - 1)
            self._modern_window.write(off, length, v)

    # -- state ----------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.features = 0                  # negotiated, valid once FEATURES_OK / DRIVER_OK
        self.config_vector = NO_VECTOR
        self.config_generation = 0
        self.queue_select = 0
        self.isr = 0
        self.live = False
        self._resetting = False

    def _selected(self) -> QueueState | None:
        qs = self.queue_select
        return self.queues[qs] if qs < len(self.queues) else None

    def _valid_vector(self, vector: int) -> int:
        return vector if vector < self.msix.vectors else NO_VECTOR

    # -- common configuration (modern) ----------------------------------------------------
    def _common_get(self, name: str) -> int:
        q = self._selected()
        if name == "device_feature":
            sel = self.device_feature_select
            return (self.offered >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if name == "driver_feature":
            sel = self.driver_feature_select
            return (self.driver_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            return self.status
        if name == "queue_size":
            return q.size if q else 0
        if name == "queue_msix_vector":
            return q.msix_vector if q else NO_VECTOR
        if name == "queue_enable":
            return int(q.enabled) if q else 0
        if name == "queue_notify_off":
            return q.index if q else 0
        if name in ("queue_desc", "queue_driver", "queue_device"):
            return getattr(q, name[6:]) if q else 0
        if name == "config_msix_vector":
            return self.config_vector
        if name == "device_feature_select":
            return self.device_feature_select
        if name == "driver_feature_select":
            return self.driver_feature_select
        if name == "queue_select":
            return self.queue_select
        if name == "config_generation":
            return self.config_generation
        return 0            # queue_notify_data, queue_reset: not offered, read as zero

    def _common_set(self, name: str, value: int) -> None:
        q = self._selected()
        if name in ("device_feature_select", "driver_feature_select", "queue_select"):
            setattr(self, name, value)
        elif name == "driver_feature":
            sel = self.driver_feature_select
            if sel < 2 and not self.status & STATUS_FEATURES_OK:
                mask = 0xFFFFFFFF << (32 * sel)
                self.driver_features = (self.driver_features & ~mask) | (value << (32 * sel))
        elif name == "device_status":
            self._write_status(value, modern=True)
        elif name == "config_msix_vector":
            self.config_vector = self._valid_vector(value)
        elif q is None or q.enabled:
            return           # queue registers are frozen while the queue is enabled
        elif name == "queue_size":
            q.size = value
        elif name == "queue_msix_vector":
            q.msix_vector = self._valid_vector(value)
        elif name == "queue_enable":
            if value == 1:
                self._enable_queue(q)
        elif name in ("queue_desc", "queue_driver", "queue_device"):
            setattr(q, name[6:], value)

    def common_read(self, offset: int, size: int) -> int:
        with self._lock:
            return self._common_get(_COMMON_NAMES[offset])

    def common_write(self, offset: int, size: int, value: int) -> None:
        with concurrency.deferring(), self._lock:
            if self._resetting:
                return       # another vCPU's reset is under way: the device is not there yet
            q = self._selected()
            if q is not None and q.enabled:
                # A vector write to an enabled queue is still allowed (4.1.5.1.2 remaps).
                if offset == QUEUE_MSIX_VECTOR:
                    q.msix_vector = self._valid_vector(value)
                    self._wake_worker(q)   # a worker asleep in C fires the old vector's gate
                    return
            self._common_set(_COMMON_NAMES[offset], value)

    # -- legacy header --------------------------------------------------------------------
    def _legacy_get(self, name: str) -> int:
        q = self._selected()
        if name == "host_features":
            return self.offered & 0xFFFFFFFF
        if name == "guest_features":
            return self.driver_features & 0xFFFFFFFF
        if name == "queue_pfn":
            return q.pfn if q else 0
        if name == "queue_size":
            return q.max_size if q else 0
        if name == "queue_select":
            return self.queue_select
        if name == "device_status":
            return self.status
        if name == "config_msix_vector":
            return self.config_vector
        if name == "queue_msix_vector":
            return q.msix_vector if q else NO_VECTOR
        return 0

    def _legacy_set(self, name: str, value: int) -> None:
        q = self._selected()
        if name == "guest_features":
            self.driver_features = value & self.offered & 0xFFFFFFFF
            self.features = self.driver_features
        elif name == "queue_pfn" and q is not None:
            if value == 0:
                # It waits for the queue's worker: not under our lock (concurrency, rule 2).
                concurrency.defer(partial(self._disable_queue, q))
            elif not q.enabled:
                q.pfn = value
                q.size = q.max_size
                q.desc = value * LEGACY_PAGE
                q.driver = q.desc + 16 * q.size
                avail_end = q.driver + 6 + 2 * q.size
                q.device = (avail_end + LEGACY_PAGE - 1) & ~(LEGACY_PAGE - 1)
                self._enable_queue(q)
        elif name == "queue_select":
            self.queue_select = value
        elif name == "queue_notify":
            self.kick(value)
        elif name == "device_status":
            self._write_status(value, modern=False)
        elif name == "config_msix_vector":
            self.config_vector = self._valid_vector(value)
        elif name == "queue_msix_vector" and q is not None:
            q.msix_vector = self._valid_vector(value)
            self._wake_worker(q)           # as in common_write

    def legacy_read(self, offset: int, size: int) -> int:
        if offset == LEGACY_ISR:
            return self.read_isr()
        with self._lock:
            return self._legacy_get(_LEGACY_NAMES[offset])

    def legacy_write(self, offset: int, size: int, value: int) -> None:
        if offset == LEGACY_NOTIFY:
            self.kick(value)       # the hot path, when no ioeventfd caught it
            return
        with concurrency.deferring(), self._lock:
            if self._resetting:
                return       # another vCPU's reset is under way: the device is not there yet
            self._legacy_set(_LEGACY_NAMES[offset], value)

    def legacy_words_read(self, offset: int, size: int) -> int:
        if not self.msix.enabled:
            return self.device_config_read(offset, size)
        with self._lock:
            return self._legacy_get(_LEGACY_MSIX_NAMES[offset])

    def legacy_words_write(self, offset: int, size: int, value: int) -> None:
        if not self.msix.enabled:
            self.device_config_write(offset, size, value)
            return
        with concurrency.deferring(), self._lock:
            if not self._resetting:
                self._legacy_set(_LEGACY_MSIX_NAMES[offset], value)

    def _legacy_config_offset(self, offset: int) -> int:
        """Device configuration follows the MSI-X vectors only while MSI-X is on."""
        return offset if self.msix.enabled else offset + LEGACY_MSIX_SIZE

    def legacy_config_read(self, offset: int, size: int) -> int:
        return self.device_config_read(self._legacy_config_offset(offset), size)

    def legacy_config_write(self, offset: int, size: int, value: int) -> None:
        self.device_config_write(self._legacy_config_offset(offset), size, value)

    # -- device configuration -------------------------------------------------------------
    def device_config_read(self, offset: int, size: int) -> int:
        data = self.device.config_bytes()
        chunk = data[offset:offset + size]
        return int.from_bytes(chunk + b"\0" * (size - len(chunk)), "little")

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        if offset < len(self.device.config_bytes()):
            self.device.config_write(offset, _le(value, size))

    def config_changed(self) -> None:
        """The device's configuration changed (e.g. disk capacity): tell the driver."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
        self._interrupt_config()

    # -- status, reset, activation --------------------------------------------------------
    def _write_status(self, value: int, *, modern: bool) -> None:
        value &= 0xFF
        if value == 0:
            # A reset waits for the queue workers, which may need this lock (or the PCI bus
            # lock, for INTx) to finish: it runs once the vCPU holds no lock.
            concurrency.defer(self.reset)
            return
        old = self.status
        if modern and value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            # The modern interface needs VERSION_1, and nothing the device did not offer.
            if self.driver_features & ~self.offered or not self.driver_features & bit(F_VERSION_1):
                value &= ~STATUS_FEATURES_OK
            else:
                self.features = self.driver_features
        # Only a reset clears what the driver set (virtio 1.2, 2.1.2): clearing DRIVER_OK and
        # setting it again would activate the device anew under its running workers.
        value |= old & (STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        self.status = value | (old & STATUS_NEEDS_RESET)
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            self._activate()

    def _activate(self) -> None:
        """DRIVER_OK: the enabled queues go live."""
        self.live = True
        for q in self.queues:
            if q.enabled and q.vq is None:
                self._build_queue(q)
        try:
            self.device.activate(self.features)
        except Exception:
            self.log.exception("%s: activation failed", self.name)
            self.needs_reset("activation failed")
            return
        self._start_workers()
        for w in self._workers:
            w.wake()

    def _enable_queue(self, q: QueueState) -> None:
        q.enabled = True
        if self.live:
            self._build_queue(q)
            self._start_workers()
            self._workers[q.index].wake()

    def _disable_queue(self, q: QueueState, deadline: float | None = None) -> bool:
        """Stop q once its worker is done with the batch in hand; False if that did not
        happen within `deadline` seconds (closing a machine whose disk hangs)."""
        with claiming(q.vq):
            with _claims_lock:
                q.claims += 1
            self._wake_worker(q)      # out of a native sleep (VirtioDevice.serve_sleeping)
            try:
                if not q.lock.acquire(timeout=-1 if deadline is None else deadline):
                    self.log.error("%s: queue %d still busy after %.1f s; left as it is",
                              self.name, q.index, deadline)
                    return False
            finally:
                with _claims_lock:
                    q.claims -= 1
            try:
                if q.vq is not None:
                    q.vq.close()
                q.clear()
            finally:
                q.lock.release()
        return True

    def _build_queue(self, q: QueueState, last_avail_idx: int = 0, used_idx: int = 0) -> None:
        try:
            if q.size > q.max_size:
                raise VirtqueueError(f"queue size {q.size} > maximum {q.max_size}")
            if self.pci_bus is None:
                raise VirtqueueError("the function is not on a PCI bus")
            q.vq = VirtQueue(self.pci_bus.machine.memory, q.size, q.desc, q.driver, q.device,
                             event_idx=bool(self.features & bit(F_RING_EVENT_IDX)),
                             indirect=bool(self.features & bit(F_RING_INDIRECT_DESC)),
                             last_avail_idx=last_avail_idx, used_idx=used_idx)
        except VirtqueueError as e:
            q.broken = True
            self.needs_reset(f"queue {q.index}: {e}")

    def reset(self) -> None:
        """Device reset (status 0): in-flight requests finish first, so nothing touches guest
        memory once the driver sees status read back 0. One reset at a time; register writes
        from other vCPUs meanwhile are dropped (the device is not there for them yet)."""
        with self._reset_lock:
            with self._lock:
                self.live = False
                self._resetting = True
            for q in self.queues:
                self._disable_queue(q)
            try:
                self.device.reset()
            except Exception:
                self.log.exception("%s: device reset failed", self.name)
            with self._lock:
                self._reset_state()
            with self._isr_lock:
                self.set_intx(0)

    def needs_reset(self, why: str) -> None:
        """The driver broke the contract: DEVICE_NEEDS_RESET and a configuration interrupt."""
        with self._lock:
            if self.status & STATUS_NEEDS_RESET:
                return                # said once until the reset: a guest cannot flood the log
            self.status |= STATUS_NEEDS_RESET
        self.log.warning("%s: %s; device needs reset", self.name, why)
        for w in self._workers:
            w.wake()                  # a natively sleeping worker stops serving
        self._interrupt_config()

    # -- notifications and interrupts -----------------------------------------------------
    def doorbell_fd(self, index: int) -> int:
        """The eventfd KVM signals for queue `index`'s notifications (-1 while the function
        has no doorbells yet, before its BARs are first mapped)."""
        return self._doorbells[index][0].fd if self._doorbells else -1

    def kick(self, index: int) -> None:
        """A queue notification that reached user space: hand it to the queue's worker."""
        if 0 <= index < len(self.queues) and self._doorbells:
            self._doorbells[index][0].signal()

    def read_isr(self) -> int:
        """Reading the ISR clears it and deasserts INTx (4.1.4.5)."""
        with self._isr_lock:
            value, self.isr = self.isr, 0
            if value:
                self.set_intx(0)
            return value

    def _interrupt_intx(self, cause: int) -> None:
        with self._isr_lock:
            self.isr |= cause
            self.set_intx(1)

    def interrupt_queue(self, q: QueueState) -> None:
        if self.msix.enabled:
            if q.msix_vector != NO_VECTOR:
                self.msix.notify(q.msix_vector)
        else:
            self._interrupt_intx(ISR_QUEUE)

    def _interrupt_config(self) -> None:
        if self.msix.enabled:
            if self.config_vector != NO_VECTOR:
                self.msix.notify(self.config_vector)
        else:
            self._interrupt_intx(ISR_CONFIG)

    def service_queue(self, q: QueueState, sleep_fds: WorkerFds | None = None) -> None:
        """Serve everything available on queue q (its worker thread; with the worker's
        sleep_fds a device with serve_sleeping may sleep natively in between)."""
        with q.lock:
            vq = q.vq
            if not _servable(self, q):
                return
            device = self.device
            cycle = device.serve_cycle
            # Not asleep in C while a claimant waits: its wake-up may have been read before
            # this worker took the lock, and a queue that has never run natively has no
            # yield request for it to set.
            if sleep_fds is not None and device.serve_sleeping is not None and not q.claims:
                cycle = partial(device.serve_sleeping, fds=sleep_fds)
            try:
                if cycle is not None and self._serve_natively(q, vq, cycle):
                    return
                # The Python path: what is left, chain by chain, until someone else waits
                # for the queue (a reset must not starve behind a driver that keeps posting).
                while not q.claims:
                    vq.disable_notifications()
                    while not q.claims:
                        chain = vq.pop()
                        if chain is None:
                            break
                        self._serve_chain(q, vq, chain)
                    # The driver hears of this batch before notifications go back on, as
                    # from the native cycle: where the driver's interrupt flag and the
                    # device's notify flag are one word (rings at one address), the two
                    # paths then send the same interrupts.
                    if vq.needs_notification():
                        self.interrupt_queue(q)
                    if not vq.enable_notifications():
                        break
                else:
                    self._wake_worker(q)      # to carry on once the claimant is done
            except VirtqueueError as e:
                q.broken = True
                if vq.needs_notification():
                    self.interrupt_queue(q)
                self.needs_reset(f"queue {q.index}: {e}")
                return
            if vq.needs_notification():
                self.interrupt_queue(q)

    def _serve_chain(self, q: QueueState, vq, chain) -> None:
        try:
            written = self.device.handle_chain(q.index, chain)
        except Exception:
            # A device-model bug: fail this request, keep the VMM running.
            self.log.exception("%s: queue %d request failed", self.name, q.index)
            written = 0
        vq.push(chain.head, written)

    def _serve_natively(self, q: QueueState, vq, cycle) -> bool:
        """(q.lock held) The device's native cycle serves the queue, polls for the next
        batch and interrupts through the vector's irqfd; Python steps in for the chains and
        interrupts the cycle hands back. False: finish on the Python path."""
        while True:
            rc = cycle(q.index, vq, self._irq_gate(q))
            if rc == CYCLE_IDLE:
                return True
            if rc == CYCLE_NOTIFY:
                self.interrupt_queue(q)
            elif rc == CYCLE_YIELD:
                # Someone waits for q.lock (a reset): let them in, then look again.
                self._wake_worker(q)
                return True
            else:
                chain = vq.pop()          # raises VirtqueueError for an invalid chain
                if chain is None:
                    return False          # the native path cannot run at all
                self._serve_chain(q, vq, chain)

    def _irq_gate(self, q: QueueState):
        """The irqfd gate of q's MSI-X vector, or NULL (every interrupt through Python)."""
        if q.msix_vector == NO_VECTOR or self.msix is None:
            return ffi.NULL
        return self.msix.gate(q.msix_vector)

    def notify_queue(self, index: int) -> None:
        """Let a device ask for its queue to be served (e.g. receive data arrived)."""
        if self._workers:
            self._workers[index].wake()

    def _wake_worker(self, q: QueueState) -> None:
        if q.index < len(self._workers):
            self._workers[q.index].wake()

    # -- checkpoint (hvframe.snapshot.state) -----------------------------------------------------
    def state_blocker(self) -> str | None:
        if not isinstance(self.device, DeviceState):
            return f"{self.name}: its virtio device model has no checkpoint support"
        return None

    def quiesce(self) -> None:
        """Every queue's worker finishes the batch in hand (requests taken from the ring are
        completed and in the used ring) and serves nothing more until unquiesce()."""
        for q in self.queues:
            q.quiesced = True
            with claiming(q.vq):
                with _claims_lock:
                    q.claims += 1
                self._wake_worker(q)
                try:
                    q.lock.acquire()
                    q.lock.release()
                finally:
                    with _claims_lock:
                        q.claims -= 1
        if isinstance(self.device, DeviceState):
            self.device.quiesce()

    def unquiesce(self) -> None:
        for q in self.queues:
            q.quiesced = False
        if isinstance(self.device, DeviceState):
            self.device.unquiesce()
        for w in self._workers:
            w.wake()                  # whatever the driver queued meanwhile

    def save_state(self) -> dict:
        with self._lock:
            queues = []
            for q in self.queues:
                vq = q.vq
                queues.append(dict(size=q.size, msix_vector=q.msix_vector, enabled=q.enabled,
                                   desc=q.desc, driver=q.driver, device=q.device, pfn=q.pfn,
                                   broken=q.broken, live=vq is not None,
                                   last_avail_idx=vq.last_avail_idx if vq else 0,
                                   used_idx=vq.used_idx if vq else 0))
            return dict(pci=save_pci(self), status=self.status,
                        device_feature_select=self.device_feature_select,
                        driver_feature_select=self.driver_feature_select,
                        driver_features=self.driver_features, features=self.features,
                        config_vector=self.config_vector,
                        config_generation=self.config_generation,
                        queue_select=self.queue_select, isr=self.isr, live=self.live,
                        queues=queues, device=encode(self.device))

    def load_state(self, s) -> None:
        """Into a transport fresh from its configuration (no driver yet): the registers, the
        queues rebuilt at the ring positions saved, workers started and woken once."""
        if len(s.queues) != len(self.queues):
            raise ConfigError(f"snapshot: {self.name}: {len(s.queues)} queues saved, this "
                              f"device has {len(self.queues)}")
        device_state = parse_record(self.device, s.device, f"{self.name} device")
        load_pci(self, s.pci)
        with self._lock:
            self.status, self.features = s.status, s.features
            self.device_feature_select = s.device_feature_select
            self.driver_feature_select = s.driver_feature_select
            self.driver_features = s.driver_features
            self.config_vector, self.config_generation = s.config_vector, s.config_generation
            self.queue_select, self.live = s.queue_select, s.live
            with self._isr_lock:
                self.isr = s.isr
            for q, sq in zip(self.queues, s.queues):
                q.size, q.msix_vector, q.enabled = sq.size, sq.msix_vector, sq.enabled
                q.desc, q.driver, q.device, q.pfn = sq.desc, sq.driver, sq.device, sq.pfn
                q.broken = sq.broken
                if sq.live:
                    self._build_queue(q, sq.last_avail_idx, sq.used_idx)
            if self.live:
                try:
                    self.device.activate(self.features)
                except Exception:
                    self.log.exception("%s: activation failed", self.name)
                    self.needs_reset("activation failed")
            # After activation: activate() sets what negotiation implies, the record puts
            # back what the driver changed since (a virtio-net's offloads, queue pairs).
            self.device.load_state(device_state)
            if self.live:
                self._start_workers()
                for w in self._workers:
                    w.wake()

    # -- doorbells and workers ------------------------------------------------------------
    def _ensure_doorbells(self) -> None:
        with self._doorbells_lock:
            if self._doorbells or self.pci_bus is None:
                return
            m = self.pci_bus.machine
            self._doorbells = [(m.add_ioeventfd("mmio", None, 2),
                                m.add_ioeventfd("pio", None, 2, datamatch=i))
                               for i in range(len(self.queues))]
            # Closers run last-registered first: the workers stop before their doorbells close.
            m.on_close(self._stop_workers)

    def bar_remapped(self, bar, address: int | None) -> None:
        """PciBus: a BAR was mapped, moved or unmapped; the doorbells follow it."""
        if bar.index not in (LEGACY_BAR, MODERN_BAR):
            return
        self._ensure_doorbells()
        for i, (modern, legacy) in enumerate(self._doorbells):
            if bar.index == MODERN_BAR:
                modern.move(None if address is None
                            else address + NOTIFY_OFF + NOTIFY_MULTIPLIER * i)
            else:
                legacy.move(None if address is None else address + LEGACY_NOTIFY)

    def start(self) -> None:
        """(Device.start, before the first vCPU runs) The queue workers and the model's own
        threads start now, asleep until DRIVER_OK wakes them: a driver's DRIVER_OK write
        then waits for no thread to start (a thread start hands the GIL back and forth and,
        on a busy host, let the scheduler take the vCPU away: 2-8 ms measured under SeaBIOS).
        A transport that was never started (the synthetic machine) starts them there."""
        if self.pci_bus is not None:
            self._start_workers()
        self.device.start()

    def _start_workers(self) -> None:
        if self._workers:
            return
        self._ensure_doorbells()
        for i, q in enumerate(self.queues):
            fds = [ev.fd for ev in self._doorbells[i]] if self._doorbells else []
            self._workers.append(_QueueWorker(self, q, fds))

    def _stop_workers(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []

    def close(self) -> None:
        self._modern_window.close()
        self._stop_workers()
        for q in self.queues:
            self._disable_queue(q, deadline=concurrency.JOIN_DEADLINE)
        self.device.close()
