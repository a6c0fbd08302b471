"""`hvframe serve-device`: one hvframe PCI device run as a vfio-user server in a process of
its own.

    hvframe serve-device -s virtio-blk,disk.img --socket /run/vblk.sock

The device (any PCI device plugin, with the options it takes after `-s N,NAME,`) sits alone
on the PCI bus of a ServerMachine: a synthetic machine whose guest memory is the client's DMA
regions (DmaMemory), whose BARs are placed and decoded internally (the client places the
guest's view of them), and whose interrupts go out through the eventfds the client hands
over with DEVICE_SET_IRQS:

* MSI-X and MSI: the device's own capability is switched on by the server, each vector's
  table entry programmed with a marker message naming the vector, and the irqfd the device
  fires for it is made, by dup2(), the very eventfd the client gave for that vector. The
  device's data path (its native queue workers) therefore writes the client's eventfd (a KVM
  irqfd, or the client's relay) without passing through this process's socket loop. Vectors
  with no eventfd are masked, so their interrupts go pending and are sent when one arrives.
* INTx: a rising edge signals the client's eventfd and masks the line (VFIO's automasked
  INTx); the client's UNMASK re-arms it, signalling again at once if the line is still up.

Doorbells: the device's ioeventfds are handed to the client with
DEVICE_GET_REGION_IO_FDS (offset in the BAR, size, datamatch), so a client on KVM can bind
them with KVM_IOEVENTFD and a queue kick reaches the device's worker without any message.

The guest's configuration writes arrive through the config region: BAR and ROM registers
are the client's business and are dropped here, the command register's I/O and memory
decode bits are kept on (the BARs are always decoded inside the server); everything else
reaches the device. One client at a time; when it goes, its DMA regions are unmapped, its
eventfds closed and the device reset, and the next client is accepted.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import socket
import sys
from typing import Protocol, runtime_checkable

from hvframe.errors import ConfigError, HvError
from hvframe.machine import MsiIrqFd
from hvframe.pci.config_space import (BAR_OFFSETS, CMD_IO, CMD_MEMORY, COMMAND_OFFSET,
                                      ROM_OFFSET)
from hvframe.pci.device import PciFunction
from hvframe.pci.msi import (ENTRY_MASKED, MSI_ADDR_HI, MSI_ADDR_LO, MSI_CONTROL, MSI_DATA,
                             MSI_ENABLE, MSI_MASK, MSIX_CONTROL, MSIX_ENABLE, MSIX_ENTRY_SIZE)
from hvframe.synthetic import SyntheticMachine

from . import protocol as p
from .dmamem import DmaMemory

log = logging.getLogger(__name__)

# Marker messages the server programs into its device's MSI-X table and MSI capability:
# the irqfd a vector's message is routed to says, by its message, which vector it is.
MSIX_MARKER = 0xFEE00000
MSI_MARKER = 0xFEE01000
CONFIG_SIZE = 256          # conventional config space; extended space is not served


@runtime_checkable
class ResettableFunction(Protocol):
    """A PCI function with a device reset of its own (virtio's status 0, AHCI's GHC.HR):
    what VFIO_USER_DEVICE_RESET runs."""

    def reset(self) -> None: ...


class ForwardedIrqFd(MsiIrqFd):
    """An irqfd of the server's device whose eventfd is, by dup2(), the client's eventfd for
    the vector its message names (or a private sink while the client gave none)."""

    def set_message(self, address, data=0) -> None:
        super().set_message(address, data)
        self.machine.route_irqfd(self)


class ServerMachine(SyntheticMachine):
    """The machine a served device lives in (see the module docstring)."""

    def __init__(self):
        super().__init__(memory_size=4096, irqfd_eventfds=True)
        self.memory.close()
        self.memory = DmaMemory(p.MAX_DMA_MAPS)
        self.ioeventfds: list = []
        self.forwarded: list[ForwardedIrqFd] = []
        # Client eventfds by interrupt index and vector (this process owns them).
        self.client_fds: dict[int, dict[int, int]] = {p.PCI_INTX_IRQ: {}, p.PCI_MSI_IRQ: {},
                                                      p.PCI_MSIX_IRQ: {}}
        self.intx_level = 0
        self.intx_masked = False

    # -- what the device asks of its machine ------------------------------------------------
    def add_ioeventfd(self, space, addr, length, datamatch=None):
        ev = super().add_ioeventfd(space, addr, length, datamatch)
        self.ioeventfds.append(ev)
        return ev

    def add_msi_irqfd(self, address=None, data=0):
        irq = ForwardedIrqFd(self, address, data)
        with self._irqfds_lock:
            self._irqfds.append(irq)
        self.forwarded.append(irq)
        self.route_irqfd(irq)
        return irq

    def irq_source(self, line):
        # The device's INTx pin (the only line a lone PCI function drives).
        return self.set_intx

    # -- interrupts out ----------------------------------------------------------------------
    def route_irqfd(self, irq: ForwardedIrqFd) -> None:
        if irq.fd < 0:
            return
        msg = irq.message
        target = None
        if msg is not None:
            if msg[0] == MSIX_MARKER:
                target = self.client_fds[p.PCI_MSIX_IRQ].get(msg[1])
            elif msg[0] == MSI_MARKER:
                target = self.client_fds[p.PCI_MSI_IRQ].get(0)
        if target is None:
            sink = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            os.dup2(sink, irq.fd, inheritable=False)
            os.close(sink)
        else:
            os.dup2(target, irq.fd, inheritable=False)

    def route_all(self) -> None:
        for irq in self.forwarded:
            self.route_irqfd(irq)

    def route_msix(self, vectors) -> None:
        """Reroute the irqfds whose messages name these MSI-X vectors (a vector whose
        eventfd was taken away must stop signalling the old one at once)."""
        vectors = set(vectors)
        for irq in self.forwarded:
            msg = irq.message
            if msg is not None and msg[0] == MSIX_MARKER and msg[1] in vectors:
                self.route_irqfd(irq)

    def set_intx(self, level: int) -> None:
        rising = level and not self.intx_level
        self.intx_level = 1 if level else 0
        if rising and not self.intx_masked:
            self._signal_intx()

    def _signal_intx(self) -> None:
        fd = self.client_fds[p.PCI_INTX_IRQ].get(0)
        if fd is not None:
            self.intx_masked = True          # automasked until the client unmasks
            os.eventfd_write(fd, 1)

    def unmask_intx(self) -> None:
        self.intx_masked = False
        if self.intx_level:
            self._signal_intx()

    def set_client_fd(self, index: int, vector: int, fd: int | None) -> None:
        old = self.client_fds[index].pop(vector, None)
        if fd is not None:
            self.client_fds[index][vector] = fd
        if old is not None and old != fd:
            os.close(old)

    def drop_client_fds(self) -> None:
        for index in self.client_fds:
            for v in list(self.client_fds[index]):
                self.set_client_fd(index, v, None)
        self.route_all()


class DeviceServer:
    """Serves one PciFunction, on its ServerMachine, to one vfio-user client at a time."""

    def __init__(self, machine: ServerMachine, fn: PciFunction):
        self.machine = machine
        self.fn = fn
        self.bus = machine.pci
        self.conn: p.Connection | None = None
        self.negotiated = False
        self.caps: dict = {}
        self.max_xfer = p.MAX_DATA_XFER
        self._handlers = {
            p.VERSION: self._version,
            p.DMA_MAP: self._dma_map,
            p.DMA_UNMAP: self._dma_unmap,
            p.DEVICE_GET_INFO: self._device_info,
            p.DEVICE_GET_REGION_INFO: self._region_info,
            p.DEVICE_GET_REGION_IO_FDS: self._region_io_fds,
            p.DEVICE_GET_IRQ_INFO: self._irq_info,
            p.DEVICE_SET_IRQS: self._set_irqs,
            p.REGION_READ: self._region_read,
            p.REGION_WRITE: self._region_write,
            p.REGION_WRITE_MULTI: self._region_write_multi,
            p.DEVICE_RESET: self._reset,
        }

    # -- one client ---------------------------------------------------------------------------
    def serve(self, sock: socket.socket) -> str:
        """Serve a connected client until it goes; returns why it ended."""
        self.conn = conn = p.Connection(sock)
        self.negotiated = False
        try:
            while True:
                try:
                    msg = conn.recv()
                except p.ProtocolError as e:
                    return str(e)
                try:
                    self.handle(msg)
                except p.ProtocolError as e:
                    return str(e)
        finally:
            self.disconnect()

    def disconnect(self) -> None:
        """The client is gone: nothing of it stays (memory, eventfds), the device is reset."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self._device_reset()
        self.machine.drop_client_fds()
        self.machine.memory.unmap_all()

    def handle(self, msg: p.Message) -> None:
        """Answer one message: a reply, or an error reply; never an exception but for the
        connection itself failing (ProtocolError)."""
        conn = self.conn
        if msg.is_reply or msg.flags & p.TYPE_MASK not in (p.TYPE_COMMAND, p.TYPE_REPLY):
            msg.close_fds()      # we send no commands, so no reply is expected: dropped
            return
        try:
            handler = self._handlers.get(msg.command)
            if handler is None:
                raise p.CommandError(errno.ENOSYS, f"command {msg.command} not supported")
            if msg.fds and msg.command not in p.FD_COMMANDS:
                raise p.CommandError(errno.EINVAL, "file descriptors with a command that "
                                                   "takes none")
            if msg.command != p.VERSION and not self.negotiated:
                raise p.CommandError(errno.EINVAL, "VERSION must come first")
            want = p.REQUEST_SIZES.get(msg.command)
            if want is not None and len(msg.payload) != want:
                raise p.CommandError(errno.EINVAL, f"payload of {len(msg.payload)} bytes, "
                                                   f"expected {want}")
            payload, fds = handler(msg)
        except p.CommandError as e:
            msg.close_fds()
            log.debug("%s: %s", p.COMMAND_NAMES.get(msg.command, msg.command), e)
            conn.reply_error(msg, e.errno)
            return
        except (HvError, OSError, ValueError) as e:    # a device or host failure: an error
            msg.close_fds()
            log.warning("%s failed: %s", p.COMMAND_NAMES.get(msg.command, msg.command), e)
            conn.reply_error(msg, getattr(e, "errno", None) or errno.EIO)
            return
        msg.close_fds()          # handlers keep what they need by taking it out of msg.fds
        conn.reply(msg, payload, fds)

    # -- commands --------------------------------------------------------------------------------
    def _version(self, msg):
        if self.negotiated:
            raise p.CommandError(errno.EINVAL, "VERSION already negotiated")
        major, minor, caps = p.parse_version(msg.payload)
        if major != p.PROTOCOL_MAJOR:
            raise p.CommandError(errno.ENOTSUP, f"protocol major {major} not supported")
        ours = p.negotiate_caps(caps)
        self.caps, self.max_xfer = ours, ours["max_data_xfer_size"]
        self.negotiated = True
        reply = p.VersionHead.build(dict(major=p.PROTOCOL_MAJOR,
                                         minor=min(minor, p.PROTOCOL_MINOR)))
        import json
        return reply + json.dumps({"capabilities": ours}).encode() + b"\0", ()

    def _dma_map(self, msg):
        req = p.parse(p.DmaMap, msg.payload)
        if req.argsz != p.DmaMap.sizeof() or req.flags & ~(p.DMA_READABLE | p.DMA_WRITEABLE):
            raise p.CommandError(errno.EINVAL, "bad DMA_MAP argsz or flags")
        if len(msg.fds) != 1:
            # Regions without a descriptor would need DMA_READ/WRITE round trips per access.
            raise p.CommandError(errno.ENOTSUP if not msg.fds else errno.EINVAL,
                                 "DMA regions must come with exactly one file descriptor")
        self.machine.memory.map(msg.fds[0], req.offset, req.address, req.size,
                                bool(req.flags & p.DMA_WRITEABLE))
        return b"", ()

    def _dma_unmap(self, msg):
        req = p.parse(p.DmaUnmap, msg.payload)
        if req.flags & p.DMA_UNMAP_GET_DIRTY_BITMAP or req.flags & ~p.DMA_UNMAP_ALL:
            raise p.CommandError(errno.ENOTSUP, "dirty page tracking is not supported")
        mem = self.machine.memory
        if req.flags & p.DMA_UNMAP_ALL:
            if req.address or req.size:
                raise p.CommandError(errno.EINVAL, "UNMAP_ALL with an address")
            mem.unmap_all()
        else:
            mem.unmap(req.address, req.size)
        return msg.payload, ()

    def _device_info(self, msg):
        return p.DeviceInfo.build(dict(argsz=p.DeviceInfo.sizeof(),
                                       flags=p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET,
                                       num_regions=p.PCI_NUM_REGIONS,
                                       num_irqs=p.PCI_NUM_IRQS)), ()

    def region_size(self, index: int) -> int:
        if index < 6:
            bar = self.fn.bars[index]
            return bar.size if bar is not None else 0
        if index == p.PCI_ROM_REGION:
            return self.fn.rom.size if self.fn.rom is not None else 0
        if index == p.PCI_CONFIG_REGION:
            return CONFIG_SIZE
        return 0

    def _region_info(self, msg):
        req = p.parse(p.RegionInfo, msg.payload)
        if req.index >= p.PCI_NUM_REGIONS:
            raise p.CommandError(errno.EINVAL, f"no region {req.index}")
        size = self.region_size(req.index)
        flags = 0
        if size:
            flags = p.REGION_FLAG_READ | (0 if req.index == p.PCI_ROM_REGION
                                          else p.REGION_FLAG_WRITE)
        return p.RegionInfo.build(dict(argsz=p.RegionInfo.sizeof(), flags=flags,
                                       index=req.index, cap_offset=0, size=size,
                                       offset=0)), ()

    def _region_io_fds(self, msg):
        req = p.parse(p.RegionIoFdsRequest, msg.payload)
        if req.index >= 6 or self.fn.bars[req.index] is None:
            raise p.CommandError(errno.EINVAL, f"region {req.index} has no doorbells")
        bar = self.fn.bars[req.index]
        subs, fds = [], []
        for ev in self.machine.ioeventfds:
            if bar.mapped_at is None or ev.addr is None or ev.fd < 0:
                continue
            if ev.space != bar.space or not bar.mapped_at <= ev.addr < bar.mapped_at + bar.size:
                continue
            flags = (p.IOEVENTFD_FLAG_DATAMATCH if ev.datamatch is not None else 0) | \
                (p.IOEVENTFD_FLAG_PIO if ev.space == "pio" else 0)
            subs.append(dict(offset=ev.addr - bar.mapped_at, size=ev.length,
                             fd_index=len(fds), type=p.IO_FD_TYPE_IOEVENTFD, flags=flags,
                             padding=0, datamatch=ev.datamatch or 0))
            fds.append(ev.fd)
        if len(fds) > self.caps.get("max_msg_fds", 1):
            raise p.CommandError(errno.ENOSPC, f"{len(fds)} descriptors; the client takes "
                                               f"{self.caps.get('max_msg_fds', 1)}")
        head = p.RegionIoFdsRequest.build(dict(
            argsz=p.RegionIoFdsRequest.sizeof() + p.SubRegionIoFd.sizeof() * len(subs),
            flags=0, index=req.index, count=len(subs)))
        return head + b"".join(p.SubRegionIoFd.build(s) for s in subs), fds

    def irq_count(self, index: int) -> int:
        if index == p.PCI_INTX_IRQ:
            return 1 if self.fn.pin else 0
        if index == p.PCI_MSI_IRQ:
            return 1 if self.fn.msi is not None else 0
        if index == p.PCI_MSIX_IRQ:
            return self.fn.msix.vectors if self.fn.msix is not None else 0
        return 0

    def _irq_info(self, msg):
        req = p.parse(p.IrqInfo, msg.payload)
        if req.index >= p.PCI_NUM_IRQS:
            raise p.CommandError(errno.EINVAL, f"no interrupt index {req.index}")
        flags = p.IRQ_INFO_EVENTFD
        if req.index == p.PCI_INTX_IRQ:
            flags |= p.IRQ_INFO_MASKABLE | p.IRQ_INFO_AUTOMASKED
        elif req.index in (p.PCI_MSI_IRQ, p.PCI_MSIX_IRQ):
            flags |= p.IRQ_INFO_MASKABLE
        return p.IrqInfo.build(dict(argsz=p.IrqInfo.sizeof(), flags=flags, index=req.index,
                                    count=self.irq_count(req.index))), ()

    def _set_irqs(self, msg):
        req = p.parse(p.IrqSet, msg.payload, exact=False)
        data_flags = req.flags & p.IRQ_SET_DATA_MASK
        action = req.flags & p.IRQ_SET_ACTION_MASK_ALL
        if req.flags & ~(p.IRQ_SET_DATA_MASK | p.IRQ_SET_ACTION_MASK_ALL) or \
                bin(data_flags).count("1") != 1 or bin(action).count("1") != 1:
            raise p.CommandError(errno.EINVAL, "SET_IRQS needs one DATA and one ACTION flag")
        if req.argsz != len(msg.payload):
            raise p.CommandError(errno.EINVAL, "SET_IRQS argsz is not the payload size")
        index, start, count = req.index, req.start, req.count
        total = self.irq_count(index) if index < p.PCI_NUM_IRQS else 0
        extra = msg.payload[p.IrqSet.sizeof():]
        if data_flags == p.IRQ_SET_DATA_BOOL:
            if len(extra) != count:
                raise p.CommandError(errno.EINVAL, "SET_IRQS bools do not match count")
            chosen = [v for i, v in enumerate(range(start, start + count)) if extra[i]]
        else:
            if extra:
                raise p.CommandError(errno.EINVAL, "SET_IRQS data with DATA_NONE/EVENTFD")
            chosen = list(range(start, start + count))
        if data_flags == p.IRQ_SET_DATA_EVENTFD:
            if msg.fds and len(msg.fds) != count:
                raise p.CommandError(errno.EINVAL, f"{len(msg.fds)} eventfds for {count} "
                                                   f"vectors")
        elif msg.fds:
            raise p.CommandError(errno.EINVAL, "eventfds without DATA_EVENTFD")
        if index >= p.PCI_NUM_IRQS:
            raise p.CommandError(errno.EINVAL, f"no interrupt index {index}")
        if not (data_flags == p.IRQ_SET_DATA_NONE and start == 0 and count == 0) and \
                (count == 0 or start + count > total):
            raise p.CommandError(errno.EINVAL, f"vectors {start}+{count} of {total}")
        if index not in (p.PCI_INTX_IRQ, p.PCI_MSI_IRQ, p.PCI_MSIX_IRQ):
            raise p.CommandError(errno.EINVAL, f"interrupt index {index} has no vectors")
        m = self.machine
        if action == p.IRQ_SET_ACTION_TRIGGER and data_flags == p.IRQ_SET_DATA_EVENTFD:
            fds, msg.fds = msg.fds, []
            for i, v in enumerate(range(start, start + count)):
                m.set_client_fd(index, v, fds[i] if fds else None)
            self._interrupts_changed(index, chosen)
        elif action == p.IRQ_SET_ACTION_TRIGGER and count == 0:
            for v in list(m.client_fds[index]):           # DATA_NONE, 0+0: all off
                m.set_client_fd(index, v, None)
            self._interrupts_changed(index)
        elif action == p.IRQ_SET_ACTION_TRIGGER:
            for v in chosen:                              # the client fires the vector
                fd = m.client_fds[index].get(v)
                if fd is not None:
                    os.eventfd_write(fd, 1)
        elif index == p.PCI_INTX_IRQ:
            if action == p.IRQ_SET_ACTION_UNMASK and chosen:
                m.unmask_intx()
            elif action == p.IRQ_SET_ACTION_MASK and chosen:
                m.intx_masked = True
        else:
            self._mask_vectors(index, chosen, action == p.IRQ_SET_ACTION_MASK)
        return b"", ()

    def _interrupts_changed(self, index: int, vectors=None) -> None:
        """Bring the device's own MSI/MSI-X state in line with the client's eventfds.
        vectors: the MSI-X vectors whose eventfds changed (None: all). Only those are
        reprogrammed and rerouted: rewriting the others would unmask a vector the client
        masked (SET_IRQS MASK) and shut every gate a queue worker fires through."""
        m, fn = self.machine, self.fn
        fds = m.client_fds[index]
        if index == p.PCI_MSIX_IRQ and fn.msix is not None:
            x = fn.msix
            vectors = range(x.vectors) if vectors is None else vectors
            for v in vectors:
                base = x.table_offset + v * MSIX_ENTRY_SIZE
                if x.message(v) != (MSIX_MARKER, v):
                    x.bar_write(base + 0, 4, MSIX_MARKER)
                    x.bar_write(base + 4, 4, 0)
                    x.bar_write(base + 8, 4, v)
                x.bar_write(base + 12, 4, 0 if v in fds else ENTRY_MASKED)
            if x.enabled != bool(fds):
                self._cfg_write(x.offset + MSIX_CONTROL, 2, MSIX_ENABLE if fds else 0)
            m.route_msix(vectors)
            return
        if index == p.PCI_MSI_IRQ and fn.msi is not None:
            o = fn.msi.offset
            self._cfg_write(o + MSI_ADDR_LO, 4, MSI_MARKER)
            self._cfg_write(o + MSI_ADDR_HI, 4, 0)
            self._cfg_write(o + MSI_DATA, 2, 0)
            self._cfg_write(o + MSI_MASK, 4, 0 if fds else 1)
            self._cfg_write(o + MSI_CONTROL, 2, MSI_ENABLE if fds else 0)
        elif index == p.PCI_INTX_IRQ:
            m.intx_masked = False
            if fds and m.intx_level:
                m.unmask_intx()
        m.route_all()

    def _mask_vectors(self, index: int, vectors, mask: bool) -> None:
        fn = self.fn
        if index == p.PCI_MSIX_IRQ and fn.msix is not None:
            for v in vectors:
                fn.msix.bar_write(fn.msix.table_offset + v * MSIX_ENTRY_SIZE + 12, 4,
                                  ENTRY_MASKED if mask else 0)
        elif index == p.PCI_MSI_IRQ and fn.msi is not None and vectors:
            self._cfg_write(fn.msi.offset + MSI_MASK, 4, 1 if mask else 0)

    def _cfg_write(self, offset: int, size: int, value: int) -> None:
        self.bus.config_write(0, 0, 0, offset, size, value)

    # -- region accesses ------------------------------------------------------------------------
    def _check_access(self, region: int, offset: int, count: int) -> None:
        if region >= p.PCI_NUM_REGIONS:
            raise p.CommandError(errno.EINVAL, f"no region {region}")
        if count == 0 or count > self.max_xfer:
            raise p.CommandError(errno.EINVAL, f"count {count} outside 1-{self.max_xfer}")
        size = self.region_size(region)
        if offset >= size or count > size - offset:
            raise p.CommandError(errno.EINVAL, f"{offset:#x}+{count} outside region {region} "
                                               f"of {size:#x} bytes")

    def _pieces(self, offset: int, count: int, widest: int):
        """Naturally aligned pieces of at most `widest` bytes covering offset+count."""
        end = offset + count
        while offset < end:
            n = widest
            while n > 1 and (offset % n or offset + n > end):
                n //= 2
            yield offset, n
            offset += n

    def _region_read(self, msg):
        req = p.parse(p.RegionAccess, msg.payload)
        self._check_access(req.region, req.offset, req.count)
        data = bytearray()
        for off, n in self._pieces(req.offset, req.count, self._widest(req.region)):
            data += self._read(req.region, off, n).to_bytes(n, "little")
        return p.RegionAccess.build(dict(offset=req.offset, region=req.region,
                                         count=req.count)) + bytes(data), ()

    def _region_write(self, msg):
        req = p.parse(p.RegionAccess, msg.payload, exact=False)
        data = msg.payload[p.RegionAccess.sizeof():]
        if len(data) != req.count:
            raise p.CommandError(errno.EINVAL, f"count {req.count} but {len(data)} data bytes")
        self._check_access(req.region, req.offset, req.count)
        self._write_bytes(req.region, req.offset, data)
        return p.RegionAccess.build(dict(offset=req.offset, region=req.region,
                                         count=req.count)), ()

    def _region_write_multi(self, msg):
        head = p.parse(p.WriteMultiHead, msg.payload, exact=False)
        n = head.wr_cnt
        esz = p.WriteMultiEntry.sizeof()
        if not 1 <= n <= p.WRITE_MULTI_MAX or len(msg.payload) != p.WriteMultiHead.sizeof() + n * esz:
            raise p.CommandError(errno.EINVAL, "WRITE_MULTI count and size disagree")
        entries = [p.WriteMultiEntry.parse(msg.payload[8 + i * esz:8 + (i + 1) * esz])
                   for i in range(n)]
        for e in entries:                     # all checked before any is done
            if not 1 <= e.count <= 8:
                raise p.CommandError(errno.EINVAL, "WRITE_MULTI entry of more than 8 bytes")
            self._check_access(e.region, e.offset, e.count)
        for e in entries:
            self._write_bytes(e.region, e.offset, e.data[:e.count])
        return p.WriteMultiHead.build(dict(wr_cnt=n)), ()

    def _widest(self, region: int) -> int:
        if region == p.PCI_CONFIG_REGION or (region < 6 and self.fn.bars[region].kind == "io"):
            return 4
        return 8

    def _write_bytes(self, region: int, offset: int, data: bytes) -> None:
        for off, n in self._pieces(offset, len(data), self._widest(region)):
            rel = off - offset
            self._write(region, off, n, int.from_bytes(data[rel:rel + n], "little"))

    def _read(self, region: int, off: int, n: int) -> int:
        fn, m = self.fn, self.machine
        if region == p.PCI_CONFIG_REGION:
            value = self.bus.config_read(0, 0, 0, off, n)
            return self._filter_config_read(off, n, value)
        if region == p.PCI_ROM_REGION:
            return fn.rom.handler.read(off, n)
        bar = fn.bars[region]
        if bar.mapped_at is None:
            return (1 << 8 * n) - 1
        if bar.kind == "io":
            return m.io_read(bar.mapped_at + off, n)
        return m.mmio_read(bar.mapped_at + off, n)

    def _write(self, region: int, off: int, n: int, value: int) -> None:
        fn, m = self.fn, self.machine
        if region == p.PCI_CONFIG_REGION:
            value = self._filter_config_write(off, n, value)
            if value is not None:
                self.bus.config_write(0, 0, 0, off, n, value)
            return
        bar = fn.bars[region]
        if bar is None or bar.mapped_at is None:
            return
        if bar.kind == "io":
            m.io_write(bar.mapped_at + off, n, value)
        else:
            m.mmio_write(bar.mapped_at + off, n, value)

    # BAR and ROM registers: the client's; the server keeps its own placement. Reads show the
    # type bits only.
    _ADDRESS_REGS = [(o, 4) for o in BAR_OFFSETS] + [(ROM_OFFSET, 4)]

    def _filter_config_read(self, off: int, n: int, value: int) -> int:
        for reg, size in self._ADDRESS_REGS:
            if off < reg + size and reg < off + n:
                keep = self._bar_type_bits(reg)
                for i in range(n):
                    b = off + i
                    if reg <= b < reg + size:
                        shift = 8 * i
                        byte = (keep >> 8 * (b - reg)) & 0xFF
                        value = (value & ~(0xFF << shift)) | (byte << shift)
        return value

    def _bar_type_bits(self, reg: int) -> int:
        if reg == ROM_OFFSET:
            return 0
        i = BAR_OFFSETS.index(reg)
        bar = self.fn.bars[i]
        if bar is None:
            upper = i > 0 and self.fn.bars[i - 1] is not None and self.fn.bars[i - 1].kind == "mmio64"
            return 0 if upper else 0
        if bar.kind == "io":
            return 0x1
        return (0x4 if bar.kind == "mmio64" else 0) | (0x8 if bar.prefetchable else 0)

    def _filter_config_write(self, off: int, n: int, value: int):
        for reg, size in self._ADDRESS_REGS:
            if off < reg + size and reg < off + n:
                return None
        if off <= COMMAND_OFFSET < off + n:
            shift = 8 * (COMMAND_OFFSET - off)
            value |= self._decode_bits() << shift
        return value

    def _decode_bits(self) -> int:
        bits = 0
        for bar in self.fn.all_bars():
            bits |= CMD_IO if bar.kind == "io" else CMD_MEMORY
        return bits

    def _reset(self, msg):
        self._device_reset()
        return b"", ()

    def _device_reset(self) -> None:
        if isinstance(self.fn, ResettableFunction):
            self.fn.reset()
        self.machine.intx_level = 0
        self.machine.intx_masked = False


# -- the process -----------------------------------------------------------------------------
def build(registry, spec: str) -> tuple[ServerMachine, PciFunction]:
    """The device of `-s NAME[,conf]` on a ServerMachine of its own."""
    from hvframe.device import PciAddress
    name, _, conf = spec.partition(",")
    where = f"-s {spec}"
    if not name:
        raise ConfigError(f"{where}: missing device name; use -s device[,options]")
    dt = registry.require(name, "pci", where)
    # Through a Config, as the runner does: dotted keys (AHCI's port.N.path) become groups.
    from hvframe.config import Config
    cfg = Config()
    for key, value in dt.parse_conf(conf).items():
        cfg.set(f"device.{key}", value)
    options = dt.validate(cfg.group("device"), where=where)
    m = ServerMachine()
    try:
        fn = dt.create(m, options, PciAddress(0, 0, 0))
        if not isinstance(fn, PciFunction):
            raise ConfigError(f"{where}: {name} is not a PCI function and cannot be served")
        m.pci.assign_bars()
        m.pci.enable_all()
        if fn.rom is not None:
            fn.config.put(ROM_OFFSET, 4, fn.config.get(ROM_OFFSET, 4) | 1)
            m.pci.refresh()
        m.start_devices()
    except BaseException:
        m.close()
        raise
    return m, fn


def listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            s.bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            # A socket file left by a server that died: take it over if nobody answers.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise ConfigError(f"--socket {path}: another server is listening there")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
                s.bind(path)
            finally:
                probe.close()
        s.listen(1)
    except OSError as e:
        s.close()
        raise ConfigError(f"--socket {path}: {e.strerror}") from None
    except BaseException:
        s.close()
        raise
    return s


def make_parser() -> argparse.ArgumentParser:
    from hvframe.cli import _Parser
    ap = _Parser(prog="hvframe serve-device",
                 description="Run one PCI device as a vfio-user server.")
    ap.add_argument("-s", dest="device", required=True, metavar="DEVICE[,CONF]",
                    help="the device and its options, as after -s N, (e.g. virtio-blk,disk.img)")
    ap.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on")
    ap.add_argument("--once", action="store_true", help="exit when the first client goes")
    ap.add_argument("--no-confine", action="store_true",
                    help="run without the Landlock and seccomp restrictions (debugging)")
    return ap


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="hvframe serve-device: %(message)s")
    try:
        from hvframe.plugins import Registry
        registry = Registry(platform=False)
        machine, fn = build(registry, args.device)
    except HvError as e:
        print(f"hvframe serve-device: {e}", file=sys.stderr)
        return 4
    try:
        lsock = listen(args.socket)
    except HvError as e:
        machine.close()
        print(f"hvframe serve-device: {e}", file=sys.stderr)
        return 4
    server = DeviceServer(machine, fn)
    # From here on the process only serves: restricted before any guest input arrives.
    from .confine import confine
    applied = [] if args.no_confine else confine()
    print(f"hvframe serve-device: {fn.name} on {args.socket} "
          f"(confined: {', '.join(applied) or 'no'})", file=sys.stderr, flush=True)
    try:
        while True:
            try:
                conn, _ = lsock.accept()
            except InterruptedError:
                continue
            why = server.serve(conn)
            log.info("client gone: %s", why)
            if args.once:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        lsock.close()
        try:
            os.unlink(args.socket)
        except OSError:
            pass             # (refused once confined: the next server takes the file over)
        machine.close()


__all__ = ["DeviceServer", "ServerMachine", "build", "listen", "main", "select"]
