"""Loggers that import `logging` on their first message.

Importing logging (with traceback, string, textwrap) costs about 7 ms of every `hvframe run`,
and the loggers on the start-up path speak only when something fails. ``logger(name)`` gives
the methods hvframe uses, each passing straight to ``logging.getLogger(name)``, so handlers,
levels and pytest's caplog see exactly what they would with the logger itself."""
from __future__ import annotations


class LazyLogger:
    """logging.getLogger(name), looked up when the first message is logged."""

    __slots__ = ("name", "_logger")

    def __init__(self, name: str):
        self.name = name
        self._logger = None

    def get(self):
        """The real logging.Logger (importing logging on the first call)."""
        if self._logger is None:
            import logging
            self._logger = logging.getLogger(self.name)
        return self._logger

    def debug(self, msg, *args, **kw):
        self.get().debug(msg, *args, **kw)

    def info(self, msg, *args, **kw):
        self.get().info(msg, *args, **kw)

    def warning(self, msg, *args, **kw):
        self.get().warning(msg, *args, **kw)

    def error(self, msg, *args, **kw):
        self.get().error(msg, *args, **kw)

    def exception(self, msg, *args, exc_info=True, **kw):
        self.get().error(msg, *args, exc_info=exc_info, **kw)


def logger(name: str) -> LazyLogger:
    return LazyLogger(name)
