"""What the virtio-over-PCI targets (``virtio_blk``, ``virtio_net``) share: synchronous queue
workers and the pump that stands in for their threads, the harness's driver with its
capability walk done once, the rig parts the shared operations use, and the guest operations
both decode the same way (bring-up, raw descriptors and avail entries, kicks, BAR0/BAR4 and
configuration accesses, device status, raw RAM) with their encoders for seeds.

Each decoder reads the Provider in a fixed order; the committed corpora depend on it, so a
change here is a change of both targets' input formats (re-run ``make_corpus.py``).
"""
from __future__ import annotations

import select
import struct
from collections.abc import Callable
from dataclasses import dataclass

from hvframe.memory import GuestMemoryError
from hvframe.testing.virtio import VirtioPciDriver
from hvframe.virtio.device import STATUS_NEEDS_RESET, bit
from hvframe.virtio.pci import CFG_NOTIFY

from . import machines
from .observe import Finding
from .provider import Encoder, Provider

RINGS = 0x100000                  # the driver's rings (default placement)
TABLES = 0x170000                 # indirect tables, 0x400 a slot
SIZES = (1, 2, 4, 8)
CFG_SIZES = (1, 2, 4)


# -- synchronous workers -------------------------------------------------------------------

class SyncWorker:
    """Stands in for a queue's worker thread: a wake() is remembered for the pump."""

    def __init__(self):
        self.woken = False

    def wake(self):
        self.woken = True

    def stop(self):
        pass


def synchronous_workers(fn) -> None:
    """Give the transport SyncWorkers instead of threads (doorbells as usual)."""
    def start():
        if fn._workers:
            return
        fn._ensure_doorbells()
        fn._workers.extend(SyncWorker() for _ in fn.queues)
    fn._start_workers = start


def waits_ready(fn, queue: int) -> bool:
    """Whether anything the queue's worker would also wait on (VirtioDevice.queue_waits:
    backend input, room to write) is ready now."""
    waits = fn.device.queue_waits(queue)
    if not waits:
        return False
    p = select.poll()
    for fd, ev in waits:
        p.register(fd, ev)
    return bool(p.poll(0))


def pump(fn, rounds: int, ready: Callable[[object, int], bool] | None = None) -> None:
    """Serve the queues the guest kicked (doorbell eventfds), the transport woke or, with
    `ready`, whose own waits are ready -- the worker's loop body, native cycle included --
    on this thread, up to `rounds` times while any is left to serve."""
    for _ in range(rounds):
        todo = []
        for i, q in enumerate(fn.queues):
            rang = 0
            if i < len(fn._doorbells):
                rang = sum(ev.take() for ev in fn._doorbells[i])
            w = fn._workers[i] if i < len(fn._workers) else None
            if w is not None and w.woken:
                w.woken = False
                rang += 1
            if rang or (ready is not None and ready(fn, i)):
                todo.append(q)
        if not todo:
            return
        for q in todo:
            fn.service_queue(q)


# -- the driver and the rig ----------------------------------------------------------------

class Driver(VirtioPciDriver):
    """The harness's driver; its capability walk (35 configuration reads, each costly in
    the transport) gives the same answer for every fresh rig of a target, so it runs once a
    process for each device model, slot and BAR layout."""

    _found: dict = {}

    def _find_regions(self) -> None:
        key = (type(self.fn.device), self.slot,
               tuple(self.fn.config.get(0x10 + 4 * i, 4) for i in range(6)))
        if key not in Driver._found:
            super()._find_regions()
            Driver._found[key] = (dict(self.regions), self.notify_mult, self.msix_cap, self.io)
        regions, self.notify_mult, self.msix_cap, self.io = Driver._found[key]
        self.regions = dict(regions)


class VirtioRig:
    """A machine with one virtio function on synchronous workers and the driver for it; a
    target's rig builds the machine and function, then calls ``drive``."""

    m: object
    mem: object
    fn: object
    slot: int
    pump_rounds: int
    ready = None                  # pump's readiness hook (staticmethod), if the device has one

    def drive(self) -> None:
        """Remember the BARs as assigned and find the regions (for ``recover``)."""
        fn = self.fn
        self.bars = [fn.config.get(0x10 + 4 * i, 4) for i in range(6)]
        self.drv = Driver(self.m, self.slot, msix=False, ring_base=RINGS)
        self.found = (dict(self.drv.regions), self.drv.io, self.drv.notify_mult)
        self.nq = len(fn.queues)

    def close(self):
        machines.teardown(self.m)

    def pump(self) -> None:
        pump(self.fn, self.pump_rounds, self.ready)

    def bar_addr(self, index: int) -> int:
        """Where BAR `index` is programmed now (the harness's bookkeeping; the guest would
        remember what it wrote)."""
        return self.fn.bar_address(index)

    def recover(self, features: int) -> None:
        """Put the BARs and command register back, reset the device and bring it up again
        with `features` (queues of 16 on the default rings): it must come up clean."""
        m, fn, drv = self.m, self.fn, self.drv
        for i, v in enumerate(self.bars):
            if fn.config.get(0x10 + 4 * i, 4) != v:
                machines.cfg_write(m, self.slot, 0x10 + 4 * i, 4, v)
        if fn.command & 7 != 7:
            machines.cfg_write(m, self.slot, 0x04, 2, fn.command | 7)
        drv.regions, drv.io, drv.notify_mult = dict(self.found[0]), self.found[1], self.found[2]
        drv.legacy = drv.use_msix = False
        drv.ring_base = RINGS
        drv.set_status(0)
        self.pump()
        try:
            drv.initialize(features, queue_size=16)
        except RuntimeError as e:
            raise Finding(f"after a reset the device refuses a plain bring-up: {e}") from None
        if drv.status() & STATUS_NEEDS_RESET:
            raise Finding("NEEDS_RESET right after a reset and bring-up")


# -- guest operations ----------------------------------------------------------------------

@dataclass
class BringUp:
    """A driver bring-up as the input asks for it: bits 0/1 legacy/MSI-X, bits 4-5 the ring
    placement, bit 6 raw features, bit 7 a feature choice (bits 2-3 are the target's)."""
    bits: int
    features: int
    ring_base: int
    queue_size: int

    @classmethod
    def decode(cls, p: Provider, mem, feature_bits, ring_places, size_exps: int) -> BringUp:
        bits = p.u8()
        chosen = p.u16() if bits & 0x80 else 0xFFFF
        features = sum(bit(b) for i, b in enumerate(feature_bits) if chosen >> i & 1)
        if bits & 0x40:
            features = p.u64()
        where = (bits >> 4) & 3
        ring_base = machines.addr(p, mem) & ~0xFFF if where == 3 else ring_places[where]
        return cls(bits, features, ring_base, 1 << (p.u8() % size_exps))

    def run(self, drv: Driver) -> None:
        drv.legacy = bool(self.bits & 1)
        drv.use_msix = bool(self.bits & 2)
        drv.ring_base = self.ring_base
        try:
            drv.initialize(self.features, queue_size=self.queue_size)
        except (RuntimeError, GuestMemoryError, KeyError, IndexError):
            pass                      # the driver gave up (refused features, rings off RAM)


def access(read, write, address: int, p: Provider) -> None:
    """One register access of any size, a read or a write of any value."""
    size = p.PickValueInList(SIZES)
    if p.ConsumeBool():
        write(address, size, p.u64() & ((1 << 8 * size) - 1))
    else:
        read(address, size)


def queue(rig: VirtioRig, p: Provider):
    """One of the queues the driver set up, or None before a bring-up."""
    qs = rig.drv.queues
    if not qs:
        return None
    return qs[p.u8() % len(qs)]


def op_desc(rig: VirtioRig, p: Provider) -> None:
    """A raw descriptor in a queue's table or in one of the indirect tables."""
    q = queue(rig, p)
    if q is not None:
        mem = rig.mem
        table = q.desc if p.u8() & 3 else TABLES + 0x400 * (p.u8() % 8)
        i = p.u16() % max(q.size, 1)
        machines.ram_write(mem, table + 16 * i,
                           struct.pack("<QIHH", machines.addr(p, mem),
                                       machines.length(p) & 0xFFFFFFFF, p.u16(), p.u16()))


def op_avail(rig: VirtioRig, p: Provider) -> None:
    """A raw avail entry published, or the avail index set to anything."""
    q = queue(rig, p)
    if q is not None:
        mem = rig.mem
        if p.ConsumeBool():
            machines.ram_write(mem, q.avail + 4 + 2 * (q.avail_idx % q.size),
                               struct.pack("<H", p.u16()))
            q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        else:
            q.avail_idx = p.u16()
        machines.ram_write(mem, q.avail + 2, struct.pack("<H", q.avail_idx))


def op_kick(rig: VirtioRig, p: Provider) -> None:
    """A notification of a queue (or of anything) through the legacy or modern doorbell."""
    m, drv = rig.m, rig.drv
    value = p.u16() % (rig.nq + 1) if p.u8() & 3 else p.u16()
    if p.ConsumeBool():
        m.io_write(rig.bar_addr(0) + 16, 2, value)
    else:
        notify = drv.regions.get(CFG_NOTIFY, 0)
        m.mmio_write(notify + drv.notify_mult * (value & 0xFF), p.PickValueInList(SIZES),
                     value)


def op_bar4(rig: VirtioRig, p: Provider) -> None:
    access(rig.m.mmio_read, rig.m.mmio_write, rig.bar_addr(4) + (p.u16() % 0x4000), p)


def op_bar0(rig: VirtioRig, p: Provider) -> None:
    access(rig.m.io_read, rig.m.io_write, rig.bar_addr(0) + p.u8() % 64, p)


def op_cfg(rig: VirtioRig, p: Provider) -> None:
    machines.cfg_access(p, rig.m, rig.slot)


def op_status(rig: VirtioRig, p: Provider) -> None:
    rig.drv.set_status(p.u8() if p.u8() & 3 else 0)


def op_ram(rig: VirtioRig, p: Provider) -> None:
    machines.raw_ram(p, rig.mem)


# -- their encoders, for seeds -------------------------------------------------------------

def enc_init(e: Encoder, op: int, bits: int, size_exp: int) -> Encoder:
    """A bring-up with the device's features (bits 6 and 7 clear) on a ring placement 0-2
    (bits 4-5; 3 would take an address)."""
    assert not bits & 0xC0 and (bits >> 4) & 3 != 3, f"{bits:#x} needs more than this encodes"
    return e.u8(op).u8(bits).u8(size_exp)


def enc_access(e: Encoder, op: int, off: int, size: int, value: int | None = None,
               wide: bool = False) -> Encoder:
    """A BAR0 access (or with `wide`, the 16-bit offset of a BAR4 access)."""
    e.u8(op)
    e.u16(off) if wide else e.u8(off)
    e.pick(SIZES, size).bool(value is not None)
    if value is not None:
        e.u64(value)
    return e


def enc_cfg(e: Encoder, op: int, reg: int, size: int, value: int | None = None) -> Encoder:
    e.u8(op).u8(reg).pick(CFG_SIZES, size).bool(value is not None)
    if value is not None:
        e.u32(value)
    return e


def enc_desc(e: Encoder, op: int, q: int, i: int, a: int, n: int, flags: int, nxt: int,
             low: int, high: int) -> Encoder:
    """A descriptor in queue q's own table."""
    e.u8(op).u8(q).u8(1).u16(i)
    machines.enc_addr(e, a, low, high)
    machines.enc_length(e, n)
    return e.u16(flags).u16(nxt)


def enc_avail(e: Encoder, op: int, q: int, head: int | None = None,
              idx: int | None = None) -> Encoder:
    """An avail entry `head` published, or (with `idx`) the avail index set."""
    e.u8(op).u8(q).bool(head is not None)
    return e.u16(head if head is not None else idx)


def enc_kick(e: Encoder, op: int, q: int, legacy: bool, size: int = 2) -> Encoder:
    e.u8(op).u8(1).u16(q).bool(legacy)
    return e if legacy else e.pick(SIZES, size)
