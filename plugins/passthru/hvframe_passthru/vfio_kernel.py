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

The host calls themselves (open, ioctl, pread, pwrite, the sysfs iommu_group link) go through
a VfioHost, so the sequence can be driven against a stand-in kernel where there is no VFIO
(plugins/passthru/tests/vfio_fake.py). Hosts without /dev/vfio (these development machines among them) are
refused in one line.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
from typing import Protocol

from construct import Int32ul, Int64ul, Struct

from hvframe.errors import ConfigError

from . import backend as b
from . import protocol as p
from .backend import BackendLost, IoFd

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
GROUP_FLAGS_CONTAINER_SET = 1 << 1
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1
DeviceInfo = Struct("argsz" / Int32ul, "flags" / Int32ul, "num_regions" / Int32ul,
                    "num_irqs" / Int32ul, "cap_offset" / Int32ul)
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


class VfioHost(Protocol):
    """What the backend asks of the host kernel. Every call raises OSError as the syscall
    would."""

    def iommu_group(self, sysfs_path: str) -> int: ...
    def open(self, path: str) -> int: ...
    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        """An ioctl whose argument is an integer, or a buffer the kernel may fill in place."""
    def pread(self, fd: int, size: int, offset: int) -> bytes: ...
    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...
    def close(self, fd: int) -> None: ...


class HostVfio:
    """The real kernel."""

    def iommu_group(self, sysfs_path: str) -> int:
        return int(os.path.basename(os.readlink(os.path.join(sysfs_path, "iommu_group"))))

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, arg: int | bytearray = 0) -> int:
        return fcntl.ioctl(fd, request, arg, True) if isinstance(arg, bytearray) \
            else fcntl.ioctl(fd, request, arg)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def close(self, fd: int) -> None:
        os.close(fd)


def vfio_available() -> bool:
    return os.path.exists(VFIO_DEV)


def _buf(st: Struct, **fields) -> bytearray:
    """An ioctl argument: the structure with argsz set to its own size."""
    return bytearray(st.build(dict(argsz=st.sizeof(), **fields)))


def memory_vaddr(memory) -> int:
    """Where guest RAM (a GuestMemory) is mapped in this process: what the IOMMU pins."""
    from hvframe.core_native import ffi
    return int(ffi.cast("uintptr_t", ffi.from_buffer(memory.buffer)))


class VfioKernelBackend:
    """A host PCI device through kernel VFIO (type-1 IOMMU), as a DeviceBackend."""

    def __init__(self, sysfs_path: str, *, host: VfioHost | None = None):
        self.host = host or HostVfio()
        self.sysfs_path = sysfs_path
        self.name = os.path.basename(os.path.normpath(sysfs_path))
        self.description = f"vfio {self.name}"
        self.container = self.group = self.device = -1
        self._offsets: dict[int, int] = {}         # region index -> offset in the device fd
        self._dma: list[tuple[int, int]] = []      # (iova, size) mapped
        try:
            self._open()
        except OSError as e:
            self.close()
            raise ConfigError(f"{self.description}: {e.strerror or e}") from None

    def _open(self) -> None:
        h = self.host
        group = h.iommu_group(self.sysfs_path)
        self.container = h.open(VFIO_DEV)
        if h.ioctl(self.container, VFIO_GET_API_VERSION) != VFIO_API_VERSION:
            raise OSError(errno.EINVAL, "unknown VFIO API version")
        if not h.ioctl(self.container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU):
            raise OSError(errno.EINVAL, "the type-1 IOMMU is not supported")
        self.group = h.open(f"/dev/vfio/{group}")
        status = _buf(GroupStatus, flags=0)
        h.ioctl(self.group, VFIO_GROUP_GET_STATUS, status)
        if not GroupStatus.parse(status).flags & GROUP_FLAGS_VIABLE:
            raise OSError(errno.EBUSY, f"IOMMU group {group} is not viable (bind all its "
                                       f"devices to vfio-pci)")
        h.ioctl(self.group, VFIO_GROUP_SET_CONTAINER,
                bytearray(struct.pack("<i", self.container)))
        h.ioctl(self.container, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU)
        self.device = h.ioctl(self.group, VFIO_GROUP_GET_DEVICE_FD,
                              bytearray(self.name.encode() + b"\0"))
        info = _buf(DeviceInfo, flags=0, num_regions=0, num_irqs=0, cap_offset=0)
        h.ioctl(self.device, VFIO_DEVICE_GET_INFO, info)
        info = DeviceInfo.parse(info)
        if not info.flags & DEVICE_FLAGS_PCI:
            raise OSError(errno.ENODEV, "not a PCI device")
        self.resettable = bool(info.flags & DEVICE_FLAGS_RESET)
        self.num_regions, self.num_irqs = info.num_regions, info.num_irqs

    # -- the device (hvframe_passthru.backend.DeviceBackend) ------------------------------------
    def _lost(self, what: str, e: OSError):
        return BackendLost(f"{self.description}: {what}: {e.strerror or e}")

    def _region(self, index: int):
        if index >= self.num_regions:
            return None
        buf = _buf(RegionInfo, flags=0, index=index, cap_offset=0, size=0, offset=0)
        try:
            self.host.ioctl(self.device, VFIO_DEVICE_GET_REGION_INFO, buf)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return None
            raise self._lost("region info", e) from None
        info = RegionInfo.parse(buf)
        self._offsets[index] = info.offset
        return info

    def region_info(self, index: int) -> b.RegionInfo:
        info = self._region(index)
        if info is None:
            return b.RegionInfo(index, 0, False, False)
        return b.RegionInfo(index, info.size, bool(info.flags & p.REGION_FLAG_READ),
                            bool(info.flags & p.REGION_FLAG_WRITE))

    def _offset(self, index: int) -> int:
        if index not in self._offsets and self._region(index) is None:
            raise p.RemoteError(p.REGION_READ, errno.EINVAL)
        return self._offsets[index]

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        base = self._offset(index)
        try:
            data = self.host.pread(self.device, size, base + offset)
        except OSError as e:
            raise self._lost("region read", e) from None
        if len(data) != size:
            raise BackendLost(f"{self.description}: short region read")
        return data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        base = self._offset(index)
        try:
            n = self.host.pwrite(self.device, bytes(data), base + offset)
        except OSError as e:
            raise self._lost("region write", e) from None
        if n != len(data):
            raise BackendLost(f"{self.description}: short region write")

    def region_io_fds(self, index: int) -> list[IoFd]:
        return []            # a host device's doorbells are in its BARs: trapped (or mmapped)

    def irq_info(self, index: int) -> b.IrqInfo:
        if index >= self.num_irqs:
            return b.IrqInfo(index, 0, False, False)
        buf = _buf(IrqInfo, flags=0, index=index, count=0)
        try:
            self.host.ioctl(self.device, VFIO_DEVICE_GET_IRQ_INFO, buf)
        except OSError as e:
            raise self._lost("irq info", e) from None
        info = IrqInfo.parse(buf)
        return b.IrqInfo(index, info.count, bool(info.flags & p.IRQ_INFO_MASKABLE),
                         bool(info.flags & p.IRQ_INFO_AUTOMASKED))

    def _set_irqs(self, flags: int, index: int, start: int, count: int, data: bytes = b""):
        buf = bytearray(IrqSet.build(dict(argsz=IrqSet.sizeof() + len(data), flags=flags,
                                          index=index, start=start, count=count)) + data)
        try:
            self.host.ioctl(self.device, VFIO_DEVICE_SET_IRQS, buf)
        except OSError as e:
            raise p.RemoteError(p.DEVICE_SET_IRQS, e.errno or errno.EIO) from None

    def set_irq_eventfds(self, index: int, fds: list[int]) -> None:
        if fds:
            self._set_irqs(p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, index, 0,
                           len(fds), struct.pack(f"<{len(fds)}i", *fds))
        else:
            self._set_irqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, index, 0, 0)

    def set_irq_eventfd(self, index: int, vector: int, fd: int) -> None:
        self._set_irqs(p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, index, vector, 1,
                       struct.pack("<i", fd))

    def unmask_intx(self) -> None:
        self._set_irqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK, p.PCI_INTX_IRQ, 0, 1)

    def dma_map_all(self, memory) -> None:
        base = memory_vaddr(memory)
        for r in memory.regions:
            buf = _buf(DmaMap, flags=DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
                       vaddr=base + r.host_offset, iova=r.gpa, size=r.size)
            try:
                self.host.ioctl(self.container, VFIO_IOMMU_MAP_DMA, buf)
            except OSError as e:
                raise ConfigError(f"{self.description}: DMA map of guest RAM at "
                                  f"{r.gpa:#x}: {e.strerror or e}") from None
            self._dma.append((r.gpa, r.size))

    def reset(self) -> None:
        if not self.resettable:
            return
        try:
            self.host.ioctl(self.device, VFIO_DEVICE_RESET)
        except OSError as e:
            raise self._lost("reset", e) from None

    def check_alive(self) -> None:
        pass                 # a host device does not go away under us

    def reconnect(self) -> bool:
        return True

    def close(self) -> None:
        for iova, size in self._dma:
            try:
                self.host.ioctl(self.container, VFIO_IOMMU_UNMAP_DMA,
                                _buf(DmaUnmap, flags=0, iova=iova, size=size))
            except OSError:
                pass         # closing the container unmaps everything anyway
        self._dma = []
        for attr in ("device", "group", "container"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                self.host.close(fd)


def open_host_device(where: str, *, host: str | None, sysfsdev: str | None):
    """The PassthruFunction of a host device through the kernel's VFIO."""
    from .passthru import open_function
    path = host_sysfs_path(host, sysfsdev, where)
    if not vfio_available():
        raise ConfigError(f"{where}: this host has no {VFIO_DEV} (no VFIO/IOMMU): "
                          f"a host device ({path}) cannot be passed through here")
    try:
        backend = VfioKernelBackend(path, host=HostVfio())
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return open_function(backend, where, f"passthru {where.rpartition(' ')[2]}")
