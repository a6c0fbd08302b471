"""pci-testdev: a small PCI function for testing the PCI core and interrupt delivery.

Identity 1b36:0005 (the ID QEMU uses for its PCI test device), class 0x00ff00, INTA#.

BAR0, 4 KiB of memory, a register file (dword registers; other accesses read 0):
    0x00  magic, reads 0x48564652 ("HVFR" as a little-endian dword reads "RFVH")
    0x04  scratch, read/write
    0x08  write N: raise interrupt vector N (MSI-X if enabled, else MSI, else assert INTx);
          reads the number of interrupts raised so far
    0x0c  write: acknowledge, i.e. deassert INTx; reads the INTx level
    0x10  write V | MS << 16: a device thread (not the vCPU) raises interrupt vector V after
          MS milliseconds (0 means 1), as a device's I/O completion would; reads the number
          of such delayed interrupts raised so far
BAR1, 4 KiB of memory: the MSI-X table (4 vectors) at 0 and the PBA at 0x800.
Capabilities: MSI (one vector, 64-bit, maskable) then MSI-X.
"""
from __future__ import annotations

import threading

from .device import PciFunction
from .msi import MsiCapability, MsixCapability
from .. import concurrency

TESTDEV_VENDOR, TESTDEV_DEVICE = 0x1B36, 0x0005
TESTDEV_CLASS = 0x00FF00
MAGIC = 0x48564652
REG_MAGIC, REG_SCRATCH, REG_RAISE, REG_ACK, REG_RAISE_LATER = 0x0, 0x4, 0x8, 0xC, 0x10
REGS_SIZE = 0x1000
MSIX_VECTORS = 4
MAX_PENDING = 16          # delayed interrupts waiting at once (one thread each)
MSIX_BAR = 1
MSIX_PBA_OFFSET = 0x800


class _Registers:
    def __init__(self, dev: "PciTestDev"):
        self.dev = dev

    def read(self, offset: int, size: int) -> int:
        if size != 4 or offset % 4:
            return 0
        d = self.dev
        if offset == REG_MAGIC:
            return MAGIC
        if offset == REG_SCRATCH:
            return d.scratch
        if offset == REG_RAISE:
            return d.raised & 0xFFFFFFFF
        if offset == REG_ACK:
            return d.intx_level
        if offset == REG_RAISE_LATER:
            return d.raised_later & 0xFFFFFFFF
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset % 4:
            return
        d = self.dev
        if offset == REG_SCRATCH:
            d.scratch = value & 0xFFFFFFFF
        elif offset == REG_RAISE:
            with d.count_lock:
                d.raised += 1
            d.interrupt(value & 0xFFFFFFFF)
        elif offset == REG_ACK:
            d.set_intx(0)
        elif offset == REG_RAISE_LATER:
            d.raise_later(value & 0xFFFF, max(1, value >> 16 & 0xFFFF) / 1000)


class PciTestDev(PciFunction):
    name = "pci-testdev"

    def __init__(self):
        super().__init__(TESTDEV_VENDOR, TESTDEV_DEVICE, TESTDEV_CLASS, pin=1)
        self.scratch = 0
        self.raised = 0
        self.raised_later = 0
        self.count_lock = concurrency.lock(concurrency.LEAF, "testdev counters")
        self._timers: set[threading.Timer] = set()
        self.dropped_later = 0
        self._closed = False
        self.add_bar(0, REGS_SIZE, "mmio32", _Registers(self))
        MsiCapability(self)
        MsixCapability(self, vectors=MSIX_VECTORS, bar=MSIX_BAR, table_offset=0,
                       pba_offset=MSIX_PBA_OFFSET, bar_size=0x1000)

    def raise_later(self, vector: int, delay: float) -> None:
        """Raise `vector` from a thread of its own after `delay` seconds."""
        def fire():
            with self.count_lock:
                self._timers.discard(timer)
                if self._closed:
                    return
                self.raised += 1
            self.interrupt(vector)
            with self.count_lock:
                self.raised_later += 1

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        timer.name = f"{self.name} raise {vector}"
        with self.count_lock:
            # A guest decides how many it asks for: at most MAX_PENDING threads wait at once,
            # later requests are dropped (counted) until one has fired.
            if self._closed:
                return
            if len(self._timers) >= MAX_PENDING:
                self.dropped_later += 1
                return
            self._timers.add(timer)
        timer.start()

    def close(self) -> None:
        with self.count_lock:
            self._closed = True
            timers, self._timers = self._timers, set()
        for t in timers:
            t.cancel()


def create(machine, options, address) -> PciTestDev:
    """DeviceType factory; the runner puts the function at address."""
    return PciTestDev()
