"""Firmware tables for direct kernel boot: ACPI (RSDP, XSDT/RSDT, FADT, FACS, MADT, MCFG, DSDT)
and the Intel MultiProcessor Specification 1.4 table, declared with construct."""
from .build import acpi_e820, build_acpi, install_acpi, merge_e820
from .mptable import build_mptable, install_mptable

__all__ = ["acpi_e820", "build_acpi", "build_mptable", "install_acpi", "install_mptable",
           "merge_e820"]
