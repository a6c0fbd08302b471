"""Device type virtio-blk: `-s N,virtio-blk,PATH[,ro][,sectorsize=L[/P]][,ser=ID][,nocache]
[,direct][,nodelete][,num-queues=N][,queue-size=N]` (bhyve's option names; see
hvframe.block.backend for what nocache and direct mean)."""
from __future__ import annotations

import os
import struct

from hvframe.bench import Benchmarks, virtio_path, virtio_registers
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


BENCHMARKS = Benchmarks(registers=virtio_registers(),
                        data_paths=(virtio_path("read 4 KiB, depth 32", _read_4k, depth=32,
                                                bytes_per_op=4096),),
                        defaults=_scratch_image)


def virtio_blk_device_types() -> list[DeviceType]:
    return [DeviceType(
        name="virtio-blk", kind="pci", factory=virtio_blk_factory,
        summary="virtio block device (transitional virtio-pci 1af4:1001) on a raw image",
        options=(*BLOCK_OPTIONS,
                 Option("num-queues", "int", 1, "number of request queues"),
                 Option("queue-size", "int", 256, "descriptors per queue")),
        positional=BLOCK_POSITIONAL, benchmarks=BENCHMARKS)]


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return virtio_blk_device_types()
