"""Exceptions that escaped device handlers during a test.

Outside tests the dispatch core answers such an access like an empty bus (reads all ones) and
reports the error once: the VMM must survive a device bug. In a test that hides the bug, so
the pytest plugin collects every such exception and fails the test with its traceback; a test
that provokes one on purpose takes them with the `handler_failures` fixture."""
from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass


@dataclass(frozen=True)
class HandlerFailure:
    device: str
    offset: int
    is_write: bool
    exc: BaseException

    def describe(self) -> str:
        tb = "".join(traceback.format_exception(type(self.exc), self.exc, self.exc.__traceback__))
        return (f"device {self.device} raised on {'write' if self.is_write else 'read'} at "
                f"offset {self.offset:#x}: {type(self.exc).__name__}: {self.exc}\n{tb}")


class HandlerFailures:
    """Collects handler exceptions while installed (a context manager)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.items: list[HandlerFailure] = []

    def _record(self, device: str, offset: int, is_write: bool, exc: BaseException) -> None:
        with self._lock:
            self.items.append(HandlerFailure(device, offset, is_write, exc))

    def take(self) -> list[HandlerFailure]:
        with self._lock:
            out, self.items = self.items, []
        return out

    def __enter__(self) -> "HandlerFailures":
        from ..dispatch import failure_listeners
        failure_listeners.append(self._record)
        return self

    def __exit__(self, *exc) -> None:
        from ..dispatch import failure_listeners
        if self._record in failure_listeners:
            failure_listeners.remove(self._record)
