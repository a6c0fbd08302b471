"""The host bridge at 00:00.0 (bhyve's `-s 0,hostbridge`): an i440FX by default."""
from __future__ import annotations

from .device import PciFunction
from ..snapshot.pci import PlainPciState

CLASS_HOST_BRIDGE = 0x060000
I440FX_VENDOR, I440FX_DEVICE = 0x8086, 0x1237


class HostBridge(PciFunction, PlainPciState):
    name = "hostbridge"

    def __init__(self, vendor: int = I440FX_VENDOR, device: int = I440FX_DEVICE):
        super().__init__(vendor, device, CLASS_HOST_BRIDGE)


def create(machine, options, address) -> HostBridge:
    """DeviceType factory (options: hvframe.pci.plugin.HostBridgeOptions); the runner puts
    the function at address."""
    return HostBridge(options.vendor, options.devid)
