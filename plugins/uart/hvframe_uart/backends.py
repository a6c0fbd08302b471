"""Where a UART's bytes go: the terminal, a file, a TCP or unix socket, or nowhere.

Every backend has
    start(on_input)  start a reader thread that calls on_input(data) with host input; the
                     callback may block (the UART applies backpressure that way)
    write(data)      guest output; called from vCPU threads, so it never waits on a peer
    close()          stop threads, release what was opened; idempotent

Reader and writer threads are DeviceThreads (hvframe.concurrency) the backend owns: each wait
is interruptible (a wake-up pipe next to the polled fd, or the output condition), close()
stops and joins them with a deadline, and a thread that dies of a bug is reported.
"""
from __future__ import annotations

import atexit
import os
import select
import stat
import termios
import tty

from hvframe.errors import ConfigError
from hvframe import concurrency
from hvframe.logs import logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket     # imported where a socket backend is made: it costs start-up ~5 ms
    from typing import Callable, Optional

    OnInput = Callable[[bytes], None]

log = logger(__name__)

READ_CHUNK = 4096
# Output queued for a slow client, terminal or file beyond this is dropped (and counted), so
# a peer that stops reading can never stall a vCPU.
SOCKET_OUTPUT_LIMIT = 1 << 20
OUTPUT_LIMIT = 1 << 20
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


class _OutputPump:
    """Guest output to an fd through a bounded buffer and a writer DeviceThread: write()
    never waits (a full buffer drops the rest and counts it in `dropped`), the writer may.
    close() lets the writer finish what is queued for up to its deadline."""

    def __init__(self, fd: int, name: str):
        self.fd = fd
        self.dropped = 0
        self.broken = False                 # the fd failed (EPIPE, EIO): drop from now on
        self._buf = bytearray()
        self._cond = concurrency.condition(concurrency.lock(concurrency.LEAF, name))
        self._writing = False
        self._thread = concurrency.DeviceThread(name, self._run, wake=self._wake).start()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def write(self, data: bytes) -> None:
        with self._cond:
            if self.broken or self._thread.stopping:
                return
            room = OUTPUT_LIMIT - len(self._buf)
            if len(data) > room:
                self.dropped += len(data) - max(room, 0)
                data = data[:max(room, 0)]
            if data:
                self._buf += data
                self._cond.notify_all()

    def _run(self, thread: concurrency.DeviceThread) -> None:
        while True:
            with self._cond:
                while not self._buf and not thread.stopping:
                    self._cond.wait()
                if not self._buf:
                    return                  # stopping, and everything is out
                data = bytes(self._buf)
                self._buf.clear()
                self._writing = True
                self._cond.notify_all()
            try:
                concurrency.may_block("the UART's output fd")
                _write_all(self.fd, data)
            except OSError:
                with self._cond:
                    self.broken = True
                    self._buf.clear()
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def flush(self, deadline: float) -> bool:
        """Wait until what was written so far is out (tests, close); False at the deadline."""
        concurrency.may_block("UART output to drain")
        with self._cond:
            return self._cond.wait_for(lambda: not self._buf and not self._writing
                                       or self.broken or not self._thread.is_alive(), deadline)

    def close(self, deadline: float = JOIN_TIMEOUT) -> bool:
        """Let the queued output out (up to the deadline), then stop the writer; False if
        the writer was stuck on the fd (it is left to finish on its own)."""
        self.flush(deadline)
        return self._thread.stop(0.1 if self._writing else deadline)


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
        # O_NONBLOCK: a FIFO nobody reads is refused at once instead of hanging the open.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NONBLOCK,
                     0o644)
        os.set_blocking(fd, True)
        self._fd: Optional[int] = fd
        self._out = _OutputPump(fd, "uart-file-writer")

    @property
    def dropped(self) -> int:
        return self._out.dropped

    def start(self, on_input: OnInput) -> None:
        pass

    def write(self, data: bytes) -> None:
        self._out.write(data)   # disk full or similar: the guest keeps running, output is lost

    def close(self) -> None:
        if self._fd is None:
            return
        if self._out.close():
            os.close(self._fd)  # else the stuck writer still has it: left open, not reused
        self._fd = None


class _WakePipe:
    """The self-pipe a reader thread polls next to its fd: wake() makes it readable (stop,
    pause), drain() empties it. Both ends are non-blocking: a wake-up already pending is
    enough. close() leaves the fds alone while `in_use` says a thread may still poll them."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        if self.w >= 0:
            try:
                os.write(self.w, b"x")
            except OSError:      # full: a wake-up is pending already
                pass

    def drain(self) -> None:
        try:
            while os.read(self.r, 64):
                pass
        except OSError:          # empty
            pass

    def close(self) -> None:
        r, w, self.r, self.w = self.r, self.w, -1, -1
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def _wait_readable(thread: concurrency.DeviceThread, fd, wake: _WakePipe, what: str) -> bool:
    """(on a backend's reader) Wait until fd (an fd or socket) is readable or hung up: True;
    False when the thread is being stopped. A pause() parks it here."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(wake.r, select.POLLIN)
    while not thread.stopping:
        concurrency.may_block(what)
        ready = dict(poller.poll())
        if wake.r in ready:
            wake.drain()
            if thread.stopping:
                break
            thread.checkpoint()
            continue
        if ready:
            return True
    return False


ESCAPE = 0x01           # Ctrl-A, as QEMU's console multiplexer
ESCAPE_HELP = (b"\r\nC-a x    quit hvframe\r\nC-a C-a  send C-a to the guest\r\n"
               b"C-a h    this help\r\n")


class ConsoleEscape:
    """QEMU's console escape on a terminal: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A,
    Ctrl-A h prints help; any other key after Ctrl-A is dropped. The state (an escape
    pending) carries over between reads."""

    def __init__(self, on_quit: Callable[[], None], say: Callable[[bytes], None]):
        self.on_quit, self.say = on_quit, say
        self.pending = False

    def filter(self, data: bytes) -> tuple[bytes, bool]:
        """(bytes for the guest, quit asked)."""
        out = bytearray()
        for b in data:
            if self.pending:
                self.pending = False
                if b == ESCAPE:
                    out.append(ESCAPE)
                elif b in (ord("x"), ord("X")):
                    return bytes(out), True
                elif b in (ord("h"), ord("?")):
                    self.say(ESCAPE_HELP)
            elif b == ESCAPE:
                self.pending = True
            else:
                out.append(b)
        return bytes(out), False


class StdioBackend:
    """The controlling terminal (or whatever fds 0 and 1 are).

    A TTY on in_fd is put in raw mode when the reader starts, so every key (Ctrl-C included)
    goes to the guest, except the console escape (ConsoleEscape, when on_quit is given: a
    terminal only, so piped input reaches the guest unchanged); the saved mode is restored
    on close() and, failing that, at interpreter exit. A non-TTY in_fd (pipe, file,
    /dev/null) is read until EOF. The fds are not closed. The reader is a DeviceThread the
    backend owns; close() stops it through a wake-up pipe.
    """

    def __init__(self, in_fd: int = 0, out_fd: int = 1,
                 on_quit: Optional[Callable[[], None]] = None):
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.on_quit = on_quit
        self._saved_mode: Optional[list] = None
        self._thread: Optional[concurrency.DeviceThread] = None
        self._wake = _WakePipe()
        # A terminal stopped with ^S or a pipe nobody reads must not stall a vCPU.
        self._out = _OutputPump(out_fd, "uart-stdio-writer")
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
        self._thread = concurrency.DeviceThread(
            "uart-stdio-reader", lambda thread: self._read_loop(thread, on_input),
            wake=self._wake.wake).start()

    def _read_loop(self, thread: concurrency.DeviceThread, on_input: OnInput) -> None:
        escape = None
        if self.on_quit is not None and self._saved_mode is not None:
            escape = ConsoleEscape(self.on_quit, self._out.write)
        while _wait_readable(thread, self.in_fd, self._wake, "input on the UART's stdio"):
            try:
                data = os.read(self.in_fd, READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                return      # e.g. EIO when the terminal hangs up
            if not data:
                return      # EOF: a pipe or file has been read to the end
            quit_asked = False
            if escape is not None:
                data, quit_asked = escape.filter(data)
            if data:
                on_input(data)  # may block: the UART's backpressure (released by its close())
            if quit_asked:
                self.on_quit()
                return

    @property
    def dropped(self) -> int:
        return self._out.dropped

    def write(self, data: bytes) -> None:
        self._out.write(data)   # stdout gone (EPIPE/EIO): dropped from then on

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
        self._out.close()
        if self._thread is not None:
            self._thread.stop(JOIN_TIMEOUT)
        self._restore_terminal()
        atexit.unregister(self._restore_terminal)
        # A reader stuck in on_input (UART not closed) still polls the pipe; leave it open
        # then rather than let its fd numbers be reused under it.
        if self._thread is None or not self._thread.is_alive():
            self._wake.close()
        if self.on_close is not None:
            self.on_close()


class SocketServerBackend:
    """Listens on a stream socket and serves one client at a time.

    Input comes from the connected client. Output goes to it through a bounded queue and a
    writer thread, so a slow client never blocks a vCPU; output while nobody is connected is
    dropped. Further clients wait in the listen backlog until the current one leaves.

    The reader (accept, then the client's input) and the writer are DeviceThreads the backend
    owns: close() ends the client's connection and stops both, each join with a deadline. A
    thread that dies of a bug ends the connection too and the backend serves no further
    client (output is dropped), rather than leaving a client talking to nobody.
    """

    def __init__(self, listener: socket.socket, unix_path: Optional[str] = None):
        self._listener = listener
        self._listener.setblocking(False)   # poll() said ready; a client gone since: no wait
        self._unix_path = unix_path
        self._unix_inode = os.stat(unix_path).st_ino if unix_path else None
        self._cond = concurrency.condition(concurrency.lock(concurrency.LEAF, "uart socket"))
        self._client: Optional[socket.socket] = None
        self._sending_on: Optional[socket.socket] = None
        self._output = bytearray()
        self._closing = False
        self._broken: Optional[str] = None   # a thread died: serve nobody
        self._kicks = 0                      # bumped to get the writer to its checkpoint
        self._orphans: list[socket.socket] = []
        self._threads: list[concurrency.DeviceThread] = []
        self._wake = _WakePipe()
        self.dropped = 0    # output bytes dropped because the client did not keep up

    @property
    def address(self):
        """What the listener is bound to: (host, port) for TCP, the path for unix."""
        return self._listener.getsockname()

    def start(self, on_input: OnInput) -> None:
        if self._threads or self._closing:
            return
        self._threads = [
            concurrency.DeviceThread("uart-sock-reader",
                                     lambda thread: self._serve(thread, on_input),
                                     wake=self._wake.wake, on_error=self._thread_failed),
            concurrency.DeviceThread("uart-sock-writer", self._flush_output,
                                     wake=self._wake_writer, on_error=self._thread_failed),
        ]
        for t in self._threads:
            t.start()

    def _accept(self, thread: concurrency.DeviceThread) -> Optional[socket.socket]:
        while _wait_readable(thread, self._listener, self._wake, "a client to connect"):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return None
            conn.setblocking(True)
            return conn
        return None

    def _serve(self, thread: concurrency.DeviceThread, on_input: OnInput) -> None:
        import socket
        while True:
            conn = self._accept(thread)
            if conn is None:
                return
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                if self._closing or self._broken or thread.stopping:
                    conn.close()
                    return
                self._client = conn
                self._output.clear()
                self._cond.notify_all()
            try:
                while _wait_readable(thread, conn, self._wake, "input from the UART's client"):
                    data = conn.recv(READ_CHUNK)
                    if not data:
                        break
                    on_input(data)   # may block: the UART's backpressure
            except OSError:
                pass
            self._drop_client(conn)
            if self._broken:
                return

    def _drop_client(self, conn: socket.socket) -> None:
        import socket
        concurrency.may_block("the UART socket writer to let go of its client")
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

    def _wake_writer(self) -> None:
        with self._cond:
            self._kicks += 1
            self._cond.notify_all()

    def _flush_output(self, thread: concurrency.DeviceThread) -> None:
        import socket
        while True:
            thread.checkpoint()
            concurrency.may_block("output for the UART's client")
            with self._cond:
                kicks = self._kicks
                while not (self._closing or self._broken or thread.stopping
                           or (self._client and self._output) or self._kicks != kicks):
                    self._cond.wait()
                if self._closing or self._broken or thread.stopping:
                    return
                if not (self._client and self._output):
                    continue          # woken to pass the checkpoint
                conn = self._client
                chunk = bytes(self._output)
                self._output.clear()
                self._sending_on = conn
            try:
                # A client that does not read blocks this: close() and _drop_client() shut
                # the connection down, which ends the send.
                concurrency.may_block("the UART's client to take output")
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

    def _thread_failed(self, exc: BaseException) -> None:
        """(DeviceThread.on_error) End the connection and serve nobody: the other thread
        stops at its next wait, and output is dropped from now on."""
        import socket
        with self._cond:
            self._broken = f"{type(exc).__name__}: {exc}"
            client, self._client = self._client, None
            self._output.clear()
            if client is not None:
                self._orphans.append(client)
            self._cond.notify_all()
        self._wake.wake()
        if client is not None:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        log.error("uart socket backend on %s: a thread died (%s); the connection was "
                  "closed and no client is served any more", self._describe(), self._broken)

    def _describe(self) -> str:
        try:
            return str(self.address)
        except OSError:
            return "a closed listener"

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
        import socket
        with self._cond:
            if self._closing:
                return
            self._closing = True
            client = self._client
            self._cond.notify_all()
        if client is not None:
            try:
                client.shutdown(socket.SHUT_RDWR)   # the client sees the connection end
            except OSError:
                pass
        for t in self._threads:
            t.stop(JOIN_TIMEOUT)
        self._listener.close()
        if not any(t.is_alive() for t in self._threads):
            self._wake.close()
            for conn in self._orphans:
                conn.close()
            self._orphans.clear()
        if self._unix_path is not None:
            try:
                if os.stat(self._unix_path).st_ino == self._unix_inode:
                    os.unlink(self._unix_path)
            except OSError:
                pass


def _tcp_listener(label: str, rest: str) -> socket.socket:
    import socket
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
    import socket
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
    import socket
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
_stdio_lock = concurrency.lock(concurrency.LEAF, "stdio")


def _open_stdio(label: str, on_quit=None) -> StdioBackend:
    global _stdio_user
    with _stdio_lock:
        if _stdio_user is not None:
            raise ConfigError(f"{label}: stdio is already used by {_stdio_user}")
        _stdio_user = label
    backend = StdioBackend(on_quit=on_quit)

    def release() -> None:
        global _stdio_user
        with _stdio_lock:
            _stdio_user = None

    backend.on_close = release
    return backend


def open_backend(spec: str, label: str = "uart", on_quit: Optional[Callable[[], None]] = None):
    """Build the backend named by spec; label (e.g. 'com1') prefixes error messages;
    on_quit is what the console escape's quit (Ctrl-A x, stdio on a terminal) calls."""
    spec = (spec or "").strip()
    kind, eq, rest = spec.partition("=")
    if spec == "null":
        return NullBackend()
    if spec == "stdio":
        return _open_stdio(label, on_quit)
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
