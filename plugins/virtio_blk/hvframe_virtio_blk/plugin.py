"""Device type virtio-blk: `-s N,virtio-blk,PATH[,ro][,sectorsize=L[/P]][,ser=ID][,nocache]
[,direct][,nodelete][,num-queues=N][,queue-size=N]` (bhyve's option names; see
hvframe.block.backend for what nocache and direct mean)."""
from __future__ import annotations

from hvframe.block.backend import BLOCK_OPTIONS, BLOCK_POSITIONAL, open_from_options
from hvframe.device import DeviceType, Option
from hvframe.errors import ConfigError
from hvframe.hookspecs import hookimpl
from hvframe.virtio.pci import MAX_QUEUES, VirtioPciFunction

from .virtio_blk import VirtioBlk

QUEUE_SIZES = (16, 32, 64, 128, 256, 512, 1024)


def virtio_blk_factory(machine, options) -> VirtioPciFunction:
    b, s, f = options["pci.address"]
    where = f"virtio-blk at {b}:{s}:{f}"
    nq, qsize = options["num-queues"], options["queue-size"]
    if not 1 <= nq <= MAX_QUEUES - 1:
        raise ConfigError(f"{where}: num-queues={nq} must be 1-{MAX_QUEUES - 1}")
    if qsize not in QUEUE_SIZES:
        raise ConfigError(f"{where}: queue-size={qsize} must be one of "
                          f"{', '.join(map(str, QUEUE_SIZES))}")
    backend = open_from_options(options, where)
    try:
        return VirtioPciFunction(VirtioBlk(backend, num_queues=nq, queue_size=qsize),
                                 name=f"virtio-blk {b}:{s}:{f}")
    except BaseException:
        backend.close()
        raise


def virtio_blk_device_types() -> list[DeviceType]:
    return [DeviceType(
        name="virtio-blk", kind="pci", factory=virtio_blk_factory,
        summary="virtio block device (transitional virtio-pci 1af4:1001) on a raw image",
        options=(*BLOCK_OPTIONS,
                 Option("num-queues", "int", 1, "number of request queues"),
                 Option("queue-size", "int", 256, "descriptors per queue")),
        positional=BLOCK_POSITIONAL)]


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return virtio_blk_device_types()
