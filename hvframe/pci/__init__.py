"""PCI: configuration space, the PciFunction base class for device plugins, the PCI bus
(config mechanism #1, ECAM, BAR allocation, INTx routing) and the host bridge."""
from .bus import PciBus, ensure_pci_bus
from .config_space import ConfigSpace, FIELDS
from .device import Bar, PciFunction

__all__ = ["Bar", "ConfigSpace", "FIELDS", "PciBus", "PciFunction", "ensure_pci_bus"]
