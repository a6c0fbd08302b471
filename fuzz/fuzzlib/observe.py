"""Seeing what hvframe swallows: handler exceptions, logged errors, dying threads.

The dispatch core never lets a device handler's exception through: the C core catches it and
calls the Python function registered with ``lib.hv_py_set_failed`` (hvframe.dispatch
registers ``_handler_failed``, which prints one line per device and kind of error). The C
core keeps its own reference to that function, so replacing the module attribute would
change nothing; ``Observer`` registers its own reporter through the same C entry point for
the duration of an input, records every report, and puts ``_handler_failed`` back when done.

It also records ERROR-level log records of hvframe's loggers (a device's ``log.exception``
around a request: the exception was caught, but it is a bug) and exceptions that end a
thread (``threading.excepthook``). ``check()`` raises ``Finding`` for the first of them, with
the original exception chained, so the traceback points into hvframe.
"""
from __future__ import annotations

import logging
import threading

from hvframe import dispatch
from hvframe.core_native import lib

WATCHED_LOGGERS = ("hvframe", "hvframe_ahci", "hvframe_virtio_blk", "hvframe_uart")


class Finding(AssertionError):
    """An invariant of the fuzz target does not hold (a bug in hvframe, or in the target)."""


def check_image(path, before: bytes, readonly: bool, where: str) -> None:
    """A disk image keeps its size, and a read-only one its contents."""
    with open(path, "rb") as f:
        now = f.read()
    if len(now) != len(before):
        raise Finding(f"{where}: image size changed from {len(before)} to {len(now)}")
    if readonly and now != before:
        raise Finding(f"{where}: a read-only image was written")


class _Collect(logging.Handler):
    def __init__(self, sink: list):
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR and record.name.split(".")[0] in WATCHED_LOGGERS:
            self.sink.append(record)


class Observer:
    def __init__(self):
        self.handler_failures: list[tuple] = []   # (device name, offset, is_write, exc)
        self.error_records: list[logging.LogRecord] = []
        self.thread_failures: list = []

        def reporter(handle, offset, is_write, exc):
            name = dispatch._names[handle] if 0 <= handle < len(dispatch._names) else "?"
            self.handler_failures.append((name, offset, is_write, exc))
        self._reporter = reporter            # the C core takes its own reference too
        self._log_handler = _Collect(self.error_records)

    def __enter__(self) -> "Observer":
        lib.hv_py_set_failed(id(self._reporter))
        root = logging.getLogger()
        root.addHandler(self._log_handler)
        # (Warnings, e.g. a virtio device asking for a reset, are expected and not kept;
        # with a handler on the root logger they are not printed either.)
        self._old_hook = threading.excepthook
        threading.excepthook = self._thread_hook
        return self

    def __exit__(self, *exc) -> None:
        lib.hv_py_set_failed(id(dispatch._handler_failed))
        logging.getLogger().removeHandler(self._log_handler)
        threading.excepthook = self._old_hook

    def _thread_hook(self, args) -> None:
        self.thread_failures.append(args)

    def check(self, where: str = "") -> None:
        at = f" ({where})" if where else ""
        if self.handler_failures:
            name, offset, is_write, exc = self.handler_failures[0]
            raise Finding(f"device handler {name!r} raised on {'write' if is_write else 'read'} "
                          f"at offset {offset:#x}{at}: {type(exc).__name__}: {exc}") from exc
        if self.error_records:
            r = self.error_records[0]
            exc = r.exc_info[1] if r.exc_info else None
            raise Finding(f"hvframe logged an error{at}: {r.name}: {r.getMessage()}") from exc
        if self.thread_failures:
            a = self.thread_failures[0]
            raise Finding(f"thread {a.thread.name if a.thread else '?'} died{at}: "
                          f"{a.exc_type.__name__}: {a.exc_value}") from a.exc_value
