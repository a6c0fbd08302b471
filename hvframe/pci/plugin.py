"""The built-in PCI devices as a plugin."""
from ..device import DeviceType, NoPciOptions, PciOptions, option
from ..hookspecs import hookimpl
from .hostbridge import I440FX_DEVICE, I440FX_VENDOR, create


def _testdev(machine, options, address):
    # The test device's module is loaded only when one is configured.
    from . import testdev
    return testdev.create(machine, options, address)


class HostBridgeOptions(PciOptions):
    vendor: int = option(I440FX_VENDOR, help="PCI vendor ID", hex=True, min=0, max=0xFFFF)
    # Not "device": pci.B.S.F.device already names the emulation in the configuration tree.
    # bhyve calls it devid too.
    devid: int = option(I440FX_DEVICE, help="PCI device ID", hex=True, min=0, max=0xFFFF)


@hookimpl
def hvframe_device_types():
    return [
        DeviceType("hostbridge", "pci", create, options=HostBridgeOptions,
                   summary="PCI host bridge (i440FX IDs by default)",
                   examples=("-s 0,hostbridge", "-s 0,hostbridge,vendor=0x1275,devid=0x1275")),
        DeviceType("pci-testdev", "pci", _testdev, options=NoPciOptions,
                   summary="PCI test device: register BAR, MSI, MSI-X (4 vectors), INTA",
                   examples=("-s 5,pci-testdev",)),
    ]
