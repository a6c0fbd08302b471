"""pci-counter: a PCI function with one memory BAR holding a register block and the MSI-X
table, written as the example of docs/authoring.md.

    -s N,pci-counter[,vectors=N]

Identity 1234:c0de (the "experimental" vendor ID QEMU's example devices use), class
0xff0000. BAR0, 4 KiB of 32-bit memory:
    0x000  REGISTERS (declared below with construct; each access sees one whole field)
    0x800  the MSI-X table (`vectors` entries), then its pending-bit array
A write of N to DOORBELL adds N to COUNT and raises MSI-X vector VECTOR. What a guest may
get wrong is answered in the device's own terms: a VECTOR outside the table is refused and
sets STATUS.BAD_VECTOR (write 1 to clear); a doorbell while MSI-X is off raises nothing
and counts in DROPPED. Nothing a guest writes can raise out of a handler.

Checkpoint (DeviceState): the registers, after the PCI function's own part (configuration
space, MSI-X table and pending bits: hvframe.snapshot.pci).
"""
from __future__ import annotations

from construct import Int32ul, Struct

from hvframe import concurrency
from hvframe.dispatch import Access, Partial
from hvframe.errors import ConfigError
from hvframe.layout import offsets_of
from hvframe.pci.device import BarRegion, PciFunction
from hvframe.pci.msi import MsixCapability
from hvframe.snapshot.pci import PCI_FUNCTION_STATE, load_pci, save_pci
from hvframe.snapshot.state import DeviceState

VENDOR, DEVICE, CLASS = 0x1234, 0xC0DE, 0xFF0000
MAGIC = 0x544E5443                  # "CTNT" read as little-endian bytes: C T N T
BAR_SIZE = 0x1000
MSIX_OFFSET = 0x800
STATUS_BAD_VECTOR = 1 << 0

Registers = Struct(
    "magic" / Int32ul,              # RO
    "count" / Int32ul,              # RO, wraps at 2**32
    "doorbell" / Int32ul,           # WO: add the value, raise VECTOR; reads 0
    "vector" / Int32ul,             # RW: the MSI-X vector the doorbell raises
    "status" / Int32ul,             # RO, write 1 to clear: BAD_VECTOR
    "interrupts" / Int32ul,         # RO: interrupts raised
    "dropped" / Int32ul,            # RO: doorbells with MSI-X off (nothing raised)
)
REG = offsets_of(Registers)
_NAMES = {off: name for name, off in REG.items()}

# The checkpoint record (DeviceState, version 1).
PCI_COUNTER_STATE = Struct(
    "pci" / PCI_FUNCTION_STATE,
    "count" / Int32ul,
    "vector" / Int32ul,
    "status" / Int32ul,
    "interrupts" / Int32ul,
    "dropped" / Int32ul,
)


class PciCounter(PciFunction, DeviceState):
    name = "pci-counter"
    state_version = 1
    state_layout = PCI_COUNTER_STATE

    def __init__(self, vectors: int = 2, *, name: str | None = None):
        super().__init__(VENDOR, DEVICE, CLASS, name=name)
        self.vectors = vectors
        self.count = self.vector = self.status = self.interrupts = self.dropped = 0
        # vCPUs write the doorbell concurrently; interrupts are raised after letting go.
        self.lock = concurrency.lock(concurrency.DEVICE, f"{self.name} registers")
        msix = MsixCapability(self, vectors=vectors, bar=0, table_offset=MSIX_OFFSET,
                              add_bar=False)
        self.add_bar(0, BAR_SIZE, "mmio32", regions=(
            BarRegion(0, MSIX_OFFSET, self,
                      access=Access.of_struct(Registers, overrides={"status": Partial.ZERO}),
                      name="registers"),
            BarRegion(MSIX_OFFSET, BAR_SIZE - MSIX_OFFSET, MsixTableRegion(msix, MSIX_OFFSET),
                      name="msi-x")))

    # The register block's handler: offsets within it, one whole field per call.
    def read(self, offset: int, size: int) -> int:
        values = {"magic": MAGIC, "count": self.count, "vector": self.vector,
                  "status": self.status, "interrupts": self.interrupts, "dropped": self.dropped}
        return values.get(_NAMES.get(offset), 0)    # DOORBELL reads 0

    def write(self, offset: int, size: int, value: int) -> None:
        name = _NAMES.get(offset)
        if name == "doorbell":
            self.ring(value)
        elif name == "vector":
            with self.lock:
                if value < self.vectors:
                    self.vector = value
                else:
                    self.status |= STATUS_BAD_VECTOR
        elif name == "status":
            with self.lock:
                self.status &= ~value
        # MAGIC, COUNT, INTERRUPTS, DROPPED are read-only: writes are ignored

    def ring(self, amount: int) -> None:
        with self.lock:
            self.count = (self.count + amount) & 0xFFFFFFFF
            vector = self.vector
            deliver = self.msix.enabled
            if deliver:
                self.interrupts += 1
            else:
                self.dropped += 1
        if deliver:
            self.msix.notify(vector)                # pending while masked, sent on unmask


    # -- checkpoint (no work of its own in flight: the vCPUs are paused) ----------------------
    def save_state(self) -> dict:
        with self.lock:
            regs = dict(count=self.count, vector=self.vector, status=self.status,
                        interrupts=self.interrupts, dropped=self.dropped)
        return dict(pci=save_pci(self), **regs)

    def load_state(self, s) -> None:
        if s.vector >= self.vectors:
            raise ConfigError(f"snapshot: {self.name}: vector {s.vector} of {self.vectors}")
        load_pci(self, s.pci)
        with self.lock:
            self.count, self.vector, self.status = s.count, s.vector, s.status
            self.interrupts, self.dropped = s.interrupts, s.dropped


class MsixTableRegion:
    """The MSI-X table's region: its offsets are the BAR's less MSIX_OFFSET."""

    def __init__(self, msix: MsixCapability, base: int):
        self.msix, self.base = msix, base

    def read(self, offset: int, size: int) -> int:
        return self.msix.bar_read(self.base + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.msix.bar_write(self.base + offset, size, value)
