"""The PCI core through the native dispatch core: config mechanism #1, ECAM, BARs, ROM,
capabilities, masks, multi-function, BAR allocation and INTx routing."""
import pytest

from hvframe.testing import rig
from hypothesis import HealthCheck, given, settings, strategies as st

from hvframe.errors import ConfigError
from hvframe.config import Config
from hvframe.machine import Machine
from hvframe.platform.reset_control import ResetControl
from hvframe.plugins import Registry, plugin_manager
from hvframe.pci import ensure_pci_bus
from hvframe.pci import plugin as pci_plugin
from hvframe.pci.bus import ECAM_BASE, add_pci_devices
from hvframe.pci.config_space import (BAR_OFFSETS, CAP_PTR_OFFSET, FIELDS, ROM_OFFSET,
                                      TYPE0_HEADER)
from hvframe.pci.device import PciFunction

CMD = FIELDS["command"][0]
STATUS = FIELDS["status"][0]


class Regs:
    """A BAR handler remembering writes; reads answer a tag so tests can tell who answered."""

    def __init__(self, tag):
        self.tag, self.writes = tag, []

    def read(self, offset, size):
        return (self.tag + offset) & ((1 << (8 * size)) - 1)

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def cf8(bus, slot, func, reg):
    return 0x80000000 | bus << 16 | slot << 11 | func << 8 | (reg & 0xFC)


def cfg_read(m, slot, reg, size=4, func=0, bus=0):
    m.pio.write(0xCF8, 4, cf8(bus, slot, func, reg))
    return m.pio.read(0xCFC + (reg & 3), size)


def cfg_write(m, slot, reg, size, value, func=0, bus=0):
    m.pio.write(0xCF8, 4, cf8(bus, slot, func, reg))
    m.pio.write(0xCFC + (reg & 3), size, value)


def ecam(bus, slot, func, reg):
    return ECAM_BASE + (bus << 20 | slot << 15 | func << 12 | reg)


@pytest.fixture
def m():
    machine = Machine(64 << 20, backend="synthetic")
    yield machine
    machine.close()


def hostbridge(m, address=(0, 0, 0), **opts):
    conf = "".join(f",{k}={v}" for k, v in opts.items())
    dev, = rig(m, f"-s {':'.join(map(str, address))},hostbridge{conf}", direct_boot=False)
    return dev


class Dev(PciFunction):
    name = "testdev"

    def __init__(self, pin=1):
        super().__init__(0x1AF4, 0x1000, 0x020000, subsystem_vendor=0x1AF4, subsystem_id=1,
                         pin=pin, revision=3)
        self.io, self.m32, self.m64 = Regs(0x1000), Regs(0x2000), Regs(0x3000)
        self.add_bar(0, 32, "io", self.io)
        self.add_bar(1, 0x1000, "mmio32", self.m32)
        self.add_bar(2, 0x4000, "mmio64", self.m64, prefetchable=True)


# -- discovery ------------------------------------------------------------------------------

def test_hostbridge_found_through_cf8_and_ecam(m):
    hostbridge(m)
    assert m.pci is ensure_pci_bus(m)
    assert cfg_read(m, 0, 0) == 0x12378086
    assert m.mmio.read(ecam(0, 0, 0, 0), 4) == 0x12378086
    assert cfg_read(m, 0, 8) >> 8 == 0x060000
    assert m.mmio.read(ecam(0, 0, 0, 0x0B), 1) == 0x06


def test_hostbridge_options():
    dt = pci_plugin.hvframe_device_types()[0]
    assert dt.name == "hostbridge" and dt.kind == "pci"
    m2 = Machine(16 << 20, backend="synthetic")
    try:
        hostbridge(m2, vendor=0x1275, devid=0x1275)
        assert cfg_read(m2, 0, 0) == 0x12751275
    finally:
        m2.close()


def test_empty_slots_and_disabled_address_read_ones(m):
    hostbridge(m)
    assert cfg_read(m, 5, 0, 2) == 0xFFFF
    assert cfg_read(m, 0, 0, 2, bus=3) == 0xFFFF
    assert m.mmio.read(ecam(0, 7, 0, 0), 2) == 0xFFFF
    m.pio.write(0xCF8, 4, 0x00000000)  # enable bit clear
    assert m.pio.read(0xCFC, 4) == 0xFFFFFFFF


def test_cf8_latches_only_on_dword_access(m):
    hostbridge(m)
    m.pio.write(0xCF8, 4, cf8(0, 0, 0, 0))
    m.pio.write(0xCF8, 1, 0x55)  # ignored
    assert m.pio.read(0xCF8, 4) == cf8(0, 0, 0, 0)
    assert m.pio.read(0xCF8, 1) == 0xFF


def test_byte_and_word_lanes(m):
    hostbridge(m)
    assert [cfg_read(m, 0, r, 1) for r in range(4)] == [0x86, 0x80, 0x37, 0x12]
    assert cfg_read(m, 0, 2, 2) == 0x1237
    assert cfg_read(m, 0, 0, 2) == 0x8086
    # An access running past 0xcff reaches the lanes it covers, as a chipset splits it; the
    # bytes beyond are nobody's.
    m.pio.write(0xCF8, 4, cf8(0, 0, 0, 0))
    assert m.pio.read(0xCFE, 4) == 0xFFFF1237
    # A qword through ECAM is two dwords, not all ones.
    assert m.mmio.read(ecam(0, 0, 0, 0), 8) == cfg_read(m, 0, 0, 4) | cfg_read(m, 0, 4, 4) << 32
    assert m.mmio.read(ecam(0, 0, 0, 1), 2) == 0x3780  # ECAM: unaligned word


def test_header_parses_with_construct(m):
    assert getattr(m, "pci", None) is None
    hostbridge(m)
    m.pci.add(Dev(), (0, 3, 0))
    raw = b"".join(cfg_read(m, 3, r, 4).to_bytes(4, "little") for r in range(0, 64, 4))
    h = TYPE0_HEADER.parse(raw)
    assert (h.vendor_id, h.device_id, h.revision_id) == (0x1AF4, 0x1000, 3)
    assert (h.class_code, h.subclass, h.prog_if) == (0x02, 0x00, 0x00)
    assert (h.subsystem_vendor_id, h.subsystem_id) == (0x1AF4, 1)
    assert h.interrupt_pin == 1 and h.bar0 == 1 and h.bar2 == 0xC


# -- BARs ------------------------------------------------------------------------------------

def sized(m, slot, off):
    old = cfg_read(m, slot, off)
    cfg_write(m, slot, off, 4, 0xFFFFFFFF)
    mask = cfg_read(m, slot, off)
    cfg_write(m, slot, off, 4, old)
    return mask


def test_bar_sizing(m):
    hostbridge(m)
    dev = Dev()
    dev.set_rom(b"\x55\xaa" + b"\0" * 5000)  # rounds up to 8 KiB
    m.pci.add(dev, (0, 3, 0))
    assert sized(m, 3, BAR_OFFSETS[0]) == 0xFFFFFFE1       # 32 bytes, I/O
    assert sized(m, 3, BAR_OFFSETS[1]) == 0xFFFFF000       # 4 KiB, 32-bit memory
    assert sized(m, 3, BAR_OFFSETS[2]) == 0xFFFFC00C       # 16 KiB, 64-bit, prefetchable
    assert sized(m, 3, BAR_OFFSETS[3]) == 0xFFFFFFFF       # upper half: all address bits
    assert sized(m, 3, BAR_OFFSETS[4]) == 0                # unimplemented
    cfg_write(m, 3, ROM_OFFSET, 4, 0xFFFFFFFE)
    assert cfg_read(m, 3, ROM_OFFSET) == 0xFFFFE000
    # Nothing got mapped while sizing (decode is off, and the values are patterns anyway).
    assert not any("testdev" in r.name for r in m.mmio.ranges() + m.pio.ranges())


def test_large_64bit_bar_sizing(m):
    hostbridge(m)
    dev = PciFunction(1, 2, 0xFF0000)
    dev.add_bar(0, 8 << 30, "mmio64", Regs(0))
    m.pci.add(dev, (0, 4, 0))
    assert sized(m, 4, BAR_OFFSETS[0]) == 0x4
    assert sized(m, 4, BAR_OFFSETS[1]) == 0xFFFFFFFE


def mapped(bus, name):
    return [r.base for r in bus.ranges() if r.name == name]


def test_reprogram_and_decode(m):
    hostbridge(m)
    dev = m.pci.add(Dev(), (0, 3, 0))
    cfg_write(m, 3, BAR_OFFSETS[1], 4, 0xC0001000)
    assert m.mmio.read(0xC0001000, 4) == 0xFFFFFFFF  # decode still off
    cfg_write(m, 3, CMD, 2, 0x2)
    assert m.mmio.read(0xC0001004, 4) == 0x2004
    cfg_write(m, 3, BAR_OFFSETS[1], 4, 0xC0100000)    # move while decoding
    assert m.mmio.read(0xC0100000, 4) == 0x2000
    assert m.mmio.read(0xC0001000, 4) == 0xFFFFFFFF
    m.mmio.write(0xC0100008, 4, 7)
    assert dev.m32.writes == [(8, 4, 7)]
    # 64-bit BAR above 4 GiB: low half, then high half.
    cfg_write(m, 3, BAR_OFFSETS[2], 4, 0x00004000)
    cfg_write(m, 3, BAR_OFFSETS[3], 4, 0x1)
    assert m.mmio.read(0x100004000, 4) == 0x3000
    # I/O needs the I/O enable bit.
    cfg_write(m, 3, BAR_OFFSETS[0], 4, 0xC040)
    assert m.pio.read(0xC040, 1) == 0xFF
    cfg_write(m, 3, CMD, 2, 0x3)
    assert m.pio.read(0xC041, 1) == 0x01
    # Disabling decode unmaps everything.
    cfg_write(m, 3, CMD, 2, 0)
    assert m.pio.read(0xC041, 1) == 0xFF
    assert m.mmio.read(0xC0100000, 4) == 0xFFFFFFFF
    assert m.mmio.read(0x100004000, 4) == 0xFFFFFFFF
    assert all(b.mapped_at is None for b in dev.all_bars())


def test_bad_bar_values_do_not_map_or_raise(m):
    hostbridge(m)
    dev = m.pci.add(Dev(), (0, 3, 0))
    other = m.pci.add(Dev(), (0, 4, 0))
    cfg_write(m, 3, CMD, 2, 0x3)
    cfg_write(m, 4, CMD, 2, 0x3)
    cfg_write(m, 3, BAR_OFFSETS[1], 4, 0)                    # zero
    assert dev.bars[1].mapped_at is None
    cfg_write(m, 3, BAR_OFFSETS[1], 4, 0xFFFFFFFF)           # mid-sizing
    assert dev.bars[1].mapped_at is None
    cfg_write(m, 3, BAR_OFFSETS[1], 4, 0x01000000)           # inside guest RAM
    assert dev.bars[1].mapped_at is None
    cfg_write(m, 3, BAR_OFFSETS[1], 4, ECAM_BASE)            # over the ECAM window
    assert dev.bars[1].mapped_at is None
    cfg_write(m, 3, BAR_OFFSETS[0], 4, 0xCF8)                # over the config ports
    assert dev.bars[0].mapped_at is None
    cfg_write(m, 3, BAR_OFFSETS[1], 4, 0xC0000000)
    cfg_write(m, 4, BAR_OFFSETS[1], 4, 0xC0000000)           # overlaps slot 3's BAR
    assert dev.bars[1].mapped_at == 0xC0000000 and other.bars[1].mapped_at is None
    assert m.mmio.read(0xC0000000, 4) == 0x2000
    # Once the conflict goes away, the shadowed BAR is decoded.
    cfg_write(m, 3, BAR_OFFSETS[1], 4, 0xC0002000)
    assert other.bars[1].mapped_at == 0xC0000000 and dev.bars[1].mapped_at == 0xC0002000


def test_rom_bar(m):
    hostbridge(m)
    dev = Dev()
    dev.set_rom(b"\x55\xaa\x10ROM")
    m.pci.add(dev, (0, 3, 0))
    cfg_write(m, 3, ROM_OFFSET, 4, 0xC0200000)
    cfg_write(m, 3, CMD, 2, 0x2)
    assert m.mmio.read(0xC0200000, 2) == 0xFFFF               # ROM enable bit clear
    cfg_write(m, 3, ROM_OFFSET, 4, 0xC0200001)
    assert cfg_read(m, 3, ROM_OFFSET) == 0xC0200001
    assert m.mmio.read(0xC0200000, 2) == 0xAA55
    assert m.mmio.read(0xC0200003, 4) == 0xFF4D4F52           # past the image: 0xff
    m.mmio.write(0xC0200000, 4, 0)                            # read-only
    assert m.mmio.read(0xC0200000, 2) == 0xAA55
    cfg_write(m, 3, CMD, 2, 0)
    assert m.mmio.read(0xC0200000, 2) == 0xFFFF


def test_bar_declaration_errors():
    f = PciFunction(1, 2, 0)
    with pytest.raises(ConfigError):
        f.add_bar(0, 3000, "mmio32", Regs(0))
    with pytest.raises(ConfigError):
        f.add_bar(0, 512, "io", Regs(0))
    with pytest.raises(ConfigError):
        f.add_bar(5, 4096, "mmio64", Regs(0))
    f.add_bar(0, 4096, "mmio64", Regs(0))
    with pytest.raises(ConfigError):
        f.add_bar(1, 4096, "mmio32", Regs(0))  # upper half of BAR0


# -- capabilities, masks -----------------------------------------------------------------

def test_capability_list(m):
    hostbridge(m)
    dev = Dev()
    a = dev.add_capability(0x09, b"\x05\x01\x02")   # vendor specific
    b = dev.add_capability(0x05, bytes(12))          # MSI-shaped
    c = dev.add_capability(0x01, bytes(6))
    m.pci.add(dev, (0, 3, 0))
    assert cfg_read(m, 3, STATUS, 2) & 0x10
    ptr, seen = cfg_read(m, 3, CAP_PTR_OFFSET, 1), []
    while ptr:
        assert ptr % 4 == 0 and ptr >= 0x40
        seen.append((ptr, cfg_read(m, 3, ptr, 1)))
        ptr = cfg_read(m, 3, ptr + 1, 1)
    assert seen == [(a, 0x09), (b, 0x05), (c, 0x01)] == dev.config.capabilities()
    assert cfg_read(m, 3, a + 2, 1) == 0x05
    # Read-only: the guest cannot rewrite ids, links or bodies.
    cfg_write(m, 3, a, 4, 0xDEADBEEF)
    cfg_write(m, 3, CAP_PTR_OFFSET, 1, 0x80)
    assert cfg_read(m, 3, a, 4) == 0x01050009 | b << 8
    assert cfg_read(m, 3, CAP_PTR_OFFSET, 1) == a


def test_status_write_one_to_clear_and_read_only_ids(m):
    hostbridge(m)
    dev = m.pci.add(Dev(), (0, 3, 0))
    dev.config["status"] = 0xF900 | 0x10
    cfg_write(m, 3, STATUS, 2, 0x0100 | 0x8000 | 0x10)   # clear two error bits
    assert cfg_read(m, 3, STATUS, 2) == 0x7810
    cfg_write(m, 3, CMD, 4, 0xFFFF0000)                  # dword write reaching status
    assert cfg_read(m, 3, STATUS, 2) == 0x0010
    cfg_write(m, 3, 0, 4, 0x11112222)
    cfg_write(m, 3, 8, 4, 0xFFFFFFFF)
    assert cfg_read(m, 3, 0) == 0x10001AF4
    assert cfg_read(m, 3, 8) == 0x02000003
    assert cfg_read(m, 3, FIELDS["interrupt_pin"][0], 1) == 1
    cfg_write(m, 3, FIELDS["interrupt_line"][0], 1, 0x0B)  # firmware-owned scratch
    assert cfg_read(m, 3, FIELDS["interrupt_line"][0], 1) == 0x0B
    cfg_write(m, 3, CMD, 2, 0xFFFF)
    assert cfg_read(m, 3, CMD, 2) == 0x0547


def test_accesses_past_the_space(m):
    hostbridge(m)
    dev = PciFunction(1, 2, 0, extended=True)
    dev.config.put(0x100, 4, 0x12345678)
    m.pci.add(dev, (0, 5, 0))
    # Conventional function: ECAM past 256 bytes reads ones, writes vanish.
    assert m.mmio.read(ecam(0, 0, 0, 0x100), 4) == 0xFFFFFFFF
    m.mmio.write(ecam(0, 0, 0, 0x100), 4, 0)
    assert m.mmio.read(ecam(0, 0, 0, 0xFFE), 4) == 0xFFFFFFFF  # straddles the 4 KiB end
    # A qword straddling the end: its low dword answers, the high one is nobody's.
    assert m.mmio.read(ecam(0, 0, 0, 0xFC), 8) == \
        0xFFFFFFFF << 32 | m.mmio.read(ecam(0, 0, 0, 0xFC), 4)
    # Express function: extended space answers; a dword straddling its 4 KiB end gets its
    # last three bytes, and the fourth from the next function (none here: ones).
    assert m.mmio.read(ecam(0, 5, 0, 0x100), 4) == 0x12345678
    dev.config.put(0xFFC, 4, 0xA1B2C3D4)
    assert m.mmio.read(ecam(0, 5, 0, 0xFFD), 4) == 0xFFA1B2C3
    assert dev.config.read(4096, 4) == 0xFFFFFFFF and dev.config.read(-1, 1) == 0xFF
    assert dev.config.read(0, 3) == 0xFFFFFF and dev.config.write(0, 3, 0) is False


def test_multifunction(m):
    hostbridge(m)
    f0 = m.pci.add(PciFunction(1, 2, 0xFF0000), (0, 6, 0))
    ht = FIELDS["header_type"][0]
    assert cfg_read(m, 6, ht, 1) == 0x00
    m.pci.add(PciFunction(1, 3, 0xFF0000), (0, 6, 2))
    assert cfg_read(m, 6, ht, 1) == 0x80
    assert cfg_read(m, 6, 0, 4, func=2) == 0x00030001
    cfg_write(m, 6, ht, 1, 0)          # read-only
    assert cfg_read(m, 6, ht, 1) == 0x80
    # Without function 0 a slot is empty, whatever else is in it.
    m.pci.add(PciFunction(1, 4, 0xFF0000), (0, 7, 1))
    assert cfg_read(m, 7, 0, 2, func=1) == 0xFFFF
    m.pci.remove((0, 6, 2))
    assert cfg_read(m, 6, ht, 1) == 0x00 and f0.config["header_type"] == 0
    with pytest.raises(ConfigError):
        m.pci.add(PciFunction(1, 5, 0), (0, 6, 0))


# -- allocation ------------------------------------------------------------------------------

def overlaps(ranges):
    ranges = sorted(ranges)
    return any(a[0] + a[1] > b[0] for a, b in zip(ranges, ranges[1:]))


def test_assign_bars():
    m = Machine(3 << 30 | 512 << 20, backend="synthetic")  # has RAM above 4 GiB
    try:
        hostbridge(m)
        devs = []
        for slot in range(1, 6):
            d = Dev()
            d.add_bar(4, 0x100000 << slot, "mmio32", Regs(slot))
            d.add_bar(5, 4 << slot, "io", Regs(slot))
            d.set_rom(bytes(0x10000))
            devs.append(m.pci.add(d, (0, slot, 0)))
        m.pci.assign_bars()
        io, m32, m64 = [], [], []
        for d in devs:
            assert d.command == 0
            for bar in d.all_bars():
                addr = d.bar_address(bar.index)
                assert addr % bar.size == 0, (bar, hex(addr))
                lists = {"io": io, "mmio32": m32, "rom": m32, "mmio64": m64}
                lists[bar.kind].append((addr, bar.size))
        assert all(0xC000 <= a and a + s <= 0x10000 for a, s in io)
        assert all(0xC0000000 <= a and a + s <= 0xE0000000 for a, s in m32)
        assert all(a >= m.memory.highmem_end and a >= 1 << 32 for a, s in m64)
        assert not overlaps(io) and not overlaps(m32) and not overlaps(m64)
        assert all(d.bar(6).mapped_at is None for d in devs)
        m.pci.enable_all()
        for d in devs:
            assert d.command == 0x3
            assert all(b.mapped_at == d.bar_address(b.index) for b in d.bars if b is not None)
            assert d.rom.mapped_at is None  # the ROM enable bit is the OS's to set
        d = devs[2]
        assert m.mmio.read(d.bar_address(1), 4) == 0x2000
        assert m.pio.read(d.bar_address(0) + 1, 1) == 0x01
    finally:
        m.close()


def test_assign_bars_64bit_low_and_full(m):
    hostbridge(m)
    d = m.pci.add(Dev(), (0, 3, 0))
    m.pci.assign_bars(mmio64_high=False)
    assert 0xC0000000 <= d.bar_address(2) < 0xE0000000
    big = PciFunction(1, 2, 0)
    big.add_bar(0, 1 << 30, "mmio32", Regs(0))
    m.pci.add(big, (0, 4, 0))
    with pytest.raises(ConfigError):
        m.pci.assign_bars()


# -- INTx ------------------------------------------------------------------------------------

def test_intx_swizzle(m):
    hostbridge(m)
    fns = {}
    for slot, pin in ((3, 1), (4, 1), (4, 2), (5, 4), (8, 1)):
        f = Dev(pin=pin)
        fns[(slot, pin)] = m.pci.add(f, (0, slot, 0 if pin == 1 else 1))
    expect = {(3, 1): 19, (4, 1): 16, (4, 2): 17, (5, 4): 16, (8, 1): 16}
    for key, f in fns.items():
        assert f.config["interrupt_line"] == expect[key]
    fns[(3, 1)].set_intx(1)
    assert m.irq_levels.get(19) == 1
    assert cfg_read(m, 3, STATUS, 2) & 0x8
    # GSI 16 is shared by three functions: the line is the OR.
    fns[(4, 1)].set_intx(1)
    fns[(8, 1)].set_intx(1)
    fns[(4, 1)].set_intx(0)
    assert m.irq_levels[16] == 1
    fns[(8, 1)].set_intx(0)
    assert m.irq_levels[16] == 0
    # The interrupt-disable command bit masks the pin.
    cfg_write(m, 3, CMD, 2, 0x400)
    assert m.irq_levels[19] == 0 and cfg_read(m, 3, STATUS, 2) & 0x8
    cfg_write(m, 3, CMD, 2, 0)
    assert m.irq_levels[19] == 1
    fns[(3, 1)].set_intx(0)
    assert m.irq_levels[19] == 0


def test_ecam_parameters():
    m = Machine(16 << 20, backend="synthetic")
    try:
        bus = ensure_pci_bus(m, ecam_base=0xB0000000, ecam_buses=16)
        assert [r for r in m.mmio.ranges() if r.name == "pci-ecam"][0].length == 16 << 20
        hostbridge(m)
        bus.add(PciFunction(1, 2, 0), (3, 0, 0))
        assert m.mmio.read(0xB0000000 + (3 << 20), 4) == 0x00020001
        assert ensure_pci_bus(m) is bus
        with pytest.raises(ConfigError):
            bus.add(PciFunction(1, 2, 0), (16, 0, 0))
    finally:
        m.close()


# -- random config writes ------------------------------------------------------------------

def _check_no_overlap(m):
    for space in (m.pio, m.mmio):
        rs = [(r.base, r.length) for r in space.ranges()]
        assert not overlaps(rs)
    for r in m.mmio.ranges():
        assert not any(r.base < g.end and g.gpa < r.base + r.length for g in m.memory.regions)


class Everything(PciFunction):
    def __init__(self):
        super().__init__(0x1234, 0x5678, 0x010000, pin=2, extended=True)
        self.add_bar(0, 16, "io", Regs(1))
        self.add_bar(1, 0x1000, "mmio32", Regs(2))
        self.add_bar(2, 0x2000, "mmio64", Regs(3))
        self.add_bar(4, 0x1000, "mmio64", Regs(4), prefetchable=True)
        self.set_rom(bytes(4096))
        self.add_capability(0x05, bytes(10), wmask=bytes([0xFF] * 10))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2),
                          # Anywhere, but mostly the registers that move BARs.
                          st.one_of(st.integers(0, 4095),
                                    st.sampled_from([4, 5, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24,
                                                     0x30, 0x31, 0x1A, 0x1E])),
                          st.sampled_from([1, 2, 4]),
                          st.one_of(st.integers(0, 0xFFFFFFFF),
                                    st.sampled_from([0, 0xFFFFFFFF, 0xC0000000, 0xC000, 3, 7,
                                                     0xE0000000, 0x1000, 0xC0001000]))),
                min_size=1, max_size=80),
       st.booleans())
def test_random_config_writes(writes, firmware_ran):
    m = Machine(16 << 20, backend="synthetic")
    try:
        hostbridge(m)
        # Two identical devices so their BARs keep colliding.
        m.pci.add(Everything(), (0, 2, 0))
        m.pci.add(Everything(), (0, 3, 0))
        if firmware_ran:  # start from decoded BARs, so writes move and unmap live ranges
            m.pci.assign_bars()
            m.pci.enable_all()
        for which, off, size, value in writes:
            if which == 2:  # through 0xcf8/0xcfc
                cfg_write(m, 2 + (value & 1), off & 0xFF, size, value)
            else:
                m.mmio.write(ecam(0, 2 + which, 0, off), size, value & ((1 << (8 * size)) - 1))
            m.mmio.read(ecam(0, 2 + which, 0, off), size)
            _check_no_overlap(m)
            # The write left the bus decoded as a walk over every BAR would (a function whose
            # own BARs did not move skips that walk): walking again moves nothing.
            mapped = {(a, b.index): b.mapped_at for a, f in m.pci.functions.items()
                      for b in f.all_bars()}
            m.pci.refresh()
            assert mapped == {(a, b.index): b.mapped_at for a, f in m.pci.functions.items()
                              for b in f.all_bars()}
        for f in m.pci.functions.values():
            for bar in f.all_bars():
                if bar.mapped_at is not None:
                    r = getattr(m, bar.space).find(bar.mapped_at)
                    assert r is not None and r.base == bar.mapped_at and r.handler is bar.handler
                    assert f.decode_target(bar, m) == bar.mapped_at
    finally:
        m.close()


# -- wiring ----------------------------------------------------------------------------------

def test_config_ports_leave_reset_control_alone(m):
    rc = ResetControl(m)
    ensure_pci_bus(m)
    m.pio.write(0xCF9, 1, 0x02)
    assert rc.value == 0x02 and m.pio.read(0xCF9, 1) == 0x02
    m.pio.write(0xCF8, 4, cf8(0, 0, 0, 0))
    assert m.pio.read(0xCF8, 4) == cf8(0, 0, 0, 0) and rc.value == 0x02


def test_add_pci_devices_from_config_tree(m):
    pm = plugin_manager(entry_points=False)
    registry = Registry(pm)
    cfg = Config()
    cfg.set("pci.0.0.0.device", registry.require("hostbridge", "pci", "-s 0,hostbridge").name)
    cfg.set("pci.0.1.0.device", "hostbridge")
    cfg.set("pci.0.1.0.vendor", "0x1022")
    cfg.set("pci.0.1.0.devid", "0x7432")
    pci = add_pci_devices(m, registry, cfg.group("pci"))
    assert pci is m.pci and len(m.devices) == 2
    assert cfg_read(m, 0, 0) == 0x12378086 and cfg_read(m, 1, 0) == 0x74321022
    assert add_pci_devices(m, registry, {}) is None
    with pytest.raises(ConfigError):
        add_pci_devices(m, registry, {"0": {"2": {"0": {"bogus": "1"}}}})


def test_add_pci_devices_from_command_line(m):
    from hvframe.runner import add_slot
    pm = plugin_manager(entry_points=False)
    registry = Registry(pm)
    cfg = Config()
    add_slot(cfg, registry, "0,hostbridge,devid=0x7190")
    add_slot(cfg, registry, "0:3:0,hostbridge")
    add_slot(cfg, registry, "0:2,hostbridge")
    add_pci_devices(m, registry, cfg.group("pci"))
    assert cfg_read(m, 0, 0) == 0x71908086
    assert cfg_read(m, 3, 0) == 0x12378086
    assert cfg_read(m, 0, 0, func=2) == 0x12378086
    assert cfg_read(m, 0, FIELDS["header_type"][0], 1) == 0x80


def test_intx_from_another_thread_while_guest_writes_config(m):
    import threading
    hostbridge(m)
    dev = m.pci.add(Dev(), (0, 3, 0))
    errors = []

    def device_thread():
        try:
            for i in range(2000):
                dev.set_intx(i & 1)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    t = threading.Thread(target=device_thread)
    t.start()
    for i in range(500):
        cfg_write(m, 3, STATUS, 2, 0xFFFF)
        cfg_write(m, 3, CMD, 2, 0x400 if i & 1 else 0)
    t.join()
    cfg_write(m, 3, CMD, 2, 0)
    assert not errors
    dev.set_intx(1)
    assert m.irq_levels[19] == 1 and cfg_read(m, 3, STATUS, 2) & 0x8
    dev.set_intx(0)
    assert m.irq_levels[19] == 0 and not cfg_read(m, 3, STATUS, 2) & 0x8
