"""A virtio driver in Python, for testing and benchmarking virtio device models without a guest.

It talks to a VirtioPciFunction on a machine's dispatch core exactly as a guest would: PCI
configuration through ports 0xcf8/0xcfc, the capability list to find the modern regions (or
the legacy I/O BAR), and split virtqueues it lays out in guest RAM. Requests complete on the
device's worker threads; the driver waits for them on the queue's interrupt.

    drv = VirtioPciDriver(machine, slot=2)
    drv.initialize(wanted_features)             # reset, negotiate, queues, DRIVER_OK
    head = drv.submit(0, [(gpa, length, writable), ...])
    drv.kick(0); drv.wait_used(0, count)
"""
from __future__ import annotations

import struct
import threading
import time

from ..core_native import api as lib
from ..layout import offset_of, offsets_of
from ..virtio.device import (F_RING_EVENT_IDX, F_VERSION_1, NO_VECTOR, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
                     STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, bit)
from ..virtio.pci import (CAP_ID_VENDOR, CFG_COMMON, CFG_DEVICE, CFG_ISR, CFG_NOTIFY,
                  LEGACY_HEADER_SIZE, LEGACY_MSIX_SIZE, VirtioPciCommonCfg, VirtioPciFunction,
                  VirtioPciLegacyHeader, VirtioPciNotifyCap)
from ..virtio.virtqueue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                        avail_ring_size)

C = offsets_of(VirtioPciCommonCfg)
L = offsets_of(VirtioPciLegacyHeader)
CAP_NOTIFY_MULT = offset_of(VirtioPciNotifyCap, "notify_off_multiplier")
PCI_COMMAND, PCI_STATUS, PCI_CAP_PTR = 0x04, 0x06, 0x34
BAR_OFFSETS = [0x10 + 4 * i for i in range(6)]
_DESC = struct.Struct("<QIHH")


def store_u16(mem, gpa: int, value: int) -> None:
    """Store a ring index (avail.idx, used_event) the device reads while it runs, as one
    16-bit store. struct.pack_into clears the field before storing it (a device reading in
    between sees 0, which near the 16-bit wrap it takes for a full queue), and mem.write of
    two bytes is a memcpy whose stores are the C library's choice (tests/test_virtqueue.py)."""
    with mem.view(gpa, 2) as v, v.cast("H") as h:
        h[0] = value


class DriverQueue:
    """The driver's side of one split virtqueue laid out in guest RAM."""

    def __init__(self, mem, index: int, size: int, base: int, event_idx: bool = False):
        self.mem, self.index, self.size = mem, index, size
        self.event_idx = event_idx
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + avail_ring_size(size) + 4095) & ~4095
        self.end = self.used + 4096 + 8 * size
        mem.fill(base, self.end - base, 0)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self._chains: dict[int, list[int]] = {}   # head -> descriptors it holds

    def add(self, buffers, indirect_at: int | None = None) -> int:
        """Put one chain on the available ring (not yet published); returns its head."""
        if indirect_at is not None:
            table = b"".join(_DESC.pack(a, n, (VIRTQ_DESC_F_WRITE if w else 0)
                                        | (VIRTQ_DESC_F_NEXT if i + 1 < len(buffers) else 0),
                                        i + 1 if i + 1 < len(buffers) else 0)
                             for i, (a, n, w) in enumerate(buffers))
            self.mem.write(indirect_at, table)
            buffers = [(indirect_at, len(table), None)]
        heads = [self.free.pop() for _ in buffers]
        for i, (addr, length, writable) in enumerate(buffers):
            flags = VIRTQ_DESC_F_INDIRECT if writable is None else \
                (VIRTQ_DESC_F_WRITE if writable else 0)
            nxt = 0
            if i + 1 < len(buffers):
                flags |= VIRTQ_DESC_F_NEXT
                nxt = heads[i + 1]
            self.mem.write(self.desc + 16 * heads[i], _DESC.pack(addr, length, flags, nxt))
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size),
                       struct.pack("<H", heads[0]))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._chains[heads[0]] = heads
        return heads[0]

    def publish(self) -> None:
        store_u16(self.mem, self.avail + 2, self.avail_idx)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def reap(self) -> list[tuple[int, int]]:
        """(head, written) of every chain the device returned since the last reap."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, written = struct.unpack("<II", self.mem.read(slot, 8))
            out.append((head, written))
            self.free.extend(self._chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:   # used_event: interrupt me at the next completion
            store_u16(self.mem, self.avail + 4 + 2 * self.size, self.last_used)
        return out


class RawQueue:
    """Raw descriptors and avail entries in a queue a driver laid out, without the driver's
    checks: for tests that hand a device malformed chains."""

    def __init__(self, mem, q: DriverQueue):
        self.mem, self.q = mem, q
        self.next_desc = 0

    def desc(self, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None,
             index: int | None = None) -> int:
        """One descriptor: the next free one of the queue's table, or `index` of `table`."""
        i = self.next_desc if index is None else index
        if index is None:
            self.next_desc += 1
        base = self.q.desc if table is None else table
        self.mem.write(base + 16 * i, _DESC.pack(addr, length, flags, nxt))
        return i

    def publish(self, heads, *, head_oob: bool = False, avail_ahead: bool = False) -> int:
        """Put `heads` on the available ring and publish them; with `head_oob` also a head
        past the table, with `avail_ahead` an index more than a queue ahead. Returns the
        index published."""
        q = self.q
        for h in heads:
            self.mem.write(q.avail + 4 + 2 * (q.avail_idx % q.size), struct.pack("<H", h))
            q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        if head_oob:
            self.mem.write(q.avail + 4 + 2 * (q.avail_idx % q.size), struct.pack("<H", 0xFFF0))
            q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        idx = q.avail_idx
        if avail_ahead:
            idx = (q.last_used + q.size + 3) & 0xFFFF
        self.mem.write(q.avail + 2, struct.pack("<H", idx))
        return idx

    def post(self, chains, build) -> int:
        """Publish a chain built by ``build(*chain)`` (which returns its head) for every
        tuple in `chains` whose first item, its fault, is not one of the ring's own
        (``"head_oob"``, ``"avail_ahead"``: those go to publish). Returns how many entries
        the device should answer."""
        faults = {c[0] for c in chains}
        heads = [build(*c) for c in chains if c[0] not in ("head_oob", "avail_ahead")]
        self.publish(heads, head_oob="head_oob" in faults, avail_ahead="avail_ahead" in faults)
        return len(heads) + ("head_oob" in faults)


class BareTransport:
    """What VirtioPciFunction.service_queue (a queue worker's loop body, native cycle
    included) needs of its transport, without PCI: a test or fuzz target serves a queue on
    its own thread and counts the interrupts and reset requests."""

    msix = None                       # no irqfd gate: every interrupt comes back to Python

    def __init__(self, device, name: str = "virtio-test"):
        self.device = device
        self.live = True
        self.status = 0
        self.name = name
        self.resets: list[str] = []
        self.interrupts = 0

    def interrupt_queue(self, q):
        self.interrupts += 1

    def needs_reset(self, why):
        self.resets.append(why)

    service_queue = VirtioPciFunction.service_queue
    _serve_natively = VirtioPciFunction._serve_natively
    _serve_chain = VirtioPciFunction._serve_chain
    _irq_gate = VirtioPciFunction._irq_gate


class VirtioPciDriver:
    def __init__(self, machine, slot: int, *, legacy: bool = False, msix: bool = True,
                 ring_base: int = 0x100000):
        self.m, self.slot, self.legacy, self.use_msix = machine, slot, legacy, msix
        self.mem = machine.memory
        self.ring_base = ring_base
        self.fn = machine.pci.lookup(0, slot, 0)
        self.queues: list[DriverQueue] = []
        self.interrupts = threading.Condition()
        self.irq_count = 0
        self._hook_interrupts()
        cmd = self.cfg_read(PCI_COMMAND, 2)
        self.cfg_write(PCI_COMMAND, 2, cmd | 0x7)     # I/O, memory, bus master
        self._find_regions()

    # -- PCI configuration through the dispatch core ---------------------------------------
    def _cf8(self, reg: int) -> None:
        self.m.io_write(0xCF8, 4, 0x80000000 | self.slot << 11 | (reg & 0xFC))

    def cfg_read(self, reg: int, size: int = 4) -> int:
        self._cf8(reg)
        return self.m.io_read(0xCFC + (reg & 3), size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self._cf8(reg)
        self.m.io_write(0xCFC + (reg & 3), size, value)

    def bar(self, index: int) -> int:
        low = self.cfg_read(BAR_OFFSETS[index])
        if low & 1:
            return low & ~3
        addr = low & ~0xF
        if low & 0x4:
            addr |= self.cfg_read(BAR_OFFSETS[index + 1]) << 32
        return addr

    def _find_regions(self) -> None:
        self.regions = {}
        self.notify_mult = 0
        ptr = self.cfg_read(PCI_CAP_PTR, 1)
        self.msix_cap = None
        while ptr:
            cap_id = self.cfg_read(ptr, 1)
            if cap_id == CAP_ID_VENDOR:
                cfg_type = self.cfg_read(ptr + 3, 1)
                bar = self.cfg_read(ptr + 4, 1)
                off = self.cfg_read(ptr + 8)
                if cfg_type not in self.regions and cfg_type in (CFG_COMMON, CFG_NOTIFY,
                                                                 CFG_ISR, CFG_DEVICE):
                    self.regions[cfg_type] = self.bar(bar) + off
                if cfg_type == CFG_NOTIFY:
                    self.notify_mult = self.cfg_read(ptr + CAP_NOTIFY_MULT)
            elif cap_id == 0x11:
                self.msix_cap = ptr
            ptr = self.cfg_read(ptr + 1, 1)
        self.io = self.bar(0)

    # -- register access ------------------------------------------------------------------
    def common_read(self, name: str, size: int) -> int:
        return self.m.mmio_read(self.regions[CFG_COMMON] + C[name], size)

    def common_write(self, name: str, size: int, value: int) -> None:
        self.m.mmio_write(self.regions[CFG_COMMON] + C[name], size, value)

    def legacy_read(self, name: str, size: int) -> int:
        return self.m.io_read(self.io + L[name], size)

    def legacy_write(self, name: str, size: int, value: int) -> None:
        self.m.io_write(self.io + L[name], size, value)

    def status(self) -> int:
        return self.legacy_read("device_status", 1) if self.legacy else \
            self.common_read("device_status", 1)

    def set_status(self, value: int) -> None:
        if self.legacy:
            self.legacy_write("device_status", 1, value)
        else:
            self.common_write("device_status", 1, value)

    def config_read(self, offset: int, size: int) -> int:
        if self.legacy:
            start = LEGACY_HEADER_SIZE + (LEGACY_MSIX_SIZE if self.use_msix else 0)
            return self.m.io_read(self.io + start + offset, size)
        return self.m.mmio_read(self.regions[CFG_DEVICE] + offset, size)

    def read_isr(self) -> int:
        if self.legacy:
            return self.m.io_read(self.io + L["isr_status"], 1)
        return self.m.mmio_read(self.regions[CFG_ISR], 1)

    # -- interrupts -----------------------------------------------------------------------
    def _hook_interrupts(self) -> None:
        # Observe the device's queue interrupts, whichever way they are delivered.
        fn, original = self.fn, self.fn.interrupt_queue

        def observed(q):
            original(q)
            with self.interrupts:
                self.irq_count += 1
                self.interrupts.notify_all()
        fn.interrupt_queue = observed

    def _enable_msix(self, vectors: int) -> None:
        table = self.bar(1)
        for v in range(vectors):
            base = table + 16 * v
            self.m.mmio_write(base, 4, 0xFEE00000)
            self.m.mmio_write(base + 4, 4, 0)
            self.m.mmio_write(base + 8, 4, 0x40 + v)
            self.m.mmio_write(base + 12, 4, 0)      # unmask
        ctl = self.cfg_read(self.msix_cap + 2, 2)
        self.cfg_write(self.msix_cap + 2, 2, ctl | 0x8000)

    # -- bring-up -------------------------------------------------------------------------
    def device_features(self) -> int:
        if self.legacy:
            return self.legacy_read("host_features", 4)
        feats = 0
        for sel in (0, 1):
            self.common_write("device_feature_select", 4, sel)
            feats |= self.common_read("device_feature", 4) << (32 * sel)
        return feats

    def initialize(self, features: int, queue_size: int | None = None) -> int:
        """Reset and bring the device up; returns the negotiated features."""
        self.set_status(0)
        self.set_status(STATUS_ACKNOWLEDGE)
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = self.device_features()
        nq = self.fn.device.num_queues
        if self.use_msix:
            self._enable_msix(nq + 1)
        if self.legacy:
            features &= offered & 0xFFFFFFFF
            self.legacy_write("guest_features", 4, features)
        else:
            features = (features | bit(F_VERSION_1)) & offered
            for sel in (0, 1):
                self.common_write("driver_feature_select", 4, sel)
                self.common_write("driver_feature", 4, (features >> (32 * sel)) & 0xFFFFFFFF)
            self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
            if not self.status() & STATUS_FEATURES_OK:
                raise RuntimeError("device refused the features")
        base = self.ring_base
        self.queues = []
        event_idx = bool(features & bit(F_RING_EVENT_IDX))
        for i in range(nq):
            if self.legacy:
                self.legacy_write("queue_select", 2, i)
                size = self.legacy_read("queue_size", 2)
                base = (base + 4095) & ~4095
                q = DriverQueue(self.mem, i, size, base, event_idx)
                if self.use_msix:
                    self.m.io_write(self.io + LEGACY_HEADER_SIZE + 2, 2, i + 1)
                self.legacy_write("queue_pfn", 4, base >> 12)
            else:
                self.common_write("queue_select", 2, i)
                size = min(self.common_read("queue_size", 2), queue_size or 1 << 16)
                self.common_write("queue_size", 2, size)
                q = DriverQueue(self.mem, i, size, base, event_idx)
                for name, addr in (("queue_desc", q.desc), ("queue_driver", q.avail),
                                   ("queue_device", q.used)):
                    self.common_write(name, 4, addr & 0xFFFFFFFF)
                    self.m.mmio_write(self.regions[CFG_COMMON] + C[name] + 4, 4, addr >> 32)
                self.common_write("queue_msix_vector", 2, i + 1 if self.use_msix else NO_VECTOR)
                self.common_write("queue_enable", 2, 1)
            base = q.end
            self.queues.append(q)
        if self.use_msix and not self.legacy:
            self.common_write("config_msix_vector", 2, 0)
        self.set_status(self.status() | STATUS_DRIVER_OK)
        self.data_base = (base + 0xFFFFF) & ~0xFFFFF
        return features

    # -- requests -------------------------------------------------------------------------
    def submit(self, q: int, buffers, *, publish: bool = True, indirect_at=None) -> int:
        head = self.queues[q].add(buffers, indirect_at)
        if publish:
            self.queues[q].publish()
        return head

    def kick(self, q: int) -> None:
        if self.legacy:
            self.legacy_write("queue_notify", 2, q)
        else:
            self.m.mmio_write(self.notify_address(q), 2, q)

    def notify_address(self, q: int) -> int:
        """The address of queue q's kick, a 2-byte write of q: MMIO (modern transport) or,
        for a legacy driver, the I/O port."""
        if self.legacy:
            return self.io + L["queue_notify"]
        return self.regions[CFG_NOTIFY] + self.notify_mult * q

    def doorbell_fd(self, q: int) -> int:
        """The eventfd KVM would signal for queue q's kick (-1 if none is bound), on a
        SyntheticMachine."""
        return self.m.ioeventfd_for("pio" if self.legacy else "mmio", self.notify_address(q),
                                    2, q)

    def wait_used(self, q: int, count: int, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Wait until `count` more chains came back on queue q; returns (head, written)."""
        dq = self.queues[q]
        done: list[tuple[int, int]] = []
        irq = self._eventfd_interrupt(q)
        with self.interrupts:
            while True:
                done += dq.reap()
                if len(done) >= count:
                    return done
                if irq is not None:
                    # The irqfd's eventfd is the interrupt; native workers write it directly.
                    self.interrupts.release()
                    try:
                        got = lib.hv_eventfd_wait(irq.fd, 0, int(timeout * 1000)) > 0
                    finally:
                        self.interrupts.acquire()
                else:
                    got = self.interrupts.wait(timeout)
                if not got:
                    done += dq.reap()
                    if len(done) >= count:
                        return done
                    raise TimeoutError(f"queue {q}: {len(done)} of {count} requests completed")

    def wait_answered(self, q: int, used_idx: int, *, grace: float,
                      timeout: float = 5.0) -> None:
        """Poll until queue q's used index is `used_idx` or the device asks for a reset
        (a device that gives up on malformed chains need not interrupt), then give a
        worker that is mid-batch `grace` seconds to finish."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status() & STATUS_NEEDS_RESET or self.queues[q].used_idx() == used_idx:
                time.sleep(grace)
                return
            time.sleep(0.002)
        raise TimeoutError(f"queue {q}: the device neither completed the chains nor asked "
                           "for a reset")

    def _eventfd_interrupt(self, q: int):
        """The MSI-X irqfd of queue q when the machine leaves irqfd eventfds to their reader
        (SyntheticMachine(irqfd_eventfds=True)), else None."""
        if not self.m.irqfd_eventfds or self.fn.msix is None:
            return None
        vector = self.fn.queues[q].msix_vector
        return self.fn.msix.irqfd(vector) if vector != NO_VECTOR else None
