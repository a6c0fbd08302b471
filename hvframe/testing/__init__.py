"""Test tooling for hvframe and for device plugins, in one place:

  SyntheticMachine    a machine without KVM whose exits the test makes up (synthetic.py)
  rig(machine, "-s 3,my-device,...")   devices built as `hvframe run` builds them (rig.py)
  PciConfig           a function's configuration space through ports 0xcf8/0xcfc (pci.py)
  VirtioPciDriver     a virtio driver: feature negotiation, split queues, kicks (virtio.py)
  RawQueue            raw (malformed) descriptors and avail entries in its queues (virtio.py)
  BareTransport       what a queue worker's loop body needs, without PCI (virtio.py)
  hvframe.testing.ahci.AhciDriver   the AHCI plugin's driver (when hvframe-ahci is installed)

and a pytest plugin (hvframe.testing.plugin, loaded through the pytest11 entry point) with
fixtures for them, in which a device handler that raises fails the test.

Names are imported on first use, so that loading the pytest plugin imports no hvframe module
before the test run has set its environment (HVFRAME_LOCK_CHECK)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "SyntheticMachine": "synthetic", "ExitBatch": "synthetic",
    "rig": "rig", "parse_args": "rig",
    "PciConfig": "pci",
    "VirtioPciDriver": "virtio", "DriverQueue": "virtio", "RawQueue": "virtio",
    "BareTransport": "virtio",
    "HandlerFailures": "failures", "HandlerFailure": "failures",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:
    from .failures import HandlerFailure, HandlerFailures  # noqa: F401
    from .pci import PciConfig  # noqa: F401
    from .rig import parse_args, rig  # noqa: F401
    from .synthetic import ExitBatch, SyntheticMachine  # noqa: F401
    from .virtio import BareTransport, DriverQueue, RawQueue, VirtioPciDriver  # noqa: F401


def __getattr__(name: str):
    sub = _WHERE.get(name)
    if sub is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = vars(importlib.import_module(f"{__name__}.{sub}"))[name]
    globals()[name] = value
    return value
