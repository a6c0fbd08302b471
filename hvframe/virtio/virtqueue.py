"""The device side of a virtio split virtqueue (virtio 1.2, section 2.7).

Layouts
-------
The descriptor, ring header and used-element layouts are declared once below with
``construct`` (``VirtqDesc``, ``VirtqAvailHeader``, ``VirtqUsedHeader``, ``VirtqUsedElem``,
and ``virtq_avail(size)`` / ``virtq_used(size)`` for whole rings).  The hot path does not
parse through construct: ``struct.Struct`` objects and field offsets are *derived* from those
declarations at import time (``hvframe.layout``), and tests check that both agree.

API
---
``VirtQueue(memory, size, desc_addr, avail_addr, used_addr, *, event_idx=False,
indirect=True, max_chain=None)`` validates the (guest-given) geometry and caches views of the
three areas.  Then:

* ``pop() -> Chain | None`` - the next available descriptor chain, or None when the ring is
  empty.  Raises ``VirtqueueError`` for a malformed queue or chain; the queue's state is left
  unchanged, so the same error is raised again on the next pop().
* ``push(head, written)`` - return a chain to the driver through the used ring: the used
  element is written first, then ``used.idx`` is published.
* ``needs_notification() -> bool`` - after one or more push()es: whether the driver wants an
  interrupt (``VRING_AVAIL_F_NO_INTERRUPT``, or ``used_event`` with EVENT_IDX).
* ``disable_notifications()`` / ``enable_notifications() -> bool`` - device-side kick
  suppression (``VRING_USED_F_NO_NOTIFY``, or ``avail_event`` with EVENT_IDX).
  enable_notifications() returns True when buffers arrived meanwhile, in which case the
  caller must keep processing (it would otherwise miss them: no kick is coming).
* ``has_available()`` / ``num_available()`` - non-consuming peeks at the available ring.

A ``Chain`` carries ``head`` (the id to push back), ``readable`` / ``writable`` (lists of
memoryviews straight into guest RAM, in chain order), ``buffers`` ((gpa, len, writable)
triples), and ``read_len()``, ``write_len()``, ``gather(n=None) -> bytes`` and
``scatter(data) -> int``.

Errors: what the caller should do
---------------------------------
Every value the guest controls is validated; a violation raises ``VirtqueueError`` (never
GuestMemoryError, IndexError or struct.error).  A ``VirtqueueError`` from the constructor
or from pop() means the driver broke the virtqueue contract: the device should set
``DEVICE_NEEDS_RESET`` in the device status (and send a configuration-change notification)
and stop processing that queue until the driver resets the device.  It must not try to
"skip" the bad chain: the ring state is untrustworthy.  push() raises ``ValueError`` for a
device (VMM) bug such as an out-of-range head, not VirtqueueError.

Memory ordering
---------------
The guest runs concurrently on other CPUs.  x86 (TSO) keeps loads in order with loads and
stores in order with stores, and CPython executes each of our single-memoryview accesses in
program order, so "read avail.idx, then the ring entries it covers" and "write the used
element, then used.idx" need no explicit fence here (on a weakly ordered host they would
need rmb/wmb).  x86 does reorder a store with a later load, which matters twice: publishing
used.idx and then reading the driver's used_event/flags (needs_notification), and writing
avail_event/flags and then re-reading avail.idx (enable_notifications).  There we issue a
full barrier: acquiring and releasing a lock executes a LOCK-prefixed instruction, which is
a full fence on x86.

All ring indices are free-running 16-bit counters; positions in the rings are
``idx & (size - 1)`` (size is a power of two).
"""
from __future__ import annotations

import threading

from ..memory import GuestMemoryError
from ..packed import Declarations

# -- layouts (single source of truth) ------------------------------------------------------

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


def _declare():
    # The split virtqueue's layouts (virtio 1.2 2.7). A run reads them compiled
    # (hvframe.packed); the construct objects are there for tests and tools
    # (hvframe.virtio.virtqueue.VirtqDesc, say).
    from construct import Int16ul, Int32ul, Int64ul, Struct

    VirtqDesc = Struct(
        "addr" / Int64ul,
        "len" / Int32ul,
        "flags" / Int16ul,
        "next" / Int16ul,
    )
    VirtqAvailHeader = Struct(
        "flags" / Int16ul,
        "idx" / Int16ul,
    )
    VirtqAvailElem = Int16ul          # a descriptor-chain head
    VirtqUsedHeader = Struct(
        "flags" / Int16ul,
        "idx" / Int16ul,
    )
    VirtqUsedElem = Struct(
        "id" / Int32ul,
        "len" / Int32ul,
    )
    VirtqEvent = Int16ul              # used_event (end of avail ring), avail_event (end of used ring)
    # The two bare numbers as one-field structs, so that their compiled forms give the run
    # their format and size.
    VirtqAvailSlot = Struct("head" / VirtqAvailElem)
    VirtqEventSlot = Struct("idx" / VirtqEvent)
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)


def __getattr__(name: str):
    # struct_of and offset_of were importable from here (plugins did); they import construct.
    if name in ("struct_of", "offset_of"):
        from .. import layout
        return getattr(layout, name)
    return LAYOUTS.module_getattr(name)


def virtq_avail(size: int, event_idx: bool = True):
    """The whole available ring of a queue of ``size`` entries (a construct Struct)."""
    from construct import Array, Struct
    d = LAYOUTS.constructs()
    fields = [*d["VirtqAvailHeader"].subcons, "ring" / Array(size, d["VirtqAvailElem"])]
    if event_idx:
        fields.append("used_event" / d["VirtqEvent"])
    return Struct(*fields)


def virtq_used(size: int, event_idx: bool = True):
    """The whole used ring of a queue of ``size`` entries (a construct Struct)."""
    from construct import Array, Struct
    d = LAYOUTS.constructs()
    fields = [*d["VirtqUsedHeader"].subcons, "ring" / Array(size, d["VirtqUsedElem"])]
    if event_idx:
        fields.append("avail_event" / d["VirtqEvent"])
    return Struct(*fields)


# -- fast path derived from the layouts ----------------------------------------------------

_DESC = LAYOUTS.VirtqDesc.struct                   # addr, len, flags, next
_USED_ELEM = LAYOUTS.VirtqUsedElem.struct          # id, len
_U16 = LAYOUTS.VirtqAvailSlot.struct
DESC_SIZE = LAYOUTS.VirtqDesc.sizeof()
AVAIL_ELEM_SIZE = LAYOUTS.VirtqAvailSlot.sizeof()
USED_ELEM_SIZE = LAYOUTS.VirtqUsedElem.sizeof()
EVENT_SIZE = LAYOUTS.VirtqEventSlot.sizeof()
AVAIL_FLAGS_OFF = LAYOUTS.VirtqAvailHeader.fields["flags"][0]
AVAIL_IDX_OFF = LAYOUTS.VirtqAvailHeader.fields["idx"][0]
AVAIL_RING_OFF = LAYOUTS.VirtqAvailHeader.sizeof()
USED_FLAGS_OFF = LAYOUTS.VirtqUsedHeader.fields["flags"][0]
USED_IDX_OFF = LAYOUTS.VirtqUsedHeader.fields["idx"][0]
USED_RING_OFF = LAYOUTS.VirtqUsedHeader.sizeof()
assert _U16.size == AVAIL_ELEM_SIZE == EVENT_SIZE


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int, event_idx: bool = True) -> int:
    return AVAIL_RING_OFF + AVAIL_ELEM_SIZE * size + (EVENT_SIZE if event_idx else 0)


def used_ring_size(size: int, event_idx: bool = True) -> int:
    return USED_RING_OFF + USED_ELEM_SIZE * size + (EVENT_SIZE if event_idx else 0)


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio 1.2 2.7.10: notify iff event_idx lies in [old_idx, new_idx) modulo 2**16."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


_fence_lock = threading.Lock()


def full_barrier() -> None:
    # A lock round trip is a LOCK-prefixed read-modify-write: a full fence on x86.
    _fence_lock.acquire()
    _fence_lock.release()


class VirtqueueError(Exception):
    """The driver broke the virtqueue contract; the device should set DEVICE_NEEDS_RESET."""


# -- chains --------------------------------------------------------------------------------

class Chain:
    """One descriptor chain popped from the available ring.

    ``readable`` / ``writable`` are memoryviews into guest RAM (device-readable first, then
    device-writable, as the spec requires); ``buffers`` has the matching
    ``(gpa, length, writable)`` triples in chain order.
    """

    __slots__ = ("head", "readable", "writable", "buffers")

    def __init__(self, head: int, readable: list, writable: list, buffers: list):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.buffers = buffers

    def read_len(self) -> int:
        return sum(len(v) for v in self.readable)

    def write_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def gather(self, n: int | None = None) -> bytes:
        """Up to ``n`` bytes (all when None) of the device-readable buffers, concatenated."""
        if n is None:
            return b"".join(self.readable)
        out = []
        for v in self.readable:
            if n <= 0:
                break
            piece = v[:n]
            out.append(piece)
            n -= len(piece)
        return b"".join(out)

    def scatter(self, data) -> int:
        """Copy ``data`` into the device-writable buffers in order; returns bytes written
        (less than len(data) if the buffers are too small)."""
        src = memoryview(data).cast("B")
        done = 0
        for v in self.writable:
            if done >= len(src):
                break
            n = min(len(v), len(src) - done)
            v[:n] = src[done:done + n]
            done += n
        return done

    def __repr__(self) -> str:
        return (f"Chain(head={self.head}, read_len={self.read_len()}, "
                f"write_len={self.write_len()}, buffers={len(self.buffers)})")


# -- the queue -----------------------------------------------------------------------------

class VirtQueue:
    """Device side of one split virtqueue in guest memory (see the module docstring)."""

    def __init__(self, memory, size: int, desc_addr: int, avail_addr: int, used_addr: int, *,
                 event_idx: bool = False, indirect: bool = True, max_chain: int | None = None,
                 last_avail_idx: int = 0, used_idx: int = 0):
        """``memory`` is a GuestMemory; ``size`` and the three ring addresses come from the
        driver and are validated here (VirtqueueError).  ``event_idx``: VIRTIO_F_EVENT_IDX
        was negotiated (the used_event/avail_event fields must then be in RAM too);
        ``indirect``: VIRTIO_F_INDIRECT_DESC was negotiated; ``max_chain``: optional cap on
        the number of buffers in one chain (the indirect-table descriptor itself does not
        count).  ``last_avail_idx`` / ``used_idx`` restore saved ring positions (0 after a
        reset).  Nothing in guest memory is written here."""
        if not isinstance(size, int) or size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        for name, addr, align in (("descriptor table", desc_addr, DESC_ALIGN),
                                  ("available ring", avail_addr, AVAIL_ALIGN),
                                  ("used ring", used_addr, USED_ALIGN)):
            if addr < 0 or addr % align:
                raise VirtqueueError(f"{name} address {addr:#x} is not {align}-byte aligned")
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_chain = max_chain
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        try:
            self._desc = memory.view(desc_addr, desc_table_size(size))
            self._avail = memory.view(avail_addr, avail_ring_size(size, event_idx))
            self._used = memory.view(used_addr, used_ring_size(size, event_idx))
            # used.flags, used.idx and avail_event, which the driver reads while we run, are
            # stored as items of this view: one 16-bit store each (x86 order is the ring's).
            # struct.pack_into clears the field first and stores the value after: a driver
            # reading in between sees 0 (store counts: tests/test_virtqueue.py).
            self._used16 = self._used.cast("H")
        except GuestMemoryError as e:
            raise VirtqueueError(f"virtqueue outside guest RAM: {e}") from None
        self._mask = size - 1
        self.last_avail_idx = last_avail_idx & 0xFFFF   # next available entry to consume
        self._shadow_avail = self.last_avail_idx         # last avail.idx read from the guest
        self.used_idx = used_idx & 0xFFFF               # next used entry to fill
        self._signalled_used = self.used_idx             # used idx at the last notify decision
        self._notifications = True
        self._used_event_off = AVAIL_RING_OFF + AVAIL_ELEM_SIZE * size
        self._avail_event_off = USED_RING_OFF + USED_ELEM_SIZE * size

    def close(self) -> None:
        """Release the views into guest memory (the queue is unusable afterwards)."""
        for v in (self._desc, self._avail, self._used16, self._used):
            v.release()

    # -- available ring ------------------------------------------------------------------
    def _read_avail_idx(self) -> int:
        idx = _U16.unpack_from(self._avail, AVAIL_IDX_OFF)[0]
        if ((idx - self.last_avail_idx) & 0xFFFF) > self.size:
            raise VirtqueueError(
                f"available index {idx} is more than the queue size ({self.size}) ahead of "
                f"the last consumed index {self.last_avail_idx}")
        self._shadow_avail = idx
        return idx

    def num_available(self) -> int:
        """How many chains the driver has made available and pop() has not consumed."""
        if self._shadow_avail == self.last_avail_idx:
            self._read_avail_idx()
        return (self._shadow_avail - self.last_avail_idx) & 0xFFFF

    def has_available(self) -> bool:
        return self.num_available() > 0

    def pop(self) -> Chain | None:
        """The next available chain, or None.  Raises VirtqueueError (state unchanged)."""
        if self._shadow_avail == self.last_avail_idx:
            # Load avail.idx before the ring entries it covers (in order on x86).
            if self._read_avail_idx() == self.last_avail_idx:
                return None
        head = _U16.unpack_from(self._avail,
                                AVAIL_RING_OFF + AVAIL_ELEM_SIZE * (self.last_avail_idx & self._mask))[0]
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx and self._notifications:
            self._used16[self._avail_event_off >> 1] = self.last_avail_idx
        return chain

    def _walk(self, head: int) -> Chain:
        size = self.size
        if head >= size:
            raise VirtqueueError(f"chain head {head} >= queue size {size}")
        view = self.memory.view
        table = self._desc
        entries = size          # descriptors in the current table
        in_indirect = False
        idx = head
        steps = 0               # descriptors visited in the current table
        total = 0               # buffers in the chain
        readable, writable, buffers = [], [], []
        rlen = wlen = 0
        max_chain = self.max_chain
        while True:
            steps += 1
            if steps > entries:
                raise VirtqueueError(f"descriptor chain at head {head} loops "
                                     f"(longer than its table of {entries})")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * idx)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtqueueError(f"chain {head}: indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise VirtqueueError(f"chain {head}: indirect descriptor, not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"chain {head}: descriptor has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise VirtqueueError(f"chain {head}: indirect table length {length} is not "
                                         f"a non-zero multiple of {DESC_SIZE}")
                try:
                    table = view(addr, length)
                except GuestMemoryError as e:
                    raise VirtqueueError(f"chain {head}: indirect table outside RAM: {e}") from None
                entries = min(length // DESC_SIZE, 0x10000)  # `next` is 16-bit
                in_indirect = True
                idx = 0
                steps = 0
                continue
            total += 1
            if max_chain is not None and total > max_chain:
                raise VirtqueueError(f"chain {head} has more than {max_chain} buffers")
            try:
                buf = view(addr, length)
            except GuestMemoryError as e:
                raise VirtqueueError(f"chain {head}: buffer outside RAM: {e}") from None
            if flags & VIRTQ_DESC_F_WRITE:
                wlen += length
                if wlen > 0xFFFFFFFF:
                    raise VirtqueueError(f"chain {head}: writable length overflows 32 bits")
                writable.append(buf)
                buffers.append((addr, length, True))
            else:
                if writable:
                    raise VirtqueueError(f"chain {head}: readable descriptor after a writable one")
                rlen += length
                if rlen > 0xFFFFFFFF:
                    raise VirtqueueError(f"chain {head}: readable length overflows 32 bits")
                readable.append(buf)
                buffers.append((addr, length, False))
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable, buffers)
            if nxt >= entries:
                raise VirtqueueError(f"chain {head}: next index {nxt} >= table size {entries}")
            idx = nxt

    # -- used ring -----------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Give chain ``head`` back to the driver, ``written`` bytes written into it."""
        if not 0 <= head < self.size:
            raise ValueError(f"chain head {head} out of range for queue size {self.size}")
        if not 0 <= written <= 0xFFFFFFFF:
            raise ValueError(f"written length {written} does not fit 32 bits")
        _USED_ELEM.pack_into(self._used, USED_RING_OFF + USED_ELEM_SIZE * (self.used_idx & self._mask),
                             head, written)
        # The element is stored before the index that publishes it (store order on x86).
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used16[USED_IDX_OFF >> 1] = self.used_idx

    def needs_notification(self) -> bool:
        """Whether to interrupt the driver for the used entries pushed since the last call."""
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if old == new:
            return False
        full_barrier()   # used.idx store must be visible before we load used_event/flags
        if self.event_idx:
            return vring_need_event(_U16.unpack_from(self._avail, self._used_event_off)[0], new, old)
        return not _U16.unpack_from(self._avail, AVAIL_FLAGS_OFF)[0] & VRING_AVAIL_F_NO_INTERRUPT

    # -- device-side notification suppression --------------------------------------------
    def disable_notifications(self) -> None:
        """Ask the driver not to kick (a hint: it may still do so)."""
        self._notifications = False
        if not self.event_idx:
            self._used16[USED_FLAGS_OFF >> 1] |= VRING_USED_F_NO_NOTIFY
        # With EVENT_IDX, avail_event simply stops advancing: the driver will not kick until
        # its avail.idx passes the stale value again.

    def enable_notifications(self) -> bool:
        """Ask for kicks again.  Returns True if chains are already available (process them:
        no kick will announce those)."""
        self._notifications = True
        if self.event_idx:
            self._used16[self._avail_event_off >> 1] = self.last_avail_idx
        else:
            self._used16[USED_FLAGS_OFF >> 1] &= ~VRING_USED_F_NO_NOTIFY & 0xFFFF
        full_barrier()   # the store above must be visible before we re-read avail.idx
        return self._read_avail_idx() != self.last_avail_idx
