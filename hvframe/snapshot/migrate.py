"""Moving a VM to another process: the checkpoint stream over a Unix or TCP socket.

Stop-and-copy: the source pauses the guest, quiesces its devices and sends the whole
checkpoint (hvframe.snapshot.format) at once; the guest does not run meanwhile. Then, as
QEMU hands its images over at the end of a migration:

    source                                   destination (hvframe run --incoming ADDR)
    checkpoint stream  ------------------->  kept (a memfd) and verified whole
                       <-------------------  "R"  received
    releases its image locks
                       ------------------->  "G"  go
                                             builds the machine (opening and locking the
                                             images), restores it
                       <-------------------  "D"  done: the guest runs here now
    stays paused ("postmigrate"); `cont` takes the locks back, `quit` ends it

Anything else (the connection closing early, a refusal) fails the migration: the source
takes its locks back and runs on if it was running.
"""
from __future__ import annotations

import io
import os
import socket

from ..errors import ConfigError
from .format import Reader, SnapshotError

READY, GO, DONE = b"R", b"G", b"D"
HANDOVER_TIMEOUT = 120.0


def parse_address(uri: str, where: str) -> tuple[int, object]:
    """'unix:PATH' or 'tcp:HOST:PORT' -> (family, address)."""
    kind, _, rest = uri.partition(":")
    if "\0" in rest:
        rest = ""                   # (the socket calls refuse it with ValueError)
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        try:
            port_n = int(port)
            host.encode("idna")     # a name the resolver cannot take (a label over 63 bytes)
        except (ValueError, UnicodeError):
            port_n = -1
        if 0 <= port_n <= 0xFFFF:
            return socket.AF_INET6 if ":" in host else socket.AF_INET, (host or "0.0.0.0", port_n)
    raise ConfigError(f"{where} {uri}: use unix:PATH or tcp:HOST:PORT (a port 0-65535)")


def connect(uri: str, timeout: float = 30.0) -> socket.socket:
    family, addr = parse_address(uri, "migrate")
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except OSError as e:
        s.close()
        raise ConfigError(f"migrate {uri}: cannot connect: {e.strerror or e}") from None
    return s


def expect(sock: socket.socket, token: bytes, what: str, timeout: float = HANDOVER_TIMEOUT) -> None:
    sock.settimeout(timeout)
    try:
        got = sock.recv(1)
    except OSError as e:
        raise ConfigError(f"{what}: {e.strerror or e}") from None
    if got != token:
        raise ConfigError(f"{what}: the other side " +
                          ("closed the connection" if not got else f"answered {got!r}"))


class _Tee(io.RawIOBase):
    """Reads from a socket, keeping a copy of everything read in `copy`."""

    def __init__(self, sock: socket.socket, copy):
        self.sock, self.copy = sock, copy

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.sock.recv_into(b)
        if n:
            self.copy.write(memoryview(b)[:n])
        return n


class Incoming:
    """The receiving side of `hvframe run --incoming ADDR`."""

    def __init__(self, uri: str):
        self.uri = uri
        family, addr = parse_address(uri, "--incoming")
        self.path = addr if family == socket.AF_UNIX else None
        self.listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if family != socket.AF_UNIX:
                self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif os.path.exists(addr):
                raise ConfigError(f"--incoming {uri}: {addr} already exists")
            self.listener.bind(addr)
            self.listener.listen(1)
        except OSError as e:
            self.listener.close()
            raise ConfigError(f"--incoming {uri}: {e.strerror or e}") from None
        except BaseException:
            self.listener.close()
            raise
        self.conn: socket.socket | None = None

    def receive(self, max_bytes: int, stopping=lambda: False) -> tuple[object, Reader]:
        """Wait for the source, take its whole stream, answer READY and wait for GO; returns
        the stream kept in memory (a file at offset 0) and a Reader on it with its header
        read. SnapshotError/ConfigError (one line) when the stream is not usable, or would
        be larger than max_bytes (kept in memory: a source may not grow it without bound)."""
        self.listener.settimeout(0.5)
        while self.conn is None:
            if stopping():
                raise ConfigError(f"--incoming {self.uri}: stopped before a source connected")
            try:
                self.conn, _ = self.listener.accept()
            except socket.timeout:
                continue
        self.conn.settimeout(HANDOVER_TIMEOUT)
        fd = os.memfd_create("hvframe-incoming", os.MFD_CLOEXEC)
        kept = open(fd, "w+b")
        try:
            r = Reader(io.BufferedReader(_Tee(self.conn, kept), 1 << 20),
                       f"--incoming {self.uri}")
            r.read_header()
            if sum(n for _, n in r.section_list) > max_bytes:
                raise SnapshotError(f"--incoming {self.uri}: the VM sent is larger than this "
                                    f"command line's ({max_bytes >> 20} MiB of state at most)")
            for _ in r.sections():
                pass
            r.verify()
            self.conn.sendall(READY)
            expect(self.conn, GO, f"--incoming {self.uri}")
            kept.flush()
            kept.seek(0)
            reader = Reader(kept, f"--incoming {self.uri}")
            reader.read_header()
            return kept, reader
        except OSError as e:
            kept.close()
            raise SnapshotError(f"--incoming {self.uri}: {e.strerror or e}") from None
        except BaseException:
            kept.close()
            raise

    def done(self) -> None:
        if self.conn is not None:
            try:
                self.conn.sendall(DONE)
            except OSError:
                pass

    def close(self) -> None:
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
