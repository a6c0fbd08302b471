"""Failure policies: what the client does for a device whose server is gone (AHCI's in
ahci_failure.py).

virtio-blk (modern interface): the policy follows the driver's set-up in the forwarded
writes to the common configuration (queue addresses, sizes, vectors, status). When the
server is lost, every request the driver has made available and not yet got back (taken to
be those between the used index and the available index: the server completes in order
within a queue, as hvframe's does) is completed here with VIRTIO_BLK_S_IOERR in its status
byte, and so is every request posted while the server is away (the doorbells KVM still
signals are watched, trapped notify writes too); device_status reads answer
DEVICE_NEEDS_RESET. Forwarding starts again only when the driver resets the device (status
0) after the server is back, so no request reaches a device that was never set up for it.

Acknowledged writes are the server's business: virtio-blk completes a write only once the
backend has it, so nothing acknowledged is lost with the process.
"""
from __future__ import annotations

import logging
import os
import select
import threading

from hvframe import concurrency
from hvframe.memory import GuestMemoryError
from hvframe.virtio.device import NO_VECTOR, STATUS_NEEDS_RESET
from hvframe.virtio.pci import (CAP_ID_VENDOR, CFG_COMMON, CFG_ISR, CFG_NOTIFY,
                                VirtioPciCommonCfg)
from hvframe.virtio.virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from hvframe.layout import offsets_of

from .passthru import FailurePolicy

log = logging.getLogger(__name__)

VIRTIO_VENDOR = 0x1AF4
VIRTIO_BLK_IDS = (0x1001, 0x1042)
VIRTIO_BLK_S_IOERR = 1
AHCI_CLASS = 0x010601            # mass storage, SATA, AHCI 1.0
COMMON = offsets_of(VirtioPciCommonCfg)
ISR_QUEUE = 1


def _u(data: bytes, off: int, n: int) -> int:
    return int.from_bytes(data[off:off + n], "little")


def policy_for(config: bytes) -> FailurePolicy:
    """The policy for a device, by its identity (vendor and device ID)."""
    if _u(config, 0, 2) == VIRTIO_VENDOR and _u(config, 2, 2) in VIRTIO_BLK_IDS:
        return VirtioBlkFailure(config)
    if _u(config, 9, 3) == AHCI_CLASS:
        try:
            from .ahci_failure import AhciFailure     # its registers: the AHCI plugin's
        except ImportError:
            return FailurePolicy()
        return AhciFailure()
    return FailurePolicy()


class _Queue:
    def __init__(self):
        self.size = 0
        self.desc = self.driver = self.device = 0
        self.enabled = False
        self.vector = NO_VECTOR
        self.next_avail: int | None = None     # the policy's own progress while lost


class VirtioBlkFailure(FailurePolicy):
    def __init__(self, config: bytes):
        self.regions = {}                       # cfg_type -> (bar, offset, length)
        ptr, seen = config[0x34] & 0xFC, set()
        while ptr >= 0x40 and ptr not in seen:
            seen.add(ptr)
            if config[ptr] == CAP_ID_VENDOR:
                self.regions.setdefault(config[ptr + 3], (config[ptr + 4], _u(config, ptr + 8, 4),
                                                          _u(config, ptr + 12, 4)))
            ptr = config[ptr + 1] & 0xFC
        self.queues: dict[int, _Queue] = {}
        self.select = 0
        self.status = 0
        self.lost_now = False
        self.isr = 0
        self._lock = threading.Lock()
        self._watcher: concurrency.DeviceThread | None = None
        self._wake_fd = -1

    # -- following the driver -------------------------------------------------------------------
    def _in(self, cfg_type: int, region: int, offset: int):
        r = self.regions.get(cfg_type)
        if r is None or r[0] != region or not r[1] <= offset < r[1] + r[2]:
            return None
        return offset - r[1]

    def observe_write(self, region, offset, size, value) -> None:
        rel = self._in(CFG_COMMON, region, offset)
        if rel is None:
            if self.lost_now and self._in(CFG_NOTIFY, region, offset) is not None:
                self.fail_pending()
            return
        with self._lock:
            q = self.queues.setdefault(self.select, _Queue())
            if rel == COMMON["queue_select"]:
                self.select = value
            elif rel == COMMON["device_status"]:
                self.status = value & 0xFF
                if self.status == 0:
                    self.queues.clear()
            elif rel == COMMON["queue_size"]:
                q.size = value
            elif rel == COMMON["queue_msix_vector"]:
                q.vector = value
            elif rel == COMMON["queue_enable"]:
                q.enabled = bool(value & 1)
            else:
                for name in ("queue_desc", "queue_driver", "queue_device"):
                    base = COMMON[name]
                    if base <= rel < base + 8:
                        shift = 8 * (rel - base)
                        mask = ((1 << 8 * size) - 1) << shift
                        old = getattr(q, name[6:])
                        setattr(q, name[6:], (old & ~mask) | (value << shift & mask))
        if self.lost_now and rel == COMMON["device_status"] and value == 0:
            self.fn.resume()          # the driver reset the device: hand it back if it is there

    def read_while_lost(self, region, offset, size):
        rel = self._in(CFG_COMMON, region, offset)
        if rel == COMMON["device_status"]:
            return self.status | STATUS_NEEDS_RESET
        if self._in(CFG_ISR, region, offset) == 0:
            isr, self.isr = self.isr, 0
            self.fn.set_intx(0)
            return isr
        return None

    # -- the server is gone -----------------------------------------------------------------------
    def may_resume(self) -> bool:
        return self.status == 0

    def lost(self) -> None:
        self.lost_now = True
        with self._lock:
            for q in self.queues.values():
                q.next_avail = None
        self.fail_pending()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watcher = concurrency.DeviceThread(
            f"{self.fn.name} failed-request completer", self._watch,
            wake=lambda: os.eventfd_write(self._wake_fd, 1)).start()

    def recovered(self) -> None:
        self.lost_now = False
        self._stop_watcher()

    def close(self) -> None:
        self._stop_watcher()

    def _stop_watcher(self) -> None:
        if self._watcher is not None:
            if self._watcher.stop():
                os.close(self._wake_fd)
            self._watcher = None

    def _watch(self, thread) -> None:
        poller = select.poll()
        for fd in (*self.fn.doorbell_fds(), self._wake_fd):
            poller.register(fd, select.POLLIN)
        while not thread.stopping:
            for fd, ev in poller.poll(1000):
                if ev & select.POLLNVAL:
                    poller.unregister(fd)
                    continue
                try:
                    os.eventfd_read(fd)
                except OSError:
                    pass
            if not thread.stopping:
                self.fail_pending()

    def fail_pending(self) -> None:
        """Complete every outstanding request with IOERR and interrupt the driver."""
        fn = self.fn
        if fn.pci_bus is None:
            return
        mem = fn.pci_bus.machine.memory
        with self._lock:
            done = []
            for index, q in self.queues.items():
                if not q.enabled or not q.size or q.size & (q.size - 1):
                    continue
                try:
                    if self._fail_queue(mem, q):
                        done.append(q)
                except GuestMemoryError as e:
                    log.warning("%s: queue %d cannot be completed: %s", fn.name, index, e)
        for q in done:
            if fn.msix is not None and fn.msix.enabled:
                if q.vector != NO_VECTOR:
                    fn.msix.notify(q.vector)
            else:
                self.isr |= ISR_QUEUE
                fn.set_intx(1)

    def _fail_queue(self, mem, q: _Queue) -> bool:
        avail_idx = int.from_bytes(mem.read(q.driver + 2, 2), "little")
        used_idx = int.from_bytes(mem.read(q.device + 2, 2), "little")
        if q.next_avail is None:
            q.next_avail = used_idx
        n = 0
        while q.next_avail != avail_idx and n < q.size:
            slot = q.next_avail % q.size
            head = int.from_bytes(mem.read(q.driver + 4 + 2 * slot, 2), "little")
            status_at = self._status_byte(mem, q, head)
            if status_at is not None:
                mem.write(status_at, bytes([VIRTIO_BLK_S_IOERR]))
            entry = q.device + 4 + 8 * (used_idx % q.size)
            mem.write(entry, head.to_bytes(4, "little") + (1).to_bytes(4, "little"))
            used_idx = (used_idx + 1) & 0xFFFF
            mem.write(q.device + 2, used_idx.to_bytes(2, "little"))
            q.next_avail = (q.next_avail + 1) & 0xFFFF
            n += 1
        return n > 0

    def _status_byte(self, mem, q: _Queue, head: int):
        """The guest address of the last device-writable byte of the chain at head."""
        table, size, i, last = q.desc, q.size, head, None
        for _ in range(size + 1):
            if i >= size:
                return last
            addr, length, flags, nxt = self._desc(mem, table, i)
            if flags & VIRTQ_DESC_F_INDIRECT and table == q.desc:
                table, size, i = addr, length // 16, 0
                continue
            if flags & VIRTQ_DESC_F_WRITE and length:
                last = addr + length - 1
            if not flags & VIRTQ_DESC_F_NEXT:
                return last
            i = nxt
        return last

    @staticmethod
    def _desc(mem, table: int, i: int):
        d = mem.read(table + 16 * i, 16)
        return _u(d, 0, 8), _u(d, 8, 4), _u(d, 12, 2), _u(d, 14, 2)
