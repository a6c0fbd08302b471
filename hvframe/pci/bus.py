"""PciBus: functions by (bus, slot, func), config mechanism #1, ECAM, BAR allocation, INTx.

Config access paths (both end in PciBus.config_read / config_write):
  * mechanism #1: a 32-bit write to port 0xcf8 latches enable(31) | bus(23:16) | dev(15:11) |
    fn(10:8) | reg(7:2); ports 0xcfc-0xcff then reach that dword, each port one byte lane.
    Only port 0xcf8 itself is claimed, so byte accesses to 0xcf9 still reach the reset
    control register as on a PC.
  * ECAM (MMCONFIG): a memory window, offset = bus << 20 | dev << 15 | fn << 12 | reg.

BAR placement (assign_bars, run once after all functions are added, as firmware would):
  * I/O BARs from 0xC000 up to 0xFFFF;
  * 32-bit memory BARs and expansion ROMs in [0xC0000000, 0xE0000000), below the ECAM window;
  * 64-bit memory BARs above 4 GiB, from max(end of high RAM, 4 GiB), so they never compete
    with 32-bit devices for the small hole (mmio64_high=False puts them in the 32-bit window).
  Largest first, each naturally aligned, so the packing has no holes beyond alignment.
  Decoding is left off (command register 0): firmware or the OS enables it; enable_all() is
  for direct kernel boot, where no firmware runs.

INTx: pin p of slot s drives IOAPIC GSI 16 + (s + p - 1) % 4 (the usual swizzle), shared
between functions through machine.irq_source, and the interrupt line register says so.
"""
from __future__ import annotations


from ..dispatch import Access
from ..errors import ConfigError
from .config_space import (CMD_IO, CMD_MEMORY, HEADER_TYPE_MULTIFUNCTION, all_ones)
from ..device import PciAddress
from .device import FOUR_GIB, PciFunction
from .windows import (CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT, ECAM_BASE, ECAM_BUSES,  # noqa: F401
                      IO_WINDOW, MMIO32_WINDOW)
from .. import concurrency

CONFIG_ENABLE = 1 << 31
# Configuration space is reached in naturally aligned bytes, words and dwords: a wider or
# misaligned access arrives as those pieces.
CONFIG_ACCESS = Access(sizes=(1, 2, 4), aligned=True)
INTX_GSI_BASE = 16


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class _ConfigAddress:
    """Port 0xcf8: only whole-dword accesses latch or read the address register."""

    def __init__(self, bus: "PciBus"):
        self.bus = bus

    def read(self, offset: int, size: int) -> int:
        return self.bus.config_address if offset == 0 and size == 4 else all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.bus.config_address = value & 0xFFFFFFFF


class _ConfigData:
    """Ports 0xcfc-0xcff: the latched dword, at the byte lane of the port accessed (the bus
    cuts anything else into aligned pieces: CONFIG_ACCESS)."""

    def __init__(self, bus: "PciBus"):
        self.bus = bus

    def _target(self, offset: int, size: int):
        addr = self.bus.config_address
        if not addr & CONFIG_ENABLE:
            return None
        return (addr >> 16) & 0xFF, (addr >> 11) & 0x1F, (addr >> 8) & 0x7, (addr & 0xFC) + offset

    def read(self, offset: int, size: int) -> int:
        t = self._target(offset, size)
        return all_ones(size) if t is None else self.bus.config_read(*t, size)

    def write(self, offset: int, size: int, value: int) -> None:
        t = self._target(offset, size)
        if t is not None:
            self.bus.config_write(*t, size, value)


class _Ecam:
    def __init__(self, bus: "PciBus"):
        self.bus = bus

    def read(self, offset: int, size: int) -> int:
        return self.bus.config_read(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7,
                                    offset & 0xFFF, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.bus.config_write(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7,
                              offset & 0xFFF, size, value)


class PciBus:
    """All PCI functions of a machine (one segment, buses 0..ecam_buses-1)."""

    def __init__(self, machine, *, ecam_base: int = ECAM_BASE, ecam_buses: int = ECAM_BUSES):
        if not 1 <= ecam_buses <= 256:
            raise ConfigError("ECAM bus count must be 1-256")
        self.machine = machine
        self.ecam_base = ecam_base
        self.ecam_buses = ecam_buses
        self.functions: dict[tuple[int, int, int], PciFunction] = {}
        self.config_address = 0
        # One lock for config accesses and the remapping they cause; re-entrant because a
        # device's config_write may call back into the bus (refresh, set_intx).
        self.lock = concurrency.lock(concurrency.PCI_BUS, "pci bus", reentrant=True)
        self._registered = False

    @property
    def ecam_size(self) -> int:
        return self.ecam_buses << 20

    def register(self) -> None:
        """Claim 0xcf8, 0xcfc-0xcff and the ECAM window on the machine's buses."""
        if self._registered:
            return
        m = self.machine
        m.pio.register(CONFIG_ADDRESS_PORT, 1, _ConfigAddress(self), name="pci-config-address")
        m.pio.register(CONFIG_DATA_PORT, 4, _ConfigData(self), name="pci-config-data",
                       access=CONFIG_ACCESS)
        m.mmio.register(self.ecam_base, self.ecam_size, _Ecam(self), name="pci-ecam",
                        access=CONFIG_ACCESS)
        self._registered = True

    # -- functions ------------------------------------------------------------------------
    def add(self, fn: PciFunction, address: tuple[int, int, int]) -> PciFunction:
        b, s, f = address
        if not (0 <= b < self.ecam_buses and 0 <= s < 32 and 0 <= f < 8):
            raise ConfigError(f"{fn.name}: PCI address {b}:{s}.{f} out of range")
        with self.lock:
            if address in self.functions:
                other = self.functions[address]
                raise ConfigError(f"{fn.name}: PCI {b:02x}:{s:02x}.{f} is already used "
                                  f"by {other.name}")
            if fn.pci_bus is not None:
                raise ConfigError(f"{fn.name}: already on a PCI bus")
            self.functions[address] = fn
            fn.pci_bus, fn.address = self, address
            if fn.pin:
                pirq = (s + fn.pin - 1) % 4
                fn.config["interrupt_line"] = INTX_GSI_BASE + pirq
                fn._intx_source = IntxRoute(self.machine, pirq)
            self._update_multifunction(b, s)
        return fn

    def remove(self, address: tuple[int, int, int]) -> None:
        with self.lock:
            fn = self.functions.pop(address)
            fn.unmap_all()
            fn.pci_bus = None
            self._update_multifunction(address[0], address[1])
            self.refresh()  # a BAR it shadowed may now be decodable

    def _update_multifunction(self, b: int, s: int) -> None:
        f0 = self.functions.get((b, s, 0))
        if f0 is not None:
            others = any((b, s, f) in self.functions for f in range(1, 8))
            ht = f0.config["header_type"]
            f0.config["header_type"] = (ht | HEADER_TYPE_MULTIFUNCTION) if others else \
                (ht & ~HEADER_TYPE_MULTIFUNCTION)

    def lookup(self, b: int, s: int, f: int) -> PciFunction | None:
        """The function the guest sees at b:s.f; a slot without function 0 is empty."""
        if (b, s, 0) not in self.functions:
            return None
        return self.functions.get((b, s, f))

    # -- config accesses ------------------------------------------------------------------
    def config_read(self, b: int, s: int, f: int, reg: int, size: int) -> int:
        fn = self.lookup(b, s, f)
        if fn is None:
            return all_ones(size)
        # Work a device must wait for (a reset a configuration access asked for through a
        # window) runs after the bus lock is released (hvframe.concurrency, rule 2).
        with concurrency.deferring(), self.lock:
            return fn.config_read(reg, size) & all_ones(size)

    def config_write(self, b: int, s: int, f: int, reg: int, size: int, value: int) -> None:
        fn = self.lookup(b, s, f)
        if fn is not None:
            with concurrency.deferring(), self.lock:
                fn.config_write(reg, size, value)

    # -- decoding -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bring every BAR's dispatch range in line with its config registers: unmap all that
        moved or lost decode first, then map the rest in address order; one that overlaps
        something stays unmapped until a later change lets it in."""
        m = self.machine
        with self.lock:
            wanted = []
            before = {}
            for addr in sorted(self.functions):
                fn = self.functions[addr]
                for bar in fn.all_bars():
                    before[id(bar)] = (fn, bar, bar.mapped_at)
                    target = fn.decode_target(bar, m)
                    if bar.mapped_at is not None and bar.mapped_at != target:
                        bar.unmap(m.bus(bar.space))
                    if target is not None and bar.mapped_at is None:
                        wanted.append((bar, target))
            for bar, target in wanted:
                space = m.bus(bar.space)
                if space.find_overlap(target, bar.size) is not None:
                    continue
                try:
                    bar.map(space, target)
                except ConfigError:
                    continue
            # Devices with doorbells (ioeventfds) at BAR addresses must follow every move:
            # first every moved BAR's doorbells leave their old place, then they take their
            # new one. In one pass a BAR mapped where another just left could bind its
            # doorbells before the other's were gone (KVM refuses that, EEXIST, and the old
            # ones would go on taking the writes meant for the new BAR).
            moved = [(fn, bar, old) for fn, bar, old in before.values() if bar.mapped_at != old]
            for fn, bar, old in moved:
                if old is not None:
                    fn.bar_remapped(bar, None)
            for fn, bar, _ in moved:
                if bar.mapped_at is not None:
                    fn.bar_remapped(bar, bar.mapped_at)

    # -- firmware's job -------------------------------------------------------------------
    def assign_bars(self, *, mmio64_high: bool = True) -> None:
        """Give every BAR an address (see the module docstring); decoding stays off."""
        with self.lock:
            io, mem32, mem64 = [], [], []
            for addr in sorted(self.functions):
                fn = self.functions[addr]
                for bar in fn.all_bars():
                    if bar.kind == "io":
                        io.append((fn, bar))
                    elif bar.kind == "mmio64" and mmio64_high:
                        mem64.append((fn, bar))
                    else:
                        mem32.append((fn, bar))
            self._place(io, *IO_WINDOW, "I/O")
            self._place(mem32, *self._mmio32_window(), "32-bit MMIO")
            start = max(self.machine.memory.highmem_end, FOUR_GIB)
            self._place(mem64, start, 1 << 46, "64-bit MMIO")  # well inside any guest's phys bits

    def _mmio32_window(self) -> tuple[int, int]:
        lo, hi = MMIO32_WINDOW
        lo = max(lo, self.machine.memory.lowmem_end)
        # The ECAM window is claimed already; keep BARs out of it if it was moved down.
        if lo < self.ecam_base < hi:
            hi = self.ecam_base
        return lo, hi

    @staticmethod
    def _place(items, start: int, end: int, what: str) -> None:
        # Largest first: every later (smaller, power-of-two) BAR is then aligned for free.
        cursor = start
        for fn, bar in sorted(items, key=lambda it: -it[1].size):
            base = _align(cursor, bar.size)
            if base + bar.size > end:
                raise ConfigError(f"{fn.name}: no room for BAR{bar.index} ({bar.size:#x} bytes) "
                                  f"in the {what} window {start:#x}-{end - 1:#x}")
            fn.program_bar(bar.index, base)
            cursor = base + bar.size

    def enable_all(self) -> None:
        """Turn on I/O and memory decoding for every function with BARs (direct kernel boot)."""
        with self.lock:
            for fn in self.functions.values():
                cmd = 0
                for bar in fn.all_bars():
                    cmd |= CMD_IO if bar.kind == "io" else CMD_MEMORY
                if cmd:
                    fn.config["command"] = fn.command | cmd
            self.refresh()


def ensure_pci_bus(machine, **layout) -> PciBus:
    """machine.pci, created and registered (0xcf8, 0xcfc, ECAM) on first use."""
    return machine.pci_bus(**layout)


RESERVED_ISA_IRQS = (0, 1, 2, 8, 13)


class IntxRoute:
    """Where one function's INTx pin goes, as on PIIX chipsets: always to IOAPIC pin
    16 + PIRQ (what ACPI's _PRT and the MP table describe), and also to the ISA IRQ the guest
    programmed into the LPC bridge's PIRQ route register, for firmware-booted systems that
    use the PIC. The pin's level is the OR of the sources sharing each line."""

    def __init__(self, machine, pirq: int):
        self.machine = machine
        self.pirq = pirq
        self.gsi = machine.irq_source(INTX_GSI_BASE + pirq)
        self.isa_sources: dict[int, object] = {}
        self.isa_irq: int | None = None
        self.level = 0
        # Functions sharing the route raise it from their own threads.
        self._lock = concurrency.lock(concurrency.MACHINE, f"pirq {pirq} route")

    def __call__(self, level: int) -> None:
        with self._lock:
            self._drive(level)

    def _drive(self, level: int) -> None:
        self.level = 1 if level else 0
        self.gsi(self.level)
        bridge = self.machine.lpc
        route = bridge.pirq_routes()[self.pirq] if bridge is not None else None
        if route in RESERVED_ISA_IRQS:   # timer, keyboard, cascade, RTC, FPU: not routable
            route = None
        if route != self.isa_irq and self.isa_irq is not None:
            self.isa_sources[self.isa_irq](0)   # the guest moved the route: let go of the old IRQ
        self.isa_irq = route
        if route is not None:
            if route not in self.isa_sources:
                self.isa_sources[route] = self.machine.irq_source(route)
            self.isa_sources[route](self.level)


def place(machine, fn: PciFunction, address: tuple[int, int, int], rom: str | None = None) -> PciFunction:
    """Put a function on the machine's PCI bus at address, with the expansion ROM image of
    file rom (rom=FILE, which every PCI device type accepts)."""
    if rom and fn.rom is None:
        try:
            with open(rom, "rb") as f:
                image = f.read()
        except OSError as e:
            raise ConfigError(f"{fn.name}: rom={rom}: {e.strerror}") from None
        fn.set_rom(image)
    machine.pci_bus().add(fn, tuple(address))
    return fn


def attach(machine, fn: PciFunction, options: dict, default_address=(0, 0, 0)) -> PciFunction:
    """place() for factories of the older declaration (options a dict with "pci.address")."""
    return place(machine, fn, tuple(options.get("pci.address", default_address)), options.get("rom"))


def add_pci_devices(machine, registry, tree: dict, *, direct_boot: bool = True) -> PciBus | None:
    """Build the `-s` devices of a configuration tree ({bus: {slot: {func: {device, ...}}}},
    i.e. cfg.group("pci")), then place their BARs. Each is built by DeviceType.create with
    its typed options and PciAddress (a PciFunction not yet on the bus is put there). With
    direct_boot (no firmware will run) decoding is switched on for every BAR."""
    if not tree:
        return None
    pci = ensure_pci_bus(machine)
    entries = []
    for b, slots in tree.items():
        for s, funcs in (slots.items() if isinstance(slots, dict) else ()):
            for f, group in (funcs.items() if isinstance(funcs, dict) else ()):
                where = f"pci.{b}.{s}.{f}"
                try:
                    address = (int(b), int(s), int(f))
                except ValueError:
                    raise ConfigError(f"{where}: bad PCI address") from None
                if not isinstance(group, dict) or "device" not in group:
                    raise ConfigError(f"{where}: no device given (use -s {s},...)")
                entries.append((address, where, group))
    for address, where, group in sorted(entries, key=lambda e: e[0]):
        dt = registry.require(group["device"], "pci", where)
        dt.create(machine, dt.validate(group, where=where), PciAddress(*address))
    pci.assign_bars()
    if direct_boot:
        pci.enable_all()
    return pci
