"""Pausing vCPUs: the gate a vCPU thread parks at between two KVM_RUNs.

Machine.pause() closes the gate and kicks every vCPU out of KVM_RUN (hv_vcpu_stop:
immediate_exit plus a signal); each vCPU thread, back in Python with no lock held, parks
here until resume() opens the gate or the run ends. Device threads are not touched: they
keep serving what the guest already queued, and a vCPU never parks inside a device handler,
so nothing a device worker waits for is held by a parked vCPU.
"""
from __future__ import annotations

from .. import concurrency


class PauseGate:
    def __init__(self) -> None:
        self._cond = concurrency.condition(concurrency.lock(concurrency.LEAF, "vcpu pause gate"))
        self._closed = False      # asked to pause
        self._ended = False       # the run is ending: nobody parks any more
        self._parked = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def parked(self) -> int:
        return self._parked

    def close(self) -> None:
        with self._cond:
            self._closed = True

    def open(self) -> None:
        with self._cond:
            self._closed = False
            self._cond.notify_all()

    def end(self) -> None:
        """The run ends (Machine.request_exit): parked threads leave, none park again."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def park(self) -> None:
        """(on a vCPU thread, holding no lock) Wait here while the gate is closed."""
        with self._cond:
            if not self._closed or self._ended:
                return
            self._parked += 1
            self._cond.notify_all()
            try:
                while self._closed and not self._ended:
                    self._cond.wait()
            finally:
                self._parked -= 1
                self._cond.notify_all()

    def wait_parked(self, count: int, deadline: float) -> bool:
        """Wait until `count` threads are parked (True), the run ends, or the deadline."""
        concurrency.may_block("vCPUs to pause")
        with self._cond:
            return self._cond.wait_for(lambda: self._parked >= count or self._ended, deadline)
