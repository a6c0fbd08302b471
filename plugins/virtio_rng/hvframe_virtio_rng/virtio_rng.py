"""virtio-rng (virtio 1.2 section 5.4): entropy from the host's getrandom() for the guest.

    -s N,virtio-rng[,max-bytes=SIZE][,period=MS]

The driver posts device-writable buffers on the one request queue; the device fills them
and hands them back. Requests are served on the queue's worker thread (the doorbell is an
ioeventfd), never on a vCPU. With max-bytes, at most that many bytes reach the guest per
period, as QEMU's rng rate limit: a request that finds the budget spent stays on the ring
until the next period begins, when a thread of the device's own wakes the queue's worker.
Nothing sleeps for the limit: not the vCPU, not the worker.

Checkpoint (DeviceState): the bytes served and the rate limit's budget (what is left of the
period and for how long), so a restored guest cannot draw a fresh budget by being restored.
"""
from __future__ import annotations

import os
import threading
import time

from construct import Float64l, Int64ul, Struct

from hvframe import concurrency
from hvframe.snapshot.state import DeviceState
from hvframe.virtio.device import VirtioDevice
from hvframe.virtio.native import CYCLE_IDLE, CYCLE_NOTIFY, CYCLE_PYTHON, CYCLE_YIELD

VIRTIO_ID_RNG = 4
# The guest chooses the buffer size (up to the whole of its RAM): what one request gets,
# and so what the host allocates for it, is bounded here. Linux asks for 64 bytes or less.
MAX_REQUEST = 64 << 10

# The checkpoint record (DeviceState, version 1).
VIRTIO_RNG_STATE = Struct(
    "bytes_served" / Int64ul,
    "remaining" / Int64ul,              # of this period's budget
    "period_left" / Float64l,           # seconds until the period ends (0: a new one is due)
)


class Budget:
    """max_bytes per period (seconds), counted in fixed windows; max_bytes 0: no limit."""

    def __init__(self, max_bytes: int, period: float, clock=time.monotonic):
        self.max_bytes, self.period, self.clock = max_bytes, period, clock
        self.remaining, self.window_end = max_bytes, 0.0

    def _roll(self, now: float) -> None:
        if now >= self.window_end:
            self.window_end, self.remaining = now + self.period, self.max_bytes

    def take(self, wanted: int) -> int:
        """Bytes granted now, at most ``wanted``."""
        if not self.max_bytes:
            return wanted
        self._roll(self.clock())
        granted = min(wanted, self.remaining)
        self.remaining -= granted
        return granted

    def wait(self) -> float:
        """Seconds until bytes can be granted again (0: now)."""
        if not self.max_bytes:
            return 0.0
        now = self.clock()
        self._roll(now)
        return 0.0 if self.remaining else self.window_end - now


class VirtioRng(VirtioDevice, DeviceState):
    name = "virtio-rng"
    device_type = VIRTIO_ID_RNG
    num_queues = 1
    queue_max_size = 64
    state_version = 1
    state_layout = VIRTIO_RNG_STATE

    def __init__(self, max_bytes: int = 0, period_ms: int = 1000):
        self.budget = Budget(max_bytes, period_ms / 1000)
        self.bytes_served = 0
        self._due: float | None = None          # when the refill thread wakes the queue
        self._due_lock = concurrency.lock(concurrency.LEAF, "virtio-rng refill")
        self._wakeup = threading.Event()
        self._refill: concurrency.DeviceThread | None = None

    # The worker's loop (with the queue lock held): chains go to handle_chain one by one
    # while the budget lasts, one interrupt per batch; a spent budget leaves the rest on the
    # ring until the refill thread wakes the worker in the next period.
    def serve_cycle(self, queue: int, vq, gate) -> int:
        if self.transport.queues[queue].claims:
            return CYCLE_YIELD                   # a reset waits for the queue
        wait = self.budget.wait()
        if not wait and vq.has_available():
            vq.disable_notifications()
            return CYCLE_PYTHON                  # the next chain, to handle_chain
        if vq.needs_notification():
            return CYCLE_NOTIFY
        if wait:
            vq.disable_notifications()           # kicks would only find the budget spent
            self._refill_in(wait)
            return CYCLE_IDLE
        return CYCLE_PYTHON if vq.enable_notifications() else CYCLE_IDLE

    def handle_chain(self, queue: int, chain) -> int:
        granted = self.budget.take(min(chain.write_len(), MAX_REQUEST))
        if not granted:
            return 0                             # no writable buffer: nothing to fill
        written = chain.scatter(os.getrandom(granted))
        self.bytes_served += written
        return written

    # -- the refill thread: owned by the device, running while a rate limit is set ---------
    def activate(self, features: int) -> None:
        if self.budget.max_bytes and self._refill is None:   # kept after close(): no other
            self._refill = concurrency.DeviceThread(
                "virtio-rng-refill", self._run_refill, wake=self._wakeup.set).start()

    def _refill_in(self, seconds: float) -> None:
        with self._due_lock:
            self._due = time.monotonic() + seconds
        self._wakeup.set()

    def _run_refill(self, thread: concurrency.DeviceThread) -> None:
        while not thread.stopping:
            with self._due_lock:
                due = self._due
            concurrency.may_block("the rate limit's next period")
            self._wakeup.wait(None if due is None else max(0.0, due - time.monotonic()))
            self._wakeup.clear()
            if thread.stopping:
                return
            thread.checkpoint()
            with self._due_lock:
                fire = self._due is not None and time.monotonic() >= self._due
                if fire:
                    self._due = None
            if fire:
                self.transport.notify_queue(0)

    # -- checkpoint: the worker is quiesced by the transport; the refill thread only wakes it.
    def save_state(self) -> dict:
        b = self.budget
        return dict(bytes_served=self.bytes_served, remaining=b.remaining,
                    period_left=max(0.0, b.window_end - b.clock()))

    def load_state(self, s) -> None:
        b = self.budget
        self.bytes_served = s.bytes_served
        # Under this configuration's limit, which may be lower than the one saved under.
        b.remaining = min(s.remaining, b.max_bytes)
        b.window_end = b.clock() + min(max(s.period_left, 0.0), b.period)

    def close(self) -> None:
        if self._refill is not None:
            self._refill.stop()                  # joins with a deadline
