"""PciConfig: a function's configuration space as a guest's driver reaches it -- mechanism #1
(a dword address written to port 0xcf8, data at 0xcfc-0xcff) through the machine's dispatch
core -- with the chores every PCI test does: BAR addresses and sizes, decoding on, the
capability list.

    cfg = PciConfig(machine, slot=3)
    assert cfg.vendor_id == 0x1AF4
    cfg.enable()                       # I/O, memory decoding and bus mastering
    base = cfg.bar(4)                  # where the runner placed BAR4
    msix = cfg.capability(0x11)        # config offset of the MSI-X capability, or None
"""
from __future__ import annotations

from ..pci.config_space import BAR_OFFSETS, CAP_PTR_OFFSET, COMMAND_OFFSET

CONFIG_ADDRESS, CONFIG_DATA = 0xCF8, 0xCFC
CMD_IO, CMD_MEMORY, CMD_BUS_MASTER = 0x1, 0x2, 0x4


class PciConfig:
    def __init__(self, machine, slot: int, func: int = 0, bus: int = 0):
        self.m = machine
        self.address = (bus, slot, func)
        self._select = 0x80000000 | bus << 16 | slot << 11 | func << 8

    def read(self, reg: int, size: int = 4) -> int:
        self.m.io_write(CONFIG_ADDRESS, 4, self._select | (reg & 0xFC))
        return self.m.io_read(CONFIG_DATA + (reg & 3), size)

    def write(self, reg: int, size: int, value: int) -> None:
        self.m.io_write(CONFIG_ADDRESS, 4, self._select | (reg & 0xFC))
        self.m.io_write(CONFIG_DATA + (reg & 3), size, value)

    @property
    def vendor_id(self) -> int:
        return self.read(0x00, 2)

    @property
    def device_id(self) -> int:
        return self.read(0x02, 2)

    @property
    def class_code(self) -> int:
        return self.read(0x08) >> 8

    @property
    def present(self) -> bool:
        return self.vendor_id != 0xFFFF

    def enable(self, io: bool = True, memory: bool = True, bus_master: bool = True) -> None:
        cmd = self.read(COMMAND_OFFSET, 2)
        cmd |= (CMD_IO if io else 0) | (CMD_MEMORY if memory else 0) | \
            (CMD_BUS_MASTER if bus_master else 0)
        self.write(COMMAND_OFFSET, 2, cmd)

    def bar(self, index: int) -> int:
        """The address BAR index is programmed with (64-bit BARs read with their upper half)."""
        low = self.read(BAR_OFFSETS[index])
        if low & 1:
            return low & ~3
        addr = low & ~0xF
        if low & 0x4:
            addr |= self.read(BAR_OFFSETS[index + 1]) << 32
        return addr

    def bar_size(self, index: int) -> int:
        """The BAR's size by the sizing dance (all ones, read back, restore), as firmware does."""
        off = BAR_OFFSETS[index]
        old = self.read(off)
        self.write(off, 4, 0xFFFFFFFF)
        mask = self.read(off)
        self.write(off, 4, old)
        if mask == 0:
            return 0
        if old & 1:
            return (~(mask & ~3) & 0xFFFF) + 1
        size = ~(mask & ~0xF) & 0xFFFFFFFF
        if old & 0x4:
            hi_off = BAR_OFFSETS[index + 1]
            hi_old = self.read(hi_off)
            self.write(hi_off, 4, 0xFFFFFFFF)
            hi = self.read(hi_off)
            self.write(hi_off, 4, hi_old)
            return ((~hi & 0xFFFFFFFF) << 32 | size) + 1
        return size + 1

    def move_bar(self, index: int, address: int) -> None:
        """Program BAR index with a new address (the bus follows if decoding is on)."""
        off = BAR_OFFSETS[index]
        low = self.read(off)
        self.write(off, 4, (address & 0xFFFFFFFF) | (low & (0x3 if low & 1 else 0xF)))
        if not low & 1 and low & 0x4:
            self.write(BAR_OFFSETS[index + 1], 4, address >> 32)

    def capabilities(self) -> list[tuple[int, int]]:
        """(capability id, config offset) of each capability in list order."""
        out, ptr, seen = [], self.read(CAP_PTR_OFFSET, 1) & 0xFC, set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            out.append((self.read(ptr, 1), ptr))
            ptr = self.read(ptr + 1, 1) & 0xFC
        return out

    def capability(self, cap_id: int) -> int | None:
        """Config offset of the first capability with this id, or None."""
        return next((off for cid, off in self.capabilities() if cid == cap_id), None)
