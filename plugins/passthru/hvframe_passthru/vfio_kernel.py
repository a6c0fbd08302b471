"""The kernel VFIO backend: `-s N,passthru,BUS/SLOT/FUNC` (bhyve's syntax) and
`-s N,passthru,sysfsdev=PATH`.

The ioctl structures (linux/vfio.h) are declared here with construct and their sizes and
offsets checked against the kernel headers by the tests. The sequence the backend follows,
as the kernel's VFIO documentation describes it: open /dev/vfio/vfio (the container), check
VFIO_GET_API_VERSION and VFIO_TYPE1_IOMMU, open /dev/vfio/GROUP (the device's
iommu_group), VFIO_GROUP_GET_STATUS (viable), VFIO_GROUP_SET_CONTAINER, VFIO_SET_IOMMU,
VFIO_IOMMU_MAP_DMA for every guest RAM region, VFIO_GROUP_GET_DEVICE_FD, then the same
device model the vfio-user backend speaks: DEVICE_GET_INFO, GET_REGION_INFO, reads and
writes at the region offsets of the device fd, GET_IRQ_INFO, SET_IRQS, RESET. Everything
above those calls is hvframe_passthru.passthru, shared with the vfio-user backend.

Hosts without /dev/vfio (these development machines among them) are refused in one line.
"""
from __future__ import annotations

import os
import re

from construct import Int32ul, Int64ul, Struct

from hvframe.errors import ConfigError

VFIO_DEV = "/dev/vfio/vfio"
VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
_VFIO_TYPE, _VFIO_BASE = ord(";"), 100


def _io(nr: int) -> int:
    """_IO(VFIO_TYPE, VFIO_BASE + nr): VFIO encodes no size or direction in its numbers."""
    return (_VFIO_TYPE << 8) | (_VFIO_BASE + nr)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_DEVICE_RESET = _io(11)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

GroupStatus = Struct("argsz" / Int32ul, "flags" / Int32ul)
GROUP_FLAGS_VIABLE = 1 << 0
DeviceInfo = Struct("argsz" / Int32ul, "flags" / Int32ul, "num_regions" / Int32ul,
                    "num_irqs" / Int32ul, "cap_offset" / Int32ul, "pad" / Int32ul)
RegionInfo = Struct("argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul,
                    "cap_offset" / Int32ul, "size" / Int64ul, "offset" / Int64ul)
IrqInfo = Struct("argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul, "count" / Int32ul)
IrqSet = Struct("argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul, "start" / Int32ul,
                "count" / Int32ul)              # then data[]: bools or s32 eventfds
DmaMap = Struct("argsz" / Int32ul, "flags" / Int32ul, "vaddr" / Int64ul, "iova" / Int64ul,
                "size" / Int64ul)
DmaUnmap = Struct("argsz" / Int32ul, "flags" / Int32ul, "iova" / Int64ul, "size" / Int64ul)
DMA_MAP_FLAG_READ = 1 << 0
DMA_MAP_FLAG_WRITE = 1 << 1

# For the header check: struct name in linux/vfio.h -> our declaration.
KERNEL_STRUCTS = {
    "vfio_group_status": GroupStatus,
    "vfio_device_info": DeviceInfo,
    "vfio_region_info": RegionInfo,
    "vfio_irq_info": IrqInfo,
    "vfio_irq_set": IrqSet,
    "vfio_iommu_type1_dma_map": DmaMap,
    "vfio_iommu_type1_dma_unmap": DmaUnmap,
}
KERNEL_IOCTLS = {name: value for name, value in list(globals().items())
                 if name.startswith("VFIO_") and name[5:6].isupper() and
                 isinstance(value, int) and value > 0xFF}

_HOST_ADDRESS = re.compile(r"^(\d+)/(\d+)/(\d+)$")


def host_sysfs_path(host: str | None, sysfsdev: str | None, where: str) -> str:
    """The sysfs directory of the host device named by BUS/SLOT/FUNC or sysfsdev=."""
    if sysfsdev:
        return sysfsdev
    m = _HOST_ADDRESS.match(host or "")
    if not m:
        raise ConfigError(f"{where}: {host!r} is not a host device; use BUS/SLOT/FUNC "
                          f"(e.g. 0/25/0), sysfsdev=PATH or vfio-user=PATH")
    b, s, f = (int(x) for x in m.groups())
    if b > 255 or s > 31 or f > 7:
        raise ConfigError(f"{where}: host device {host} out of range")
    return f"/sys/bus/pci/devices/0000:{b:02x}:{s:02x}.{f:x}"


def vfio_available() -> bool:
    return os.path.exists(VFIO_DEV)


def open_host_device(where: str, *, host: str | None, sysfsdev: str | None):
    path = host_sysfs_path(host, sysfsdev, where)
    if not vfio_available():
        raise ConfigError(f"{where}: this host has no {VFIO_DEV} (no VFIO/IOMMU): "
                          f"a host device ({path}) cannot be passed through here")
    # The container/group/device sequence of the module docstring belongs here; no host
    # this was written on has VFIO to run it against.
    raise ConfigError(f"{where}: kernel VFIO passthrough of {path} is not implemented yet")
