"""Moved to hvframe.testing.virtio (the home of test tooling); kept importable here."""
from ..testing.virtio import DriverQueue, VirtioPciDriver  # noqa: F401
