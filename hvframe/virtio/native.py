"""A VirtQueue's ring state as the native core's ``struct hv_vq``, for device fast paths.

``queue_state(vq)`` returns the NativeQueue cached on a VirtQueue (built on first use: the
RAM regions and ring addresses do not change during a queue's life).  ``NativeQueue.call(fn,
*args)`` copies the moving part of the state (last_avail_idx, the shadow avail index,
used_idx, whether notifications are enabled) into the struct, calls the native function
``fn(struct hv_vq *, *args)`` (cffi releases the GIL around it) and copies the state back,
so that pop()/push()/needs_notification() carry on exactly where the native code stopped.
``_signalled_used`` stays Python's: the transport's needs_notification() after a batch
covers the used entries the native code pushed.

Guest RAM is pinned (a buffer export on the mapping) only for the duration of a call, so
GuestMemory.close() works whenever no call is running.
"""
from __future__ import annotations

from ..core_native import ffi, lib

# How long a queue worker with a native path spins for the driver's next batch before going
# to sleep (QEMU's iothreads poll up to 32 us by default); 0 disables polling.
POLL_NS = 32_000

STOP_NAMES = {
    lib.HV_VBLK_STOP_EMPTY: "empty",
    lib.HV_VBLK_STOP_MAX: "max",
    lib.HV_VBLK_STOP_TYPE: "type",
    lib.HV_VBLK_STOP_UNSUPPORTED: "unsupported",
    lib.HV_VBLK_STOP_INVALID: "invalid",
    lib.HV_VBLK_STOP_STATE: "state",
}


class NativeQueue:
    """The ``struct hv_vq`` of one VirtQueue (see the module docstring)."""

    __slots__ = ("vq", "c", "_buffer")

    def __init__(self, vq):
        memory = vq.memory
        regions = memory.regions
        if len(regions) > lib.HV_VQ_MAX_REGIONS:
            raise ValueError(f"{len(regions)} RAM regions; the native core takes "
                             f"{lib.HV_VQ_MAX_REGIONS}")
        c = ffi.new("struct hv_vq *")
        c.mem_size = memory.size
        c.nregions = len(regions)
        for i, r in enumerate(regions):
            c.regions[i].gpa, c.regions[i].size, c.regions[i].host_offset = (
                r.gpa, r.size, r.host_offset)
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
        # The export keeps the mapping alive (and GuestMemory.close() refused) meanwhile.
        with ffi.from_buffer(self._buffer) as mem:
            c.mem = mem
            try:
                n = fn(c, *args)
            finally:
                c.mem = ffi.NULL
        vq.last_avail_idx = c.last_avail_idx
        vq._shadow_avail = c.shadow_avail
        vq.used_idx = c.used_idx
        return n

    def poll_avail(self, ns: int) -> bool:
        """Spin up to ``ns`` nanoseconds (GIL released) for the driver to make chains
        available; True if it did (avail.idx is not read into the queue state)."""
        try:
            return self.call(lib.hv_vq_poll_avail, ns) == 1
        except (ValueError, BufferError):
            return False                  # guest memory closed


def queue_state(vq) -> NativeQueue:
    """The NativeQueue of ``vq``, cached on it."""
    nq = vq.__dict__.get("_native_queue")
    if nq is None:
        nq = vq._native_queue = NativeQueue(vq)
    return nq
