"""The virtio-net backend a device line names, opened: `open_backend(spec, options, queues)`.

The spec is the device's first item after its name, bhyve's way first:

    tapN | tap=NAME               a tap by name (hvframe_virtio_net.tap)
    fd=N                          a descriptor handed in: a tap with IFF_VNET_HDR, or a
                                  connected stream socket
    passt=PATH | stream=unix:PATH passt (or any server speaking the 4-byte-length stream)
    socket=listen:PATH            wait for another VM (or a test) on PATH
    socket=connect:PATH           connect to a VM that listens on PATH

A device gets the whole item as one string by declaring the positional option in
BACKEND_OPTIONS and no options named tap, fd, passt, stream or socket: `-s 3,virtio-net,passt=/x`
then arrives as options["backend"] == "passt=/x" (hvframe.device.DeviceType.parse_conf).

Every problem (bad syntax, a socket that does not answer, a tap that cannot be opened) is a
ConfigError of one line naming the spec: exit status 4.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from hvframe.device import Option
from hvframe.errors import ConfigError

from .backend import BackendError, NetBackend

SPEC_HELP = ("use tapN, tap=NAME, fd=N, passt=PATH, stream=unix:PATH, socket=listen:PATH "
             "or socket=connect:PATH")
BACKEND_OPTIONS: tuple[Option, ...] = (
    Option("backend", "str", None, f"where frames go: {SPEC_HELP[4:]}", required=True),)
BACKEND_POSITIONAL = ("backend",)


def open_backend(spec: str, options: Mapping[str, Any] | None = None,
                 queues: int = 1) -> NetBackend:
    """Open the backend `spec` names for `queues` queue pairs. `options` are the device's
    validated options (no backend reads any yet; they are passed so one can without a new
    signature). Raises ConfigError, one line."""
    label = f"virtio-net backend {spec!r}" if spec else "virtio-net"
    if not spec:
        raise ConfigError(f"virtio-net: needs a backend: {SPEC_HELP}")
    if not isinstance(queues, int) or queues < 1:
        raise ConfigError(f"{label}: queues={queues} must be at least 1")
    try:
        return _open(spec, label, queues)
    except BackendError as e:
        raise ConfigError(str(e)) from None


def open_spec(spec: str, queues: int = 1) -> NetBackend:
    """The same as open_backend, raising BackendError with messages that start with the spec
    (for a caller that names the device itself, as the plugin does)."""
    return _open(spec, spec, queues)


def _open(spec: str, label: str, queues: int) -> NetBackend:
    key, eq, value = spec.partition("=")
    if not eq:
        if re.fullmatch(r"tap\d+", spec):
            return _open_tap(spec, label, queues)
        raise BackendError(f"{label}: unknown backend; {SPEC_HELP}")
    if key == "tap":
        if not value or len(value.encode()) > 15 or "/" in value or value.strip() != value:
            raise BackendError(f"{label}: a tap name is 1-15 characters with no '/' or spaces")
        return _open_tap(value, label, queues)
    if key == "fd":
        if not re.fullmatch(r"\d+", value):
            raise BackendError(f"{label}: fd= wants a descriptor number")
        from .stream import open_fd
        return open_fd(label, int(value), queues)
    from .stream import StreamBackend
    if key == "passt":
        _one_queue(label, queues)
        return StreamBackend(label, connect=value)
    if key == "stream":
        kind, colon, path = value.partition(":")
        if kind != "unix" or not colon:
            raise BackendError(f"{label}: stream= wants unix:PATH")
        _one_queue(label, queues)
        return StreamBackend(label, connect=path)
    if key == "socket":
        kind, colon, path = value.partition(":")
        if kind not in ("listen", "connect") or not colon:
            raise BackendError(f"{label}: socket= wants listen:PATH or connect:PATH")
        _one_queue(label, queues)
        return StreamBackend(label, **{kind: path})
    raise BackendError(f"{label}: unknown backend; {SPEC_HELP}")


def _one_queue(label: str, queues: int) -> None:
    if queues != 1:
        raise BackendError(f"{label}: a stream carries one queue pair, not queues={queues} "
                           "(multiple queue pairs need a tap)")


def _open_tap(name: str, label: str, queues: int) -> NetBackend:
    try:
        from .tap import open_tap        # the tap backend comes with the device model
    except ImportError:
        raise BackendError(f"{label}: this build has no tap backend") from None
    return open_tap(name, queues)
