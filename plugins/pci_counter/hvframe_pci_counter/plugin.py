"""Device type pci-counter: `-s N,pci-counter[,vectors=N]`."""
from __future__ import annotations

from hvframe.bench import Benchmarks, Register
from hvframe.device import DeviceType, Option
from hvframe.errors import ConfigError
from hvframe.hookspecs import hookimpl

from .pci_counter import MSIX_OFFSET, REG, PciCounter

MAX_VECTORS = MSIX_OFFSET // 16 // 2        # table and PBA fit the BAR's upper half


def pci_counter_factory(machine, options) -> PciCounter:
    b, s, f = options["pci.address"]
    if not 1 <= options["vectors"] <= MAX_VECTORS:
        raise ConfigError(f"pci-counter at {b}:{s}:{f}: vectors={options['vectors']} must "
                          f"be 1-{MAX_VECTORS}")
    return PciCounter(options["vectors"], name=f"pci-counter {b}:{s}:{f}")


BENCHMARKS = Benchmarks(registers=(
    Register("COUNT read", REG["count"], 4, bar=0),
    Register("VECTOR write", REG["vector"], 4, write=0, bar=0),
    Register("DOORBELL write", REG["doorbell"], 4, write=1, bar=0)))


def pci_counter_device_types() -> list[DeviceType]:
    return [DeviceType(
        name="pci-counter", kind="pci", factory=pci_counter_factory,
        summary="example PCI device (1234:c0de): a counter whose doorbell raises MSI-X",
        options=(Option("vectors", "int", 2, "MSI-X vectors"),), benchmarks=BENCHMARKS)]


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return pci_counter_device_types()
