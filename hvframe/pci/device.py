"""PciFunction: the base class PCI device plugins build on.

A function declares its identity (vendor, device, class, subsystem), its BARs, an optional
expansion ROM, a capability list and an INTx pin. Guest config-space writes go through the
ConfigSpace write masks; writes that touch a BAR, the ROM BAR or the command register make
the owning PciBus re-evaluate where each BAR is decoded, mapping, moving or unmapping its
handler on machine.pio / machine.mmio. A BAR whose value cannot be decoded (0, the all-ones
sizing pattern, overlapping RAM or another range, beyond the port space) is simply left
unmapped: guests and firmware pass through such states while sizing, and must not be able to
crash the VMM.
"""
from __future__ import annotations

from collections import namedtuple

# typing and dataclasses stay out of a run (hvframe.device says why); type checkers see the
# Protocol.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object

from .. import concurrency
from ..device import Device
from ..dispatch import Access
from ..errors import ConfigError
from .config_space import (BAR_OFFSETS, CAP_HEADER_SIZE, CAP_PTR_OFFSET, CMD_INTX_DISABLE,
                           CMD_IO, CMD_MEMORY, CMD_WRITABLE, COMMAND_OFFSET, CONVENTIONAL_SIZE,
                           FIELDS, HEADER_SIZE, ROM_OFFSET, STATUS_CAP_LIST, STATUS_INTERRUPT,
                           STATUS_OFFSET, STATUS_W1C, ConfigSpace)

BAR_KINDS = ("io", "mmio32", "mmio64")
BAR_IO = 0x1
BAR_MEM64 = 0x4
BAR_PREFETCH = 0x8
ROM_ENABLE = 0x1
ROM_MIN_SIZE = 2048
IO_SPACE_END = 0x10000
FOUR_GIB = 1 << 32
_DECODE_REGS = [(o, 4) for o in BAR_OFFSETS] + [(ROM_OFFSET, 4), (COMMAND_OFFSET, 2)]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class BarRegion(namedtuple("BarRegion", "offset length handler access name", defaults=(None, ""))):
    """Part of a BAR with a handler and access rules of its own, mapped and moved with it
    (QEMU's subregions): a BAR holding registers of different shapes side by side.
    offset, length: int; handler: a PortHandler; access: Access or None; name: str."""
    __slots__ = ()


class NativeBar(Protocol):
    """A BAR served by a native register handler (the handler of add_bar stays the Python
    side it passes accesses on to): the PciBus maps it with map() instead of registering the
    Python handler, and unmaps it with Bus.unregister (which drops the range's fallback)."""

    def map(self, bus, base: int, name: str):
        """Register [base, base + BAR size) on bus (a hvframe.dispatch.Bus) with
        register_native; returns the Range."""


class Bar:
    """One BAR (or the expansion ROM, index 6) and where it is currently decoded."""

    def __init__(self, index: int, kind: str, size: int, handler: Any,
                 prefetchable: bool = False, mapped_at: int | None = None, bus_name: str = "",
                 access: Access | None = None, regions: tuple[BarRegion, ...] = (),
                 native: NativeBar | None = None):
        self.index = index
        self.kind = kind                # "io", "mmio32", "mmio64" or "rom"
        self.size = size
        self.handler = handler          # the whole BAR's handler, or None when made of regions
        self.prefetchable = prefetchable
        self.mapped_at = mapped_at
        self.bus_name = bus_name        # the name given to the dispatch range
        self.access = access
        self.regions = regions
        self.native = native            # maps a native handler instead of `handler`

    def __repr__(self) -> str:
        return (f"Bar(index={self.index}, kind={self.kind!r}, size={self.size:#x}, "
                f"mapped_at={self.mapped_at if self.mapped_at is None else hex(self.mapped_at)})")

    @property
    def space(self) -> str:
        return "pio" if self.kind == "io" else "mmio"

    def parts(self) -> tuple[BarRegion, ...]:
        return self.regions or (BarRegion(0, self.size, self.handler, self.access),)

    def map(self, bus, base: int) -> None:
        """Register every part at base (all or none: ConfigError if one cannot be)."""
        if self.native is not None:
            self.native.map(bus, base, self.bus_name)
            self.mapped_at = base
            return
        done = []
        try:
            for p in self.parts():
                name = f"{self.bus_name} {p.name}" if p.name else self.bus_name
                bus.register(base + p.offset, p.length, p.handler, name=name, access=p.access)
                done.append(p)
        except ConfigError:
            for p in done:
                bus.unregister(base + p.offset)
            raise
        self.mapped_at = base

    def unmap(self, bus) -> None:
        if self.mapped_at is not None and self.native is not None:
            bus.unregister(self.mapped_at)
            self.mapped_at = None
        elif self.mapped_at is not None:
            for p in self.parts():
                bus.unregister(self.mapped_at + p.offset)
            self.mapped_at = None


class RomHandler:
    """The expansion ROM image, read-only; bytes past the image read as 0xFF."""

    def __init__(self, image: bytes):
        self.image = bytes(image)

    def read(self, offset: int, size: int) -> int:
        chunk = self.image[offset:offset + size]
        return int.from_bytes(chunk + b"\xff" * (size - len(chunk)), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class PciFunction(Device):
    """One PCI function. Subclasses call the add_* methods in __init__, before the function
    is added to a PciBus, and may override config_read/config_write (calling super())."""

    name = "pci-function"

    def __init__(self, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor: int = 0, subsystem_id: int = 0, pin: int = 0,
                 extended: bool = False, name: str | None = None):
        if name:
            self.name = name
        self.config = cs = ConfigSpace(extended)
        cs["vendor_id"], cs["device_id"] = vendor, device
        cs["revision_id"] = revision
        cs["class_code"] = (class_code >> 16) & 0xFF
        cs["subclass"] = (class_code >> 8) & 0xFF
        cs["prog_if"] = class_code & 0xFF
        cs["subsystem_vendor_id"], cs["subsystem_id"] = subsystem_vendor, subsystem_id
        for field, mask in (("command", CMD_WRITABLE), ("cache_line_size", 0xFF),
                            ("latency_timer", 0xFF), ("interrupt_line", 0xFF)):
            off, size = FIELDS[field]
            cs.set_mask(off, size, mask)
        cs.set_mask(STATUS_OFFSET, 2, 0, w1c=STATUS_W1C)
        self.bars: list[Bar | None] = [None] * 6
        self.rom: Bar | None = None
        self._cap_last: int | None = None  # offset of the last capability in the list
        self._cap_free = HEADER_SIZE       # next free config byte for a capability
        self._intx_level = 0
        self._intx_source = None           # set by the PciBus from the INTx swizzle
        # The pin's level and the status bit mirroring it: device threads raise INTx under
        # their own locks, so this may not be the bus lock (hvframe.concurrency).
        self._intx_lock = concurrency.lock(concurrency.PCI_FUNCTION, f"{self.name} intx")
        self.pci_bus = None                # the PciBus, once added
        self.address: tuple[int, int, int] | None = None
        self.msi = None                    # an MsiCapability (hvframe.pci.msi), if any
        self.msix = None                   # an MsixCapability, if any
        self._config_watchers: list[tuple[int, int, Any]] = []
        self.set_pin(pin)

    # -- declaration ----------------------------------------------------------------------
    def add_bar(self, index: int, size: int, kind: str = "mmio32", handler: Any = None,
                prefetchable: bool = False, *, access: Access | None = None,
                regions: tuple[BarRegion, ...] = (), native: NativeBar | None = None) -> Bar:
        """Declare BAR `index`; a 64-bit BAR also takes slot index+1. Either one handler (with
        optional access rules) or regions, sorted, inside the BAR and not overlapping. With
        `native`, the BAR is served by that native handler, which passes what it does not
        serve on to `handler`."""
        if self.pci_bus is not None:
            raise ConfigError(f"{self.name}: BARs must be added before the function is on a bus")
        if kind not in BAR_KINDS:
            raise ConfigError(f"{self.name}: BAR kind must be one of {BAR_KINDS}")
        if (handler is None) == (not regions):
            raise ConfigError(f"{self.name}: BAR{index} needs one handler or regions")
        end = 0
        for r in regions:
            if r.offset < end or r.length <= 0 or r.offset + r.length > size:
                raise ConfigError(f"{self.name}: BAR{index} regions overlap or overrun it")
            end = r.offset + r.length
        wide = kind == "mmio64"
        if not 0 <= index <= (4 if wide else 5):
            raise ConfigError(f"{self.name}: BAR index {index} out of range")
        slots = (index, index + 1) if wide else (index,)
        if any(self.bars[i] is not None or self._bar_upper(i) for i in slots):
            raise ConfigError(f"{self.name}: BAR{index} is already used")
        if not _is_pow2(size):
            raise ConfigError(f"{self.name}: BAR{index} size {size:#x} is not a power of two")
        if kind == "io":
            if not 4 <= size <= 256:  # the PCI spec limits I/O BARs to 256 bytes
                raise ConfigError(f"{self.name}: I/O BAR{index} size must be 4..256 bytes")
            if prefetchable:
                raise ConfigError(f"{self.name}: an I/O BAR cannot be prefetchable")
        elif size < 16 or (kind == "mmio32" and size > 1 << 31):
            raise ConfigError(f"{self.name}: memory BAR{index} size {size:#x} out of range")
        bar = Bar(index, kind, size, handler, prefetchable, bus_name=f"{self.name} BAR{index}",
                  access=access, regions=tuple(regions), native=native)
        self.bars[index] = bar
        cs = self.config
        off = BAR_OFFSETS[index]
        if kind == "io":
            cs.put(off, 4, BAR_IO)
            cs.set_mask(off, 4, ~(size - 1) & 0xFFFFFFFC)
        else:
            cs.put(off, 4, (BAR_MEM64 if wide else 0) | (BAR_PREFETCH if prefetchable else 0))
            mask = ~(size - 1)
            cs.set_mask(off, 4, mask & 0xFFFFFFF0)
            if wide:
                cs.put(off + 4, 4, 0)
                cs.set_mask(off + 4, 4, (mask >> 32) & 0xFFFFFFFF)
        return bar

    def _bar_upper(self, i: int) -> bool:
        """True if slot i is the upper half of a 64-bit BAR."""
        return i > 0 and self.bars[i - 1] is not None and self.bars[i - 1].kind == "mmio64"

    def set_rom(self, image: bytes) -> Bar:
        """An expansion ROM (bhyve's rom=FILE): a read-only image behind the ROM BAR."""
        if self.pci_bus is not None:
            raise ConfigError(f"{self.name}: the ROM must be set before the function is on a bus")
        if not image:
            raise ConfigError(f"{self.name}: empty ROM image")
        size = ROM_MIN_SIZE
        while size < len(image):
            size <<= 1
        if size > 1 << 24:
            raise ConfigError(f"{self.name}: ROM image of {len(image)} bytes is too large")
        self.rom = Bar(6, "rom", size, RomHandler(image), bus_name=f"{self.name} ROM")
        self.config.put(ROM_OFFSET, 4, 0)
        self.config.set_mask(ROM_OFFSET, 4, (~(size - 1) & 0xFFFFF800) | ROM_ENABLE)
        return self.rom

    def add_capability(self, cap_id: int, body: bytes = b"", wmask: bytes | None = None) -> int:
        """Append a capability (id, next, body) to the list; returns its config offset.
        `wmask` optionally makes body bits guest-writable (same length as body)."""
        length = CAP_HEADER_SIZE + len(body)
        off = self._cap_free
        if off + length > CONVENTIONAL_SIZE:
            raise ConfigError(f"{self.name}: no room for capability {cap_id:#x}")
        if wmask is not None and len(wmask) != len(body):
            raise ConfigError(f"{self.name}: capability write mask must match its body length")
        cs = self.config
        cs.put(off, 1, cap_id)
        cs.put(off + 1, 1, 0)
        cs.data[off + CAP_HEADER_SIZE:off + length] = body
        if wmask is not None:
            cs.wmask[off + CAP_HEADER_SIZE:off + length] = wmask
        if self._cap_last is None:
            cs.put(CAP_PTR_OFFSET, 1, off)
            cs["status"] = cs["status"] | STATUS_CAP_LIST
        else:
            cs.put(self._cap_last + 1, 1, off)
        self._cap_last = off
        self._cap_free = (off + length + 3) & ~3  # capabilities are dword aligned
        return off

    def set_pin(self, pin: int) -> None:
        """INTx pin: 0 none, 1-4 INTA#-INTD#."""
        if self.pci_bus is not None:
            raise ConfigError(f"{self.name}: the interrupt pin must be set before the function "
                              f"is on a bus")
        if not 0 <= pin <= 4:
            raise ConfigError(f"{self.name}: interrupt pin must be 0 (none) or 1-4 (INTA-INTD)")
        self.config["interrupt_pin"] = pin

    @property
    def pin(self) -> int:
        return self.config["interrupt_pin"]

    # -- state ----------------------------------------------------------------------------
    @property
    def command(self) -> int:
        return self.config["command"]

    def bar_address(self, index: int) -> int:
        """The address BAR `index` (6 = ROM) is programmed to, type bits stripped."""
        if index == 6:
            return self.config.get(ROM_OFFSET, 4) & 0xFFFFF800
        bar = self.bars[index]
        low = self.config.get(BAR_OFFSETS[index], 4)
        if bar is not None and bar.kind == "io":
            return low & 0xFFFFFFFC
        addr = low & 0xFFFFFFF0
        if bar is not None and bar.kind == "mmio64":
            addr |= self.config.get(BAR_OFFSETS[index + 1], 4) << 32
        return addr

    def program_bar(self, index: int, address: int) -> None:
        """Set a BAR's address as firmware would (type bits kept); does not enable decoding."""
        bar = self.bar(index)
        off = ROM_OFFSET if index == 6 else BAR_OFFSETS[index]
        keep = self.config.get(off, 4) & (ROM_ENABLE if index == 6 else
                                          (0x3 if bar.kind == "io" else 0xF))
        self.config.put(off, 4, (address & 0xFFFFFFFF & ~(bar.size - 1)) | keep)
        if bar.kind == "mmio64":
            self.config.put(off + 4, 4, address >> 32)
        self._decode_changed()

    def bar(self, index: int) -> Bar:
        b = self.rom if index == 6 else self.bars[index]
        if b is None:
            raise KeyError(f"{self.name}: no BAR{index}")
        return b

    def all_bars(self) -> list[Bar]:
        out = [b for b in self.bars if b is not None]
        if self.rom is not None:
            out.append(self.rom)
        return out

    def decode_target(self, bar: Bar, machine) -> int | None:
        """Where `bar` should be decoded now, or None when it must not be."""
        cmd = self.command
        if bar.kind == "io":
            if not cmd & CMD_IO:
                return None
        elif not cmd & CMD_MEMORY:
            return None
        cs = self.config
        if bar.kind == "rom":
            raw = cs.get(ROM_OFFSET, 4)
            if not raw & ROM_ENABLE:
                return None
        addr = self.bar_address(bar.index)
        if addr == 0:
            return None
        size = bar.size
        # The all-ones sizing pattern (either half of a 64-bit BAR) means "mid-sizing".
        off = ROM_OFFSET if bar.kind == "rom" else BAR_OFFSETS[bar.index]
        # (A legitimate address equal to the pattern is indistinguishable and stays unmapped.)
        for o in ((off, off + 4) if bar.kind == "mmio64" else (off,)):
            mask = cs.mask_at(o, 4) & ~(ROM_ENABLE if bar.kind == "rom" else 0)
            if mask and cs.get(o, 4) & mask == mask:
                return None
        if bar.kind == "io":
            if addr + size > IO_SPACE_END:
                return None
            return addr
        if bar.kind != "mmio64" and addr + size > FOUR_GIB:
            return None
        # RAM wins over MMIO in a guest (KVM memory slots come first): never decode there.
        for r in machine.memory.regions:
            if addr < r.end and r.gpa < addr + size:
                return None
        return addr

    # -- guest config accesses --------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        msix = self.msix
        if msix is not None and msix.control_changed_by(offset, size, value):
            # MSI-X gates shut before an enable/function-mask change, reopened after it.
            msix.before_control_write()
            try:
                self._config_write(offset, size, value)
            finally:
                msix.after_control_write()
        else:
            self._config_write(offset, size, value)

    def _config_write(self, offset: int, size: int, value: int) -> None:
        old_cmd = self.command
        with self._intx_lock:   # a status write-1-to-clear against set_intx's update
            if not self.config.write(offset, size, value):
                return
            if (old_cmd ^ self.command) & CMD_INTX_DISABLE:
                self._drive_intx()
        if any(offset < o + n and o < offset + size for o, n in _DECODE_REGS):
            self._decode_changed()
        for start, length, callback in self._config_watchers:
            if offset < start + length and start < offset + size:
                callback()

    def watch_config(self, offset: int, length: int, callback) -> None:
        """Call callback() after every guest config write touching [offset, offset+length)
        (the MSI/MSI-X capabilities use this to deliver what an unmask lets out)."""
        self._config_watchers.append((offset, length, callback))

    def _decode_changed(self) -> None:
        # Firmware sizes every BAR (all-ones, then the address back) with decoding off: most
        # such writes move nothing, and a walk over every BAR of the bus is not needed to see
        # that. A BAR left out by an overlap (target set, not mapped) still asks for the walk.
        bus = self.pci_bus
        if bus is None:
            return
        machine = bus.machine
        if any(self.decode_target(bar, machine) != bar.mapped_at for bar in self.all_bars()):
            bus.refresh()

    # -- INTx -----------------------------------------------------------------------------
    def set_intx(self, level: int) -> None:
        """Assert (1) or deassert (0) this function's INTx pin."""
        # A guest status write (write-1-to-clear) must not race this read-modify-write of
        # the same register from a device thread.
        with self._intx_lock:
            self._intx_level = 1 if level else 0
            status = self.config["status"]
            self.config["status"] = (status | STATUS_INTERRUPT) if level else \
                (status & ~STATUS_INTERRUPT)
            self._drive_intx()

    @property
    def intx_level(self) -> int:
        """The level this function drives on its INTx pin (before the interrupt-disable bit)."""
        return self._intx_level

    def _drive_intx(self) -> None:
        if self._intx_source is not None:
            # The command register's interrupt-disable bit masks the pin, not the status bit.
            self._intx_source(self._intx_level and not self.command & CMD_INTX_DISABLE)

    # -- interrupts ------------------------------------------------------------------------
    def send_msi(self, address: int, data: int) -> None:
        """Write one MSI/MSI-X message (dropped while the function is on no bus)."""
        if self.pci_bus is not None:
            self.pci_bus.machine.signal_msi(address, data)

    def interrupt(self, vector: int = 0) -> str | None:
        """Raise interrupt `vector` the way the guest set the function up: through MSI-X if
        enabled, else MSI if enabled, else by asserting INTx (the device model deasserts it
        with set_intx(0) when the guest acknowledges). Returns "msix", "msi", "intx" or None
        (no pin and no message interrupts enabled). A masked message vector stays pending."""
        if self.msix is not None and self.msix.enabled:
            self.msix.notify(vector)
            return "msix"
        if self.msi is not None and self.msi.enabled:
            self.msi.notify(vector)
            return "msi"
        if self.pin:
            self.set_intx(1)
            return "intx"
        return None

    # -- lifecycle --------------------------------------------------------------------------
    def bar_remapped(self, bar: Bar, address: int | None) -> None:
        """A BAR was mapped, moved or unmapped (address None) by the guest's configuration
        writes: devices with doorbells (ioeventfds) at BAR addresses move them here."""

    def unmap_all(self) -> None:
        if self.pci_bus is None:
            return
        m = self.pci_bus.machine
        for bar in self.all_bars():
            bar.unmap(m.bus(bar.space))
