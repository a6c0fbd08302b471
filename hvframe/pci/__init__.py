"""PCI: configuration space, the PciFunction base class for device plugins, the PCI bus
(config mechanism #1, ECAM, BAR allocation, INTx routing) and the host bridge."""
# Imported on first use (PEP 562), so that importing a light submodule (windows, plugin) does
# not bring the whole bus and device model, and construct, with it.
_EXPORTS = {"PciBus": "bus", "ensure_pci_bus": "bus", "ConfigSpace": "config_space",
            "FIELDS": "config_space", "Bar": "device", "PciFunction": "device"}

__all__ = ["Bar", "ConfigSpace", "FIELDS", "PciBus", "PciFunction", "ensure_pci_bus"]


def __getattr__(name):
    sub = _EXPORTS.get(name)
    if sub is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{sub}"), name)
    globals()[name] = value
    return value
