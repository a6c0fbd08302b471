"""Device type passthru: `-s N,passthru,vfio-user=PATH` (a device served by `hvframe
serve-device` or any vfio-user server), `-s N,passthru,BUS/SLOT/FUNC` and
`-s N,passthru,sysfsdev=PATH` (a host device through kernel VFIO: refused where the host has
no /dev/vfio)."""
from __future__ import annotations

from dataclasses import dataclass

from hvframe.device import DeviceType, PciAddress, PciOptions, option
from hvframe.errors import ConfigError
from hvframe.hookspecs import hookimpl


@dataclass
class PassthruOptions(PciOptions):
    host: str | None = option(None, positional=True, example="0/3/0",
                              help="host device BUS/SLOT/FUNC (kernel VFIO)")
    vfio_user: str | None = option(None, name="vfio-user", example="/tmp/dev.sock",
                                   help="Unix socket of a vfio-user server")
    sysfsdev: str | None = option(None, help="host device by sysfs path (kernel VFIO)")

    def check(self) -> None:
        if sum(1 for v in (self.vfio_user, self.host, self.sysfsdev) if v) != 1:
            raise ValueError("give exactly one of vfio-user=PATH, BUS/SLOT/FUNC or sysfsdev=PATH")


def passthru_factory(machine, options: PassthruOptions, address: PciAddress):
    where = f"passthru at {address}"
    if options.vfio_user:
        from .backend import BackendLost
        from .passthru import open_function
        from .vfio_user import VfioUserBackend
        try:
            backend = VfioUserBackend(options.vfio_user)
        except BackendLost as e:
            raise ConfigError(f"{where}: {e}") from None
        return open_function(backend, where, f"passthru {address}")
    from .vfio_kernel import open_host_device
    return open_host_device(where, host=options.host, sysfsdev=options.sysfsdev)


def passthru_device_types() -> list[DeviceType]:
    return [DeviceType(
        name="passthru", kind="pci", factory=passthru_factory, shared_memory=True,
        summary="PCI passthrough: a vfio-user device server, or a host device through VFIO",
        options=PassthruOptions,
        examples=("-s 5,passthru,vfio-user=/tmp/dev.sock", "-s 5,passthru,0/3/0",
                  "-s 5,passthru,sysfsdev=/sys/bus/pci/devices/0000:00:03.0"))]


@hookimpl
def hvframe_device_types():
    return passthru_device_types()
