"""Moved to hvframe.testing.synthetic (the home of test tooling); kept importable here."""
from .testing.synthetic import ExitBatch, SyntheticMachine  # noqa: F401
