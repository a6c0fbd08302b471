"""Where a running VM can be found: a run directory named after it, holding its pidfile
(`pid`, locked while the VM runs) and its QMP control socket (`qmp.sock`).

The base is $HVFRAME_RUN_DIR if set (tests, several users' sandboxes), else
$XDG_RUNTIME_DIR/hvframe, else /run/hvframe for root, else /tmp/hvframe-UID. `hvframe run`
and `hvframe ctl` find each other through it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re

from ..errors import ConfigError

PIDFILE = "pid"
SOCKET = "qmp.sock"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
# sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
UNIX_PATH_MAX = 107


def base_dir() -> str:
    env = os.environ.get("HVFRAME_RUN_DIR")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "hvframe")
    if os.geteuid() == 0:
        return "/run/hvframe"
    return f"/tmp/hvframe-{os.geteuid()}"


def default_name() -> str:
    """The name of a VM started without one (bhyve requires one; hvframe does not)."""
    return f"vm-{os.getpid()}"


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ConfigError(f"VM name {name!r}: use 1-64 letters, digits, '.', '_', '+' or '-', "
                          "starting with a letter or digit")
    return name


def vm_dir(name: str) -> str:
    return os.path.join(base_dir(), check_name(name))


def socket_path(name: str) -> str:
    return os.path.join(vm_dir(name), SOCKET)


def running_vms() -> list[str]:
    """Names of the VMs whose pidfile is locked (running) under the base directory."""
    try:
        names = sorted(os.listdir(base_dir()))
    except OSError:
        return []
    out = []
    for n in names:
        pid = os.path.join(base_dir(), n, PIDFILE)
        try:
            fd = os.open(pid, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            out.append(n)          # held by the running VM
        finally:
            os.close(fd)
    return out


class RunDir:
    """The run directory of one VM, claimed for as long as it runs (flock on the pidfile:
    released by the kernel however the process ends, so a stale directory is simply taken
    over). close() removes the pidfile and socket and, if empty, the directory."""

    def __init__(self, name: str):
        self.name = check_name(name)
        self.path = vm_dir(name)
        self.pidfile = os.path.join(self.path, PIDFILE)
        self.socket = os.path.join(self.path, SOCKET)
        if len(self.socket.encode()) > UNIX_PATH_MAX:
            raise ConfigError(f"run directory {self.path}: too long for a socket path "
                              f"(set HVFRAME_RUN_DIR to a shorter directory)")
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"run directory {self.path}: {e.strerror}") from None
        self._fd = os.open(self.pidfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            other = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"VM {name!r} is already running (pid {other or '?'}; "
                                  f"run directory {self.path})") from None
            raise ConfigError(f"{self.pidfile}: {e.strerror}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in (self.socket, self.pidfile):
            try:
                os.unlink(p)
            except OSError:
                pass
        os.close(self._fd)          # the lock goes with it
        try:
            os.rmdir(self.path)
        except OSError:
            pass
