"""The AHCI plugin's test driver, from its package (hvframe_ahci.testdriver), under the
testing roof. ImportError when hvframe-ahci is not installed."""
from hvframe_ahci.testdriver import AhciDriver, PortDriver, build_machine, h2d  # noqa: F401
