"""UART backends: file, TCP and unix sockets (127.0.0.1 only), stdio on a pty, bad specs."""
import os
import queue
import socket
import termios
import time

import pytest

from hvframe.errors import ConfigError
from hvframe_uart.backends import FileBackend, NullBackend, StdioBackend, open_backend

TIMEOUT = 5.0


class Inbox:
    """on_input callback that collects bytes; wait_for() blocks until enough arrived."""

    def __init__(self):
        self._q = queue.Queue()
        self.data = bytearray()

    def __call__(self, data):
        self._q.put(bytes(data))

    def wait_for(self, n):
        deadline = time.monotonic() + TIMEOUT
        while len(self.data) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self.data += self._q.get(timeout=remaining)
            except queue.Empty:
                break
        return bytes(self.data)


def wait_ended(thread, timeout=TIMEOUT):
    """Wait (with a deadline) for a backend's DeviceThread to end by itself."""
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)


def recv_exactly(sock, n):
    sock.settimeout(TIMEOUT)
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


# ---- spec parsing --------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["foo", "", "tcp", "file", "serial=/dev/ttyS0", "stdio,raw"])
def test_unknown_spec_is_a_one_line_config_error(spec):
    with pytest.raises(ConfigError) as e:
        open_backend(spec, label="com1")
    msg = str(e.value)
    assert msg.startswith("com1: unknown backend")
    assert "stdio, null, file=PATH, tcp=HOST:PORT or unix=PATH" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("spec, words", [
    ("tcp=127.0.0.1", "tcp=HOST:PORT"),
    ("tcp=127.0.0.1:http", "tcp=HOST:PORT"),
    ("tcp=127.0.0.1:70000", "tcp=HOST:PORT"),
    ("file=", "file=PATH"),
    ("unix=", "unix=PATH"),
    ("file=/nonexistent-dir/out.log", "cannot open"),
])
def test_malformed_specs_say_what_is_wrong(spec, words):
    with pytest.raises(ConfigError) as e:
        open_backend(spec, label="com2")
    assert str(e.value).startswith("com2: ")
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_null_backend_accepts_output():
    b = open_backend("null")
    assert isinstance(b, NullBackend)
    b.start(lambda data: None)
    b.write(b"gone")
    b.close()


def test_tcp_port_in_use_is_a_config_error():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            open_backend(f"tcp=127.0.0.1:{port}", label="com1")
    finally:
        holder.close()


# ---- file ----------------------------------------------------------------------------------

def test_file_backend_writes_output(tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"old run\n")
    b = open_backend(f"file={path}")
    assert isinstance(b, FileBackend)
    b.start(lambda data: pytest.fail("a file gives no input"))
    b.write(b"hello ")
    b.write(b"world\n")
    b.close()
    b.write(b"after close")                 # ignored, no error
    assert path.read_bytes() == b"hello world\n"


# ---- TCP -----------------------------------------------------------------------------------

@pytest.fixture
def tcp_backend():
    b = open_backend("tcp=127.0.0.1:0", label="com1")
    inbox = Inbox()
    b.start(inbox)
    yield b, inbox
    b.close()


def connect_tcp(backend):
    host, port = backend.address
    assert host == "127.0.0.1"
    return socket.create_connection((host, port), timeout=TIMEOUT)


def test_tcp_input_and_output(tcp_backend):
    b, inbox = tcp_backend
    with connect_tcp(b) as client:
        client.sendall(b"hello guest")
        assert inbox.wait_for(11) == b"hello guest"
        b.write(b"hello client")
        assert recv_exactly(client, 12) == b"hello client"


def test_tcp_output_without_client_is_dropped(tcp_backend):
    b, inbox = tcp_backend
    b.write(b"nobody hears this")
    with connect_tcp(b) as client:
        client.sendall(b"!")
        inbox.wait_for(1)                   # the backend has accepted us by now
        b.write(b"seen")
        assert recv_exactly(client, 4) == b"seen"
        client.settimeout(0.2)
        with pytest.raises(socket.timeout):
            client.recv(100)


def test_tcp_serves_clients_one_after_another(tcp_backend):
    b, inbox = tcp_backend
    with connect_tcp(b) as first:
        first.sendall(b"1")
        assert inbox.wait_for(1) == b"1"
    with connect_tcp(b) as second:
        second.sendall(b"2")
        assert inbox.wait_for(2) == b"12"
        b.write(b"to second")
        assert recv_exactly(second, 9) == b"to second"


def test_tcp_close_with_client_connected_is_prompt():
    b = open_backend("tcp=127.0.0.1:0")
    inbox = Inbox()
    b.start(inbox)
    client = connect_tcp(b)
    client.sendall(b"x")
    inbox.wait_for(1)
    started = time.monotonic()
    b.close()
    assert time.monotonic() - started < 1.0
    assert recv_exactly(client, 1) == b""   # the client sees the connection end
    client.close()


# ---- unix ----------------------------------------------------------------------------------

def test_unix_input_output_and_cleanup(tmp_path):
    path = str(tmp_path / "com1.sock")
    b = open_backend(f"unix={path}")
    inbox = Inbox()
    b.start(inbox)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(TIMEOUT)
            client.connect(path)
            client.sendall(b"over unix")
            assert inbox.wait_for(9) == b"over unix"
            b.write(b"reply")
            assert recv_exactly(client, 5) == b"reply"
    finally:
        b.close()
    assert not os.path.exists(path)


def test_unix_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "stale.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(path)
    old.close()                             # leaves the socket file behind
    assert os.path.exists(path)
    b = open_backend(f"unix={path}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(TIMEOUT)
            client.connect(path)            # the new listener answers
    finally:
        b.close()


def test_unix_refuses_to_replace_a_regular_file(tmp_path):
    path = tmp_path / "notasocket"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        open_backend(f"unix={path}", label="com1")
    assert path.read_text() == "keep me"


def test_unix_refuses_a_socket_in_use(tmp_path):
    path = str(tmp_path / "busy.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(ConfigError, match="in use"):
            open_backend(f"unix={path}", label="com1")
    finally:
        live.close()


# ---- stdio ---------------------------------------------------------------------------------

def test_stdio_on_a_pty_goes_raw_and_is_restored():
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON     # a fresh pty is in cooked mode
        b = StdioBackend(in_fd=slave, out_fd=slave)
        inbox = Inbox()
        b.start(inbox)
        raw = termios.tcgetattr(slave)
        assert raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG) == 0
        os.write(master, b"\x03typed\r")    # Ctrl-C and CR reach the guest unchanged
        assert inbox.wait_for(7) == b"\x03typed\r"
        b.write(b"guest says\r\n")
        assert os.read(master, 100) == b"guest says\r\n"
        b.close()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_stdio_reads_a_pipe_until_eof():
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        b = StdioBackend(in_fd=r, out_fd=out_w)
        inbox = Inbox()
        os.write(w, b"piped input")
        os.close(w)
        b.start(inbox)
        assert inbox.wait_for(11) == b"piped input"
        wait_ended(b._thread)
        assert not b._thread.is_alive()     # EOF ends the reader
        b.write(b"out")
        assert os.read(out_r, 10) == b"out"
        b.close()
    finally:
        for fd in (r, out_r, out_w):
            os.close(fd)


def test_stdio_with_dev_null_input():
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        b = StdioBackend(in_fd=fd, out_fd=fd)
        inbox = Inbox()
        b.start(inbox)
        wait_ended(b._thread)
        assert not b._thread.is_alive()
        b.close()
        assert inbox.data == b""
    finally:
        os.close(fd)


def test_stdio_can_be_used_by_one_port_only():
    first = open_backend("stdio", label="com1")
    try:
        with pytest.raises(ConfigError, match="com2: stdio is already used by com1"):
            open_backend("stdio", label="com2")
    finally:
        first.close()
    open_backend("stdio", label="com2").close()


# ---- a UART on a real backend --------------------------------------------------------------

def test_guest_echo_over_tcp():
    from hvframe_uart.uart16550 import Uart16550

    uart = Uart16550(set_irq=lambda level: None, backend=open_backend("tcp=127.0.0.1:0"))
    uart.write(2, 1, 0xC7)                  # FIFOs on, 14-byte trigger
    uart.start()
    try:
        with connect_tcp(uart.backend) as client:
            client.sendall(b"echo me")
            echoed = 0
            deadline = time.monotonic() + TIMEOUT
            while echoed < 7 and time.monotonic() < deadline:
                if uart.read(5, 1) & 0x01:          # LSR.DR: poll like a guest with IER=0
                    uart.write(0, 1, uart.read(0, 1))
                    echoed += 1
                else:
                    time.sleep(0.001)
            assert recv_exactly(client, 7) == b"echo me"
    finally:
        uart.close()


# ---- threads: stop paths and leaks ---------------------------------------------------------

def backend_threads(b):
    """The backend's device threads still running, as concurrency.live_threads() sees them."""
    from hvframe import concurrency
    mine = list(getattr(b, "_threads", [])) + [t for t in [getattr(b, "_thread", None)] if t]
    assert mine, "the backend started no threads"
    return [t for t in concurrency.live_threads() if t in mine]


def test_tcp_close_with_a_client_connected_leaves_no_thread():
    b = open_backend("tcp=127.0.0.1:0")
    inbox = Inbox()
    b.start(inbox)
    assert len(backend_threads(b)) == 2                   # reader and writer
    client = connect_tcp(b)
    try:
        client.sendall(b"hi")
        assert inbox.wait_for(2) == b"hi"
        b.write(b"yo")
        assert recv_exactly(client, 2) == b"yo"
        started = time.monotonic()
        b.close()
        assert time.monotonic() - started < 1.0
        assert backend_threads(b) == []
        assert recv_exactly(client, 1) == b""             # the connection ended
    finally:
        client.close()


def test_unix_close_with_a_client_connected_leaves_no_thread(tmp_path):
    path = str(tmp_path / "com1.sock")
    b = open_backend(f"unix={path}")
    inbox = Inbox()
    b.start(inbox)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(TIMEOUT)
        client.connect(path)
        client.sendall(b"x")
        assert inbox.wait_for(1) == b"x"
        started = time.monotonic()
        b.close()
        assert time.monotonic() - started < 1.0
        assert backend_threads(b) == []
    assert not os.path.exists(path)


def test_close_while_output_is_stuck_on_a_client_that_does_not_read():
    from hvframe_uart.backends import SOCKET_OUTPUT_LIMIT

    b = open_backend("tcp=127.0.0.1:0")
    inbox = Inbox()
    b.start(inbox)
    client = connect_tcp(b)
    try:
        client.sendall(b"!")
        assert inbox.wait_for(1) == b"!"                  # connected
        chunk = bytes(64 << 10)
        deadline = time.monotonic() + TIMEOUT
        while b.dropped == 0 and time.monotonic() < deadline:
            b.write(chunk)                                 # never waits: the writer does
            time.sleep(0.001)
        assert b.dropped > 0                               # the writer is stuck in send
        assert len(b._output) <= SOCKET_OUTPUT_LIMIT
        started = time.monotonic()
        b.close()
        assert time.monotonic() - started < 1.0
        assert backend_threads(b) == []
    finally:
        client.close()


def test_uart_close_releases_a_reader_held_by_backpressure():
    from hvframe_uart.uart16550 import Uart16550

    uart = Uart16550(set_irq=lambda level: None, backend=open_backend("tcp=127.0.0.1:0"),
                     backlog_limit=1024)
    uart.start()
    b = uart.backend
    client = connect_tcp(b)
    try:
        client.sendall(bytes(16 << 10))                    # far more than the backlog holds
        deadline = time.monotonic() + TIMEOUT
        while len(uart._backlog) < 1024 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(uart._backlog) == 1024                  # the reader now waits for room
        assert len(backend_threads(b)) == 2
        started = time.monotonic()
        uart.close()
        assert time.monotonic() - started < 1.0
        assert backend_threads(b) == []
        assert recv_exactly(client, 1) == b""
    finally:
        client.close()


def test_a_paused_socket_reader_delivers_nothing_until_resumed():
    b = open_backend("tcp=127.0.0.1:0")
    inbox = Inbox()
    b.start(inbox)
    try:
        with connect_tcp(b) as client:
            client.sendall(b"a")
            assert inbox.wait_for(1) == b"a"
            reader, writer = b._threads
            assert reader.pause(2.0) and writer.pause(2.0)
            client.sendall(b"b")
            time.sleep(0.2)
            assert inbox._q.empty() and inbox.data == b"a"  # nothing while parked
            reader.resume()
            writer.resume()
            assert inbox.wait_for(2) == b"ab"
            b.write(b"ok")
            assert recv_exactly(client, 2) == b"ok"
    finally:
        b.close()
    assert backend_threads(b) == []


def test_a_reader_that_dies_of_a_bug_ends_the_connection(caplog):
    b = open_backend("tcp=127.0.0.1:0")

    def buggy(data):
        raise RuntimeError("uart model bug")

    b.start(buggy)
    client = connect_tcp(b)
    try:
        client.sendall(b"boom")
        assert recv_exactly(client, 1) == b""              # not left talking to nobody
        deadline = time.monotonic() + TIMEOUT
        while backend_threads(b) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend_threads(b) == []                    # the writer stopped too
        assert "uart-sock-reader: thread failed" in caplog.text
        assert "no client is served" in caplog.text
        b.write(b"dropped")                                # no error
        started = time.monotonic()
        b.close()
        assert time.monotonic() - started < 1.0
    finally:
        client.close()


def test_stdio_close_with_the_reader_waiting_leaves_no_thread():
    master, slave = os.openpty()
    try:
        b = StdioBackend(in_fd=slave, out_fd=slave)
        b.start(Inbox())
        assert len(backend_threads(b)) == 1
        started = time.monotonic()
        b.close()
        assert time.monotonic() - started < 1.0
        assert backend_threads(b) == []
    finally:
        os.close(master)
        os.close(slave)


def test_output_to_a_stdout_nobody_reads_never_stalls_the_guest(monkeypatch):
    """stdout is a pipe nobody reads (or a terminal stopped with ^S): the guest's writes
    return at once, what does not fit the bounded buffer is counted as dropped, and close
    gives up on the stuck writer after its deadline instead of hanging."""
    import fcntl
    import threading
    from hvframe_uart import backends
    from hvframe_uart.uart16550 import Uart16550
    monkeypatch.setattr(backends, "OUTPUT_LIMIT", 4096)   # small buffer, short test
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    b = StdioBackend(in_fd=os.open("/dev/null", os.O_RDONLY), out_fd=w)
    uart = Uart16550(lambda level: None, backend=b)
    try:
        def vcpu():
            for _ in range(16 * 4096):
                uart.write(0, 1, 0x41)                # THR, as a polled console does
        threads = [threading.Thread(target=vcpu, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a vCPU blocked on the UART's output"
        assert b.dropped > 0
        t0 = time.monotonic()
        b.close()
        assert time.monotonic() - t0 < 10
    finally:
        os.close(r)
        os.close(w)


def test_a_fifo_nobody_reads_is_refused_at_once(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(ConfigError) as e:
        open_backend(f"file={path}", label="com1")
    assert str(e.value).startswith("com1: ") and "\n" not in str(e.value)
