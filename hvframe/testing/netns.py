"""Network namespaces for tests: a private network the test makes, with taps, peers and a DHCP
server in it, and nothing left behind (not even when the test fails or the run is killed).

    with Netns() as ns:
        ns.add_tap("tap0", "10.0.2.1/24")               # the VMM attaches to it from inside
        vmm = ns.popen([...qemu or hvframe...])         # a process started inside the namespace
        assert ns.ping("10.0.2.15", count=5) >= 1       # ICMP from the namespace, replies counted
        sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)   # any socket, made inside it

Everything is done with the `ip` command (iproute2, on every Debian) and a raw setns(2) in a
short-lived thread, so there is no new dependency. Needs root (CAP_NET_ADMIN) and
/dev/net/tun; `netns_missing()` says why not, for skip reasons.

Namespaces are named hvft-<pid>-<n>; one whose creating process is gone (a killed test run)
is deleted the next time a Netns is made. Deleting a namespace deletes the taps and veths in
it; processes started with popen() are killed first (their whole process group).
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Optional, Sequence

IP = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
DNSMASQ = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
PREFIX = "hvft-"
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
_counter = itertools.count()


def netns_missing() -> Optional[str]:
    """Why network namespaces cannot be made here, or None."""
    if IP is None:
        return "needs the ip command (Debian: iproute2)"
    if os.geteuid() != 0:
        return "needs root to make network namespaces and taps"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([IP, *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def remove_stale() -> None:
    """Delete namespaces a test run that no longer exists left behind."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"{PREFIX}(\d+)-\d+\b", line)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _ip("netns", "del", m.group(0), check=False)


_libc = ctypes.CDLL(None, use_errno=True)


def _in_netns(name: str, fn):
    """Run fn() on a new thread that has entered namespace `name` (setns changes only the
    calling thread); return its result. Sockets keep the namespace they were made in."""
    result: dict = {}

    def body():
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result["error"] = e

    t = threading.Thread(target=body, name=f"setns-{name}")
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


class Netns:
    """One network namespace, deleted (with everything in it) on close()."""

    def __init__(self) -> None:
        remove_stale()
        self.name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        _ip("netns", "add", self.name)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- configuration ------------------------------------------------------------------
    def ip(self, *args: str) -> str:
        """`ip -n NAME ARGS...`; its output. Raises with ip's message on failure."""
        return _ip("-n", self.name, *args).stdout

    def add_tap(self, dev: str, address: Optional[str] = None, *, multi_queue: bool = False,
                up: bool = True) -> None:
        """A persistent tap `dev` in the namespace (a VMM started with popen() attaches to it
        by name), with an IPv4 address/prefix if given."""
        self.ip("tuntap", "add", "dev", dev, "mode", "tap", *(["multi_queue"] if multi_queue else []))
        if address:
            self.ip("addr", "add", address, "dev", dev)
        if up:
            self.ip("link", "set", dev, "up")

    def add_uplink(self, dev: str, address: str, gateway: Optional[str] = None) -> None:
        """An interface `dev` with an address (and a default route through `gateway`), the
        other end of a veth pair whose far end (`dev`-peer) stays down in the namespace: what
        passt needs to see to pick its addresses. (A veth, as the dummy module may be
        missing from a host's kernel.)"""
        self.ip("link", "add", dev, "type", "veth", "peer", "name", f"{dev}-peer")
        self.ip("addr", "add", address, "dev", dev)
        self.ip("link", "set", f"{dev}-peer", "up")
        self.ip("link", "set", dev, "up")
        if gateway:
            self.ip("route", "add", "default", "via", gateway, "dev", dev)

    def sysctl(self, key: str, value: str) -> None:
        """Set a net.* sysctl of the namespace (key as in /proc/sys, dots or slashes)."""
        path = "/proc/sys/" + key.replace(".", "/")

        def write():
            with open(path, "w") as f:
                f.write(value)
        self.call(write)

    def link_state(self, dev: str) -> str:
        """operstate of `dev` ("UP", "DOWN", "UNKNOWN", ...)."""
        return self.ip("-o", "link", "show", dev).split(" state ")[1].split()[0]

    # ---- processes and sockets ----------------------------------------------------------
    def command(self, argv: Sequence[str]) -> list[str]:
        return [IP, "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start argv inside the namespace in a process group of its own; close() kills the
        group if it is still running."""
        p = subprocess.Popen(self.command(argv), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kw)

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket made inside the namespace (the calling thread stays where it is)."""
        return _in_netns(self.name, lambda: socket.socket(family, type, proto))

    def call(self, fn):
        """fn() run on a thread inside the namespace (open a tap there, say); its result."""
        return _in_netns(self.name, fn)

    # ---- traffic ------------------------------------------------------------------------
    def ping(self, address: str, count: int = 5, *, interval: float = 1.0,
             wait: float = 5.0, payload: bytes = b"hvframe-netns-ping") -> int:
        """Send `count` ICMP echo requests to `address` from inside the namespace, one each
        `interval` s, and return how many distinct ones were answered (waiting up to `wait`
        s after the last). Replies are matched by identifier, sequence and payload."""
        sock = self.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        ident = (os.getpid() ^ next(_counter)) & 0xFFFF
        answered: set[int] = set()
        try:
            sock.setblocking(False)
            next_send = time.monotonic()
            sent = 0
            deadline = None
            while True:
                now = time.monotonic()
                if sent < count and now >= next_send:
                    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, sent)
                    csum = _checksum(hdr + payload)
                    sock.sendto(struct.pack("!BBHHH", 8, 0, csum, ident, sent) + payload,
                                (address, 0))
                    sent += 1
                    next_send = now + interval
                    if sent == count:
                        deadline = now + wait
                if deadline is not None and (now >= deadline or len(answered) == count):
                    return len(answered)
                until = next_send if sent < count else deadline
                ready = _wait_readable(sock, max(0.0, until - time.monotonic()))
                while ready:
                    try:
                        packet, src = sock.recvfrom(65536)
                    except BlockingIOError:
                        break
                    ihl = (packet[0] & 0x0F) * 4
                    icmp = packet[ihl:]
                    if src[0] != address or len(icmp) < 8:
                        continue
                    typ, _, _, rid, seq = struct.unpack("!BBHHH", icmp[:8])
                    if typ == 0 and rid == ident and icmp[8:] == payload and seq < sent:
                        answered.add(seq)
        finally:
            sock.close()

    def capture(self, dev: str, limit: int = 400) -> "FrameLog":
        """Record the frames that cross `dev` (both ways) while the returned FrameLog is
        open, for a failure message: `with ns.capture("tap0") as log: ...; log.text()`."""
        sock = self.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.bind((dev, 0))
        except OSError:
            sock.close()
            raise
        return FrameLog(sock, limit)

    # ---- DHCP ---------------------------------------------------------------------------
    def dnsmasq(self, dev: str, first: str, last: str, log_path: str,
                extra: Sequence[str] = ()) -> subprocess.Popen:
        """dnsmasq (Debian: dnsmasq-base) serving DHCP on `dev` from first..last, no DNS,
        logging every DHCP exchange to `log_path`. Killed by close()."""
        if DNSMASQ is None:
            raise RuntimeError("dnsmasq is not installed (Debian: dnsmasq-base)")
        lease_file = log_path + ".leases"
        return self.popen([DNSMASQ, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                           "--port=0", f"--interface={dev}", "--bind-interfaces",
                           f"--dhcp-range={first},{last},255.255.255.0,1h",
                           f"--dhcp-leasefile={lease_file}", "--log-dhcp",
                           f"--log-facility={log_path}", "--user=root",
                           f"--pid-file={log_path}.pid", *extra],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)

    # ---- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        """Kill what popen() started, then delete the namespace (and its devices)."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        _ip("netns", "del", self.name, check=False)


class FrameLog:
    """Frames seen on one device (Netns.capture): a reader thread, stopped by close(),
    keeps the last `limit` as one-line descriptions with their time and direction."""

    def __init__(self, sock: socket.socket, limit: int):
        self._sock = sock
        self._lines: collections.deque[str] = collections.deque(maxlen=limit)
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="netns-capture", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        from .netframes import describe
        while not self._stop.is_set():
            if not _wait_readable(self._sock, 0.2):
                continue
            try:
                frame, addr = self._sock.recvfrom(65536)
            except OSError:
                return
            way = "out" if addr[2] == socket.PACKET_OUTGOING else "in "
            self._lines.append(f"{time.monotonic() - self._start:8.3f} {way} {describe(frame)}")

    def text(self) -> str:
        """The frames so far, oldest first ("out": sent by the namespace's side)."""
        return "\n".join(list(self._lines)) + "\n"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def __enter__(self) -> "FrameLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wait_readable(sock: socket.socket, timeout: float) -> bool:
    import select
    r, _, _ = select.select([sock], [], [], timeout)
    return bool(r)
