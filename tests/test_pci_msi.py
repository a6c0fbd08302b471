"""MSI, MSI-X and INTx of PCI functions, through the dispatch core: the pci-testdev's
registers and MSI-X table on m.mmio, its config space through ports 0xcf8/0xcfc."""
import pytest

from hvframe.testing import rig
from hypothesis import HealthCheck, given, settings, strategies as st

from hvframe.errors import ConfigError
from hvframe.machine import Machine
from hvframe.pci.bus import INTX_GSI_BASE
from hvframe.pci.config_space import CMD_INTX_DISABLE, FIELDS
from hvframe.pci.device import PciFunction
from hvframe.pci.msi import (CAP_ID_MSI, CAP_ID_MSIX, MSI_ADDR_HI, MSI_ADDR_LO, MSI_CONTROL,
                             MSI_DATA, MSI_MASK, MSI_PENDING, MSIX_CONTROL, MSIX_ENABLE,
                             MSIX_FUNCTION_MASK, MSIX_PBA, MSIX_TABLE, MsixCapability)
from hvframe.pci.testdev import MAGIC, REG_ACK, REG_MAGIC, REG_RAISE, REG_SCRATCH

SLOT = 3
CMD = FIELDS["command"][0]
STATUS = FIELDS["status"][0]
CAP_PTR = FIELDS["capabilities_ptr"][0]
BAR0, BAR1 = FIELDS["bar0"][0], FIELDS["bar1"][0]
INT_LINE = FIELDS["interrupt_line"][0]


def cf8(slot, reg):
    return 0x80000000 | slot << 11 | (reg & 0xFC)


def cfg_read(m, reg, size=4, slot=SLOT):
    m.pio.write(0xCF8, 4, cf8(slot, reg))
    return m.pio.read(0xCFC + (reg & 3), size)


def cfg_write(m, reg, size, value, slot=SLOT):
    m.pio.write(0xCF8, 4, cf8(slot, reg))
    m.pio.write(0xCFC + (reg & 3), size, value)


@pytest.fixture
def m():
    machine = Machine(64 << 20, backend="synthetic")
    yield machine
    machine.close()


@pytest.fixture
def dev(m):
    return make_testdev(m)


def make_testdev(m):
    d, = rig(m, f"-s {SLOT},pci-testdev")     # BARs placed, decoding on (direct boot)
    return d


def caps(m):
    """Walk the capability list as a guest does: {cap_id: offset}."""
    assert cfg_read(m, STATUS, 2) & 0x10
    out, ptr = {}, cfg_read(m, CAP_PTR, 1)
    while ptr:
        out[cfg_read(m, ptr, 1)] = ptr
        ptr = cfg_read(m, ptr + 1, 1)
    return out


class Guest:
    """What a driver knows after enumeration: BAR addresses and capability offsets."""

    def __init__(self, m):
        self.m = m
        self.regs = cfg_read(m, BAR0) & ~0xF
        self.bar1 = cfg_read(m, BAR1) & ~0xF
        c = caps(m)
        self.msi, self.msix = c[CAP_ID_MSI], c[CAP_ID_MSIX]
        table = cfg_read(m, self.msix + MSIX_TABLE)
        pba = cfg_read(m, self.msix + MSIX_PBA)
        assert table & 7 == 1 and pba & 7 == 1  # both in BAR1
        self.table = self.bar1 + (table & ~7)
        self.pba = self.bar1 + (pba & ~7)

    def entry(self, v, addr, data, masked=False):
        e = self.table + 16 * v
        self.m.mmio.write(e, 4, addr & 0xFFFFFFFF)
        self.m.mmio.write(e + 4, 4, addr >> 32)
        self.m.mmio.write(e + 8, 4, data)
        self.m.mmio.write(e + 12, 4, 1 if masked else 0)

    def mask(self, v, masked):
        self.m.mmio.write(self.table + 16 * v + 12, 4, 1 if masked else 0)

    def msix_control(self, value):
        cfg_write(self.m, self.msix + MSIX_CONTROL, 2, value)

    def raise_(self, v=0):
        self.m.mmio.write(self.regs + REG_RAISE, 4, v)

    def pba_bits(self):
        return self.m.mmio.read(self.pba, 8)


# -- the device ------------------------------------------------------------------------------

def test_testdev_identity_registers_and_bars(m, dev):
    assert cfg_read(m, 0) == 0x00051B36
    assert cfg_read(m, 8) >> 8 == 0x00FF00
    assert cfg_read(m, FIELDS["interrupt_pin"][0], 1) == 1
    g = Guest(m)
    assert m.mmio.read(g.regs + REG_MAGIC, 4) == MAGIC
    m.mmio.write(g.regs + REG_SCRATCH, 4, 0xDEADBEEF)
    assert m.mmio.read(g.regs + REG_SCRATCH, 4) == 0xDEADBEEF
    assert m.mmio.read(g.regs + 0x100, 4) == 0
    assert m.mmio.read(g.regs + 1, 2) == 0  # unaligned: 0, no error


def test_capability_walk_finds_msi_and_msix(m, dev):
    c = caps(m)
    assert set(c) == {CAP_ID_MSI, CAP_ID_MSIX}
    ctl = cfg_read(m, c[CAP_ID_MSIX] + MSIX_CONTROL, 2)
    assert ctl & 0x7FF == 3  # 4 vectors
    assert not ctl & (MSIX_ENABLE | MSIX_FUNCTION_MASK)
    assert cfg_read(m, c[CAP_ID_MSIX] + MSIX_TABLE) == 0x1
    assert cfg_read(m, c[CAP_ID_MSIX] + MSIX_PBA) == 0x801
    msi_ctl = cfg_read(m, c[CAP_ID_MSI] + MSI_CONTROL, 2)
    assert msi_ctl & 0x80 and msi_ctl & 0x100 and not msi_ctl & 0x7E  # 64-bit, maskable, 1


def test_table_reads_back_and_starts_masked(m, dev):
    g = Guest(m)
    for v in range(4):
        assert m.mmio.read(g.table + 16 * v + 12, 4) == 1
    g.entry(2, 0x1_FEE0_1000, 0x4042)
    assert m.mmio.read(g.table + 32, 4) == 0xFEE01000
    assert m.mmio.read(g.table + 36, 4) == 1
    assert m.mmio.read(g.table + 40, 4) == 0x4042
    assert m.mmio.read(g.table + 44, 4) == 0
    assert m.mmio.read(g.table + 32, 8) == 0x1_FEE0_1000
    m.mmio.write(g.table + 40, 8, 0xFFFF_FFFE_0000_0051)  # data + control in one qword
    assert m.mmio.read(g.table + 40, 4) == 0x51
    assert m.mmio.read(g.table + 44, 4) == 0  # reserved control bits stay 0
    m.mmio.write(g.table + 32, 4, 0xFEE00003)  # address bits 1:0 are reserved
    assert m.mmio.read(g.table + 32, 4) == 0xFEE00000


def test_msix_enabled_unmasked_delivers(m, dev):
    g = Guest(m)
    g.entry(0, 0xFEE00000, 0x40)
    g.entry(3, 0xFEE01000, 0x43)
    g.raise_(0)
    assert m.msis == [] and m.irq_levels.get(INTX_GSI_BASE + SLOT % 4) == 1  # still INTx
    m.mmio.write(g.regs + REG_ACK, 4, 0)
    g.msix_control(MSIX_ENABLE)
    g.raise_(0)
    g.raise_(3)
    assert m.msis == [(0xFEE00000, 0x40), (0xFEE01000, 0x43)]
    assert dev.interrupt(0) == "msix"
    assert m.mmio.read(g.regs + REG_RAISE, 4) == 3


def test_masked_vector_sets_pba_and_delivers_on_unmask(m, dev):
    g = Guest(m)
    g.entry(1, 0xFEE00000, 0x41, masked=True)
    g.msix_control(MSIX_ENABLE)
    g.raise_(1)
    assert m.msis == []
    assert g.pba_bits() == 0b10
    assert m.mmio.read(g.pba, 4) == 0b10
    m.mmio.write(g.pba, 4, 0)  # the PBA is read-only
    assert g.pba_bits() == 0b10
    g.mask(1, False)
    assert m.msis == [(0xFEE00000, 0x41)]
    assert g.pba_bits() == 0
    g.mask(1, False)  # nothing pending: nothing more
    assert len(m.msis) == 1


def test_function_mask(m, dev):
    g = Guest(m)
    g.entry(0, 0xFEE00000, 0x40)
    g.entry(2, 0xFEE00000, 0x42)
    g.msix_control(MSIX_ENABLE | MSIX_FUNCTION_MASK)
    g.raise_(0)
    g.raise_(2)
    assert m.msis == [] and g.pba_bits() == 0b101
    g.mask(2, True)
    g.msix_control(MSIX_ENABLE)  # function unmasked: vector 0 goes, vector 2 still masked
    assert m.msis == [(0xFEE00000, 0x40)] and g.pba_bits() == 0b100
    g.mask(2, False)
    assert m.msis[-1] == (0xFEE00000, 0x42) and g.pba_bits() == 0


def test_msix_disabled_vector_past_table_are_dropped(m, dev):
    assert dev.msix.notify(0) is False and dev.msix.pending_bits == 0
    Guest(m).msix_control(MSIX_ENABLE)
    assert dev.msix.notify(4) is False and dev.msix.notify(-1) is False
    assert m.msis == []


def test_msi_delivery_masking_and_pending(m, dev):
    g = Guest(m)
    cap = g.msi
    cfg_write(m, cap + MSI_ADDR_LO, 4, 0xFEE00000)
    cfg_write(m, cap + MSI_ADDR_HI, 4, 0)
    cfg_write(m, cap + MSI_DATA, 2, 0x45)
    cfg_write(m, cap + MSI_CONTROL, 2, 0x71)  # enable; multiple-message enable is read-only
    assert cfg_read(m, cap + MSI_CONTROL, 2) & 0x71 == 1
    g.raise_(0)
    assert m.msis == [(0xFEE00000, 0x45)]
    cfg_write(m, cap + MSI_MASK, 4, 1)
    g.raise_(0)
    assert len(m.msis) == 1 and cfg_read(m, cap + MSI_PENDING, 4) == 1
    cfg_write(m, cap + MSI_PENDING, 4, 0)  # read-only
    assert cfg_read(m, cap + MSI_PENDING, 4) == 1
    cfg_write(m, cap + MSI_MASK, 4, 0)
    assert m.msis == [(0xFEE00000, 0x45)] * 2 and cfg_read(m, cap + MSI_PENDING, 4) == 0
    g.raise_(1)  # only vector 0 exists
    assert len(m.msis) == 2
    # MSI-X wins over MSI when both are enabled.
    g.entry(0, 0xFEE00000, 0x40)
    g.msix_control(MSIX_ENABLE)
    g.raise_(0)
    assert m.msis[-1] == (0xFEE00000, 0x40)


def test_intx_assert_and_ack(m, dev):
    g = Guest(m)
    gsi = cfg_read(m, INT_LINE, 1)
    assert gsi == INTX_GSI_BASE + (SLOT + 1 - 1) % 4
    assert m.irq_levels.get(gsi, 0) == 0
    g.raise_(0)
    assert m.irq_levels[gsi] == 1
    assert cfg_read(m, STATUS, 2) & 0x8  # interrupt status
    assert m.mmio.read(g.regs + REG_ACK, 4) == 1
    m.mmio.write(g.regs + REG_ACK, 4, 0)
    assert m.irq_levels[gsi] == 0 and not cfg_read(m, STATUS, 2) & 0x8
    # Interrupt disable in the command register masks the pin, not the status.
    cfg_write(m, CMD, 2, cfg_read(m, CMD, 2) | CMD_INTX_DISABLE)
    g.raise_(0)
    assert m.irq_levels[gsi] == 0 and cfg_read(m, STATUS, 2) & 0x8
    cfg_write(m, CMD, 2, cfg_read(m, CMD, 2) & ~CMD_INTX_DISABLE)
    assert m.irq_levels[gsi] == 1
    m.mmio.write(g.regs + REG_ACK, 4, 0)
    assert m.irq_levels[gsi] == 0
    assert m.msis == []


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 0x1100), st.sampled_from([1, 2, 3, 4, 8]),
                              st.integers(0, (1 << 64) - 1), st.booleans()), max_size=40))
def test_malformed_table_accesses_never_raise(m, dev, ops):
    bar1 = dev.bar_address(1)
    for off, size, value, is_write in ops:
        if is_write:
            m.mmio.write(bar1 + off, size, value & ((1 << (8 * size)) - 1))
        else:
            v = m.mmio.read(bar1 + off, size)
            if off >= 0x1000:
                assert v == (1 << (8 * size)) - 1  # past the BAR: unclaimed
            elif size not in (4, 8) or off % size or 0x40 <= off < 0x800 or off >= 0x808:
                assert v == 0
        dev.msix.notify(off % 5)
    # Direct calls with absurd offsets and sizes, too.
    msix = dev.msix
    for off in (-8, -1, 0x7FFFFFFF, 1 << 40):
        for size in (0, 1, 4, 8, 16):
            assert msix.read(off, size) == 0
            msix.write(off, size, 0xFFFFFFFF)


def test_msix_capability_arguments_are_checked():
    class Fn(PciFunction):
        def __init__(self):
            super().__init__(0x1234, 0x5678, 0xFF0000)

    with pytest.raises(ConfigError):
        MsixCapability(Fn(), vectors=0, bar=1)
    with pytest.raises(ConfigError):
        MsixCapability(Fn(), vectors=4, bar=6)
    with pytest.raises(ConfigError):
        MsixCapability(Fn(), vectors=4, bar=1, table_offset=0, pba_offset=0x10)
    # A big table gets its PBA on the next page and a BAR that holds both.
    fn = Fn()
    big = MsixCapability(fn, vectors=300, bar=2)
    assert big.pba_offset == 0x2000 and fn.bars[2].size == 0x4000
    assert fn.interrupt(0) is None  # no pin, nothing enabled


def test_pci_testdev_from_the_command_line_config(m):
    from hvframe.pci.bus import add_pci_devices
    from hvframe.plugins import Registry, plugin_manager
    registry = Registry(plugin_manager(entry_points=False))
    add_pci_devices(m, registry, {"0": {"0": {"0": {"device": "hostbridge"}},
                                        "3": {"0": {"device": "pci-testdev"}}}})
    assert cfg_read(m, 0, slot=3) == 0x00051B36
    assert m.mmio.read(cfg_read(m, BAR0) & ~0xF, 4) == MAGIC


# -- the gate native device threads fire through ------------------------------------------------

@pytest.fixture
def em():
    """A synthetic machine whose irqfds are eventfds the caller reads, as KVM would."""
    from hvframe.synthetic import SyntheticMachine
    machine = SyntheticMachine(64 << 20, irqfd_eventfds=True)
    yield machine
    machine.close()


def test_native_gate_opens_exactly_while_the_vector_may_fire(em):
    import os
    d = make_testdev(em)
    g = Guest(em)
    gate = d.msix.gate(0)
    g.entry(0, 0xFEE00000, 0x40)
    assert gate.open == 0                                    # MSI-X still disabled
    g.msix_control(MSIX_ENABLE)
    irq = d.msix.irqfd(0)
    assert irq.eventfd_delivery and (gate.open, gate.fd) == (1, irq.fd)
    g.raise_(0)                                              # the eventfd is the interrupt
    assert em.msis == [] and os.eventfd_read(irq.fd) == 1
    g.mask(0, True)
    assert gate.open == 0
    g.mask(0, False)
    assert gate.open == 1
    g.msix_control(MSIX_ENABLE | MSIX_FUNCTION_MASK)
    assert gate.open == 0
    g.msix_control(MSIX_ENABLE)
    assert gate.open == 1
    g.entry(0, 0xFEE01000, 0x41)                             # retargeted while live
    assert gate.open == 1 and irq.message == (0xFEE01000, 0x41)
    g.msix_control(0)
    assert gate.open == 0
    g.msix_control(MSIX_ENABLE)
    assert gate.open == 1
    irq.close()                                              # its number may be reused
    assert (gate.open, gate.fd) == (0, -1)


def test_native_gate_stays_shut_where_firing_is_recorded(m, dev):
    from hvframe.core_native import ffi
    g = Guest(m)
    g.entry(0, 0xFEE00000, 0x40)
    g.msix_control(MSIX_ENABLE)
    g.raise_(0)
    assert m.msis == [(0xFEE00000, 0x40)]
    assert dev.msix.gate(0).open == 0          # a native write would bypass m.msis
    assert dev.msix.gate(dev.msix.vectors) == ffi.NULL
