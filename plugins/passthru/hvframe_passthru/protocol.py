"""The vfio-user protocol (QEMU's docs/interop/vfio-user.rst, protocol 0.1): message layouts
declared with construct, and a connection that frames messages on an AF_UNIX stream socket
with file descriptors passed as SCM_RIGHTS.

Every message is a 16-byte header (message id, command, size of the whole message, flags
with the type in bits 0-3, no-reply and error bits, and an errno) and a payload whose
layout depends on the command and on whether it is a command or its reply.

What a peer may send is bounded: a message is at most MAX_MESSAGE bytes (the largest data
transfer we negotiate plus its header and payload head) and carries at most MAX_FDS file
descriptors; anything larger is refused before its payload is read into memory (the stream
is then out of step, so the connection is closed), and a payload whose size does not match
its command's layout is answered with EINVAL.
"""
from __future__ import annotations

import array
import errno
import json
import os
import socket
import time
from dataclasses import dataclass, field

from construct import (Bytes, Const, GreedyBytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct,
                       StreamError, ConstructError)

# -- commands (section "Commands") ---------------------------------------------------------------
VERSION = 1
DMA_MAP = 2
DMA_UNMAP = 3
DEVICE_GET_INFO = 4
DEVICE_GET_REGION_INFO = 5
DEVICE_GET_REGION_IO_FDS = 6
DEVICE_GET_IRQ_INFO = 7
DEVICE_SET_IRQS = 8
REGION_READ = 9
REGION_WRITE = 10
DMA_READ = 11
DMA_WRITE = 12
DEVICE_RESET = 13
REGION_WRITE_MULTI = 15
DEVICE_FEATURE = 16
MIG_DATA_READ = 17
MIG_DATA_WRITE = 18
COMMAND_NAMES = {v: k for k, v in list(globals().items())
                 if k.isupper() and isinstance(v, int) and 1 <= v <= 18}

# -- header --------------------------------------------------------------------------------------
Header = Struct(
    "msg_id" / Int16ul,
    "command" / Int16ul,
    "size" / Int32ul,      # of the whole message, header included
    "flags" / Int32ul,
    "error" / Int32ul,     # an errno, in replies with FLAG_ERROR
)
HEADER_SIZE = Header.sizeof()          # 16
TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 1 << 4
FLAG_ERROR = 1 << 5

PROTOCOL_MAJOR = 0
PROTOCOL_MINOR = 1

# -- payloads ------------------------------------------------------------------------------------
VersionHead = Struct("major" / Int16ul, "minor" / Int16ul)   # then JSON, NUL terminated

DmaMap = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,       # DMA_READABLE | DMA_WRITEABLE
    "offset" / Int64ul,      # into the file descriptor passed with the message
    "address" / Int64ul,     # DMA (guest-physical) address
    "size" / Int64ul,
)
DMA_READABLE = 1 << 0
DMA_WRITEABLE = 1 << 1

DmaUnmap = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,       # DMA_UNMAP_ALL: every mapping (address and size must be 0)
    "address" / Int64ul,
    "size" / Int64ul,
)
DMA_UNMAP_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_ALL = 1 << 1

DeviceInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,       # DEVICE_FLAGS_*
    "num_regions" / Int32ul,
    "num_irqs" / Int32ul,
)
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1

RegionInfo = Struct(         # struct vfio_region_info
    "argsz" / Int32ul,
    "flags" / Int32ul,       # REGION_FLAG_*
    "index" / Int32ul,
    "cap_offset" / Int32ul,
    "size" / Int64ul,
    "offset" / Int64ul,      # for mmap() of the fd passed with the reply
)
REGION_FLAG_READ = 1 << 0
REGION_FLAG_WRITE = 1 << 1
REGION_FLAG_MMAP = 1 << 2
REGION_FLAG_CAPS = 1 << 3

RegionIoFdsRequest = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "count" / Int32ul,
)
SubRegionIoFd = Struct(      # ioeventfd form (type 0); the ioregionfd form has user_data
    "offset" / Int64ul,
    "size" / Int64ul,
    "fd_index" / Int32ul,
    "type" / Int32ul,
    "flags" / Int32ul,       # IOEVENTFD_FLAG_* (KVM's)
    "padding" / Int32ul,
    "datamatch" / Int64ul,
)
IO_FD_TYPE_IOEVENTFD = 0
IO_FD_TYPE_IOREGIONFD = 1
IOEVENTFD_FLAG_DATAMATCH = 1 << 0     # KVM_IOEVENTFD_FLAG_DATAMATCH
IOEVENTFD_FLAG_PIO = 1 << 1           # KVM_IOEVENTFD_FLAG_PIO

IrqInfo = Struct(            # struct vfio_irq_info
    "argsz" / Int32ul,
    "flags" / Int32ul,       # IRQ_INFO_*
    "index" / Int32ul,
    "count" / Int32ul,
)
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3

IrqSet = Struct(             # struct vfio_irq_set, data (bools) after it
    "argsz" / Int32ul,
    "flags" / Int32ul,       # one IRQ_SET_DATA_* | one IRQ_SET_ACTION_*
    "index" / Int32ul,
    "start" / Int32ul,
    "count" / Int32ul,
)
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5
IRQ_SET_DATA_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK_ALL = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

RegionAccess = Struct(       # REGION_READ request and reply head, REGION_WRITE both ways
    "offset" / Int64ul,
    "region" / Int32ul,
    "count" / Int32ul,
)
DmaAccess = Struct(          # DMA_READ/DMA_WRITE request and reply head
    "address" / Int64ul,
    "count" / Int64ul,
)
WriteMultiEntry = Struct(
    "offset" / Int64ul,
    "region" / Int32ul,
    "count" / Int32ul,       # at most 8
    "data" / Bytes(8),
)
WriteMultiHead = Struct("wr_cnt" / Int64ul)
WRITE_MULTI_MAX = 200        # entries in one message, as the reference implementations cap it

DeviceFeature = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,       # feature index in bits 0-15, GET/SET/PROBE in 16-18
)
FEATURE_MASK = 0xFFFF
FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18

MigData = Struct("argsz" / Int32ul, "size" / Int32ul)

# VFIO PCI region and interrupt indexes (linux/vfio.h), which vfio-user reuses.
PCI_BAR0_REGION = 0
PCI_ROM_REGION = 6
PCI_CONFIG_REGION = 7
PCI_VGA_REGION = 8
PCI_NUM_REGIONS = 9
PCI_INTX_IRQ = 0
PCI_MSI_IRQ = 1
PCI_MSIX_IRQ = 2
PCI_ERR_IRQ = 3
PCI_REQ_IRQ = 4
PCI_NUM_IRQS = 5

# -- limits --------------------------------------------------------------------------------------
MAX_DATA_XFER = 1 << 20               # the spec's default max_data_xfer_size
MAX_FDS = 16                          # descriptors we take in one message (max_msg_fds)
MAX_MESSAGE = HEADER_SIZE + 64 + MAX_DATA_XFER
MAX_VERSION_JSON = 4096
MAX_DMA_MAPS = 64

# The fixed payload size of each command's request (None: variable, checked by the handler).
REQUEST_SIZES = {
    DMA_MAP: DmaMap.sizeof(),
    DMA_UNMAP: DmaUnmap.sizeof(),
    DEVICE_GET_INFO: DeviceInfo.sizeof(),
    DEVICE_GET_REGION_INFO: RegionInfo.sizeof(),
    DEVICE_GET_REGION_IO_FDS: RegionIoFdsRequest.sizeof(),
    DEVICE_GET_IRQ_INFO: IrqInfo.sizeof(),
    REGION_READ: RegionAccess.sizeof(),
    DEVICE_RESET: 0,
    MIG_DATA_READ: MigData.sizeof(),
}
# Commands that may carry file descriptors; any others arriving with some are refused.
FD_COMMANDS = {DMA_MAP, DEVICE_SET_IRQS}


class ProtocolError(Exception):
    """The peer broke the protocol (or went away): the connection cannot go on."""


class RemoteError(Exception):
    """The peer answered a command with an error reply; errno is its error field."""

    def __init__(self, command: int, err: int):
        self.command, self.errno = command, err
        name = COMMAND_NAMES.get(command, str(command))
        super().__init__(f"{name}: {os.strerror(err) if err else 'error'} (errno {err})")


class CommandError(Exception):
    """Raised by a command handler: answered with an error reply carrying this errno."""

    def __init__(self, err: int, why: str = ""):
        self.errno = err
        super().__init__(why or os.strerror(err))


@dataclass
class Message:
    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.flags & TYPE_MASK == TYPE_REPLY

    def close_fds(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def encode(msg_id: int, command: int, payload: bytes = b"", *, flags: int = TYPE_COMMAND,
           error: int = 0) -> bytes:
    return Header.build(dict(msg_id=msg_id & 0xFFFF, command=command,
                             size=HEADER_SIZE + len(payload), flags=flags, error=error)) + payload


def parse(st: Struct, payload: bytes, *, exact: bool = True):
    """Parse a payload head with st; CommandError(EINVAL) if it is short (or, with exact,
    any other length)."""
    n = st.sizeof()
    if len(payload) < n or (exact and len(payload) != n):
        raise CommandError(errno.EINVAL, f"payload of {len(payload)} bytes, expected "
                                         f"{'' if exact else 'at least '}{n}")
    try:
        return st.parse(payload[:n])
    except (StreamError, ConstructError) as e:      # cannot happen for fixed sizes; be sure
        raise CommandError(errno.EINVAL, str(e)) from None


# -- version negotiation -------------------------------------------------------------------------
def version_payload(caps: dict) -> bytes:
    return VersionHead.build(dict(major=PROTOCOL_MAJOR, minor=PROTOCOL_MINOR)) + \
        json.dumps({"capabilities": caps}).encode() + b"\0"


def parse_version(payload: bytes) -> tuple[int, int, dict]:
    """(major, minor, capabilities) of a VERSION payload; CommandError(EINVAL) when its JSON
    is missing its NUL, too long, not JSON or not of the specified shape."""
    head = parse(VersionHead, payload, exact=False)
    rest = payload[VersionHead.sizeof():]
    caps: dict = {}
    if rest:
        if len(rest) > MAX_VERSION_JSON or not rest.endswith(b"\0") or b"\0" in rest[:-1]:
            raise CommandError(errno.EINVAL, "version data is not one NUL-terminated string")
        try:
            doc = json.loads(rest[:-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise CommandError(errno.EINVAL, "version data is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("capabilities", {}), dict):
            raise CommandError(errno.EINVAL, "version data has no capabilities object")
        caps = doc.get("capabilities", {})
        for key in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            v = caps.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise CommandError(errno.EINVAL, f"capability {key} is not a number")
    return head.major, head.minor, caps


def negotiate_caps(proposed: dict) -> dict:
    """Our answer to a client's capabilities: a subset of what it proposed, within our limits."""
    out = {"max_msg_fds": min(int(proposed.get("max_msg_fds", 1)), MAX_FDS),
           "max_data_xfer_size": min(int(proposed.get("max_data_xfer_size", MAX_DATA_XFER)),
                                     MAX_DATA_XFER),
           "max_dma_maps": min(int(proposed.get("max_dma_maps", 65535)), MAX_DMA_MAPS),
           "pgsizes": 4096}
    return out


# -- the connection ------------------------------------------------------------------------------
class Connection:
    """One end of a vfio-user stream socket. recv() returns one whole Message (with the
    descriptors that came with it) or raises ProtocolError; send() sends one."""

    def __init__(self, sock: socket.socket, *, max_message: int = MAX_MESSAGE,
                 max_fds: int = MAX_FDS):
        self.sock = sock
        self.max_message = max_message
        self.max_fds = max_fds
        self._next_id = 0
        # An exchange's end (time.monotonic()), or None: with it, every send and receive
        # waits only for what is left, so a peer trickling bytes cannot stretch the exchange.
        self.deadline_at: float | None = None

    def _arm(self) -> None:
        if self.deadline_at is not None:
            left = self.deadline_at - time.monotonic()
            if left <= 0:
                raise ProtocolError("timed out")
            try:
                self.sock.settimeout(left)
            except OSError as e:
                raise ProtocolError(f"{e}") from None

    def fileno(self) -> int:
        return self.sock.fileno()

    def next_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF
        return self._next_id

    def send(self, data: bytes, fds=()) -> None:
        self._arm()
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)))]
                sent = self.sock.sendmsg([data], anc)
                if sent < len(data):
                    self._arm()
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except (OSError, ValueError) as e:    # EPIPE, ECONNRESET, closed, timed out
            raise ProtocolError(f"send: {e}") from None

    def _recv_exact(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray()
        anc_space = socket.CMSG_SPACE(self.max_fds * 4)
        while len(buf) < n:
            self._arm()
            try:
                data, anc, msg_flags, _ = self.sock.recvmsg(n - len(buf), anc_space)
            except (OSError, ValueError) as e:
                raise ProtocolError(f"recv: {e}") from None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
                    fds.extend(a)
            if msg_flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                fds.clear()
                raise ProtocolError(f"more than {self.max_fds} file descriptors in one message")
            if not data:
                raise ProtocolError("connection closed by the peer")
            buf += data
        return bytes(buf)

    def recv(self) -> Message:
        fds: list[int] = []
        try:
            head = Header.parse(self._recv_exact(HEADER_SIZE, fds))
            if head.size < HEADER_SIZE or head.size > self.max_message:
                raise ProtocolError(f"message size {head.size} outside "
                                    f"{HEADER_SIZE}-{self.max_message}")
            payload = self._recv_exact(head.size - HEADER_SIZE, fds) \
                if head.size > HEADER_SIZE else b""
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Message(head.msg_id, head.command, head.flags, head.error, payload, fds)

    def reply(self, req: Message, payload: bytes = b"", fds=()) -> None:
        if not req.flags & FLAG_NO_REPLY:
            self.send(encode(req.msg_id, req.command, payload, flags=TYPE_REPLY), fds)

    def reply_error(self, req: Message, err: int) -> None:
        if not req.flags & FLAG_NO_REPLY:
            self.send(encode(req.msg_id, req.command, flags=TYPE_REPLY | FLAG_ERROR,
                             error=err & 0xFFFFFFFF))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
