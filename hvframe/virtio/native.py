"""A VirtQueue's ring state as the native core's ``struct hv_vq``, for device fast paths.

``queue_state(vq)`` returns the NativeQueue cached on a VirtQueue (built on first use: the
RAM regions and ring addresses do not change during a queue's life).  ``NativeQueue.call(fn,
*args)`` copies the moving part of the state (last_avail_idx, the shadow avail index,
used_idx, whether notifications are enabled) into the struct, calls the native function
``fn(struct hv_vq *, *args)`` (cffi releases the GIL around it) and copies the state back,
so that pop()/push()/needs_notification()/enable_notifications() carry on exactly where the
native code stopped.

``NativeQueue.cycle()`` runs a queue worker's whole service loop natively (hv_vq_cycle):
serve, interrupt through the vector's irqfd gate, poll for the next batch, re-enable
notifications; it comes back to Python only for what Python must do.

Guest RAM is pinned (a buffer export on the mapping) only for the duration of a call, so
GuestMemory.close() works whenever no call is running.
"""
from __future__ import annotations

from contextlib import contextmanager

from ..core_native import api as lib, api_ffi as ffi, set_ram_regions
from .. import concurrency

# How long a queue worker with a native path spins for the driver's next batch before going
# to sleep (QEMU's iothreads poll up to 32 us by default); 0 disables polling.
POLL_NS = 32_000

# What hv_vq_cycle came back for.
CYCLE_IDLE = lib.HV_VQ_CYCLE_IDLE       # nothing available, notifications on: sleep
CYCLE_PYTHON = lib.HV_VQ_CYCLE_PYTHON   # the next chain is the Python path's
CYCLE_NOTIFY = lib.HV_VQ_CYCLE_NOTIFY   # interrupt the driver (the gate is shut), call again
CYCLE_YIELD = lib.HV_VQ_CYCLE_YIELD     # another thread asked for the queue

STOP_NAMES = {
    lib.HV_VQ_CHAIN: "none",
    lib.HV_VQ_STOP_EMPTY: "empty",
    lib.HV_VQ_STOP_MAX: "max",
    lib.HV_VQ_STOP_DECLINED: "declined",
    lib.HV_VQ_STOP_UNSUPPORTED: "unsupported",
    lib.HV_VQ_STOP_INVALID: "invalid",
    lib.HV_VQ_STOP_STATE: "state",
}


class NativeQueue:
    """The ``struct hv_vq`` of one VirtQueue (see the module docstring)."""

    __slots__ = ("vq", "c", "_buffer")

    def __init__(self, vq):
        memory = vq.memory
        c = ffi.new("struct hv_vq *")
        set_ram_regions(c.ram, memory)
        c.desc_addr, c.avail_addr, c.used_addr = vq.desc_addr, vq.avail_addr, vq.used_addr
        c.size = vq.size
        c.max_chain = vq.max_chain or 0
        c.event_idx = bool(vq.event_idx)
        c.indirect = bool(vq.indirect)
        self.vq = vq
        self.c = c
        self._buffer = memory.buffer

    @property
    def stop(self) -> str:
        """Why the last call stopped (a STOP_NAMES value)."""
        return STOP_NAMES.get(self.c.stop, str(self.c.stop))

    def call(self, fn, *args) -> int:
        vq, c = self.vq, self.c
        c.last_avail_idx = vq.last_avail_idx
        c.shadow_avail = vq._shadow_avail
        c.used_idx = vq.used_idx
        c.notifications = vq._notifications
        c.signalled_used = vq._signalled_used
        # The export keeps the mapping alive (and GuestMemory.close() refused) meanwhile.
        with ffi.from_buffer(self._buffer) as mem:
            c.ram.mem = mem
            try:
                n = fn(c, *args)
            finally:
                c.ram.mem = ffi.NULL
        vq.last_avail_idx = c.last_avail_idx
        vq._shadow_avail = c.shadow_avail
        vq.used_idx = c.used_idx
        vq._notifications = bool(c.notifications)
        vq._signalled_used = c.signalled_used
        return n

    def serve(self, fn, ctx, limit: int) -> int:
        """Serve up to ``limit`` chains with the chain server ``fn`` (an ``hv_chain_fn`` of a
        plugin's native module, e.g. ``ffi.addressof(lib, "name")``) and its context ``ctx``;
        returns how many were served (``stop`` says why it stopped)."""
        return self.call(lib.hv_vq_serve, fn, ctx, limit)

    def cycle(self, fn, ctx, gate, poll_ns: int | None = None) -> int:
        """One hv_vq_cycle with the chain server ``fn``; the queue's interrupt fires through
        ``gate`` (a ``struct hv_irq_gate *``, or NULL to leave every interrupt to Python).
        Returns a CYCLE_* code; ``served`` counts."""
        return self.call(lib.hv_vq_cycle, fn, ctx, gate, POLL_NS if poll_ns is None else poll_ns)

    def serve_batch(self, fn, ctx, limit: int) -> int:
        """serve() with a batch server ``fn`` (an ``hv_batch_fn``) in place of a chain
        server."""
        return self.call(lib.hv_vq_serve_batch, fn, ctx, limit)

    def cycle_batch(self, fn, ctx, gate, poll_ns: int | None = None) -> int:
        """cycle() with a batch server ``fn`` (an ``hv_batch_fn``) in place of a chain
        server."""
        return self.call(lib.hv_vq_cycle_batch, fn, ctx, gate,
                         POLL_NS if poll_ns is None else poll_ns)

    @property
    def served(self) -> int:
        """Chains the last cycle() served natively."""
        return self.c.served


_claim_lock = concurrency.lock(concurrency.LEAF, "virtqueue claims")


@contextmanager
def claiming(vq):
    """Around taking a queue's lock from another thread: a native cycle running on ``vq``
    returns soon (CYCLE_YIELD) instead of polling on while the driver keeps it busy."""
    nq = vq.__dict__.get("_native_queue") if vq is not None else None
    if nq is None:
        yield
        return
    with _claim_lock:
        nq.c.yield_req += 1
    try:
        yield
    finally:
        with _claim_lock:
            nq.c.yield_req -= 1


def queue_state(vq) -> NativeQueue:
    """The NativeQueue of ``vq``, cached on it."""
    nq = vq.__dict__.get("_native_queue")
    if nq is None:
        nq = vq._native_queue = NativeQueue(vq)
    return nq
