"""Device type virtio-blk: `-s N,virtio-blk,PATH[,ro][,sectorsize=L[/P]][,ser=ID][,nocache]
[,direct][,nodelete][,num-queues=N][,queue-size=N]` (bhyve's option names; see
hvframe.block.backend for what nocache and direct mean)."""
from __future__ import annotations

from dataclasses import dataclass

from hvframe.block.backend import BlockOptions, open_from_options
from hvframe.device import DeviceType, PciAddress, PciOptions, option
from hvframe.hookspecs import hookimpl
from hvframe.virtio.pci import MAX_QUEUES, VirtioPciFunction

from .virtio_blk import VirtioBlk

QUEUE_SIZES = (16, 32, 64, 128, 256, 512, 1024)


@dataclass
class VirtioBlkOptions(PciOptions, BlockOptions):
    num_queues: int = option(1, help="number of request queues", min=1, max=MAX_QUEUES - 1)
    queue_size: int = option(256, unit="descriptors", help="descriptors per queue: "
                             + ", ".join(map(str, QUEUE_SIZES)))

    def check(self) -> None:
        if self.queue_size not in QUEUE_SIZES:
            raise ValueError(f"queue-size={self.queue_size} must be one of "
                             f"{', '.join(map(str, QUEUE_SIZES))}")


def virtio_blk_factory(machine, options: VirtioBlkOptions, address: PciAddress) -> VirtioPciFunction:
    where = f"virtio-blk at {address}"
    backend = open_from_options(options, where)
    try:
        return VirtioPciFunction(VirtioBlk(backend, num_queues=options.num_queues,
                                           queue_size=options.queue_size),
                                 name=f"virtio-blk {address}")
    except BaseException:
        backend.close()
        raise


def virtio_blk_device_types() -> list[DeviceType]:
    return [DeviceType(
        name="virtio-blk", kind="pci", factory=virtio_blk_factory,
        summary="virtio block device (transitional virtio-pci 1af4:1001) on a raw image",
        options=VirtioBlkOptions,
        examples=("-s 2,virtio-blk,disk.img", "-s 2,virtio-blk,disk.img,ro,ser=DISK1",
                  "-s 2,virtio-blk,disk.img,sectorsize=512/4096,num-queues=2,queue-size=1024"))]


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return virtio_blk_device_types()
