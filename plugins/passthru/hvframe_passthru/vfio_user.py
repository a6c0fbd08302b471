"""The vfio-user client backend: `-s N,passthru,vfio-user=PATH`.

Commands go one at a time (a lock around send and receive) and wait for their reply with a
deadline; a server that closes the socket, breaks the protocol or misses the deadline makes
every later call raise BackendLost until reconnect() reaches a server again (which then gets
the version handshake, the DMA map of all guest RAM and the interrupt eventfds afresh).

A deadline bounds a whole exchange (every send and receive waits only for what is left of
it, and only MAX_REFUSED requests of the server's own are refused on the way), so a server
cannot stretch one by pacing its bytes. DEVICE_SET_IRQS has a deadline of its own, shorter:
the MSI-X eventfd changes are sent under the function's MSI-X capability lock (a vCPU masking
a vector, and the device's interrupts, wait on it), and a server answers them at once,
without device work. Behind a slow command it waits while that command is within its own
deadline: slow is not hung (a reset may flush a large image), and a hung one times out.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time

from hvframe.machine import IOEVENTFD_SIZES

from . import protocol as p
from .backend import BackendLost, IoFd, IrqInfo, RegionInfo

REPLY_DEADLINE = 5.0      # seconds a command may wait for its reply
IRQ_REPLY_DEADLINE = 1.0  # seconds DEVICE_SET_IRQS may (see the module docstring)
MAX_REFUSED = 8           # server-to-client requests refused in one exchange before it is lost
CLIENT_CAPS = {"max_msg_fds": p.MAX_FDS, "max_data_xfer_size": p.MAX_DATA_XFER,
               "max_dma_maps": p.MAX_DMA_MAPS, "pgsizes": 4096}


class VfioUserBackend:
    def __init__(self, path: str, *, deadline: float = REPLY_DEADLINE,
                 irq_deadline: float = IRQ_REPLY_DEADLINE):
        self.path = path
        self.description = f"vfio-user={path}"
        self.deadline = deadline
        self.irq_deadline = min(irq_deadline, deadline)
        self.conn: p.Connection | None = None
        self.max_xfer = p.MAX_DATA_XFER
        self.server_caps: dict = {}
        self._lock = threading.Lock()      # one command on the socket at a time (LEAF-like)
        self._busy_until: float | None = None   # the exchange in progress's deadline
        self._memory = None
        self._irq_fds: dict[int, list[int]] = {}
        self.connect()

    # -- connection -----------------------------------------------------------------------------
    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.deadline)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise BackendLost(f"vfio-user={self.path}: {e.strerror or e}") from None
        conn = p.Connection(s)
        try:
            reply = self._call_on(conn, p.VERSION, p.version_payload(CLIENT_CAPS))
            major, minor, caps = p.parse_version(reply.payload)
        except (p.CommandError, p.RemoteError) as e:
            conn.close()
            raise BackendLost(f"vfio-user={self.path}: version negotiation failed: {e}") \
                from None
        if major != p.PROTOCOL_MAJOR or minor > p.PROTOCOL_MINOR:
            conn.close()
            raise BackendLost(f"vfio-user={self.path}: server speaks {major}.{minor}")
        self.server_caps = caps
        self.max_xfer = min(int(caps.get("max_data_xfer_size", p.MAX_DATA_XFER)),
                            p.MAX_DATA_XFER)
        self.conn = conn

    def _call_on(self, conn: p.Connection, command: int, payload: bytes = b"", fds=(),
                 deadline: float | None = None):
        """One exchange, over within `deadline` seconds (the connection's if None) from now,
        however the server paces its bytes or interleaves requests of its own."""
        msg_id = conn.next_id()
        self._busy_until = conn.deadline_at = \
            time.monotonic() + (self.deadline if deadline is None else deadline)
        try:
            conn.send(p.encode(msg_id, command, payload), fds)
            refused = 0
            while True:
                reply = conn.recv()
                if not reply.is_reply:
                    # Server-to-client commands (DMA_READ/WRITE) are not used by our
                    # servers: refuse them and keep waiting for our reply, a few times.
                    reply.close_fds()
                    refused += 1
                    if refused > MAX_REFUSED:
                        raise p.ProtocolError(f"{refused} requests of its own before the "
                                              "reply")
                    conn.reply_error(reply, errno.ENOTSUP)
                    continue
                if reply.msg_id != msg_id or reply.command != command:
                    reply.close_fds()
                    raise p.ProtocolError(f"reply {reply.msg_id}/{reply.command} to "
                                          f"{msg_id}/{command}")
                break
        except p.ProtocolError as e:
            conn.close()
            raise BackendLost(f"vfio-user={self.path}: {e}") from None
        finally:
            conn.deadline_at = self._busy_until = None
        if reply.flags & p.FLAG_ERROR:
            reply.close_fds()
            raise p.RemoteError(command, reply.error)
        return reply

    def call(self, command: int, payload: bytes = b"", fds=(),
             deadline: float | None = None) -> p.Message:
        """One command and its reply (RemoteError for an error reply). With a deadline, a
        wait behind another command lasts while that command is within its own deadline
        (a slow command is not a hung server: its own timeout finds that out and shuts the
        connection), then `deadline` more at most; BackendLost if the socket is still not
        free, the connection left as it is."""
        if deadline is None:
            self._lock.acquire()
        else:
            start = time.monotonic()
            end = start + deadline
            limit = start + self.deadline + deadline
            while not self._lock.acquire(timeout=max(0.0, min(end, limit) - time.monotonic())):
                busy = self._busy_until
                if busy is not None and min(busy + deadline, limit) > end:
                    end = min(busy + deadline, limit)
                    continue
                raise BackendLost(f"vfio-user={self.path}: the socket was not free for "
                                  f"{p.COMMAND_NAMES.get(command, command)} within "
                                  f"{time.monotonic() - start:.1f} s")
        try:
            conn = self.conn
            if conn is None:
                raise BackendLost(f"vfio-user={self.path}: not connected")
            try:
                return self._call_on(conn, command, payload, fds, deadline)
            except BackendLost:
                self.conn = None
                raise
        finally:
            self._lock.release()

    def reconnect(self) -> bool:
        with self._lock:
            if self.conn is not None:
                return True
        try:
            self.connect()
            if self._memory is not None:
                self.dma_map_all(self._memory)
            for index, fds in self._irq_fds.items():
                # MSI-X is handed over again by the function, under its capability's lock
                # (PassthruFunction._rehand_msix): replayed from here, a gate change racing
                # the replay could leave a masked vector on the guest's irqfd.
                if fds and index != p.PCI_MSIX_IRQ:
                    self.set_irq_eventfds(index, fds)
        except (BackendLost, p.RemoteError):
            with self._lock:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
            return False
        return True

    def check_alive(self) -> None:
        """BackendLost if the server hung up (the socket reports HUP), without a message."""
        conn = self.conn
        if conn is None:
            raise BackendLost(f"vfio-user={self.path}: not connected")
        poller = select.poll()
        try:
            poller.register(conn.fileno(), 0)
        except (ValueError, OSError):
            raise BackendLost(f"vfio-user={self.path}: connection closed") from None
        for _, ev in poller.poll(0):
            if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                with self._lock:
                    if self.conn is conn:
                        conn.close()
                        self.conn = None
                raise BackendLost(f"vfio-user={self.path}: the server hung up")

    def close(self) -> None:
        with self._lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

    # -- the device -----------------------------------------------------------------------------
    def device_info(self):
        r = self.call(p.DEVICE_GET_INFO, p.DeviceInfo.build(dict(
            argsz=p.DeviceInfo.sizeof(), flags=0, num_regions=0, num_irqs=0)))
        return self._parse(p.DeviceInfo, r.payload)

    def _parse(self, st, payload: bytes):
        """A reply's payload head; a malformed reply means the server cannot be trusted."""
        try:
            return p.parse(st, payload, exact=False)
        except p.CommandError as e:
            self.close()
            raise BackendLost(f"vfio-user={self.path}: malformed reply: {e}") from None

    def region_info(self, index: int) -> RegionInfo:
        r = self.call(p.DEVICE_GET_REGION_INFO, p.RegionInfo.build(dict(
            argsz=p.RegionInfo.sizeof(), flags=0, index=index, cap_offset=0, size=0, offset=0)))
        r.close_fds()            # no mmap of regions in this client: all accesses are trapped
        info = self._parse(p.RegionInfo, r.payload)
        return RegionInfo(index, info.size, bool(info.flags & p.REGION_FLAG_READ),
                          bool(info.flags & p.REGION_FLAG_WRITE))

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        out = bytearray()
        while size:
            n = min(size, self.max_xfer)
            r = self.call(p.REGION_READ, p.RegionAccess.build(dict(offset=offset, region=index,
                                                                   count=n)))
            head = self._parse(p.RegionAccess, r.payload)
            data = r.payload[p.RegionAccess.sizeof():]
            if head.count != n or len(data) != n:
                raise BackendLost(f"vfio-user={self.path}: short REGION_READ reply")
            out += data
            offset, size = offset + n, size - n
        return bytes(out)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        while data:
            chunk, data = data[:self.max_xfer], data[self.max_xfer:]
            self.call(p.REGION_WRITE, p.RegionAccess.build(dict(
                offset=offset, region=index, count=len(chunk))) + bytes(chunk))
            offset += len(chunk)

    def region_io_fds(self, index: int) -> list[IoFd]:
        try:
            r = self.call(p.DEVICE_GET_REGION_IO_FDS, p.RegionIoFdsRequest.build(dict(
                argsz=p.RegionIoFdsRequest.sizeof(), flags=0, index=index, count=0)))
        except p.RemoteError:
            return []            # optional in the protocol: the region's writes stay trapped
        try:
            head = self._parse(p.RegionIoFdsRequest, r.payload)
            esz = p.SubRegionIoFd.sizeof()
            body = r.payload[p.RegionIoFdsRequest.sizeof():]
            if len(body) != head.count * esz:
                raise p.CommandError(errno.EINVAL, "sub-region array size")
            out = []
            for i in range(head.count):
                s = p.SubRegionIoFd.parse(body[i * esz:(i + 1) * esz])
                if s.type != p.IO_FD_TYPE_IOEVENTFD or s.fd_index >= len(r.fds):
                    continue
                if s.size not in IOEVENTFD_SIZES:
                    continue    # KVM would refuse it: those writes stay trapped (the server's)
                out.append(IoFd(s.offset, s.size, os.dup(r.fds[s.fd_index]),
                                bool(s.flags & p.IOEVENTFD_FLAG_PIO),
                                s.datamatch if s.flags & p.IOEVENTFD_FLAG_DATAMATCH else None))
            return out
        except p.CommandError:
            return []
        finally:
            r.close_fds()

    def irq_info(self, index: int) -> IrqInfo:
        r = self.call(p.DEVICE_GET_IRQ_INFO, p.IrqInfo.build(dict(
            argsz=p.IrqInfo.sizeof(), flags=0, index=index, count=0)))
        info = self._parse(p.IrqInfo, r.payload)
        return IrqInfo(index, info.count, bool(info.flags & p.IRQ_INFO_MASKABLE),
                       bool(info.flags & p.IRQ_INFO_AUTOMASKED))

    def set_irq_eventfds(self, index: int, fds: list[int]) -> None:
        self._irq_fds[index] = list(fds)
        if fds:
            flags = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
        else:
            flags = p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER
        maxfds = int(self.server_caps.get("max_msg_fds", 1))
        if not fds:
            self._set_irqs(p.IrqSet.build(dict(
                argsz=p.IrqSet.sizeof(), flags=flags, index=index, start=0, count=0)))
            return
        for start in range(0, len(fds), maxfds):
            chunk = fds[start:start + maxfds]
            self._set_irqs(p.IrqSet.build(dict(
                argsz=p.IrqSet.sizeof(), flags=flags, index=index, start=start,
                count=len(chunk))), chunk)

    def set_irq_eventfd(self, index: int, vector: int, fd: int) -> None:
        # The server dup2()s the new eventfd over the one its device writes before it answers.
        fds = self._irq_fds.get(index)
        if fds and vector < len(fds):
            fds = list(fds)
            fds[vector] = fd
            self._irq_fds[index] = fds       # what a reconnect hands over
        self._set_irqs(p.IrqSet.build(dict(
            argsz=p.IrqSet.sizeof(), flags=p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER,
            index=index, start=vector, count=1)), [fd])

    def _set_irqs(self, payload: bytes, fds=()) -> None:
        self.call(p.DEVICE_SET_IRQS, payload, fds, deadline=self.irq_deadline)

    def unmask_intx(self) -> None:
        self._set_irqs(p.IrqSet.build(dict(
            argsz=p.IrqSet.sizeof(), flags=p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK,
            index=p.PCI_INTX_IRQ, start=0, count=1)))

    def dma_map_all(self, memory) -> None:
        from hvframe.errors import ConfigError
        if memory.fd < 0:
            raise ConfigError(f"{self.description}: guest RAM is not shared memory")
        self._memory = memory
        for r in memory.regions:
            self.call(p.DMA_MAP, p.DmaMap.build(dict(
                argsz=p.DmaMap.sizeof(), flags=p.DMA_READABLE | p.DMA_WRITEABLE,
                offset=r.host_offset, address=r.gpa, size=r.size)), [memory.fd])

    def reset(self) -> None:
        self.call(p.DEVICE_RESET)
