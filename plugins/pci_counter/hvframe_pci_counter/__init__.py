"""pci-counter for hvframe: a PCI device with one MMIO BAR and MSI-X (an example)."""
