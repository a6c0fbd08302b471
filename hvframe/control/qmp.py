"""QMP, QEMU's machine protocol, on Unix stream sockets.

The wire protocol as QEMU speaks it: on connect the server sends a greeting
({"QMP": {"version": ..., "capabilities": []}}); the client must first execute
`qmp_capabilities`; then each {"execute": NAME, "arguments": {...}, "id": ANY} gets
{"return": ...} or {"error": {"class": ..., "desc": ...}}, with the id echoed, and the
server sends {"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}} when
something happens. Input is a stream of JSON values, not lines: a value may span reads and
several may come in one.

Everything a client sends is checked: a value that is not an object, not valid JSON, a
command that does not exist or arguments of the wrong name or type get QEMU's error
replies (GenericError, CommandNotFound) and the session goes on. What a client can make
the server hold is bounded: input not yet framed (JSON_LIMIT bytes, else the client is told
and disconnected), nesting (MAX_DEPTH), output it does not read (OUTPUT_LIMIT, else it is
disconnected), and clients (MAX_CLIENTS).

Threads: one control thread (a DeviceThread owned by the QmpServer, whose owner is the VM's
Lifecycle) accepts, reads, runs commands and writes; emit() may be called from any thread
and only queues (a bounded deque) and wakes it through an eventfd. Commands run on the
control thread, so a command that waits (stop: the vCPUs to park) holds up other clients
for at most its deadline and never a vCPU or device thread.
"""
from __future__ import annotations

import codecs
import os
import selectors
import socket
import stat
import time
from collections import deque, namedtuple

from .. import concurrency
from ..errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


JSON_LIMIT = 1 << 20        # bytes of one JSON value being received
OUTPUT_LIMIT = 4 << 20      # bytes queued for a client that does not read
MAX_DEPTH = 64              # nesting of arrays and objects in one value
MAX_CLIENTS = 16
EVENT_BACKLOG = 1024        # events queued for the control thread
READ_CHUNK = 65536

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"


class QmpError(Exception):
    """A command's error reply: QEMU's error class and a description."""

    def __init__(self, desc: str, cls: str = GENERIC_ERROR):
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


# name: str; type: str, int, bool, list or dict; required: bool
Arg = namedtuple("Arg", "name type required", defaults=(False,))

# name: str; handler(**arguments) -> the "return" value; args: tuple[Arg, ...]
Command = namedtuple("Command", "name handler args", defaults=((),))


_TYPE_NAMES = {str: "string", int: "int", bool: "boolean", list: "array", dict: "object"}


def check_arguments(cmd: Command, arguments: dict) -> dict:
    """QEMU's argument checks: unknown names, missing required ones, wrong JSON types."""
    known = {a.name: a for a in cmd.args}
    for name in arguments:
        if name not in known:
            raise QmpError(f"Parameter '{name}' is unexpected")
    for a in cmd.args:
        if a.name not in arguments:
            if a.required:
                raise QmpError(f"Parameter '{a.name}' is missing")
            continue
        v = arguments[a.name]
        ok = isinstance(v, a.type) and not (a.type is int and isinstance(v, bool))
        if not ok:
            raise QmpError(f"Invalid parameter type for '{a.name}', expected: "
                           f"{_TYPE_NAMES[a.type]}")
    return arguments


class FramingError(Exception):
    """The input cannot be framed any further (too long, too deep): the client goes."""


class JsonStream:
    """Cuts a byte stream into JSON values. A scanner follows strings and brackets to find
    where a top-level array or object ends (as QEMU's JSON streamer does); each framed value
    is then decoded with json.JSONDecoder.raw_decode. Anything else at the top level is cut
    at the next white space or bracket. The unframed remainder is bounded by `limit`."""

    WS = " \t\r\n"

    def __init__(self, limit: int = JSON_LIMIT, max_depth: int = MAX_DEPTH):
        self.limit, self.max_depth = limit, max_depth
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        import json      # here, and where JSON is written: a run no client talks to needs none
        self._decoder = json.JSONDecoder()
        self._buf = ""
        self._reset()

    def _reset(self) -> None:
        self._start: int | None = None
        self._i = 0
        self._depth = 0
        self._in_str = False
        self._esc = False

    def feed(self, data: bytes) -> list[tuple[bool, Any]]:
        """(True, value) for each value framed, (False, error description) for each piece
        that is not JSON. FramingError when the limits are passed."""
        self._buf += self._utf8.decode(data)
        out = []
        while True:
            item = self._next()
            if item is None:
                break
            out.append(item)
        if len(self._buf) > self.limit:
            raise FramingError(f"JSON value longer than {self.limit} bytes")
        return out

    def _take(self, end: int) -> str:
        text = self._buf[self._start:end]
        self._buf = self._buf[end:]
        self._reset()
        return text

    def _next(self) -> tuple[bool, Any] | None:
        buf, n = self._buf, len(self._buf)
        i = self._i
        if self._start is None:
            while i < n and buf[i] in self.WS:
                i += 1
            if i == n:
                self._buf, self._i = "", 0
                return None
            self._start = i
            c = buf[i]
            if c not in "{[":
                # A scalar or garbage: up to the next white space or bracket (a lone
                # closing bracket is a token of its own).
                j = i + 1
                if c not in "}]":
                    while j < n and buf[j] not in self.WS and buf[j] not in "{}[]":
                        j += 1
                    if j == n:
                        self._i = j
                        return None            # may go on in the next read
                return self._decode(self._take(j))
        depth, in_str, esc = self._depth, self._in_str, self._esc
        while i < n:
            c = buf[i]
            i += 1
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c in "{[":
                depth += 1
                if depth > self.max_depth:
                    raise FramingError(f"JSON nesting deeper than {self.max_depth}")
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return self._decode(self._take(i))
        self._i, self._depth, self._in_str, self._esc = i, depth, in_str, esc
        return None

    def _decode(self, text: str) -> tuple[bool, Any]:
        import json
        try:
            value, end = self._decoder.raw_decode(text)
        except (json.JSONDecodeError, RecursionError) as e:
            return False, f"JSON parse error, {getattr(e, 'msg', 'nesting too deep')}"
        if text[end:].strip():
            return False, "JSON parse error, extra data after a value"
        return True, value


def timestamp() -> dict:
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t % 1) * 1_000_000)}


class _Session:
    def __init__(self, sock: socket.socket, server: "QmpServer"):
        self.sock = sock
        self.stream = JsonStream()
        self.out = bytearray()
        self.negotiated = False
        self.closing = False          # close once the output is out
        self.server = server

    def send(self, obj: dict) -> None:
        import json
        data = json.dumps(obj, separators=(", ", ": ")).encode() + b"\r\n"
        if len(self.out) + len(data) > OUTPUT_LIMIT:
            raise FramingError("client does not read its replies")
        self.out += data


class QmpServer:
    """The QMP monitor: listeners added with listen(), served by one control thread."""

    def __init__(self, commands: dict[str, Command], version: dict, *, name: str = "qmp"):
        self.commands = commands
        self.version = version
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel.register(self._wake_fd, selectors.EVENT_READ, ("wake", None))
        self._listeners: list[tuple[socket.socket, str]] = []
        self._sessions: dict[int, _Session] = {}
        self._events: deque = deque(maxlen=EVENT_BACKLOG)
        self._events_lock = concurrency.lock(concurrency.LEAF, "qmp events")
        self._thread: concurrency.DeviceThread | None = None
        self.events_dropped = 0
        self.clients_refused = 0
        self._flush_deadline = 0.0

    # -- set-up ---------------------------------------------------------------------------
    def listen(self, path: str) -> None:
        """Listen on a Unix socket at path. A stale socket there is replaced; a live one (a
        VM answers on it) or anything that is not a socket is refused."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise ConfigError(f"--qmp unix:{path}: {e.strerror}") from None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"--qmp unix:{path}: exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
                raise ConfigError(f"--qmp unix:{path}: another process is listening there")
            except OSError:
                os.unlink(path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o077)          # the monitor controls the VM: owner only
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(8)
        except OSError as e:
            sock.close()
            raise ConfigError(f"--qmp unix:{path}: {e.strerror}") from None
        sock.setblocking(False)
        self._listeners.append((sock, path))
        self._sel.register(sock, selectors.EVENT_READ, ("listen", sock))

    def start(self) -> None:
        self._thread = concurrency.DeviceThread(f"{self.name}-control", self._run,
                                                wake=self._wake).start()

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass

    def emit(self, event: str, data: dict | None = None) -> None:
        """Any thread: send an event to every client that has negotiated capabilities."""
        msg = {"event": event, "data": data or {}, "timestamp": timestamp()}
        with self._events_lock:
            if len(self._events) == self._events.maxlen:
                self.events_dropped += 1
            self._events.append(msg)
        self._wake()

    def stop(self, flush_deadline: float = 1.0) -> None:
        """Send what is queued (events, replies) for up to flush_deadline, then stop the
        control thread, close every socket and remove the socket files."""
        if self._thread is not None:
            self._flush_deadline = time.monotonic() + flush_deadline
            self._thread.stop()
            if self._thread.is_alive():
                return              # reported by DeviceThread; its sockets are left to it
        for s in list(self._sessions.values()):
            self._drop(s)
        for sock, path in self._listeners:
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass
        self._listeners.clear()
        self._sel.close()
        os.close(self._wake_fd)
        self._wake_fd = -1

    # -- the control thread ---------------------------------------------------------------
    def _run(self, thread: concurrency.DeviceThread) -> None:
        while not thread.stopping:
            concurrency.may_block("QMP clients")
            for key, mask in self._sel.select():
                kind, obj = key.data
                if kind == "wake":
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                elif kind == "listen":
                    self._accept(obj)
                else:
                    self._service(obj, mask)
            self._deliver_events()
        self._final_flush()

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        if len(self._sessions) >= MAX_CLIENTS:
            self.clients_refused += 1
            conn.close()
            return
        conn.setblocking(False)
        s = _Session(conn, self)
        self._sessions[conn.fileno()] = s
        self._sel.register(conn, selectors.EVENT_READ, ("client", s))
        s.send({"QMP": {"version": self.version, "capabilities": []}})
        self._want_write(s)

    def _want_write(self, s: _Session) -> None:
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if s.out else 0)
        if s.closing:
            mask = selectors.EVENT_WRITE if s.out else 0
        if mask == 0:
            self._drop(s)
            return
        try:
            self._sel.modify(s.sock, mask, ("client", s))
        except (KeyError, ValueError):
            pass

    def _drop(self, s: _Session) -> None:
        self._sessions.pop(s.sock.fileno(), None)
        try:
            self._sel.unregister(s.sock)
        except (KeyError, ValueError):
            pass
        s.sock.close()

    def _service(self, s: _Session, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not s.closing:
                try:
                    data = s.sock.recv(READ_CHUNK)
                except BlockingIOError:
                    data = None
                if data == b"":
                    self._drop(s)
                    return
                if data:
                    try:
                        items = s.stream.feed(data)
                    except FramingError as e:
                        items = []
                        s.send({"error": {"class": GENERIC_ERROR, "desc": str(e)}})
                        s.closing = True
                    for ok, value in items:
                        self._handle(s, ok, value)
            if mask & selectors.EVENT_WRITE and s.out:
                n = s.sock.send(s.out)
                del s.out[:n]
        except BlockingIOError:
            pass
        except (OSError, FramingError):
            self._drop(s)
            return
        self._want_write(s)

    def _handle(self, s: _Session, ok: bool, value: Any) -> None:
        if not ok:
            s.send({"error": {"class": GENERIC_ERROR, "desc": value}})
            return
        reply: dict = {}
        if isinstance(value, dict) and "id" in value:
            reply["id"] = value["id"]
        try:
            reply = {"return": self._execute(s, value), **reply}
        except QmpError as e:
            reply = {"error": {"class": e.cls, "desc": e.desc}, **reply}
        except Exception as e:       # a bug in a command: an error reply, never a dead monitor
            import logging      # only here: every run imports this module
            logging.getLogger(__name__).exception("QMP command failed")
            reply = {"error": {"class": GENERIC_ERROR,
                               "desc": f"internal error: {type(e).__name__}: {e}"}, **reply}
        s.send(reply)

    def _execute(self, s: _Session, msg: Any) -> Any:
        if not isinstance(msg, dict):
            raise QmpError("QMP input must be a JSON object")
        for key in msg:
            if key not in ("execute", "arguments", "id"):
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if "execute" not in msg:
            raise QmpError("QMP input lacks member 'execute'")
        name = msg["execute"]
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        arguments = msg.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            if s.negotiated:
                raise QmpError("Capabilities negotiation is already complete, command ignored",
                               COMMAND_NOT_FOUND)
            check_arguments(Command(name, None, (Arg("enable", list),)), arguments)
            for cap in arguments.get("enable", []):
                raise QmpError(f"Capability '{cap}' not available" if isinstance(cap, str)
                               else "Invalid parameter type for 'enable', expected: string")
            s.negotiated = True
            return {}
        if not s.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           COMMAND_NOT_FOUND)
        cmd = self.commands.get(name)
        if cmd is None:
            raise QmpError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        return cmd.handler(**check_arguments(cmd, arguments))

    def _deliver_events(self) -> None:
        with self._events_lock:
            events = list(self._events)
            self._events.clear()
        if not events:
            return
        for s in list(self._sessions.values()):
            if not s.negotiated or s.closing:
                continue
            try:
                for e in events:
                    s.send(e)
            except FramingError:
                self._drop(s)
                continue
            self._want_write(s)

    def _final_flush(self) -> None:
        """(control thread, stopping) What is queued goes out, within the flush deadline."""
        self._deliver_events()
        end = self._flush_deadline
        while any(s.out for s in self._sessions.values()) and time.monotonic() < end:
            for s in list(self._sessions.values()):
                if not s.out:
                    continue
                try:
                    n = s.sock.send(s.out)
                    del s.out[:n]
                except BlockingIOError:
                    pass
                except OSError:
                    self._drop(s)
            time.sleep(0.005)
