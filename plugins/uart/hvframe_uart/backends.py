"""Where a UART's bytes go: the terminal, a file, a TCP or unix socket, or nowhere.

Every backend has
    start(on_input)  start a reader thread that calls on_input(data) with host input; the
                     callback may block (the UART applies backpressure that way)
    write(data)      guest output; called from vCPU threads, so it never waits on a peer
    close()          stop threads, release what was opened; idempotent
"""
from __future__ import annotations

import atexit
import os
import select
import socket
import stat
import termios
import threading
import tty
from typing import Callable, Optional

from hvframe.errors import ConfigError

OnInput = Callable[[bytes], None]

READ_CHUNK = 4096
# Socket output queued for a slow client beyond this is dropped, so a client that stops
# reading can never stall the guest.
SOCKET_OUTPUT_LIMIT = 1 << 20
JOIN_TIMEOUT = 2.0

SPEC_HELP = "use stdio, null, file=PATH, tcp=HOST:PORT or unix=PATH"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # Someone made the fd non-blocking; wait for room rather than lose output.
            select.select([], [fd], [], 1.0)
            continue
        view = view[written:]


class NullBackend:
    """Discards output, never produces input."""

    def start(self, on_input: OnInput) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class FileBackend:
    """Output to a file (truncated when opened, so each run starts a fresh log); no input."""

    def __init__(self, path: str):
        self.path = path
        self._fd: Optional[int] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                          0o644)
        self._lock = threading.Lock()

    def start(self, on_input: OnInput) -> None:
        pass

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                _write_all(self._fd, data)
            except OSError:
                pass    # disk full or similar: the guest keeps running, output is lost

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class StdioBackend:
    """The controlling terminal (or whatever fds 0 and 1 are).

    A TTY on in_fd is put in raw mode when the reader starts, so every key (Ctrl-C included)
    goes to the guest; the saved mode is restored on close() and, failing that, at interpreter
    exit. A non-TTY in_fd (pipe, file, /dev/null) is read until EOF. The fds are not closed.
    """

    def __init__(self, in_fd: int = 0, out_fd: int = 1):
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._saved_mode: Optional[list] = None
        self._thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = os.pipe()
        self._out_lock = threading.Lock()
        self._out_broken = False
        self._closed = False
        self.on_close: Optional[Callable[[], None]] = None

    def start(self, on_input: OnInput) -> None:
        if self._thread is not None or self._closed:
            return
        if os.isatty(self.in_fd):
            self._saved_mode = termios.tcgetattr(self.in_fd)
            atexit.register(self._restore_terminal)
            # TCSANOW: TCSAFLUSH would throw away input typed before the guest started.
            tty.setraw(self.in_fd, termios.TCSANOW)
        self._thread = threading.Thread(target=self._read_loop, args=(on_input,),
                                        name="uart-stdio-reader", daemon=True)
        self._thread.start()

    def _read_loop(self, on_input: OnInput) -> None:
        poller = select.poll()
        poller.register(self.in_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._wake_r in ready:
                return
            if self.in_fd not in ready:
                continue
            try:
                data = os.read(self.in_fd, READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                return      # e.g. EIO when the terminal hangs up
            if not data:
                return      # EOF: a pipe or file has been read to the end
            on_input(data)

    def write(self, data: bytes) -> None:
        with self._out_lock:
            if self._out_broken:
                return
            try:
                _write_all(self.out_fd, data)
            except OSError:
                self._out_broken = True     # stdout went away (EPIPE/EIO): drop from now on

    def _restore_terminal(self) -> None:
        if self._saved_mode is not None:
            try:
                termios.tcsetattr(self.in_fd, termios.TCSANOW, self._saved_mode)
            except (OSError, termios.error):
                pass
            self._saved_mode = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)
        self._restore_terminal()
        atexit.unregister(self._restore_terminal)
        # A reader stuck in on_input (UART not closed) still holds _wake_r; leave the pipe
        # then rather than let its fd number be reused under it.
        if self._thread is None or not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self.on_close is not None:
            self.on_close()


class SocketServerBackend:
    """Listens on a stream socket and serves one client at a time.

    Input comes from the connected client. Output goes to it through a bounded queue and a
    writer thread, so a slow client never blocks a vCPU; output while nobody is connected is
    dropped. Further clients wait in the listen backlog until the current one leaves.
    """

    def __init__(self, listener: socket.socket, unix_path: Optional[str] = None):
        self._listener = listener
        self._unix_path = unix_path
        self._unix_inode = os.stat(unix_path).st_ino if unix_path else None
        self._cond = threading.Condition()
        self._client: Optional[socket.socket] = None
        self._sending_on: Optional[socket.socket] = None
        self._output = bytearray()
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = os.pipe()
        self.dropped = 0    # output bytes dropped because the client did not keep up

    @property
    def address(self):
        """What the listener is bound to: (host, port) for TCP, the path for unix."""
        return self._listener.getsockname()

    def start(self, on_input: OnInput) -> None:
        if self._threads or self._closing:
            return
        self._threads = [
            threading.Thread(target=self._serve, args=(on_input,), name="uart-sock-reader",
                             daemon=True),
            threading.Thread(target=self._flush_output, name="uart-sock-writer", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _accept(self) -> Optional[socket.socket]:
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._wake_r in ready:
                return None
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return None
            return conn

    def _serve(self, on_input: OnInput) -> None:
        while True:
            conn = self._accept()
            if conn is None:
                return
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                if self._closing:
                    conn.close()
                    return
                self._client = conn
                self._output.clear()
                self._cond.notify_all()
            try:
                while True:
                    data = conn.recv(READ_CHUNK)
                    if not data:
                        break
                    on_input(data)
            except OSError:
                pass
            self._drop_client(conn)

    def _drop_client(self, conn: socket.socket) -> None:
        with self._cond:
            if self._client is conn:
                self._client = None
                self._output.clear()
            try:
                conn.shutdown(socket.SHUT_RDWR)     # wakes the writer if it is blocked in send
            except OSError:
                pass
            while self._sending_on is conn:
                self._cond.wait()
        conn.close()

    def _flush_output(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not (self._client and self._output):
                    self._cond.wait()
                if self._closing:
                    return
                conn = self._client
                chunk = bytes(self._output)
                self._output.clear()
                self._sending_on = conn
            try:
                conn.sendall(chunk)
            except OSError:
                try:
                    conn.shutdown(socket.SHUT_RDWR)     # let the reader notice and clean up
                except OSError:
                    pass
            finally:
                with self._cond:
                    self._sending_on = None
                    self._cond.notify_all()

    def write(self, data: bytes) -> None:
        with self._cond:
            if self._client is None or self._closing:
                return
            room = SOCKET_OUTPUT_LIMIT - len(self._output)
            if len(data) > room:
                self.dropped += len(data) - max(room, 0)
                data = data[:max(room, 0)]
            if data:
                self._output += data
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            client = self._client
            self._cond.notify_all()
        os.write(self._wake_w, b"x")
        if client is not None:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(JOIN_TIMEOUT)
        self._listener.close()
        if not any(t.is_alive() for t in self._threads):
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self._unix_path is not None:
            try:
                if os.stat(self._unix_path).st_ino == self._unix_inode:
                    os.unlink(self._unix_path)
            except OSError:
                pass


def _tcp_listener(label: str, rest: str) -> socket.socket:
    host, sep, port_text = rest.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{label}: bad tcp backend {rest!r}; use tcp=HOST:PORT, "
                          f"e.g. tcp=127.0.0.1:4444")
    host = host.strip("[]") or "127.0.0.1"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"{label}: tcp={rest}: {e.strerror or e}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(addr)
        listener.listen(1)
    except OSError as e:
        listener.close()
        raise ConfigError(f"{label}: cannot listen on tcp={rest}: {e.strerror or e}") from None
    return listener


def _remove_stale_socket(label: str, path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{label}: unix={path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)     # nobody listens: left over from a previous run
        return
    except OSError as e:
        raise ConfigError(f"{label}: unix={path}: {e.strerror or e}") from None
    finally:
        probe.close()
    raise ConfigError(f"{label}: unix={path} is in use by another process")


def _unix_listener(label: str, path: str) -> socket.socket:
    if not path:
        raise ConfigError(f"{label}: unix backend needs a path; use unix=PATH")
    _remove_stale_socket(label, path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
    except OSError as e:
        listener.close()
        raise ConfigError(f"{label}: cannot listen on unix={path}: {e.strerror or e}") from None
    return listener


_stdio_user: Optional[str] = None
_stdio_lock = threading.Lock()


def _open_stdio(label: str) -> StdioBackend:
    global _stdio_user
    with _stdio_lock:
        if _stdio_user is not None:
            raise ConfigError(f"{label}: stdio is already used by {_stdio_user}")
        _stdio_user = label
    backend = StdioBackend()

    def release() -> None:
        global _stdio_user
        with _stdio_lock:
            _stdio_user = None

    backend.on_close = release
    return backend


def open_backend(spec: str, label: str = "uart"):
    """Build the backend named by spec; label (e.g. 'com1') prefixes error messages."""
    spec = (spec or "").strip()
    kind, eq, rest = spec.partition("=")
    if spec == "null":
        return NullBackend()
    if spec == "stdio":
        return _open_stdio(label)
    if eq and kind == "file":
        if not rest:
            raise ConfigError(f"{label}: file backend needs a path; use file=PATH")
        try:
            return FileBackend(os.path.expanduser(rest))
        except OSError as e:
            raise ConfigError(f"{label}: cannot open file={rest}: {e.strerror or e}") from None
    if eq and kind == "tcp":
        return SocketServerBackend(_tcp_listener(label, rest))
    if eq and kind == "unix":
        path = os.path.expanduser(rest)
        return SocketServerBackend(_unix_listener(label, path), unix_path=path)
    raise ConfigError(f"{label}: unknown backend {spec!r}; {SPEC_HELP}")
