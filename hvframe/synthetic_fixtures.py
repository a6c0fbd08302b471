"""pytest fixtures for a device's tests on the synthetic machine; a test module imports them:

    from hvframe.synthetic_fixtures import lock_order_checked, machine, rig  # noqa: F401

``machine``: a SyntheticMachine (64 MiB), closed after the test. ``rig(machine, "-s 3,my-dev")``
builds devices on it as `hvframe run` does and starts them. ``lock_order_checked`` (autouse
once imported) fails a test in which a thread took hvframe's locks out of order or waited
while holding one; the checker is on when this module is imported before hvframe makes its
first lock (import it first)."""
import os

os.environ.setdefault("HVFRAME_LOCK_CHECK", "1")

import pytest  # noqa: E402

from . import concurrency  # noqa: E402
from .synthetic import SyntheticMachine, rig as build_devices  # noqa: E402


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
