"""Where the PCI host bridge sits in the machine's address spaces: the configuration ports,
the ECAM window and the BAR windows. A module of its own so that firmware tables (ACPI, MP)
can be built without importing the PCI bus and device model."""
CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
ECAM_BASE = 0xE0000000
ECAM_BUSES = 256
IO_WINDOW = (0xC000, 0x10000)
MMIO32_WINDOW = (0xC0000000, 0xE0000000)
