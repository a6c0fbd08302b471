"""The PCI function part of a device's checkpoint record: configuration space (BARs,
command, capabilities with the MSI registers), the INTx level, and the MSI-X table and
pending bits (which live in a BAR, not in configuration space).

Loading puts the bytes back and lets the bus decode the BARs where the guest had them
(PciBus.refresh, which also moves doorbells), then brings the MSI/MSI-X routes up to date.
PlainPciState is the whole DeviceState of a function with no other state (host bridge,
LPC bridge).
"""
from __future__ import annotations

from ..packed import Declarations, declared_later
from ..pci.config_space import EXTENDED_SIZE
from .state import DeviceState


def _declare():
    # A checkpoint's record of a PCI function: only checkpoints import construct for it.
    from construct import Array, Bytes, Flag, GreedyBytes, Int16ul, Int32ul, Prefixed, PrefixedArray, Struct

    PCI_FUNCTION_STATE = Struct(
        "config" / Bytes(EXTENDED_SIZE),
        "intx_level" / Flag,
        "msix_entries" / PrefixedArray(Int16ul, Array(4, Int32ul)),
        "msix_pending" / Prefixed(Int16ul, GreedyBytes),     # little-endian bit string
    )
    return locals()


LAYOUTS = Declarations(__name__, __file__, _declare)
__getattr__ = LAYOUTS.module_getattr


def save_pci(fn) -> dict:
    msix = fn.msix
    entries, pending = [], b""
    if msix is not None:
        with msix.lock:
            entries = [list(e) for e in msix.entries]
            pending = msix.pending_bits.to_bytes((msix.vectors + 7) // 8, "little")
    return dict(config=bytes(fn.config.data), intx_level=bool(fn.intx_level),
                msix_entries=entries, msix_pending=pending)


def load_pci(fn, s) -> None:
    """Into a function built from the same configuration, already on its bus."""
    from ..errors import ConfigError
    msix = fn.msix
    if len(s.msix_entries) != (msix.vectors if msix is not None else 0):
        raise ConfigError(f"snapshot: {fn.name}: MSI-X table size differs from this device's")
    fn.config.data[:] = s.config
    if msix is not None:
        with msix.lock:
            msix.entries = [list(e) for e in s.msix_entries]
            msix.pending_bits = int.from_bytes(s.msix_pending, "little")
    fn.set_intx(1 if s.intx_level else 0)
    if fn.pci_bus is not None:
        fn.pci_bus.refresh()
    if fn.msi is not None:
        fn.msi._config_written()
    if msix is not None:
        msix._config_written()


class PlainPciState(DeviceState):
    """A PCI function whose state is all in its configuration space."""

    state_version = 1
    state_layout = declared_later(lambda: LAYOUTS.module_getattr("PCI_FUNCTION_STATE"))

    def save_state(self) -> dict:
        return save_pci(self)

    def load_state(self, state) -> None:
        load_pci(self, state)
