"""Device type passthru: `-s N,passthru,vfio-user=PATH` (a device served by `hvframe
serve-device` or any vfio-user server), `-s N,passthru,BUS/SLOT/FUNC` and
`-s N,passthru,sysfsdev=PATH` (a host device through kernel VFIO: refused where the host has
no /dev/vfio)."""
from __future__ import annotations

from hvframe.device import DeviceType, Option
from hvframe.errors import ConfigError
from hvframe.hookspecs import hookimpl


def passthru_factory(machine, options):
    b, s, f = options["pci.address"]
    where = f"passthru at {b}:{s}:{f}"
    chosen = [k for k in ("vfio-user", "host", "sysfsdev") if options.get(k)]
    if len(chosen) != 1:
        raise ConfigError(f"{where}: give exactly one of vfio-user=PATH, BUS/SLOT/FUNC or "
                          f"sysfsdev=PATH")
    if chosen[0] == "vfio-user":
        from .backend import BackendLost
        from .passthru import PassthruFunction
        from .vfio_user import VfioUserBackend
        try:
            backend = VfioUserBackend(options["vfio-user"])
        except BackendLost as e:
            raise ConfigError(f"{where}: {e}") from None
        try:
            return PassthruFunction(backend, name=f"passthru {b}:{s}:{f}")
        except BackendLost as e:
            backend.close()
            raise ConfigError(f"{where}: {e}") from None
        except BaseException:
            backend.close()
            raise
    from .vfio_kernel import open_host_device
    return open_host_device(where, host=options.get("host"), sysfsdev=options.get("sysfsdev"))


def passthru_device_types() -> list[DeviceType]:
    return [DeviceType(
        name="passthru", kind="pci", factory=passthru_factory, shared_memory=True,
        summary="PCI passthrough: a vfio-user device server, or a host device through VFIO",
        options=(Option("vfio-user", "str", None, "Unix socket of a vfio-user server"),
                 Option("host", "str", None, "host device BUS/SLOT/FUNC (kernel VFIO)"),
                 Option("sysfsdev", "str", None, "host device by sysfs path (kernel VFIO)")),
        positional=("host",))]


@hookimpl
def hvframe_device_types():
    return passthru_device_types()
