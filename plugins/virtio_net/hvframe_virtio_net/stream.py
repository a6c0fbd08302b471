"""Backends that carry frames as a byte stream, each after its 4-byte big-endian length
(Framing.BE32_LENGTH): passt, QEMU's `-netdev stream`, and two hvframe VMs on one socket.

    passt=PATH, stream=unix:PATH   connect to a Unix stream socket (passt's, or a server's)
    socket=connect:PATH            the same, to another hvframe started with socket=listen:
    socket=listen:PATH             wait for one peer on PATH; link down until it connects
    fd=N                           a descriptor a manager handed in: a connected stream socket,
                                   or a tap opened with IFF_VNET_HDR (then Framing.VNET_HDR)

One queue pair each (a stream has no queues to spread frames over); no offloads (the frames are
plain Ethernet with no virtio header).

The link. The device gets one descriptor number for the backend's lifetime. While a peer is
attached the number is its socket; while not, it is one end of a private socketpair whose other
end a backend thread drains: nothing ever arrives, and the guest's frames vanish as if the
cable were pulled, without errors or a stall. peer_gone() (EOF or an error the data path saw)
puts that idle end back on the number (dup2, so the number stays valid for a reader in C), which
closes the peer's connection. Then:
- listen: the backend thread accepts the next peer (one at a time; others are turned away);
- connect: it tries the same path again every RECONNECT_INTERVAL seconds (passt restarted);
- fd=N: nothing comes back (the manager would hand in a new descriptor with a new device).
A peer that arrives is held until the device calls attach_peer() (after watch_link()'s
callback), so a new stream never starts inside a half-done frame; a device that does not
watch gets it attached at once.

At start, connect and passt must connect (otherwise a configuration error, one line); listen
never waits for its peer: the guest starts with the link down.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import stat
import struct
import time
from typing import Callable, Optional

from hvframe import concurrency

from .backend import BackendError, Framing, NetBackend, Offloads

log = logging.getLogger(__name__)

RECONNECT_INTERVAL = 1.0
DRAIN_CHUNK = 65536
LISTEN_BACKLOG = 1
NO_OFFLOADS = Offloads()


class _Wake:
    """A non-blocking pipe the backend thread polls beside its sockets."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self.w, b"x")
        except OSError:            # full: a wake-up is pending already
            pass

    def drain(self) -> None:
        try:
            while os.read(self.r, 64):
                pass
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self.r, self.w):
            os.close(fd)


def _unix_path(path: str, label: str) -> str:
    if not path:
        raise BackendError(f"{label}: needs a socket path")
    if len(os.fsencode(path)) >= 108:     # sun_path, with its NUL
        raise BackendError(f"{label}: socket path is longer than 107 bytes")
    return path


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)          # a Unix connect completes or fails at once
    except BaseException:
        s.close()
        raise
    s.setblocking(False)
    return s


class StreamBackend(NetBackend):
    """A BE32_LENGTH stream on one Unix stream socket (or a socket handed in as fd=N)."""

    framing = Framing.BE32_LENGTH

    def __init__(self, label: str, *, connect: Optional[str] = None, listen: Optional[str] = None,
                 fd: Optional[int] = None) -> None:
        if [connect, listen, fd].count(None) != 2:
            raise ValueError("exactly one of connect, listen, fd")
        self.label = label
        self.mode = "connect" if connect is not None else "listen" if listen is not None else "fd"
        self.path = connect if connect is not None else listen
        self.disconnects = 0             # peers lost (peer_gone() calls that took a peer)
        self.discarded_bytes = 0         # guest bytes sent while the link was down
        self.refused_peers = 0           # connections turned away: a peer was there already
        self._lock = concurrency.lock(concurrency.LEAF, f"net-stream {label}")
        self._on_change: Optional[Callable[[], None]] = None
        self._attached = False
        self._pending: Optional[socket.socket] = None
        self._listener: Optional[socket.socket] = None
        self._unlink_on_close = False
        self._next_connect = 0.0
        self._closed = False
        self._thread: Optional[concurrency.DeviceThread] = None
        # The idle cable: _idle_dev goes on the device's number while no peer is attached,
        # _idle_drain is read and thrown away by the backend thread.
        self._idle_dev, self._idle_drain = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._idle_dev.setblocking(False)
        self._idle_drain.setblocking(False)
        self._wake = _Wake()
        self._fd = -1
        try:
            if fd is not None:
                self._fd = self._adopt_fd(fd)
                self._attached = True
            else:
                self._fd = os.dup(self._idle_dev.fileno())
                os.set_inheritable(self._fd, False)
                if connect is not None:
                    try:
                        peer = _connect(_unix_path(connect, label))
                    except OSError as e:
                        raise BackendError(f"{label}: cannot connect to {connect}: "
                                           f"{e.strerror or e}") from None
                    self._install(peer)
                else:
                    self._listener = self._listen(_unix_path(listen, label))
            self._thread = concurrency.DeviceThread(f"net-stream {label}", self._run,
                                                    wake=self._wake.wake).start()
        except BaseException:
            self._release()
            raise

    # ---- opening ----------------------------------------------------------------------
    def _adopt_fd(self, fd: int) -> int:
        s = socket.socket(fileno=os.dup(fd))
        try:
            if s.type != socket.SOCK_STREAM:
                raise BackendError(f"{self.label}: descriptor {fd} is a socket but not a stream")
            try:
                s.getpeername()
            except OSError:
                raise BackendError(f"{self.label}: socket {fd} is not connected") from None
        finally:
            s.close()
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        return fd

    def _listen(self, path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise BackendError(f"{self.label}: {path} exists and is not a socket")
            try:
                _connect(path).close()
            except ConnectionRefusedError:
                os.unlink(path)           # a socket nobody listens on any more: stale
            except OSError as e:
                raise BackendError(f"{self.label}: {path}: {e.strerror or e}") from None
            else:
                raise BackendError(f"{self.label}: {path} is in use (something listens on it)")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(path)
            s.listen(LISTEN_BACKLOG)
        except OSError as e:
            s.close()
            raise BackendError(f"{self.label}: cannot listen on {path}: {e.strerror or e}") from None
        s.setblocking(False)
        self._unlink_on_close = True
        return s

    # ---- the device's side --------------------------------------------------------------
    def queue_fds(self) -> list[int]:
        return [self._fd]

    def capabilities(self) -> Offloads:
        return NO_OFFLOADS

    def set_offloads(self, acked: Offloads) -> None:
        if acked != NO_OFFLOADS:
            raise ValueError(f"{self.label}: a stream carries no offloads, asked for {acked}")

    def link_up(self) -> bool:
        with self._lock:
            return self._attached

    def peer_gone(self) -> None:
        with self._lock:
            if not self._attached or self._closed:
                return
            # dup2 closes the peer's connection (ours was its only descriptor) and puts the
            # idle cable on the same number in one step.
            os.dup2(self._idle_dev.fileno(), self._fd, inheritable=False)
            self._attached = False
            self.disconnects += 1
            self._next_connect = time.monotonic() + RECONNECT_INTERVAL
        log.info("%s: peer gone, link down", self.label)
        self._wake.wake()

    def watch_link(self, on_change: Callable[[], None]) -> None:
        with self._lock:
            self._on_change = on_change
        self._wake.wake()          # a peer may be waiting already

    def attach_peer(self) -> bool:
        with self._lock:
            if not self._attached and self._pending is not None and not self._closed:
                peer, self._pending = self._pending, None
                self._install_locked(peer)
            return self._attached

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is not None:
            self._thread.stop()
        self._release()

    # ---- internals ----------------------------------------------------------------------
    def _install(self, peer: socket.socket) -> None:
        with self._lock:
            self._install_locked(peer)

    def _install_locked(self, peer: socket.socket) -> None:
        peer.setblocking(False)
        os.dup2(peer.fileno(), self._fd, inheritable=False)
        peer.close()
        self._attached = True
        log.info("%s: peer attached, link up", self.label)

    def _release(self) -> None:
        for s in (self._pending, self._listener, self._idle_dev, self._idle_drain):
            if s is not None:
                s.close()
        self._pending = self._listener = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._wake.close()
        if self._unlink_on_close and self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _run(self, thread: concurrency.DeviceThread) -> None:
        """The backend thread: drains the idle cable, accepts (listen) or reconnects
        (connect) while no peer is attached, and tells the device of a waiting peer."""
        poller = select.poll()
        poller.register(self._wake.r, select.POLLIN)
        poller.register(self._idle_drain.fileno(), select.POLLIN)
        if self._listener is not None:
            poller.register(self._listener.fileno(), select.POLLIN)
        while not thread.stopping:
            with self._lock:
                want_peer = not self._attached and self._pending is None
                reconnect_at = self._next_connect if self.mode == "connect" and want_peer else None
            timeout = None
            if reconnect_at is not None:
                timeout = max(0, int((reconnect_at - time.monotonic()) * 1000))
            concurrency.may_block(f"{self.label}: a peer or the idle cable")
            ready = dict(poller.poll(timeout))
            if thread.stopping:
                break
            if self._wake.r in ready:
                self._wake.drain()
            if self._idle_drain.fileno() in ready:
                self._drain_idle()
            arrived = None
            if self._listener is not None and self._listener.fileno() in ready:
                arrived = self._accept()
            elif reconnect_at is not None and time.monotonic() >= reconnect_at:
                arrived = self._reconnect()
            if arrived is not None:
                self._offer(arrived)
            else:
                self._notify_if_pending()

    def _drain_idle(self) -> None:
        try:
            while True:
                data = self._idle_drain.recv(DRAIN_CHUNK)
                if not data:
                    return
                with self._lock:
                    self.discarded_bytes += len(data)
        except (BlockingIOError, InterruptedError):
            pass

    def _accept(self) -> Optional[socket.socket]:
        try:
            peer, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        except OSError as e:                 # EMFILE and the like: try again later
            log.warning("%s: accept failed: %s", self.label, e)
            time.sleep(0.1)
            return None
        with self._lock:                     # now, not before the poll: peer_gone() may
            taken = self._attached or self._pending is not None   # have come meanwhile
            if taken:
                self.refused_peers += 1
        if taken:
            peer.close()                     # one peer at a time
            return None
        return peer

    def _reconnect(self) -> Optional[socket.socket]:
        try:
            return _connect(self.path)
        except OSError:
            with self._lock:
                self._next_connect = time.monotonic() + RECONNECT_INTERVAL
            return None

    def _offer(self, peer: socket.socket) -> None:
        with self._lock:
            if self._closed or self._attached or self._pending is not None:
                peer.close()
                return
            if self._on_change is None:
                self._install_locked(peer)   # nobody to ask: attach now
                return
            self._pending = peer
        self._notify_if_pending()

    def _notify_if_pending(self) -> None:
        with self._lock:
            callback = self._on_change if self._pending is not None else None
        if callback is not None:
            callback()


# ---- fd=N that is a tap ---------------------------------------------------------------------

TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETOFFLOAD = 0x400454D0
IFF_TUN, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
VNET_HDR_LEN = 12           # struct virtio_net_hdr_v1 (with num_buffers)
IFREQ = struct.Struct("16sH22x")
TAP_OFFLOADS = Offloads(csum=True, tso4=True, tso6=True, ecn=True)


def tap_flags(fd: int) -> tuple[str, int]:
    """(interface name, IFF_* flags) of a tun/tap descriptor; OSError if it is none."""
    name, flags = IFREQ.unpack(fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ.size)))
    return name.rstrip(b"\0").decode(errors="replace"), flags


def tun_offload_flags(acked: Offloads) -> int:
    """TUNSETOFFLOAD's argument: what the reader (the device, for the guest) accepts."""
    flags = 0
    if acked.csum:
        flags |= TUN_F_CSUM
        if acked.tso4:
            flags |= TUN_F_TSO4
        if acked.tso6:
            flags |= TUN_F_TSO6
        if (acked.tso4 or acked.tso6) and acked.ecn:
            flags |= TUN_F_TSO_ECN
    return flags


class TapFdBackend(NetBackend):
    """A tap descriptor opened by someone else (fd=N): it must be a tap (not tun) with
    IFF_NO_PI and IFF_VNET_HDR; the header size is set to 12 here. One queue pair."""

    framing = Framing.VNET_HDR

    def __init__(self, label: str, fd: int, name: str) -> None:
        self.label = label
        self.name = name
        self._fd = fd
        self._gone = False
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)     # nothing offloaded until the guest says so
        except OSError as e:
            raise BackendError(f"{label}: tap {name}: cannot set up its vnet header: "
                               f"{e.strerror or e}") from None
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)

    def queue_fds(self) -> list[int]:
        return [self._fd]

    def capabilities(self) -> Offloads:
        return TAP_OFFLOADS

    def set_offloads(self, acked: Offloads) -> None:
        fcntl.ioctl(self._fd, TUNSETOFFLOAD, tun_offload_flags(acked & TAP_OFFLOADS))

    def link_up(self) -> bool:
        return not self._gone

    def peer_gone(self) -> None:
        self._gone = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_fd(label: str, fd: int, queues: int) -> NetBackend:
    """fd=N: a connected stream socket (BE32_LENGTH) or a tap with a vnet header. The
    backend owns the descriptor from here on (close() closes it)."""
    if queues != 1:
        raise BackendError(f"{label}: one descriptor carries one queue pair, not queues={queues}")
    try:
        st = os.fstat(fd)
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        raise BackendError(f"{label}: descriptor {fd} is not open") from None
    if mode != os.O_RDWR:
        raise BackendError(f"{label}: descriptor {fd} is not open for reading and writing")
    if stat.S_ISSOCK(st.st_mode):
        return StreamBackend(label, fd=fd)
    try:
        name, flags = tap_flags(fd)
    except OSError as e:
        if e.errno in (errno.EBADFD, errno.ENOTTY, errno.EINVAL):
            raise BackendError(f"{label}: descriptor {fd} is neither a stream socket nor an "
                               "attached tap") from None
        raise BackendError(f"{label}: descriptor {fd}: {e.strerror or e}") from None
    if not flags & IFF_TAP:
        raise BackendError(f"{label}: {name} is a tun (layer 3) device, not a tap")
    if not flags & IFF_NO_PI:
        raise BackendError(f"{label}: tap {name} was opened without IFF_NO_PI")
    if not flags & IFF_VNET_HDR:
        raise BackendError(f"{label}: tap {name} was opened without IFF_VNET_HDR")
    return TapFdBackend(label, fd, name)


def open_backend(kind: str, value: str, pairs: int) -> NetBackend:
    """The device plugin's entry (hvframe_virtio_net.plugin): `kind` is passt, stream, socket or
    fd and `value` what followed its '='. One-line BackendError on any problem."""
    from .backends import open_spec
    return open_spec(f"{kind}={value}", pairs)
