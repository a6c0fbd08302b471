"""Device type virtio-rng: `-s N,virtio-rng[,max-bytes=SIZE][,period=MS]`."""
from __future__ import annotations

from hvframe.bench import Benchmarks, virtio_path, virtio_registers
from hvframe.device import DeviceType, Option
from hvframe.errors import ConfigError
from hvframe.hookspecs import hookimpl
from hvframe.virtio.pci import VirtioPciFunction

from .virtio_rng import VirtioRng


def virtio_rng_factory(machine, options) -> VirtioPciFunction:
    b, s, f = options["pci.address"]
    if options["period"] <= 0:
        raise ConfigError(f"virtio-rng at {b}:{s}:{f}: period={options['period']} must be "
                          "at least 1 (milliseconds)")
    return VirtioPciFunction(VirtioRng(options["max-bytes"], options["period"]),
                             name=f"virtio-rng {b}:{s}:{f}")


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
        options=(Option("max-bytes", "size", 0,
                        "bytes the guest may have per period (0: no limit), e.g. 1K"),
                 Option("period", "int", 1000, "the rate limit's period in milliseconds")),
        benchmarks=BENCHMARKS)]


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return virtio_rng_device_types()
