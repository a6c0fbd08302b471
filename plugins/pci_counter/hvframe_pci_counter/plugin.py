"""Device type pci-counter: `-s N,pci-counter[,vectors=N]`."""
from __future__ import annotations

from dataclasses import dataclass

from hvframe.bench import Benchmarks, Register
from hvframe.device import DeviceType, PciAddress, PciOptions, option
from hvframe.hookspecs import hookimpl

from .pci_counter import MSIX_OFFSET, REG, PciCounter

MAX_VECTORS = MSIX_OFFSET // 16 // 2        # table and PBA fit the BAR's upper half


@dataclass
class PciCounterOptions(PciOptions):
    vectors: int = option(2, help="MSI-X vectors", min=1, max=MAX_VECTORS)


def pci_counter_factory(machine, options: PciCounterOptions, address: PciAddress) -> PciCounter:
    # hvframe puts the returned function on the PCI bus at `address`.
    return PciCounter(options.vectors, name=f"pci-counter {address}")


BENCHMARKS = Benchmarks(registers=(
    Register("COUNT read", REG["count"], 4, bar=0),
    Register("VECTOR write", REG["vector"], 4, write=0, bar=0),
    Register("DOORBELL write", REG["doorbell"], 4, write=1, bar=0)))


def pci_counter_device_types() -> list[DeviceType]:
    return [DeviceType(
        name="pci-counter", kind="pci", factory=pci_counter_factory,
        summary="example PCI device (1234:c0de): a counter whose doorbell raises MSI-X",
        options=PciCounterOptions, examples=("-s 4,pci-counter", "-s 4,pci-counter,vectors=8"),
        benchmarks=BENCHMARKS)]


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return pci_counter_device_types()
