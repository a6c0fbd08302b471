"""Fixtures for the example plugins' own tests (plugins/*/tests), on today's framework API:
a synthetic machine and `rig`, which builds devices on it from a command-line fragment the
way `hvframe run` does. The lock-order checker is on, as in tests/."""
import os

import pytest

os.environ.setdefault("HVFRAME_LOCK_CHECK", "1")

from hvframe import concurrency  # noqa: E402
from hvframe.synthetic import SyntheticMachine, rig as build_devices  # noqa: E402


@pytest.fixture(autouse=True)
def lock_order_checked():
    concurrency.take_violations()
    yield
    found = concurrency.take_violations()
    assert not found, "lock order violations:\n" + "\n".join(found)


@pytest.fixture
def machine():
    m = SyntheticMachine(64 << 20)
    yield m
    m.close()


@pytest.fixture
def rig():
    """rig(machine, "-s 3,my-device,opt=1") -> the devices built, started."""
    def build(m, args):
        devices = build_devices(m, args)
        m.start_devices()
        return devices
    return build
