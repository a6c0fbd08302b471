"""Device type virtio-rng: `-s N,virtio-rng[,max-bytes=SIZE][,period=MS]`."""
from __future__ import annotations

from dataclasses import dataclass

from hvframe.bench import Benchmarks, virtio_path, virtio_registers
from hvframe.device import DeviceType, PciAddress, PciOptions, option
from hvframe.hookspecs import hookimpl
from hvframe.virtio.pci import VirtioPciFunction

from .virtio_rng import VirtioRng


@dataclass
class VirtioRngOptions(PciOptions):
    max_bytes: int = option(0, type="size", unit="bytes",
                            help="bytes the guest may have per period (0: no limit), e.g. 1K")
    period: int = option(1000, unit="ms", min=1, help="the rate limit's period")


def virtio_rng_factory(machine, options: VirtioRngOptions,
                       address: PciAddress) -> VirtioPciFunction:
    return VirtioPciFunction(VirtioRng(options.max_bytes, options.period),
                             name=f"virtio-rng {address}")


def entropy_request(memory, base: int, i: int) -> list:
    """One Linux-style request for `hvframe bench`: a single 64-byte device-writable buffer."""
    return [(base, 64, True)]


BENCHMARKS = Benchmarks(
    registers=virtio_registers(),
    data_paths=(virtio_path("64-byte requests x32", entropy_request, depth=32,
                            bytes_per_op=64),))


def virtio_rng_device_types() -> list[DeviceType]:
    return [DeviceType(
        name="virtio-rng", kind="pci", factory=virtio_rng_factory,
        summary="virtio entropy device (transitional virtio-pci 1af4:1005), host getrandom()",
        options=VirtioRngOptions,
        examples=("-s 3,virtio-rng", "-s 3,virtio-rng,max-bytes=1K,period=1000"),
        benchmarks=BENCHMARKS)]


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return virtio_rng_device_types()
