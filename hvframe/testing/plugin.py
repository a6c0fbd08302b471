"""hvframe's pytest plugin (entry point pytest11 `hvframe`): loaded in every pytest run where
hvframe is installed.

- A device handler that raises fails the test (outside tests the access would be answered
  as unclaimed and the error shown once). A test that provokes that on purpose asks for the
  `handler_failures` fixture and looks at what it collected.
- Lock order is checked (hvframe.concurrency): the checker is on for the test process and the
  hvframe processes it starts (HVFRAME_LOCK_CHECK=1 unless set), and a test fails if a thread
  took locks out of the written order or waited holding one. A test that provokes that on
  purpose takes the violations (concurrency.take_violations()).
- Run directories: the hvframe processes a test run starts keep theirs (QMP socket, pid
  file) in a directory of the run's own (HVFRAME_RUN_DIR, unless set), removed at the end,
  never the user's: a VM a test names cannot meet one the user runs, nor leave files there.

Fixtures:
  synthetic_machine          a SyntheticMachine (64 MiB), closed after the test
  device_rig(*args, memory=, irqfd_eventfds=, platform=, direct_boot=) -> (machine, devices)
                             a SyntheticMachine with the devices of `-s/-l/-o` arguments built
                             as `hvframe run` builds them (hvframe.testing.rig), closed after
  pci_config(machine, slot, func=0) -> PciConfig
  virtio_driver(machine, slot, **kw) -> VirtioPciDriver
  ahci_driver(machine, slot) -> hvframe_ahci's AhciDriver (skips without hvframe-ahci)
  handler_failures           HandlerFailures: the handler exceptions of this test, not fatal
  sockdir                    a short directory for Unix sockets (paths must stay under 108
                             bytes, which tmp_path can exceed), removed afterwards

Nothing from hvframe is imported when the plugin loads: the environment is set first."""
from __future__ import annotations

import os

import pytest

# Before hvframe makes its first lock (hvframe.concurrency reads it then).
os.environ.setdefault("HVFRAME_LOCK_CHECK", "1")

_RUN_DIR = pytest.StashKey[str]()


def pytest_configure(config):
    if "HVFRAME_RUN_DIR" not in os.environ:
        import tempfile
        # Short (under /tmp): the QMP socket's path must stay under 108 bytes.
        config.stash[_RUN_DIR] = os.environ["HVFRAME_RUN_DIR"] = tempfile.mkdtemp(
            prefix="hvf-run-", dir="/tmp")


def pytest_unconfigure(config):
    run_dir = config.stash.get(_RUN_DIR, None)
    if run_dir is not None:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
        if os.environ.get("HVFRAME_RUN_DIR") == run_dir:
            del os.environ["HVFRAME_RUN_DIR"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if isinstance(item, pytest.Function) and "handler_failures" in item.fixturenames:
        return (yield)       # the test looks at them itself
    from .failures import HandlerFailures
    with HandlerFailures() as failures:
        result = yield
    found = failures.take()
    if found:
        raise AssertionError(f"{len(found)} exception(s) escaped device handlers (the guest "
                             f"would have read all ones):\n" + "\n".join(f.describe() for f in found))
    return result


@pytest.fixture
def handler_failures():
    from .failures import HandlerFailures
    with HandlerFailures() as failures:
        yield failures


@pytest.fixture(autouse=True)
def lock_order_checked():
    """Fails the test on a lock-order violation (see the module docstring)."""
    if os.environ.get("HVFRAME_LOCK_CHECK") != "1":
        yield
        return
    from hvframe import concurrency
    concurrency.take_violations()
    yield
    found = concurrency.take_violations()
    assert not found, "lock order violations:\n" + "\n".join(found)


@pytest.fixture
def synthetic_machine():
    from .synthetic import SyntheticMachine
    m = SyntheticMachine(64 << 20)
    yield m
    m.close()


@pytest.fixture
def device_rig():
    from .rig import rig
    from .synthetic import SyntheticMachine
    machines = []

    def make(*args: str, memory: int = 64 << 20, irqfd_eventfds: bool = False,
             platform: bool = False, direct_boot: bool = True):
        m = SyntheticMachine(memory, irqfd_eventfds=irqfd_eventfds)
        machines.append(m)
        return m, rig(m, *args, platform=platform, direct_boot=direct_boot)
    yield make
    for m in reversed(machines):
        m.close()


@pytest.fixture
def pci_config():
    from .pci import PciConfig
    return PciConfig


@pytest.fixture
def virtio_driver():
    from .virtio import VirtioPciDriver
    return VirtioPciDriver


@pytest.fixture
def ahci_driver():
    try:
        from .ahci import AhciDriver
    except ImportError as e:
        pytest.skip(f"needs the hvframe-ahci plugin: {e}")
    return AhciDriver


@pytest.fixture
def sockdir():
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="hvft-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)
