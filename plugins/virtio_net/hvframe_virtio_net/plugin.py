"""Device type virtio-net: `-s N,virtio-net,BACKEND[,mac=..][,mtu=..][,queues=N]`.

BACKEND, bhyve's way first: `tapN` (any tap name as the first item), or `tap=NAME`; the stream
backends `passt=PATH`, `stream=unix:PATH`, `socket=listen:PATH|connect:PATH` and a handed-in
tap `fd=N` come from hvframe_virtio_net.stream (`open_backend(kind, value, queue_pairs)`).
"""
from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass

from hvframe.device import DeviceType, PciAddress, PciOptions, option
from hvframe.errors import ConfigError
from hvframe.hookspecs import hookimpl
from hvframe.virtio.pci import MAX_QUEUES, VirtioPciFunction

from .backend import BackendError, NetBackend
from .layout import ETH_HLEN

QUEUE_SIZES = (64, 128, 256, 512, 1024)
MAX_PAIRS = (MAX_QUEUES - 1) // 2
STREAM_KINDS = ("passt", "stream", "socket", "fd")
TAP_PREFIXES = ("tap",)


@dataclass
class VirtioNetOptions(PciOptions):
    backend: str | None = option(None, positional=True, example="tap0",
                                 help="tapN: the tap interface to attach to")
    tap: str | None = option(None, help="tap interface name (created if missing)")
    passt: str | None = option(None, help="passt's Unix socket")
    stream: str | None = option(None, help="unix:PATH, frames after a 4-byte length")
    socket: str | None = option(None, help="listen:PATH or connect:PATH, VM to VM")
    fd: str | None = option(None, help="a tap descriptor handed in by a manager")
    mac: str | None = option(None, example="52:54:00:12:34:56",
                             help="MAC address (default: stable, derived from the host, the "
                                  "backend and the slot)")
    mtu: int | None = option(None, unit="bytes", help="MTU offered to the guest (VIRTIO_NET_F_MTU)")
    queues: int = option(1, min=1, max=MAX_PAIRS,
                         help="queue pairs (VIRTIO_NET_F_MQ when more than 1)")
    queue_size: int = option(256, unit="descriptors", help="descriptors per queue: "
                             + ", ".join(map(str, QUEUE_SIZES)))

    def check(self) -> None:
        if self.queue_size not in QUEUE_SIZES:
            raise ValueError(f"queue-size={self.queue_size} must be one of "
                             f"{', '.join(map(str, QUEUE_SIZES))}")


def default_mac(backend_desc: str, address: tuple[int, int, int]) -> bytes:
    """A stable, locally administered unicast MAC for this VM's device: hvframe has no VM
    name, so what names the VM here is the host and the backend it is attached to (two VMs
    cannot share a tap or a socket), with the PCI address."""
    b, s, f = address
    digest = hashlib.sha256(f"{socket.gethostname()}|{backend_desc}|{b}:{s}:{f}".encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


def _backend_choice(options: VirtioNetOptions, where: str) -> tuple[str, str]:
    given = {"tap": options.tap, "passt": options.passt, "stream": options.stream,
             "socket": options.socket, "fd": options.fd}
    chosen = [(k, v) for k, v in given.items() if v]
    positional = options.backend
    if positional:
        if not positional.startswith(TAP_PREFIXES):
            raise ConfigError(f"{where}: unknown backend {positional!r}; use tapN, tap=NAME, "
                              f"passt=PATH, stream=unix:PATH, socket=listen:PATH|connect:PATH "
                              f"or fd=N")
        chosen.insert(0, ("tap", positional))
    if not chosen:
        raise ConfigError(f"{where}: no backend; use -s N,virtio-net,tapN (or tap=, passt=, "
                          f"stream=, socket=, fd=)")
    if len(chosen) > 1:
        raise ConfigError(f"{where}: more than one backend ({', '.join(k for k, _ in chosen)})")
    return chosen[0]


def open_backend(kind: str, value: str, pairs: int) -> NetBackend:
    if kind == "tap":
        from .tap import open_tap
        return open_tap(value, pairs)
    try:
        from .stream import open_backend as open_stream
    except ImportError:
        raise BackendError(f"the {kind}= backend is not part of this build") from None
    return open_stream(kind, value, pairs)


def virtio_net_factory(machine, options: VirtioNetOptions, address: PciAddress) -> VirtioPciFunction:
    where = f"virtio-net at {address}"
    pairs, qsize, mtu = options.queues, options.queue_size, options.mtu
    mac = None
    if options.mac is not None:
        from .virtio_net import parse_mac
        try:
            mac = parse_mac(options.mac)
        except ValueError as e:
            raise ConfigError(f"{where}: mac={e}") from None
    kind, value = _backend_choice(options, where)
    try:
        from .virtio_net import VirtioNet
    except ImportError as e:
        raise ConfigError(f"{where}: the native data path is not built ({e}); "
                          f"reinstall hvframe-virtio-net") from None
    try:
        backend = open_backend(kind, value, pairs)
    except BackendError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        if mtu is not None and not 68 <= mtu <= min(65535, backend.max_frame - ETH_HLEN):
            raise ConfigError(f"{where}: mtu={mtu} must be 68-"
                              f"{min(65535, backend.max_frame - ETH_HLEN)}")
        nfds = len(backend.queue_fds())
        if nfds != pairs and nfds != 1:
            raise ConfigError(f"{where}: the {kind} backend gave {nfds} descriptors for "
                              f"{pairs} queue pairs")
        dev = VirtioNet(backend, mac=mac or default_mac(f"{kind}={value}", tuple(address)),
                        queue_pairs=pairs, mtu=mtu, queue_size=qsize)
        return VirtioPciFunction(dev, name=f"virtio-net {address}")
    except BaseException:
        backend.close()
        raise


def virtio_net_device_types() -> list[DeviceType]:
    return [DeviceType(
        name="virtio-net", kind="pci", factory=virtio_net_factory,
        summary="virtio network device (transitional virtio-pci 1af4:1000) on a tap or a "
                "stream socket",
        options=VirtioNetOptions,
        examples=("-s 3,virtio-net,tap0", "-s 3,virtio-net,tap=hv0,mac=52:54:00:12:34:56,queues=2",
                  "-s 3,virtio-net,passt=/run/user/1000/passt.socket",
                  "-s 3,virtio-net,socket=listen:/tmp/vm1.sock"))]


@hookimpl
def hvframe_device_types() -> list[DeviceType]:
    return virtio_net_device_types()
