"""Message-signalled interrupts for PciFunction: the MSI and MSI-X capabilities.

Both are helpers a device builds in its __init__, before the function goes on a bus:

    self.msi = MsiCapability(self)                      # capability 0x05, one vector
    self.msix = MsixCapability(self, vectors=4, bar=1)  # capability 0x11, table + PBA in BAR1

and the device raises interrupts with `fn.interrupt(vector)` (PciFunction), which uses MSI-X
when the guest enabled it, else MSI, else asserts INTx; or with `cap.notify(vector)` directly.

Layouts follow PCI Local Bus Specification 3.0, section 6.8:

MSI (64-bit address, per-vector masking, a single vector):
    +2  Message Control: bit 0 enable (RW); bits 3:1 multiple message capable and 6:4
        multiple message enable (both 0: one vector, read-only); bit 7 64-bit capable;
        bit 8 per-vector masking capable
    +4  Message Address (bits 1:0 reserved)   +8  Message Upper Address
    +12 Message Data (16 bits)                 +16 Mask Bits   +20 Pending Bits (RO)

MSI-X:
    +2  Message Control: bits 10:0 table size - 1 (RO), bit 14 function mask, bit 15 enable
    +4  Table offset (bits 31:3) | Table BIR (bits 2:0)
    +8  PBA offset (bits 31:3) | PBA BIR (bits 2:0)
  Table entry n at table offset + 16n: address low, address high, data, vector control
  (bit 0 mask; set at reset). PBA: one pending bit per vector, in qwords, read-only.

A vector that fires while masked (per vector, or by the function mask) sets its pending bit
and is delivered, pending bit cleared, once it is unmasked. Table and PBA accesses of any
size, alignment or offset never raise: only aligned 4- and 8-byte accesses mean anything,
the rest read 0 and are ignored.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .device import PciFunction

CAP_ID_MSI = 0x05
CAP_ID_MSIX = 0x11

# MSI Message Control bits.
MSI_ENABLE = 1 << 0
MSI_64BIT = 1 << 7
MSI_PER_VECTOR_MASK = 1 << 8
# MSI register offsets from the capability start.
MSI_CONTROL, MSI_ADDR_LO, MSI_ADDR_HI, MSI_DATA, MSI_MASK, MSI_PENDING = 2, 4, 8, 12, 16, 20
MSI_CAP_SIZE = 24

# MSI-X Message Control bits.
MSIX_TABLE_SIZE_MASK = 0x7FF
MSIX_FUNCTION_MASK = 1 << 14
MSIX_ENABLE = 1 << 15
MSIX_CONTROL, MSIX_TABLE, MSIX_PBA = 2, 4, 8
MSIX_MAX_VECTORS = 2048
MSIX_ENTRY_SIZE = 16
# Table entry dwords.
ENTRY_ADDR_LO, ENTRY_ADDR_HI, ENTRY_DATA, ENTRY_CONTROL = 0, 1, 2, 3
ENTRY_MASKED = 1 << 0
PAGE = 4096


def _le(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class MsiCapability:
    """The MSI capability of `fn`: one vector, 64-bit address, per-vector mask."""

    def __init__(self, fn: "PciFunction"):
        self.fn = fn
        self.lock = threading.RLock()
        control = MSI_64BIT | MSI_PER_VECTOR_MASK
        body = (_le(control, 2) + _le(0, 4) + _le(0, 4) + _le(0, 2) + _le(0, 2)
                + _le(0, 4) + _le(0, 4))
        wmask = (_le(MSI_ENABLE, 2) + _le(0xFFFFFFFC, 4) + _le(0xFFFFFFFF, 4) + _le(0xFFFF, 2)
                 + _le(0, 2) + _le(1, 4) + _le(0, 4))
        self.offset = fn.add_capability(CAP_ID_MSI, body, wmask)
        fn.msi = self
        fn.watch_config(self.offset, MSI_CAP_SIZE, self._config_written)

    def _get(self, reg: int, size: int) -> int:
        return self.fn.config.get(self.offset + reg, size)

    @property
    def enabled(self) -> bool:
        return bool(self._get(MSI_CONTROL, 2) & MSI_ENABLE)

    @property
    def masked(self) -> bool:
        return bool(self._get(MSI_MASK, 4) & 1)

    @property
    def pending(self) -> bool:
        return bool(self._get(MSI_PENDING, 4) & 1)

    def message(self) -> tuple[int, int]:
        """(address, data) as the guest programmed them."""
        addr = self._get(MSI_ADDR_LO, 4) | self._get(MSI_ADDR_HI, 4) << 32
        return addr, self._get(MSI_DATA, 2)

    def _set_pending(self, on: bool) -> None:
        self.fn.config.put(self.offset + MSI_PENDING, 4, 1 if on else 0)

    def notify(self, vector: int = 0) -> bool:
        """Fire the vector: delivered (True) when MSI is enabled and the vector unmasked;
        held pending when masked; dropped when MSI is disabled or the vector does not exist."""
        with self.lock:
            if vector != 0 or not self.enabled:
                return False
            if self.masked:
                self._set_pending(True)
                return False
            self.fn.send_msi(*self.message())
            return True

    def _config_written(self) -> None:
        # An unmask (or enable) lets a pending message out.
        with self.lock:
            if self.enabled and not self.masked and self.pending:
                self._set_pending(False)
                self.fn.send_msi(*self.message())


class MsixCapability:
    """The MSI-X capability of `fn`, with its table and PBA in BAR `bar`.

    By default the BAR is declared here (32-bit memory, large enough for table and PBA, at
    least 4 KiB) with this object as its handler. With add_bar=False the device declares the
    BAR itself and passes accesses inside [table_offset, ...) on to bar_read/bar_write."""

    def __init__(self, fn: "PciFunction", vectors: int, bar: int, *, table_offset: int = 0,
                 pba_offset: int | None = None, add_bar: bool = True,
                 bar_size: int | None = None):
        if not 1 <= vectors <= MSIX_MAX_VECTORS:
            raise ConfigError(f"{fn.name}: MSI-X needs 1-{MSIX_MAX_VECTORS} vectors")
        if not 0 <= bar <= 5:
            raise ConfigError(f"{fn.name}: MSI-X BAR index {bar} out of range")
        table_len = vectors * MSIX_ENTRY_SIZE
        pba_len = ((vectors + 63) // 64) * 8
        if pba_offset is None:
            pba_offset = (table_offset + table_len + PAGE - 1) & ~(PAGE - 1) \
                if table_len + pba_len > PAGE else table_offset + table_len
            pba_offset = (pba_offset + 7) & ~7
        if table_offset & 7 or pba_offset & 7:
            raise ConfigError(f"{fn.name}: MSI-X table and PBA offsets must be 8-byte aligned")
        if table_offset < pba_offset + pba_len and pba_offset < table_offset + table_len:
            raise ConfigError(f"{fn.name}: MSI-X table and PBA overlap")
        self.fn = fn
        self.vectors = vectors
        self.bar = bar
        self.table_offset, self.table_len = table_offset, table_len
        self.pba_offset, self.pba_len = pba_offset, pba_len
        self.lock = threading.RLock()
        # Per vector: [addr_lo, addr_hi, data, control]; every vector starts masked.
        self.entries = [[0, 0, 0, ENTRY_MASKED] for _ in range(vectors)]
        self.pending_bits = 0
        if add_bar:
            end = max(table_offset + table_len, pba_offset + pba_len)
            size = bar_size or PAGE
            while size < end:
                size <<= 1
            fn.add_bar(bar, size, "mmio32", self)
        control = vectors - 1
        body = _le(control, 2) + _le(table_offset | bar, 4) + _le(pba_offset | bar, 4)
        wmask = _le(MSIX_ENABLE | MSIX_FUNCTION_MASK, 2) + _le(0, 4) + _le(0, 4)
        self.offset = fn.add_capability(CAP_ID_MSIX, body, wmask)
        fn.msix = self
        fn.watch_config(self.offset, 2 + len(body), self._config_written)

    # -- state ----------------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.fn.config.get(self.offset + MSIX_CONTROL, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & MSIX_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & MSIX_FUNCTION_MASK)

    def vector_masked(self, vector: int) -> bool:
        return bool(self.entries[vector][ENTRY_CONTROL] & ENTRY_MASKED)

    def is_pending(self, vector: int) -> bool:
        return bool(self.pending_bits >> vector & 1)

    def message(self, vector: int) -> tuple[int, int]:
        e = self.entries[vector]
        return e[ENTRY_ADDR_LO] | e[ENTRY_ADDR_HI] << 32, e[ENTRY_DATA]

    # -- delivery -------------------------------------------------------------------------
    def notify(self, vector: int = 0) -> bool:
        """Fire `vector`: delivered (True) when MSI-X is enabled and neither the function nor
        the vector is masked; otherwise, if MSI-X is enabled, its pending bit is set. With
        MSI-X disabled, or for a vector past the table, nothing happens (False)."""
        with self.lock:
            if not 0 <= vector < self.vectors or not self.enabled:
                return False
            if self.function_masked or self.vector_masked(vector):
                self.pending_bits |= 1 << vector
                return False
            self.fn.send_msi(*self.message(vector))
            return True

    def _flush_pending(self) -> None:
        """Deliver every pending vector that is no longer masked (lock held)."""
        if not self.pending_bits or not self.enabled or self.function_masked:
            return
        for v in range(self.vectors):
            if self.pending_bits >> v & 1 and not self.vector_masked(v):
                self.pending_bits &= ~(1 << v)
                self.fn.send_msi(*self.message(v))

    def _config_written(self) -> None:
        with self.lock:
            self._flush_pending()

    # -- table and PBA (BAR accesses) -------------------------------------------------------
    def _dword_read(self, offset: int) -> int:
        t = offset - self.table_offset
        if 0 <= t < self.table_len:
            return self.entries[t // MSIX_ENTRY_SIZE][(t % MSIX_ENTRY_SIZE) // 4]
        p = offset - self.pba_offset
        if 0 <= p < self.pba_len:
            return (self.pending_bits >> (8 * p)) & 0xFFFFFFFF
        return 0

    def _dword_write(self, offset: int, value: int) -> None:
        t = offset - self.table_offset
        if not 0 <= t < self.table_len:
            return  # the PBA is read-only; anything else is not ours
        vector, reg = t // MSIX_ENTRY_SIZE, (t % MSIX_ENTRY_SIZE) // 4
        e = self.entries[vector]
        if reg == ENTRY_ADDR_LO:
            e[reg] = value & 0xFFFFFFFC
        elif reg == ENTRY_CONTROL:
            e[reg] = value & ENTRY_MASKED
            if not value & ENTRY_MASKED:
                self._flush_pending()
        else:
            e[reg] = value & 0xFFFFFFFF

    def bar_read(self, offset: int, size: int) -> int:
        with self.lock:
            if size == 4 and offset % 4 == 0:
                return self._dword_read(offset)
            if size == 8 and offset % 8 == 0:
                return self._dword_read(offset) | self._dword_read(offset + 4) << 32
            return 0

    def bar_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if size == 4 and offset % 4 == 0:
                self._dword_write(offset, value)
            elif size == 8 and offset % 8 == 0:
                # Low dword first: a qword write of address+data never leaves a half message.
                self._dword_write(offset, value & 0xFFFFFFFF)
                self._dword_write(offset + 4, (value >> 32) & 0xFFFFFFFF)

    # The BAR handler interface when this object is the BAR's handler.
    read = bar_read
    write = bar_write
