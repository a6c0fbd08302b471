"""A stand-in for the kernel's VFIO, for hosts without /dev/vfio: it keeps the rules the
kernel's VFIO documentation gives for the container, group and device file descriptors
(API version, type-1 extension, a viable group set to a container before the IOMMU model,
the IOMMU model before DMA maps and device fds, argsz at least the structure, page-aligned
DMA maps inside this process's guest RAM), records every call, and answers for the device
from a vfio-user server, whose payloads are, by the protocol's definition, the kernel's
structures. Region accesses through the device fd at `index << 40` (vfio-pci's layout)
become REGION_READ/WRITE; SET_IRQS's eventfds are passed on as SCM_RIGHTS."""
from __future__ import annotations

import errno
import struct

from hvframe_passthru import protocol as p
from hvframe_passthru import vfio_kernel as vk
from hvframe_passthru.vfio_user import VfioUserBackend

NAMES = {v: k for k, v in vk.KERNEL_IOCTLS.items()}
REGION_SHIFT = 40
PAGE = 4096


def _err(code, why=""):
    return OSError(code, why or errno.errorcode[code])


class FakeVfio:
    def __init__(self, socket_path: str, *, group: int = 7, device: str = "0000:00:19.0",
                 viable: bool = True, memory=None):
        self.server = VfioUserBackend(socket_path)
        self.group_no, self.device_name, self.viable = group, device, viable
        self.memory = memory                 # the GuestMemory whose mapping may be DMA-mapped
        self.calls: list[str] = []
        self.fds: dict[int, str] = {}        # fake fd -> "container" | "group" | "device"
        self._next = 1000
        self.container_of_group = None
        self.iommu_set = False
        self.dma: list[tuple[int, int]] = []

    def _new(self, kind):
        self._next += 1
        self.fds[self._next] = kind
        return self._next

    def _kind(self, fd, kind):
        if self.fds.get(fd) != kind:
            raise _err(errno.EBADF if fd not in self.fds else errno.ENOTTY)

    # -- VfioHost ----------------------------------------------------------------------------
    def iommu_group(self, sysfs_path):
        self.calls.append("iommu_group")
        if not sysfs_path.endswith(self.device_name):
            raise _err(errno.ENOENT)
        return self.group_no

    def open(self, path):
        self.calls.append(f"open {path}")
        if path == vk.VFIO_DEV:
            return self._new("container")
        if path == f"/dev/vfio/{self.group_no}":
            if "group" in self.fds.values():
                raise _err(errno.EBUSY)      # a group is opened once
            return self._new("group")
        raise _err(errno.ENOENT)

    def close(self, fd):
        self.calls.append(f"close {self.fds.get(fd)}")
        if self.fds.pop(fd, None) is None:
            raise _err(errno.EBADF)

    def ioctl(self, fd, request, arg=0):
        name = NAMES.get(request)
        self.calls.append(name or hex(request))
        if name is None:
            raise _err(errno.ENOTTY)
        return getattr(self, "_" + name[5:].lower())(fd, arg)

    def pread(self, fd, size, offset):
        self._kind(fd, "device")
        region, off = offset >> REGION_SHIFT, offset & ((1 << REGION_SHIFT) - 1)
        return self.server.region_read(region, off, size)

    def pwrite(self, fd, data, offset):
        self._kind(fd, "device")
        region, off = offset >> REGION_SHIFT, offset & ((1 << REGION_SHIFT) - 1)
        self.server.region_write(region, off, data)
        return len(data)

    # -- the ioctls ----------------------------------------------------------------------------
    @staticmethod
    def _arg(buf, st):
        if not isinstance(buf, bytearray) or len(buf) < st.sizeof():
            raise _err(errno.EFAULT)
        head = st.parse(bytes(buf[:st.sizeof()]))
        if head.argsz < st.sizeof() or head.argsz > len(buf):
            raise _err(errno.EINVAL, "argsz")
        return head

    def _get_api_version(self, fd, arg):
        self._kind(fd, "container")
        return vk.VFIO_API_VERSION

    def _check_extension(self, fd, arg):
        self._kind(fd, "container")
        return int(arg == vk.VFIO_TYPE1_IOMMU)

    def _group_get_status(self, fd, buf):
        self._kind(fd, "group")
        self._arg(buf, vk.GroupStatus)
        flags = (vk.GROUP_FLAGS_VIABLE if self.viable else 0) | \
            (vk.GROUP_FLAGS_CONTAINER_SET if self.container_of_group else 0)
        buf[4:8] = struct.pack("<I", flags)
        return 0

    def _group_set_container(self, fd, buf):
        self._kind(fd, "group")
        (container,) = struct.unpack("<i", bytes(buf[:4]))
        self._kind(container, "container")
        if not self.viable or self.container_of_group is not None:
            raise _err(errno.EINVAL if not self.viable else errno.EBUSY)
        self.container_of_group = container
        return 0

    def _set_iommu(self, fd, arg):
        self._kind(fd, "container")
        if self.container_of_group != fd or arg != vk.VFIO_TYPE1_IOMMU or self.iommu_set:
            raise _err(errno.EINVAL)
        self.iommu_set = True
        return 0

    def _iommu_map_dma(self, fd, buf):
        self._kind(fd, "container")
        if not self.iommu_set:
            raise _err(errno.EINVAL)
        m = self._arg(buf, vk.DmaMap)
        if m.flags & ~(vk.DMA_MAP_FLAG_READ | vk.DMA_MAP_FLAG_WRITE) or \
                (m.vaddr | m.iova | m.size) % PAGE or not m.size:
            raise _err(errno.EINVAL)
        base = vk.memory_vaddr(self.memory)
        if not (base <= m.vaddr and m.vaddr + m.size <= base + len(self.memory.buffer)):
            raise _err(errno.EFAULT)         # the kernel could not pin these pages
        if any(m.iova < i + s and i < m.iova + m.size for i, s in self.dma):
            raise _err(errno.EEXIST)
        self.server.call(p.DMA_MAP, p.DmaMap.build(dict(
            argsz=p.DmaMap.sizeof(), flags=p.DMA_READABLE | p.DMA_WRITEABLE,
            offset=m.vaddr - base, address=m.iova, size=m.size)), [self.memory.fd])
        self.dma.append((m.iova, m.size))
        return 0

    def _iommu_unmap_dma(self, fd, buf):
        self._kind(fd, "container")
        u = self._arg(buf, vk.DmaUnmap)
        if (u.iova, u.size) not in self.dma:
            raise _err(errno.EINVAL)
        self.dma.remove((u.iova, u.size))
        return 0

    def _group_get_device_fd(self, fd, buf):
        self._kind(fd, "group")
        if not self.iommu_set:
            raise _err(errno.EINVAL)         # no IOMMU model on the container yet
        if bytes(buf).split(b"\0")[0].decode() != self.device_name:
            raise _err(errno.ENODEV)
        return self._new("device")

    def _device_get_info(self, fd, buf):
        self._kind(fd, "device")
        self._arg(buf, vk.DeviceInfo)
        r = self.server.device_info()
        buf[4:16] = struct.pack("<III", r.flags | vk.DEVICE_FLAGS_PCI, r.num_regions, r.num_irqs)
        return 0

    def _device_get_region_info(self, fd, buf):
        self._kind(fd, "device")
        head = self._arg(buf, vk.RegionInfo)
        r = self.server.call(p.DEVICE_GET_REGION_INFO, bytes(buf[:p.RegionInfo.sizeof()]))
        r.close_fds()
        info = p.RegionInfo.parse(r.payload[:p.RegionInfo.sizeof()])
        buf[:vk.RegionInfo.sizeof()] = vk.RegionInfo.build(dict(
            argsz=head.argsz, flags=info.flags & ~(p.REGION_FLAG_MMAP | p.REGION_FLAG_CAPS),
            index=head.index, cap_offset=0, size=info.size,
            offset=head.index << REGION_SHIFT))
        return 0

    def _device_get_irq_info(self, fd, buf):
        self._kind(fd, "device")
        self._arg(buf, vk.IrqInfo)
        r = self.server.call(p.DEVICE_GET_IRQ_INFO, bytes(buf[:p.IrqInfo.sizeof()]))
        buf[:vk.IrqInfo.sizeof()] = r.payload[:vk.IrqInfo.sizeof()]
        return 0

    def _device_set_irqs(self, fd, buf):
        self._kind(fd, "device")
        head = self._arg(buf, vk.IrqSet)
        data = bytes(buf[vk.IrqSet.sizeof():head.argsz])
        fds = []
        if head.flags & p.IRQ_SET_DATA_EVENTFD:
            if len(data) != 4 * head.count:
                raise _err(errno.EINVAL)
            fds = list(struct.unpack(f"<{head.count}i", data))
            if any(f < 0 for f in fds):
                raise _err(errno.EINVAL)     # (-1 de-assigns; our backend never sends it)
        elif data:
            raise _err(errno.EINVAL)
        self.server.call(p.DEVICE_SET_IRQS, p.IrqSet.build(dict(
            argsz=p.IrqSet.sizeof(), flags=head.flags, index=head.index, start=head.start,
            count=head.count)), fds)
        return 0

    def _device_reset(self, fd, arg):
        self._kind(fd, "device")
        self.server.reset()
        return 0

    def close_server(self):
        self.server.close()
