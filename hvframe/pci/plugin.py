"""The built-in PCI devices as a plugin."""
from ..device import DeviceType, Option
from ..hookspecs import hookimpl
from . import testdev
from .hostbridge import I440FX_DEVICE, I440FX_VENDOR, create


@hookimpl
def hvframe_device_types():
    return [
        DeviceType("hostbridge", "pci", create,
                   summary="PCI host bridge (i440FX IDs by default)",
                   options=(Option("vendor", "int", I440FX_VENDOR, "PCI vendor ID"),
                            # Not "device": pci.B.S.F.device already names the emulation
                            # in the configuration tree. bhyve calls it devid too.
                            Option("devid", "int", I440FX_DEVICE, "PCI device ID"))),
        DeviceType("pci-testdev", "pci", testdev.create,
                   summary="PCI test device: register BAR, MSI, MSI-X (4 vectors), INTA"),
    ]
