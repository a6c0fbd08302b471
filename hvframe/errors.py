"""Errors that reach the user as one line (the runner prints them without a traceback)."""


class HvError(Exception):
    """Base: a problem the user can fix; str(e) is the whole message."""


class ConfigError(HvError):
    """A bad command line or configuration value."""
