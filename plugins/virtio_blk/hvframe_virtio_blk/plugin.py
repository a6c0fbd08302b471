"""Device type virtio-blk: `-s N,virtio-blk,PATH[,ro][,sectorsize=L[/P]][,ser=ID][,nocache]
[,direct][,nodelete][,num-queues=N][,queue-size=N][,aio=io_uring|threads]` (bhyve's option
names, and QEMU's aio=; see hvframe.block.backend for what nocache and direct mean)."""
from __future__ import annotations

import os
import struct

from hvframe.block.backend import BlockOptions, open_from_options
from hvframe.device import DeviceType, PciAddress, PciOptions, option
from hvframe.errors import ConfigError
from hvframe.hookspecs import hookimpl
from hvframe.virtio.pci import MAX_QUEUES, VirtioPciFunction

from .virtio_blk import AIO_MODES, VirtioBlk

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hvframe.bench import Benchmarks

QUEUE_SIZES = (16, 32, 64, 128, 256, 512, 1024)


class VirtioBlkOptions(PciOptions, BlockOptions):
    num_queues: int = option(1, help="number of request queues", min=1, max=MAX_QUEUES - 1)
    queue_size: int = option(256, unit="descriptors", help="descriptors per queue: "
                             + ", ".join(map(str, QUEUE_SIZES)))

    aio: str = option("io_uring", choices=AIO_MODES,
                      help="io_uring: a run of READs in one submission (threads where "
                      "io_uring is unavailable); threads: a preadv each")

    def check(self) -> None:
        if self.queue_size not in QUEUE_SIZES:
            raise ValueError(f"queue-size={self.queue_size} must be one of "
                             f"{', '.join(map(str, QUEUE_SIZES))}")


def virtio_blk_factory(machine, options: VirtioBlkOptions, address: PciAddress) -> VirtioPciFunction:
    where = f"virtio-blk at {address}"
    backend = open_from_options(options, where)
    try:
        return VirtioPciFunction(VirtioBlk(backend, num_queues=options.num_queues,
                                           queue_size=options.queue_size,
                                           aio=options.aio),
                                 name=f"virtio-blk {address}")
    except BaseException:
        backend.close()
        raise


def _scratch_image(scratch: str) -> dict[str, str]:
    """A 64 MiB sparse image for `hvframe bench virtio-blk` when no path is given."""
    path = os.path.join(scratch, "bench.img")
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    return {"path": path}


def _read_4k(memory, base: int, i: int) -> list:
    """Request i of a bench round: READ of 4 KiB at sector 8*i (header, data, status)."""
    memory.write(base, struct.pack("<IIQ", 0, 0, 8 * i))     # VIRTIO_BLK_T_IN
    return [(base, 16, False), (base + 0x1000, 4096, True), (base + 0x3000, 1, True)]


def virtio_blk_benchmarks() -> "Benchmarks":
    """`hvframe bench virtio-blk` (a function: a run does not import hvframe.bench)."""
    from hvframe.bench import Benchmarks, virtio_path, virtio_registers
    return Benchmarks(registers=virtio_registers(),
                      data_paths=(virtio_path("read 4 KiB, depth 32", _read_4k, depth=32,
                                              bytes_per_op=4096),),
                      defaults=_scratch_image)


def virtio_blk_device_types() -> list[DeviceType]:
    return [DeviceType(
        name="virtio-blk", kind="pci", factory=virtio_blk_factory,
        summary="virtio block device (transitional virtio-pci 1af4:1001) on a raw image",
        options=VirtioBlkOptions,
        examples=("-s 2,virtio-blk,disk.img", "-s 2,virtio-blk,disk.img,ro,ser=DISK1",
                  "-s 2,virtio-blk,disk.img,sectorsize=512/4096,num-queues=2,queue-size=1024"),
        benchmarks=virtio_blk_benchmarks)]


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return virtio_blk_device_types()
